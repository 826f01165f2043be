"""Segmenter: preprocessing from metadata, batching by size, sliding windows, precision, and
the model given left as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.inference import (
    Segmenter,
    SlidingWindow,
    _pad_to_cells,
    blend_ramp,
    fold_batch_norms,
    native_bf16,
    softmax_classes,
)
from pipeline.models import ModelMeta, Preprocessing, build_model
from pipeline.windows import window_starts


class Pointwise(nn.Module):
    """A 1x1 convolution: each pixel's logits depend on that pixel alone, so sliding windows
    must reproduce the whole-image result exactly. Records every batch it sees (after the
    128 x 128 probe a Segmenter measures its output stride with, which `_segmenter` drops)."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.inputs.append(x.detach().clone())
        return {"out": self.conv(x) * 3}


def _segmenter(model: nn.Module, *args, **kwargs) -> Segmenter:
    """A Segmenter whose copy of a Pointwise model has recorded nothing yet."""
    segmenter = Segmenter(model, *args, **kwargs)
    assert [tuple(x.shape) for x in segmenter.model.model.inputs] == [(1, 3, 128, 128)]
    segmenter.model.model.inputs.clear()
    return segmenter


def _meta(num_classes: int = 4, **pre) -> ModelMeta:
    return ModelMeta.default("test", num_classes, preprocessing=Preprocessing(**pre))


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_probabilities_at_each_original_size_in_input_order() -> None:
    model = Pointwise()
    seg = _segmenter(model, _meta(), device="cpu", batch_size=2, precision="fp32")
    images = [_image(20, 30, 0), _image(17, 11, 1), _image(20, 30, 2), _image(20, 30, 3)]
    probs = seg.predict(images)
    assert [tuple(p.shape) for p in probs] == [(4, 20, 30), (4, 17, 11), (4, 20, 30), (4, 20, 30)]
    for p in probs:
        torch.testing.assert_close(p.sum(0), torch.ones(p.shape[1:]))
    # batched by size (2 + 1 windows of 20x30, one of 17x11), never mixing sizes in a batch
    # (the segmenter runs its own copy of the model, with batch norms folded)
    assert sorted(tuple(x.shape) for x in seg.model.model.inputs) == [(1, 3, 17, 11), (1, 3, 20, 30), (2, 3, 20, 30)]
    alone = seg.predict([images[2]])[0]
    torch.testing.assert_close(alone, probs[2])
    numpy_input = seg.predict([images[1].permute(1, 2, 0).numpy()])[0]
    torch.testing.assert_close(numpy_input, probs[1])


def test_normalisation_and_resize_policy_come_from_the_metadata() -> None:
    model = Pointwise()
    meta = _meta(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), resize="short_side", size=(10,))
    image = _image(20, 30)
    segmenter = _segmenter(model, meta, device="cpu", precision="fp32")
    probs = segmenter.predict([image])[0]
    seen = segmenter.model.model.inputs[0]
    assert seen.shape == (1, 3, 10, 15)  # short side 20 -> 10, aspect kept
    resized = F.interpolate(image[None].float(), size=(10, 15), mode="bilinear", align_corners=False, antialias=True)
    expected = (resized / 255 - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen, expected, atol=1e-5, rtol=1e-5)
    assert probs.shape == (4, 20, 30)  # back at the original size


def test_window_starts_snap_the_last_window_inward() -> None:
    assert window_starts(100, 32, 20) == [0, 20, 40, 60, 68]
    assert window_starts(64, 32, 32) == [0, 32]
    assert window_starts(30, 32, 20) == [0]


def test_blend_weights_fade_toward_edges_but_stay_positive() -> None:
    w = blend_ramp(9, torch.device("cpu"))[:, None] * blend_ramp(13, torch.device("cpu"))[None, :]
    assert (w > 0).all()
    assert w.argmax() == 4 * 13 + 6  # the centre
    assert w[0, 0] < w[2, 2] < w[4, 6]


class _Kept:
    """A WindowStore that keeps every window in memory, counting what it is asked for."""

    def __init__(self) -> None:
        self.logits: dict[tuple[int, int], torch.Tensor] = {}
        self.reused = 0

    def take(self, origin):
        found = self.logits.get(origin)
        self.reused += found is not None
        return found

    def keep(self, origin, logits):
        self.logits[origin] = logits


