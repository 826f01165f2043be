"""Hostile and unusual files: each becomes a correct result or an error row that names the file
and the reason, and the run goes on. Decode and segment stages first (no Ray), then one run
on S3 over all of them, names with spaces, unicode, '#', '?' and '%' included."""

from __future__ import annotations

import io
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pytest
import s3fs
import tifffile
import torch
from PIL import Image

from pipeline.config import SegmentConfig
from pipeline.decode import DeviceJpeg, decode, decode_image, plain_jpeg_shape
from pipeline.inference import Segmenter
from pipeline.io_stages import read_and_decode
from pipeline.masks import decode_mask
from pipeline.models import build_model
from pipeline.records import ImageRecord
from pipeline.runtime.driver import run_segmentation
from pipeline.stages import SegmentStage
from pipeline.storage import SourceFile, open_location

RGB = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb() -> bytes:
    """A 100-byte PNG whose header claims 100000 x 100000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 10)) + _png_chunk(b"IEND", b"")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    return _encode(Image.fromarray(RGB), "JPEG", exif=exif.tobytes())


def _frames(fmt: str) -> bytes:
    first, second = Image.fromarray(RGB), Image.fromarray(255 - RGB)
    return _encode(first, fmt, save_all=True, append_images=[second])


JPEG = _encode(Image.fromarray(RGB), "JPEG")
# a header that reads well and a body that stops short: only decoding finds out
LARGER_JPEG = _encode(Image.fromarray(np.random.default_rng(2).integers(0, 255, (120, 160, 3), dtype=np.uint8)), "JPEG")
PNG = _encode(Image.fromarray(RGB), "PNG")

# name -> (bytes, expected (height, width) of the result, or the error reason)
CASES = {
    "zero-byte.jpg": (b"", "empty"),
    "truncated.jpg": (JPEG[: len(JPEG) // 2], "corrupt"),
    "truncated-body.jpg": (LARGER_JPEG[: len(LARGER_JPEG) * 3 // 4], "corrupt"),
    "truncated-png.png": (PNG[: len(PNG) // 2], "corrupt"),
    "random.jpg": (np.random.default_rng(1).bytes(2048), "not_an_image"),
    "page.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", "not_an_image"),
    "grey.png": (_encode(Image.fromarray(RGB[..., 0]), "PNG"), (20, 30)),
    "rgba.png": (_encode(Image.fromarray(np.dstack([RGB, RGB[..., :1]])), "PNG"), (20, 30)),
    "palette.png": (_encode(Image.fromarray(RGB).convert("P"), "PNG"), (20, 30)),
    "cmyk.jpg": (_encode(Image.fromarray(RGB).convert("CMYK"), "JPEG"), (20, 30)),
    "sixteen.png": (_encode(Image.fromarray(RGB[..., 0].astype(np.uint16) * 257), "PNG"), (20, 30)),
    "float.tif": (_encode(Image.fromarray(RGB[..., 0].astype(np.float32) / 255), "TIFF"), (20, 30)),
    "exif-rotated.jpg": (_exif_rotated(), (30, 20)),  # segmented as displayed
    "one-pixel.png": (_encode(Image.fromarray(RGB[:1, :1]), "PNG"), (1, 1)),
    "bomb.png": (_bomb(), "too_large"),
    "pages.tif": (_frames("TIFF"), (20, 30)),  # first frame
    "animated-webp.webp": (_frames("WEBP"), (20, 30)),
    "animated.png": (_frames("PNG"), (20, 30)),
}


@pytest.fixture(scope="module")
def stage() -> SegmentStage:
    model = build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None)
    return SegmentStage(Segmenter(model, device="cpu", precision="fp32"), crf=True)


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_file_is_a_result_or_a_named_error(name, stage):
    data, expected = CASES[name]
    record = ImageRecord(name)
    try:
        record.image = decode_image(data)
        record.height, record.width = record.image.shape[:2]
    except ValueError as err:
        record.fail(err.reason, str(err))
    stage([record])
    if isinstance(expected, str):
        assert (record.ok, record.error_type) == (False, expected), record.error
        assert record.error
    else:
        assert record.ok, record.error
        assert (record.height, record.width) == expected
        assert int(record.stats.pixel_count.sum()) == expected[0] * expected[1]


@pytest.mark.parametrize("name", list(CASES))
def test_with_jpegs_decoded_on_the_model_device_each_file_ends_the_same(name, stage, tmp_path):
    """--jpeg-decode device: plain JPEGs reach the model's stage undecoded and are decoded there
    (on the CPU here, by the decode_jpeg call that uses nvjpeg on a GPU). Every file must end
    as it does when the decode tasks decode it, failures named the same."""
    data, expected = CASES[name]
    (tmp_path / "in.bin").write_bytes(data)
    [record] = read_and_decode(open_location(str(tmp_path)), [SourceFile("in.bin", len(data), "v")], jpeg_on_device=True)
    left_for_device = record.encoded is not None
    stage([record])
    if isinstance(expected, str):
        assert (record.ok, record.error_type) == (False, expected), record.error
    else:
        assert record.ok, record.error
        assert (record.height, record.width) == expected
        assert int(record.stats.pixel_count.sum()) == expected[0] * expected[1]
    # only headers that promise a plain JPEG go undecoded; a truncated body is found out there
    assert left_for_device == (name == "truncated-body.jpg")


def test_only_plain_jpegs_are_left_for_the_device():
    def jpeg(image: Image.Image, **kw) -> bytes:
        return _encode(image, "JPEG", **kw)

    assert plain_jpeg_shape(JPEG) == (20, 30)
    assert plain_jpeg_shape(jpeg(Image.fromarray(RGB[..., 0]))) == (20, 30)  # greyscale
    assert plain_jpeg_shape(JPEG, max_pixels=599) is None  # decode_image refuses it, with its reason
    assert plain_jpeg_shape(jpeg(Image.fromarray(RGB), progressive=True)) is None  # scan count unbounded
    assert plain_jpeg_shape(CASES["cmyk.jpg"][0]) is None
    assert plain_jpeg_shape(_exif_rotated()) is None
    assert plain_jpeg_shape(PNG) is None
    assert plain_jpeg_shape(b"\xff\xd8\xff" + b"\0" * 64) is None  # a JPEG marker and no header
    # the one decision: a plain JPEG stays encoded only when the model's device decodes JPEGs
    assert decode(JPEG, jpeg_on_device=True) == DeviceJpeg(JPEG, 20, 30)
    assert np.array_equal(decode(JPEG), decode_image(JPEG))
    assert isinstance(decode(PNG, jpeg_on_device=True), np.ndarray)


def test_jpegs_decoded_on_the_device_have_pillows_pixels(shared_data, stage):
    """On the CPU, torchvision and Pillow both use libjpeg-turbo: the pixels must be identical."""
    frames = sorted((shared_data / "camvid" / "val" / "images").glob("*.jpg"))[:3]
    records = [ImageRecord(p.name, encoded=p.read_bytes()) for p in frames]
    for record in records:
        record.height, record.width = plain_jpeg_shape(record.encoded)
    stage._decode_jpegs(records)
    for record, path in zip(records, frames, strict=True):
        assert record.encoded is None
        assert np.array_equal(record.image.permute(1, 2, 0).numpy(), decode_image(path.read_bytes()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decodes_on_the_gpu_close_to_pillow(shared_data):
    """nvjpeg's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two."""
    gpu_stage = SegmentStage(Segmenter(build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None), device="cuda"))
    frames = sorted((shared_data / "camvid" / "val" / "images").glob("*.jpg"))[:3]
    broken = ImageRecord("broken.jpg", encoded=LARGER_JPEG[: len(LARGER_JPEG) * 3 // 4], height=120, width=160)
    records = [ImageRecord(p.name, encoded=p.read_bytes(), height=360, width=480) for p in frames] + [broken]
    gpu_stage(records)
    assert (broken.ok, broken.error_type) == (False, "corrupt")
    for record in records[:-1]:
        assert record.ok and record.stats is not None, record.error
    decoded = [ImageRecord(p.name, encoded=p.read_bytes(), height=360, width=480) for p in frames]
    gpu_stage._decode_jpegs(decoded)
    for record, path in zip(decoded, frames, strict=True):
        assert record.image.device.type == "cuda"
        difference = np.abs(record.image.permute(1, 2, 0).cpu().numpy().astype(int) - decode_image(path.read_bytes()))
        assert difference.mean() < 1.5, difference.mean()


def test_multi_frame_files_give_their_first_frame():
    assert np.array_equal(decode_image(_frames("TIFF")), RGB)
    assert np.array_equal(decode_image(_frames("PNG")), RGB)


@pytest.mark.parametrize("jpeg_decode", ["cpu", "device"])
def test_a_run_over_hostile_files_and_names_accounts_for_every_input(ray_cpu, s3_bucket, jpeg_decode):
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    root = f"{bucket[5:]}/in"
    names = {f"bad/{name}": data for name, (data, _) in CASES.items()}
    odd = ["names/with space.jpg", "names/ünïcødé 街.jpg", "names/hash#1.jpg", "names/what?.jpg",
           "names/100%.jpg", "names/Case.jpg", "names/case.jpg"]
    names |= {key: JPEG for key in odd}
    fs.pipe({f"{root}/{key}": data for key, data in names.items()})
    config = SegmentConfig(precision="fp32", source=f"{bucket}/in", output=f"{bucket}/out", model="lraspp_mobilenet_v3_large",
                           weights=None, num_classes=4, storage_options=options, batch_size=4, jpeg_decode=jpeg_decode)
    summary = run_segmentation(config)
    expected_errors = {f"bad/{n}": e for n, (_, e) in CASES.items() if isinstance(e, str)}
    assert summary.images == len(names), summary
    assert summary.errors_by_type == dict(Counter(expected_errors.values()))
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(**options))
    rows = {r[0]: r[1:] for r in con.sql(
        f"select image_id, status, error_type, error, mask_uri, height, width from read_parquet('{bucket}/out/images/**/*.parquet')").fetchall()}
    assert set(rows) == set(names)  # every input exactly once (a dict would hide duplicates: count them)
    assert con.sql(f"select count(*) from read_parquet('{bucket}/out/images/**/*.parquet')").fetchall() == [(len(names),)]
    for key, error_type in expected_errors.items():
        assert rows[key][:2] == ("error", error_type) and rows[key][2]
    for key in odd:
        status, _, _, mask_uri, height, width = rows[key]
        assert status == "ok" and mask_uri == f"{bucket}/out/masks/{key[:-4]}.png"
        assert decode_mask(fs.cat_file(mask_uri)).shape == (height, width) == (20, 30)
    # keys differing only in case keep separate masks
    assert fs.exists(f"{bucket[5:]}/out/masks/names/Case.png") and fs.exists(f"{bucket[5:]}/out/masks/names/case.png")


def _slow_png() -> bytes:
    """140 KB that take about 1 s to decode here: a 12000 x 12000 plane of zeros, deflated.
    Small, within a raised pixel limit, and still expensive, as a hostile file can be."""
    return _encode(Image.new("L", (12000, 12000)), "PNG")


def test_a_decode_past_the_time_limit_becomes_a_timeout_row(tmp_path):
    (tmp_path / "slow.png").write_bytes(_slow_png())
    (tmp_path / "small.png").write_bytes(_encode(Image.fromarray(RGB), "PNG"))
    source = open_location(str(tmp_path))
    files = [SourceFile(key="slow.png", size=1, version=""), SourceFile(key="small.png", size=1, version="")]
    handler = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    slow, small = read_and_decode(source, files, max_pixels=10**9, time_limit_s=0.1)
    assert time.monotonic() - started < 0.6  # stopped at the limit, not after the full decode
    assert (slow.error_type, slow.image) == ("timeout", None) and "0.1 s limit" in slow.error
    assert small.ok and small.image.shape == (20, 30, 3)
    assert signal.getsignal(signal.SIGALRM) is handler and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    # without a limit the same file decodes: the limit, not the file, made the error
    assert read_and_decode(source, files[:1], max_pixels=10**9)[0].ok


def test_a_decode_deaf_to_the_limit_ends_its_process(tmp_path):
    """A decoder stuck inside one C call never sees the alarm. Here the alarm is switched off
    and the decode sleeps, which is the same to the watchdog: it must end the (disposable)
    worker process about 5 s after the limit."""
    (tmp_path / "a.png").write_bytes(_encode(Image.fromarray(RGB), "PNG"))
    script = f"""
import time
import pipeline.decode, pipeline.io_stages
pipeline.decode.signal.setitimer = lambda *args: (0.0, 0.0)
pipeline.decode.decode_image = lambda data, max_pixels: time.sleep(120)
from pipeline.storage import SourceFile, open_location
records = pipeline.io_stages.read_and_decode(open_location({str(tmp_path)!r}), [SourceFile("a.png", 1, "")],
                                             time_limit_s=0.1, hard_stop=True)
print("finished", records[0].error_type)
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=100,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 70, done.stdout + done.stderr
    assert "ignored its time limit" in done.stderr and "finished" not in done.stdout
    assert time.monotonic() - started < 60


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")  # writing it: plain is the point
def test_a_plain_tiff_whose_header_claims_too_many_pixels_is_refused_before_its_bytes_are_read(tmp_path, monkeypatch):
    """A TIFF without a CRS is decoded as an image, whole: its header, read by range to tell
    whether it is georeferenced, already says its size, so one over --max-pixels is not
    downloaded first (here 50 KB; an object can hold gigabytes)."""
    import rasterio

    import pipeline.io_stages as io_stages

    with rasterio.open(tmp_path / "plain.tif", "w", driver="GTiff", width=20_000, height=20_000, count=1, dtype="uint8",
                       tiled=True, compress="deflate", sparse_ok=True):
        pass  # no CRS, no transform, no tile written: a header and empty tiles
    read: list[str] = []
    monkeypatch.setattr(io_stages, "read_bytes", lambda location, key: read.append(key))  # None: as if gone
    source, files = open_location(str(tmp_path)), [SourceFile("plain.tif", 1, "v")]
    [record] = read_and_decode(source, files, max_pixels=10**6)
    assert (record.ok, record.error_type, record.georeferenced) == (False, "too_large", False), record.error
    assert record.error == "20000x20000 = 400000000 pixels exceeds max_pixels=1000000"  # as decode_image says it
    assert read == []
    # within the limit it is read and decoded as before (the stub's None: "missing")
    [record] = read_and_decode(source, files, max_pixels=20_000 * 20_000)
    assert (read, record.error_type) == (["plain.tif"], "missing")


def test_a_tiff_cut_inside_its_header_is_said_in_one_row_and_nothing_else(capfd, caplog, recwarn):
    """Its row said "cannot identify image file <_io.BytesIO object at 0x...>" (Pillow's buffer),
    and each worker printed tifffile's complaint about every tag and Pillow's warnings besides."""
    tiff = io.BytesIO()  # its header first, and a strip a row: the strips' offsets cut off
    tifffile.imwrite(tiff, np.zeros((225, 30, 3), np.uint8), rowsperstrip=1)
    with pytest.raises(ValueError) as refused:
        decode_image(tiff.getvalue()[:300])
    assert refused.value.reason == "corrupt"
    assert str(refused.value) == ("cannot decode TIFF (300 bytes): Pillow recognises no format in it; tifffile: "
                                  "missing data offset")
    out, err = capfd.readouterr()
    assert (out, err) == ("", "") and [str(w.message) for w in recwarn] == []
    assert [record.getMessage() for record in caplog.records] == []
