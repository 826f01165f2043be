"""Fine-tuning: the pieces without Ray, then Ray Train on a real local Ray (2 CPUs), the
`segpipe train` command (the Prefect flow on its ephemeral server), and the checkpoint run by
`segpipe segment --weights` with no other flag. Tiny generated scenes; CamVid when present."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import rasterio
import torch
from conftest import stop_with_signal
from PIL import Image
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin

from pipeline.config import TrainConfig
from pipeline.masks import decode_mask, encode_mask
from pipeline.models import build_model, load_checkpoint, load_training_state, save_checkpoint
from pipeline.samples import _COLOURS, SAMPLE_CLASSES, synthetic_scene
from pipeline.storage import open_location
from pipeline.training import (
    Sample,
    augment,
    build_training_model,
    improves,
    load_matching,
    load_samples,
    make_optimizer,
    pair_training_data,
    read_label,
    resume_schedule,
    worker_share,
)

PALETTE = [[0, 0, 255], [255, 128, 0], [64, 64, 64], [255, 0, 0]]


def _scenes(root: Path, count: int, height: int = 64, width: int = 80) -> tuple[str, str]:
    (root / "images" / "day1").mkdir(parents=True)
    (root / "labels" / "day1").mkdir(parents=True)
    for i in range(count):
        image, labels = synthetic_scene(height, width, i)
        Image.fromarray(image).save(root / "images" / "day1" / f"{i:02d}.jpg", quality=95)
        (root / "labels" / "day1" / f"{i:02d}_L.png").write_bytes(encode_mask(labels))
    return str(root / "images"), str(root / "labels")


def _config(tmp_path, **overrides) -> TrainConfig:
    images, labels = _scenes(tmp_path / "data", 10)
    fields = dict(images=images, labels=labels, output=str(tmp_path / "model.pt"), model="lraspp_mobilenet_v3_large",
                  num_classes=4, class_names=SAMPLE_CLASSES, epochs=2, batch_size=4, crop=(48, 48), label_suffix="_L",
                  val_last=2, optimizer="sgd", lr=0.02)
    return TrainConfig(**(fields | overrides))


def test_augment_keeps_pixels_and_labels_aligned():
    image, labels = synthetic_scene(60, 90, 3)
    sample = Sample("a", image, labels.astype(np.int64))
    rng = np.random.default_rng(0)
    for _ in range(20):
        pixels, target = augment(sample, crop=(64, 64), scale=(0.5, 2.0), ignore_index=255, rng=rng)
        assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8 and target.shape == (64, 64)
        assert (pixels[:, target == 255] == 0).all()  # padding: black pixels, ignored labels
        for class_id, colour in _COLOURS.items():  # each labelled pixel keeps its class's colour
            inside = target == class_id
            if inside.sum() > 50:
                mean = pixels[:, inside].float().mean(1).numpy()
                assert np.abs(mean - np.array(colour)).max() < 40, (class_id, mean)


def test_init_from_a_checkpoint_with_other_classes_keeps_the_backbone(tmp_path):
    donor = build_model("lraspp_mobilenet_v3_large", num_classes=7, weights=None)
    save_checkpoint(donor, str(tmp_path / "donor.pt"), donor.meta)
    config = _config(tmp_path, init=str(tmp_path / "donor.pt"))
    model, meta, skipped = build_training_model(config)
    assert skipped and all(name.startswith("classifier.") for name in skipped)  # the 7-class head
    backbone = "backbone.0.0.weight"
    assert torch.equal(model.state_dict()[backbone], donor.state_dict()[backbone])
    assert meta.class_names == SAMPLE_CLASSES and meta.num_classes == 4
    target = build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None)
    assert load_matching(target, {"classifier.low_classifier.weight": torch.zeros(9, 40, 1, 1)}) != []


def test_a_checkpoint_carries_the_bands_it_was_trained_on(tmp_path):
    """So that segment reads the same bands of a raster without being told (`RasterStage`)."""
    config = _config(tmp_path, bands=(4, 3, 2))
    model, meta, _ = build_training_model(config)
    save_checkpoint(model, str(tmp_path / "nrg.pt"), meta)
    assert load_checkpoint(str(tmp_path / "nrg.pt"))[0].preprocessing.bands == (4, 3, 2)
    assert build_training_model(config.model_copy(update={"bands": None}))[1].preprocessing.bands is None


def test_a_wrong_label_range_is_one_clear_error_before_training(tmp_path):
    from pipeline.runtime.training import run_training

    config = _config(tmp_path, num_classes=3, class_names=None)  # the scenes hold labels 0-3
    # one value just above the classes: most likely "unlabelled" (CamVid's 11), so the ignore index comes first
    with pytest.raises(ValueError, match=r"day1/\d\d_L.png holds the label 3, outside the 3 classes: pass --ignore-index 3 "
                                         r"if it marks unlabelled pixels \(void\), or --num-classes 4 if it is a class"):
        run_training(config)
    assert not os.path.exists(config.output)  # refused before any training
    # with an ignore index of the user's own, theirs is the unlabelled value: the label is a class
    with pytest.raises(ValueError, match=r"day1/\d\d_L.png holds the label 3, outside the 3 classes and not "
                                         r"--ignore-index 9: pass --num-classes 4 if it is a class$"):
        run_training(config.model_copy(update={"ignore_index": 9}))
    with pytest.raises(ValueError, match=r"holds labels \[2, 3\] outside \[0, 2\) that are not ignore_index=255"):
        run_training(config.model_copy(update={"num_classes": 2}))


def test_a_label_file_that_is_no_mask_is_refused_naming_it_before_training(tmp_path):
    """An empty upload, an RGB picture of the labels, and a 32-bit mask whose nodata would
    have wrapped onto class 0: each refused naming its file, before any worker starts."""
    from pipeline.runtime.training import run_training

    config = _config(tmp_path)
    label = Path(config.labels) / "day1" / "03_L.png"
    label.write_bytes(b"")
    with pytest.raises(ValueError, match=r"day1/03_L.png is no label mask: ValueError: the file is empty \(0 bytes\)"):
        run_training(config)
    Image.new("RGB", (80, 64), (255, 128, 0)).save(label)
    with pytest.raises(ValueError, match=r"day1/03_L.png is no label mask: ValueError: a mask must be a "
                                         r"single-channel image, got mode 'RGB'"):
        run_training(config)
    labels = np.zeros((64, 80), np.int32)
    labels[:8] = -2147483648  # a GIS tool's nodata for Int32
    Image.fromarray(labels).save(label.with_suffix(".tif"))
    label.unlink()
    with pytest.raises(ValueError, match=r"day1/03_L.tif holds labels \[-2147483648\] outside \[0, 4\)"):
        run_training(config)
    assert not os.path.exists(config.output)


def test_a_georeferenced_training_tile_is_read_as_segment_reads_it(tmp_path):
    """A uint16 tile whose bands are B, G, R, NIR (so tagged) and half without data: trained
    on as its red, green and blue, stretched by limits its nodata takes no part in, its pixels
    without data labelled ignore_index. Decoded whole, it was B, G, R, stretched from 0."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    rows, cols = np.mgrid[0:64, 0:80]
    red, green, blue = 1000 + 40 * cols, 1000 + 40 * rows, 3000 + (rows * cols) % 7
    pixels = np.stack([blue, green, red, 5000 + 0 * rows]).astype(np.uint16)
    pixels[:, :, :40] = 0  # no data in the left half
    with rasterio.open(tmp_path / "images" / "a.tif", "w", driver="GTiff", width=80, height=64, count=4,
                       dtype="uint16", crs="EPSG:32633", transform=from_origin(500000, 5000000, 0.5, 0.5),
                       nodata=0) as dst:
        dst.write(pixels)
        dst.colorinterp = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    (tmp_path / "labels" / "a.png").write_bytes(encode_mask((cols >= 60).astype(np.uint8)))
    images, labels = open_location(str(tmp_path / "images")), open_location(str(tmp_path / "labels"))
    pairs = pair_training_data(images, labels).pairs
    [sample] = load_samples(images, labels, pairs, num_classes=2, ignore_index=255)
    valid = cols >= 40
    assert (sample.label[~valid] == 255).all() and (sample.label[valid] == (cols >= 60)[valid]).all()
    assert (sample.image[~valid] == 0).all()
    red_seen = sample.image[..., 0][valid].astype(float)
    assert np.corrcoef(red_seen, cols[valid])[0, 1] > 0.99 and np.corrcoef(sample.image[..., 1][valid], rows[valid])[0, 1] > 0.99
    # the 2nd and 98th percentiles of the data alone: about 2% of it at each end
    assert 0.01 < (red_seen == 0).mean() < 0.06 and 0.01 < (red_seen == 255).mean() < 0.06
    # --bands, as segment's: the near infrared (constant) as grey
    [nir] = load_samples(images, labels, pairs, num_classes=2, ignore_index=255, bands=(4,))
    assert len(np.unique(nir.image[valid])) == 1


