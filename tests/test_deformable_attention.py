"""Multi-scale deformable attention: kernel vs transformers and a hand-written bilinear reference, module, init,
dtype/gradient behaviour and backend dispatch."""

import math
import sys
from types import SimpleNamespace

import pytest
import torch

from sparse_semi_detr_hf import deformable_attention as da
from sparse_semi_detr_hf.deformable_attention import (
    MultiScaleDeformableAttention,
    init_deformable_attention_,
    multi_scale_deformable_attention,
    multi_scale_deformable_attention_pytorch,
)


SHAPES = [(7, 5), (4, 3), (2, 2), (1, 1)]


def _inputs(batch, heads, points, shapes, head_dim=4, queries=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    levels, total = len(shapes), sum(h * w for h, w in shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=gen)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.4 - 0.2  # partly outside
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen)
    return value, locations, weights


def _bilinear(value_l, x, y):
    """Sample ``value_l (H_l, W_l, Dh)`` at normalized (x, y), align_corners=False, zeros outside."""
    height, width, _ = value_l.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_l.shape[-1])
    for xi, yi in ((x0, y0), (x0 + 1, y0), (x0, y0 + 1), (x0 + 1, y0 + 1)):
        if 0 <= xi < width and 0 <= yi < height:
            out += (1 - abs(px - xi)) * (1 - abs(py - yi)) * value_l[yi, xi]
    return out


def _slow_attention(value, shapes, locations, weights):
    """Explicit loop over batch, query, head, level and point: ``(B, Q, H*Dh)``."""
    batch, _, heads, head_dim = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    value_l = value[b, starts[lvl] : starts[lvl + 1], m].reshape(h, w, head_dim)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += weights[b, q, m, lvl, p] * _bilinear(value_l, x, y)
    return out.flatten(2)


