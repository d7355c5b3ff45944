"""Check and time the fused Triton multi-scale deformable attention against the PyTorch path on one CUDA GPU.

Run from the repository root:  python3 benchmarks/check_attention_kernel.py [--quick] [--no-sweep]

For DINO-like shapes (d_model 256 = 8 heads x 32, 4 levels at strides 8/16/32/64 of 800x1088 and 640x640 images,
P = 4, padded images with value zeroed on padding, batch 1/4/8, Q = 900 decoder queries or Q = S encoder queries)
and three dtype modes:
  fp32  every input float32;
  bf16  every input bfloat16;
  amp   value bfloat16, locations and weights float32, the PyTorch path under torch.autocast(bfloat16)
        (what a mixed-precision training step feeds the attention),
it draws fresh random inputs for every check, compares the output and the three gradients of both paths with a
float64 reference (the PyTorch path on upcast inputs), with the kernel's outputs NaN-poisoned before the run, and
times forward and forward+backward of both paths with triton.testing.do_bench (median, L2 flushed between runs).
Then it sweeps the kernel's launch configuration on two shapes. The summary table is printed last; full numbers go
to $OUT/attention_kernel.json when $OUT is set.
"""

import argparse
import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
log = logging.getLogger("check_attention_kernel")

COPY_BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy (read + write) measured on the H100 of this workplace
FP32_RATE = 67e12  # non-tensor fp32 FLOP/s of an H100 SXM (datasheet; not measured here)
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "amp": 2e-2}
STRIDES = (8, 16, 32, 64)
HEADS, HEAD_DIM, POINTS = 8, 32, 4
DEVICE = "cuda"


def _load_by_path(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", REPO / "sparse_semi_detr_hf" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_kernels():
    """The Triton module and the PyTorch path: package imports, else the files by path, else this script's
    own grid_sample reference for the PyTorch path."""
    try:
        from sparse_semi_detr_hf import deformable_attention_triton as kernels
    except Exception as error:  # noqa: BLE001 - e.g. another transformers version on the device machine
        log.warning("package import failed (%s); loading the kernel file by path", error)
        kernels = _load_by_path("deformable_attention_triton")
    try:
        from sparse_semi_detr_hf.deformable_attention import multi_scale_deformable_attention_pytorch as torch_path
    except Exception as error:  # noqa: BLE001
        log.warning("package import of the PyTorch path failed (%s); trying the file by path", error)
        try:
            torch_path = _load_by_path("deformable_attention").multi_scale_deformable_attention_pytorch
        except Exception as error:  # noqa: BLE001
            log.warning("PyTorch path unavailable (%s); using this script's grid_sample reference", error)
            torch_path = grid_sample_reference
    return kernels, torch_path


def grid_sample_reference(value, shapes, locations, weights):
    """Fallback PyTorch path: ``F.grid_sample`` per level, weighted sum -> ``(B, Q, H*Dh)``."""
    batch, _, heads, head_dim = value.shape
    queries, points = locations.shape[1], locations.shape[4]
    locations, weights = locations.to(value.dtype), weights.to(value.dtype)
    out = 0
    for level, value_l in enumerate(value.split([h * w for h, w in shapes], dim=1)):
        image = value_l.permute(0, 2, 3, 1).reshape(batch * heads, head_dim, *shapes[level])
        grid = (2 * locations[:, :, :, level] - 1).transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        weight = weights[:, :, :, level].transpose(1, 2).reshape(batch * heads, 1, queries, points)
        out = out + (sampled * weight).sum(-1)
    return out.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous()


# ------------------------------------------------------------------------------------------------ inputs


def level_shapes(image_hw):
    return [(math.ceil(image_hw[0] / s), math.ceil(image_hw[1] / s)) for s in STRIDES]


def make_inputs(shapes, batch, num_queries, generator, device):
    """float32 inputs shaped like a DINO layer's: returns value, locations, weights (all on ``device``).

    Each image keeps a random valid region (valid ratio 0.7..1, image 0 unpadded); value is zero on padding.
    Encoder (``num_queries=None``): one query per pixel of every level, sampling around its own position
    (scaled by the valid ratios as in Deformable DETR) with offsets of about ``p + 1`` pixels. Decoder: random
    boxes in the valid region, offsets within about half the box. Weights: softmax over the L*P samples.
    """
    levels = len(shapes)
    ratios = torch.rand(batch, 2, generator=generator) * 0.3 + 0.7
    ratios[0] = 1.0
    values, refs = [], []
    for height, width in shapes:
        valid_h = torch.ceil(ratios[:, 1] * height)[:, None, None]
        valid_w = torch.ceil(ratios[:, 0] * width)[:, None, None]
        rows = torch.arange(height)[None, :, None].expand(batch, height, width)
        cols = torch.arange(width)[None, None, :].expand(batch, height, width)
        mask = (rows < valid_h) & (cols < valid_w)
        values.append((torch.randn(batch, height * width, HEADS, HEAD_DIM, generator=generator)
                       * mask.flatten(1)[..., None, None]))
        centres = torch.stack(((cols + 0.5) / (valid_w), (rows + 0.5) / (valid_h)), -1)
        refs.append(centres.flatten(1, 2))
    value = torch.cat(values, 1)
    pixel = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)  # (L, 2) as (W, H)
    if num_queries is None:  # encoder: reference = own pixel centre, scaled by each level's valid ratio
        ref = torch.cat(refs, 1)[:, :, None, :] * ratios[:, None, None, :]  # (B, S, L, 2)
        spread = torch.arange(1, POINTS + 1, dtype=torch.float32)[:, None] / pixel[:, None, :]  # (L, P, 2)
        offsets = torch.randn(batch, ref.shape[1], HEADS, levels, POINTS, 2, generator=generator) * spread
        locations = ref[:, :, None, :, None, :] + offsets
    else:  # decoder: boxes inside the valid region
        centre = torch.rand(batch, num_queries, 1, 1, 1, 2, generator=generator) * ratios[:, None, None, None, None]
        size = torch.rand(batch, num_queries, 1, 1, 1, 2, generator=generator) * 0.45 + 0.05
        offsets = torch.randn(batch, num_queries, HEADS, levels, POINTS, 2, generator=generator)
        locations = centre + offsets / POINTS * size * 0.5
    logits = torch.randn(*locations.shape[:3], levels * POINTS, generator=generator)
    weights = logits.softmax(-1).view(locations.shape[:-1])
    return value.to(device), locations.to(device), weights.to(device)


