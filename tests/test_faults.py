"""Faults a user meets: a diverging run (NaN / inf loss) changes nothing, is counted, and stops with a clear
error; nothing non-finite is exported; a crash or kill -9 while saving never costs a complete checkpoint, and the
resumed run ends where an uninterrupted one does."""

import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_trainer import student_detector, tiny_args

from sparse_semi_detr_hf.training.trainer import DivergenceError, SemiSupervisedTrainer


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("synthetic"))


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    """Student and teacher state (parameters and buffers) by name."""
    state = {f"student.{k}": v.clone() for k, v in student_detector(trainer).state_dict().items()}
    state.update({f"teacher.{k}": v.clone() for k, v in trainer.teacher.model.state_dict().items()})
    return state


def _poison_steps(trainer, steps: set[int], value: float = math.nan) -> None:
    """Multiply the loss of the given (0-based) steps by ``value``."""
    original = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        loss, logs = original(*args, **kwargs)
        return (loss * value, logs) if trainer.state.step in steps else (loss, logs)

    trainer.compute_loss = compute_loss


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_nonfinite_step_changes_nothing_and_training_goes_on(tmp_path, synthetic_cache, value):
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "3", "--eval_steps", "100",
                     "--checkpointing_steps", "100", "--detection_picture_images", "0")
    trainer = SemiSupervisedTrainer(args)
    _poison_steps(trainer, {1}, value)
    labeled, unlabeled = (iter(loader) for loader in trainer._loaders())
    student_detector(trainer).train()
    trainer.optimizer_step([next(labeled)], [next(unlabeled)])  # step 0: a normal update
    before = _snapshot(trainer)
    logs = trainer.optimizer_step([next(labeled)], [next(unlabeled)])  # step 1: poisoned
    after = _snapshot(trainer)
    assert not math.isfinite(logs["grad_norm"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == []  # no parameter, no BatchNorm statistic, no EMA change
    assert trainer.state.step == 2 and trainer.state.skipped_steps == [2] and trainer.state.nonfinite_in_a_row == 1
    logs = trainer.optimizer_step([next(labeled)], [next(unlabeled)])  # step 2: normal again
    assert math.isfinite(logs["grad_norm"]) and trainer.state.nonfinite_in_a_row == 0
    assert any(not torch.equal(after[k], v) for k, v in _snapshot(trainer).items())


def test_a_diverging_run_stops_with_a_clear_error_and_saves_nothing_nonfinite(tmp_path, synthetic_cache):
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "20", "--eval_steps", "2",
                     "--checkpointing_steps", "2", "--max_nonfinite_steps", "3", "--detection_picture_images", "0")
    trainer = SemiSupervisedTrainer(args)
    _poison_steps(trainer, set(range(3, 20)))
    with pytest.raises(DivergenceError, match=r"3 steps in a row up to step 6.*--learning_rate"):
        trainer.train()
    assert trainer.state.skipped_steps == [4, 5, 6]
    for path in tmp_path.rglob("*.safetensors"):
        from safetensors.torch import load_file

        assert all(torch.isfinite(t).all() for t in load_file(path).values() if t.is_floating_point()), path


def test_export_refuses_nonfinite_weights(tmp_path, synthetic_cache):
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "1"))
    model = trainer.teacher.model
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = math.nan
    with pytest.raises(ValueError, match="refusing to export"):
        trainer.export(model, "broken", dict.fromkeys(["AP"], 0.0))
    assert not (tmp_path / "broken").exists()


def test_the_learning_rate_and_gradient_norm_are_logged(tmp_path, synthetic_cache):
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "1",
                                              "--max_grad_norm", "0", "--detection_picture_images", "0"))
    results = trainer.train()
    assert {"lr", "grad_norm"} <= set(results["last_logged"]) and results["last_logged"]["grad_norm"] > 0


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_crash_while_saving_keeps_the_previous_checkpoint_even_with_limit_one(tmp_path, synthetic_cache,
                                                                               monkeypatch):
    args = ("--max_steps", "2", "--eval_steps", "100", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
            "--detection_picture_images", "0")
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, *args))
    original = trainer.accelerator.save_state

    def dies_on_the_second_save(output_dir=None, **kwargs):
        if trainer.state.step == 2:
            os.makedirs(output_dir, exist_ok=True)
            open(os.path.join(output_dir, "optimizer.bin"), "wb").write(b"trunc")  # a half-written file
            raise KeyboardInterrupt("killed while writing")
        return original(output_dir=output_dir, **kwargs)

    monkeypatch.setattr(trainer.accelerator, "save_state", dies_on_the_second_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    names = sorted(os.listdir(tmp_path / "checkpoints"))
    assert names == [".tmp-checkpoint-2", "checkpoint-1"]  # the old one survives the limit of 1
    resumed = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, *args, "--resume_from_checkpoint", "latest"))
    results = resumed.train()
    assert results["steps"] == 2 and sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-2"]


