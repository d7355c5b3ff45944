"""Where the time of one training step and of one inference call goes (GPU; runs on CPU as a smoke test).

Run from the repository root:

    python benchmarks/profile_step.py --device cuda --output_dir outputs/profile      # ResNet-50, 900 queries
    python benchmarks/profile_step.py --preset cpu_smoke                              # tiny, CPU, ~1 minute

Three measurements, each written to ``--output_dir`` as it finishes (``profile.json``; ``summary.md`` at the end):

1. ``phases``: the supervised training step (``--batch``×``--height``×``--width``, default model, denoising on)
   cut at module boundaries (backbone, neck, encoder, query selection, denoising + decoder, loss, backward,
   optimizer) by CUDA events recorded from forward hooks, so nothing synchronizes inside the step: each phase is the
   GPU timeline between two marks, idle gaps included (a gap means the GPU waited for the host). The host's clock
   at the same marks shows how far the Python side ran ahead of the GPU (``host_ms`` close to ``device_ms`` in
   the loss: the GPU waited for the host there). Medians over ``--steps`` after ``--warmup``.
2. ``profiler``: ``torch.profiler`` over ``--profile_steps`` training steps (fp32) and over batch-1 inference
   calls (fp32 and bf16): the kernels that take the device time, the number of kernel launches per step, the
   device-busy fraction (sum of kernel time / wall time), and the host syncs (``cudaStreamSynchronize``,
   ``cudaMemcpy*`` device-to-host, ``aten::item`` / ``_local_scalar_dense`` / ``nonzero``) with their callers.
3. ``inference``: one ``1×800×1333`` image (``--infer``) eager, replayed from CUDA graphs
   (``sparse_semi_detr_hf.cuda_graphs.CudaGraphDetector``) and, with ``--compile_mode``, under
   ``torch.compile``, in fp32 and bf16: median ms and the largest difference to eager fp32 on one fixed input.
"""

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench_model import DTYPES, autocast_for, parse_with_preset, random_images, random_targets  # noqa: E402
from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection  # noqa: E402
from sparse_semi_detr_hf.cuda_graphs import CudaGraphDetector  # noqa: E402

DEFAULTS = dict(device=None, batch=4, height=800, width=1088, queries=900, layers=6, backbone="resnet50",
                steps=10, warmup=3, profile_steps=3, infer="1x800x1333", infer_steps=20, dtypes="fp32,bf16")
PRESETS = {"cpu_smoke": dict(device="cpu", batch=1, height=128, width=128, queries=50, layers=1,
                             backbone="resnet18", steps=2, warmup=1, profile_steps=1, infer="1x128x128",
                             infer_steps=2, dtypes="fp32")}
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
            "aten::_local_scalar_dense", "aten::nonzero", "cudaMemcpy")
