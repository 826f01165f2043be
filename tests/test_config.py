"""One configuration per job: every field of each config can be set from the command line and
reaches its flow (called in-process, or through the JSON Prefect stores for a deployment)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from flows.cli import build_parser, config_from_arguments, option_name
from flows.deployments import build_deployments
from flows.evaluate import evaluate_predictions
from flows.segment import segment_archive
from flows.train import train_model
from pipeline.config import (
    MODEL_NAMES,
    EvaluateConfig,
    RasterSettings,
    SegmentConfig,
    StorageOptions,
    TrainConfig,
)
from pipeline.models import list_models, register_model

# a valid value other than the default for every field; a field added without one fails below
SAMPLES: dict[type, dict[str, Any]] = {
    SegmentConfig: {
        "source": "s3://cams/{date}", "output": "s3://out/date={date}", "model": "pspnet_resnet50",
        "weights": "COCO_WITH_VOC_LABELS_V1", "num_classes": 21, "class_names": ("road", "car", "sky"), "crf": False, "precision": "fp32", "compile": True, "tile": 512,
        "tile_stride": 384, "bands": (4, 3, 2), "block": 1024, "confidence": True, "polygons": True,
        "min_polygon_area": 200.0, "simplify": 0.5, "redo_errors": True, "batch_size": 4, "shard_by": "count", "shard_size": 50,
        "ray_address": "auto", "storage_options": {"endpoint_url": "http://127.0.0.1:9000"}, "device": "cpu",
        "actors": 2, "gpus_per_actor": 0.5, "cpus_per_actor": 2.0, "threads_per_actor": 3, "max_pixels": 1000, "max_raster_pixels": 10**9,
        "jpeg_decode": "cpu", "batch_io": "tasks", "image_timeout_s": 30.0, "startup_timeout_s": 60.0, "batch_attempts": 5,
        "max_restarts": 1, "no_replica_timeout_s": 120.0, "batches_in_flight_per_actor": 4, "date": "2026-11-20",
    },
    EvaluateConfig: {
        "predictions": "s3://out/masks", "ground_truth": "s3://gt", "output": "report", "num_classes": 3,
        "ignore_index": 11, "class_names": ("road", "car", "sky"), "label_map": {7: 0, 8: 1},
        "reduce_zero_label": True, "prediction_suffix": "_pred", "ground_truth_suffix": "_L",
        "storage_options": {"region_name": "eu-west-1"}, "ray_address": "auto", "date": "2026-11-20",
    },
    TrainConfig: {
        "images": "s3://train/images", "labels": "s3://train/labels", "output": "s3://ckpt/model.pt",
        "model": "pspnet_resnet50", "num_classes": 3, "class_names": ("road", "car", "sky"),
        "palette": ((1, 2, 3), (4, 5, 6), (7, 8, 9)), "epochs": 3, "batch_size": 4, "crop": (64, 96),
        "scale": (0.75, 1.5), "ignore_index": 11, "init": "imagenet", "optimizer": "adamw", "lr": 0.001,
        "weight_decay": 0.05, "aux_weight": 0.2, "label_suffix": "_L", "label_map": {255: 1}, "bands": (4, 3, 2),
        "val_images": "s3://val/images",
        "val_labels": "s3://val/labels", "val_last": 2, "workers": 2, "device": "cpu", "cpus_per_worker": 2.0,
        "resume": "s3://ckpt/old.pt", "overwrite": True, "seed": 7, "storage_options": {"anon": True}, "ray_address": "auto",
    },
}
COMMANDS = {SegmentConfig: "segment", EvaluateConfig: "evaluate", TrainConfig: "train"}
FLOWS = {SegmentConfig: segment_archive, EvaluateConfig: evaluate_predictions, TrainConfig: train_model}
# fields that are only valid together with others
NEEDS = {(SegmentConfig, "tile_stride"): ("tile",), (SegmentConfig, "min_polygon_area"): ("polygons",),
         (SegmentConfig, "simplify"): ("polygons",), (TrainConfig, "val_images"): ("val_labels",),
         (TrainConfig, "val_labels"): ("val_images",)}


def _words(name: str, value: Any) -> list[str]:
    """The command-line words that set one field, as a user types them."""
    if isinstance(value, bool):
        return [option_name(name) if value else "--no-" + name.replace("_", "-")]
    if isinstance(value, dict) or (isinstance(value, tuple) and value and isinstance(value[0], tuple)):
        return [option_name(name), json.dumps(value)]
    if isinstance(value, tuple):
        return [option_name(name), *map(str, value)]
    return [option_name(name), str(value)]


def _required(config: type) -> dict[str, Any]:
    return {n: SAMPLES[config][n] for n, f in config.model_fields.items() if f.is_required()}


def _argv(config: type, name: str, value: Any) -> list[str]:
    required = _required(config)
    argv = [COMMANDS[config], *(str(required[n]) for n in config.positional)]
    for other, other_value in required.items():
        if other not in config.positional and other != name:
            argv += _words(other, other_value)
    for other in NEEDS.get((config, name), ()):
        argv += _words(other, SAMPLES[config][other])
    return argv + ([] if name in config.positional else _words(name, value))


CASES = [(config, name) for config in SAMPLES for name in config.model_fields]


@pytest.mark.parametrize("config", list(SAMPLES), ids=lambda c: c.__name__)
def test_every_field_has_a_sample(config: type) -> None:
    assert set(SAMPLES[config]) == set(config.model_fields)


@pytest.mark.parametrize(("config", "name"), CASES, ids=[f"{c.__name__}.{n}" for c, n in CASES])
def test_the_cli_accepts_every_field_and_the_flow_receives_it(config: type, name: str) -> None:
    value = SAMPLES[config][name]
    assert value != config.model_fields[name].get_default(call_default_factory=True) or config.model_fields[name].is_required()
    args = build_parser().parse_args(_argv(config, name, value))
    parsed = config_from_arguments(config, args)
    assert getattr(parsed, name) == value
    # a deployment's run: Prefect validates the JSON it stored into the flow's config parameter
    stored = json.loads(json.dumps({"config": parsed.model_dump(mode="json")}))
    received = FLOWS[config].validate_parameters(stored)["config"]
    assert isinstance(received, config) and getattr(received, name) == value
    # an in-process call (the command line's) hands the object itself to the flow
    assert FLOWS[config].validate_parameters({"config": parsed})["config"] is parsed


@pytest.mark.parametrize("name", [n for n in SegmentConfig.model_fields if n != "date"])
def test_serve_passes_every_segment_field_to_the_nightly_deployment(name: str) -> None:
    value = SAMPLES[SegmentConfig][name]
    argv = ["serve", "--source", "s3://cams/{date}", "--output", "s3://out/date={date}"]
    for other in (*NEEDS.get((SegmentConfig, name), ()), name):
        if other not in SegmentConfig.positional:
            argv += _words(other, SAMPLES[SegmentConfig][other])
    args = build_parser().parse_args(argv)
    nightly, _ = build_deployments(config_from_arguments(SegmentConfig, args))
    received = segment_archive.validate_parameters(json.loads(json.dumps(nightly.parameters)))["config"]
    expected = value if name not in SegmentConfig.positional else SAMPLES[SegmentConfig][name]
    assert getattr(received, name) == expected


def test_credentials_are_hidden_from_reprs_and_stored_parameters_but_reach_the_code() -> None:
    config = SegmentConfig(source="s3://a", output="s3://b", storage_options={"key": "AKIA-X", "secret": "s3cr3t",
                                                                               "endpoint_url": "http://e"})
    stored = json.dumps(config.model_dump(mode="json"))
    for text in (repr(config), str(config), stored):
        assert "s3cr3t" not in text and "AKIA-X" not in text
    assert "http://e" in stored  # an endpoint is no secret, and a deployment needs it
    assert config.storage_options["secret"] == "s3cr3t" and isinstance(config.storage_options, StorageOptions)


def test_serve_refuses_credentials_prefect_would_store() -> None:
    config = SegmentConfig(source="s3://a", output="s3://b", storage_options={"secret": "s3cr3t"})
    with pytest.raises(ValueError, match="--storage-secret") as caught:
        build_deployments(config)
    assert "s3cr3t" not in str(caught.value)


def test_a_dated_source_needs_a_dated_output_and_a_real_date() -> None:
    config = SegmentConfig(source="s3://cams/{date}/", output="s3://out/date={date}", date="2026-11-20").dated()
    assert (config.source, config.output) == ("s3://cams/2026-11-20/", "s3://out/date=2026-11-20")
    with pytest.raises(ValueError, match="put \\{date\\} in OUTPUT too"):
        SegmentConfig(source="s3://cams/{date}/", output="s3://out/")
    # ISO's basic format, which Python's fromisoformat takes, would name another folder
    for wrong in ("20/11/2026", "20261120", "2026-11-20T00:00"):
        with pytest.raises(ValueError, match="YYYY-MM-DD"):
            SegmentConfig(source="s3://cams/{date}", output="s3://o/{date}", date=wrong)
    with pytest.raises(ValueError, match="2026-13-45 is no day of the calendar"):  # the format, but no day
        SegmentConfig(source="s3://cams/{date}", output="s3://o/{date}", date="2026-13-45")


def test_polygon_settings_without_polygons_are_refused_however_the_config_is_made() -> None:
    """--simplify and --min-polygon-area shape the polygons --polygons writes, and nothing else:
    the config refuses them without it, so a program that builds one and runs it
    (pipeline.runtime.driver.run_segmentation, no preflight) is refused as the command line is."""
    for name, option in (("simplify", "--simplify"), ("min_polygon_area", "--min-polygon-area")):
        with pytest.raises(ValidationError, match=rf"{option} applies to polygons; add --polygons \(or leave it out\)"):
            SegmentConfig(source="s3://a", output="s3://b", **{name: 1.5})
        with pytest.raises(ValueError, match=rf"{option} applies to polygons"):  # a RasterStage's own settings
            RasterSettings(**{name: 1.5})
    # by value: the defaults, which a deployment's parameters give, pass as if left out; and a
    # config survives its own dump, its JSON, and a deployment's stored parameters
    plain = SegmentConfig(source="s3://a", output="s3://b", polygons=False, simplify=0.0, min_polygon_area=0.0)
    polygons = SegmentConfig(source="s3://a", output="s3://b", polygons=True, simplify=0.5, min_polygon_area=20.0)
    for config in (plain, polygons):
        assert SegmentConfig.model_validate(config.model_dump()) == config
        assert SegmentConfig.model_validate_json(config.model_dump_json()) == config
        nightly, _ = build_deployments(config)
        assert segment_archive.validate_parameters(json.loads(json.dumps(nightly.parameters)))["config"] == config


def test_the_model_names_configs_accept_are_the_registry_s() -> None:
    """Configs check model names against a list kept beside them (importing the registry
    imports torch): it must be the registry's own."""
    assert list(MODEL_NAMES) == list_models()


