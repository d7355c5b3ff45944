"""Two-stage, mixed query selection (DINO): encoder proposals -> top-K anchors, learned content queries."""

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .transformer import MLP, ClassHead


def encoder_output_proposals(
    memory: Tensor, padding_mask: Tensor, shapes_list: list[tuple[int, int]]
) -> tuple[Tensor, Tensor, Tensor]:
    """One proposal per encoder token.

    A token at (x, y) of level ``l`` proposes the box centred at ((x + 0.5) / W_valid, (y + 0.5) / H_valid) with
    side 0.05 * 2**l. Proposals on padding or with a coordinate outside (0.01, 0.99) are invalid.

    Args:
        memory: ``(B, S, D)``; padding_mask: ``(B, S)`` True = padding.
    Returns:
        ``masked_memory (B, S, D)`` (zero on invalid tokens), ``proposals (B, S, 4)`` in logit space (``+inf`` on
        invalid tokens) and ``valid (B, S)`` bool.
    """
    batch = memory.shape[0]
    proposals, start = [], 0
    for level, (height, width) in enumerate(shapes_list):
        mask = padding_mask[:, start:start + height * width].view(batch, height, width)
        valid_h = (~mask[:, :, 0]).sum(1).to(memory.dtype)
        valid_w = (~mask[:, 0, :]).sum(1).to(memory.dtype)
        ys = torch.arange(height, device=memory.device, dtype=memory.dtype)
        xs = torch.arange(width, device=memory.device, dtype=memory.dtype)
        grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((grid_x, grid_y), -1)[None] + 0.5  # (1, H, W, 2)
        scale = torch.stack((valid_w, valid_h), -1).view(batch, 1, 1, 2)
        grid = grid / scale
        wh = torch.full_like(grid, 0.05 * 2.0**level)
        proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
        start += height * width
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1) & ~padding_mask
    logits = torch.log(proposals / (1 - proposals)).masked_fill(~valid[..., None], float("inf"))
    return memory.masked_fill(~valid[..., None], 0.0), logits, valid


@dataclass
class SelectedQueries:
    """Output of the query selection.

    Attributes:
        enc_logits: ``(B, K, C)`` encoder class logits of the selected proposals (for the encoder loss).
        enc_boxes: ``(B, K, 4)`` their refined boxes, cxcywh (with gradient, for the encoder loss).
        anchors: ``(B, K, 4)`` the same boxes detached: the decoder's initial anchors.
        content: ``(B, K, D)`` learned content queries.
    """

    enc_logits: Tensor
    enc_boxes: Tensor
    anchors: Tensor
    content: Tensor


class ContentQueries(nn.Embedding):
    """``(num_queries, D)`` learned content queries; Xavier-uniform at init (``_init_weights``), as DINO's
    ``tgt_embed`` ends after its N(0, 1) draw and the Xavier init of every 2-D transformer parameter."""


class QuerySelection(nn.Module):
    """Encoder head (Linear + LayerNorm, class head, box head) and mixed top-K selection."""

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.num_queries = config.num_queries
        self.output_proj = nn.Linear(d, d)
        self.output_norm = nn.LayerNorm(d)
        self.class_head = ClassHead(d, config.num_labels)
        self.box_head = MLP(d, d, 4, 3, zero_last=True)
        self.content_queries = ContentQueries(config.num_queries, d)

    def forward(self, memory: Tensor, padding_mask: Tensor, shapes_list: list[tuple[int, int]]) -> SelectedQueries:
        masked_memory, proposals, valid = encoder_output_proposals(memory, padding_mask, shapes_list)
        output = self.output_norm(self.output_proj(masked_memory))
        logits = self.class_head(output)
        k = min(self.num_queries, logits.shape[1])
        scores = logits.max(-1).values.masked_fill(~valid, -math.inf)
        top = scores.topk(k, dim=1).indices  # (B, K)
        selected = torch.gather(output, 1, top[..., None].expand(-1, -1, output.shape[-1]))
        box_logits = self.box_head(selected) + torch.gather(proposals, 1, top[..., None].expand(-1, -1, 4))
        boxes = box_logits.sigmoid()
        content = self.content_queries.weight[:k][None].expand(memory.shape[0], -1, -1)
        enc_logits = torch.gather(logits, 1, top[..., None].expand(-1, -1, logits.shape[-1]))
        return SelectedQueries(enc_logits, boxes, boxes.detach(), content)