def test_footprint_masks_train_on_their_buildings_with_a_label_map(shared_data, tmp_path):
    """SpaceNet's 0/255 footprints: 255 is the ignore index, so without --label-map there is
    no building to learn; with '{"255": 1}' there is, pixel for pixel."""
    folder = shared_data / "aerial" / "geotiff"
    if not (folder / "sample_fp_mask.tif").is_file():
        pytest.skip(f"SpaceNet sample not found in {folder}")
    for side, name in (("images", "sample_geotiff.tif"), ("labels", "sample_fp_mask.tif")):
        (tmp_path / side).mkdir()
        (tmp_path / side / "tile.tif").write_bytes((folder / name).read_bytes())
    images, labels = open_location(str(tmp_path / "images")), open_location(str(tmp_path / "labels"))
    pairs = pair_training_data(images, labels).pairs
    footprints = np.asarray(Image.open(folder / "sample_fp_mask.tif")) == 255
    [plain] = load_samples(images, labels, pairs, num_classes=2, ignore_index=255)
    assert not (plain.label == 1).any()
    [mapped] = load_samples(images, labels, pairs, num_classes=2, ignore_index=255, label_map={255: 1})
    assert (mapped.label == footprints).all() and footprints.any()
    assert mapped.image.shape == (900, 900, 3)  # the grey band, as segment shows it
    # said before training (and under the table `train` prints), with the option that fixes it
    from pipeline.runtime.training import check_labels

    config = TrainConfig(images=images.url, labels=labels.url, output=str(tmp_path / "m.pt"), num_classes=2,
                         model="lraspp_mobilenet_v3_large", class_names=("background", "building"))
    share = footprints.mean()
    assert check_labels(labels.url, pairs, config) == [
        f"1 class is in none of the 1 training mask under {labels.url}, so the model cannot learn it: 1 (building); "
        f"the ignore index 255 covers {share:.0%} of their pixels: if it marks that class, pass --label-map "
        """'{"255": 1}'"""]
    assert check_labels(labels.url, pairs, config.model_copy(update={"label_map": {255: 1}})) == []
    # a class that is the ignore index is not one to learn
    ignoring = config.model_copy(update={"label_map": {255: 1}, "num_classes": 3, "ignore_index": 2, "class_names": None})
    assert check_labels(labels.url, pairs, ignoring) == []


