"""SemiSupervisedTrainer end to end on a tiny detector (CPU, seeded): stage switch, gradients for DDP, resume,
Hub pushes with a fake client, supervised-only runs, argument errors and a real COCO-format set (BCCD).

Every run uses ``TINY``: timm's ``test_resnet`` backbone (0.4 M parameters, strides 8/16/32), d_model 32, one
encoder and one decoder layer, 64-96 px views, 20 synthetic training images cached once per module.
"""

import json
import logging
import os
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import HfArgumentParser
from conftest import tiny_config_kwargs

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection
from sparse_semi_detr_hf.loss import SetCriterion
from sparse_semi_detr_hf.training import step
from sparse_semi_detr_hf.training.arguments import PRESETS, TrainingArguments
from sparse_semi_detr_hf.training.data import dataset_id2label, load_coco_folder, split_labeled_unlabeled
from sparse_semi_detr_hf.training.step import ONE_TO_MANY, ONE_TO_ONE
from sparse_semi_detr_hf.training.trainer import SemiSupervisedTrainer, load_data

BCCD = Path("/work/shared/data/bccd")
MODEL_SIDE = Path(__file__).resolve().parents[1] / "sparse_semi_detr_hf"

TINY_MODEL = (
    "--backbone test_resnet --d_model 32 --encoder_layers 1 --decoder_layers 1 --ffn_dim 64 --attention_heads 2 "
    "--num_queries 20 --num_denoising_queries 10 --num_detections 20 --qrm_reduced_dim 16 "
    "--config_overrides qrm_attention_heads=2 --image_scales 64,80 --max_image_size 96 --eval_image_size 64 "
    "--labeled_batch_size 1 --unlabeled_batch_size 2 --num_workers 0 --eval_batch_size 8 --logging_steps 1"
).split()
TINY = ["--synthetic_num_train", "20", "--synthetic_num_val", "4", *TINY_MODEL]


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> str:
    """One generated synthetic set per module (``--synthetic_cache_dir``)."""
    return str(tmp_path_factory.mktemp("synthetic"))


def parse(*argv: str) -> TrainingArguments:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=list(argv))
    return args


def tiny_args(output_dir, cache: str, *extra: str) -> TrainingArguments:
    return parse(*TINY, "--synthetic_cache_dir", cache, "--output_dir", str(output_dir), *extra)


def student_detector(trainer: SemiSupervisedTrainer):
    return trainer.accelerator.unwrap_model(trainer.student).detector


# ---------------------------------------------------------------------------------------------- stage switch
def test_stage_switch_reaches_the_criterion(tmp_path, synthetic_cache, monkeypatch):
    """Steps < T1 train labeled and unlabeled data one-to-many, steps >= T1 one-to-one; pseudo-labels get
    denoising queries only in the one-to-one stage (labeled targets in both)."""
    calls = []
    original = SetCriterion.forward

    def recording(self, layer_logits, layer_boxes, targets, *args, **kwargs):
        calls.append({"assignment": kwargs.get("assignment"), "pseudo": all("scores" in t for t in targets),
                      "denoising": kwargs.get("dn_meta") is not None,
                      "targets": sum(len(t["boxes"]) for t in targets)})
        return original(self, layer_logits, layer_boxes, targets, *args, **kwargs)

    monkeypatch.setattr(SetCriterion, "forward", recording)
    # tau = 0: the untrained teacher's top detections become pseudo-labels, so the unlabeled loss has targets.
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "3", "--one_to_many_steps", "2", "--eval_steps", "100",
                     "--checkpointing_steps", "100", "--pseudo_label_threshold", "0.0")
    trainer = SemiSupervisedTrainer(args)
    assert [trainer.stage(s) for s in (0, 1, 2, 3, 100)] == [ONE_TO_MANY] * 2 + [ONE_TO_ONE] * 3
    results = trainer.train()

    assert results["steps"] == 3
    assert len(calls) == 6, calls  # one labeled and one unlabeled criterion call per step
    labeled, unlabeled = calls[0::2], calls[1::2]
    assert not any(c["pseudo"] for c in labeled) and all(c["pseudo"] for c in unlabeled)
    expected = [ONE_TO_MANY, ONE_TO_MANY, ONE_TO_ONE]
    assert [c["assignment"] for c in labeled] == expected
    assert [c["assignment"] for c in unlabeled] == expected
    assert all(c["targets"] > 0 for c in calls)
    assert all(c["denoising"] for c in labeled)
    assert [c["denoising"] for c in unlabeled] == [False, False, True]
    assert results["final"]["stage"] == ONE_TO_ONE


