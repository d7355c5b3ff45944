"""Multi-scale deformable attention (Deformable DETR / DINO): pure-PyTorch kernel, backend dispatch, module, init.

Adapted from fundamentalvision/Deformable-DETR ``models/ops/modules/ms_deform_attn.py`` and
``ms_deform_attn_func.py`` (Apache-2.0); changes: level-major contiguous sampling grids, per-level accumulation
instead of stacking every sampled level, optional fused Triton backend chosen by a dispatcher.

Layouts: ``value (B, S, H, Dh)`` with the ``L`` levels flattened row-major and concatenated (``S = sum H_l * W_l``);
``sampling_locations (B, Q, H, L, P, 2)`` normalized ``(x, y)`` in ``[0, 1]`` of each level (outside: zeros);
``attention_weights (B, Q, H, L, P)``; output ``(B, Q, H * Dh)``.
"""

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import initialization as init


BACKEND_ENV_VAR = "SPARSE_SEMI_DETR_ATTENTION_BACKEND"
BACKENDS = ("auto", "pytorch", "triton")


def _to_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` in ``dtype``, left alone under autocast (which promotes mixed-dtype ``grid_sample`` itself)."""
    if tensor.dtype == dtype or torch.is_autocast_enabled(tensor.device.type):
        return tensor
    return tensor.to(dtype)


def multi_scale_deformable_attention_pytorch(
    value: Tensor,
    spatial_shapes_list: list[tuple[int, int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear multi-scale sampling with ``F.grid_sample`` (zeros padding, ``align_corners=False``).

    Args:
        value: ``(B, S, H, Dh)``.
        spatial_shapes_list: ``[(H_l, W_l), ...]`` as Python ints (no host sync).
        sampling_locations: ``(B, Q, H, L, P, 2)`` normalized ``(x, y)``.
        attention_weights: ``(B, Q, H, L, P)``.

    Both are cast to ``value.dtype`` when it differs (``grid_sample`` needs one dtype), except under autocast,
    which promotes ``grid_sample`` to the widest input itself and so keeps fp32 locations exact.

    Returns:
        ``(B, Q, H * Dh)`` in ``value.dtype`` (the promoted dtype under autocast).
    """
    batch, num_value, num_heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    sizes = [h * w for h, w in spatial_shapes_list]
    if sum(sizes) != num_value or len(sizes) != num_levels:
        raise ValueError(f"spatial shapes {spatial_shapes_list} do not match value {tuple(value.shape)}")
    sampling_locations = _to_dtype(sampling_locations, value.dtype)
    attention_weights = _to_dtype(attention_weights, value.dtype)
    # level-major copies, so that every level's slice is contiguous for grid_sample:
    # (B, Q, H, L, P, 2) -> (L, B*H, Q, P, 2) in [-1, 1];  (B, Q, H, L, P) -> (L, B*H, 1, Q, P)
    grids = (2 * sampling_locations - 1).permute(3, 0, 2, 1, 4, 5).reshape(num_levels, -1, num_queries, num_points, 2)
    weights = attention_weights.permute(3, 0, 2, 1, 4).reshape(num_levels, -1, 1, num_queries, num_points)
    output = None
    for level, (value_l, (height, width)) in enumerate(zip(value.split(sizes, dim=1), spatial_shapes_list)):
        # (B, H_l*W_l, H, Dh) -> (B*H, Dh, H_l, W_l): one copy per level (grid_sample is faster on contiguous input)
        value_l = value_l.permute(0, 2, 3, 1).reshape(batch * num_heads, head_dim, height, width)
        # (B*H, Dh, H_l, W_l) x (B*H, Q, P, 2) -> (B*H, Dh, Q, P)
        sampled = F.grid_sample(
            value_l,
            grids[level],
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        contribution = (sampled * weights[level]).sum(-1)  # (B*H, Dh, Q)
        output = contribution if output is None else output + contribution
    # (B*H, Dh, Q) -> (B, H*Dh, Q) -> (B, Q, H*Dh)
    return output.view(batch, num_heads * head_dim, num_queries).transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=1)
def _load_triton_backend():
    """The Triton kernel, or ``None`` when the module or Triton itself is missing (imported lazily, once)."""
    try:
        from .deformable_attention_triton import is_triton_available, multi_scale_deformable_attention_triton
    except ImportError:
        return None
    return multi_scale_deformable_attention_triton if is_triton_available() else None


def resolve_backend(backend: str, value: Tensor) -> str:
    """``"pytorch"`` or ``"triton"`` for these inputs; the env var ``SPARSE_SEMI_DETR_ATTENTION_BACKEND`` wins.

    ``"auto"`` takes Triton only for CUDA inputs; a forced ``"triton"`` trusts the kernel module's own
    ``is_triton_available()`` (which also covers ``TRITON_INTERPRET=1`` on CPU) and raises when it is unavailable.
    """
    backend = os.environ.get(BACKEND_ENV_VAR) or backend
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pytorch":
        return backend
    if backend == "triton":
        if _load_triton_backend() is None:
            raise RuntimeError(
                "deformable attention backend 'triton' was requested but is unavailable (triton missing, or no "
                "CUDA device); use backend='pytorch' or 'auto', or unset " + BACKEND_ENV_VAR
            )
        return backend
    return "triton" if value.is_cuda and _load_triton_backend() is not None else "pytorch"


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    spatial_shapes_list: list[tuple[int, int]] | None = None,
    backend: str = "auto",
) -> Tensor:
    """Dispatch to the Triton kernel (CUDA, when available) or to the pure-PyTorch kernel.

    Args:
        value: ``(B, S, H, Dh)``; spatial_shapes: ``(L, 2)`` long ``(H_l, W_l)``; level_start_index: ``(L,)`` long;
        sampling_locations: ``(B, Q, H, L, P, 2)``; attention_weights: ``(B, Q, H, L, P)``.
        spatial_shapes_list: the shapes as Python ints; without it the PyTorch path reads ``spatial_shapes``
            back to the host (a sync on CUDA).
        backend: ``"auto"`` | ``"pytorch"`` | ``"triton"``; overridden by ``SPARSE_SEMI_DETR_ATTENTION_BACKEND``.

    Returns:
        ``(B, Q, H * Dh)``.
    """
    if resolve_backend(backend, value) == "triton":
        kernel = _load_triton_backend()
        return kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if spatial_shapes_list is None:
        spatial_shapes_list = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    return multi_scale_deformable_attention_pytorch(value, spatial_shapes_list, sampling_locations, attention_weights)


class ZeroInitLinear(nn.Linear):
    """``nn.Linear`` whose weight and bias start at zero (the attention-weight projection, a box head's last layer).

    A type of its own so that ``_init_weights`` zeroes it wherever it is (re)initialized, also when it alone is
    missing from a checkpoint (transformers then initializes only that module). State-dict keys are ``nn.Linear``'s.
    """


class SamplingOffsets(nn.Linear):
    """``(..., D) -> (..., NH * L * P * 2)`` sampling offsets; starts at zero weight and the head-direction bias of
    ``init_sampling_offsets_`` (a type of its own for the same reason as ``ZeroInitLinear``)."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int):
        super().__init__(d_model, n_heads * n_levels * n_points * 2)
        self.n_heads, self.n_levels, self.n_points = n_heads, n_levels, n_points


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention of ``Q`` queries over ``L`` flattened feature levels (``n_points`` samples per level)."""

    def __init__(self, d_model: int, n_heads: int, n_levels: int, n_points: int, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.d_model, self.n_heads, self.n_levels, self.n_points = d_model, n_heads, n_levels, n_points
        self.backend = backend
        self.sampling_offsets = SamplingOffsets(d_model, n_heads, n_levels, n_points)
        self.attention_weights = ZeroInitLinear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        value_padding_mask: Tensor | None = None,
        spatial_shapes_list: list[tuple[int, int]] | None = None,
    ) -> Tensor:
        """Attend from ``query`` to ``value``.

        Args:
            query: ``(B, Q, D)`` (position embedding already added).
            reference_points: ``(B, Q, L, 2)`` normalized ``(x, y)`` or ``(B, Q, L, 4)`` cxcywh, already multiplied
                by each level's valid ratio.
            value: ``(B, S, D)`` flattened levels; spatial_shapes ``(L, 2)`` long ``(H_l, W_l)``;
                level_start_index ``(L,)``.
            value_padding_mask: ``(B, S)`` bool, ``True`` on padding (those values are zeroed), or ``None``.
            spatial_shapes_list: ``spatial_shapes`` as Python ints (avoids a host sync on the PyTorch path).

        Returns:
            ``(B, Q, D)``.
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, value.shape[1], heads, self.d_model // heads)  # (B, S, H, Dh)
        offsets = self.sampling_offsets(query).view(batch, num_queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, num_queries, heads, levels, points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: divide by (W_l, H_l)
            normalizer = spatial_shapes.flip(-1).to(reference_points.dtype)  # (L, 2) as (W, H)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            # offsets are in units of half the box size, split over the points
            centers, sizes = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            locations = centers + offsets / points * sizes * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {tuple(reference_points.shape)}")
        output = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights, spatial_shapes_list, self.backend
        )
        return self.output_proj(output)


def init_sampling_offsets_(linear: SamplingOffsets) -> None:
    """Zero weight; bias pointing each head in its own direction, scaled by the point index (1..P) (Deformable DETR).
    Uses ``transformers.initialization`` so parameters flagged as already initialized are left untouched."""
    heads, levels, points = linear.n_heads, linear.n_levels, linear.n_points
    init.constant_(linear.weight, 0.0)
    thetas = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
    directions = torch.stack([thetas.cos(), thetas.sin()], -1)  # (H, 2)
    directions = directions / directions.abs().max(-1, keepdim=True).values
    scales = torch.arange(1, points + 1, dtype=torch.float32).view(1, 1, points, 1)
    grid = directions.view(heads, 1, 1, 2) * scales  # (H, 1, P, 2)
    init.copy_(linear.bias, grid.expand(heads, levels, points, 2).reshape(-1))


def init_deformable_attention_(module: MultiScaleDeformableAttention) -> None:
    """Deformable-DETR init of the whole module: the sampling offsets (``init_sampling_offsets_``); zero
    attention-weight projection; Xavier value/output projections with zero bias. ``_init_weights`` reaches the same
    through the types of the four linear layers."""
    init_sampling_offsets_(module.sampling_offsets)
    init.constant_(module.attention_weights.weight, 0.0)
    init.constant_(module.attention_weights.bias, 0.0)
    for linear in (module.value_proj, module.output_proj):
        init.xavier_uniform_(linear.weight)
        init.constant_(linear.bias, 0.0)
