"""Fused Triton multi-scale deformable attention vs a float64 ``grid_sample`` reference.

On CPU the kernels run through the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before Triton is
imported, so those checks run once in a subprocess (this file executed as a script), which loads the kernel module
by path (no package import, so it starts fast), poisons every ``torch.empty`` with NaN, and saves
``(kernel, reference)`` pairs that the tests below compare. Tests marked ``gpu`` run the compiled kernels on CUDA.
"""

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILE = REPO / "sparse_semi_detr_hf" / "deformable_attention_triton.py"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# name -> (level shapes, batch, heads, head_dim, queries, points, (value, location, weight) dtypes, block_q)
CASES = {
    "fp32_three_levels": ([(4, 6), (2, 3), (1, 2)], 2, 2, 8, 9, 2, ("float32",) * 3, None),
    "fp32_odd_head_dim": ([(3, 5), (5, 3)], 1, 3, 6, 5, 3, ("float32",) * 3, None),
    "fp32_batch3_one_level": ([(7, 4)], 3, 1, 4, 11, 4, ("float32",) * 3, None),
    "fp32_query_block4": ([(5, 4), (3, 2)], 2, 2, 4, 9, 2, ("float32",) * 3, 4),
    "fp32_query_block8": ([(2, 9), (1, 1)], 1, 2, 16, 11, 1, ("float32",) * 3, 8),
    "float64": ([(3, 4), (2, 2)], 2, 2, 4, 6, 2, ("float64",) * 3, None),
    "bf16_value_fp32_sampling": ([(4, 5), (2, 3)], 2, 2, 8, 7, 2, ("bfloat16", "float32", "float32"), None),
    "fp16": ([(4, 5), (2, 3)], 1, 2, 8, 7, 2, ("float16",) * 3, 4),
}
GRAD_NAMES = ("value", "sampling_locations", "attention_weights")


def reference_msda(value, shapes, locations, weights):
    """``F.grid_sample`` reference in the inputs' dtype: ``(B, Q, H*Dh)`` (same layouts as the kernel)."""
    batch, _, heads, head_dim = value.shape
    queries, levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    out = 0
    for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        height, width = shapes[level]
        image = value_l.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        grid = (2 * locations[:, :, :, level] - 1).transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weight = weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, queries, points)
        out = out + (sampled * weight).sum(-1)  # (B*H, Dh, Q)
    return out.view(batch, heads * head_dim, queries).transpose(1, 2)


def level_tables(shapes, device=None):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def random_inputs(shapes, batch, heads, head_dim, queries, points, generator, device="cpu"):
    """float64 inputs; about 30% of the locations fall outside ``[0, 1]`` and a few are far away."""
    total, levels = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(batch, total, heads, head_dim, generator=generator, dtype=torch.float64)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    far = torch.rand(locations.shape, generator=generator, dtype=torch.float64) < 0.03
    far_away = torch.randn(locations.shape, generator=generator, dtype=torch.float64) * 50
    locations = torch.where(far, far_away, locations)
    weights = torch.rand(batch, queries, heads, levels, points, generator=generator, dtype=torch.float64)
    return [t.to(device) for t in (value, locations, weights)]


# --------------------------------------------------------------------------------------------------------------
# Interpreter worker (runs in a subprocess with TRITON_INTERPRET=1)


