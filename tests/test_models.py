"""Model registry, architectures and weight loading (torchvision enums, checkpoints by URL)."""

from __future__ import annotations

import os
import pickle
import urllib.error

import pytest
import torch
from torch import nn
from torchvision.models import get_model_weights
from torchvision.models import segmentation as tvseg

from pipeline.models import (
    ModelMeta,
    Preprocessing,
    WeightsUnavailableError,
    build_model,
    list_models,
    register_model,
    save_checkpoint,
)

REQUIRED = {
    "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large",
    "deeplabv3plus_resnet50", "deeplabv3plus_resnet101", "pspnet_resnet50", "pspnet_resnet101",
    "fcn_resnet50", "lraspp_mobilenet_v3_large", "unet_resnet34",
}


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to fetch weights: this machine has no internet, so a download is
    simulated by raising what urllib raises offline."""

    def refuse(url: str, *args, **kwargs):
        raise urllib.error.URLError(f"download attempted: {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_registry_lists_required_models() -> None:
    assert set(list_models()) >= REQUIRED
    assert list_models() == sorted(list_models())


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_model("pspnet_resnet50")(lambda **kw: nn.Identity())


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'pspnet'.*pspnet_resnet50"):
        build_model("pspnet", num_classes=3)


def test_num_classes_required_without_weights() -> None:
    with pytest.raises(ValueError, match="num_classes is required"):
        build_model("pspnet_resnet50")


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_every_model_returns_logits_at_input_resolution(name: str, no_downloads, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: nothing could be loaded from it
    model = build_model(name, num_classes=3, weights=None).eval()
    with torch.inference_mode():
        out = model(torch.randn(1, 3, 37, 45))  # neither dimension a multiple of 8
    assert set(out) == {"out"}
    assert out["out"].shape == (1, 3, 37, 45)
    assert torch.isfinite(out["out"]).all()
    assert model.meta.architecture == name and model.meta.num_classes == 3
    assert model.meta.weights == "none"


def test_pspnet_is_dilated_to_stride_8_with_pyramid_bins_and_aux_head() -> None:
    model = build_model("pspnet_resnet50", num_classes=4, aux_loss=True)
    assert [stage[0].output_size for stage in model.ppm.stages] == [1, 2, 3, 6]
    features = {}
    model.backbone.layer4.register_forward_hook(lambda m, i, o: features.setdefault("c5", o))
    model.train()
    out = model(torch.randn(2, 3, 64, 96))
    assert features["c5"].shape[-2:] == (8, 12)  # output stride 8
    assert out["aux"].shape == out["out"].shape == (2, 4, 64, 96)


def test_deeplabv3plus_fuses_stride4_features_reduced_to_48_channels() -> None:
    model = build_model("deeplabv3plus_resnet50", num_classes=4).eval()
    seen = {}
    model.low_level.register_forward_hook(lambda m, i, o: seen.setdefault("low", o))
    model.aspp.register_forward_hook(lambda m, i, o: seen.setdefault("aspp", o))
    model(torch.randn(1, 3, 64, 64))
    assert seen["low"].shape == (1, 48, 16, 16)  # stride 4
    assert seen["aspp"].shape[-2:] == (4, 4)  # output stride 16
    assert model.decoder[0][0].in_channels == 256 + 48


def test_unet_uses_a_resnet34_encoder() -> None:
    model = build_model("unet_resnet34", num_classes=2)
    assert [len(layer) for layer in model.encoder] == [3, 4, 6, 3]


def _fake_published_weights(tmp_path, monkeypatch) -> tuple[object, dict]:
    """Put a state dict where torch.hub caches torchvision's COCO/VOC weights, so the enum path
    runs for real without the internet."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    enum = get_model_weights("deeplabv3_mobilenet_v3_large")["COCO_WITH_VOC_LABELS_V1"]
    reference = tvseg.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / os.path.basename(enum.url))
    return enum, reference.state_dict()