def test_latest_skips_an_unmarked_checkpoint(tmp_path):
    from sparse_semi_detr_hf.training.checkpoints import MARKER, CheckpointFolder

    folder = CheckpointFolder(str(tmp_path), limit=2)
    for name, marked in (("checkpoint_3", False), ("checkpoint-4", True), ("checkpoint-10", True),
                         ("checkpoint-12", False), (".tmp-checkpoint-13", False)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if marked:
            (tmp_path / "checkpoints" / name / MARKER).write_text("{}")
    assert [os.path.basename(p) for p in folder.complete()] == ["checkpoint_3", "checkpoint-4", "checkpoint-10"]
    assert folder.latest().endswith("checkpoint-10")  # numeric order, the unmarked checkpoint-12 ignored
    folder.remove_partial()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-10", "checkpoint-4", "checkpoint_3"]


KILL_ARGS = ["--max_steps", "6", "--one_to_many_steps", "3", "--eval_steps", "100", "--checkpointing_steps", "1",
             "--checkpoints_total_limit", "1", "--detection_picture_images", "0", "--pseudo_label_threshold", "0.0"]


def _train(output, cache, *extra, wait=True):
    from test_train_script import SCRIPT, TINY

    command = [sys.executable, str(SCRIPT), *TINY, "--synthetic_cache_dir", cache, "--output_dir", str(output),
               *KILL_ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
    return process


def _final_student(output) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    latest = sorted((output / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    assert latest.name == "checkpoint-6"
    return load_file(latest / "model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_kill_9_at_a_random_moment_then_resume_gives_the_uninterrupted_result(tmp_path, synthetic_cache, seed):
    """A training process killed with SIGKILL at a random moment (checkpoints every step, limit 1): resuming from
    ``latest`` always works and ends with the same student as an uninterrupted run."""
    straight = tmp_path / "straight"
    _train(straight, synthetic_cache)
    killed = tmp_path / "killed"
    started = time.monotonic()
    process = _train(killed, synthetic_cache, wait=False)
    while not (killed / "checkpoints").is_dir() and process.poll() is None:  # let it reach the first checkpoint
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 1.5))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before the kill"
    assert time.monotonic() - started < 600
    _train(killed, synthetic_cache, "--resume_from_checkpoint", "latest")
    expected, got = _final_student(straight), _final_student(killed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


# ---------------------------------------------------------------------------------------------- images
def _exif_rotated_jpeg(path) -> tuple[int, int, int, int]:
    """A 100 x 200 (w x h) displayed image with a red square, stored as 200 x 100 raw pixels + EXIF orientation 6
    (rotate 90° clockwise to display). Returns the square's displayed box (x0, y0, x1, y1)."""
    import PIL.Image

    displayed = np.full((200, 100, 3), 30, np.uint8)
    displayed[120:170, 20:70] = (230, 20, 20)
    raw = np.rot90(displayed, k=1)  # orientation 6 displays raw rotated 90° clockwise
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(np.ascontiguousarray(raw)).save(path, exif=exif, quality=95)
    return 20, 120, 70, 170


def test_exif_orientation_is_applied_alike_in_training_and_inference(tmp_path):
    """A box annotated on the displayed image (as annotation tools show it) covers the object in the training view
    and in the image processor's input; a json whose width/height are the raw (unrotated) size is skipped with a
    message that names the EXIF orientation."""
    import PIL.Image

    from sparse_semi_detr_hf import SparseSemiDetrImageProcessor
    from sparse_semi_detr_hf.training.data import LabeledDetectionDataset, check_declared_size, decode_image

    box = _exif_rotated_jpeg(tmp_path / "photo.jpg")
    image = decode_image(str(tmp_path / "photo.jpg"))
    assert tuple(image.shape[-2:]) == (200, 100)
    x0, y0, x1, y1 = box
    assert image[0, y0 + 5:y1 - 5, x0 + 5:x1 - 5].float().mean() > 200  # red inside the annotated box
    pixels = SparseSemiDetrImageProcessor(do_resize=False, do_normalize=False, do_rescale=False)(
        PIL.Image.open(tmp_path / "photo.jpg"))["pixel_values"][0]
    assert torch.equal(pixels.to(torch.uint8), image)  # the processor sees the same pixels as training
    with pytest.raises(ValueError, match="swapped: the file's EXIF orientation"):
        check_declared_size({"width": 200, "height": 100}, image)

    from datasets import Dataset

    from sparse_semi_detr_hf.training.data import detection_features

    rows = {"image": [str(tmp_path / "photo.jpg")] * 2, "image_id": [1, 2], "width": [100, 200],
            "height": [200, 100], "objects": [{"id": [1], "area": [2500.0], "bbox": [[20.0, 120.0, 50.0, 50.0]],
                                               "category": [0], "iscrowd": [0]}] * 2}
    ds = Dataset.from_dict(rows, features=detection_features(["square"]))
    wrapped = LabeledDetectionDataset(ds, lambda img, boxes, labels, rng: SimpleView(img, boxes, labels), seed=0)
    first, second = wrapped[0], wrapped[1]
    assert first["image_id"] == 1 and torch.equal(first["boxes"], torch.tensor([[20.0, 120.0, 70.0, 170.0]]))
    assert second["image_id"] == 1  # image 2 declares the raw size: skipped, the next readable row is used


class SimpleView:
    def __init__(self, image, boxes, labels):
        self.image, self.boxes, self.labels = image, boxes, labels


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_match_their_8_bit_version(mode):
    import PIL.Image

    from sparse_semi_detr_hf.image_processing_sparse_semi_detr import to_rgb_pil

    eight = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    if mode == "F":
        deep = PIL.Image.fromarray(eight.astype(np.float32) / 255.0, mode="F")
    else:
        deep = PIL.Image.fromarray((eight.astype(np.uint32) * 257).astype(np.uint16 if mode == "I;16" else np.int32))
    assert deep.mode == mode
    rgb = np.asarray(to_rgb_pil(deep))
    assert rgb.shape == (16, 16, 3) and np.abs(rgb[..., 0].astype(int) - eight).max() <= 1


def test_a_16_bit_png_file_decodes_like_its_8_bit_version(tmp_path):
    import PIL.Image

    from sparse_semi_detr_hf import SparseSemiDetrImageProcessor
    from sparse_semi_detr_hf.training.data import decode_image

    eight = np.arange(0, 256, dtype=np.uint8).reshape(16, 16)
    PIL.Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    PIL.Image.fromarray(eight).save(tmp_path / "plain.png")
    deep, plain = decode_image(str(tmp_path / "deep.png")), decode_image(str(tmp_path / "plain.png"))
    assert (deep.int() - plain.int()).abs().max() <= 1 and plain.float().std() > 50  # not a flat white image
    processor = SparseSemiDetrImageProcessor(do_resize=False, do_normalize=False)
    a = processor(PIL.Image.open(tmp_path / "deep.png"))["pixel_values"]
    b = processor(PIL.Image.open(tmp_path / "plain.png"))["pixel_values"]
    assert (a - b).abs().max() <= 1.5 / 255


# ---------------------------------------------------------------------------------------------- bad input
def _coco_folder(root, annotations=None, images=None, write_images=True):
    """A tiny COCO folder: two 40x30 images, one box each, category 1 'cat'."""
    import json as _json

    import PIL.Image

    root.mkdir(parents=True, exist_ok=True)
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
        {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]
    if write_images:
        for im in images:
            PIL.Image.new("RGB", (40, 30), (90, 20, 20)).save(root / im["file_name"])
    annotations = annotations if annotations is not None else [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]},
        {"id": 11, "image_id": 2, "category_id": 1, "bbox": [5, 5, 8, 8]}]
    path = root / "instances.json"
    path.write_text(_json.dumps({"images": images, "annotations": annotations,
                                 "categories": [{"id": 1, "name": "cat"}]}))
    return root, path


def test_data_errors_name_the_file_the_id_and_the_field(tmp_path, caplog):
    from sparse_semi_detr_hf.training.data import load_coco_folder, load_unlabeled_images

    folder, path = _coco_folder(tmp_path / "ok")
    path_text = tmp_path / "broken.json"
    path_text.write_text("this is not json")
    with pytest.raises(ValueError, match="broken.json is not a JSON file"):
        load_coco_folder(str(folder), str(path_text))
    duplicated = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}] * 2
    dup_folder, dup_path = _coco_folder(tmp_path / "dup", images=duplicated)
    with pytest.raises(ValueError, match=r"duplicate image ids \[1\]"):
        load_coco_folder(str(dup_folder), str(dup_path))
    with pytest.raises(ValueError, match="is a file: give a folder of images or a COCO json"):
        load_unlabeled_images(str(folder / "a.png"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_unlabeled_images(str(tmp_path / "nowhere"))
    bad_box = [{"id": 10, "image_id": 1, "category_id": 1, "bbox": ["1", "1", "5", "x"]},
               {"id": 11, "image_id": 2, "category_id": 1, "bbox": ["5", "5", "8", "8"]}]
    box_folder, box_path = _coco_folder(tmp_path / "boxes", annotations=bad_box)
    with caplog.at_level("WARNING"):
        ds = load_coco_folder(str(box_folder), str(box_path))
    assert [len(o["bbox"]) for o in ds["objects"]] == [0, 1] and "dropped 1 annotations" in caplog.text
    # a corrupt image in a json without sizes: skipped with a warning at load, its annotations with it
    no_sizes = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}]
    corrupt_folder, corrupt_path = _coco_folder(tmp_path / "corrupt", images=no_sizes)
    (corrupt_folder / "a.png").write_bytes(b"not an image")
    with caplog.at_level("WARNING"):
        ds = load_coco_folder(str(corrupt_folder), str(corrupt_path))
    assert ds["image_id"] == [2] and "skipping unreadable image a.png (image_id 1" in caplog.text