def test_evaluation_right_after_t1_uses_the_one_to_many_post_processing(tmp_path, synthetic_cache, monkeypatch):
    """Bug fixed: the evaluation after step T1 (all T1 steps trained one-to-many) ran without the one-to-many
    stage's NMS, so a duplicate-producing model looked far worse exactly at the switch."""
    stages = []
    monkeypatch.setattr(SemiSupervisedTrainer, "predict",
                        lambda self, detectors, stage, *a, **k: stages.append(stage) or {n: [] for n in detectors})
    monkeypatch.setattr("sparse_semi_detr_hf.training.trainer.evaluate_detections", lambda gt, records: {"AP": 0.0})
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "3", "--one_to_many_steps", "2", "--eval_steps", "1",
                     "--checkpointing_steps", "100", "--supervised_only", "--query_mode", "none",
                     "--use_rpf", "false")
    trainer = SemiSupervisedTrainer(args)
    monkeypatch.setattr(trainer, "export", lambda *a, **k: None)
    results = trainer.train()
    assert [r["stage"] for r in results["history"]] == [ONE_TO_MANY, ONE_TO_MANY, ONE_TO_ONE]
    assert stages[:3] == [ONE_TO_MANY, ONE_TO_MANY, ONE_TO_ONE]


def test_models_exported_from_the_one_to_many_stage_carry_their_nms(tmp_path, synthetic_cache):
    """A model saved after one-to-many steps duplicates its detections: its saved image processor applies the
    evaluation's class-wise NMS (pipeline users get what was evaluated); a one-to-one model's does not."""
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--one_to_many_steps", "2"))
    metrics = dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl"], 0.0)
    for at_step, expected in ((2, 0.6), (3, None)):
        trainer.state.step = at_step
        trainer.export(trainer.teacher.model, f"model_{at_step}", metrics)
        saved = json.loads((tmp_path / f"model_{at_step}" / "preprocessor_config.json").read_text())
        assert saved.get("nms_threshold") == expected
    assert trainer.processor.nms_threshold is None
    for iou, expected in (("0.5", 0.5), ("1.0", None)):  # --one_to_many_nms_iou (1.0: no NMS at all)
        other = SemiSupervisedTrainer(tiny_args(tmp_path / iou, synthetic_cache, "--one_to_many_steps", "2",
                                                "--one_to_many_nms_iou", iou))
        assert other.nms_threshold(ONE_TO_MANY) == expected and other.nms_threshold(ONE_TO_ONE) is None