@pytest.mark.parametrize("batch,heads,points", [(1, 1, 1), (2, 2, 3), (3, 4, 2)])
def test_kernel_matches_transformers_reference(batch, heads, points):
    ddetr = pytest.importorskip("transformers.models.deformable_detr.modeling_deformable_detr")
    value, locations, weights = _inputs(batch, heads, points, SHAPES, head_dim=8, seed=batch)
    shapes_t = torch.tensor(SHAPES)
    starts = torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]])
    expected = ddetr.MultiScaleDeformableAttention().forward(value, shapes_t, SHAPES, starts, locations, weights, 64)
    out = multi_scale_deformable_attention_pytorch(value, SHAPES, locations, weights)
    assert out.shape == (batch, 5, heads * 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_kernel_matches_explicit_bilinear():
    shapes = [(3, 4), (2, 1)]
    value, locations, weights = _inputs(2, 2, 2, shapes, head_dim=3, queries=3, seed=3)
    out = multi_scale_deformable_attention_pytorch(value, shapes, locations, weights)
    torch.testing.assert_close(out, _slow_attention(value, shapes, locations, weights), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        multi_scale_deformable_attention_pytorch(value, [(3, 4), (2, 2)], locations, weights)


def _module_case(ref_dim, seed=0):
    torch.manual_seed(seed)
    shapes = [(3, 4), (2, 2)]
    module = MultiScaleDeformableAttention(d_model=8, n_heads=2, n_levels=2, n_points=2)
    for param in module.parameters():  # non-trivial offsets and weights, not the zero init
        torch.nn.init.normal_(param, std=0.5)
    total = sum(h * w for h, w in shapes)
    query, value = torch.randn(2, 3, 8), torch.randn(2, total, 8)
    refs = torch.rand(2, 3, 2, ref_dim) * 0.6 + 0.2
    shapes_t = torch.tensor(shapes)
    starts = torch.tensor([0, 12])
    return module, shapes, shapes_t, starts, query, refs, value


def _slow_module(module, shapes, query, refs, value, mask):
    """Deformable-DETR's module written out, sampling with the explicit bilinear loop."""
    b, q, _ = query.shape
    v = module.value_proj(value).masked_fill(mask[..., None], 0.0).view(b, -1, 2, 4)
    offsets = module.sampling_offsets(query).view(b, q, 2, 2, 2, 2)
    weights = module.attention_weights(query).view(b, q, 2, 4).softmax(-1).view(b, q, 2, 2, 2)
    if refs.shape[-1] == 2:
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
        locations = refs[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        locations = refs[:, :, None, :, None, :2] + offsets / 2 * refs[:, :, None, :, None, 2:] * 0.5
    return module.output_proj(_slow_attention(v, shapes, locations, weights))


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_matches_explicit_reference(ref_dim):
    module, shapes, shapes_t, starts, query, refs, value = _module_case(ref_dim)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[1, 9:12] = True
    with torch.no_grad():
        out = module(query, refs, value, shapes_t, starts, mask, spatial_shapes_list=shapes)
        expected = _slow_module(module, shapes, query, refs, value, mask)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # without the Python shape list the shapes are read from the tensor: same result
        torch.testing.assert_close(module(query, refs, value, shapes_t, starts, mask), out)


def test_padded_values_contribute_nothing():
    module, shapes, shapes_t, starts, query, refs, value = _module_case(2, seed=1)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 8:12] = True  # last row of level 0
    mask[0, 14:] = True
    changed = value.clone()
    changed[mask] = torch.randn(int(mask.sum()), 8) * 100
    with torch.no_grad():
        out = module(query, refs, value, shapes_t, starts, mask, shapes)
        torch.testing.assert_close(module(query, refs, changed, shapes_t, starts, mask, shapes), out)
        assert not torch.allclose(module(query, refs, changed, shapes_t, starts, None, shapes), out)


def test_module_rejects_bad_reference_points():
    module, shapes, shapes_t, starts, query, refs, value = _module_case(2)
    with pytest.raises(ValueError):
        module(query, torch.rand(2, 3, 2, 3), value, shapes_t, starts, None, shapes)
    with pytest.raises(ValueError):
        MultiScaleDeformableAttention(d_model=10, n_heads=4, n_levels=1, n_points=1)


def test_gradients_reach_value_offsets_and_weights():
    module, shapes, shapes_t, starts, query, refs, value = _module_case(4, seed=2)
    value.requires_grad_(True)
    module(query, refs, value, shapes_t, starts, None, shapes).square().sum().backward()
    for grad in (value.grad, module.sampling_offsets.weight.grad, module.attention_weights.weight.grad,
                 module.value_proj.weight.grad, module.output_proj.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_bf16_runs_on_cpu_and_is_close_to_fp32():
    module, shapes, shapes_t, starts, query, refs, value = _module_case(2, seed=3)
    with torch.no_grad():
        expected = module(query, refs, value, shapes_t, starts, None, shapes)
        out = module.to(torch.bfloat16)(query.bfloat16(), refs, value.bfloat16(), shapes_t, starts, None, shapes)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.1, rtol=0.05)
    # mixed dtypes (bf16 values, fp32 locations) are cast, and autocast keeps fp32 sampling
    value_k, locations, weights = _inputs(1, 2, 2, SHAPES, seed=4)
    ref = multi_scale_deformable_attention_pytorch(value_k, SHAPES, locations, weights)
    mixed = multi_scale_deformable_attention_pytorch(value_k.bfloat16(), SHAPES, locations, weights)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed.float(), ref, atol=0.1, rtol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = multi_scale_deformable_attention_pytorch(value_k.bfloat16(), SHAPES, locations, weights)
    torch.testing.assert_close(auto.float(), ref, atol=0.05, rtol=0.02)


def test_init_sets_head_directions_and_zero_weights():
    module = MultiScaleDeformableAttention(d_model=16, n_heads=8, n_levels=2, n_points=3)
    init_deformable_attention_(module)
    assert module.sampling_offsets.weight.abs().sum() == 0
    assert module.attention_weights.weight.abs().sum() == 0 and module.attention_weights.bias.abs().sum() == 0
    assert module.value_proj.bias.abs().sum() == 0 and module.output_proj.bias.abs().sum() == 0
    bound = math.sqrt(6 / 32)  # Xavier-uniform for a 16 x 16 weight
    assert 0 < module.value_proj.weight.abs().max() <= bound
    bias = module.sampling_offsets.bias.view(8, 2, 3, 2)
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]])
    for point in range(3):
        for level in range(2):
            torch.testing.assert_close(bias[:, level, point], directions.float() * (point + 1), atol=1e-5, rtol=0)


