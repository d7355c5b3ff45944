"""One semi-supervised training step: the teacher pass (once per step, inference mode) and the student pass.

Per step (SPEC §2-§4):
1. The teacher encodes the weak view ONCE; its decoder gives pseudo-labels (score >= tau, class-wise NMS in
   the one-to-many stage) that are mapped into the strong view; the same encoder features give the RoIs of
   the query module (Semi-DETR's cross-view queries or Sparse Semi-DETR's refined queries).
2. The student (``SemiSupervisedStudent``, the module that DDP wraps) runs the labeled batch and the strong
   view with the extra query group, in one ``forward``.
3. The teacher decodes the same group on its cached encoder state; the consistency loss ties both.
"""

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..box_ops import box_xyxy_to_cxcywh
from ..query_groups import QueryGroup
from ..query_refinement import (
    RefinedQueries,
    boxes_to_rois,
    cross_view_query_groups,
    extract_roi_features,
    multi_level_roi_align,
    query_consistency_loss,
    refined_query_group,
)
from .pseudo_labels import pseudo_label_quality, pseudo_labels_to_strong_view, select_pseudo_labels

ONE_TO_MANY, ONE_TO_ONE = "one_to_many", "one_to_one"


@dataclass
class QueryInputs:
    """Teacher-side inputs of the query module for ``N`` pseudo-boxes of a batch of ``B`` images.

    Attributes:
        rois: pooled teacher features: ``[high (N, D, s, s), low (N, D, s, s)]`` for the QRM, ``[multi-level
            (N, D, s, s)]`` for the cross-view projector (normal tensors, safe to use with autograd).
        batch_index / scores: ``(N,)``; weak_anchors / strong_anchors: ``(N, 4)`` cxcywh in [0, 1] of each view.
    """

    rois: list[Tensor]
    batch_index: Tensor
    scores: Tensor
    weak_anchors: Tensor
    strong_anchors: Tensor
    batch_size: int


@dataclass
class TeacherOutputs:
    """What the teacher pass leaves for the student and the consistency pass."""

    state: object  # EncoderState of the weak view (inference tensors)
    pseudo_labels: list[dict]  # strong-view targets: class_labels, boxes (cxcywh normalized), scores
    query_inputs: QueryInputs | None
    stats: dict = field(default_factory=dict)


def _normalized_cxcywh(boxes_xyxy: list[Tensor], sizes: Tensor) -> Tensor:
    """Concatenate per-image xyxy pixel boxes and normalize them by each image's ``(h, w)``."""
    scaled = []
    for boxes, (height, width) in zip(boxes_xyxy, sizes.tolist()):
        scaled.append(box_xyxy_to_cxcywh(boxes) / boxes.new_tensor([width, height, width, height]))
    return torch.cat(scaled) if scaled else torch.zeros(0, 4)


def run_teacher(teacher: nn.Module, batch: dict, stage: str, config) -> TeacherOutputs:
    """Teacher pass on the weak view: encoder once, pseudo-labels, and the query-module RoIs.

    ``batch`` is an unlabeled batch (docs/architecture.md); ``weak_sizes``/``strong_sizes`` may stay on the CPU.
    The pass runs in inference mode; what the student's autograd graph uses is copied out of it (small tensors:
    pseudo-labels and pooled RoIs), the encoder state stays an inference tensor for the teacher's second decode.
    """
    with torch.inference_mode():
        out = _teacher_inference(teacher, batch, stage, config)
    out.pseudo_labels = clone_out_of_inference(out.pseudo_labels)
    out.query_inputs = clone_out_of_inference(out.query_inputs)
    return out


def _teacher_inference(teacher: nn.Module, batch: dict, stage: str, config) -> TeacherOutputs:
    core = teacher.model
    state = core.encode(batch["weak_pixel_values"], batch["weak_pixel_mask"])
    decoded = core.decode(state)
    weak_pseudo = select_pseudo_labels(
        decoded.logits[-1], decoded.boxes[-1], threshold=config.pseudo_label_threshold,
        class_nms_iou=config.one_to_many_nms_iou if stage == ONE_TO_MANY else None,
        max_per_image=config.num_detections, mean_std_filter=config.pseudo_label_mean_std_filter,
    )
    strong_targets, weak_boxes = pseudo_labels_to_strong_view(
        weak_pseudo, batch["weak_sizes"], batch["strong_sizes"], batch["weak_to_strong"]
    )
    stats = {"pseudo_per_image": sum(len(t["boxes"]) for t in strong_targets) / max(1, len(strong_targets))}
    if "gt_labels" in batch:
        quality = pseudo_label_quality(weak_pseudo, batch["gt_labels"])
        stats.update(pseudo_precision=quality["precision"], pseudo_recall=quality["recall"],
                     pseudo_true_positives=quality["num_true_positive"], pseudo_labels=quality["num_pseudo"],
                     pseudo_annotated=quality["num_gt"])
    query_inputs = None
    if config.query_mode != "none":
        query_inputs = _query_inputs(state, weak_boxes, strong_targets, batch, config)
    return TeacherOutputs(state, strong_targets, query_inputs, stats)