def test_a_resumed_run_keeps_its_label_map_and_bands(tmp_path):
    """As saved in a checkpoint (JSON: the map's keys strings), and named as typed; others
    given again stay, and are said beside what the checkpoint was trained with."""
    config = _config(tmp_path)
    trained = {"label_map": {"255": 1}, "bands": [4, 3, 2], "lr": 0.02, "val_last": 2}
    resumed, taken, overridden = config.resumed_with(trained)
    assert (resumed.label_map, resumed.bands) == ({255: 1}, (4, 3, 2))
    assert taken == ["--bands 4 3 2", """--label-map '{"255": 1}'"""] and overridden == []  # lr and val_last as given
    resumed, taken, overridden = config.model_copy(update={"bands": (1, 2, 3), "lr": 0.001}).resumed_with(trained)
    assert (resumed.bands, resumed.lr, resumed.label_map) == ((1, 2, 3), 0.001, {255: 1})
    assert taken == ["""--label-map '{"255": 1}'"""]
    assert overridden == ["--lr 0.001 (trained with 0.02)", "--bands 1 2 3 (trained with 4 3 2)"]
    # a validation set given again replaces the checkpoint's, whichever kind it was, and is said
    resumed, _, overridden = config.model_copy(update={"val_last": 0, "val_images": config.images,
                                                       "val_labels": config.labels}).resumed_with(trained)
    assert (resumed.val_last, resumed.val_images) == (0, config.images)
    assert overridden == ["--val-last 0 (trained with 2)"]


def test_training_resumes_after_the_epoch_of_its_checkpoint(ray_cpu, tmp_path):
    from pipeline.runtime.training import run_training

    config = _config(tmp_path, epochs=2, palette=((200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9)))
    first = run_training(config)
    assert [e["epoch"] for e in first.epochs] == [1, 2] and first.workers == 1 and first.device == "cpu"
    assert first.last_checkpoint == str(tmp_path / "model.last.pt") == config.last_checkpoint
    state = load_training_state(config.output)
    best_epoch = state["epoch"]
    scores = [e["val_miou"] for e in first.epochs]
    assert best_epoch == 1 + scores.index(max(scores))  # the best epoch's, the first of equals
    last = load_training_state(config.last_checkpoint)  # every epoch's, naming its run's best beside it
    assert (last["epoch"], last["best_checkpoint"], last["best_epoch"]) == (2, "model.pt", best_epoch)
    assert last["best"] == max(scores) and last["best_digest"] == load_checkpoint(config.output)[0].weights_digest
    best_bytes = Path(config.output).read_bytes()

    # from the best epoch: the epochs after it are trained again
    resumed = run_training(config.model_copy(update={"epochs": 3, "resume": config.output,
                                                     "output": str(tmp_path / "resumed.pt")}))
    assert [e["epoch"] for e in resumed.epochs] == list(range(best_epoch + 1, 4))
    # the resumed run's checkpoint carries the history of both runs
    assert load_training_state(str(tmp_path / "resumed.pt"))["history"][:best_epoch] == first.epochs[:best_epoch]

    # from the last epoch into another OUTPUT: epochs 3 and 4, and the best so far comes along;
    # the classes' names and colours, not given again, with it
    onward = run_training(config.model_copy(update={"epochs": 4, "resume": config.last_checkpoint,
                                                    "output": str(tmp_path / "onward.pt"), "class_names": None}))
    assert [e["epoch"] for e in onward.epochs] == [3, 4]
    first_meta, onward_meta = load_checkpoint(config.last_checkpoint)[0], load_checkpoint(onward.last_checkpoint)[0]
    assert onward_meta.class_names == first_meta.class_names == SAMPLE_CLASSES
    assert tuple(map(tuple, onward_meta.palette)) == tuple(map(tuple, first_meta.palette)) == config.palette
    assert load_training_state(onward.last_checkpoint)["history"][:2] == first.epochs
    # the learning rate decays over the 4 epochs now asked for (8 pairs, batches of 4: 2 steps
    # an epoch), not over the first run's 2, which ended at 0: the weights move again
    assert onward.epochs[0]["lr"] == pytest.approx(0.02 * (1 - 6 / 8) ** 0.9)
    _, trained = load_checkpoint(onward.last_checkpoint)
    _, before = load_checkpoint(config.last_checkpoint)
    assert not torch.equal(trained["classifier.high_classifier.weight"], before["classifier.high_classifier.weight"])
    # OUTPUT holds the best of all four epochs: the first run's, copied, unless 3 or 4 beat it
    chosen = None
    for epoch in [*first.epochs, *onward.epochs]:
        if improves(epoch["val_miou"], chosen["val_miou"] if chosen else None):
            chosen = epoch
    assert load_training_state(str(tmp_path / "onward.pt"))["epoch"] == chosen["epoch"] == onward.best_epoch
    assert ((tmp_path / "onward.pt").read_bytes() == best_bytes) == (chosen["epoch"] == best_epoch)

    with pytest.raises(ValueError, match="already trained"):
        run_training(config.model_copy(update={"epochs": 2, "resume": config.last_checkpoint}))
    plain = tmp_path / "plain.pt"
    model = build_model("lraspp_mobilenet_v3_large", num_classes=4, weights=None)
    save_checkpoint(model, str(plain), model.meta)
    with pytest.raises(ValueError, match="holds no training state"):
        run_training(config.model_copy(update={"resume": str(plain)}))