def test_pseudo_label_settings_reach_the_selection(monkeypatch):
    """``one_to_many_nms_iou`` (one-to-many stage only) and ``pseudo_label_mean_std_filter`` are what the teacher's
    pseudo-label selection is called with."""
    calls = []
    real = step.select_pseudo_labels
    monkeypatch.setattr(step, "select_pseudo_labels", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    config = SparseSemiDetrConfig(**tiny_config_kwargs(one_to_many_nms_iou=0.45, pseudo_label_mean_std_filter=True))
    teacher = SparseSemiDetrForObjectDetection(config).eval()
    batch = {"weak_pixel_values": torch.randn(1, 3, 64, 64),
             "weak_pixel_mask": torch.ones(1, 64, 64, dtype=torch.long), "weak_sizes": torch.tensor([[64, 64]]), "strong_sizes": torch.tensor([[64, 64]]),
             "weak_to_strong": torch.eye(3)[None]}
    for stage in (ONE_TO_MANY, ONE_TO_ONE):
        step.run_teacher(teacher, batch, stage, config)
    assert [c["class_nms_iou"] for c in calls] == [0.45, None]
    assert all(c["mean_std_filter"] is True and c["max_per_image"] == config.num_detections for c in calls)


def test_history_records_the_pseudo_label_rate_and_warns_when_it_vanishes(tmp_path, synthetic_cache, caplog):
    """Each evaluation records the mean pseudo-labels per unlabeled image since the previous one; a teacher that
    gives (almost) none triggers a warning naming the threshold."""
    rates = {}
    for tau in ("0.0", "1.0"):
        args = tiny_args(tmp_path / tau, synthetic_cache, "--max_steps", "2", "--eval_steps", "1",
                         "--checkpointing_steps", "100", "--pseudo_label_threshold", tau)
        with caplog.at_level(logging.WARNING, logger="sparse_semi_detr_hf.training.trainer"):
            caplog.clear()
            results = SemiSupervisedTrainer(args).train()
        rates[tau] = [record["pseudo_labels_per_image"] for record in results["history"]]
        warned = any("pseudo-labels per unlabeled image" in r.getMessage() for r in caplog.records)
        assert warned == (tau == "1.0")
    assert len(rates["0.0"]) == 2 and min(rates["0.0"]) > 1  # tau 0: the top detections of each image
    assert rates["1.0"] == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------- DDP safety
@pytest.mark.parametrize("query_mode", ["refined", "cross_view"])
@pytest.mark.parametrize("threshold", ["1.0", "0.0"])
def test_every_parameter_gets_a_gradient(tmp_path, synthetic_cache, query_mode, threshold):
    """DDP without ``find_unused_parameters`` needs a gradient for every trainable parameter on every process,
    also when a process has no pseudo-label (tau = 1) or the QRM keeps no query (tau = 0 on an untrained model:
    the similarity step drops every box). Regression: the QRM's fuse layer / the cross-view projector had none."""
    args = tiny_args(tmp_path, synthetic_cache, "--query_mode", query_mode, "--pseudo_label_threshold", threshold,
                     "--one_to_many_steps", "0")
    trainer = SemiSupervisedTrainer(args)
    labeled_loader, unlabeled_loader = trainer._loaders()
    loss, logs = trainer.compute_loss(next(iter(labeled_loader)), next(iter(unlabeled_loader)), ONE_TO_ONE)
    loss.backward()
    missing = [name for name, p in trainer.student.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert torch.isfinite(loss)
    assert (logs["pseudo_per_image"] > 0) == (threshold == "0.0")


# ---------------------------------------------------------------------------------------------- resume
def _parameters(trainer: SemiSupervisedTrainer) -> tuple[dict, dict]:
    student = {k: v.detach().clone() for k, v in student_detector(trainer).state_dict().items()}
    teacher = {k: v.detach().clone() for k, v in trainer.teacher.model.state_dict().items()}
    return student, teacher


def _assert_same(first: dict, second: dict, what: str) -> None:
    assert first.keys() == second.keys()
    different = [k for k in first if not torch.equal(first[k], second[k])]
    assert different == [], f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


@pytest.mark.parametrize("accumulation", ["1", "2"])
def test_resume_gives_the_same_parameters(tmp_path, synthetic_cache, accumulation):
    """k steps, checkpoint, resume ``latest``, n more steps == k + n uninterrupted steps (student, EMA teacher,
    scheduler), bit for bit, also with gradient accumulation. T1 falls between the two parts; tau = 0 so RPF's
    random jitter, the denoising noise and the QRM all run on the resumed side."""
    common = ("--one_to_many_steps", "2", "--eval_steps", "100", "--checkpointing_steps", "2",
              "--pseudo_label_threshold", "0.0", "--gradient_accumulation_steps", accumulation)
    straight = SemiSupervisedTrainer(tiny_args(tmp_path / "straight", synthetic_cache, "--max_steps", "3", *common))
    straight.train()

    first = SemiSupervisedTrainer(tiny_args(tmp_path / "resumed", synthetic_cache, "--max_steps", "2", *common))
    first.train()
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "COMPLETE").is_file()
    resumed = SemiSupervisedTrainer(tiny_args(tmp_path / "resumed", synthetic_cache, "--max_steps", "3",
                                              "--resume_from_checkpoint", "latest", *common))
    results = resumed.train()

    assert results["steps"] == resumed.state.step == 3
    expected_student, expected_teacher = _parameters(straight)
    student, teacher = _parameters(resumed)
    _assert_same(expected_student, student, "student")
    _assert_same(expected_teacher, teacher, "EMA teacher")
    assert resumed.teacher.last_momentum == straight.teacher.last_momentum
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 3
    # checkpoints are named by step
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["checkpoint-2", "checkpoint-3"]


def test_resuming_from_the_final_checkpoint_keeps_its_evaluation(tmp_path, synthetic_cache):
    """Bug fixed: the last step's checkpoint was saved before the final evaluation, so a run resumed from it to train
    longer lost that evaluation: its history skipped the step and its best model could be replaced by a worse one
    (results.json named step 3 best while best_model/ held step 6's model). Now the checkpoint follows it."""
    common = ("--eval_steps", "100", "--checkpointing_steps", "100", "--pseudo_label_threshold", "0.0")
    first = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "2", *common)).train()
    assert [r["step"] for r in first["history"]] == [2]
    again = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "2",
                                            "--resume_from_checkpoint", "latest", *common)).train()
    assert again["history"] == first["history"] and again["final"] == first["final"]  # nothing to train: as saved
    longer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--max_steps", "3",
                                             "--resume_from_checkpoint", "latest", *common)).train()
    assert [r["step"] for r in longer["history"]] == [2, 3]
    assert longer["history"][0] == first["history"][0]
    best = max(longer["history"], key=lambda r: max(r["teacher"]["AP"], r["student"]["AP"]))
    assert longer["best"]["step"] == best["step"]