def test_region_logits_of_a_part_and_from_kept_windows_are_those_of_the_whole_region() -> None:
    image = _image(100, 130)
    segmenter = _segmenter(Pointwise(), _meta(), device="cpu",
                           sliding_window=SlidingWindow(crop=(32, 32), stride=(24, 24), batch_size=3), precision="fp32")
    store = _Kept()
    whole = segmenter.region_logits(image, origin=(48, 72), cell=1, windows=store)
    runs = len(segmenter.model.model.inputs)
    part = segmenter.region_logits(image, origin=(48, 72), cell=1, windows=store, part=((10, 70), (33, 101)))
    assert torch.equal(part.pixels((10, 70), (33, 101)), whole.pixels((10, 70), (33, 101)))
    assert part.values.shape[-2:] == (62, 70)  # the part's cells and one more on each side
    assert len(segmenter.model.model.inputs) == runs and store.reused == len(store.logits) > 1  # no window ran twice
    assert set(store.logits) == {(48 + y, 72 + x) for y in window_starts(100, 32, 24) for x in window_starts(130, 32, 24)}


def test_logits_blended_on_the_model_grid_give_any_part_exactly() -> None:
    """LR-ASPP's logits are at 1/8 of the input: windows are blended on that grid, padded at
    the image's end to whole cells, and a part of the image resized from only the cells it
    needs is exactly that part of the whole grid resized, at the grid's own edges too."""
    model = build_model("lraspp_mobilenet_v3_large", num_classes=3)
    segmenter = Segmenter(model, device="cpu", sliding_window=SlidingWindow(crop=(64, 64), stride=(48, 48), batch_size=4),
                          precision="fp32").at_native_resolution(SlidingWindow(crop=(64, 64), stride=(48, 48), batch_size=4))
    image = _image(150, 203)
    assert segmenter.grid_cell() == 8
    whole = segmenter.region_logits(image, origin=(0, 0), cell=8, windows=_Kept())
    assert whole.values.shape[-2:] == (19, 26) and whole.grid == (19, 26)  # 152 x 208 pixels padded
    for rows, cols in (((0, 150), (0, 203)), ((17, 90), (41, 203)), ((141, 150), (0, 9))):
        part = segmenter.region_logits(image, origin=(0, 0), cell=8, windows=_Kept(), part=(rows, cols))
        torch.testing.assert_close(part.pixels(rows, cols), whole.pixels(rows, cols), atol=1e-5, rtol=0)
    full = whole.pixels((0, 150), (0, 203))
    expected = F.interpolate(whole.values[None], size=(152, 208), mode="bilinear", align_corners=False)[0, :, :150, :203]
    torch.testing.assert_close(full, expected)
    # windows that are not whole cells are resized to pixels before they are blended
    assert segmenter.at_native_resolution(SlidingWindow(crop=(60, 60), stride=(48, 48))).grid_cell() == 1


def test_sliding_window_equals_whole_image_for_a_pointwise_model() -> None:
    model = Pointwise()
    image = _image(100, 77)
    whole = Segmenter(model, _meta(), device="cpu", precision="fp32").predict([image])[0]
    window = SlidingWindow(crop=(32, 32), stride=(20, 24), batch_size=3)
    sliding = _segmenter(model, _meta(), device="cpu", sliding_window=window, precision="fp32")
    assert sliding.grid_cell() == 1
    slid = sliding.predict([image])[0]
    torch.testing.assert_close(slid, whole, atol=1e-5, rtol=1e-5)
    # memory is bounded by the window batch: never more than 3 crops of 32x32 at once
    seen = sliding.model.model.inputs
    assert all(x.shape[0] <= 3 and x.shape[-2:] == (32, 32) for x in seen)
    assert sum(x.shape[0] for x in seen) == 5 * 3  # starts y 0,20,40,60,68; x 0,24,45


def test_one_window_covering_the_image_agrees_with_whole_image_inference() -> None:
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=5)
    images = [_image(48, 40, 0), _image(33, 47, 1)]
    whole = Segmenter(model, device="cpu", precision="fp32").predict(images)
    slid = Segmenter(model, device="cpu", sliding_window=SlidingWindow(crop=(48, 48), stride=(32, 32)), precision="fp32").predict(images)
    for a, b in zip(whole, slid, strict=True):
        torch.testing.assert_close(a, b)