@pytest.mark.parametrize(("per_epoch", "lr"), [(2, 0.02), (3, 0.05)])  # as trained; a bigger set and a new --lr
def test_a_resumed_schedule_is_the_one_of_this_runs_settings_from_the_start(per_epoch: int, lr: float):
    """Two epochs of 2 steps trained (the schedule at 0 after them), resumed to 4 epochs of
    `per_epoch` steps: the learning rates are those of 4 such epochs at this --lr from the start."""
    weights = torch.nn.Linear(2, 2)

    def schedule(total: int, rate: float):
        return make_optimizer(weights, _config_fields("m.pt").model_copy(update={"lr": rate}), total)

    first, first_schedule = schedule(4, 0.02)
    for _ in range(4):
        first.step()
        first_schedule.step()
    assert first_schedule.get_last_lr() == [0.0]
    resumed, resumed_schedule = schedule(4 * per_epoch, lr)
    resume_schedule(resumed, resumed_schedule, first.state_dict(), first_schedule.state_dict(), steps_done=2 * per_epoch)
    whole, whole_schedule = schedule(4 * per_epoch, lr)
    rates = []
    for _ in range(4 * per_epoch):
        whole.step()
        whole_schedule.step()
        rates.append(whole_schedule.get_last_lr()[0])
    assert resumed_schedule.get_last_lr()[0] == pytest.approx(rates[2 * per_epoch - 1])
    for expected in rates[2 * per_epoch:]:
        resumed.step()
        resumed_schedule.step()
        assert resumed_schedule.get_last_lr()[0] == pytest.approx(expected)


@pytest.mark.parametrize("count", [11, 12])
def test_every_worker_trains_on_as_many_pairs(count: int):
    pairs = list(range(count))
    shares = [worker_share(pairs, rank, 3) for rank in range(3)]
    assert {len(share) for share in shares} == {-(-count // 3)}  # one step count for all: no worker waits forever
    assert set().union(*shares) == set(pairs)


def test_more_workers_than_pairs_to_share_is_refused_before_training(ray_cpu, tmp_path):
    """3 pairs for 3 workers give each worker 1, a batch too small to take a step: every epoch
    would pass without training."""
    from pipeline.runtime.training import run_training

    config = _config(tmp_path, val_last=7, workers=3)  # 10 scenes: 3 to train on
    with pytest.raises(ValueError, match=r"^3 training pairs for 3 workers: each would train on 1, and a step takes 2 "
                                         r"\(batch norm\); pass --workers 2 or fewer$"):
        run_training(config)
    assert not os.path.exists(config.output)


def test_an_epoch_is_the_best_only_if_it_scores_higher():
    assert improves(0.1, None) and improves(None, None)  # the first epoch is the best so far, scored or not
    assert improves(0.5, 0.4) and not improves(0.4, 0.4) and not improves(0.3, 0.4)  # a tie keeps the earlier
    assert not improves(None, 0.4)


def test_a_last_epochs_checkpoint_names_its_best_beside_it():
    config = _config_fields("s3://b/runs/model.pt").model_copy(update={"resume": "s3://b/moved/model.last.pt"})
    assert config.resumed_best({"epoch": 4, "best_checkpoint": "model.pt", "best_epoch": 3}) == ("s3://b/moved/model.pt", 3)
    assert config.resumed_best({"epoch": 4}) is None  # a best epoch's checkpoint is its own best


def test_the_placement_group_cleaner_quieted_on_a_local_ray_is_where_ray_train_keeps_it():
    """The hook names a private module of Ray Train's: an upgrade that moves it would bring its
    warnings back unseen (the command's test sees them only when it runs long enough)."""
    from pipeline.runtime.cluster import PLACEMENT_GROUP_CLEANER

    assert importlib.util.find_spec(PLACEMENT_GROUP_CLEANER) is not None
    assert importlib.import_module(PLACEMENT_GROUP_CLEANER).logger.name == PLACEMENT_GROUP_CLEANER


def test_the_last_epochs_checkpoint_sits_beside_output():
    names = {"model.pt": "model.last.pt", "/m/model.pt": "/m/model.last.pt", "s3://b/runs/a.b.pt": "s3://b/runs/a.b.last.pt",
             "s3://b/model": "s3://b/model.last", "/m/.hidden": "/m/.hidden.last"}
    for output, last in names.items():
        assert _config_fields(output).last_checkpoint == last


def _config_fields(output: str) -> TrainConfig:
    return TrainConfig(images="i", labels="l", output=output, model="lraspp_mobilenet_v3_large", num_classes=2)


def _segpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})}, cwd=Path(__file__).parent.parent)


