"""A rerun with nothing to do costs its listing and its commit markers, not torch's import:
what the up-to-date check and the run need of the model (`pipeline.run.model_meta`) is known
without torch for an untrained model, published weights and a checkpoint, and must be what
torch says (`_meta_with_torch`) and so what the replicas' model reports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline import run as run_module
from pipeline.config import RunError, SegmentConfig
from pipeline.preflight import CHECKPOINT_FORMAT, PUBLISHED_WEIGHTS
from pipeline.run import model_meta
from pipeline.samples import synthetic_scene

ROOT = Path(__file__).resolve().parents[1]
UNTRAINED = {"source": "s", "output": "o", "model": "lraspp_mobilenet_v3_large", "weights": "none", "num_classes": 3}


@pytest.fixture(scope="module")
def small_model():
    from pipeline.models import build_model

    return build_model("lraspp_mobilenet_v3_large", num_classes=3)


def _checkpoint(path: Path, model, **meta) -> str:
    """A checkpoint written by save_checkpoint: `model`'s weights with the metadata given."""
    from pipeline.models import ModelMeta, save_checkpoint

    save_checkpoint(model, str(path), ModelMeta.default("lraspp_mobilenet_v3_large", 3, **meta))
    return str(path)


def _saved(path: Path, meta: dict) -> str:
    """A checkpoint holding `meta` as it is, not as save_checkpoint writes it (by hand, or by
    another version); the metadata is all that is read, so it needs no weights."""
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": {}}, path)
    return str(path)


def _plain(path: Path, model) -> str:
    """A checkpoint of weights alone, as torch.save writes a state_dict: no segpipe metadata."""
    torch.save(model.state_dict(), path)
    return str(path)


def _refuse_torch(config: SegmentConfig) -> None:
    raise AssertionError("model_meta asked _meta_with_torch, which imports torch")


def _metas(config: SegmentConfig) -> tuple[str, str]:
    """model_meta's and _meta_with_torch's metadata as the fingerprint's JSON (where 0 and 0.0,
    or a tuple and a list, would differ as they must not)."""
    return (json.dumps(model_meta(config), sort_keys=True),
            json.dumps(run_module._meta_with_torch(config), sort_keys=True))


_WEIGHTS = {
    "untrained": {},
    "untrained-named": {"class_names": ("sky", "road", "car")},
    "untrained-unet": {"model": "unet_resnet34", "num_classes": 7},
    "published-default": {"weights": "DEFAULT", "num_classes": None},
    "published-member": {"weights": "COCO_WITH_VOC_LABELS_V1", "num_classes": 21},
    "published-enum-member": {"model": "deeplabv3_resnet50", "weights": "DeepLabV3_ResNet50_Weights.DEFAULT",
                              "num_classes": None},
    "published-named": {"weights": "DEFAULT", "num_classes": None, "class_names": tuple(f"c{i}" for i in range(21))},
    "checkpoint": {"weights": {}, "model": None, "num_classes": None},
    "checkpoint-named": {"weights": {"class_names": ("sky", "road", "car")}, "model": None, "num_classes": None},
    "checkpoint-renamed": {"weights": {"class_names": ("sky", "road", "car")}, "class_names": ("a", "b", "c"),
                           "num_classes": 3},
    "checkpoint-published-like": {
        "weights": {"preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "resize": "short_side",
                                      "size": [520]}, "model_kwargs": {"aux_loss": True, "depths": [1, 2]},
                    "weights": "COCO_WITH_VOC_LABELS_V1", "extra": {"miou": 0.5}},
        "model": None, "num_classes": None},
    "checkpoint-fixed-size": {"weights": {"preprocessing": {"resize": "fixed", "size": [256, 320]}}},
}


