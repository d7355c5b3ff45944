"""Semi-supervised training of Sparse Semi-DETR on Accelerate (teacher-student, SPEC §2).

``SemiSupervisedTrainer(args).train()`` builds the data, the student, its EMA teacher, the optimizer, then
loops: teacher pass on the weak view, student pass on labeled + strong views, EMA update; evaluates student
and teacher with COCO mAP, saves and resumes the training state, exports the best model and pushes it.
"""

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from datasets import load_from_disk
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from .. import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor
from .arguments import METHOD_FIELDS, TrainingArguments, parse_synthetic_overrides
from .checkpoints import CheckpointFolder, atomic_write_text, replace_folder
from .data import (
    LabeledDetectionDataset,
    UnlabeledPairDataset,
    UnlabeledPairIterableDataset,
    align_categories,
    as_streaming,
    collate_labeled,
    collate_unlabeled,
    dataset_id2label,
    load_coco_folder,
    hub_dataset_splits,
    load_hub_detection_dataset,
    load_unlabeled_images,
    read_image_id_list,
    split_labeled_unlabeled,
)
from .evaluation import coco_ground_truth_from_dataset, evaluate_detections, restrict_to_images
from .visualize import save_detection_grid
from .hub import HubUploader, build_model_card
from .secrets import looks_like_local_path
from .sampling import SkipBatches, endless_loader, endless_stream_loader
from .step import ONE_TO_MANY, ONE_TO_ONE, SemiSupervisedStudent, semi_supervised_loss
from .synthetic import SyntheticConfig, make_synthetic_detection_dataset, make_synthetic_split
from .teacher import EMATeacher
from .transforms import EvalTransform, LabeledTransform, UnlabeledPairTransform

FEW_PSEUDO_LABELS = 0.1  # pseudo-labels per unlabeled image below which the trainer warns

logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    """Training data. ``unlabeled`` is a Dataset, or the ``--unlabeled_images`` path itself when it is streamed
    (``--stream_unlabeled``: ``as_streaming`` reads the folder / json when the loader is built)."""

    labeled: object
    unlabeled: object | None
    val: object
    id2label: dict
    name: str
    test: object | None = None  # held-out set, evaluated once at the end (never used to choose anything)


class DivergenceError(RuntimeError):
    """Training stopped: too many steps in a row with a non-finite loss or gradient norm."""