@pytest.mark.slow
@pytest.mark.parametrize("stop, group", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGTERM-to-its-group", "SIGINT-to-its-group"])
def test_training_stopped_by_a_signal_says_so_in_one_line_and_resumes(tmp_path, stop, group):
    """Once an epoch's checkpoint is written: one line and exit 128 + the signal, as `segment`
    says it. Ray Train's own SIGINT handler left a Ctrl-C unanswered, or ended the command with
    exit 1 and no word; SIGTERM to the process group (systemd's stop) aborted it (exit 134)
    after a C++ stack dump from Ray's crash handler. The last epoch's checkpoint goes on."""
    images, labels = _scenes(tmp_path / "data", 8)
    output = tmp_path / "model.pt"
    command = [sys.executable, "-m", "flows.cli", "train", images, labels, str(output), "--model",
               "lraspp_mobilenet_v3_large", "--num-classes", "4", "--epochs", "200", "--batch-size", "4",
               "--crop", "48", "48", "--label-suffix", "_L"]
    last = tmp_path / "model.last.pt"
    err = stop_with_signal(command, last.exists, stop, group=group, cwd=Path(__file__).parent.parent)
    assert "SIGTERM received" not in err, err  # Ray's crash handler's dump
    assert err.rstrip().splitlines()[-1] == (
        f"segpipe: stopped by {stop.name}: the finished epochs' checkpoints are kept; --resume the last one "
        "(OUTPUT's name with .last before its extension) to go on")
    trained = load_checkpoint(str(last))[0].extra["epoch"]
    assert 1 <= trained < 200
    if not group:
        # a signal between an improving epoch's two writes leaves OUTPUT that next epoch, which
        # the resume goes on from (`resume_point`), saying so
        went_on = max(trained, load_checkpoint(str(output))[0].extra["epoch"])
        more = _segpipe("train", images, labels, str(output), "--model", "lraspp_mobilenet_v3_large", "--num-classes",
                        "4", "--epochs", str(went_on + 1), "--resume", str(last))
        assert more.returncode == 0, more.stderr[-3000:]
        assert load_checkpoint(str(last))[0].extra["epoch"] == went_on + 1
        assert (f"its run went on to epoch {went_on} (its best, in {output})" in more.stdout) == (went_on > trained), more.stdout


@pytest.mark.slow
def test_train_command_learns_and_segment_runs_its_checkpoint_alone(tmp_path):
    images, labels = _scenes(tmp_path / "data", 14)
    Image.fromarray(synthetic_scene(64, 80, 14)[0]).save(Path(images) / "day1" / "unlabelled.jpg")
    checkpoint = tmp_path / "models" / "scenes.pt"
    done = _segpipe(
        "train", images, labels, str(checkpoint), "--model", "deeplabv3_mobilenet_v3_large", "--num-classes", "4",
        "--class-names", *SAMPLE_CLASSES, "--palette", json.dumps(PALETTE), "--epochs", "20", "--batch-size", "3",
        "--crop", "48", "48", "--label-suffix", "_L", "--val-last", "2", "--lr", "0.02", "--workers", "2",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in (line.split() for line in done.stdout.splitlines()) if len(r) == 5 and r[0].isdigit()]
    losses, train_miou = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
    assert len(rows) == 20
    assert np.mean(losses[-3:]) < 0.7 * losses[0]  # the loss falls
    # 4 classes: a model that has learnt nothing scores about 0.12 (road everywhere) or 0.1
    # (uniformly random); learning takes it well above both
    assert max(train_miou[-3:]) > 0.33 and max(train_miou[-3:]) > train_miou[0] + 0.1, train_miou
    assert "12 training images and 2 validation images, 2 cpu workers" in done.stdout
    assert f"1 image under {images} without a label mask was left out, e.g. day1/unlabelled.jpg" in done.stdout
    # each epoch said once (Ray Train's patched print() said it twice), without Ray Train's own progress
    said = [line for line in done.stdout.splitlines() if "segpipe train: epoch " in line]
    assert [line.split("segpipe train: epoch ")[1].split()[0] for line in said] == [f"{e}/20" for e in range(1, 21)]
    # the scores as the table prints them, to 4 places (0.044 against 0.0440 in a trial)
    assert [line.split(" train mIoU ")[1].split()[0] for line in said] == [r[2] for r in rows]
    assert [line.split(" val mIoU ")[1].split()[0] for line in said] == [r[3] for r in rows]
    assert "Requesting resources" not in done.stdout + done.stderr
    assert "PreemptionWatcher" not in done.stdout + done.stderr  # a local Ray has nothing to preempt
    # nor a State API for Ray Train's placement group cleaner to ask, which warned every few seconds
    assert "PlacementGroupCleaner" not in done.stdout + done.stderr, [line for line in (done.stdout + done.stderr).splitlines() if "PlacementGroupCleaner" in line]
    last = checkpoint.with_name("scenes.last.pt")
    assert f"last epoch: {last} (--resume {last} with more --epochs goes on after it)" in done.stdout
    assert load_training_state(str(last))["epoch"] == 20

    meta, state = load_checkpoint(str(checkpoint))
    assert meta.architecture == "deeplabv3_mobilenet_v3_large" and meta.class_names == SAMPLE_CLASSES
    assert [list(c) for c in meta.palette[:4]] == PALETTE and meta.model_kwargs == {"aux_loss": True}
    assert meta.extra["training"]["epochs"] == 20 and meta.extra["training"]["crop"] == [48, 48]
    assert meta.extra["epoch"] in range(1, 21) and meta.extra["val_miou"] is not None
    assert any(k.startswith("aux_classifier.") for k in state)  # trained with the auxiliary loss
    rebuilt = build_model(None, weights=str(checkpoint))  # the checkpoint alone says what it is
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in state.items() if not k.startswith("aux_classifier."))

    segmented = _segpipe("segment", images, str(tmp_path / "out"), "--weights", str(checkpoint), "--no-crf",
                         "--precision", "fp32")
    assert segmented.returncode == 0, segmented.stderr[-3000:]
    assert "15 images, 15 segmented and 0 errors," in segmented.stdout
    assert "model deeplabv3_mobilenet_v3_large" in segmented.stdout
    names = {r[0] for r in duckdb.sql(
        f"select distinct class_name from read_parquet('{tmp_path}/out/class_stats/**/*.parquet')").fetchall()}
    assert len(names) >= 2 and names <= set(SAMPLE_CLASSES)  # in eval mode too: no collapse to one class
    mask = Image.open(tmp_path / "out" / "masks" / "day1" / "00.png")
    assert mask.getpalette()[:12] == [v for colour in PALETTE for v in colour]
    assert decode_mask((tmp_path / "out" / "masks" / "day1" / "00.png").read_bytes()).max() < 4

    # resumed for one more epoch with only what must be given: the recipe, the pairing and the
    # validation set go on from the checkpoint (the default crop, 512, would have been larger
    # than these 64 x 80 scenes, and no validation set is refused)
    more = _segpipe("train", images, labels, str(checkpoint), "--model", "deeplabv3_mobilenet_v3_large",
                    "--num-classes", "4", "--epochs", "21", "--resume", str(last), "--workers", "2", "--seed", "1")
    assert more.returncode == 0, more.stderr[-3000:]
    assert (f"resumed with the settings {last} was trained with: --batch-size 3, --crop 48 48, --lr 0.02, "
            "--label-suffix _L, --val-last 2") in more.stdout
    assert f"resumed with settings other than {last} was trained with: --seed 1 (trained with 0)" in more.stdout
    trained = load_checkpoint(str(last))[0].extra["training"]
    assert (trained["epochs"], trained["crop"], trained["batch_size"], trained["val_last"]) == (21, [48, 48], 3, 2)
    assert "12 training images and 2 validation images" in more.stdout


