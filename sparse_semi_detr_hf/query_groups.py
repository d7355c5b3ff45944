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
        valid.index_put_((sorted_batch, slot), valid.new_ones(()))  # a device True: `= True` would copy from host
    return QueryGroup(padded_content, padded_anchors, valid, see_matching)


def build_decoder_attention_mask(
    groups: list[QueryGroup], num_denoising_groups: int, denoising_group_size: int, num_matching: int, device
) -> Tensor | None:
    """Self-attention mask of the decoder input ``[extra groups | denoising groups | matching queries]``.

    Args:
        groups: the extra query groups (their ``valid`` masks hide padding slots as keys).
        num_denoising_groups / denoising_group_size: ``meta.num_groups`` and ``2 * meta.pad_size`` (0 when absent).
        num_matching: number of matching queries (they come last).
    Returns:
        ``(B, 1, N, N)`` bool, ``True`` where a query may attend to a key, or ``None`` when there is only the
        matching group (no mask needed). Matching queries see only themselves; every other group sees itself
        (and the matching queries, if allowed); padded rows of extra groups see only themselves.
    """
    if not groups and num_denoising_groups == 0:
        return None
    batch_size = groups[0].content.shape[0] if groups else 1
    sizes = [group.num_queries for group in groups] + [denoising_group_size] * num_denoising_groups
    total = sum(sizes) + num_matching
    allowed = torch.zeros(batch_size, total, total, dtype=torch.bool, device=device)
    allowed[:, total - num_matching:, total - num_matching:] = True
    start = 0
    for index, size in enumerate(sizes):
        block = slice(start, start + size)
        group = groups[index] if index < len(groups) else None
        if group is None:
            allowed[:, block, block] = True
            allowed[:, block, total - num_matching:] = True
        else:
            valid = group.valid.to(device)
            allowed[:, block, block] = valid[:, None, :] & valid[:, :, None]
            if group.see_matching:
                allowed[:, block, total - num_matching:] = valid[:, :, None]
            diagonal = torch.arange(start, start + size, device=device)
            allowed[:, diagonal, diagonal] = allowed.new_ones(())  # a device True (no host-to-device copy)
        start += size
    return allowed[:, None]
