"""Contrastive denoising (CDN) queries of DINO.

Layout (see docs/architecture.md): ``num_groups`` groups of ``2 * pad_size`` queries. In group ``g`` the
positive copy of target ``j`` of an image is query ``2*g*pad + j`` and its negative copy ``2*g*pad + pad + j``;
slots ``j >= n_b`` are padding. Positives get box noise below ``box_noise_scale`` (they must be reconstructed),
negatives between 1x and 2x of it (they must be classified as "no object").
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh


@dataclass
class DenoisingMeta:
    """Where the denoising queries sit: ``num_groups`` groups of ``2 * pad_size`` queries."""

    num_groups: int
    pad_size: int

    @property
    def num_queries(self) -> int:
        return 2 * self.num_groups * self.pad_size


def _noisy_labels(labels: Tensor, num_labels: int, label_noise_ratio: float, generator) -> Tensor:
    """Flip each label to a random class with probability ``label_noise_ratio * 0.5`` (DINO)."""
    if label_noise_ratio <= 0:
        return labels
    flip = torch.rand(labels.shape, device=labels.device, generator=generator) < label_noise_ratio * 0.5
    random_labels = torch.randint(0, num_labels, labels.shape, device=labels.device, generator=generator)
    return torch.where(flip, random_labels, labels)


def _noisy_boxes(boxes: Tensor, negative: Tensor, box_noise_scale: float, generator) -> Tensor:
    """Jitter cxcywh ``boxes (N, 4)`` corner-wise; ``negative (N,)`` bool picks the 1x-2x noise band."""
    if box_noise_scale <= 0:
        return boxes
    corners = box_cxcywh_to_xyxy(boxes)
    half_wh = boxes[:, 2:].repeat(1, 2) / 2
    sign = torch.randint(0, 2, boxes.shape, device=boxes.device, generator=generator) * 2.0 - 1.0
    magnitude = torch.rand(boxes.shape, device=boxes.device, generator=generator) + negative[:, None].float()
    corners = (corners + sign * magnitude * half_wh * box_noise_scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(corners)


def build_denoising_queries(
    targets: list[dict],
    label_embedding: nn.Embedding,
    num_labels: int,
    num_denoising_queries: int,
    label_noise_ratio: float,
    box_noise_scale: float,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, DenoisingMeta] | tuple[None, None, None]:
    """Make the CDN queries of a batch.

    Args:
        targets: per image ``class_labels (n_b,)`` and ``boxes (n_b, 4)`` cxcywh normalized.
        label_embedding: ``num_labels + 1`` entries; the last one embeds padding slots.
    Returns:
        ``content (B, Ndn, D)``, ``anchors (B, Ndn, 4)`` cxcywh in [0, 1] (noised, detached) and the meta,
        or ``(None, None, None)`` when the batch has no target or denoising is off.
    """
    counts = [len(t["class_labels"]) for t in targets]
    pad_size = max(counts, default=0)
    if pad_size == 0 or num_denoising_queries <= 0:
        return None, None, None
    num_groups = max(1, num_denoising_queries // pad_size)
    device = label_embedding.weight.device
    batch_size = len(targets)
    labels = torch.full((batch_size, pad_size), num_labels, dtype=torch.long, device=device)
    boxes = torch.full((batch_size, pad_size, 4), 0.5, device=device)
    real = torch.zeros(batch_size, pad_size, dtype=torch.bool, device=device)
    for index, target in enumerate(targets):
        n = counts[index]
        labels[index, :n] = target["class_labels"].to(device)
        boxes[index, :n] = target["boxes"].to(device=device, dtype=boxes.dtype)
        real[index, :n] = True
    # (B, groups, 2 [positive, negative], pad) copies of every slot.
    shape = (batch_size, num_groups, 2, pad_size)
    labels = labels[:, None, None].expand(shape).reshape(-1)
    boxes = boxes[:, None, None].expand(*shape, 4).reshape(-1, 4)
    real = real[:, None, None].expand(shape).reshape(-1)
    negative = torch.zeros(shape, dtype=torch.bool, device=device)
    negative[:, :, 1] = True
    negative = negative.reshape(-1)
    noisy_labels = torch.where(real, _noisy_labels(labels, num_labels, label_noise_ratio, generator), labels)
    noisy_boxes = torch.where(real[:, None], _noisy_boxes(boxes, negative, box_noise_scale, generator), boxes)
    content = label_embedding(noisy_labels).reshape(batch_size, -1, label_embedding.embedding_dim)
    anchors = noisy_boxes.reshape(batch_size, -1, 4).detach()
    return content, anchors, DenoisingMeta(num_groups=num_groups, pad_size=pad_size)