def test_evaluations_do_not_change_the_training(tmp_path, synthetic_cache):
    """An evaluation restores the random state it found (its DataLoader draws a seed from torch's generator): the
    weights after 3 steps are the same with an evaluation after every step as with none."""
    common = ("--max_steps", "3", "--checkpointing_steps", "100", "--pseudo_label_threshold", "0.0")
    runs = {}
    for eval_steps in ("1", "100"):
        trainer = SemiSupervisedTrainer(tiny_args(tmp_path / eval_steps, synthetic_cache, "--eval_steps", eval_steps,
                                                  *common))
        trainer.train()
        runs[eval_steps] = _parameters(trainer)
    assert len(trainer.state.history) == 1
    _assert_same(runs["1"][0], runs["100"][0], "student")
    _assert_same(runs["1"][1], runs["100"][1], "EMA teacher")


def test_teacher_warmup_only_for_an_untrained_start(tmp_path, synthetic_cache):
    """The EMA warm-up would replace a loaded (burn-in) teacher by the student's first steps: it is on by default
    for a run from scratch, off with --model_name_or_path (the flag overrides both)."""
    scratch = SemiSupervisedTrainer(tiny_args(tmp_path / "scratch", synthetic_cache, "--max_steps", "1"))
    assert scratch.args.ema_warmup and scratch.teacher.warmup
    scratch.accelerator.unwrap_model(scratch.student).detector.save_pretrained(tmp_path / "model")
    loaded = SemiSupervisedTrainer(tiny_args(tmp_path / "loaded", synthetic_cache, "--max_steps", "1",
                                             "--model_name_or_path", str(tmp_path / "model")))
    assert not loaded.args.ema_warmup and not loaded.teacher.warmup
    forced = tiny_args(tmp_path / "forced", synthetic_cache, "--model_name_or_path", "m", "--ema_warmup", "true")
    assert forced.ema_warmup


def test_fresh_run_in_a_used_output_dir(tmp_path, synthetic_cache):
    """Regression: a new run (no resume) in an output dir that already holds checkpoints used to train to the
    end and then crash in ``save_state`` ("Checkpoint directory ... already exists"). Now the new run's
    checkpoint of the same step replaces the old one as a whole."""
    args = ("--max_steps", "1", "--eval_steps", "100", "--checkpointing_steps", "1", "--query_mode", "none")
    SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, *args)).train()
    first = (tmp_path / "checkpoints" / "checkpoint-1" / "COMPLETE").stat().st_mtime_ns
    results = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, *args)).train()
    assert results["steps"] == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["checkpoint-1"]
    assert (tmp_path / "checkpoints" / "checkpoint-1" / "COMPLETE").stat().st_mtime_ns > first


# ---------------------------------------------------------------------------------------------- Hub
class FakeHubApi:
    """``create_repo`` / ``upload_folder`` that copy the folder into ``remote`` (``mode=None``), raise at
    submission (``"raise"``), or return a future that failed (``"future"``)."""

    def __init__(self, remote: Path, mode: str | None = None):
        self.remote, self.mode, self.uploads = remote, mode, []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, *, repo_id, folder_path, commit_message, ignore_patterns=None, run_as_future=False):
        self.uploads.append(commit_message)
        if self.mode == "raise":
            raise ConnectionError("upload refused")
        future = Future()
        if self.mode == "future":
            future.set_exception(TimeoutError("upload timed out"))
            return future
        target = self.remote / repo_id
        for path in Path(folder_path).rglob("*"):
            if path.is_file():
                (target / path.relative_to(folder_path)).parent.mkdir(parents=True, exist_ok=True)
                (target / path.relative_to(folder_path)).write_bytes(path.read_bytes())
        future.set_result(SimpleNamespace(commit_message=commit_message))
        return future


def _remote_code_files() -> set[str]:
    """The model, config and image-processor files and every module they import relatively: what remote code
    needs (package utilities such as ``cuda_graphs.py`` or ``convert_dino_to_hf.py`` are not part of it)."""
    from transformers.dynamic_module_utils import get_relative_import_files

    roots = ["modeling_sparse_semi_detr.py", "configuration_sparse_semi_detr.py", "image_processing_sparse_semi_detr.py"]
    files = {name for name in roots}
    for root in roots:
        files |= {Path(path).name for path in get_relative_import_files(str(MODEL_SIDE / root))}
    return files


def _hub_run(tmp_path, cache, api) -> tuple[SemiSupervisedTrainer, dict]:
    args = tiny_args(tmp_path / "out", cache, "--max_steps", "1", "--eval_steps", "100", "--checkpointing_steps",
                     "100", "--push_to_hub", "--hub_model_id", "me/model", "--query_mode", "none")
    trainer = SemiSupervisedTrainer(args, hub_api=api)
    return trainer, trainer.train()