def test_an_empty_annotation_list_stops_before_training(tmp_path):
    from test_trainer import parse

    from sparse_semi_detr_hf.training.trainer import load_data

    folder, path = _coco_folder(tmp_path / "empty", annotations=[])
    args = parse("--output_dir", str(tmp_path / "out"), "--train_images", str(folder), "--train_annotations",
                 str(path), "--val_images", str(folder), "--val_annotations", str(path), "--labeled_percent", "50")
    with pytest.raises(ValueError, match="carry no box at all"):
        load_data(args)


def test_an_unwritable_output_dir_fails_before_step_one(tmp_path, synthetic_cache):
    if os.geteuid() == 0:  # root writes anywhere: make the output "dir" a file instead
        blocked = tmp_path / "blocked"
        blocked.write_text("a file, not a folder")
        output = blocked / "run"
    else:
        blocked = tmp_path / "readonly"
        blocked.mkdir(mode=0o500)
        output = blocked / "run"
    with pytest.raises(PermissionError, match="--output_dir .* is not writable"):
        SemiSupervisedTrainer(tiny_args(output, synthetic_cache))


def test_low_free_disk_is_warned_about_before_training(tmp_path, synthetic_cache, monkeypatch, caplog):
    from collections import namedtuple

    from sparse_semi_detr_hf.training import trainer as trainer_module

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer_module.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with caplog.at_level("WARNING"):
        SemiSupervisedTrainer(tiny_args(tmp_path / "out", synthetic_cache))
    assert "free on the disk of --output_dir" in caplog.text
    monkeypatch.undo()  # the real disk: plenty, no warning
    caplog.clear()
    with caplog.at_level("WARNING"):
        SemiSupervisedTrainer(tiny_args(tmp_path / "out2", synthetic_cache))
    assert "free on the disk" not in caplog.text


@pytest.mark.parametrize("argv, message", [(["--fold", "-1"], "--fold must be >= 0"),
                                           (["--image_scales", "abc"], "--image_scales must be comma-separated"),
                                           (["--image_scales", "0,96"], "--image_scales must be positive")])
def test_bad_flags_name_the_flag(argv, message):
    from test_trainer import parse

    with pytest.raises(ValueError, match=message):
        parse("--output_dir", "x", *argv)