def _query_inputs(state, weak_boxes, strong_targets, batch, config) -> QueryInputs:
    if config.query_mode == "refined":
        levels = [config.qrm_high_res_level, config.qrm_low_res_level]
        rois, batch_index = extract_roi_features(state.features, weak_boxes, state.strides, levels,
                                                 config.qrm_roi_size)
    else:
        roi_boxes, batch_index = boxes_to_rois(weak_boxes, state.features[0])
        rois = [multi_level_roi_align(state.features, roi_boxes, state.strides, config.qrm_roi_size)]
    scores = torch.cat([t["scores"] for t in strong_targets])
    strong_anchors = torch.cat([t["boxes"] for t in strong_targets])
    weak_anchors = _normalized_cxcywh(weak_boxes, batch["weak_sizes"]).to(strong_anchors.device)
    return QueryInputs(rois, batch_index, scores, weak_anchors, strong_anchors, len(weak_boxes))


def clone_out_of_inference(value):
    """Copy inference-mode tensors (nested in lists/dicts/dataclasses of QueryInputs) into normal tensors."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, list):
        return [clone_out_of_inference(v) for v in value]
    if isinstance(value, dict):
        return {k: clone_out_of_inference(v) for k, v in value.items()}
    if isinstance(value, QueryInputs):
        return QueryInputs(clone_out_of_inference(value.rois), value.batch_index.clone(), value.scores.clone(),
                           value.weak_anchors.clone(), value.strong_anchors.clone(), value.batch_size)
    return value


@dataclass
class QueryGroupsForStep:
    """The student's extra groups and the matching (detached) groups for the teacher."""

    student: list[QueryGroup]
    teacher: list[QueryGroup]
    auxiliary_loss: Tensor | None = None
    num_input: int = 0
    num_kept: int = 0
    graph_anchor: Tensor | None = None  # zero-valued, see ``keep_in_graph``


def keep_in_graph(content: Tensor) -> Tensor:
    """``0 * content.sum()``: a zero-weight term that keeps the query module in the autograd graph.

    When a process gets no pseudo-box, or the QRM's similarity step drops every box, ``content`` is ``(0, D)`` and
    ``pack_query_group`` builds the group from fresh zeros, so the query module's parameters (the QRM's ``fuse``
    layer, the whole cross-view projector) get no gradient on that process. DDP (``find_unused_parameters=False``)
    then stops at the next step ("Expected to have finished reduction in the prior iteration"). Adding this term
    to the loss gives them a zero gradient instead; it changes neither the loss value nor any other gradient.
    """
    return content.sum() * 0.0


def build_query_groups(query_module: nn.Module, inputs: QueryInputs, config) -> QueryGroupsForStep:
    """Run the query module (with gradient) and pack the student (strong anchors) and teacher (weak anchors)
    groups. Refined: one sparse group; cross-view: ``cross_view_groups`` repeated groups."""
    batch_size, see = inputs.batch_size, config.consistency_see_matching
    if config.query_mode == "refined":
        refined: RefinedQueries = query_module(inputs.rois[0], inputs.rois[1], inputs.batch_index, inputs.scores)
        frozen = dataclasses.replace(refined, content=refined.content.detach())
        student = [refined_query_group(refined, inputs.strong_anchors, batch_size, see)]
        teacher = [refined_query_group(frozen, inputs.weak_anchors, batch_size, see)]
        auxiliary = refined.alignment_loss
        return QueryGroupsForStep(student, teacher, auxiliary, len(inputs.scores), len(refined.keep),
                                  keep_in_graph(refined.content))
    content = query_module.fc(query_module.convs(inputs.rois[0]).flatten(1))
    groups = config.cross_view_groups
    student = cross_view_query_groups(content, inputs.strong_anchors, inputs.batch_index, batch_size, groups, see)
    teacher = cross_view_query_groups(content.detach(), inputs.weak_anchors, inputs.batch_index, batch_size,
                                      groups, see)
    return QueryGroupsForStep(student, teacher, None, len(inputs.scores), len(inputs.scores), keep_in_graph(content))


@dataclass
class StudentOutputs:
    sup_loss: Tensor | None = None
    sup_loss_dict: dict | None = None
    unsup_loss: Tensor | None = None
    unsup_loss_dict: dict | None = None
    group_outputs: list | None = None
    query_groups: QueryGroupsForStep | None = None