def test_init_respects_hf_initialized_flag():
    module = MultiScaleDeformableAttention(d_model=8, n_heads=2, n_levels=1, n_points=1)
    before = module.attention_weights.weight.detach().clone()
    module.attention_weights.weight._is_hf_initialized = True
    init_deformable_attention_(module)
    torch.testing.assert_close(module.attention_weights.weight.detach(), before)


def test_dispatch_env_override_and_auto_on_cpu(monkeypatch):
    value, locations, weights = _inputs(1, 2, 2, SHAPES, seed=5)
    shapes_t, starts = torch.tensor(SHAPES), torch.tensor([0, 35, 47, 51])
    expected = multi_scale_deformable_attention_pytorch(value, SHAPES, locations, weights)
    monkeypatch.delenv(da.BACKEND_ENV_VAR, raising=False)
    monkeypatch.setattr(da, "_load_triton_backend", lambda: None)  # as on a machine without CUDA or triton
    assert da.resolve_backend("auto", value) == "pytorch"
    torch.testing.assert_close(multi_scale_deformable_attention(value, shapes_t, starts, locations, weights), expected)
    with pytest.raises(RuntimeError, match="triton"):
        multi_scale_deformable_attention(value, shapes_t, starts, locations, weights, backend="triton")
    monkeypatch.setenv(da.BACKEND_ENV_VAR, "pytorch")  # the environment wins over the argument
    out = multi_scale_deformable_attention(value, shapes_t, starts, locations, weights, SHAPES, backend="triton")
    torch.testing.assert_close(out, expected)
    monkeypatch.setenv(da.BACKEND_ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="triton"):
        multi_scale_deformable_attention(value, shapes_t, starts, locations, weights, SHAPES, backend="pytorch")
    monkeypatch.setenv(da.BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError):
        da.resolve_backend("auto", value)


def test_dispatch_uses_triton_for_cuda_inputs_when_available(monkeypatch):
    monkeypatch.delenv(da.BACKEND_ENV_VAR, raising=False)
    calls = []
    monkeypatch.setattr(da, "_load_triton_backend", lambda: lambda *args: calls.append(args) or "triton-out")
    cuda_like = SimpleNamespace(is_cuda=True, device="cuda:0")
    assert da.resolve_backend("auto", cuda_like) == "triton"
    assert da.resolve_backend("triton", cuda_like) == "triton"
    assert da.resolve_backend("pytorch", cuda_like) == "pytorch"
    cpu = torch.zeros(1)
    assert da.resolve_backend("auto", cpu) == "pytorch"  # auto never picks triton for CPU inputs
    assert da.resolve_backend("triton", cpu) == "triton"  # forced: the kernel module decides (TRITON_INTERPRET)
    monkeypatch.setattr(da, "_load_triton_backend", lambda: None)  # triton module missing or unusable
    assert da.resolve_backend("auto", cuda_like) == "pytorch"
    with pytest.raises(RuntimeError):
        da.resolve_backend("triton", cuda_like)
    monkeypatch.setattr(da, "_load_triton_backend", lambda: lambda *args: calls.append(args) or "triton-out")
    monkeypatch.setattr(da, "resolve_backend", lambda backend, value: "triton")
    value, locations, weights = _inputs(1, 1, 1, SHAPES)
    shapes_t, starts = torch.tensor(SHAPES), torch.tensor([0, 35, 47, 51])
    assert multi_scale_deformable_attention(value, shapes_t, starts, locations, weights) == "triton-out"
    assert calls[0][1] is shapes_t and calls[0][2] is starts  # the kernel gets the tensors, not the list


def test_missing_triton_module_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "sparse_semi_detr_hf.deformable_attention_triton", None)  # import fails
    assert da._load_triton_backend.__wrapped__() is None