@pytest.mark.slow
def test_camvid_frames_train_with_the_last_20_held_out(ray_cpu, tmp_path, shared_data):
    from pipeline.runtime.training import run_training

    camvid = shared_data / "camvid" / "val"
    config = TrainConfig(images=str(camvid / "images"), labels=str(camvid / "labels"), output=str(tmp_path / "camvid.pt"),
                         model="lraspp_mobilenet_v3_large", num_classes=11, ignore_index=11, epochs=1, batch_size=8,
                         crop=(128, 128), scale=(0.25, 0.5), val_last=20)
    summary = run_training(config)
    assert (summary.train_images, summary.val_images) == (81, 20)
    assert summary.epochs[0]["val_miou"] is not None and 0 <= summary.epochs[0]["val_miou"] <= 1
    assert load_checkpoint(config.output)[0].extra["training"]["ignore_index"] == 11


def _epochs_in_process(device: torch.device, tmp_path, epochs: int) -> list[float]:
    """Training mIoU per epoch without Ray: the same functions the Ray Train workers call."""
    from pipeline.preprocess import Normalizer
    from pipeline.storage import open_location
    from pipeline.training import (
        load_samples,
        make_optimizer,
        miou,
        pair_training_data,
        train_epoch,
    )

    config = _config(tmp_path, epochs=epochs, batch_size=3)
    images, labels = open_location(config.images), open_location(config.labels)
    samples = load_samples(images, labels, pair_training_data(images, labels, label_suffix="_L").pairs, num_classes=4,
                           ignore_index=255)
    torch.manual_seed(0)
    model, meta, _ = build_training_model(config)
    model = model.to(device)
    optimizer, schedule = make_optimizer(model, config, total_steps=epochs * 3)
    normalize, rng = Normalizer(meta.preprocessing, device), np.random.default_rng(0)
    return [miou(train_epoch(model, samples, config, optimizer, schedule, normalize, rng).confusion) for _ in range(epochs)]