def test_sliding_window_blends_a_real_model_without_seams(shared_data) -> None:
    """A LoveDA tile (1024x1024) with a real CNN in windows: valid probabilities everywhere,
    and close to whole-image inference (convolution padding makes windows differ slightly)."""
    path = next((shared_data / "aerial" / "loveda" / "images").iterdir())
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[:, :512, :400].contiguous()
    model = build_model("lraspp_mobilenet_v3_large", num_classes=3)
    whole = Segmenter(model, device="cpu", precision="fp32").predict([image])[0]
    slid = Segmenter(model, device="cpu", sliding_window=SlidingWindow((256, 256), (192, 192), 2), precision="fp32").predict([image])[0]
    assert slid.shape == (3, 512, 400)
    torch.testing.assert_close(slid.sum(0), torch.ones(512, 400))
    assert (slid.argmax(0) == whole.argmax(0)).float().mean() > 0.9


def test_bf16_channels_last_path_runs_on_cpu_and_matches_fp32() -> None:
    """The CUDA settings (bf16 autocast, channels_last) forced on CPU, so CI covers them."""
    model = build_model("fcn_resnet50", num_classes=3)
    images = [_image(40, 56)]
    fp32 = Segmenter(model, device="cpu", precision="fp32").predict(images)[0]
    fast = Segmenter(model, device="cpu", precision="bf16", channels_last=True, compile=False)
    assert fast.autocast_dtype == torch.bfloat16
    probs = fast.predict(images)[0]
    assert probs.dtype == torch.float32
    assert (probs - fp32).abs().max() < 0.05


def test_channels_last_is_the_default_layout_and_changes_no_result() -> None:
    """channels_last on CPU too (faster there, see pipeline.inference): the probabilities must be
    those of the NCHW model, and the class softmax of channels_last logits that of NCHW ones."""
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=5)
    images = [_image(40, 56), _image(33, 47)]
    default = Segmenter(model, device="cpu", precision="fp32")
    assert default.channels_last
    nchw = Segmenter(model, device="cpu", channels_last=False, precision="fp32")
    for got, expected in zip(default.predict(images), nchw.predict(images), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    for classes in (7, 21):  # both ways softmax_classes takes, below and from 16 classes
        logits = torch.randn(2, classes, 9, 11)
        cl = softmax_classes(logits.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(cl, torch.softmax(logits, dim=1))
        assert cl.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["deeplabv3_mobilenet_v3_large", "pspnet_resnet50", "lraspp_mobilenet_v3_large"])
def test_batch_norms_folded_into_convolutions_change_no_result(name) -> None:
    model = build_model(name, num_classes=5)
    with torch.no_grad():  # statistics unlike a fresh layer's (mean 0, variance 1), or folding would be trivial
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    model.eval()
    folded = fold_batch_norms(model)
    left = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert before and len(left) <= len(before) // 10, (len(left), len(before))
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        torch.testing.assert_close(folded(x)["out"], model(x)["out"], atol=1e-4, rtol=1e-3)


def test_segmenter_leaves_the_model_given_as_it_is() -> None:
    """Training validates through a Segmenter, then trains on: the model it was given keeps its
    mode, its batch norms, its layout and its weights."""
    model = build_model("lraspp_mobilenet_v3_large", num_classes=3).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    segmenter = Segmenter(model, device="cpu", precision="fp32")  # channels_last, batch norms folded
    segmenter.predict([_image(40, 56)])
    assert model.training and all(m.training for m in model.modules())
    assert not {id(m) for m in segmenter.model.modules()} & {id(m) for m in model.modules()}  # its own copy
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())  # not converted to channels_last


