"""Fused multi-scale deformable attention (MSDA) in Triton: forward and backward kernels.

Same function as ``deformable_attention.multi_scale_deformable_attention_pytorch`` (bilinear sampling with
``F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`` per level, then a weighted sum),
but the sampling, the weighting and the sum happen in one kernel, and the backward recomputes the samples
instead of keeping ``(B*H, Dh, Q, L*P)`` intermediates.

Shapes (B batch, S = sum_l H_l * W_l, NH heads, Dh head dim, Q queries, L levels, P points):
    value               (B, S, NH, Dh)      levels concatenated; level l starts at ``level_start_index[l]``
    spatial_shapes      (L, 2) long         (H_l, W_l)
    level_start_index   (L,) long
    sampling_locations  (B, Q, NH, L, P, 2) normalized (x, y); may lie outside [0, 1]
    attention_weights   (B, Q, NH, L, P)
    output              (B, Q, NH * Dh)     dtype of ``value``

One program handles a block of queries of one (batch, head) pair and gathers all their L*P samples at once as
four ``(BLOCK_Q, L*P, Dh)`` corner tiles (each corner of a sample is one contiguous Dh row of ``value``).
Arithmetic is in float32 (float64 for float64 inputs) whatever the input dtypes. The value gradient is accumulated
with atomic adds into a float32 buffer, then cast; the location and weight gradients are written once each.
Level shapes are read on the device (no host sync). Design notes and numbers: ``docs/kernel_notes.md``.
Importing this module never fails: without Triton, ``is_triton_available()`` is False and no kernel is defined.
"""

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; the pure-PyTorch path covers its absence.
    triton = None
    tl = None

_TARGET_PROGRAMS = 1024  # below this many programs the query block is halved (small decoder batches)
_TILE_BYTES = 8192  # float32 bytes of one (BLOCK_Q, L*P, Dh) corner tile
_DEFAULT_WARPS = 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def is_triton_available() -> bool:
    """True when Triton is importable and can run: a CUDA device is present or ``TRITON_INTERPRET=1``."""
    return triton is not None and (torch.cuda.is_available() or _interpreting())