def test_training_functions_learn_without_ray(tmp_path):
    scores = _epochs_in_process(torch.device("cpu"), tmp_path, 12)
    assert max(scores[-3:]) > scores[0] + 0.1, scores


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_learns_on_cuda_with_bf16_autocast(tmp_path):
    scores = _epochs_in_process(torch.device("cuda"), tmp_path, 12)
    assert max(scores[-3:]) > scores[0] + 0.1, scores


def test_two_files_under_one_key_are_refused_naming_both(tmp_path):
    from pipeline.storage import open_location
    from pipeline.training import pair_training_data

    images, labels = _scenes(tmp_path / "data", 2)
    Image.fromarray(synthetic_scene(64, 80, 0)[0]).save(Path(images) / "day1" / "00.png")
    with pytest.raises(ValueError, match=r"day1/00.jpg and .*day1/00.png pair under the same key"):
        pair_training_data(open_location(images), open_location(labels), label_suffix="_L")


def test_pairs_that_cannot_be_made_are_said_in_the_options_words(tmp_path):
    """No pair (a --label-suffix that the masks do not have), or a --val-last that leaves no
    pair to train on: each named as the command line spells it, not as a Python field."""
    from pipeline.config import TrainConfig
    from pipeline.runtime.training import split_pairs
    from pipeline.storage import open_location
    from pipeline.training import pair_training_data

    images, labels = _scenes(tmp_path / "data", 2)
    # a suffix that ends no label's name (mistyped: its case), refused even where whole names would pair
    with pytest.raises(ValueError, match=r"^--label-suffix _l matches none of the 2 label masks, e\.g\. day1/00_L\.png: "
                                         r"give the suffix the labels' names end with, or leave it out$") as refused:
        pair_training_data(open_location(images), open_location(labels), label_suffix="_l")
    assert "label_suffix" not in str(refused.value)
    # none given, where the labels' names carry one: the suffix they carry is named
    with pytest.raises(ValueError, match=r"\(2 images, 2 PNG masks\); the labels' names end with _L after an image's: "
                                         r"pass --label-suffix _L$"):
        pair_training_data(open_location(images), open_location(labels))
    with pytest.raises(ValueError, match=r"; the labels' names end with _L after an image's: pass --label-suffix _L, "
                                         r"not L$"):
        pair_training_data(open_location(images), open_location(labels), label_suffix="L")
    config = TrainConfig(images=images, labels=labels, output=str(tmp_path / "m.pt"), model="lraspp_mobilenet_v3_large",
                         num_classes=4, label_suffix="_L", val_last=2)
    with pytest.raises(ValueError, match=r"^--val-last 2 leaves nothing to train on \(2 pairs\)$"):
        split_pairs(config)
    train, val, left_out = split_pairs(config.model_copy(update={"val_last": 1}))
    assert ([len(train), len(val)], left_out) == ([1, 1], [])
    # files that pair with nothing are trained around, and said, a line for each folder
    Image.fromarray(synthetic_scene(64, 80, 9)[0]).save(Path(images) / "day1" / "unlabelled.jpg")
    (Path(labels) / "day1" / "orphan_L.png").write_bytes(encode_mask(np.zeros((64, 80), np.uint8)))
    train, val, left_out = split_pairs(config.model_copy(update={"val_last": 1}))
    assert [len(train), len(val)] == [1, 1]
    assert left_out == [f"1 image under {images} without a label mask was left out, e.g. day1/unlabelled.jpg",
                        f"1 label mask under {labels} without an image was left out, e.g. day1/orphan_L.png"]