def test_push_to_hub_uploads_the_model_folder(tmp_path, synthetic_cache):
    api = FakeHubApi(tmp_path / "remote")
    trainer, results = _hub_run(tmp_path, synthetic_cache, api)
    assert results["hub_upload_ok"] is True
    remote = tmp_path / "remote" / "me" / "model"
    names = {p.name for p in remote.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    model_side = _remote_code_files()
    assert {"configuration_sparse_semi_detr.py", "modeling_sparse_semi_detr.py", "loss.py"} <= model_side <= names
    assert not any(name.startswith("checkpoint") or name.endswith((".bin", ".pkl")) for name in names)
    assert json.loads((remote / "config.json").read_text())["auto_map"]
    card = ModelCard.load(remote / "README.md")
    metrics = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert metrics["AP"] == pytest.approx(results["best"]["metrics"]["AP"])
    assert {"AP", "AP50", "AP75"} <= metrics.keys()
    assert card.data.pipeline_tag == "object-detection"


@pytest.mark.parametrize("mode", ["raise", "future"])
def test_hub_failures_do_not_stop_training(tmp_path, synthetic_cache, mode, caplog):
    api = FakeHubApi(tmp_path / "remote", mode=mode)
    with caplog.at_level(logging.WARNING):
        trainer, results = _hub_run(tmp_path, synthetic_cache, api)
    assert results["steps"] == 1
    assert results["hub_upload_ok"] is False
    assert len(api.uploads) == 1 + trainer.uploader.max_retries  # the push, then finish()'s retries
    assert trainer.uploader.errors and any("upload" in r.getMessage() for r in caplog.records)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["hub_upload_ok"] is False and saved["hub_errors"]
    assert (tmp_path / "out" / "best_model" / "model.safetensors").is_file()
    assert not (tmp_path / "remote").exists()


# ---------------------------------------------------------------------------------------------- arguments
def test_supervised_only_runs_without_unlabeled_data(tmp_path, synthetic_cache):
    args = tiny_args(tmp_path, synthetic_cache, "--supervised_only", "--max_steps", "2", "--eval_steps", "100",
                     "--checkpointing_steps", "100", "--one_to_many_steps", "1")
    trainer = SemiSupervisedTrainer(args)
    assert trainer.data.unlabeled is None
    labeled_loader, unlabeled_loader = trainer._loaders()
    assert unlabeled_loader is None
    results = trainer.train()
    assert results["steps"] == 2
    assert (tmp_path / "results.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--push_to_hub"], "hub_model_id"),
    (["--train_images", "images"], "train_annotations"),
    (["--val_images", "val"], "val_annotations"),
    (["--labeled_percent", "0"], "labeled_percent"),
    (["--labeled_percent", "150"], "labeled_percent"),
    (["--max_steps", "0"], "max_steps"),
    (["--unlabeled_batch_size", "0"], "batch sizes"),
])
def test_bad_arguments_raise_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        parse("--output_dir", "unused", *argv)


def test_evaluation_decodes_the_validation_set_once_for_student_and_teacher(tmp_path, synthetic_cache):
    trainer = SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache))
    passes = []
    original = trainer._val_batches
    trainer._val_batches = lambda *a: passes.append(1) or original(*a)
    student, teacher = student_detector(trainer), trainer.teacher.model
    with torch.no_grad():  # make the two models differ
        for parameter in student.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    both = trainer.predict({"student": student, "teacher": teacher}, ONE_TO_MANY)
    assert len(passes) == 1 and student.training and not teacher.training
    for name, model in (("student", student), ("teacher", teacher)):
        (alone,) = trainer.predict({name: model}, ONE_TO_MANY).values()
        for got, expected in zip(both[name], alone, strict=True):
            torch.testing.assert_close(got["scores"], expected["scores"])
    assert not torch.equal(both["student"][0]["scores"], both["teacher"][0]["scores"])
    metrics = trainer.evaluate({"student": student, "teacher": teacher}, ONE_TO_ONE)
    assert set(metrics) == {"student", "teacher"} and "APs" in metrics["teacher"]


