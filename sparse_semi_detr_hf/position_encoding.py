"""Sine position embeddings: of feature-map pixels (DETR/DINO) and of anchor boxes (DINO's query position).

Adapted from IDEA-Research/DINO ``models/dino/position_encoding.py`` (``PositionEmbeddingSineHW``) and
``models/dino/utils.py`` (``gen_sineembed_for_position``) (Apache-2.0); changes: one frequency per sin/cos pair
(the same values as DINO's even/odd indexing), any leading dimensions for anchors, explicit output dtype.
"""

import math

import torch
from torch import Tensor, nn


def _sine_features(coords: Tensor, num_pos_feats: int, temperature: float) -> Tensor:
    """``(...,)`` float32 coordinates -> ``(..., num_pos_feats)`` as ``[sin(c/t_0), cos(c/t_0), sin(c/t_1), ...]``,
    with ``t_i = temperature ** (2 i / num_pos_feats)``."""
    exponents = torch.arange(0, num_pos_feats, 2, dtype=torch.float32, device=coords.device) / num_pos_feats
    angles = coords[..., None] / temperature**exponents  # (..., num_pos_feats / 2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


class SinePositionEmbedding(nn.Module):
    """Normalized 2-D sine embedding of a padded feature map, counted over valid pixels only.

    ``y`` (``x``) is the number of valid pixels up to and including this one in its column (row); with
    ``normalize`` it is divided by the column's (row's) total valid count (+ 1e-6) and multiplied by ``scale``,
    so every image spans ``(0, scale]`` over its own unpadded extent.
    """

    def __init__(
        self, num_pos_feats: int = 128, temperature: float = 20.0, normalize: bool = True, scale: float = 2 * math.pi
    ):
        super().__init__()
        if num_pos_feats % 2 != 0:
            raise ValueError(f"num_pos_feats must be even, got {num_pos_feats}")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale

    def forward(self, padding_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``padding_mask (B, H, W)`` bool, ``True`` on padding -> ``(B, 2 * num_pos_feats, H, W)`` in ``dtype``,
        channels ``[y features | x features]`` (padded pixels get the values of a continued count; unused)."""
        valid = ~padding_mask
        y_embed = valid.cumsum(1, dtype=torch.float32)  # (B, H, W)
        x_embed = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
        pos_y = _sine_features(y_embed, self.num_pos_feats, self.temperature)  # (B, H, W, F)
        pos_x = _sine_features(x_embed, self.num_pos_feats, self.temperature)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2).to(dtype)  # (B, 2F, H, W)


def anchor_sine_embedding(anchors: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0) -> Tensor:
    """DINO's ``gen_sineembed_for_position``: anchors ``(..., 4)`` cxcywh or ``(..., 2)`` xy in ``[0, 1]`` ->
    ``(..., 4 * num_pos_feats)`` ordered ``[y | x | w | h]`` (or ``(..., 2 * num_pos_feats)``, ``[y | x]``),
    in ``anchors.dtype`` (computed in float32)."""
    if anchors.shape[-1] not in (2, 4):
        raise ValueError(f"anchors must end in 2 or 4 coordinates, got {tuple(anchors.shape)}")
    coords = anchors.float() * (2 * math.pi)
    feats = [_sine_features(c, num_pos_feats, temperature) for c in coords.unbind(-1)]
    feats[0], feats[1] = feats[1], feats[0]  # x, y, (w, h) -> y, x, (w, h)
    return torch.cat(feats, dim=-1).to(anchors.dtype)