def level_tables(shapes, device):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def cast_inputs(inputs, mode):
    if mode == "fp32":
        return [t.float() for t in inputs]
    if mode == "bf16":
        return [t.bfloat16() for t in inputs]
    return [inputs[0].bfloat16(), inputs[1].float(), inputs[2].float()]


# ------------------------------------------------------------------------------------------------ checks


@contextlib.contextmanager
def poisoned_empty():
    """Every floating ``torch.empty`` / ``empty_like`` comes back NaN-filled (so unwritten outputs show)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def autocast_for(mode):
    return torch.autocast("cuda", dtype=torch.bfloat16) if mode == "amp" else contextlib.nullcontext()


def forward_backward(function, inputs, grad_out):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = function(*leaves)
    return [out, *torch.autograd.grad(out, leaves, grad_out.to(out.dtype))]


def relative_error(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(kernels, torch_path, shapes, inputs, mode, generator):
    """Relative L2 errors (output, grad value, grad locations, grad weights) of both paths vs float64."""
    device = inputs[0].device
    batch, queries = inputs[1].shape[:2]
    spatial_shapes, starts = level_tables(shapes, device)
    grad_out = torch.randn(batch, queries, HEADS * HEAD_DIM, generator=generator).to(device, inputs[0].dtype)
    reference = forward_backward(lambda v, l, a: torch_path(v, shapes, l, a), [t.double() for t in inputs],
                                 grad_out.double())
    with poisoned_empty():
        ours = forward_backward(lambda v, l, a: kernels.multi_scale_deformable_attention_triton(
            v, spatial_shapes, starts, l, a), inputs, grad_out)
        torch.cuda.synchronize()
    with autocast_for(mode):
        theirs = forward_backward(lambda v, l, a: torch_path(v, shapes, l, a), inputs, grad_out)
    bad_dtype = [t.dtype for t, x in zip(ours, [inputs[0], *inputs]) if t.dtype != x.dtype]
    return {"triton": [relative_error(a, e) for a, e in zip(ours, reference)],
            "pytorch": [relative_error(a, e) for a, e in zip(theirs, reference)],
            "nan": any(bool(torch.isnan(t).any()) for t in ours), "bad_dtype": [str(d) for d in bad_dtype]}


# ------------------------------------------------------------------------------------------------ timing


def bench(function):
    from triton.testing import do_bench

    return do_bench(function, warmup=25, rep=100, return_mode="median")


def time_paths(kernels, torch_path, shapes, inputs, mode):
    """Median ms of forward and forward+backward for the Triton kernel and the PyTorch path."""
    device = inputs[0].device
    spatial_shapes, starts = level_tables(shapes, device)
    leaves = [t.detach().requires_grad_() for t in inputs]
    grad_out = torch.randn(*inputs[1].shape[:2], HEADS * HEAD_DIM, device=device, dtype=inputs[0].dtype)

    def triton_fn(*args):
        return kernels.multi_scale_deformable_attention_triton(args[0], spatial_shapes, starts, *args[1:])

    def torch_fn(*args):
        with autocast_for(mode):
            return torch_path(args[0], shapes, *args[1:])

    times = {}
    for name, function in (("triton", triton_fn), ("pytorch", torch_fn)):
        with torch.no_grad():
            times[f"{name}_fwd"] = bench(lambda: function(*leaves))
        grad = grad_out.to(function(*leaves).dtype)  # amp: the PyTorch path returns float32
        times[f"{name}_fwdbwd"] = bench(lambda: torch.autograd.grad(function(*leaves), leaves, grad))
    return times


def floors(shapes, batch, queries, mode):
    """(forward, forward+backward) lower bounds in ms: max(bytes / copy bandwidth, FLOPs / fp32 rate)."""
    keys = sum(h * w for h, w in shapes)
    samples = batch * queries * HEADS * len(shapes) * POINTS
    value_bytes = 4 if mode == "fp32" else 2
    sampling_bytes = 2 if mode == "bf16" else 4
    value = batch * keys * HEADS * HEAD_DIM * value_bytes
    output = batch * queries * HEADS * HEAD_DIM * value_bytes
    sampling = samples * 3 * sampling_bytes  # x, y, weight
    forward_bytes = value + sampling + output
    backward_bytes = output + value + sampling + value + sampling  # read grad, value, sampling; write the grads
    forward_flops, backward_flops = 8 * samples * HEAD_DIM, 16 * samples * HEAD_DIM
    fwd = max(forward_bytes / COPY_BANDWIDTH, forward_flops / FP32_RATE)
    bwd = max(backward_bytes / COPY_BANDWIDTH, backward_flops / FP32_RATE)
    return 1e3 * fwd, 1e3 * (fwd + bwd)


# ------------------------------------------------------------------------------------------------ sweep

# (block_q, num_warps): 16 or 32 elements per thread of each (block_q, 16, 32) corner tile
SWEEP = [(1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4), (8, 8), (16, 8)]


def sweep(kernels, shapes, inputs):
    """Median ms of the bare forward and backward launchers for each (block_q, num_warps); default timed twice."""
    device = inputs[0].device
    spatial_shapes, starts = level_tables(shapes, device)
    value, locations, weights = [t.contiguous() for t in inputs]
    grad_out = torch.randn(*locations.shape[:2], HEADS * HEAD_DIM, device=device, dtype=value.dtype)
    rows = []
    for block_q, warps in [(None, None), *SWEEP, (None, None)]:
        fwd = bench(lambda: kernels.msda_forward(value, spatial_shapes, starts, locations, weights, block_q, warps))
        bwd = bench(lambda: kernels.msda_backward(grad_out, value, spatial_shapes, starts, locations, weights,
                                                  block_q=block_q, num_warps=warps))
        rows.append({"block_q": block_q or "default", "warps": warps or "default", "fwd_ms": fwd, "bwd_ms": bwd})
    return rows


# ------------------------------------------------------------------------------------------------ main


def configurations(quick):
    images = [(800, 1088)] if quick else [(800, 1088), (640, 640)]
    batches = [1, 8] if quick else [1, 4, 8]
    return [(image, batch, queries) for image in images for batch in batches for queries in (900, None)]


def run_one(kernels, torch_path, image, batch, queries, mode, seed):
    shapes = level_shapes(image)
    generator = torch.Generator().manual_seed(seed)
    inputs = cast_inputs(make_inputs(shapes, batch, queries, generator, DEVICE), mode)
    num_queries = inputs[1].shape[1]
    errors = check(kernels, torch_path, shapes, inputs, mode, generator)
    errors["pass"] = (not errors["nan"] and not errors["bad_dtype"]
                      and max(errors["triton"]) <= TOLERANCE[mode])
    times = time_paths(kernels, torch_path, shapes, inputs, mode)
    floor_fwd, floor_fwdbwd = floors(shapes, batch, num_queries, mode)
    return {"image": f"{image[0]}x{image[1]}", "batch": batch, "queries": num_queries,
            "role": "dec" if queries else "enc", "mode": mode, **errors, **times,
            "floor_fwd": floor_fwd, "floor_fwdbwd": floor_fwdbwd}


def print_table(rows, sweeps):
    for label, sweep_rows in sweeps.items():
        print(f"\nlaunch sweep, {label} (ms, median)")
        for row in sweep_rows:
            print(f"  block_q={row['block_q']!s:>7} warps={row['warps']!s:>7}  fwd {row['fwd_ms']:8.3f}  "
                  f"bwd {row['bwd_ms']:8.3f}")
    print("\ntimes in ms (median); err = max relative L2 error over (out, d value, d loc, d weight) vs float64; "
          "x = PyTorch / Triton; floor = max(bytes/3.0TB/s, flops/67TF)")
    print(f"{'image':>9} {'B':>2} {'role':>4} {'Q':>6} {'mode':>4} | {'ok':>4} {'err tri':>8} {'err pt':>8} | "
          f"{'fwd pt':>8} {'fwd tri':>8} {'x':>5} {'floor':>6} | {'f+b pt':>8} {'f+b tri':>8} {'x':>5} {'floor':>6}")
    for r in rows:
        if "error" in r:
            label = f"{r['image']:>9} {r['batch']:>2} {r['role']:>4} {r['queries']:>6} {r['mode']:>4}"
            print(f"{label} | ERROR {r['error']}")
            continue
        print(f"{r['image']:>9} {r['batch']:>2} {r['role']:>4} {r['queries']:>6} {r['mode']:>4} | "
              f"{'PASS' if r['pass'] else 'FAIL':>4} {max(r['triton']):8.1e} {max(r['pytorch']):8.1e} | "
              f"{r['pytorch_fwd']:8.3f} {r['triton_fwd']:8.3f} {r['pytorch_fwd'] / r['triton_fwd']:5.1f} "
              f"{r['floor_fwd']:6.3f} | {r['pytorch_fwdbwd']:8.3f} {r['triton_fwdbwd']:8.3f} "
              f"{r['pytorch_fwdbwd'] / r['triton_fwdbwd']:5.1f} {r['floor_fwdbwd']:6.3f}")
    failed = [r for r in rows if not r["pass"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} checks passed" + (" -- FAILURES above" if failed else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one image size, batches 1 and 8")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    parser.add_argument("--modes", default="fp32,bf16,amp")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import triton

    kernels, torch_path = import_kernels()
    props = torch.cuda.get_device_properties(0)
    log.info("%s, %d SMs, torch %s, triton %s", props.name, props.multi_processor_count, torch.__version__,
             triton.__version__)
    started, rows, sweeps = time.time(), [], {}
    for seed, (image, batch, queries) in enumerate(configurations(args.quick)):
        for mode in args.modes.split(","):
            try:
                rows.append(run_one(kernels, torch_path, image, batch, queries, mode, seed))
            except Exception as error:  # noqa: BLE001 - report and go on: one device call must give a full table
                log.exception("%s B=%d Q=%s %s failed", image, batch, queries, mode)
                rows.append({"image": f"{image[0]}x{image[1]}", "batch": batch, "queries": queries or "S",
                             "role": "dec" if queries else "enc", "mode": mode, "pass": False,
                             "error": repr(error)[:200]})
            log.info("%s", json.dumps(rows[-1]))
    if not args.no_sweep:
        for label, (batch, queries) in {"enc B=4 bf16": (4, None), "dec B=8 bf16": (8, 900)}.items():
            shapes = level_shapes((800, 1088))
            generator = torch.Generator().manual_seed(99)
            inputs = cast_inputs(make_inputs(shapes, batch, queries, generator, DEVICE), "bf16")
            try:
                sweeps[label] = sweep(kernels, shapes, inputs)
            except Exception:  # noqa: BLE001
                log.exception("sweep %s failed", label)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "attention_kernel.json").write_text(json.dumps({"rows": rows, "sweeps": sweeps}))
    log.info("total %.0f s", time.time() - started)
    print_table(rows, sweeps)
    return 0 if all(r["pass"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
