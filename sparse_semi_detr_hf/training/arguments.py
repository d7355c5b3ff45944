"""Trainer settings: one dataclass, from which ``examples/train_ssod.py`` builds its command line.

Model and loss settings live in ``SparseSemiDetrConfig``; the fields below marked "model" are passed into it
(``None`` keeps the config's / preset's value), so every paper knob is one flag away.
With no dataset named, the ``synthetic`` preset fills the unset fields with a small CPU-friendly setup.
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from .secrets import public_settings, redact_settings

# The strong-teacher benchmark's generator settings (SyntheticConfig overrides).
BENCHMARK_SYNTHETIC = ("num_classes=3,image_size=112:144,radius_range=8:36,objects_per_image=2:6,"
                       "distractors_per_image=0:2,clutter=0.3,distractor_combo_prob=0.0")

# The demo's unsupervised weight: chosen on the benchmark's validation set (docs/results.md).
DEMO_UNSUP_WEIGHT = 1.0

PRESETS = {
    # The embedded demo (README's main command): the shipped supervised burn-in (``demo_burnin``, a tiny detector
    # trained on the 40 labeled images) continued with the 360 unlabeled ones on the benchmark's generator, a few
    # minutes on a 2-core CPU. Without the burn-in (``--demo_burnin false`` or any architecture flag) the same
    # detector trains from scratch.
    "synthetic": dict(
        max_steps=500, one_to_many_steps=500, eval_steps=250, checkpointing_steps=500, learning_rate=5e-4,
        ema_momentum=0.995, backbone="test_resnet", backbone_frozen_stages=0, freeze_backbone_batch_norm=False,
        d_model=32, encoder_layers=2,
        decoder_layers=2, ffn_dim=128, num_queries=40, num_denoising_queries=20, num_detections=50,
        image_scales="96,112,128", max_image_size=160, eval_image_size=112, synthetic_num_train=400,
        synthetic_num_val=60, labeled_percent=10.0, qrm_reduced_dim=16, attention_heads=4,
        synthetic_overrides=BENCHMARK_SYNTHETIC, pseudo_label_threshold=0.4,
        # a randomly initialised backbone needs the full learning rate and looser clipping
        backbone_lr_multiplier=1.0, max_grad_norm=1.0, labeled_batch_size=2, unlabeled_batch_size=4,
        unsup_weight=DEMO_UNSUP_WEIGHT,
    ),
    # The paper's setting (COCO-Partial): DINO-R50, 120k steps, one-to-many for the first 60k.
    # The strong-teacher benchmark of docs/results.md (issue: a regime where pseudo-labels are mostly right):
    # an easier generator (3 classes, fewer distractors, less clutter, radii 8-36 px: small objects present),
    # ResNet-10-T from scratch, d_model 64, 2 + 2 layers, views 96-128 px; validation 150 + test 300 images.
    "synthetic_benchmark": dict(
        max_steps=3000, one_to_many_steps=3000, eval_steps=500, checkpointing_steps=500, learning_rate=5e-4,
        ema_momentum=0.995, backbone="resnet10t", backbone_frozen_stages=0, freeze_backbone_batch_norm=False,
        d_model=64, encoder_layers=2,
        decoder_layers=2, ffn_dim=256, num_queries=60, num_denoising_queries=30, num_detections=100,
        image_scales="96,112,128", max_image_size=160, eval_image_size=112, synthetic_num_train=400,
        synthetic_num_val=150, synthetic_num_test=300, labeled_percent=10.0, qrm_reduced_dim=32, attention_heads=8,
        backbone_lr_multiplier=1.0, max_grad_norm=1.0, synthetic_overrides=BENCHMARK_SYNTHETIC,
        labeled_batch_size=4, unlabeled_batch_size=4, unsup_weight=4.0,
    ),
    "paper": dict(
        max_steps=120_000, one_to_many_steps=60_000, eval_steps=4000, checkpointing_steps=4000, learning_rate=1e-4,
        ema_momentum=0.999, backbone="resnet50.tv_in1k", backbone_frozen_stages=1, freeze_backbone_batch_norm=True,
        d_model=256, encoder_layers=6,
        decoder_layers=6, ffn_dim=2048, num_queries=900, num_denoising_queries=100, num_detections=300,
        image_scales="480,512,544,576,608,640,672,704,736,768,800", max_image_size=1333, eval_image_size=800,
        synthetic_num_train=2000, synthetic_num_val=200, labeled_percent=10.0, qrm_reduced_dim=64,
        attention_heads=8, backbone_lr_multiplier=0.1, max_grad_norm=0.1, labeled_batch_size=1,
        unlabeled_batch_size=4, unsup_weight=4.0,
    ),
}

# Loss / method settings among them: a continued model takes these from its saved config unless given on the
# command line, and the trainer warns when a saved value differs from the package default.
METHOD_FIELDS = (
    "use_rpf", "rpf_groups", "rpf_topk", "rpf_jitter", "rpf_duplicate_iou", "rpf_joint_matching",
    "rpf_ignore_duplicates", "pseudo_label_threshold", "pseudo_label_mean_std_filter", "one_to_many_nms_iou",
    "one_to_many_topk", "box_noise_scale", "label_noise_ratio", "class_loss_coefficient",
    "consistency_loss_coefficient",
)
# Trainer fields that are SparseSemiDetrConfig fields of the same name.
MODEL_FIELDS = (
    "backbone", "backbone_frozen_stages", "freeze_backbone_batch_norm", "d_model", "encoder_layers",
    "decoder_layers", "num_queries", "num_denoising_queries", "num_detections", "query_mode", "qrm_attention_on",
    "qrm_use_similarity", "qrm_similarity_threshold", "qrm_reduced_dim", "qrm_mlp_projector",
    "deformable_attention_backend", *METHOD_FIELDS,
)

QUERY_MODES = ("none", "cross_view", "refined")
LR_SCHEDULERS = ("constant", "linear", "cosine")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")

# Trainer fields that change the detector's architecture.
ARCHITECTURE_FIELDS = (
    "backbone", "d_model", "encoder_layers", "decoder_layers", "ffn_dim", "attention_heads", "num_queries",
    "num_denoising_queries", "qrm_reduced_dim", "config_overrides",
)
# The supervised burn-in shipped with the package: the embedded demo's starting point (docs/results.md,
# "The main job"; remade by benchmarks/make_demo_burnin.sh).
DEMO_BURNIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_burnin")

# Trainer fields that name local files or folders: never shown in a public model card.
PATH_FIELDS = (
    "output_dir", "train_images", "train_annotations", "unlabeled_images", "val_images", "val_annotations",
    "test_images", "test_annotations", "labeled_ids_file", "synthetic_cache_dir", "resume_from_checkpoint",
)


@dataclass
class TrainingArguments:
    """Settings of ``examples/train_ssod.py``. ``None`` means "from the preset" (or the model config)."""

    output_dir: str = field(default="outputs/sparse-semi-detr", metadata={"help": "Where everything is written."})
    preset: str | None = field(default=None, metadata={"choices": tuple(PRESETS), "help": "synthetic | synthetic_benchmark | paper (default: synthetic without a "
                                                                 "dataset, paper with one)."})
    seed: int = field(default=42, metadata={"help": "Seed of data order, views, initialisation and noise."})
    # ---------------------------------------------------------------- data
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (objects.bbox COCO xywh, "
                                                                       "objects.category)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_split: str = field(default="train", metadata={"help": "Hub split for training."})
    validation_split: str = field(default="validation", metadata={
        "help": "Hub split for evaluation. A dataset without it (e.g. train/test only) gets one carved off the "
                "training split (--train_val_split)."})
    train_val_split: float = field(default=0.15, metadata={
        "help": "Share of the training split held out for evaluation when the dataset has no --validation_split."})
    bbox_format: str = field(default="xywh", metadata={
        "choices": ("xywh", "xyxy", "cxcywh"),
        "help": "Box format of a Hub dataset's objects.bbox, absolute pixels (COCO: xywh). Boxes that do not fit "
                "their images under it stop the run with an error."})
    train_images: str | None = field(default=None, metadata={"help": "Folder of labeled images (COCO)."})
    train_annotations: str | None = field(default=None, metadata={"help": "COCO instances json of train_images."})
    unlabeled_images: str | None = field(default=None, metadata={"help": "Folder of unlabeled images, or a COCO "
                                                                         "json whose annotations are ignored."})
    val_images: str | None = field(default=None, metadata={"help": "Folder of validation images (COCO)."})
    val_annotations: str | None = field(default=None, metadata={"help": "COCO instances json of val_images."})
    test_images: str | None = field(default=None, metadata={"help": "Folder of held-out test images (COCO), "
                                                                   "evaluated once at the end, never used to choose."})
    test_annotations: str | None = field(default=None, metadata={"help": "COCO instances json of test_images."})
    labeled_percent: float | None = field(default=None, metadata={"help": "COCO-Partial: percent of the train "
                                                                            "set kept labeled; the rest is unlabeled "
                                                                            "(100 = all labeled; the default with "
                                                                            "--unlabeled_images)."})
    fold: int = field(default=1, metadata={"help": "COCO-Partial fold (changes the split)."})
    labeled_ids_file: str | None = field(default=None, metadata={"help": "File of labeled image ids (overrides "
                                                                          "labeled_percent)."})
    stream_unlabeled: bool = field(default=False, metadata={"help": "Stream the unlabeled set (100k+ images)."})
    synthetic_num_train: int | None = field(default=None, metadata={"help": "Synthetic train images."})
    synthetic_num_val: int | None = field(default=None, metadata={"help": "Synthetic validation images."})
    synthetic_num_test: int | None = field(default=None, metadata={"help": "Synthetic held-out test images (own "
                                                                           "random stream), evaluated at the end."})
    synthetic_cache_dir: str | None = field(default=None, metadata={"help": "Save/reuse the generated synthetic "
                                                                            "set here (datasets save_to_disk)."})
    synthetic_overrides: str | None = field(default=None, metadata={"help": "SyntheticConfig difficulty knobs, "
                                                                            "'k=v,k=lo:hi' (e.g. 'num_classes=6,"
                                                                            "radius_range=6:28,clutter=0.5')."})
    view_overrides: str | None = field(default=None, metadata={
        "help": "Other ViewConfig fields of the training views, 'k=v,k=lo:hi' (e.g. 'rotate_degrees=15,"
                "shear_degrees=0,erase_patches=0:2,flip_prob=0.5'; lists: 'colour_ops=identity:equalize')."})
    image_scales: str | None = field(default=None, metadata={"help": "Comma-separated training short sides."})
    max_image_size: int | None = field(default=None, metadata={"help": "Longest side of training views."})
    eval_image_size: int | None = field(default=None, metadata={"help": "Short side of evaluation views."})
    num_workers: int = field(default=2, metadata={"aliases": ["--dataloader_num_workers"],
                                                  "help": "DataLoader workers per process."})
    # ---------------------------------------------------------------- schedule
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps."})
    one_to_many_steps: int | None = field(default=None, metadata={"help": "T1: steps of one-to-many assignment "
                                                                            "before the switch to one-to-one."})
    labeled_batch_size: int | None = field(default=None, metadata={
        "aliases": ["--per_device_train_batch_size"], "help": "Labeled images per process and step."})
    unlabeled_batch_size: int | None = field(default=None, metadata={"help": "Unlabeled images per process and "
                                                                              "step."})
    supervised_only: bool = field(default=False, metadata={"help": "Baseline: no unlabeled data."})
    learning_rate: float | None = field(default=None, metadata={"help": "AdamW learning rate."})
    backbone_lr_multiplier: float | None = field(default=None, metadata={"help": "Backbone lr = lr x this "
                                                                                    "(paper 0.1)."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Gradient clipping norm (paper 0.1; "
                                                                         "0 = off)."})
    lr_warmup_steps: int = field(default=0, metadata={"aliases": ["--num_warmup_steps", "--warmup_steps"],
                                                      "help": "Linear warm-up steps (paper: 0)."})
    lr_scheduler_type: str = field(default="constant", metadata={
        "choices": LR_SCHEDULERS, "help": "Learning-rate schedule after the warm-up (the paper: constant)."})
    num_train_epochs: float | None = field(default=None, metadata={
        "help": "Not supported: this trainer counts optimizer steps (--max_steps), since labeled and unlabeled "
                "batches are drawn endlessly; an error names the steps one epoch of the labeled split takes."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_nonfinite_steps: int = field(default=5, metadata={
        "help": "Steps in a row with a non-finite loss / gradient norm (each skipped: no update) before training "
                "stops with an error."})
    ema_momentum: float | None = field(default=None, metadata={"help": "Maximum EMA momentum of the teacher."})
    ema_warmup: bool | None = field(default=None, metadata={
        "help": "EMA momentum warm-up 1 - 1/(step+1) (Semi-DETR, untrained start). Default: on when training from "
                "scratch, off (constant --ema_momentum) with --model_name_or_path, whose trained teacher the "
                "warm-up would replace by the student's first steps."})
    unsup_weight: float | None = field(default=None, metadata={
        "help": "Weight of the unsupervised loss (the paper: 4.0; 2.0 COCO-Full)."})
    consistency_in_one_to_one: bool = field(default=True, metadata={"help": "Keep the query consistency loss "
                                                                             "after T1 (Semi-DETR's code drops it)."})
    # ---------------------------------------------------------------- model (None: config / preset default)
    model_name_or_path: str | None = field(default=None, metadata={"help": "Start from a saved model."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where Hub models and datasets are cached "
                                                                   "(default: the Hugging Face cache)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a Hub dataset's or model's own code."})
    ignore_mismatched_sizes: bool = field(default=True, metadata={
        "help": "Re-initialise weights whose shape differs in --model_name_or_path (a new label set: the class "
                "heads). Default true here, unlike transformers' examples: a detector is usually fine-tuned on "
                "other classes; false makes a mismatch an error."})
    demo_burnin: bool | None = field(default=None, metadata={
        "help": "Start from the small supervised burn-in model shipped with the package (the embedded demo). "
                "Default: on with the synthetic preset when no model, architecture flag or synthetic_overrides is "
                "given; false trains from scratch."})
    pretrained_backbone: bool = field(default=False, metadata={"help": "Load timm's ImageNet backbone weights."})
    backbone: str | None = field(default=None, metadata={"help": "timm backbone name."})
    backbone_frozen_stages: int | None = field(default=None, metadata={
        "help": "Backbone stages not trained: 0 none, 1 stem + layer1 (DINO, for an ImageNet start)."})
    freeze_backbone_batch_norm: bool | None = field(default=None, metadata={"help": "Frozen BN in the backbone."})
    d_model: int | None = field(default=None, metadata={"help": "Transformer width."})
    encoder_layers: int | None = field(default=None, metadata={"help": "Encoder layers."})
    decoder_layers: int | None = field(default=None, metadata={"help": "Decoder layers."})
    ffn_dim: int | None = field(default=None, metadata={"help": "Encoder and decoder FFN width."})
    attention_heads: int | None = field(default=None, metadata={"help": "Encoder and decoder heads."})
    num_queries: int | None = field(default=None, metadata={"help": "Matching queries."})
    num_denoising_queries: int | None = field(default=None, metadata={"help": "Denoising budget."})
    num_detections: int | None = field(default=None, metadata={"help": "Detections kept per image."})
    query_mode: str | None = field(default=None, metadata={"choices": QUERY_MODES,
                                                           "help": "none | cross_view (Semi-DETR) | refined "
                                                                     "(Sparse Semi-DETR)."})
    use_rpf: bool | None = field(default=None, metadata={"help": "Reliable Pseudo-Label Filtering."})
    rpf_groups: int | None = field(default=None, metadata={"help": "RPF m."})
    rpf_topk: int | None = field(default=None, metadata={"help": "RPF k."})
    rpf_jitter: float | None = field(default=None, metadata={"help": "RPF jitter of augmented copies."})
    rpf_duplicate_iou: float | None = field(default=None, metadata={"help": "RPF duplicate IoU."})
    rpf_joint_matching: bool | None = field(default=None, metadata={
        "help": "RPF: match the m groups of pseudo-labels in one assignment (distinct predictions per copy; "
                "default) or each group separately (false)."})
    rpf_ignore_duplicates: bool | None = field(default=None, metadata={
        "help": "RPF: candidates outside a pseudo-box's top-k get no classification loss (default) or are "
                "background (false; ablation)."})
    pseudo_label_threshold: float | None = field(default=None, metadata={"help": "Teacher score threshold tau."})
    pseudo_label_mean_std_filter: bool | None = field(default=None, metadata={
        "help": "Semi-DETR's adaptive pre-filter: a pseudo-label also needs score >= mean + std of its image."})
    one_to_many_nms_iou: float | None = field(default=None, metadata={
        "help": "Class-wise NMS IoU in the one-to-many stage: pseudo-labels, evaluation, exported processor "
                "(1.0 = none)."})
    qrm_attention_on: str | None = field(default=None, metadata={"choices": ("low", "high", "both", "none"),
                                                                 "help": "QRM attention: low|high|both|none."})
    qrm_use_similarity: bool | None = field(default=None, metadata={"help": "QRM similarity step."})
    qrm_similarity_threshold: float | None = field(default=None, metadata={"help": "QRM similarity threshold."})
    qrm_reduced_dim: int | None = field(default=None, metadata={"help": "QRM reduced channels."})
    qrm_mlp_projector: bool | None = field(default=None, metadata={
        "help": "QRM ablation (paper Table 5(c)): Semi-DETR's projector convolutions on both RoI sets first."})
    consistency_loss_coefficient: float | None = field(default=None, metadata={"help": "Query consistency weight."})
    one_to_many_topk: int | None = field(default=None, metadata={"help": "One-to-many positives per target."})
    box_noise_scale: float | None = field(default=None, metadata={"help": "Denoising box noise."})
    label_noise_ratio: float | None = field(default=None, metadata={"help": "Denoising label noise."})
    class_loss_coefficient: float | None = field(default=None, metadata={"help": "Focal loss weight."})
    deformable_attention_backend: str | None = field(default=None, metadata={
        "choices": ("auto", "pytorch", "triton"), "help": "auto | pytorch | triton."})
    config_overrides: str | None = field(default=None, metadata={"help": "Other config fields: 'k=v,k=v'."})
    # ---------------------------------------------------------------- evaluation, checkpoints, logging, Hub
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (and at the end)."})
    eval_batch_size: int = field(default=4, metadata={"aliases": ["--per_device_eval_batch_size"],
                                                      "help": "Evaluation images per process."})
    eval_at_start: bool | None = field(default=None, metadata={
        "help": "Evaluate before the first step (the start AP). Default: on when starting from a trained model."})
    detection_picture_images: int = field(default=6, metadata={
        "help": "Validation images in output_dir/teacher_detections.png (teacher vs ground truth; 0 = none)."})
    detection_picture_threshold: float = field(default=0.3, metadata={"help": "Score threshold of that picture."})
    eval_nms_in_one_to_many: bool = field(default=True, metadata={"help": "Class-wise NMS when evaluating in the "
                                                                           "one-to-many stage."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save the training state every N."})
    checkpoints_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N steps."})
    report_to: str = field(default="none", metadata={"help": "none | all | a tracker (tensorboard, wandb, ...) or "
                                                             "a comma-separated list."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload every saved model to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id (user/name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / login)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repo private."})
    hub_upload_timeout: float = field(default=600.0, metadata={
        "help": "Seconds the end of training waits for pending Hub uploads (they run on a background thread; "
                "results.json is written first either way)."})

    def __post_init__(self):
        if self.preset is None:
            self.preset = "synthetic" if self.is_synthetic else "paper"
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not one of {sorted(PRESETS)}")
        self.user_model_fields = {name for name in MODEL_FIELDS if getattr(self, name) is not None}
        if self.demo_burnin is None:
            self.demo_burnin = (self.preset == "synthetic" and self.model_name_or_path is None
                                and self.synthetic_overrides is None and not self._architecture_flags())
        if self.demo_burnin:
            if self.model_name_or_path is not None:
                raise ValueError("demo_burnin and model_name_or_path both name a starting model; give one.")
            self.model_name_or_path = DEMO_BURNIN_DIR
        if self.labeled_percent is None and self.unlabeled_images:  # the unlabeled images come from the folder:
            self.labeled_percent = 100.0  # every annotated image is labeled (the preset's 10 % would drop 90 %)
        for name, value in PRESETS[self.preset].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.ema_warmup is None:
            self.ema_warmup = self.model_name_or_path is None
        if self.eval_at_start is None:
            self.eval_at_start = self.model_name_or_path is not None
        self._validate()

    def _architecture_flags(self) -> list[str]:
        """Architecture settings given on the command line (they rule out the shipped demo burn-in)."""
        return [name for name in ARCHITECTURE_FIELDS if getattr(self, name) is not None]

    @property
    def is_synthetic(self) -> bool:
        """No dataset named: train on the embedded synthetic set."""
        return not (self.dataset_name or self.train_annotations)

    def _validate(self) -> None:
        if self.train_images and not self.train_annotations:
            raise ValueError("train_images needs train_annotations (a COCO instances json).")
        if bool(self.val_images) != bool(self.val_annotations):
            raise ValueError("val_images and val_annotations go together.")
        if self.fold < 0:
            raise ValueError(f"--fold must be >= 0, got {self.fold}.")
        try:
            scales = self.training_scales
        except ValueError as err:
            raise ValueError(f"--image_scales must be comma-separated integers, got {self.image_scales!r}.") from err
        if not scales or min(scales) < 1:
            raise ValueError(f"--image_scales must be positive, got {self.image_scales!r}.")
        if not 0 < self.train_val_split < 1:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}.")
        if bool(self.test_images) != bool(self.test_annotations):
            raise ValueError("test_images and test_annotations go together.")
        if self.push_to_hub and not self.hub_model_id:
            raise ValueError("push_to_hub needs hub_model_id.")
        if not 0 < self.labeled_percent <= 100:
            raise ValueError(f"labeled_percent must be in (0, 100], got {self.labeled_percent}.")
        if self.max_steps < 1 or self.one_to_many_steps < 0:
            raise ValueError("max_steps must be >= 1 and one_to_many_steps >= 0.")
        if self.num_train_epochs is not None:
            raise ValueError("--num_train_epochs is not supported: this trainer counts optimizer steps; use "
                             "--max_steps (one pass over the labeled split is about len(labeled) / "
                             "(--labeled_batch_size x processes) steps).")
        for name in ("max_steps", "eval_steps", "checkpointing_steps", "logging_steps", "gradient_accumulation_steps",
                     "labeled_batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        unknown = set(self.report_to.split(",")) - {"none", "all", *TRACKERS}
        if unknown:
            raise ValueError(f"--report_to: unknown tracker(s) {sorted(unknown)}; use none, all or some of "
                             f"{', '.join(TRACKERS)}.")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}.")
        if self.labeled_batch_size < 1 or (self.unlabeled_batch_size < 1 and not self.supervised_only):
            raise ValueError("batch sizes must be >= 1.")
        self.view_config()  # a wrong --view_overrides stops here, before any data is read

    def view_config(self):
        """The ``ViewConfig`` of the training and evaluation views (scales, sizes and ``--view_overrides``)."""
        from .transforms import ViewConfig

        return ViewConfig(**{"scales": self.training_scales, "max_size": self.max_image_size,
                             "eval_scale": self.eval_image_size, **parse_view_overrides(self.view_overrides)})

    @property
    def training_scales(self) -> tuple[int, ...]:
        return tuple(int(s) for s in str(self.image_scales).split(","))

    def model_config_kwargs(self) -> dict:
        """The ``SparseSemiDetrConfig`` keyword arguments these settings imply (with ``model_name_or_path``, only
        the fields set on the command line, so a saved architecture is not overwritten by the preset)."""
        names = self.user_model_fields if self.model_name_or_path else MODEL_FIELDS
        kwargs = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.model_name_or_path:
            kwargs.update(parse_overrides(self.config_overrides))
            return kwargs
        if self.ffn_dim is not None:
            kwargs.update(encoder_ffn_dim=self.ffn_dim, decoder_ffn_dim=self.ffn_dim)
        if self.attention_heads is not None:
            kwargs.update(encoder_attention_heads=self.attention_heads, decoder_attention_heads=self.attention_heads)
        if self.d_model is not None and self.d_model < 128:
            kwargs.setdefault("neck_group_norm_groups", 8)
        kwargs.update(parse_overrides(self.config_overrides))
        return kwargs

    def to_dict(self) -> dict:
        """Every setting, with secrets masked (``hub_token`` -> ``"<HUB_TOKEN>"``, credentials in URLs, the value
        of ``HF_TOKEN``): what results.json and trackers store."""
        return redact_settings({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def public_dict(self) -> dict:
        """The settings a public model card may show: :meth:`to_dict` without secrets, local paths and unset
        values."""
        return public_settings({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                               path_names=PATH_FIELDS)


class _RealDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only for real defaults; ``None`` ones are described by :func:`document_defaults`."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def document_defaults(parser) -> None:
    """Append to each flag's ``--help`` the default it really gets: the presets' values for the flags presets
    fill, the model config's for model settings (their dataclass default is ``None``, which says nothing)."""
    parser.formatter_class = _RealDefaultsFormatter
    for action in parser._actions:
        by_preset = {name: preset[action.dest] for name, preset in PRESETS.items() if action.dest in preset}
        if by_preset:
            values = ", ".join(f"{name}: {value}" for name, value in by_preset.items())
            action.help = f"{action.help or ''} [default by preset: {values}]".replace("%", "%%")
        elif action.dest in MODEL_FIELDS and action.default is None:
            action.help = f"{action.help or ''} [default: the model config's value]"


