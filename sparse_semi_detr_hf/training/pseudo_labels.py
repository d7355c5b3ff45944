"""Pseudo-labels: selection from the teacher's weak-view predictions and mapping into the student's strong view.

Pure functions on tensors; device and dtype follow the inputs. Box formats are stated per function:
``cxcywh`` normalized to a view's unpadded size inside the model, ``xyxy`` absolute pixels for geometry.
Pseudo-label dicts carry ``class_labels (n,) long``, ``boxes (n, 4)`` and ``scores (n,)``, sorted by
decreasing score; ``n = 0`` is legal everywhere.
"""

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import batched_nms

from ..box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh

# Semi-DETR's ``score_thr`` before its per-image statistics: candidates below it do not enter mean + std.
STATS_SCORE_FLOOR = 0.01


def select_pseudo_labels(
    logits: Tensor,
    boxes: Tensor,
    threshold: float = 0.4,
    class_nms_iou: float | None = None,
    max_per_image: int = 300,
    mean_std_filter: bool = False,
) -> list[dict[str, Tensor]]:
    """Pseudo-labels from the teacher's last decoder layer.

    Args:
        logits: ``(B, Q, C)`` class logits (sigmoid scores, no background class).
        boxes: ``(B, Q, 4)`` cxcywh normalized to the weak view.
        threshold: keep (query, class) pairs with score ``>= threshold`` (τ = 0.4).
        class_nms_iou: class-wise NMS IoU (0.6 in the one-to-many stage, whose predictions are duplicated);
            ``None`` disables NMS.
        max_per_image: at most this many (query, class) pairs per image, the highest scores (a query can give
            several labels); with NMS the cap comes after it (Semi-DETR's ``multiclass_nms``), so duplicates
            of the best objects cannot take the places of other objects.
        mean_std_filter: Semi-DETR's adaptive pre-filter: also require ``score >= mean + std`` of the image's
            candidates with score ``>= STATS_SCORE_FLOOR`` (after NMS when enabled; population std).

    Returns:
        ``B`` dicts with ``class_labels (n,) long``, ``boxes (n, 4)`` cxcywh normalized weak, ``scores (n,)``,
        sorted by decreasing score; all detached.
    """
    num_classes = logits.shape[-1]
    floor = min(threshold, STATS_SCORE_FLOOR) if mean_std_filter else threshold
    return [
        _image_pseudo_labels(scores_i, boxes_i, num_classes, floor, threshold, class_nms_iou, mean_std_filter,
                             max_per_image)
        for scores_i, boxes_i in zip(logits.detach().sigmoid().flatten(1), boxes.detach())
    ]


