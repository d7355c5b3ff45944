"""Deformable encoder and the DINO decoder with iterative box refinement (post-norm layers).

Shapes: ``B`` images, ``S`` flattened multi-scale tokens, ``L`` feature levels, ``N`` decoder queries,
``D`` = d_model. Boxes and anchors are cxcywh in [0, 1] of the unpadded image.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.activations import ACT2FN

from .box_ops import inverse_sigmoid
from .deformable_attention import MultiScaleDeformableAttention, ZeroInitLinear
from .position_encoding import anchor_sine_embedding


FOCAL_PRIOR_PROBABILITY = 0.01
"""Initial sigmoid score of every class (focal-loss prior, RetinaNet / DINO): the class bias starts at
``-log((1 - p) / p)`` so that the background-dominated focal loss starts small."""


class ClassHead(nn.Linear):
    """``(..., D) -> (..., C)`` class logits of the sigmoid (focal-loss) classifier.

    A type of its own so that weight initialisation (``_init_weights``) gives its bias the focal prior wherever the
    head is (re)initialized: in a fresh model and when ``from_pretrained(..., num_labels=N,
    ignore_mismatched_sizes=True)`` replaces it for a new label set. State-dict keys are those of ``nn.Linear``.
    """


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between (DETR's box head).

    ``zero_last``: the last layer is a ``ZeroInitLinear`` (box heads: initial boxes equal the anchors).
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int, zero_last: bool = False):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        layers = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])]
        layers.append((ZeroInitLinear if zero_last else nn.Linear)(dims[-1], output_dim))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float, activation: str):
        super().__init__()
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.activation = ACT2FN[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``; ``mask (B|1, 1, N, N)`` True = attend."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None) -> Tensor:
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class EncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = MultiScaleDeformableAttention(
            d, config.encoder_attention_heads, config.num_feature_levels, config.encoder_n_points,
            backend=config.deformable_attention_backend,
        )
        self.norm1 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, config.encoder_ffn_dim, config.dropout, config.activation_function)
        self.norm2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, shapes_list):
        attended = self.self_attn(
            src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask, shapes_list
        )
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.dropout(self.ffn(src)))


def encoder_reference_points(shapes_list: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalized by the valid region: ``(B, S, L, 2)`` (x, y)."""
    points = []
    for level, (height, width) in enumerate(shapes_list):
        ys = torch.arange(height, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5
        xs = torch.arange(width, device=valid_ratios.device, dtype=valid_ratios.dtype) + 0.5
        ref_y, ref_x = torch.meshgrid(ys, xs, indexing="ij")
        ref_y = ref_y.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        ref_x = ref_x.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class Encoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask, shapes_list,
                hidden_states: list | None = None):
        """``src``, ``pos``: ``(B, S, D)``; ``padding_mask (B, S)`` True = padding -> memory ``(B, S, D)``.

        ``hidden_states``: a list that receives the input and every layer's output (``output_hidden_states``)."""
        reference_points = encoder_reference_points(shapes_list, valid_ratios)
        if hidden_states is not None:
            hidden_states.append(src)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask, shapes_list)
            if hidden_states is not None:
                hidden_states.append(src)
        return src


class DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.self_attn = SelfAttention(d, config.decoder_attention_heads, config.dropout)
        self.norm_self = nn.LayerNorm(d)
        self.cross_attn = MultiScaleDeformableAttention(
            d, config.decoder_attention_heads, config.num_feature_levels, config.decoder_n_points,
            backend=config.deformable_attention_backend,
        )
        self.norm_cross = nn.LayerNorm(d)
        self.ffn = FeedForward(d, config.decoder_ffn_dim, config.dropout, config.activation_function)
        self.norm_ffn = nn.LayerNorm(d)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, tgt, query_pos, reference_points, memory, memory_state, attention_mask):
        """``tgt``, ``query_pos``: ``(B, N, D)``; ``reference_points (B, N, L, 4)`` scaled by valid ratios."""
        q = k = tgt + query_pos
        tgt = self.norm_self(tgt + self.dropout(self.self_attn(q, k, tgt, attention_mask)))
        spatial_shapes, level_start_index, padding_mask, shapes_list = memory_state
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask, shapes_list
        )
        tgt = self.norm_cross(tgt + self.dropout(attended))
        return self.norm_ffn(tgt + self.dropout(self.ffn(tgt)))


class Decoder(nn.Module):
    """DINO decoder: query position from the anchors' sine embedding, box refinement after every layer.

    The box head is shared with the detection head (passed to ``forward``). As in DINO it is applied twice per
    layer: to the layer output before the final LayerNorm for the reference box of the next layer
    (``ref_l = sigmoid(head(out_l) + logit(ref_{l-1}))``), and to the normed output for the layer's predicted box
    (``sigmoid(head(norm(out_l)) + logit(ref_{l-1}))``). With ``look_forward_twice`` the prediction's
    ``ref_{l-1}`` is not detached (gradient reaches the previous layer), while layer ``l`` itself receives the
    detached box. ``config.decoder_reference_from_normed`` takes both boxes from the normed output (one head call).
    """

    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.query_pos_head = MLP(2 * d, d, d, 2)
        self.norm = nn.LayerNorm(d)
        self.look_forward_twice = config.look_forward_twice
        self.reference_from_normed = config.decoder_reference_from_normed
        self.eps = config.inverse_sigmoid_eps
        self.num_pos_feats = d // 2

    def forward(self, tgt, anchors, memory, memory_state, valid_ratios, attention_mask, box_head):
        """
        Args:
            tgt: ``(B, N, D)`` content queries; anchors: ``(B, N, 4)`` initial boxes (detached).
            memory: ``(B, S, D)``; memory_state: (spatial_shapes, level_start_index, padding_mask, shapes_list).
            valid_ratios: ``(B, L, 2)``; attention_mask: ``(B|1, 1, N, N)`` bool or None.
        Returns:
            hidden states ``(num_layers, B, N, D)`` (normed) and boxes ``(num_layers, B, N, 4)``.
        """
        ratios = torch.cat((valid_ratios, valid_ratios), -1)[:, None]
        reference = anchors
        reference_for_loss = anchors
        hidden_states, boxes = [], []
        for layer in self.layers:
            reference_points = reference[:, :, None] * ratios
            sine = anchor_sine_embedding(reference_points[:, :, 0], self.num_pos_feats)
            query_pos = self.query_pos_head(sine.to(tgt.dtype))
            tgt = layer(tgt, query_pos, reference_points, memory, memory_state, attention_mask)
            hidden = self.norm(tgt)
            delta = box_head(hidden)
            reference_delta = delta if self.reference_from_normed else box_head(tgt)
            new_reference = (reference_delta + inverse_sigmoid(reference, self.eps)).sigmoid()
            if self.look_forward_twice:
                boxes.append((delta + inverse_sigmoid(reference_for_loss, self.eps)).sigmoid())
            else:
                boxes.append((delta + inverse_sigmoid(reference, self.eps)).sigmoid())
            hidden_states.append(hidden)
            reference_for_loss = new_reference
            reference = new_reference.detach()
        return torch.stack(hidden_states), torch.stack(boxes)