class SemiSupervisedStudent(nn.Module):
    """The module Accelerate wraps (DDP): one ``forward`` computes the labeled and the unlabeled losses, so each
    optimizer step has exactly one forward and one backward through the wrapper."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, labeled: dict | None, unlabeled: dict | None, teacher: TeacherOutputs | None,
                stage: str) -> StudentOutputs:
        out = StudentOutputs()
        if labeled is not None:
            sup = self.detector(pixel_values=labeled["pixel_values"], pixel_mask=labeled["pixel_mask"],
                                labels=labeled["labels"], assignment=stage)
            out.sup_loss, out.sup_loss_dict = sup.loss, sup.loss_dict
        if unlabeled is not None:
            config = self.detector.config
            groups = None
            if teacher.query_inputs is not None:
                groups = build_query_groups(self.detector.model.query_module, teacher.query_inputs, config)
            unsup = self.detector(
                pixel_values=unlabeled["strong_pixel_values"], pixel_mask=unlabeled["strong_pixel_mask"],
                labels=teacher.pseudo_labels, extra_query_groups=groups.student if groups else None,
                assignment=stage, use_rpf=config.use_rpf, denoising=stage == ONE_TO_ONE,
            )
            out.unsup_loss, out.unsup_loss_dict = unsup.loss, unsup.loss_dict
            out.group_outputs, out.query_groups = unsup.extra_group_outputs, groups
        return out


def teacher_group_states(teacher: nn.Module, teacher_out: TeacherOutputs, groups: list[QueryGroup]) -> list[Tensor]:
    """Decode the teacher's copy of the extra groups on its cached weak-view encoder state (inference mode);
    the states are copied out of inference mode for the loss."""
    with torch.inference_mode():
        decoded = teacher.model.decode(teacher_out.state, extra_query_groups=groups)
    return [group.hidden_states.clone() for group in decoded.groups]


def consistency_loss(student_groups: list, teacher_states: list[Tensor], groups: list[QueryGroup]) -> Tensor:
    """Mean over groups of ``query_consistency_loss`` (student states get the gradient)."""
    losses = [
        query_consistency_loss(student.hidden_states, teacher.to(student.hidden_states.dtype), group.valid)
        for student, teacher, group in zip(student_groups, teacher_states, groups)
    ]
    return torch.stack(losses).mean()


def semi_supervised_loss(student: nn.Module, teacher: nn.Module, labeled: dict | None, unlabeled: dict | None,
                         stage: str, unsup_weight: float, consistency_in_one_to_one: bool = True,
                         autocast=contextlib.nullcontext) -> tuple[Tensor, dict]:
    """Total loss of one micro-batch, ``sup + unsup_weight * (unsup + w_c * consistency + w_a * alignment)``.

    Args:
        student: the ``SemiSupervisedStudent`` (possibly DDP-wrapped); teacher: the EMA detector.
        labeled / unlabeled: batches (docs/architecture.md); either may be None.
        autocast: a context-manager factory for the teacher passes (the wrapped student autocasts itself).
    Returns:
        the loss and detached values to log.
    """
    config = teacher.config
    teacher_out = None
    if unlabeled is not None:
        with autocast():
            teacher_out = run_teacher(teacher, unlabeled, stage, config)
    out = student(labeled, unlabeled, teacher_out, stage)
    loss, logs = torch.zeros((), device=teacher.device), {}
    if out.sup_loss is not None:
        loss, logs["loss_sup"] = out.sup_loss, out.sup_loss.detach()
    if unlabeled is not None:
        unsup = out.unsup_loss
        logs.update(loss_unsup=unsup.detach(), **teacher_out.stats)
        groups = out.query_groups
        if groups is not None:
            with autocast():
                teacher_states = teacher_group_states(teacher, teacher_out, groups.teacher)
            consistency = consistency_loss(out.group_outputs, teacher_states, groups.teacher)
            if stage == ONE_TO_ONE and not consistency_in_one_to_one:
                consistency = consistency * 0.0
            unsup = unsup + config.consistency_loss_coefficient * consistency
            if groups.graph_anchor is not None:
                unsup = unsup + groups.graph_anchor
            logs.update(loss_consistency=consistency.detach(), queries_kept=groups.num_kept / max(1, groups.num_input))
            if groups.auxiliary_loss is not None:
                unsup = unsup + config.qrm_alignment_loss_coefficient * groups.auxiliary_loss
                logs["loss_alignment"] = groups.auxiliary_loss.detach()
        loss = loss + unsup_weight * unsup
    logs["loss"] = loss.detach()
    return loss, logs