def test_synthetic_overrides_change_the_generated_set(tmp_path):
    from sparse_semi_detr_hf.training.trainer import synthetic_datasets

    common = ["--output_dir", "unused", "--synthetic_num_train", "6", "--synthetic_num_val", "2",
              "--synthetic_cache_dir", str(tmp_path)]
    default_train, _ = synthetic_datasets(parse(*common))
    train, val = synthetic_datasets(parse(*common, "--synthetic_overrides", "num_classes=4,image_size=40:48"))
    names = train.features["objects"]["category"].feature.names
    # the synthetic preset's default: the benchmark's generator, 3 classes
    assert len(names) == 4 and len(default_train.features["objects"]["category"].feature.names) == 3
    assert all(40 <= side <= 48 for row in [*train, *val] for side in (row["width"], row["height"]))
    assert len(os.listdir(tmp_path)) == 2  # each set has its own cache entry
    again, _ = synthetic_datasets(parse(*common, "--synthetic_overrides", "num_classes=4,image_size=40:48"))
    assert again["image_id"] == train["image_id"] and len(os.listdir(tmp_path)) == 2
    with pytest.raises(ValueError, match="unknown field 'radius'"):
        synthetic_datasets(parse(*common, "--synthetic_overrides", "radius=3:4"))


def test_no_unlabeled_data_is_an_error(tmp_path, synthetic_cache):
    with pytest.raises(ValueError, match="no unlabeled images"):
        SemiSupervisedTrainer(tiny_args(tmp_path, synthetic_cache, "--labeled_percent", "100"))


# ---------------------------------------------------------------------------------------------- a real COCO set
@pytest.mark.skipif(not (BCCD / "annotations.json").is_file(), reason="BCCD not available")
def test_one_step_on_bccd(tmp_path):
    """The COCO-folder loaders through the trainer: 50 % labeled, the rest unlabeled, validation = 10 % hold-out."""
    args = parse(*TINY_MODEL, "--preset", "synthetic", "--train_images", str(BCCD / "images"),
                 "--train_annotations", str(BCCD / "annotations.json"), "--labeled_percent", "50",
                 "--max_steps", "1", "--eval_steps", "100", "--checkpointing_steps", "100",
                 "--output_dir", str(tmp_path))
    trainer = SemiSupervisedTrainer(args)
    total = len(trainer.data.labeled) + len(trainer.data.unlabeled) + len(trainer.data.val)
    assert total == len(json.loads((BCCD / "annotations.json").read_text())["images"])
    assert len(trainer.data.val) == round(total * 0.1)
    assert abs(len(trainer.data.labeled) - len(trainer.data.unlabeled)) <= 1
    assert trainer.config.num_labels == 3 and set(trainer.config.id2label.values()) == {"RBC", "WBC", "Platelets"}
    results = trainer.train()
    assert results["steps"] == 1
    assert set(results["final"]["student"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert (tmp_path / "best_model" / "config.json").is_file()


@pytest.mark.skipif(not (BCCD / "annotations.json").is_file(), reason="BCCD not available")
def test_validation_and_test_sets_with_other_category_ids_are_scored_in_the_training_labels(tmp_path):
    """Bug fixed: --val_annotations / --test_annotations numbering the categories differently from the training
    json were evaluated in their own label space (AP 0.004 instead of 0.267 for the same BCCD model)."""
    coco = json.loads((BCCD / "annotations.json").read_text())
    renumber = {1: 3, 2: 1, 3: 2}
    other = {"images": coco["images"], "categories": [dict(c, id=renumber[c["id"]]) for c in coco["categories"]],
             "annotations": [dict(a, category_id=renumber[a["category_id"]]) for a in coco["annotations"]]}
    (tmp_path / "other_ids.json").write_text(json.dumps(other))
    flags = ["--train_images", str(BCCD / "images"), "--train_annotations", str(BCCD / "annotations.json"),
             "--labeled_percent", "50", "--output_dir", str(tmp_path / "run")]
    for split in ("val", "test"):
        flags += [f"--{split}_images", str(BCCD / "images"), f"--{split}_annotations", str(tmp_path / "other_ids.json")]
    data = load_data(parse(*TINY_MODEL, "--preset", "synthetic", *flags))
    train = load_coco_folder(str(BCCD / "images"), str(BCCD / "annotations.json"))
    for split in (data.val, data.test):
        assert dataset_id2label(split) == data.id2label
        assert split["objects"][:20] == train["objects"][:20]  # same boxes, same labels as the training json's


@pytest.mark.skipif(not (BCCD / "annotations.json").is_file(), reason="BCCD not available")
def oracle_records(labels: list[dict], results: list[dict]) -> list[dict]:
    """Prediction records that are the batch's own ground truth (score 1): AP 1 on every image that was read."""
    from sparse_semi_detr_hf.box_ops import box_cxcywh_to_xyxy

    records = []
    for label in labels:
        height, width = label["orig_size"].tolist()
        boxes = box_cxcywh_to_xyxy(label["boxes"]) * torch.tensor([width, height, width, height])
        records.append({"image_id": int(label["image_id"]), "boxes": boxes, "labels": label["class_labels"],
                        "scores": torch.ones(len(boxes))})
    return records


def test_unreadable_validation_images_are_left_out_of_the_evaluation_and_the_picture(tmp_path, caplog, monkeypatch):
    """Bugs fixed: an unreadable validation image (skipped when decoding) still counted its boxes as misses, which
    lowered the AP (BCCD: 0.217 instead of 0.260 on the same readable images); and one among the pictured
    validation images crashed the run after training, before results.json was written."""
    coco = json.loads((BCCD / "annotations.json").read_text())
    images = coco["images"][:6]
    folder = tmp_path / "images"
    folder.mkdir()
    for image in images:
        (folder / image["file_name"]).write_bytes((BCCD / "images" / image["file_name"]).read_bytes())
    broken = images[1]
    (folder / broken["file_name"]).write_bytes((BCCD / "images" / broken["file_name"]).read_bytes()[:2000])

    def annotations(name: str, keep: list[dict]) -> str:
        ids = {im["id"] for im in keep}
        subset = dict(coco, images=keep, annotations=[a for a in coco["annotations"] if a["image_id"] in ids])
        (tmp_path / name).write_text(json.dumps(subset))
        return str(tmp_path / name)

    flags = [*TINY_MODEL, "--preset", "synthetic", "--train_images", str(BCCD / "images"), "--train_annotations",
             str(BCCD / "annotations.json"), "--labeled_percent", "50", "--max_steps", "1", "--eval_steps", "100",
             "--checkpointing_steps", "100", "--val_images", str(folder), "--detection_picture_images", "6",
             "--val_annotations", annotations("all.json", images), "--output_dir", str(tmp_path / "run")]
    trainer = SemiSupervisedTrainer(parse(*flags))
    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING):
        patch.setattr(SemiSupervisedTrainer, "_prediction_records", staticmethod(oracle_records))
        metrics = trainer.evaluate({"teacher": trainer.teacher.model}, ONE_TO_ONE)["teacher"]
    assert "1 of 6 evaluation images could not be read" in caplog.text
    assert metrics["AP"] > 0.99  # the 5 readable images, perfectly detected (the broken one's boxes not misses)
    results = trainer.train()  # the picture of the 6 validation images leaves the broken one out
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "teacher_detections.png").is_file()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["final"]["teacher"] == saved["final"]["teacher"]