LAUNCH_OPS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
# (module path, mark at its end); the denoising queries are built between the query selection and the decoder.
MARKS = (("model.backbone", "backbone"), ("model.neck", "neck"), ("model.encoder", "encoder"),
         ("model.query_selection", "query selection"), ("model.decoder", "denoising + decoder"),
         ("criterion", "loss"))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(value) if value is not None else str)
    parser.add_argument("--compile_mode", default=None,
                        help="also time torch.compile(model, mode=...) inference; comma-separated modes "
                             "(default, reduce-overhead, ...)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: phases,profiler,inference")
    parser.add_argument("--output_dir", default="outputs/profile")
    parser.add_argument("--trace", action="store_true", help="also write a Chrome trace of batch-1 inference")
    parser.set_defaults(**DEFAULTS)
    args = parse_with_preset(parser, PRESETS, argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def build_model(args) -> SparseSemiDetrForObjectDetection:
    torch.manual_seed(0)
    config = SparseSemiDetrConfig(backbone=args.backbone, num_queries=args.queries, encoder_layers=args.layers,
                                  decoder_layers=args.layers, num_labels=91)
    return SparseSemiDetrForObjectDetection(config).to(args.device)


class Clock:
    """Marks on the device timeline (CUDA events, no sync) and the host clock at the same moments."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, float]] = []

    def mark(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((name, event, time.perf_counter()))

    def phases(self) -> dict[str, tuple[float, float]]:
        """``{phase: (device_ms, host_ms)}`` between consecutive marks (device = host on CPU)."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for (_, start, host_start), (name, end, host_end) in zip(self.marks, self.marks[1:]):
            host = (host_end - host_start) * 1e3
            out[name] = (start.elapsed_time(end) if self.cuda else host, host)
        return out


@contextlib.contextmanager
def marked(model, clock: Clock):
    handles = [model.get_submodule(path).register_forward_hook(lambda *_, n=name: clock.mark(n))
               for path, name in MARKS]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def training_step(model, optimizer, args, dtype: str, generator, cpu_generator, clock: Clock | None = None):
    pixel_values, pixel_mask = random_images(args.batch, args.height, args.width, args.device, generator)
    labels = random_targets(args.batch, model.config.num_labels, args.device, cpu_generator)
    mark = clock.mark if clock else (lambda name: None)
    mark("start")
    optimizer.zero_grad(set_to_none=True)
    with autocast_for(args.device, dtype), (marked(model, clock) if clock else contextlib.nullcontext()):
        loss = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
    loss.backward()
    mark("backward")
    optimizer.step()
    mark("optimizer")


def measure_phases(model, args, dtype: str, fused: bool = False) -> dict:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  **({"fused": True} if fused else {}))
    generator = torch.Generator(device=args.device).manual_seed(0)
    cpu_generator = torch.Generator().manual_seed(0)
    runs = []
    for index in range(args.warmup + args.steps):
        clock = Clock(args.device)
        training_step(model, optimizer, args, dtype, generator, cpu_generator, clock)
        if index >= args.warmup:
            runs.append(clock.phases())
    phases = {name: {"device_ms": statistics.median(run[name][0] for run in runs),
                     "host_ms": statistics.median(run[name][1] for run in runs)} for name in runs[0]}
    total = statistics.median(sum(d for d, _ in run.values()) for run in runs)
    return {"dtype": dtype, "optimizer": "AdamW(fused=True)" if fused else "AdamW", "phases": phases,
            "step_ms": total}


def summarize_profile(prof, calls: int, top: int = 20) -> dict:
    """Top kernels by device time, launches and busy fraction per call, host syncs with their counts."""
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    by_kernel: dict[str, list[float]] = {}
    for event in kernels:
        by_kernel.setdefault(event.name[:90], []).append(event.device_time_total / 1e3)
    kernel_ms = sum(sum(v) for v in by_kernel.values())
    top_kernels = sorted(((name, len(v), sum(v)) for name, v in by_kernel.items()), key=lambda x: -x[2])[:top]
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    wall_ms = (max(e.time_range.end for e in cpu_events) - min(e.time_range.start for e in cpu_events)) / 1e3
    syncs = Counter()
    sync_ms = Counter()
    for event in cpu_events:
        if event.name.startswith(SYNC_OPS):
            syncs[event.name] += 1
            sync_ms[event.name] += event.cpu_time_total / 1e3
    launches = sum(1 for e in cpu_events if e.name in LAUNCH_OPS)
    callers = Counter(sync_caller(e) for e in cpu_events if e.name.startswith(("cudaStreamSynchronize", "cudaMemcpy")))
    return {
        "calls": calls, "wall_ms_per_call": wall_ms / calls, "kernel_ms_per_call": kernel_ms / calls,
        "device_busy_fraction": kernel_ms / wall_ms if wall_ms else None,
        "kernel_launches_per_call": launches / calls,
        "host_syncs_per_call": {name: count / calls for name, count in syncs.items()},
        "host_sync_ms_per_call": {name: value / calls for name, value in sync_ms.items()},
        "sync_callers_per_call": {name: count / calls for name, count in callers.most_common(25)},
        "top_kernels": [{"name": n, "count_per_call": c / calls, "ms_per_call": t / calls,
                         "share": t / kernel_ms if kernel_ms else None} for n, c, t in top_kernels],
        "top_ops_by_self_cpu": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
    }


def sync_caller(event) -> str:
    """``op <- ... <- file.py(line): function`` for a sync/copy event: its enclosing ops and the first two frames of
    this repository's code above it (python frames are recorded with ``with_stack=True``)."""
    ops, frames, parent = [], [], event.cpu_parent
    while parent is not None and len(frames) < 2:
        name = parent.name
        if ".py(" in name:
            if "sparse_semi_detr_hf" in name or "benchmarks" in name:
                frames.append(name.split("/")[-1])
        elif len(ops) < 2 and not name.startswith("<built-in"):
            ops.append(name)
        parent = parent.cpu_parent
    return " <- ".join(ops + frames)