@pytest.mark.slow
def test_torch_compile_gives_the_same_probabilities() -> None:
    model = Pointwise()
    image = _image(16, 16)
    plain = Segmenter(model, _meta(), device="cpu", precision="fp32")
    eager = plain.predict([image])[0]
    segmenter = Segmenter(model, _meta(), device="cpu", compile=True, precision="fp32")
    compiled = segmenter.predict([image])[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    # the compilation is paid at each input shape's first call, and reported (the run summary's)
    assert plain.compile_seconds == 0.0 and segmenter.compile_seconds > 0
    first = segmenter.compile_seconds
    segmenter.predict([image])
    assert segmenter.compile_seconds == first
    segmenter.at_native_resolution(SlidingWindow((8, 8), (8, 8), 1)).predict([_image(16, 16, 1)])  # 8 x 8 windows
    assert segmenter.compile_seconds > first


def test_segmenter_defaults_and_validation() -> None:
    model = build_model("lraspp_mobilenet_v3_large", num_classes=2)
    seg = Segmenter(model, device="cpu", batch_size=4, precision="fp32")
    assert seg.num_classes == 2 and seg.batch_size == 4 and seg.autocast_dtype is None and not seg.compiled
    # auto: bf16 where the CPU has it natively, and then compiled (eager bf16 is slower than fp32)
    auto = Segmenter(model, device="cpu")
    assert (auto.autocast_dtype == torch.bfloat16) == auto.compiled == native_bf16(torch.device("cpu"))
    # and not compiled (--no-compile): float32, the faster eager arithmetic on CPU
    eager = Segmenter(model, device="cpu", compile=False)
    assert eager.autocast_dtype is None and not eager.compiled
    with pytest.raises(ValueError, match="precision"):
        Segmenter(model, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        seg.predict([np.zeros((4, 4), dtype=np.uint8)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=4)
    images = [_image(64, 80)]
    cpu = Segmenter(model, device="cpu", precision="fp32").predict(images)[0]
    gpu = Segmenter(model, device="cuda").predict(images)[0]
    assert gpu.device.type == "cuda"
    assert (gpu.cpu().argmax(0) == cpu.argmax(0)).float().mean() > 0.95


def test_a_compiled_model_sees_two_batch_sizes() -> None:
    """Any other batch size would make dynamo recompile with a dynamic batch dimension (slower
    kernels for every batch after it): a compiled model gets full batches, and the images or
    windows of a last, smaller one one at a time; a region's windows are gathered into full
    batches. Compilation itself is left out here: the segmenter is marked compiled, and its
    model records the shapes it gets."""
    segmenter = _segmenter(Pointwise(), _meta(), device="cpu", batch_size=4, precision="fp32",
                           sliding_window=SlidingWindow(crop=(32, 32), stride=(24, 24), batch_size=3))
    plain = Segmenter(Pointwise(), _meta(), device="cpu", batch_size=4, precision="fp32",
                      sliding_window=SlidingWindow(crop=(32, 32), stride=(24, 24), batch_size=3))
    plain.model.model.conv.load_state_dict(segmenter.model.model.conv.state_dict())
    segmenter.compiled = True
    images = [_image(20, 30, seed) for seed in range(7)]  # 4 + 3
    for got, expected in zip(segmenter.predict(images), plain.predict(images), strict=True):
        torch.testing.assert_close(got, expected)
    assert [x.shape[0] for x in segmenter.model.model.inputs] == [4, 1, 1, 1]
    segmenter.model.model.inputs.clear()
    store = _Kept()
    segmenter.region_logits(_image(100, 130), origin=(0, 0), cell=1, windows=store)  # 4 x 6 windows
    segmenter.region_logits(_image(100, 130), origin=(0, 0), cell=1, windows=store, part=((0, 10), (0, 10)))
    assert [x.shape[0] for x in segmenter.model.model.inputs] == [3] * 8  # 24 windows, each run once
    segmenter.model.model.inputs.clear()
    segmenter.region_logits(_image(100, 100), origin=(500, 0), cell=1, windows=_Kept())  # 4 x 4 windows
    assert [x.shape[0] for x in segmenter.model.model.inputs] == [3] * 5 + [1]


@pytest.mark.parametrize("size", [(5, 8), (8, 6), (7, 9), (8, 8)])
def test_images_are_padded_to_whole_cells_by_repeating_their_edge(size: tuple[int, int]) -> None:
    """Rows only, columns only, both or neither: as replicate padding, for uint8 too."""
    pixels = torch.randint(0, 256, (2, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = _pad_to_cells(pixels, 4)
    expected = F.pad(pixels.float(), (0, -size[1] % 4, 0, -size[0] % 4), mode="replicate").to(torch.uint8)
    assert padded.dtype == torch.uint8 and torch.equal(padded, expected)