def _load_kernel_module():
    spec = importlib.util.spec_from_file_location("msda_triton_under_test", KERNEL_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _poison_empty():
    """Make every floating ``torch.empty`` / ``empty_like`` NaN-filled, so unwritten outputs show up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.empty = lambda *args, **kwargs: poisoned(empty(*args, **kwargs))
    torch.empty_like = lambda *args, **kwargs: poisoned(empty_like(*args, **kwargs))


def _run_case(kernels, shapes, batch, heads, head_dim, queries, points, dtypes, block_q, seed):
    """Kernel output and gradients next to the float64 reference on the same (rounded) inputs."""
    generator = torch.Generator().manual_seed(seed)
    master = random_inputs(shapes, batch, heads, head_dim, queries, points, generator)
    inputs = [t.to(getattr(torch, name)) for t, name in zip(master, dtypes)]
    exact = [t.double().requires_grad_() for t in inputs]
    spatial_shapes, starts = level_tables(shapes)
    reference = reference_msda(exact[0], shapes, exact[1], exact[2])
    grad_out = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    reference_grads = torch.autograd.grad(reference, exact, grad_out.to(inputs[0].dtype).double())
    if block_q is None:  # the public autograd entry point
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = kernels.multi_scale_deformable_attention_triton(leaves[0], spatial_shapes, starts, *leaves[1:])
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    else:  # the launchers, with a query block that does not divide Q
        out = kernels.msda_forward(inputs[0], spatial_shapes, starts, *inputs[1:], block_q=block_q)
        grads = kernels.msda_backward(grad_out.to(out.dtype), inputs[0], spatial_shapes, starts, *inputs[1:],
                                      block_q=block_q)
    pairs = {"output": (out, reference.detach())}
    pairs.update({f"grad_{name}": (g, r) for name, g, r in zip(GRAD_NAMES, grads, reference_grads)})
    return pairs


def _gradcheck(kernels):
    """``torch.autograd.gradcheck`` (fast mode) of the float64 kernels: "ok" or the error message."""
    generator = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (2, 3)]
    inputs = [t.requires_grad_() for t in random_inputs(shapes, 1, 1, 4, 3, 2, generator)]
    spatial_shapes, starts = level_tables(shapes)

    def function(value, locations, weights):
        return kernels.multi_scale_deformable_attention_triton(value, spatial_shapes, starts, locations, weights)

    try:
        torch.autograd.gradcheck(function, tuple(inputs), fast_mode=True)
    except RuntimeError as error:  # GradcheckError is a RuntimeError
        return str(error)
    return "ok"


def _partial_and_empty(kernels):
    """Gradients only where asked for, and an empty query set."""
    generator = torch.Generator().manual_seed(2)
    shapes = [(3, 4)]
    value, locations, weights = [t.float() for t in random_inputs(shapes, 1, 2, 4, 3, 2, generator)]
    spatial_shapes, starts = level_tables(shapes)
    results = {}
    for name, index in (("only_value", 0), ("only_locations", 1)):
        leaves = [value.clone(), locations.clone(), weights.clone()]
        leaves[index].requires_grad_()
        out = kernels.multi_scale_deformable_attention_triton(leaves[0], spatial_shapes, starts, *leaves[1:])
        out.sum().backward()
        results[name] = [leaf.grad for leaf in leaves]
    empty = [value.requires_grad_(), locations[:, :0].requires_grad_(), weights[:, :0].requires_grad_()]
    out = kernels.multi_scale_deformable_attention_triton(empty[0], spatial_shapes, starts, *empty[1:])
    out.sum().backward()
    results["empty"] = (out, [leaf.grad for leaf in empty])
    return results


def _worker(output_path):
    kernels = _load_kernel_module()
    _poison_empty()
    results = {"available": kernels.is_triton_available()}
    for seed, (name, case) in enumerate(CASES.items()):
        results[name] = _run_case(kernels, *case, seed=seed)
    results["gradcheck"] = _gradcheck(kernels)
    results["partial"] = _partial_and_empty(kernels)
    torch.save(results, output_path)


if __name__ == "__main__":
    _worker(sys.argv[1])


# --------------------------------------------------------------------------------------------------------------
# Tests of the interpreter results


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    if not TRITON_INSTALLED:
        pytest.skip("triton is not installed: the interpreter checks need it")
    output = tmp_path_factory.mktemp("msda") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, __file__, str(output)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stderr[-4000:]}"
    return torch.load(output, weights_only=False)


TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}  # relative L2 error


def _tolerance(dtypes):
    return max(TOLERANCE[name] for name in dtypes)


def _relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def test_worker_sees_triton_available(interpreted):
    assert interpreted["available"] is True


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_grid_sample_reference(interpreted, case):
    dtypes = CASES[case][6]
    tolerance = _tolerance(dtypes)
    for name, (actual, expected) in interpreted[case].items():
        assert not torch.isnan(actual).any(), f"{case}/{name}: unwritten (NaN-poisoned) or NaN elements"
        assert actual.shape == expected.shape, name
        input_index = {"grad_value": 0, "grad_sampling_locations": 1, "grad_attention_weights": 2}.get(name, 0)
        assert actual.dtype == getattr(torch, dtypes[input_index]), f"{case}/{name} dtype {actual.dtype}"
        assert _relative_error(actual, expected) <= tolerance, f"{case}/{name}: {_relative_error(actual, expected)}"
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual.double(), expected, rtol=max(tolerance, 1e-10), atol=tolerance * scale)


def test_float64_gradcheck(interpreted):
    assert interpreted["gradcheck"] == "ok"


def test_gradients_only_where_required(interpreted):
    value_grads = interpreted["partial"]["only_value"]
    assert value_grads[0] is not None and value_grads[1] is None and value_grads[2] is None
    assert torch.isfinite(value_grads[0]).all() and value_grads[0].abs().sum() > 0
    location_grads = interpreted["partial"]["only_locations"]
    assert location_grads[0] is None and location_grads[1] is not None and location_grads[2] is None
    assert torch.isfinite(location_grads[1]).all()


def test_empty_query_set(interpreted):
    out, grads = interpreted["partial"]["empty"]
    assert out.shape == (1, 0, 8)
    assert torch.equal(grads[0], torch.zeros_like(grads[0]))
    assert grads[1].shape == (1, 0, 2, 1, 2, 2) and grads[2].shape == (1, 0, 2, 1, 2)


# --------------------------------------------------------------------------------------------------------------
# In-process tests (no kernel launch)


def test_reference_equals_library_pytorch_path():
    """The reference used above is the package's pure-PyTorch path (float64, CPU)."""
    from sparse_semi_detr_hf.deformable_attention import multi_scale_deformable_attention_pytorch

    shapes = [(5, 7), (3, 4), (1, 2)]
    inputs = random_inputs(shapes, 2, 3, 4, 6, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(reference_msda(inputs[0], shapes, *inputs[1:]),
                               multi_scale_deformable_attention_pytorch(inputs[0], shapes, *inputs[1:]))


def test_module_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = _load_kernel_module()
    assert module.is_triton_available() is False
    inputs = random_inputs([(2, 2)], 1, 1, 4, 2, 1, torch.Generator().manual_seed(0))
    spatial_shapes, starts = level_tables([(2, 2)])
    with pytest.raises(RuntimeError, match="triton"):
        module.multi_scale_deformable_attention_triton(inputs[0], spatial_shapes, starts, *inputs[1:])


@pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")
def test_input_validation():
    module = _load_kernel_module()
    inputs = random_inputs([(2, 2)], 1, 1, 4, 2, 1, torch.Generator().manual_seed(0))
    spatial_shapes, starts = level_tables([(2, 2)])
    call = module.multi_scale_deformable_attention_triton
    with pytest.raises(ValueError, match="attention_weights"):
        call(inputs[0], spatial_shapes, starts, inputs[1], inputs[2][:, :1])
    with pytest.raises(ValueError, match="spatial_shapes"):
        call(inputs[0], spatial_shapes[:, :1], starts, *inputs[1:])
    if not module._interpreting():
        with pytest.raises(RuntimeError, match="CUDA"):
            call(inputs[0], spatial_shapes, starts, *inputs[1:])


@pytest.mark.skipif(not TRITON_INSTALLED, reason="triton is not installed")
def test_default_block_q_fills_the_device_for_small_batches():
    module = _load_kernel_module()
    for queries, batch_heads in ((900, 8), (900, 64), (18000, 64), (3, 1)):
        block_q = module.default_block_q(queries, batch_heads, samples=16, head_dim=32, element_size=2)
        assert block_q >= 1 and block_q & (block_q - 1) == 0
        assert block_q == 1 or -(-queries // block_q) * batch_heads >= module._TARGET_PROGRAMS


# --------------------------------------------------------------------------------------------------------------
# CUDA tests


@functools.lru_cache(maxsize=1)
def _cuda_kernels():
    """The kernel file, loaded once by path (so a package-level import problem cannot hide kernel results)."""
    return _load_kernel_module()


def _cuda_case(dtype, queries, shapes, head_dim=32, batch=2, heads=8, points=4, seed=0, sampling_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    master = random_inputs(shapes, batch, heads, head_dim, queries, points, generator, device="cuda")
    dtypes = (dtype, sampling_dtype or dtype, sampling_dtype or dtype)
    inputs = [t.to(d).requires_grad_() for t, d in zip(master, dtypes)]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    spatial_shapes, starts = level_tables(shapes, device="cuda")
    out = _cuda_kernels().multi_scale_deformable_attention_triton(inputs[0], spatial_shapes, starts, *inputs[1:])
    reference = reference_msda(exact[0], shapes, *exact[1:])
    torch.manual_seed(seed)  # the same upstream gradient for the same seed (H100: two runs differed here)
    grad_out = torch.randn_like(reference).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    reference_grads = torch.autograd.grad(reference, exact, grad_out.double())
    return [out, *grads], [reference, *reference_grads]


def _pytorch_path_errors(dtype, queries, shapes, batch, seed=0):
    """Relative errors of the pure-PyTorch path (grid_sample) in ``dtype`` against float64, on the same inputs."""
    generator = torch.Generator().manual_seed(seed)
    master = random_inputs(shapes, batch, 8, 32, queries, 4, generator, device="cuda")
    inputs = [t.to(dtype).requires_grad_() for t in master]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out = reference_msda(inputs[0], shapes, *inputs[1:])
    reference = reference_msda(exact[0], shapes, *exact[1:])
    torch.manual_seed(seed)
    grad_out = torch.randn_like(reference).to(dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    reference_grads = torch.autograd.grad(reference, exact, grad_out.double())
    return [_relative_error(a, e) for a, e in zip([out, *grads], [reference, *reference_grads])]


CUDA_SHAPES = [(100, 136), (50, 68), (25, 34), (13, 17)]
needs_cuda = pytest.mark.skipif(not (TRITON_INSTALLED and torch.cuda.is_available()), reason="needs CUDA + triton")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("queries", [900, 18071])
def test_cuda_matches_reference(dtype, tolerance, queries):
    """Within the dtype's tolerance of float64, or (H100 finding: the location gradient at 18k encoder queries
    loses ~5e-3 in float32 on BOTH paths, from the cancellation in ``x - floor(x)`` at large pixel coordinates)
    no worse than 1.5x the PyTorch path's own error in the same dtype."""
    batch = 2 if queries == 900 else 1
    actual, expected = _cuda_case(dtype, queries, CUDA_SHAPES, batch=batch)
    pytorch_errors = _pytorch_path_errors(dtype, queries, CUDA_SHAPES, batch)
    for name, a, e, pytorch_error in zip(("output", *GRAD_NAMES), actual, expected, pytorch_errors):
        assert a.dtype == dtype and not torch.isnan(a).any(), name
        error = _relative_error(a, e)
        assert error <= max(tolerance, 1.5 * pytorch_error), f"{name}: {error} (PyTorch path {pytorch_error})"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("head_dim", [48, 64, 128])
def test_cuda_other_head_dims(head_dim):
    actual, expected = _cuda_case(torch.float32, 300, [(20, 30), (10, 15), (5, 8)], head_dim=head_dim, heads=4)
    for name, a, e in zip(("output", *GRAD_NAMES), actual, expected):
        assert _relative_error(a, e) <= 1e-5, f"{name}: {_relative_error(a, e)}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_value_with_float32_sampling():
    """What autocast feeds the attention: bf16 value, float32 locations and weights (gradients in those dtypes)."""
    actual, expected = _cuda_case(torch.bfloat16, 900, CUDA_SHAPES, sampling_dtype=torch.float32)
    dtypes = (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32)
    for name, a, e, dtype in zip(("output", *GRAD_NAMES), actual, expected, dtypes):
        assert a.dtype == dtype, name
        assert _relative_error(a, e) <= (2e-2 if dtype == torch.bfloat16 else 1e-5), f"{name}: {_relative_error(a, e)}"


@pytest.mark.gpu
@needs_cuda
def test_cuda_backward_is_stable_across_runs():
    """Atomic accumulation may reorder additions (tiny differences) but must not race."""
    first, _ = _cuda_case(torch.float32, 900, CUDA_SHAPES, seed=5)
    second, _ = _cuda_case(torch.float32, 900, CUDA_SHAPES, seed=5)
    for name, a, b in zip(("output", *GRAD_NAMES), first, second):
        # value gradients come from atomic adds in any order: equal up to float32 rounding of the sums
        assert _relative_error(a, b.double()) <= 1e-6, f"{name}: {_relative_error(a, b.double())}"