def test_torchvision_enum_weights_load_with_their_metadata(tmp_path, monkeypatch, no_downloads) -> None:
    enum, state = _fake_published_weights(tmp_path, monkeypatch)
    model = build_model("deeplabv3_mobilenet_v3_large", weights="COCO_WITH_VOC_LABELS_V1")
    assert model.meta.class_names == tuple(enum.meta["categories"])
    assert model.meta.num_classes == 21
    assert model.meta.weights == "COCO_WITH_VOC_LABELS_V1"
    assert model.meta.preprocessing == Preprocessing(resize="short_side", size=(520,))
    assert model.aux_classifier is None  # dropped for inference
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    with pytest.raises(ValueError, match=r"num_classes=5 but weights .* have 21 classes; pass num_classes=21"):
        build_model("deeplabv3_mobilenet_v3_large", num_classes=5, weights="COCO_WITH_VOC_LABELS_V1")


def test_offline_download_failure_says_what_to_do(tmp_path, monkeypatch, no_downloads) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match=r"cannot download .*copy that file to .*--weights none"):
        build_model("deeplabv3_resnet50", weights="DEFAULT")


def test_unknown_weights_name_lists_the_published_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown weights 'IMAGENET'.*COCO_WITH_VOC_LABELS_V1"):
        build_model("deeplabv3_resnet50", weights="IMAGENET")


def _checkpoint_meta(num_classes: int = 3) -> ModelMeta:
    return ModelMeta(
        architecture="lraspp_mobilenet_v3_large", num_classes=num_classes,
        class_names=("road", "car", "tree")[:num_classes], palette=((1, 2, 3), (4, 5, 6), (7, 8, 9)),
        preprocessing=Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), resize="long_side", size=(256,)),
        extra={"val_miou": 0.5},
    )


@pytest.mark.parametrize("where", ["local", "s3"])
def test_checkpoint_round_trip_by_url(where: str, tmp_path, request) -> None:
    model = build_model("lraspp_mobilenet_v3_large", num_classes=3)
    if where == "s3":
        bucket, options = request.getfixturevalue("s3_bucket")
        url = f"{bucket}/models/lraspp.pt"
    else:
        url, options = str(tmp_path / "lraspp.pt"), None
    save_checkpoint(model, url, _checkpoint_meta(), storage_options=options)
    loaded = build_model("lraspp_mobilenet_v3_large", weights=url, storage_options=options)
    assert loaded.meta.class_names == ("road", "car", "tree")
    assert loaded.meta.preprocessing.resize == "long_side"
    assert loaded.meta.extra == {"val_miou": 0.5}
    assert loaded.meta.weights == url
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in loaded.state_dict().items())


def test_checkpoint_mismatches_fail_with_the_fix(tmp_path) -> None:
    url = str(tmp_path / "m.pt")
    save_checkpoint(build_model("lraspp_mobilenet_v3_large", num_classes=3), url, _checkpoint_meta())
    with pytest.raises(ValueError, match="holds a 'lraspp_mobilenet_v3_large' model, not 'fcn_resnet50'"):
        build_model("fcn_resnet50", weights=url)
    with pytest.raises(ValueError, match=r"num_classes=7 but weights .* have 3 classes; pass num_classes=3"):
        build_model("lraspp_mobilenet_v3_large", num_classes=7, weights=url)
    with pytest.raises(WeightsUnavailableError, match="cannot read checkpoint"):
        build_model("lraspp_mobilenet_v3_large", weights=str(tmp_path / "missing.pt"))


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_carrying_code_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "segpipe-checkpoint/1", "meta": {}, "state_dict": _Payload()}, f)
    with pytest.raises(ValueError, match="refused to load"):
        build_model("lraspp_mobilenet_v3_large", weights=str(path))


def test_meta_rejects_inconsistent_fields() -> None:
    with pytest.raises(ValueError, match="class_names has 2 entries but num_classes=3"):
        ModelMeta(architecture="x", num_classes=3, class_names=("a", "b"), palette=((0, 0, 0),) * 3)
    with pytest.raises(ValueError, match="needs 1 positive size"):
        Preprocessing(resize="short_side")