@pytest.mark.skipif(not (BCCD / "annotations.json").is_file(), reason="BCCD not available")
def test_labeled_split_defaults_and_the_validation_hold_out(tmp_path, caplog):
    """Bugs fixed: (1) with --unlabeled_images the preset's 10 % silently dropped 90 % of a fully annotated set:
    every annotated image is labeled now unless --labeled_percent is given, and dropped images are warned about
    (also with --supervised_only); (2) --labeled_ids_file without a validation set failed ('labeled ids are not
    in the dataset') when the automatic 10 % hold-out took one of the listed images."""
    coco = json.loads((BCCD / "annotations.json").read_text())
    common = [*TINY_MODEL, "--preset", "synthetic", "--train_images", str(BCCD / "images"), "--train_annotations",
              str(BCCD / "annotations.json"), "--output_dir", str(tmp_path)]
    folder = ["--unlabeled_images", str(BCCD / "images")]
    assert parse(*common, *folder).labeled_percent == 100.0
    assert parse(*common, *folder, "--labeled_percent", "20").labeled_percent == 20.0
    assert parse(*common).labeled_percent == PRESETS["synthetic"]["labeled_percent"]
    data = load_data(parse(*common, *folder))
    assert len(data.labeled) + len(data.val) == len(coco["images"])
    for extra in (folder + ["--labeled_percent", "20"], ["--supervised_only"]):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            load_data(parse(*common, *extra))
        assert "are not used" in caplog.text and "--labeled_percent 100" in caplog.text
    listed = [im["id"] for im in coco["images"]][:40]
    (tmp_path / "ids.txt").write_text("\n".join(map(str, listed)))
    data = load_data(parse(*common, "--labeled_ids_file", str(tmp_path / "ids.txt")))
    assert sorted(data.labeled["image_id"]) == sorted(listed)
    assert not set(data.val["image_id"]) & set(listed)
    assert len(data.val) == round(0.1 * (len(coco["images"]) - len(listed)))  # 10 % of the images not listed
    train = load_coco_folder(str(BCCD / "images"), str(BCCD / "annotations.json"))
    held, _ = split_labeled_unlabeled(train, labeled_percent=10.0, fold=0, seed=12345)
    assert load_data(parse(*common)).val["image_id"] == held["image_id"]  # without a list: the same hold-out