@pytest.mark.parametrize("settings", _WEIGHTS.values(), ids=_WEIGHTS.keys())
def test_model_meta_is_what_torch_says_without_asking_it(tmp_path, monkeypatch, small_model, settings) -> None:
    """Differing in any field, a rerun would judge every shard out of date (or the driver
    would refuse the replicas' model); asking torch would import it."""
    if isinstance(settings.get("weights"), dict):
        settings = settings | {"weights": _checkpoint(tmp_path / "m.pt", small_model, **settings["weights"])}
    config = SegmentConfig(**UNTRAINED | settings)
    expected = run_module._meta_with_torch(config)
    monkeypatch.setattr(run_module, "_meta_with_torch", _refuse_torch)
    assert json.dumps(model_meta(config), sort_keys=True) == json.dumps(expected, sort_keys=True)


_VALID = {"architecture": "lraspp_mobilenet_v3_large", "num_classes": 2, "class_names": ["sea", "land"],
          "palette": [[0, 0, 0], [128, 0, 0]], "preprocessing": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "resize": "none", "size": None},
          "weights": "none",
          "model_kwargs": {}, "extra": {}}
# metadata that save_checkpoint does not write, but ModelMeta reads: the metadata it gives
# comes from ModelMeta, which completes (defaults), converts (0 to 0.0, tuples to lists) or refuses it
_HAND_WRITTEN = {
    "fields-left-out": {k: v for k, v in _VALID.items() if k not in {"preprocessing", "model_kwargs", "extra"}},
    "ints-for-floats": _VALID | {"preprocessing": {"mean": [0, 0, 0], "std": [1, 1, 1], "resize": "none", "size": None}},
    "tuples": _VALID | {"class_names": ("sea", "land"), "model_kwargs": {"depths": (1, 2)}},
    "not-a-number": _VALID | {"model_kwargs": {"dropout": float("nan")}},
    "preprocessing-defaults": _VALID | {"preprocessing": {"resize": "short_side", "size": [512]}},
}


@pytest.mark.parametrize("meta", _HAND_WRITTEN.values(), ids=_HAND_WRITTEN.keys())
def test_metadata_not_as_save_checkpoint_writes_it_is_read_as_model_meta_reads_it(tmp_path, meta) -> None:
    config = SegmentConfig(source="s", output="o", weights=_saved(tmp_path / "m.pt", meta))
    meta, expected = _metas(config)
    assert meta == expected


_REFUSED = {
    "untrained-without-classes": lambda tmp, model: SegmentConfig.model_construct(
        **UNTRAINED | {"weights": None, "num_classes": None, "class_names": None, "storage_options": {}}),
    "published-other-num-classes": lambda tmp, model: SegmentConfig(**UNTRAINED | {"weights": "DEFAULT", "num_classes": 5}),
    "published-too-few-names": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"weights": "DEFAULT", "num_classes": None, "class_names": ("a", "b")}),
    "published-unknown": lambda tmp, model: SegmentConfig(**UNTRAINED | {"weights": "IMAGENET1K_V1"}),
    "published-for-a-model-without": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"model": "unet_resnet34", "weights": "DEFAULT", "num_classes": None}),
    "checkpoint-other-model": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"weights": _checkpoint(tmp / "m.pt", model), "model": "fcn_resnet50", "num_classes": None}),
    "checkpoint-other-num-classes": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"weights": _checkpoint(tmp / "m.pt", model), "num_classes": 5}),
    "checkpoint-too-few-names": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"weights": _checkpoint(tmp / "m.pt", model), "num_classes": None, "class_names": ("a",)}),
    "checkpoint-missing": lambda tmp, model: SegmentConfig(**UNTRAINED | {"weights": str(tmp / "missing.pt")}),
    "checkpoint-invalid": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"weights": _saved(tmp / "m.pt", _VALID | {"num_classes": 3}), "num_classes": None}),
    "checkpoint-not-segpipe": lambda tmp, model: SegmentConfig(
        **UNTRAINED | {"weights": _plain(tmp / "m.pt", model), "num_classes": None}),
}


@pytest.mark.parametrize("make", _REFUSED.values(), ids=_REFUSED.keys())
def test_model_meta_refuses_what_torch_refuses_in_its_words(tmp_path, small_model, make) -> None:
    config = make(tmp_path, small_model)
    with pytest.raises(RunError) as expected:
        run_module._meta_with_torch(config)
    with pytest.raises(RunError) as refused:
        model_meta(config)
    assert str(refused.value) == str(expected.value)