if triton is not None:

    @triton.jit
    def _point_setup(loc_ptr, attn_ptr, shapes_ptr, start_ptr, query_row, mask_q,
                     NUM_POINTS: tl.constexpr, NUM_SAMPLES: tl.constexpr, BLOCK_S: tl.constexpr,
                     COMPUTE_DTYPE: tl.constexpr):
        """Bilinear set-up of every (level, point) sample of a query block, as grid_sample(align_corners=False).

        Tiles are ``(BLOCK_Q, BLOCK_S)``: column ``c = level * P + point``. Returns the flat sample index
        (into ``(B, Q, NH, L*P)``), the sample mask, the attention weight, the top-left corner row of ``value``
        (level start included), the level width and height, the fractional parts ``fx, fy`` and the corner masks
        (top-left, top-right, bottom-left, bottom-right); a corner outside its level reads as zero.
        """
        cols = tl.arange(0, BLOCK_S)
        mask_s = cols < NUM_SAMPLES
        level = cols // NUM_POINTS
        height = tl.load(shapes_ptr + 2 * level, mask=mask_s, other=1)
        width = tl.load(shapes_ptr + 2 * level + 1, mask=mask_s, other=1)
        start = tl.load(start_ptr + level, mask=mask_s, other=0)
        sample = query_row[:, None] * NUM_SAMPLES + cols[None, :]
        valid = mask_q[:, None] & mask_s[None, :]
        loc_x = tl.load(loc_ptr + 2 * sample, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        attn = tl.load(attn_ptr + sample, mask=valid, other=0.0).to(COMPUTE_DTYPE)
        width_f = width.to(COMPUTE_DTYPE)[None, :]
        height_f = height.to(COMPUTE_DTYPE)[None, :]
        x = loc_x * width_f - 0.5
        y = loc_y * height_f - 0.5
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        fx = x - x0f
        fy = y - y0f
        # Clamping keeps far-away (or huge) coordinates clear of int overflow without changing which corners
        # are valid: a clamped corner and its right/lower neighbour both stay outside the level.
        x0 = tl.minimum(tl.maximum(x0f, -2.0), width_f).to(tl.int32)
        y0 = tl.minimum(tl.maximum(y0f, -2.0), height_f).to(tl.int32)
        w_int = width.to(tl.int32)[None, :]
        h_int = height.to(tl.int32)[None, :]
        ok_x0 = (x0 >= 0) & (x0 < w_int)
        ok_x1 = (x0 >= -1) & (x0 < w_int - 1)
        ok_y0 = valid & (y0 >= 0) & (y0 < h_int)
        ok_y1 = valid & (y0 >= -1) & (y0 < h_int - 1)
        row00 = start.to(tl.int32)[None, :] + y0 * w_int + x0
        masks = (ok_y0 & ok_x0, ok_y0 & ok_x1, ok_y1 & ok_x0, ok_y1 & ok_x1)
        return sample, valid, attn, row00, w_int, h_int, fx, fy, masks

    @triton.jit
    def _corner_offsets(row00, w_int, ROW_STRIDE: tl.constexpr):
        """Element offsets ``(BLOCK_Q, BLOCK_S, 1)`` of the four corner rows (row stride ``NH * Dh``)."""
        r00 = row00.to(tl.int64) * ROW_STRIDE
        r10 = (row00 + w_int).to(tl.int64) * ROW_STRIDE
        return r00[:, :, None], (r00 + ROW_STRIDE)[:, :, None], r10[:, :, None], (r10 + ROW_STRIDE)[:, :, None]

    @triton.jit
    def _load_corners(rows_ptr, row00, w_int, d, md, m00, m01, m10, m11, ROW_STRIDE: tl.constexpr,
                      COMPUTE_DTYPE: tl.constexpr):
        """Gather the four ``(BLOCK_Q, BLOCK_S, BLOCK_D)`` corner tiles; invalid corners read as zero."""
        o00, o01, o10, o11 = _corner_offsets(row00, w_int, ROW_STRIDE)
        v00 = tl.load(rows_ptr + o00 + d, mask=m00[:, :, None] & md, other=0.0).to(COMPUTE_DTYPE)
        v01 = tl.load(rows_ptr + o01 + d, mask=m01[:, :, None] & md, other=0.0).to(COMPUTE_DTYPE)
        v10 = tl.load(rows_ptr + o10 + d, mask=m10[:, :, None] & md, other=0.0).to(COMPUTE_DTYPE)
        v11 = tl.load(rows_ptr + o11 + d, mask=m11[:, :, None] & md, other=0.0).to(COMPUTE_DTYPE)
        return v00, v01, v10, v11

    @triton.jit
    def _msda_fwd_kernel(
        value_ptr, shapes_ptr, start_ptr, loc_ptr, attn_ptr, out_ptr, num_queries, num_keys,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_POINTS: tl.constexpr, NUM_SAMPLES: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    ):
        """Grid ``(cdiv(Q, BLOCK_Q), B * NH)``; writes ``out[b, q, h*Dh:(h+1)*Dh]`` for its query block.

        All ``L * P`` samples of the block are gathered at once as ``(BLOCK_Q, BLOCK_S, BLOCK_D)`` tiles.
        """
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // NUM_HEADS).to(tl.int64)
        h = pid_bh % NUM_HEADS
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q = offs_q < num_queries
        mask_d = offs_d < HEAD_DIM
        query_row = (b * num_queries + offs_q) * NUM_HEADS + h  # index into (B, Q, NH)
        _, _, attn, row00, w_int, _, fx, fy, masks = _point_setup(
            loc_ptr, attn_ptr, shapes_ptr, start_ptr, query_row, mask_q, NUM_POINTS, NUM_SAMPLES, BLOCK_S,
            COMPUTE_DTYPE)
        m00, m01, m10, m11 = masks
        rows_ptr = value_ptr + b * num_keys * NUM_HEADS * HEAD_DIM + h * HEAD_DIM
        v00, v01, v10, v11 = _load_corners(rows_ptr, row00, w_int, offs_d[None, None, :], mask_d[None, None, :],
                                           m00, m01, m10, m11, NUM_HEADS * HEAD_DIM, COMPUTE_DTYPE)
        gx = 1.0 - fx
        gy = 1.0 - fy
        mixed = ((attn * gy * gx)[:, :, None] * v00 + (attn * gy * fx)[:, :, None] * v01
                 + (attn * fy * gx)[:, :, None] * v10 + (attn * fy * fx)[:, :, None] * v11)
        out = tl.sum(mixed, axis=1)
        out_offs = query_row[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_d[None, :])

    @triton.jit
    def _scatter_corners(rows_ptr, row00, w_int, d, md, grad, w00, w01, w10, w11, m00, m01, m10, m11,
                         ROW_STRIDE: tl.constexpr):
        """Atomically add ``w_c * grad`` into the four corner rows of the value-gradient buffer."""
        o00, o01, o10, o11 = _corner_offsets(row00, w_int, ROW_STRIDE)
        tl.atomic_add(rows_ptr + o00 + d, w00[:, :, None] * grad, mask=m00[:, :, None] & md, sem="relaxed")
        tl.atomic_add(rows_ptr + o01 + d, w01[:, :, None] * grad, mask=m01[:, :, None] & md, sem="relaxed")
        tl.atomic_add(rows_ptr + o10 + d, w10[:, :, None] * grad, mask=m10[:, :, None] & md, sem="relaxed")
        tl.atomic_add(rows_ptr + o11 + d, w11[:, :, None] * grad, mask=m11[:, :, None] & md, sem="relaxed")

    @triton.jit
    def _sampling_grads(grad, v00, v01, v10, v11, attn, fx, fy, w_int, h_int, valid, sample,
                        grad_loc_ptr, grad_attn_ptr, COMPUTE_DTYPE: tl.constexpr):
        """Write d(loss)/d(attention weight) and d(loss)/d(location) of every sample of the block."""
        s00 = tl.sum(grad * v00, axis=2)
        s01 = tl.sum(grad * v01, axis=2)
        s10 = tl.sum(grad * v10, axis=2)
        s11 = tl.sum(grad * v11, axis=2)
        gx = 1.0 - fx
        gy = 1.0 - fy
        grad_attn = gy * (gx * s00 + fx * s01) + fy * (gx * s10 + fx * s11)
        grad_x = attn * w_int.to(COMPUTE_DTYPE) * (gy * (s01 - s00) + fy * (s11 - s10))
        grad_y = attn * h_int.to(COMPUTE_DTYPE) * (gx * (s10 - s00) + fx * (s11 - s01))
        tl.store(grad_attn_ptr + sample, grad_attn.to(grad_attn_ptr.dtype.element_ty), mask=valid)
        tl.store(grad_loc_ptr + 2 * sample, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=valid)
        tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _msda_bwd_kernel(
        grad_out_ptr, value_ptr, shapes_ptr, start_ptr, loc_ptr, attn_ptr,
        grad_value_ptr, grad_loc_ptr, grad_attn_ptr, num_queries, num_keys,
        NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, NUM_POINTS: tl.constexpr, NUM_SAMPLES: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
        GRAD_VALUE: tl.constexpr, GRAD_SAMPLING: tl.constexpr,
    ):
        """Same grid as the forward. Adds into ``grad_value`` (zeroed, float32/64, shaped like value) when
        ``GRAD_VALUE``; writes ``grad_loc`` and ``grad_attn`` (shaped like their inputs) when ``GRAD_SAMPLING``."""
        pid_q = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = (pid_bh // NUM_HEADS).to(tl.int64)
        h = pid_bh % NUM_HEADS
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q = offs_q < num_queries
        mask_d = offs_d < HEAD_DIM
        query_row = (b * num_queries + offs_q) * NUM_HEADS + h
        d = offs_d[None, None, :]
        md = mask_d[None, None, :]
        grad = tl.load(grad_out_ptr + query_row[:, None, None] * HEAD_DIM + d,
                       mask=mask_q[:, None, None] & md, other=0.0).to(COMPUTE_DTYPE)  # (BLOCK_Q, 1, BLOCK_D)
        sample, valid, attn, row00, w_int, h_int, fx, fy, masks = _point_setup(
            loc_ptr, attn_ptr, shapes_ptr, start_ptr, query_row, mask_q, NUM_POINTS, NUM_SAMPLES, BLOCK_S,
            COMPUTE_DTYPE)
        m00, m01, m10, m11 = masks
        head_offset = b * num_keys * NUM_HEADS * HEAD_DIM + h * HEAD_DIM
        if GRAD_SAMPLING:
            v00, v01, v10, v11 = _load_corners(value_ptr + head_offset, row00, w_int, d, md, m00, m01, m10, m11,
                                               NUM_HEADS * HEAD_DIM, COMPUTE_DTYPE)
            _sampling_grads(grad, v00, v01, v10, v11, attn, fx, fy, w_int, h_int, valid, sample, grad_loc_ptr,
                            grad_attn_ptr, COMPUTE_DTYPE)
        if GRAD_VALUE:
            gx = 1.0 - fx
            gy = 1.0 - fy
            _scatter_corners(grad_value_ptr + head_offset, row00, w_int, d, md, grad,
                             attn * gy * gx, attn * gy * fx, attn * fy * gx, attn * fy * fx, m00, m01, m10, m11,
                             NUM_HEADS * HEAD_DIM)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def default_block_q(num_queries: int, batch_heads: int, samples: int, head_dim: int, element_size: int) -> int:
    """Queries per program: a ``(BLOCK_Q, L*P, Dh)`` tile of about ``_TILE_BYTES`` per corner, halved (down to
    1) while that leaves fewer than ``_TARGET_PROGRAMS`` programs (small decoder batches)."""
    tile = triton.next_power_of_2(samples) * _block_d(head_dim) * max(element_size, 4)
    block_q = max(1, triton.next_power_of_2(_TILE_BYTES // tile + 1) // 2)
    while block_q > 1 and triton.cdiv(num_queries, block_q) * batch_heads < _TARGET_PROGRAMS:
        block_q //= 2
    return block_q


def _block_d(head_dim: int) -> int:
    return max(4, triton.next_power_of_2(head_dim))


def _launch(value: Tensor, sampling_locations: Tensor, block_q: int | None, num_warps: int | None):
    """Grid and shared compile-time arguments of both kernels for these shapes."""
    batch, num_keys, heads, head_dim = value.shape
    num_queries, levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    samples = levels * points
    block_q = block_q or default_block_q(num_queries, batch * heads, samples, head_dim, value.element_size())
    grid = (triton.cdiv(num_queries, block_q), batch * heads)
    meta = dict(NUM_HEADS=heads, HEAD_DIM=head_dim, NUM_POINTS=points, NUM_SAMPLES=samples, BLOCK_Q=block_q,
                BLOCK_S=triton.next_power_of_2(samples), BLOCK_D=_block_d(head_dim),
                COMPUTE_DTYPE=_compute_dtype(value.dtype), num_warps=num_warps or _DEFAULT_WARPS)
    return grid, meta


def _check_inputs(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> None:
    """Shape and device checks that read only host-side metadata (no device synchronization)."""
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError("expected value (B, S, H, Dh), sampling_locations (B, Q, H, L, P, 2), "
                         "attention_weights (B, Q, H, L, P); got "
                         f"{tuple(value.shape)}, {tuple(sampling_locations.shape)}, {tuple(attention_weights.shape)}")
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = sampling_locations.shape
    if sampling_locations.shape != (batch, num_queries, heads, levels, points, 2):
        raise ValueError(f"sampling_locations {tuple(sampling_locations.shape)} does not match value "
                         f"{tuple(value.shape)}")
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(f"attention_weights {tuple(attention_weights.shape)} must be "
                         f"{tuple(sampling_locations.shape[:-1])}")
    if spatial_shapes.shape != (levels, 2) or level_start_index.shape != (levels,):
        raise ValueError(f"spatial_shapes {tuple(spatial_shapes.shape)} / level_start_index "
                         f"{tuple(level_start_index.shape)} must be ({levels}, 2) / ({levels},)")
    if head_dim > 256 or levels * points > 64:
        raise ValueError(f"the Triton kernel supports Dh <= 256 and L * P <= 64, got Dh={head_dim}, "
                         f"L*P={levels * points}")
    if value.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the Triton MSDA kernel needs CUDA tensors (or TRITON_INTERPRET=1 for CPU debugging)")
    if not (value.device == sampling_locations.device == attention_weights.device):
        raise ValueError("value, sampling_locations and attention_weights must be on one device")


def _index_tensors(spatial_shapes: Tensor, level_start_index: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Contiguous int64 copies of the level tables on ``device`` (a no-op when they already are)."""
    shapes = spatial_shapes.to(device=device, dtype=torch.long).contiguous()
    starts = level_start_index.to(device=device, dtype=torch.long).contiguous()
    return shapes, starts


def msda_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                 attention_weights: Tensor, block_q: int | None = None, num_warps: int | None = None) -> Tensor:
    """Launch the forward kernel on contiguous inputs (shapes in the module docstring) -> ``(B, Q, NH*Dh)``.

    ``spatial_shapes`` / ``level_start_index`` must be int64 on the device of ``value``. ``block_q`` (a power of
    two) and ``num_warps`` override the launch configuration (the benchmark sweeps them).
    """
    batch, num_keys, heads, head_dim = value.shape
    num_queries = sampling_locations.shape[1]
    out = torch.empty(batch, num_queries, heads * head_dim, device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out
    grid, meta = _launch(value, sampling_locations, block_q, num_warps)
    _msda_fwd_kernel[grid](value, spatial_shapes, level_start_index, sampling_locations, attention_weights, out,
                           num_queries, num_keys, **meta)
    return out


def msda_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor, grad_value_needed: bool = True,
                  grad_sampling_needed: bool = True, block_q: int | None = None,
                  num_warps: int | None = None) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Launch the backward kernel on contiguous inputs; ``grad_output`` is ``(B, Q, NH*Dh)`` contiguous.

    Returns ``(grad_value, grad_sampling_locations, grad_attention_weights)`` in the dtypes of the inputs; a
    gradient that is not needed is ``None``. ``grad_value`` is accumulated in float32 (float64 for float64).
    """
    num_queries, num_keys = sampling_locations.shape[1], value.shape[1]
    acc_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, device=value.device, dtype=acc_dtype) if grad_value_needed else None
    grad_loc = torch.empty_like(sampling_locations) if grad_sampling_needed else None
    grad_attn = torch.empty_like(attention_weights) if grad_sampling_needed else None
    if grad_output.numel() > 0 and (grad_value_needed or grad_sampling_needed):
        grid, meta = _launch(value, sampling_locations, block_q, num_warps)
        unused = grad_output  # stands in for a gradient that is not computed; never dereferenced
        _msda_bwd_kernel[grid](
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            unused if grad_value is None else grad_value, unused if grad_loc is None else grad_loc,
            unused if grad_attn is None else grad_attn, num_queries, num_keys,
            GRAD_VALUE=grad_value_needed, GRAD_SAMPLING=grad_sampling_needed, **meta,
        )
    if grad_value is not None and grad_value.dtype != value.dtype:
        grad_value = grad_value.to(value.dtype)
    return grad_value, grad_loc, grad_attn


class MultiScaleDeformableAttentionFunction(torch.autograd.Function):
    """Autograd wrapper around the two kernels; saves the (contiguous) inputs, recomputes samples in backward."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        shapes, starts = _index_tensors(spatial_shapes, level_start_index, value.device)
        value = value.contiguous()
        sampling_locations = sampling_locations.contiguous()
        attention_weights = attention_weights.contiguous()
        ctx.save_for_backward(value, shapes, starts, sampling_locations, attention_weights)
        return msda_forward(value, shapes, starts, sampling_locations, attention_weights)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, shapes, starts, sampling_locations, attention_weights = ctx.saved_tensors
        need_value = ctx.needs_input_grad[0]
        need_sampling = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grad_value, grad_loc, grad_attn = msda_backward(
            grad_output.contiguous(), value, shapes, starts, sampling_locations, attention_weights,
            grad_value_needed=need_value, grad_sampling_needed=need_sampling,
        )
        grad_loc = grad_loc if ctx.needs_input_grad[3] else None
        grad_attn = grad_attn if ctx.needs_input_grad[4] else None
        return grad_value, None, None, grad_loc, grad_attn


def multi_scale_deformable_attention_triton(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                                            sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Fused multi-scale deformable attention (differentiable in value, locations and weights).

    Args:
        value: ``(B, S, NH, Dh)``, S = sum_l H_l * W_l; float32, bfloat16, float16 (or float64).
        spatial_shapes: ``(L, 2)`` long, (H_l, W_l) per level, read inside the kernel (no host sync); pass it
            on ``value``'s device, or it is copied there on every call.
        level_start_index: ``(L,)`` long, first row of each level in ``value`` (same device remark).
        sampling_locations: ``(B, Q, NH, L, P, 2)`` normalized (x, y); points outside ``[0, 1]`` read zeros.
        attention_weights: ``(B, Q, NH, L, P)``.
    Returns:
        ``(B, Q, NH * Dh)`` in ``value.dtype``; computed in float32 (float64 for float64 ``value``). Gradients come
        back in each input's dtype; double backward is not supported.
    """
    if triton is None:
        raise RuntimeError("multi_scale_deformable_attention_triton needs the 'triton' package")
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return MultiScaleDeformableAttentionFunction.apply(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