def test_a_model_a_program_registers_is_accepted_and_a_misspelled_one_is_named(monkeypatch) -> None:
    from pipeline.models import _registry

    monkeypatch.setattr(_registry, "_REGISTRY", dict(_registry._REGISTRY))  # registered for this test only
    register_model("my_segmenter")(lambda *, num_classes: None)
    assert SegmentConfig(source="s", output="o", model="my_segmenter").model == "my_segmenter"
    with pytest.raises(ValueError, match=r"unknown model 'deeplabv3_resnet10' \(did you mean deeplabv3_resnet101\?\)"):
        TrainConfig(images="i", labels="l", output="m.pt", model="deeplabv3_resnet10", num_classes=2)


@pytest.mark.parametrize("job", [
    lambda names: SegmentConfig(source="s", output="o", weights="none", num_classes=3, class_names=names),
    lambda names: EvaluateConfig(predictions="p", ground_truth="g", output="o", num_classes=3, class_names=names),
    lambda names: TrainConfig(images="i", labels="l", output="o.pt", model="lraspp_mobilenet_v3_large", num_classes=3,
                              class_names=names),
], ids=["segment", "evaluate", "train"])
def test_no_class_is_named_twice(job) -> None:
    """Columns and rows are named by class (evaluate's iou_<name>): one would hide the other."""
    assert job(("road", "tree", "car")).class_names == ("road", "tree", "car")
    with pytest.raises(ValidationError, match="names road more than once"):
        job(("road", "road", "car"))