def test_model_metadata_is_known_without_torch() -> None:
    """`ModelMeta`, which the up-to-date check validates checkpoints' metadata with, lives in a
    module that imports no torch (pipeline.models re-exports it)."""
    done = subprocess.run([sys.executable, "-c", "import sys, pipeline.model_meta, pipeline.run; "
                           "print(sorted(m for m in ('torch', 'torchvision', 'scipy') if m in sys.modules))"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
    from pipeline.model_meta import ModelMeta
    from pipeline.models import ModelMeta as Exported

    assert Exported is ModelMeta


# what a rerun with nothing to do must not import: each costs seconds
HEAVY_MODULES = ("torch", "torchvision", "scipy", "ray", "prefect", "pipeline.models")


# the weights of a nightly rerun: each gives its model's identity without torch
_RERUN_WEIGHTS = {
    "untrained": ["--model", "lraspp_mobilenet_v3_large", "--weights", "none", "--num-classes", "4"],
    "checkpoint": ["--weights", "{tmp}/m.pt"],
    "published": ["--model", "lraspp_mobilenet_v3_large", "--weights", "DEFAULT"],
}


@pytest.fixture(scope="module", params=_RERUN_WEIGHTS, ids=list(_RERUN_WEIGHTS))
def rerun_modules(request, tmp_path_factory, small_model) -> set[str]:
    """`segpipe segment` in a fresh process over a SOURCE whose one shard is committed in
    OUTPUT (committed here, without Ray, as a run would): the heavy modules it imported."""
    from flows.cli import build_parser, config_from_arguments
    from pipeline.outputs import prepare_output
    from pipeline.records import ImageRecord
    from pipeline.run import list_source, new_run_id, run_info
    from pipeline.storage import ListingCounts, open_location

    tmp = tmp_path_factory.mktemp("rerun")
    (tmp / "src").mkdir()
    for index in range(2):
        buffer = io.BytesIO()
        Image.fromarray(synthetic_scene(24, 32, index)[0]).save(buffer, format="JPEG")
        (tmp / "src" / f"{index}.jpg").write_bytes(buffer.getvalue())
    _checkpoint(tmp / "m.pt", small_model, class_names=("sky", "road", "car"))
    # published weights pass the preflight check when they are in torch.hub's cache: no download
    env = os.environ | {"RAY_ADDRESS": "local", "TORCH_HOME": str(tmp / "torch")}
    cache = Path(env["TORCH_HOME"], "hub", "checkpoints", PUBLISHED_WEIGHTS["lraspp_mobilenet_v3_large"].url.split("/")[-1])
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    argv = ["segment", str(tmp / "src"), str(tmp / "out"), "--no-crf",
            *(arg.format(tmp=tmp) for arg in _RERUN_WEIGHTS[request.param])]
    config = config_from_arguments(SegmentConfig, build_parser().parse_args(argv)).dated()
    source = open_location(config.source, config.storage_options)
    store = prepare_output(config, source)
    run = run_info(config, source.url, new_run_id(), model_meta(config))
    for shard in list_source(source, config.output, shard_by=config.shard_by, shard_size=config.shard_size,
                             counts=ListingCounts()).remaining():
        records = [ImageRecord(key=f.key, size=f.size, version=f.version) for f in shard.files]
        for record in records:
            record.fail("inference", "not segmented: this test commits the shard without a model")
        store.commit_shard(shard, records, run)

    code = (f"import json, sys; from flows.cli import main; code = main({argv!r}); "
            f"print(json.dumps([code, [m for m in {HEAVY_MODULES!r} if m in sys.modules]]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    *printed, last = done.stdout.splitlines() or [""]
    assert done.returncode == 0, done.stderr[-3000:]
    exit_code, imported = json.loads(last)
    assert exit_code == 0 and any("nothing to do" in line for line in printed), done.stdout
    return set(imported)


@pytest.mark.parametrize("module", HEAVY_MODULES)
def test_a_rerun_with_nothing_to_do_imports_no_heavy_module(rerun_modules, module) -> None:
    assert module not in rerun_modules
