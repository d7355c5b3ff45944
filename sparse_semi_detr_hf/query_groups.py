"""Extra decoder query groups and the decoder self-attention mask that isolates them.

The decoder input is ``[extra group 0 | extra group 1 | ... | denoising groups | matching queries]``.
Semi-DETR's cross-view queries and Sparse Semi-DETR's refined queries are extra groups; contrastive
denoising adds its own groups (see ``denoising.py``).
"""

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class QueryGroup:
    """One extra group of decoder queries.

    Attributes:
        content: ``(B, n, D)`` content queries.
        anchors: ``(B, n, 4)`` anchor boxes, cxcywh in ``[0, 1]`` of the view being decoded (the model detaches them).
        valid: ``(B, n)`` bool, ``False`` on padding slots (images with fewer than ``n`` queries).
        see_matching: whether this group's queries may attend to the matching queries.
    """

    content: Tensor
    anchors: Tensor
    valid: Tensor
    see_matching: bool = True

    @property
    def num_queries(self) -> int:
        return self.content.shape[1]


def pack_query_group(
    content: Tensor, anchors: Tensor, batch_index: Tensor, batch_size: int, see_matching: bool = True
) -> QueryGroup:
    """Pad a flat set of queries into a batched group.

    Args:
        content: ``(N, D)`` queries of the whole batch.
        anchors: ``(N, 4)`` cxcywh in ``[0, 1]``.
        batch_index: ``(N,)`` long, the image of each query.
        batch_size: ``B``.
    Returns:
        A ``QueryGroup`` with ``n = max`` queries per image (at least 1, so the group is never empty;
        an image without queries gets one invalid slot).
    """
    counts = torch.bincount(batch_index, minlength=batch_size) if batch_index.numel() else None
    n = max(1, int(counts.max())) if counts is not None else 1
    dim = content.shape[-1]
    padded_content = content.new_zeros(batch_size, n, dim)
    padded_anchors = anchors.new_full((batch_size, n, 4), 0.5)
    valid = torch.zeros(batch_size, n, dtype=torch.bool, device=content.device)
    if batch_index.numel():
        order = torch.argsort(batch_index, stable=True)
        sorted_batch = batch_index[order]
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(len(order), device=content.device) - starts[sorted_batch]
        padded_content[sorted_batch, slot] = content[order]
        padded_anchors[sorted_batch, slot] = anchors[order]
        valid[sorted_batch, slot] = True
    return QueryGroup(padded_content, padded_anchors, valid, see_matching)