def test_validation_miou_is_what_segment_and_evaluate_measure(tmp_path):
    """The validation mIoU a training run reports is measured on the path `segpipe segment
    --no-crf` runs (a replica's Segmenter and stages, masks written as PNG, read from the
    checkpoint) and scored as `segpipe evaluate` scores those masks. Without Ray: the functions
    a Ray Train worker calls, in its order."""
    from pipeline.evaluation import ScoreSettings, pair_masks, score_pairs
    from pipeline.inference import Segmenter
    from pipeline.io_stages import read_and_decode, write_masks
    from pipeline.metrics import scores
    from pipeline.preprocess import Normalizer
    from pipeline.stages import SegmentStage
    from pipeline.storage import iter_files, open_location
    from pipeline.training import (
        load_samples,
        make_optimizer,
        miou,
        pair_training_data,
        precise_batch_norm,
        train_epoch,
        validate,
    )

    config = _config(tmp_path, epochs=1, batch_size=3, val_last=4)
    images, labels = open_location(config.images), open_location(config.labels)
    pairs = pair_training_data(images, labels, label_suffix="_L").pairs
    train, val = pairs[:-4], pairs[-4:]
    load = dict(num_classes=4, ignore_index=255)
    train_samples, val_samples = load_samples(images, labels, train, **load), load_samples(images, labels, val, **load)
    device = torch.device("cpu")
    model, meta, _ = build_training_model(config)
    optimizer, schedule = make_optimizer(model, config, total_steps=config.epochs * 2)
    normalize, rng = Normalizer(meta.preprocessing, device), np.random.default_rng(0)
    for _ in range(config.epochs):
        train_epoch(model, train_samples, config, optimizer, schedule, normalize, rng)
        precise_batch_norm(model, train_samples, config, normalize, rng)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        confusion = validate(model, val_samples, config, device)
        assert model.training  # validation leaves the model training, its weights as they were
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    reported = miou(confusion)
    assert reported is not None
    save_checkpoint(model, config.output, meta)

    segmenter = Segmenter(build_model(None, weights=config.output), device="cpu", precision="fp32")  # as a replica builds it
    stage = SegmentStage(segmenter, crf=False)
    output = open_location(str(tmp_path / "out"))
    val_files = [f for _, f in iter_files(images) if f.key in {p.image for p in val}]
    records = write_masks(output, stage(read_and_decode(images, val_files)), meta.palette)
    assert [r.ok for r in records] == [True] * 4
    masks = open_location(str(tmp_path / "out" / "masks"))
    pairing = pair_masks(masks, labels, ground_truth_suffix="_L")
    total = score_pairs(masks, labels, pairing.pairs, ScoreSettings(num_classes=4))
    assert len(total.image_ids) == 4 and not total.excluded
    assert abs(scores(total.confusion)["miou"] - reported) < 1e-3
    # the same pixels, labelled the same way
    np.testing.assert_array_equal(total.confusion, confusion.numpy())


def test_a_label_geotiff_is_read_as_evaluate_reads_ground_truth(tmp_path):
    """Its nodata value is ignore_index unless it is a class id (after --label-map), its float
    values class ids when whole: train refused a label raster with nodata 200 ("holds the label
    200") and any float32 one, which evaluate scored."""
    labels = np.tile(np.array([0, 1, 2, 200], np.uint8), (4, 1))

    def label(name: str, values: np.ndarray, **profile) -> np.ndarray:
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=4, height=4, count=len(values),
                           dtype=values.dtype, crs="EPSG:32632", transform=from_origin(0, 4, 1, 1), **profile) as dst:
            dst.write(values)
        return read_label(open_location(str(tmp_path)), name, num_classes=3, ignore_index=255)[0]

    assert (label("nodata.tif", labels[None], nodata=200)[:, 3] == 255).all()
    assert (label("mapped.tif", labels[None], nodata=200)[:, :3] == labels[:, :3]).all()
    kept, valid = read_label(open_location(str(tmp_path)), "mapped.tif", {200: 2}, num_classes=3, ignore_index=255)
    assert (kept[:, 3] == 2).all() and valid is None  # a nodata value the map makes a class: that class
    floats = label("float.tif", np.where(labels == 200, np.nan, labels).astype(np.float32)[None], nodata=float("nan"))
    assert floats.dtype == np.int64 and (floats[:, :3] == labels[:, :3]).all() and (floats[:, 3] == 255).all()
    # its nodata pixels are not the ignore index's own: no advice to map 255 to the class none holds
    from pipeline.runtime.training import check_labels
    from pipeline.training import TrainingPair

    config = TrainConfig(images=str(tmp_path), labels=str(tmp_path), output=str(tmp_path / "m.pt"),
                         model="lraspp_mobilenet_v3_large", num_classes=4)
    [said] = check_labels(str(tmp_path), [TrainingPair("n", "n.tif", "nodata.tif")], config)
    assert said.endswith("so the model cannot learn it: 3 (class_3)"), said
    with pytest.raises(ValueError, match=r"three.tif is no label mask: ValueError: it has 3 bands; a mask of class ids "
                                         "has one"):
        label("three.tif", np.stack([labels] * 3))
    with pytest.raises(ValueError, match=r"half.tif is no label mask: ValueError: label half.tif holds 0.5, which is "
                                         "no class id"):
        label("half.tif", (labels[None] / 2).astype(np.float32))