class TrainState:
    """Step counter and evaluation history, saved with every checkpoint."""

    def __init__(self):
        self.step, self.history, self.best = 0, [], None
        self.pseudo_labels, self.pseudo_batches = 0.0, 0  # per-image pseudo-label counts since the last evaluation
        self.quality = [0.0, 0.0, 0.0]  # true positives, pseudo-labels, hidden annotations since the last evaluation
        self.nonfinite_in_a_row, self.skipped_steps = 0, []  # divergence guard: steps skipped for a non-finite norm

    def state_dict(self) -> dict:
        return {"step": self.step, "history": self.history, "best": self.best,
                "pseudo_labels": self.pseudo_labels, "pseudo_batches": self.pseudo_batches,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "skipped_steps": self.skipped_steps,
                "quality": list(self.quality)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.history, self.best = state["step"], state["history"], state["best"]
        self.pseudo_labels, self.pseudo_batches = state.get("pseudo_labels", 0.0), state.get("pseudo_batches", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.quality = list(state.get("quality", [0.0, 0.0, 0.0]))

    def take_pseudo_label_quality(self) -> dict:
        """Precision and recall of the pseudo-labels since the last call (synthetic / split data with hidden
        annotations; empty otherwise)."""
        true_positives, labels, annotated = self.quality
        self.quality = [0.0, 0.0, 0.0]
        if not annotated:
            return {}
        return {"pseudo_precision": true_positives / labels if labels else 1.0, "pseudo_recall": true_positives / annotated}

    def take_pseudo_label_rate(self) -> float | None:
        """Mean pseudo-labels per unlabeled image over the batches since the last call (None: no batch)."""
        rate = self.pseudo_labels / self.pseudo_batches if self.pseudo_batches else None
        self.pseudo_labels, self.pseudo_batches = 0.0, 0
        return rate


def load_data(args: TrainingArguments) -> DataBundle:
    """Labeled / unlabeled / validation datasets in the common detection schema (docs/datasets.md)."""
    test = None
    if args.is_synthetic:
        train, val = synthetic_datasets(args)
        test = synthetic_test_dataset(args)
        name = "synthetic"
    elif args.dataset_name:
        train, val = hub_datasets(args)
        name = args.dataset_name
    else:
        train = load_coco_folder(args.train_images, args.train_annotations)
        val = load_coco_folder(args.val_images, args.val_annotations) if args.val_images else None
        test = load_coco_folder(args.test_images, args.test_annotations) if args.test_images else None
        name = os.path.basename(os.path.normpath(args.train_images))
    if val is None:
        val, train = hold_out_validation(train, args.labeled_ids_file)
    val = align_categories(val, train, "the validation set")
    test = None if test is None else align_categories(test, train, "the test set")
    labeled, unlabeled = train, None
    if args.labeled_ids_file or args.labeled_percent < 100:
        labeled, unlabeled = split_labeled_unlabeled(
            train, args.labeled_percent, fold=args.fold, labeled_ids=args.labeled_ids_file
        )
        _report_split(args, len(labeled), len(train))
    if args.unlabeled_images:
        unlabeled = args.unlabeled_images if args.stream_unlabeled else load_unlabeled_images(args.unlabeled_images)
    if args.supervised_only:
        unlabeled = None
    elif unlabeled is None or (not isinstance(unlabeled, str) and len(unlabeled) == 0):
        raise ValueError("no unlabeled images: give --unlabeled_images, --labeled_percent < 100, or "
                         "--supervised_only")
    if not any(objects["bbox"] for objects in labeled["objects"]):
        raise ValueError(f"the labeled images of {name} carry no box at all (an empty 'annotations' list?): "
                         "nothing to learn from")
    return DataBundle(labeled, unlabeled, val, dataset_id2label(train), name, test)


def hold_out_validation(train, labeled_ids_file: str | None = None, percent: float = 10.0) -> tuple:
    """``(val, train)``: ``percent`` of the training images held out for evaluation, deterministically; with
    ``labeled_ids_file``, ``percent`` of the images it does not name (a listed image held out would be missing from
    the labeled split)."""
    listed = set(read_image_id_list(labeled_ids_file)) if labeled_ids_file else set()
    ids = [int(i) for i in train["image_id"]]
    candidates = train.select([row for row, image_id in enumerate(ids) if image_id not in listed])
    val, _ = split_labeled_unlabeled(candidates, labeled_percent=percent, fold=0, seed=12345)
    held = set(val["image_id"])
    return val, train.select([row for row, image_id in enumerate(ids) if image_id not in held])


def _report_split(args: TrainingArguments, labeled: int, annotated: int) -> None:
    """Say how many annotated training images are labeled; warn when the others go unused (they would be the
    unlabeled set, but ``--supervised_only`` drops it or ``--unlabeled_images`` replaces it)."""
    rule = f"--labeled_ids_file {args.labeled_ids_file}" if args.labeled_ids_file else \
        f"--labeled_percent {args.labeled_percent:g}"
    if args.supervised_only or args.unlabeled_images:
        why = "--supervised_only" if args.supervised_only else "--unlabeled_images"
        logger.warning("%s keeps %d of the %d annotated training images labeled; the other %d are not used (with "
                       "%s they are not the unlabeled set). Pass --labeled_percent 100 to train on all of them.",
                       rule, labeled, annotated, annotated - labeled, why)
    else:
        logger.info("%s: %d of the %d annotated training images labeled, the other %d unlabeled", rule, labeled,
                    annotated, annotated - labeled)


def hub_datasets(args: TrainingArguments):
    """``(train, val)`` of ``--dataset_name``; without a ``--validation_split`` split, ``--train_val_split`` of the
    training split is held out for evaluation (deterministically)."""
    hub = {"cache_dir": args.cache_dir}
    load = functools.partial(load_hub_detection_dataset, args.dataset_name, config_name=args.dataset_config_name,
                             bbox_format=args.bbox_format, **hub)
    splits = hub_dataset_splits(args.dataset_name, args.dataset_config_name, **hub)
    train = load(split=args.train_split)
    if args.validation_split in splits:
        return train, load(split=args.validation_split)
    logger.warning("%s has no %r split (it has %s): %.0f %% of %r is held out for evaluation (--train_val_split)",
                   args.dataset_name, args.validation_split, splits, 100 * args.train_val_split, args.train_split)
    val, train = split_labeled_unlabeled(train, labeled_percent=100 * args.train_val_split, fold=0, seed=12345)
    return train, val


def synthetic_datasets(args: TrainingArguments):
    """The embedded synthetic set (train, val), generated or reused from ``synthetic_cache_dir``."""
    overrides = parse_synthetic_overrides(args.synthetic_overrides)
    cache = args.synthetic_cache_dir
    if cache:
        name = f"synthetic_{args.synthetic_num_train}_{args.synthetic_num_val}"
        if overrides:  # a different set: its own cache entry
            name += "_" + hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
        cache = os.path.join(cache, name)
        if os.path.isdir(cache):
            return load_from_disk(os.path.join(cache, "train")), load_from_disk(os.path.join(cache, "val"))
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    config = SyntheticConfig(**overrides)
    train, val = make_synthetic_detection_dataset(args.synthetic_num_train, args.synthetic_num_val,
                                                  image_size=config.image_size, seed=0, config=config,
                                                  num_proc=workers if args.synthetic_num_train >= 200 else 1)
    if cache:
        partial = f"{cache}.tmp{os.getpid()}"
        train.save_to_disk(os.path.join(partial, "train"))
        val.save_to_disk(os.path.join(partial, "val"))
        try:
            os.rename(partial, cache)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return train, val


def synthetic_test_dataset(args: TrainingArguments):
    """The embedded set's test part (``--synthetic_num_test`` images of its own random stream, same generator
    settings), or None; cached next to the train/val set."""
    if not args.synthetic_num_test:
        return None
    overrides = parse_synthetic_overrides(args.synthetic_overrides)
    key = hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:10]
    cache = args.synthetic_cache_dir and os.path.join(args.synthetic_cache_dir, f"synthetic_test_{args.synthetic_num_test}_{key}")
    if cache and os.path.isdir(cache):
        return load_from_disk(cache)
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    test = make_synthetic_split(args.synthetic_num_test, "test", seed=0, config=SyntheticConfig(**overrides),
                                num_proc=workers if args.synthetic_num_test >= 200 else 1)
    if cache:
        partial = f"{cache}.tmp{os.getpid()}"
        test.save_to_disk(partial)
        try:
            os.rename(partial, cache)
        except OSError:  # another process finished first
            shutil.rmtree(partial, ignore_errors=True)
    return test


def unlabeled_stream_loader(source, transform, batch_size: int, seed: int, rank: int, world_size: int,
                            start_batch: int = 0, num_workers: int = 0, shuffle_buffer: int = 1000) -> SkipBatches:
    """Endless unlabeled batches (``collate_unlabeled`` layout) streamed from ``source`` for process ``rank``.

    ``source`` is a Dataset, an image folder or a COCO json (``as_streaming`` lists a folder's files itself; no
    image is read before it is batched). The stream is cut into a multiple of ``world_size x num_workers`` shards
    (at least 64, at most one per row) so processes and then DataLoader workers split whole shards, shuffled with
    ``seed`` (the same on every process; ``set_epoch`` on each pass), and wrapped in
    ``UnlabeledPairIterableDataset`` (views seeded by ``[seed, epoch, image_id]``). ``start_batch``: batches this
    process already consumed (resume; see ``sampling.endless_stream_loader``).
    """
    lanes = world_size * max(1, num_workers)
    stream = as_streaming(source, num_shards=lanes * -(-64 // lanes), rank=rank, world_size=world_size, seed=seed,
                          shuffle_buffer=shuffle_buffer)
    wrap = functools.partial(UnlabeledPairIterableDataset, transform=transform, seed=seed)
    return endless_stream_loader(stream, wrap, batch_size, collate_unlabeled, seed, start_batch, num_workers)


def build_detector(args: TrainingArguments, id2label: dict) -> SparseSemiDetrForObjectDetection:
    label2id = {name: index for index, name in id2label.items()}
    kwargs = args.model_config_kwargs()
    if args.model_name_or_path:
        detector = SparseSemiDetrForObjectDetection.from_pretrained(
            args.model_name_or_path, id2label=id2label, label2id=label2id, cache_dir=args.cache_dir,
            trust_remote_code=args.trust_remote_code, ignore_mismatched_sizes=args.ignore_mismatched_sizes, **kwargs
        )
        _warn_about_inherited_method_settings(detector.config, kwargs, args.model_name_or_path)
        return detector
    config = SparseSemiDetrConfig(id2label=id2label, label2id=label2id, **kwargs)
    detector = SparseSemiDetrForObjectDetection(config)
    if args.pretrained_backbone:
        detector.load_pretrained_backbone()
    elif config.backbone_frozen_stages > 0:
        logger.warning("The backbone starts from random weights but its first %d stage(s) are frozen "
                       "(backbone_frozen_stages): they will never train. Use --pretrained_backbone true or "
                       "--backbone_frozen_stages 0.", config.backbone_frozen_stages)
    return detector


def inherited_method_settings(config, given: dict) -> dict:
    """``{field: (saved value, package default)}`` for method settings the saved ``config`` holds at a non-default
    value that the command line (``given``) did not set."""
    defaults = SparseSemiDetrConfig()
    return {name: (getattr(config, name), getattr(defaults, name)) for name in METHOD_FIELDS
            if name not in given and getattr(config, name) != getattr(defaults, name)}


def _warn_about_inherited_method_settings(config, given: dict, source: str) -> None:
    inherited = inherited_method_settings(config, given)
    if inherited:
        logger.warning("Continuing %s with method settings from its saved config that differ from the defaults "
                       "(give the flag to override): %s", source,
                       ", ".join(f"{name}={saved!r} (default {default!r})"
                                 for name, (saved, default) in inherited.items()))


def build_optimizer(detector, args: TrainingArguments) -> torch.optim.Optimizer:
    """AdamW; the backbone at ``lr * backbone_lr_multiplier``."""
    backbone, rest = [], []
    for name, parameter in detector.named_parameters():
        if parameter.requires_grad:
            (backbone if name.startswith("model.backbone.") else rest).append(parameter)
    groups = [{"params": rest}, {"params": backbone, "lr": args.learning_rate * args.backbone_lr_multiplier}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)


def build_scheduler(optimizer, args: TrainingArguments):
    """``constant`` (the paper): lr after a linear warm-up of ``lr_warmup_steps``; ``linear`` / ``cosine``:
    transformers' schedules decaying to 0 at ``max_steps`` after the same warm-up."""
    if args.lr_scheduler_type == "constant":
        warmup = max(1, args.lr_warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.lr_warmup_steps,
                         num_training_steps=args.max_steps)


def _to_device(batch, device):
    """Move tensors (nested in dicts/lists) to ``device``; view sizes stay on the CPU (read on the host)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: v if k.endswith("_sizes") else _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [_to_device(v, device) for v in batch]
    return batch


@contextlib.contextmanager
def preserved_random_state():
    """Run the block, then restore the global random generators (Python, NumPy, torch on the CPU and every CUDA
    device) as they were before it."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def _readable_ground_truth(coco_gt: dict, evaluated: set[int]) -> dict:
    """``coco_gt`` without the images that could not be read (none of them has a prediction record): their boxes
    would count as misses and lower the AP of a model that never saw them."""
    if len(evaluated) == len(coco_gt["images"]):
        return coco_gt
    missing = sorted(im["id"] for im in coco_gt["images"] if im["id"] not in evaluated)
    logger.warning("%d of %d evaluation images could not be read (image ids %s%s; the decode warnings name the "
                   "files): they are left out of this evaluation", len(missing), len(coco_gt["images"]),
                   missing[:5], " ..." if len(missing) > 5 else "")
    return restrict_to_images(coco_gt, evaluated)


class SemiSupervisedTrainer:
    """Teacher-student training loop. ``hub_api`` is injectable (tests pass a fake client)."""

    def __init__(self, args: TrainingArguments, hub_api=None):
        self.args = args
        _check_writable(args.output_dir)
        project = ProjectConfiguration(project_dir=args.output_dir, automatic_checkpoint_naming=False)
        report_to = None if args.report_to == "none" else args.report_to
        self.accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                       log_with=report_to, project_config=project)
        set_seed(args.seed)
        self.data = load_data(args)
        self.coco_gt = coco_ground_truth_from_dataset(self.data.val)
        detector = build_detector(args, self.data.id2label)
        self.config = detector.config
        self.teacher = EMATeacher(detector, momentum_max=args.ema_momentum, warmup=args.ema_warmup)
        self.optimizer = build_optimizer(detector, args)
        self.scheduler = build_scheduler(self.optimizer, args)
        _warn_if_low_disk(args.output_dir, detector, args.checkpoints_total_limit)
        self.student, self.optimizer = self.accelerator.prepare(SemiSupervisedStudent(detector), self.optimizer)
        self.teacher.to(self.accelerator.device)
        self.state = TrainState()
        for obj in (self.teacher, self.scheduler, self.state):
            self.accelerator.register_for_checkpointing(obj)
        self.views = args.view_config()
        self.processor = SparseSemiDetrImageProcessor(
            size={"shortest_edge": args.eval_image_size, "longest_edge": args.max_image_size}
        )
        self.checkpoints = CheckpointFolder(args.output_dir, args.checkpoints_total_limit)
        self.uploader = None
        if args.push_to_hub and self.accelerator.is_main_process:
            self.uploader = HubUploader(args.hub_model_id, token=args.hub_token, private=args.hub_private_repo,
                                        api=hub_api)

    # ------------------------------------------------------------------------------------------ data
    def _loaders(self):
        args, acc = self.args, self.accelerator
        consumed = self.state.step * args.gradient_accumulation_steps
        labeled = LabeledDetectionDataset(self.data.labeled, LabeledTransform(self.views), seed=args.seed)
        labeled_loader = endless_loader(labeled, args.labeled_batch_size, collate_labeled, args.seed,
                                        acc.process_index, acc.num_processes, consumed, args.num_workers)
        unlabeled_loader = None if self.data.unlabeled is None else self._unlabeled_loader(consumed)
        return labeled_loader, unlabeled_loader

    def _unlabeled_loader(self, consumed: int):
        """Endless unlabeled batches after ``consumed`` batches of this process: streamed with
        ``--stream_unlabeled``, else positions of the map-style dataset."""
        args, acc = self.args, self.accelerator
        transform = UnlabeledPairTransform(self.views)
        if args.stream_unlabeled:
            return unlabeled_stream_loader(self.data.unlabeled, transform, args.unlabeled_batch_size, args.seed + 1,
                                           acc.process_index, acc.num_processes, consumed, args.num_workers)
        pairs = UnlabeledPairDataset(self.data.unlabeled, transform, seed=args.seed + 1)
        return endless_loader(pairs, args.unlabeled_batch_size, collate_unlabeled, args.seed + 1, acc.process_index,
                              acc.num_processes, consumed, args.num_workers)

    def _val_batches(self, dataset=None, whole: bool = False):
        """This process's share of ``dataset`` (default: the validation set; ``whole``: all of it) as evaluation
        batches."""
        acc, dataset = self.accelerator, self.data.val if dataset is None else dataset
        rank, world = (0, 1) if whole else (acc.process_index, acc.num_processes)
        shard = dataset.select(range(rank, len(dataset), world))
        dataset = LabeledDetectionDataset(shard, EvalTransform(self.views), seed=0, drop_crowd=False)
        return torch.utils.data.DataLoader(dataset, batch_size=self.args.eval_batch_size,
                                           collate_fn=collate_labeled, num_workers=self.args.num_workers)

    # ------------------------------------------------------------------------------------------ step
    def stage(self, step: int) -> str:
        """One-to-many assignment before ``one_to_many_steps`` (T1), one-to-one after (labeled and unlabeled)."""
        return ONE_TO_MANY if step < self.args.one_to_many_steps else ONE_TO_ONE

    def evaluation_stage(self) -> str:
        """The stage the current weights were last trained in (that of step ``state.step - 1``): an evaluation
        right after step T1 still sees a one-to-many model, whose duplicates need the one-to-many stage's NMS."""
        return self.stage(max(self.state.step - 1, 0))

    def compute_loss(self, labeled: dict, unlabeled: dict | None, stage: str) -> tuple[torch.Tensor, dict]:
        """Total loss of one micro-batch and its log values (see ``step.semi_supervised_loss``)."""
        return semi_supervised_loss(self.student, self.teacher.model, labeled, unlabeled, stage,
                                    self.args.unsup_weight, self.args.consistency_in_one_to_one,
                                    self.accelerator.autocast)

    def optimizer_step(self, labeled_batches, unlabeled_batches) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; then the EMA update.

        Divergence guard: when the gradient norm (after the all-reduce, so every process decides alike) is not
        finite, the step changes nothing — no AdamW update, no scheduler step, no EMA update, the student's
        BatchNorm statistics restored from the teacher's copy — and is counted; ``max_nonfinite_steps`` in a
        row stop training (:class:`DivergenceError`). Costs one host sync per step (reading the norm). With fp16
        mixed precision the GradScaler's own inf handling applies instead.
        """
        acc, args = self.accelerator, self.args
        stage, finite = self.stage(self.state.step), True
        for labeled, unlabeled in zip(labeled_batches, unlabeled_batches):
            with acc.accumulate(self.student):
                loss, logs = self.compute_loss(_to_device(labeled, acc.device), _to_device(unlabeled, acc.device),
                                               stage)
                if "pseudo_per_image" in logs:  # a host float (no sync)
                    self.state.pseudo_labels += logs["pseudo_per_image"]
                    self.state.pseudo_batches += 1
                if "pseudo_annotated" in logs:  # host floats
                    for i, key in enumerate(("pseudo_true_positives", "pseudo_labels", "pseudo_annotated")):
                        self.state.quality[i] += logs[key]
                acc.backward(loss)
                if acc.sync_gradients:
                    limit = args.max_grad_norm if args.max_grad_norm > 0 else math.inf
                    grad_norm = acc.clip_grad_norm_(self.student.parameters(), limit)
                    logs["grad_norm"] = float(grad_norm)  # the step's one host sync
                    # fp16 (a GradScaler): the scaler skips inf steps itself and lowers its scale, which needs
                    # optimizer.step(); its first steps are often inf by design, so they are not divergence
                    finite = math.isfinite(logs["grad_norm"]) or acc.scaler is not None
                if finite:
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        logs["stage"], logs["lr"] = stage, self.scheduler.get_last_lr()[0]
        if not finite:
            self._skip_nonfinite_step(logs)
            return logs
        self.state.nonfinite_in_a_row = 0
        self.scheduler.step()
        logs["ema_momentum"] = self.teacher.update(acc.unwrap_model(self.student).detector, self.state.step)
        return logs

    def _skip_nonfinite_step(self, logs: dict) -> None:
        """A step whose gradient norm is NaN/inf: undo the forward's BatchNorm statistics, count, maybe stop."""
        student = self.accelerator.unwrap_model(self.student).detector
        self.teacher.restore_buffers(student)
        self.state.nonfinite_in_a_row += 1
        self.state.skipped_steps.append(self.state.step)
        loss = logs.get("loss")
        logger.warning("step %d: gradient norm %s (loss %s): the update is skipped (%d in a row, %d in all)",
                       self.state.step, logs.get("grad_norm"), loss, self.state.nonfinite_in_a_row,
                       len(self.state.skipped_steps))
        if self.state.nonfinite_in_a_row >= self.args.max_nonfinite_steps:
            raise DivergenceError(
                f"training diverged: {self.state.nonfinite_in_a_row} steps in a row up to step {self.state.step} "
                f"had a non-finite loss or gradient norm (last loss {loss}); no update was applied and nothing "
                f"non-finite was saved. Likely causes: a learning rate too high for this model and batch "
                f"(--learning_rate {self.args.learning_rate}), no gradient clipping (--max_grad_norm), or broken "
                f"input data. Lower the learning rate or resume from the last checkpoint "
                f"(--resume_from_checkpoint latest).")

    # ------------------------------------------------------------------------------------------ loop
    def train(self) -> dict:
        args, acc = self.args, self.accelerator
        self._maybe_resume()
        if acc.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        acc.init_trackers("sparse_semi_detr", config=_scalars(args.to_dict()))
        labeled_loader, unlabeled_loader = self._loaders()
        labeled_iter = iter(labeled_loader)
        unlabeled_iter = iter(unlabeled_loader) if unlabeled_loader is not None else None
        progress = tqdm(total=args.max_steps, initial=self.state.step, desc="train",
                        disable=not acc.is_local_main_process)
        self.student.train()
        if args.eval_at_start and self.state.step == 0:
            self.evaluate_and_export()
        started, self.excluded_seconds, first_step = time.perf_counter(), 0.0, self.state.step
        while self.state.step < args.max_steps:
            micro = range(args.gradient_accumulation_steps)
            labeled = [next(labeled_iter) for _ in micro]
            unlabeled = [next(unlabeled_iter) if unlabeled_iter else None for _ in micro]
            logs = self.optimizer_step(labeled, unlabeled)
            progress.update(1)
            self._after_step(logs, progress)
        progress.close()
        _synchronize(acc.device)
        seconds = time.perf_counter() - started - self.excluded_seconds
        results = self._finish(seconds / max(1, self.state.step - first_step))
        acc.end_training()
        return results

    def _after_step(self, logs: dict, progress) -> None:
        args, step = self.args, self.state.step
        if step % args.logging_steps == 0 or step == args.max_steps:
            values = {k: float(v) for k, v in logs.items() if k != "stage"}
            values["one_to_many"] = float(logs["stage"] == ONE_TO_MANY)
            self.last_logs = values  # kept for results.json (pseudo-labels per image, refined queries kept, ...)
            progress.set_postfix({k: f"{values[k]:.3g}" for k in ("loss", "loss_sup", "loss_unsup") if k in values})
            self.accelerator.log(values, step=step)
        evaluate = step % args.eval_steps == 0 and step != args.max_steps
        checkpoint = step % args.checkpointing_steps == 0 and step != args.max_steps  # the last: after its evaluation
        if evaluate or checkpoint:  # kept out of the training time per step
            _synchronize(self.accelerator.device)
            started = time.perf_counter()
            if evaluate:
                self.evaluate_and_export()
            if checkpoint:
                self.checkpoints.save(self.accelerator, step, self.config)
            self.excluded_seconds += time.perf_counter() - started

    def _maybe_resume(self) -> None:
        """Remove what an interrupted save left; with ``--resume_from_checkpoint``, load ``latest`` (the newest
        complete checkpoint) or the given folder."""
        path, folder = self.args.resume_from_checkpoint, self.checkpoints
        if self.accelerator.is_main_process:
            folder.remove_partial()
        self.accelerator.wait_for_everyone()
        latest = folder.latest()
        if not path:
            if latest:
                logger.warning("checkpoints already in %s: this fresh run replaces any of the same step",
                               folder.root)
            return
        if path == "latest":
            if not latest:
                logger.warning("no complete checkpoint in %s: starting from scratch", folder.root)
                return
            path = latest
        self.accelerator.load_state(path)
        logger.info("resumed from %s at step %d", path, self.state.step)

    # ------------------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def predict(self, detectors: dict, stage: str, dataset=None, whole: bool = False) -> dict[str, list[dict]]:
        """This process's share of ``dataset`` (default: the validation set; ``whole``: all of it, no collective
        call) -> each detector's predictions in original-image pixels.

        ``detectors``: name -> model. Each batch is decoded once and run through every model. The random state
        (Python, NumPy, torch) is put back afterwards: an evaluation does not change the training that follows (a
        DataLoader draws its base seed from torch's generator), so the weights do not depend on ``--eval_steps``
        and a run resumed from a checkpoint saved after an evaluation ends as an uninterrupted one.
        """
        with preserved_random_state():
            return self._predict(detectors, stage, dataset, whole)

    def _predict(self, detectors: dict, stage: str, dataset, whole: bool) -> dict[str, list[dict]]:
        modes = {name: detector.training for name, detector in detectors.items()}
        predictions = {name: [] for name in detectors}
        for batch in self._val_batches(dataset, whole):
            batch = _to_device(batch, self.accelerator.device)
            sizes = torch.stack([label["orig_size"] for label in batch["labels"]])
            for name, detector in detectors.items():
                detector.eval()
                with torch.inference_mode(), self.accelerator.autocast():
                    outputs = detector(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
                results = self.processor.post_process_object_detection(
                    outputs, threshold=0.0, target_sizes=sizes, top_k=self.config.num_detections,
                    nms_threshold=self.nms_threshold(stage) or 1.0,
                )
                predictions[name].extend(self._prediction_records(batch["labels"], results))
        for name, detector in detectors.items():
            detector.train(modes[name])
        return predictions

    def nms_threshold(self, stage: str) -> float | None:
        """Class-wise NMS IoU of predictions in ``stage`` (``config.one_to_many_nms_iou``, 0.6, in the one-to-many
        stage when ``eval_nms_in_one_to_many``, as Semi-DETR evaluates; ``None``: no NMS)."""
        iou = self.config.one_to_many_nms_iou
        return iou if stage == ONE_TO_MANY and self.args.eval_nms_in_one_to_many and iou < 1.0 else None

    @staticmethod
    def _prediction_records(labels: list[dict], results: list[dict]) -> list[dict]:
        """Post-processed results of one batch -> host records ``{image_id, scores, labels, boxes}``."""
        return [{"image_id": int(label["image_id"]), **{k: v.float().cpu() for k, v in result.items()}}
                for label, result in zip(labels, results)]

    def evaluate(self, detectors: dict, stage: str, dataset=None, coco_gt: dict | None = None) -> dict[str, dict]:
        """COCO metrics of each detector (name -> model) on the whole validation set (or ``dataset`` with its
        ``coco_gt``), gathered over processes."""
        metrics, coco_gt = {}, self.coco_gt if coco_gt is None else coco_gt
        for name, predictions in self.predict(detectors, stage, dataset).items():
            unique = {p["image_id"]: p for p in gather_object(predictions)}
            result = [None]
            if self.accelerator.is_main_process:
                result = [evaluate_detections(_readable_ground_truth(coco_gt, set(unique)), list(unique.values()))]
            broadcast_object_list(result)
            metrics[name] = result[0]
        return metrics

    def evaluate_and_export(self) -> dict:
        """Evaluate student and teacher; export the better one if it beats the best so far. Before the first step
        (``--eval_at_start``) student and teacher are the same model: evaluated once."""
        stage = self.evaluation_stage()
        student = self.accelerator.unwrap_model(self.student).detector
        if self.state.step == 0:
            metrics = self.evaluate({"teacher": self.teacher.model}, stage)["teacher"]
            record = {"step": 0, "stage": stage, "student": metrics, "teacher": dict(metrics)}
        else:
            record = {"step": self.state.step, "stage": stage,
                      **self.evaluate({"student": student, "teacher": self.teacher.model}, stage)}
        rate = self.state.take_pseudo_label_rate()
        if rate is not None:
            record["pseudo_labels_per_image"] = rate
            record.update(self.state.take_pseudo_label_quality())
            self._warn_if_few_pseudo_labels(rate)
        self.state.history.append(record)
        self.accelerator.log({f"{who}/{k}": v for who in ("student", "teacher") for k, v in record[who].items()},
                             step=self.state.step)
        which = max(("teacher", "student"), key=lambda who: record[who]["AP"])
        if self.state.best is None or record[which]["AP"] > self.state.best["metrics"]["AP"]:
            self.state.best = {"step": self.state.step, "model": which, "metrics": record[which]}
            self.export(self.teacher.model if which == "teacher" else student, "best_model", record[which])
        logger.info("step %d: student AP %.4f, teacher AP %.4f", self.state.step, record["student"]["AP"],
                    record["teacher"]["AP"])
        return record

    def _warn_if_few_pseudo_labels(self, rate: float) -> None:
        if rate < FEW_PSEUDO_LABELS:
            logger.warning(
                "the teacher gave %.3f pseudo-labels per unlabeled image (score >= tau = %g) since the last "
                "evaluation: the unlabeled loss is almost only background and pushes the scores down. Lower "
                "--pseudo_label_threshold (benchmarks/pseudo_label_rate.py calibrates it without labels) or train "
                "the labeled burn-in longer (docs/training.md).", rate, self.config.pseudo_label_threshold)

    def export(self, detector, name: str, metrics: dict) -> None:
        """``save_pretrained`` of the model and its image processor and a model card into ``output_dir/name``
        (written aside, then swapped in: a crash leaves the previous complete export), then the Hub upload."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        folder = os.path.join(self.args.output_dir, name)
        temporary = f"{folder}.tmp"
        self._write_model(detector, temporary, self.args.hub_model_id or name, metrics)
        replace_folder(temporary, folder)
        if self.uploader is not None:
            self.uploader.push(folder, f"{name} at step {self.state.step} (AP {metrics['AP']:.4f})")

    def export_final(self, metrics: dict) -> None:
        """The final teacher into ``output_dir`` itself (``from_pretrained(output_dir)`` loads it, as after
        transformers' ``Trainer``): written aside, then each file moved into place with ``os.replace``."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        output_dir = self.args.output_dir
        temporary = os.path.join(output_dir, ".final_model.tmp")
        name = self.args.hub_model_id or os.path.basename(os.path.normpath(output_dir))
        self._write_model(self.teacher.model, temporary, name, metrics)
        for file_name in os.listdir(temporary):
            os.replace(os.path.join(temporary, file_name), os.path.join(output_dir, file_name))
        shutil.rmtree(temporary, ignore_errors=True)

    def _write_model(self, detector, folder: str, name: str, metrics: dict) -> None:
        """Weights (refused when not finite), config, remote code, image processor and model card into ``folder``."""
        _check_finite(detector, name)
        shutil.rmtree(folder, ignore_errors=True)
        detector.save_pretrained(folder)
        processor = copy.copy(self.processor)  # weights of the one-to-many stage duplicate: their users need NMS
        processor.nms_threshold = self.nms_threshold(self.evaluation_stage())
        processor.save_pretrained(folder)
        card = build_model_card(
            name, metrics, self.data.name, self.args.labeled_percent, _scalars(self.args.public_dict()),
            base_model=self.base_model_id(), dataset_id=self.args.dataset_name,
        )
        card.save(os.path.join(folder, "README.md"))

    def base_model_id(self) -> str | None:
        """The Hub id training started from (``--model_name_or_path``), or None for a local folder or scratch."""
        start = self.args.model_name_or_path
        return None if not start or looks_like_local_path(start) else start

    def evaluate_test(self) -> dict | None:
        """The final student and teacher on the held-out test set (``--synthetic_num_test`` /
        ``--test_images``), or None without one."""
        if self.data.test is None:
            return None
        student = self.accelerator.unwrap_model(self.student).detector
        metrics = self.evaluate({"student": student, "teacher": self.teacher.model}, self.evaluation_stage(),
                                self.data.test, coco_ground_truth_from_dataset(self.data.test))
        logger.info("test set (%d images), step %d: student AP %.4f, teacher AP %.4f", len(self.data.test),
                    self.state.step, metrics["student"]["AP"], metrics["teacher"]["AP"])
        return {"step": self.state.step, "images": len(self.data.test), **metrics}

    def write_detection_picture(self, path: str) -> None:
        """The teacher's detections on the first validation images beside their ground truth, as a PNG."""
        if not self.accelerator.is_main_process or not self.args.detection_picture_images:
            return
        subset = self.data.val.select(range(min(self.args.detection_picture_images, len(self.data.val))))
        stage = self.evaluation_stage()
        predictions = self.predict({"teacher": self.teacher.model}, stage, subset, whole=True)["teacher"]
        save_detection_grid(subset, predictions, self.data.id2label, path,
                            threshold=self.args.detection_picture_threshold)
        logger.info("teacher detections on %d validation images: %s", len(subset), path)

    def _final_evaluation(self) -> dict:
        """The evaluation of the last step, then its checkpoint, so a run resumed from that checkpoint (to train
        longer) keeps it in its history and its best model; resumed with nothing left to train, the saved record."""
        history = self.state.history
        if history and history[-1]["step"] == self.state.step and self.state.step > 0:
            return history[-1]
        record = self.evaluate_and_export()
        self.checkpoints.save(self.accelerator, self.state.step, self.config)
        return record

    def _finish(self, seconds_per_step: float) -> dict:
        record = self._final_evaluation()
        results = {"final": record, "best": self.state.best, "history": self.state.history,
                   "seconds_per_step": seconds_per_step, "steps": self.state.step, "args": self.args.to_dict(),
                   "last_logged": getattr(self, "last_logs", {}), "skipped_steps": self.state.skipped_steps,
                   "device": str(self.accelerator.device), "num_processes": self.accelerator.num_processes}
        test = self.evaluate_test()
        if test is not None:
            results["test"] = test
        self.export_final(record["teacher"])
        if self.accelerator.is_main_process:
            self._write_results(results)  # before the picture: nothing after the last evaluation may cost it
        self.write_detection_picture(os.path.join(self.args.output_dir, "teacher_detections.png"))
        if self.accelerator.is_main_process:
            if self.uploader is not None:  # written first: a hanging upload must not cost the results
                results["hub_upload_ok"] = self.uploader.finish(timeout=self.args.hub_upload_timeout)
                results["hub_errors"] = list(self.uploader.errors)
                self._write_results(results)
        return results

    def _write_results(self, results: dict) -> None:
        atomic_write_text(os.path.join(self.args.output_dir, "results.json"), json.dumps(results, indent=2, default=str))


def _check_writable(output_dir: str) -> None:
    """Fail before any training when ``output_dir`` cannot be created or written (not at the first save)."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise PermissionError(f"--output_dir {output_dir} is not writable: {err}") from err


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Estimated size of one checkpoint: student weights, AdamW's two moments, the EMA teacher (4x the weights)."""
    return 4 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _warn_if_low_disk(output_dir: str, model: torch.nn.Module, keep: int) -> None:
    """Warn before training when ``output_dir``'s disk cannot hold the checkpoints the run will keep (``keep`` plus
    the one being written) and the exported model: a full disk would otherwise surface at the first save."""
    needed = checkpoint_bytes(model) * (max(keep, 1) + 1) + checkpoint_bytes(model) // 4
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        logger.warning("only %.1f MiB free on the disk of --output_dir %s; the checkpoints this run keeps "
                       "(--checkpoints_total_limit %d, plus the one being written) and the exported model need "
                       "about %.1f MiB", free / 2**20, output_dir, keep, needed / 2**20)


def _check_finite(model: torch.nn.Module, name: str) -> None:
    """Refuse to export a model with a NaN/inf parameter or buffer (names the first few)."""
    bad = [key for key, tensor in model.state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ValueError(f"refusing to export {name}: {len(bad)} tensors are not finite, e.g. {bad[:3]}")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scalars(settings: dict) -> dict:
    """The settings that trackers and model cards can store (numbers, strings, booleans)."""
    return {k: v for k, v in settings.items()
            if isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and math.isnan(v))}


def _random_view_batch(batch: int, height: int, width: int, boxes: int, num_labels: int, device) -> dict:
    """A labeled batch of random images with ``boxes`` random targets each (for benchmarks)."""
    centres = torch.rand(batch, boxes, 2, device=device) * 0.6 + 0.2
    sizes = torch.rand(batch, boxes, 2, device=device) * 0.2 + 0.05
    labels = [{"class_labels": torch.randint(0, num_labels, (boxes,), device=device),
               "boxes": torch.cat((centres[i], sizes[i]), -1)} for i in range(batch)]
    return {"pixel_values": torch.randn(batch, 3, height, width, device=device),
            "pixel_mask": torch.ones(batch, height, width, dtype=torch.long, device=device), "labels": labels}


def build_benchmark_step(config_kwargs: dict, device, labeled: int = 1, unlabeled: int = 4, height: int = 800,
                         width: int = 1088, pseudo_per_image: int = 10, stage: str = ONE_TO_ONE,
                         autocast_dtype: torch.dtype | None = None):
    """One full semi-supervised optimizer step on random data, for timing (``benchmarks/bench_model.py``).

    The (untrained) teacher's pseudo-labels are forced to ``pseudo_per_image`` boxes per image (threshold 0,
    top ``pseudo_per_image`` pairs), so the unsupervised loss, RPF and the query modules all run.
    Returns ``(step_fn, student_images_per_step)``; ``step_fn()`` runs teacher, student, backward, AdamW, EMA.
    """
    kwargs = dict(config_kwargs, pseudo_label_threshold=0.0, num_detections=pseudo_per_image)
    detector = SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**kwargs)).to(device).train()
    teacher = EMATeacher(detector)
    student = SemiSupervisedStudent(detector)
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4, weight_decay=1e-4)
    labeled_batch = _random_view_batch(labeled, height, width, pseudo_per_image, detector.config.num_labels, device)
    views = _random_view_batch(unlabeled, height, width, 0, 1, device)
    sizes = torch.tensor([[height, width]] * unlabeled)
    unlabeled_batch = {"weak_pixel_values": views["pixel_values"], "weak_pixel_mask": views["pixel_mask"],
                       "strong_pixel_values": views["pixel_values"].flip(-1), "strong_pixel_mask": views["pixel_mask"],
                       "weak_to_strong": torch.tensor([[-1.0, 0, width], [0, 1, 0], [0, 0, 1]],
                                                      device=device).expand(unlabeled, 3, 3),
                       "weak_sizes": sizes, "strong_sizes": sizes}
    device_type = torch.device(device).type

    def autocast():
        return torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    state = {"step": 0}

    def step_fn() -> dict:
        with autocast():
            loss, logs = semi_supervised_loss(student, detector_teacher, labeled_batch, unlabeled_batch, stage, 4.0,
                                              autocast=autocast)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(detector.parameters(), 0.1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        teacher.update(detector, state["step"])
        return logs

    detector_teacher = teacher.model
    return step_fn, labeled + unlabeled