def _image_pseudo_labels(scores: Tensor, boxes: Tensor, num_classes: int, floor: float, threshold: float,
                         class_nms_iou: float | None, mean_std: bool, max_per_image: int) -> dict[str, Tensor]:
    """One image's ``(Q * C,)`` scores and ``(Q, 4)`` boxes -> its pseudo-label dict: the pairs at or above the
    score ``floor`` sorted by score, class-wise NMS, the ``max_per_image`` best, then τ (and mean + std), as
    Semi-DETR's ``multiclass_nms`` and filter. Only the candidates are sorted and gathered, not all ``Q * C``."""
    index = torch.nonzero(scores >= floor).squeeze(1)
    scores, order = scores[index].sort(descending=True, stable=True)
    index = index[order]
    labels, boxes = index % num_classes, boxes[index // num_classes]
    if class_nms_iou is not None and scores.numel() > 0:
        order = batched_nms(box_cxcywh_to_xyxy(boxes).float(), scores.float(), labels, class_nms_iou)
        scores, labels, boxes = scores[order], labels[order], boxes[order]  # still sorted by score
    scores, labels, boxes = scores[:max_per_image], labels[:max_per_image], boxes[:max_per_image]
    keep = scores >= threshold
    if mean_std and scores.numel() > 0:
        keep &= scores >= scores.mean() + scores.std(correction=0)
    return {"class_labels": labels[keep], "boxes": boxes[keep], "scores": scores[keep]}


def map_boxes_with_matrix(
    boxes_xyxy: Tensor, matrix: Tensor, out_size: Tensor | tuple[int, int], min_size: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Map xyxy boxes through a 3×3 pixel transform, as the enclosing box of the 4 mapped corners.

    Args:
        boxes_xyxy: ``(n, 4)`` absolute pixels of the source view.
        matrix: ``(3, 3)`` maps source pixels ``(x, y, 1)`` to target pixels (homogeneous; affine in practice).
        out_size: ``(h, w)`` of the target view (unpadded).
        min_size: a box is kept only if its clipped width **and** height are ``>= min_size`` pixels (1 px by
            default). This drops boxes mapped outside the image (clipped to zero size) and slivers left at a
            border; it also bounds the area from below by ``min_size**2``.

    Returns:
        ``boxes (n, 4)`` xyxy target pixels clipped to ``[0, w] × [0, h]`` (all n, dropped ones included) and
        ``keep (n,) bool``.
    """
    n = boxes_xyxy.shape[0]
    if n == 0:
        return boxes_xyxy.new_zeros((0, 4)), torch.zeros(0, dtype=torch.bool, device=boxes_xyxy.device)
    matrix = matrix.to(device=boxes_xyxy.device, dtype=boxes_xyxy.dtype)
    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    corners_x = torch.stack((x0, x1, x0, x1), dim=1)
    corners_y = torch.stack((y0, y0, y1, y1), dim=1)
    corners = torch.stack((corners_x, corners_y, torch.ones_like(corners_x)), dim=-1)  # (n, 4, 3)
    mapped = corners @ matrix.T
    mapped_xy = mapped[..., :2] / mapped[..., 2:].clamp(min=torch.finfo(mapped.dtype).eps)
    height, width = (float(v) for v in out_size)
    new_x0 = mapped_xy[..., 0].amin(1).clamp(0, width)
    new_x1 = mapped_xy[..., 0].amax(1).clamp(0, width)
    new_y0 = mapped_xy[..., 1].amin(1).clamp(0, height)
    new_y1 = mapped_xy[..., 1].amax(1).clamp(0, height)
    mapped_boxes = torch.stack((new_x0, new_y0, new_x1, new_y1), dim=-1)
    keep = (new_x1 - new_x0 >= min_size) & (new_y1 - new_y0 >= min_size)
    return mapped_boxes, keep


def pseudo_labels_to_strong_view(
    pseudo: list[dict[str, Tensor]],
    weak_sizes: Tensor,
    strong_sizes: Tensor,
    weak_to_strong: Tensor,
    min_size: float = 1.0,
) -> tuple[list[dict[str, Tensor]], list[Tensor]]:
    """Move weak-view pseudo-labels into the strong view.

    Args:
        pseudo: ``B`` dicts from :func:`select_pseudo_labels` (boxes cxcywh normalized weak).
        weak_sizes, strong_sizes: ``(B, 2)`` unpadded ``(h, w)`` of each view.
        weak_to_strong: ``(B, 3, 3)`` maps weak pixels ``(x, y, 1)`` to strong pixels.
        min_size: passed to :func:`map_boxes_with_matrix` (boxes under 1 px in the strong view are dropped).

    Returns:
        ``strong_targets``: ``B`` dicts with ``class_labels``, ``boxes (n_i, 4)`` cxcywh normalized to the strong
        view, ``scores``; ``weak_boxes_xyxy``: ``B`` tensors ``(n_i, 4)`` absolute weak-view pixels (clipped to
        the weak image), row-aligned with ``strong_targets`` — the boxes the QRM pools with RoIAlign.
    """
    strong_targets, weak_boxes = [], []
    for image, labels in enumerate(pseudo):
        boxes = labels["boxes"]
        weak_h, weak_w = (float(v) for v in weak_sizes[image])
        strong_h, strong_w = (float(v) for v in strong_sizes[image])
        weak_scale = boxes.new_tensor([weak_w, weak_h, weak_w, weak_h])
        weak_xyxy = box_cxcywh_to_xyxy(boxes) * weak_scale
        weak_xyxy = torch.minimum(weak_xyxy.clamp(min=0), weak_scale)
        strong_xyxy, keep = map_boxes_with_matrix(weak_xyxy, weak_to_strong[image], (strong_h, strong_w), min_size)
        strong_scale = boxes.new_tensor([strong_w, strong_h, strong_w, strong_h])
        strong_targets.append(
            {
                "class_labels": labels["class_labels"][keep],
                "boxes": box_xyxy_to_cxcywh(strong_xyxy[keep] / strong_scale),
                "scores": labels["scores"][keep],
            }
        )
        weak_boxes.append(weak_xyxy[keep])
    return strong_targets, weak_boxes


def pseudo_label_quality(
    pseudo: list[dict[str, Tensor]], gt: list[dict[str, Tensor]], iou: float = 0.5
) -> dict[str, float]:
    """Precision and recall of pseudo-labels against known ground truth (synthetic data, logging only).

    ``pseudo`` and ``gt`` are lists of dicts with ``class_labels (n,)`` and ``boxes (n, 4)`` cxcywh in the **same**
    frame (e.g. both normalized to the weak view). A pseudo-box is a true positive when it is paired one-to-one
    (maximum-cardinality matching, ``scipy.optimize.linear_sum_assignment``; IoU breaks ties) with a ground-truth
    box of the same class and IoU ``>= iou``. With no pseudo-label precision is 1.0, with no ground truth recall is
    1.0 (nothing wrong / nothing missed); the counts are returned too, so callers can aggregate exactly.

    Returns: ``dict(precision, recall, num_pseudo, num_gt, num_true_positive)``.
    """
    true_positive = num_pseudo = num_gt = 0
    for pred, target in zip(pseudo, gt, strict=True):
        num_pseudo += int(pred["boxes"].shape[0])
        num_gt += int(target["boxes"].shape[0])
        true_positive += _count_true_positives(pred, target, iou)
    return {
        "precision": true_positive / num_pseudo if num_pseudo else 1.0,
        "recall": true_positive / num_gt if num_gt else 1.0,
        "num_pseudo": float(num_pseudo),
        "num_gt": float(num_gt),
        "num_true_positive": float(true_positive),
    }


def _count_true_positives(pred: dict[str, Tensor], target: dict[str, Tensor], iou_threshold: float) -> int:
    """Size of a one-to-one matching between same-class pairs with IoU >= threshold."""
    if pred["boxes"].shape[0] == 0 or target["boxes"].shape[0] == 0:
        return 0
    device = pred["boxes"].device
    target_boxes, target_labels = target["boxes"].to(device).float(), target["class_labels"].to(device)
    overlaps = box_iou(box_cxcywh_to_xyxy(pred["boxes"].float()), box_cxcywh_to_xyxy(target_boxes))
    same_class = pred["class_labels"][:, None] == target_labels[None, :]
    valid = ((overlaps >= iou_threshold) & same_class).cpu().numpy()
    if not valid.any():
        return 0
    cost = -(valid.astype(np.float64) + 1e-3 * overlaps.cpu().numpy() * valid)
    rows, cols = linear_sum_assignment(cost)
    return int(valid[rows, cols].sum())