# ---------------------------------------------------------------------------------------------- results a user sees
def test_start_evaluation_test_set_and_detection_picture(tmp_path, synthetic_cache):
    """From a trained model: evaluated before the first step (student = teacher, one evaluation), the held-out
    test set evaluated once at the end (own images, not the validation ones), the picture of the teacher's
    detections written."""
    first = SemiSupervisedTrainer(tiny_args(tmp_path / "first", synthetic_cache, "--max_steps", "1"))
    first.export(first.teacher.model, "start", dict.fromkeys(["AP", "AP50", "AP75", "APs", "APm", "APl"], 0.0))
    args = tiny_args(tmp_path / "run", synthetic_cache, "--model_name_or_path", str(tmp_path / "first" / "start"),
                     "--max_steps", "2", "--eval_steps", "1", "--synthetic_num_test", "3",
                     "--detection_picture_images", "2", "--detection_picture_threshold", "0.0")
    assert args.eval_at_start  # the default from a trained model
    trainer = SemiSupervisedTrainer(args)
    assert len(trainer.data.test) == 3 and trainer.data.test[0]["image"] != trainer.data.val[0]["image"]
    evaluated = []
    original = trainer.evaluate
    trainer.evaluate = lambda detectors, *a, **k: evaluated.append(sorted(detectors)) or original(detectors, *a, **k)
    results = trainer.train()
    assert [r["step"] for r in results["history"]] == [0, 1, 2]
    assert results["history"][0]["student"] == results["history"][0]["teacher"]
    # each evaluation after training steps records the pseudo-labels' precision / recall since the previous one
    assert {"pseudo_labels_per_image", "pseudo_precision", "pseudo_recall"} <= set(results["history"][1])
    assert evaluated[0] == ["teacher"]  # the start: one model evaluated once
    assert results["test"]["images"] == 3 and results["test"]["step"] == 2
    assert set(results["test"]["teacher"]) >= {"AP", "AP50", "APs"}
    picture = PIL.Image.open(tmp_path / "run" / "teacher_detections.png")
    assert picture.width > 2 * 64 and picture.height > 2 * 64  # two images, enlarged, side by side
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"]["teacher"]["AP"] == results["test"]["teacher"]["AP"]


def test_no_start_evaluation_from_scratch_and_no_test_set_by_default(tmp_path, synthetic_cache):
    args = tiny_args(tmp_path, synthetic_cache, "--max_steps", "1", "--detection_picture_images", "0")
    assert not args.eval_at_start
    results = SemiSupervisedTrainer(args).train()
    assert [r["step"] for r in results["history"]] == [1] and "test" not in results
    assert not (tmp_path / "teacher_detections.png").exists()


def test_demo_burnin_is_the_default_start_only_for_the_plain_demo():
    from sparse_semi_detr_hf.training.arguments import DEMO_BURNIN_DIR

    plain = parse("--output_dir", "x")
    assert plain.demo_burnin and plain.model_name_or_path == DEMO_BURNIN_DIR and plain.eval_at_start
    assert not plain.ema_warmup  # a trained start keeps its teacher
    for flags in (["--d_model", "32"], ["--synthetic_overrides", "num_classes=4"], ["--preset", "paper"],
                  ["--model_name_or_path", "user/model"], ["--demo_burnin", "false"]):
        args = parse("--output_dir", "x", *flags)
        assert not args.demo_burnin and args.model_name_or_path != DEMO_BURNIN_DIR, flags
    with pytest.raises(ValueError, match="demo_burnin"):
        parse("--output_dir", "x", "--demo_burnin", "true", "--model_name_or_path", "user/model")


def test_method_settings_inherited_from_a_saved_config_are_reported(caplog):
    """A continued model keeps its saved loss settings unless the command line gives them (a burn-in saved with
    ``rpf_joint_matching=False`` once made an ablation's RPF arms run the earlier reading): the trainer says so."""
    import logging

    from sparse_semi_detr_hf.training import trainer as trainer_module

    from sparse_semi_detr_hf import SparseSemiDetrConfig

    saved = SparseSemiDetrConfig(rpf_joint_matching=False, use_rpf=False, rpf_topk=4)
    assert trainer_module.inherited_method_settings(saved, {"use_rpf": True}) == {"rpf_joint_matching": (False, True)}
    assert trainer_module.inherited_method_settings(saved, {"use_rpf": True, "rpf_joint_matching": False}) == {}
    with caplog.at_level(logging.WARNING, logger=trainer_module.__name__):
        trainer_module._warn_about_inherited_method_settings(saved, {}, "burnin/best_model")
    assert "rpf_joint_matching=False (default True)" in caplog.text and "use_rpf=False" in caplog.text