def parse_overrides(text: str | None) -> dict:
    """``"a=1,b=true,c=low"`` -> ``{"a": 1, "b": True, "c": "low"}`` (ints, floats, booleans, strings)."""
    result = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        if "=" not in item:
            raise ValueError(f"config override {item!r} is not 'key=value'.")
        key, raw = (s.strip() for s in item.split("=", 1))
        result[key] = _parse_value(raw)
    return result


def parse_synthetic_overrides(text: str | None) -> dict:
    """``"num_classes=6,image_size=112:144"`` -> ``{"num_classes": 6, "image_size": (112, 144)}`` (``lo:hi`` is a
    range; the keys are checked by ``SyntheticConfig``)."""
    from .synthetic import SyntheticConfig

    return parse_dataclass_overrides(text, SyntheticConfig, "synthetic_overrides")


def parse_view_overrides(text: str | None) -> dict:
    """``"rotate_degrees=15,erase_patches=0:2,colour_ops=identity:equalize"`` -> ``ViewConfig`` keyword arguments
    (``a:b`` is a tuple; a single value of a tuple field becomes a one-element tuple)."""
    from .transforms import ViewConfig

    tuple_fields = {f.name for f in dataclasses.fields(ViewConfig) if isinstance(f.default, tuple)}
    result = parse_dataclass_overrides(text, ViewConfig, "view_overrides")
    return {key: (value,) if key in tuple_fields and not isinstance(value, tuple) else value
            for key, value in result.items()}


def parse_dataclass_overrides(text: str | None, cls, flag: str) -> dict:
    """``'k=v,k=lo:hi'`` -> keyword arguments of the dataclass ``cls``; an unknown key is an error naming ``flag``."""
    known = {f.name for f in dataclasses.fields(cls)}
    result = {}
    for key, value in parse_overrides(text).items():
        if key not in known:
            raise ValueError(f"{flag}: unknown field {key!r}; known: {sorted(known)}")
        if isinstance(value, str) and ":" in value:
            value = tuple(_parse_value(part) for part in value.split(":"))
        result[key] = value
    return result


def _parse_value(raw: str):
    lowered = raw.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