def activities(device: torch.device) -> list:
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def profile_training(model, args) -> dict:
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator(device=args.device).manual_seed(1)
    cpu_generator = torch.Generator().manual_seed(1)
    for _ in range(args.warmup):
        training_step(model, optimizer, args, "fp32", generator, cpu_generator)
    synchronize(args.device)
    with profile(activities=activities(args.device), with_stack=True) as prof:
        for _ in range(args.profile_steps):
            training_step(model, optimizer, args, "fp32", generator, cpu_generator)
        synchronize(args.device)
    return summarize_profile(prof, args.profile_steps)


def profile_inference(model, args, dtype: str, shape, trace_path: Path | None) -> dict:
    model.eval()
    generator = torch.Generator(device=args.device).manual_seed(2)
    pixel_values, pixel_mask = random_images(*shape, args.device, generator)

    def call():
        with torch.inference_mode(), autocast_for(args.device, dtype):
            model(pixel_values=pixel_values, pixel_mask=pixel_mask)

    for _ in range(args.warmup):
        call()
    synchronize(args.device)
    calls = max(args.profile_steps, 5)
    with profile(activities=activities(args.device)) as prof:
        for _ in range(calls):
            call()
        synchronize(args.device)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return {"dtype": dtype, "shape": list(shape), **summarize_profile(prof, calls)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(function, warmup: int, steps: int, device: torch.device) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def max_difference(output, reference) -> dict:
    """Per-query differences, and the order-free one of the sorted best scores (a different top-k order among
    near-tied proposals moves queries around without changing what is detected)."""

    def sorted_scores(out):
        return out.logits.float().sigmoid().amax(-1).sort(-1, descending=True).values

    return {"logits": (output.logits.float() - reference.logits.float()).abs().max().item(),
            "pred_boxes": (output.pred_boxes.float() - reference.pred_boxes.float()).abs().max().item(),
            "sorted_scores": (sorted_scores(output) - sorted_scores(reference)).abs().max().item(),
            "finite": bool(torch.isfinite(output.logits).all() and torch.isfinite(output.pred_boxes).all())}


def inference_variants(model, args, shape, records: list, save) -> None:
    """Eager, CUDA graphs and (``--compile_mode``) compiled inference: median ms and difference to eager fp32,
    appended to ``records`` and saved one by one."""
    model.eval()
    generator = torch.Generator(device=args.device).manual_seed(3)
    pixel_values, pixel_mask = random_images(*shape, args.device, generator)
    with torch.inference_mode():
        reference = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    for dtype in args.dtypes.split(","):
        runners = {"eager": None, "CUDA graphs": CudaGraphDetector(model, autocast_dtype=DTYPES[dtype])}
        for mode in filter(None, (args.compile_mode or "").split(",")):
            runners[f"torch.compile({mode})"] = mode
        for name, runner in runners.items():
            record = {"variant": name, "dtype": dtype, "shape": list(shape)}
            started = time.perf_counter()
            try:
                call = make_call(model, runner, dtype, args, pixel_values, pixel_mask)
                call()
                record["first_call_s"] = time.perf_counter() - started
                record["median_ms"] = median_ms(call, args.warmup, args.infer_steps, args.device)
                record["max_abs_diff_vs_eager_fp32"] = max_difference(call(), reference)
            except Exception as error:  # noqa: BLE001 - a failed variant must not lose the others
                record["error"] = f"{type(error).__name__}: {error}"[:600]
            print(f"  inference {name:<32} {dtype}: {record.get('median_ms', record.get('error'))}", flush=True)
            records.append(record)
            save()


def make_call(model, runner, dtype: str, args, pixel_values, pixel_mask):
    if isinstance(runner, CudaGraphDetector):
        return lambda: runner(pixel_values, pixel_mask)
    target = model
    if isinstance(runner, str):
        torch._dynamo.reset()
        target = torch.compile(model, mode=runner)

    def call():
        with torch.inference_mode(), autocast_for(args.device, dtype):
            return target(pixel_values=pixel_values, pixel_mask=pixel_mask)

    return call


def markdown(results: dict) -> str:
    lines = [f"# Profile: {results['meta']['device']}, torch {results['meta']['torch']}", ""]
    for entry in results.get("phases", []):
        lines += [f"## Training step phases ({entry['dtype']}, {entry['optimizer']}, step {entry['step_ms']:.1f} ms "
                  "on the device timeline)", "", "| phase | device ms | host ms |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {v['device_ms']:.1f} | {v['host_ms']:.1f} |" for name, v in entry["phases"].items()]
        lines.append("")
    for title, entry in [("Training step (fp32)", results.get("profile_training"))] + [
            (f"Inference {'x'.join(map(str, e['shape']))} ({e['dtype']})", e)
            for e in results.get("profile_inference", [])]:
        if not entry:
            continue
        lines += [f"## Profiler: {title}", "",
                  f"wall {entry['wall_ms_per_call']:.1f} ms per call, kernels {entry['kernel_ms_per_call']:.1f} ms "
                  f"(device busy {100 * (entry['device_busy_fraction'] or 0):.0f} %), "
                  f"{entry['kernel_launches_per_call']:.0f} kernel launches per call; host syncs per call: "
                  f"{json.dumps({k: round(v, 1) for k, v in entry['host_syncs_per_call'].items()})}", "",
                  "| kernel | per call | ms per call | share |", "| --- | ---: | ---: | ---: |"]
        callers = entry.get("sync_callers_per_call") or {}
        lines += [f"| `{k['name'][:70]}` | {k['count_per_call']:.0f} | {k['ms_per_call']:.2f} | "
                  f"{100 * (k['share'] or 0):.1f} % |" for k in entry["top_kernels"][:12]]
        if callers:
            lines += ["", "Host syncs / device-to-host copies by caller (per call):", ""]
            lines += [f"- {count:.1f} × `{name[:150]}`" for name, count in list(callers.items())[:12]]
        lines.append("")
    if results.get("inference"):
        lines += ["## Inference variants", "", "| variant | dtype | median ms | max abs diff logits / boxes vs eager "
                  "fp32 | first call s |", "| --- | --- | ---: | --- | ---: |"]
        for r in results["inference"]:
            diff = r.get("max_abs_diff_vs_eager_fp32")
            diff_text = (f"{diff['logits']:.2e} / {diff['pred_boxes']:.2e} (sorted scores {diff['sorted_scores']:.2e})"
                         if diff else r.get("error", "")[:80])
            lines.append(f"| {r['variant']} | {r['dtype']} | {r.get('median_ms', float('nan')):.2f} | {diff_text} | "
                         f"{r.get('first_call_s', float('nan')):.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    skip = set(args.skip.split(",")) - {""}
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    results = {"meta": {"device": device_name, "torch": torch.__version__, "command": sys.argv,
                        "args": {k: str(v) for k, v in vars(args).items()}}}

    def save():
        (output_dir / "profile.json").write_text(json.dumps(results, indent=2, default=str))

    model = build_model(args)
    shape = tuple(int(v) for v in args.infer.split("x"))
    if "phases" not in skip:
        results["phases"] = []
        variants = [(dtype, False) for dtype in args.dtypes.split(",")]
        if args.device.type == "cuda":
            variants.append(("fp32", True))  # the fused AdamW kernel exists on CUDA only
        for dtype, fused in variants:
            results["phases"].append(measure_phases(model, args, dtype, fused))
            print(f"phases {dtype} fused={fused}: {results['phases'][-1]}", flush=True)
            save()
    if "profiler" not in skip:
        results["profile_training"] = profile_training(model, args)
        save()
        results["profile_inference"] = []
        for dtype in args.dtypes.split(","):
            trace = output_dir / f"trace_inference_{dtype}.json" if args.trace else None
            results["profile_inference"].append(profile_inference(model, args, dtype, shape, trace))
            save()
    if "inference" not in skip:
        results["inference"] = []
        inference_variants(model, args, shape, results["inference"], save)
    summary = markdown(results)
    (output_dir / "summary.md").write_text(summary)
    print(summary)
    return results


if __name__ == "__main__":
    main()
