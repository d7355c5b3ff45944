"""Time Sparse Semi-DETR against transformers' Deformable DETR (two-stage + box refinement), side by side, in one run.

Run from the repository root:

    python benchmarks/bench_model.py --device cuda --output results.json          # GPU defaults (see README)
    python benchmarks/bench_model.py --preset cpu_smoke --device cpu               # tiny, well under a minute

Measured for every model variant ("ours (triton)", "ours (pytorch)", optionally compiled, and the anchor):
  * supervised training step: forward + backward + AdamW step on random images with ~10 random boxes per image
    (ours in its default training mode, i.e. with contrastive denoising queries): median step time, images/s and
    peak memory (``torch.cuda.max_memory_allocated``, reset before each measurement; CUDA only);
  * inference latency: eval mode under ``torch.inference_mode()``, median ms per batch, at each ``--infer`` shape;
  * for each dtype in ``--dtypes`` (``fp32``; ``bf16`` = bfloat16 autocast).
The anchor is ``transformers.DeformableDetrForObjectDetection`` configured from our config: same timm backbone
(random init, frozen BN), d_model, layers, heads, levels, points, FFN width, queries (``num_queries`` and
``two_stage_num_proposals``), labels, dropout, auxiliary losses. Nothing downloads weights (random init,
``HF_HUB_OFFLINE=1`` unless already set).

Timing: inputs are drawn fresh (``randn``, never zeros) before each call; the device is synchronized around a host
timer; warm-up calls are excluded; the median over ``--steps`` calls is reported. Our attention backend is chosen
per measurement through ``SPARSE_SEMI_DETR_ATTENTION_BACKEND`` (the dispatcher reads it on every call); the
backend that actually ran is recorded from the first warm-up call and checked. The markdown table comes last.
"""

import argparse
import contextlib
import gc
import importlib
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import transformers  # noqa: E402

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection  # noqa: E402
from sparse_semi_detr_hf import deformable_attention  # noqa: E402

BACKEND_ENV_VAR = deformable_attention.BACKEND_ENV_VAR
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
BOXES_PER_IMAGE = (8, 12)  # inclusive range of random targets per image (~10)
GPU_DEFAULTS = dict(batch=4, height=800, width=1088, queries=900, layers=6, steps=20, warmup=5,
                    infer="1x800x1333,8x640x640", backbone="resnet50")
PRESETS = {
    "cpu_smoke": dict(device="cpu", batch=1, height=128, width=128, queries=50, layers=1, steps=2, warmup=1,
                      dtypes="fp32", backbone="resnet18", infer="1x128x128"),
}


@dataclass(frozen=True)
class Variant:
    """One timed model: ``family`` is ``"ours"`` or ``"anchor"``; ``backend`` our attention backend (or None)."""

    family: str
    backend: str | None = None
    compiled: bool = False
    cuda_graphs: bool = False  # inference only: the eval forward replayed by CudaGraphDetector

    @property
    def name(self) -> str:
        if self.family == "anchor":
            return "anchor (HF Deformable DETR)"
        mode = ", compiled" if self.compiled else ", CUDA graphs" if self.cuda_graphs else ""
        return f"ours ({self.backend}{mode})"


# ------------------------------------------------------------------------------------------------ arguments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named set of defaults")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--batch", type=int, help="training batch size")
    parser.add_argument("--height", type=int, help="training image height")
    parser.add_argument("--width", type=int, help="training image width")
    parser.add_argument("--infer", help="inference shapes, comma-separated BxHxW (e.g. 1x800x1333,8x640x640)")
    parser.add_argument("--queries", type=int, help="matching queries (ours: num_queries; anchor: the same + "
                                                    "two_stage_num_proposals)")
    parser.add_argument("--layers", type=int, help="encoder and decoder layers (both models)")
    parser.add_argument("--backbone", help="timm backbone name (both models)")
    parser.add_argument("--steps", type=int, help="timed calls per measurement (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed calls before timing")
    parser.add_argument("--dtypes", default=None, help="fp32,bf16 (default: both on cuda, fp32 on cpu)")
    parser.add_argument("--backends", default=None,
                        help="our attention backends, comma-separated (default: triton,pytorch on cuda with Triton, "
                             "else pytorch)")
    parser.add_argument("--skip_anchor", action="store_true", help="do not time the transformers anchor")
    parser.add_argument("--skip_inference", action="store_true", help="only the training step")
    parser.add_argument("--compile", action="store_true", help="also time our model wrapped in torch.compile")
    parser.add_argument("--compile_mode", default=None,
                        help="torch.compile mode for --compile (default, reduce-overhead, max-autotune, ...)")
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="also time inference replayed from CUDA graphs (sparse_semi_detr_hf.cuda_graphs)")
    parser.add_argument("--semi", action="store_true", help="also time a full semi-supervised step (trainer hook)")
    parser.add_argument("--semi_query_modes", default="refined,cross_view",
                        help="query modes of the semi-supervised step (refined = Sparse Semi-DETR with RPF, "
                             "cross_view = Semi-DETR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write every number and the metadata to this JSON file")
    parser.set_defaults(**GPU_DEFAULTS)
    return parser


def parse_with_preset(parser: argparse.ArgumentParser, presets: dict, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; the ``--preset`` named there supplies defaults (``presets[name]``) that explicit flags
    override. Shared by the benchmark scripts."""
    preliminary, _ = parser.parse_known_args(argv)
    if preliminary.preset:
        parser.set_defaults(**presets[preliminary.preset])
    return parser.parse_args(argv)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; a ``--preset`` supplies defaults that explicit flags override."""
    parser = build_parser()
    args = parse_with_preset(parser, PRESETS, argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    is_cuda = torch.device(args.device).type == "cuda"
    if args.dtypes is None:
        args.dtypes = "fp32,bf16" if is_cuda else "fp32"
    if args.backends is None:
        args.backends = "triton,pytorch" if is_cuda and _triton_usable() else "pytorch"
    args.dtype_list = _split(args.dtypes)
    args.backend_list = _split(args.backends)
    args.infer_shapes = [] if args.skip_inference else [_parse_shape(text) for text in _split(args.infer)]
    for dtype in args.dtype_list:
        if dtype not in DTYPES:
            parser.error(f"unknown dtype {dtype!r} (choose from {sorted(DTYPES)})")
    for backend in args.backend_list:
        if backend not in deformable_attention.BACKENDS:
            parser.error(f"unknown backend {backend!r} (choose from {deformable_attention.BACKENDS})")
    return args


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_shape(text: str) -> tuple[int, int, int]:
    batch, height, width = (int(value) for value in text.lower().split("x"))
    return batch, height, width


def _triton_usable() -> bool:
    return deformable_attention._load_triton_backend() is not None


# ------------------------------------------------------------------------------------------------ models


def our_config_kwargs(args: argparse.Namespace) -> dict:
    """Our defaults, overridden by the benchmark's backbone, queries and layer count."""
    return dict(backbone=args.backbone, num_queries=args.queries, encoder_layers=args.layers,
                decoder_layers=args.layers, num_labels=91, deformable_attention_backend="auto")


def build_our_config(args: argparse.Namespace) -> SparseSemiDetrConfig:
    """Our default DINO configuration, with the benchmark's backbone, queries and layer count."""
    return SparseSemiDetrConfig(**our_config_kwargs(args))


def build_anchor_config(config: SparseSemiDetrConfig):
    """``DeformableDetrConfig`` (two-stage + box refinement) matching every dimension of our ``config``.

    Uses the documented keyword arguments only (``use_timm_backbone``/``backbone`` and the model fields), so it
    builds on transformers 5.17 as on 5.24; ``use_pretrained_backbone=False`` keeps the timm backbone random.
    """
    from transformers import DeformableDetrConfig

    if list(config.backbone_out_indices) != [2, 3, 4]:
        raise ValueError("the anchor's timm backbone uses out_indices [2, 3, 4]; ours must match")
    return DeformableDetrConfig(
        use_timm_backbone=True, backbone=config.backbone, use_pretrained_backbone=False, dilation=False,
        num_labels=config.num_labels, d_model=config.d_model, num_feature_levels=config.num_feature_levels,
        encoder_layers=config.encoder_layers, decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.encoder_attention_heads, decoder_attention_heads=config.decoder_attention_heads,
        encoder_n_points=config.encoder_n_points, decoder_n_points=config.decoder_n_points,
        encoder_ffn_dim=config.encoder_ffn_dim, decoder_ffn_dim=config.decoder_ffn_dim,
        activation_function=config.activation_function, dropout=config.dropout,
        num_queries=config.num_queries, two_stage=True, with_box_refine=True,
        two_stage_num_proposals=config.num_queries, auxiliary_loss=config.auxiliary_loss,
    )


def build_model(family: str, config: SparseSemiDetrConfig, device: torch.device, seed: int) -> torch.nn.Module:
    """A randomly initialised model of ``family`` on ``device`` (seeded)."""
    torch.manual_seed(seed)
    if family == "ours":
        model = SparseSemiDetrForObjectDetection(config)
    else:
        from transformers import DeformableDetrForObjectDetection

        model = DeformableDetrForObjectDetection(build_anchor_config(config))
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> dict:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


# ------------------------------------------------------------------------------------------------ inputs


def random_images(batch: int, height: int, width: int, device: torch.device, generator: torch.Generator):
    """``pixel_values (B, 3, H, W)`` standard-normal (fresh every call) and an all-ones ``pixel_mask (B, H, W)``."""
    pixel_values = torch.randn(batch, 3, height, width, device=device, generator=generator)
    pixel_mask = torch.ones(batch, height, width, dtype=torch.long, device=device)
    return pixel_values, pixel_mask


def random_targets(batch: int, num_labels: int, device: torch.device, generator: torch.Generator) -> list[dict]:
    """8 to 12 random targets per image: ``class_labels (n,)``, ``boxes (n, 4)`` cxcywh normalized, inside it."""
    targets = []
    for _ in range(batch):
        count = int(torch.randint(BOXES_PER_IMAGE[0], BOXES_PER_IMAGE[1] + 1, (1,), generator=generator))
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        centres = sizes / 2 + torch.rand(count, 2, generator=generator) * (1 - sizes)
        labels = torch.randint(0, num_labels, (count,), generator=generator)
        targets.append({"class_labels": labels.to(device), "boxes": torch.cat((centres, sizes), -1).to(device)})
    return targets


# ------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(function, make_inputs, warmup: int, steps: int, device: torch.device,
               first_call=None) -> tuple[list[float], list[float]]:
    """Wall and process-CPU milliseconds of each of ``steps`` calls ``function(*make_inputs())`` after ``warmup``
    untimed calls.

    Inputs are made before the clock starts; the device is synchronized before and after each call. The process
    CPU time (all threads) is the steadier figure on a shared CPU. The very first call runs inside the
    ``first_call`` context (a probe), when given.
    """
    wall, cpu = [], []
    for index in range(warmup + steps):
        inputs = make_inputs()
        synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        with first_call() if (index == 0 and first_call is not None) else contextlib.nullcontext():
            function(*inputs)
        synchronize(device)
        if index >= warmup:
            wall.append((time.perf_counter() - start) * 1e3)
            cpu.append((time.process_time() - start_cpu) * 1e3)
    return wall, cpu


def autocast_for(device: torch.device, dtype_name: str):
    dtype = DTYPES[dtype_name]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


@contextlib.contextmanager
def attention_backend(backend: str | None):
    """Set ``SPARSE_SEMI_DETR_ATTENTION_BACKEND`` for the block (unchanged when ``backend`` is None); restore it."""
    previous = os.environ.get(BACKEND_ENV_VAR)
    if backend is not None:
        os.environ[BACKEND_ENV_VAR] = backend
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV_VAR, None)
        else:
            os.environ[BACKEND_ENV_VAR] = previous


def backend_probe(seen: set):
    """A context factory that records every backend the dispatcher resolves while it is active."""

    @contextlib.contextmanager
    def probe():
        original = deformable_attention.resolve_backend

        def recording(backend, value):
            chosen = original(backend, value)
            seen.add(chosen)
            return chosen

        deformable_attention.resolve_backend = recording
        try:
            yield
        finally:
            deformable_attention.resolve_backend = original

    return probe


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ measurements


def new_record(section: str, variant: Variant, dtype: str, shape: tuple[int, int, int]) -> dict:
    return {"section": section, "model": variant.name, "family": variant.family, "backend": variant.backend,
            "compiled": variant.compiled, "cuda_graphs": variant.cuda_graphs, "dtype": dtype, "batch": shape[0],
            "height": shape[1], "width": shape[2]}


def finish_record(record: dict, times: tuple[list[float], list[float]], device: torch.device,
                  seen: set | None = None, variant: Variant | None = None) -> None:
    """Fill the statistics; fail the record if the dispatcher ran another backend than asked for."""
    wall, cpu = times
    median = statistics.median(wall)
    record.update(median_ms=median, images_per_s=record["batch"] * 1e3 / median, times_ms=wall,
                  cpu_median_ms=statistics.median(cpu), cpu_times_ms=cpu, peak_memory_mib=peak_memory_mib(device))
    if variant is None:
        return
    record["attention_backends"] = sorted(seen)
    if variant.family != "ours" or variant.compiled:
        return
    if len(seen) != 1 or (variant.backend != "auto" and seen != {variant.backend}):
        raise RuntimeError(f"asked for attention backend {variant.backend!r}, dispatcher ran {sorted(seen)}")


@contextlib.contextmanager
def guarded(record: dict):
    """Turn a failing measurement into ``record["error"]`` (printed) instead of ending the run."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - one failed variant (OOM, compile) must not lose the others
        record["error"] = f"{type(error).__name__}: {error}"[:500]
        print(f"  FAILED {record['section']} {record['model']} {record['dtype']}: {record['error']}", flush=True)


def runner_for(model: torch.nn.Module, variant: Variant):
    if not variant.compiled:
        return model
    import torch._dynamo

    torch._dynamo.reset()  # a fresh trace per measurement: the backend env var is read while tracing
    return torch.compile(model, mode=COMPILE_MODE[0])


COMPILE_MODE = [None]  # set from --compile_mode in main()


def measure_train(model, variant: Variant, dtype: str, args, initial_state: dict) -> dict:
    """One supervised training step (forward + loss + backward + AdamW) timed ``args.steps`` times."""
    device = torch.device(args.device)
    shape = (args.batch, args.height, args.width)
    record = new_record("train", variant, dtype, shape)
    seen: set = set()
    with guarded(record), attention_backend(variant.backend):
        model.load_state_dict(initial_state)
        model.train()
        reset_memory(device)
        runner = runner_for(model, variant)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
        generator = torch.Generator(device=device).manual_seed(args.seed)
        cpu_generator = torch.Generator().manual_seed(args.seed)

        def make_inputs():
            images = random_images(*shape, device, generator)
            return (*images, random_targets(args.batch, model.config.num_labels, device, cpu_generator))

        def step(pixel_values, pixel_mask, labels):
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device, dtype):
                loss = runner(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss
            loss.backward()
            optimizer.step()

        probe = None if variant.compiled else backend_probe(seen)
        times = time_calls(step, make_inputs, args.warmup, args.steps, device, probe)
        finish_record(record, times, device, seen, variant)
    model.zero_grad(set_to_none=True)
    return record


def measure_inference(model, variant: Variant, dtype: str, shape, args, initial_state: dict) -> dict:
    """Eval-mode forward under ``torch.inference_mode()`` for a ``(B, H, W)`` batch, timed ``args.steps`` times."""
    device = torch.device(args.device)
    record = new_record("inference", variant, dtype, shape)
    seen: set = set()
    with guarded(record), attention_backend(variant.backend):
        model.load_state_dict(initial_state)
        model.eval()
        reset_memory(device)
        generator = torch.Generator(device=device).manual_seed(args.seed + 1)
        if variant.cuda_graphs:
            from sparse_semi_detr_hf.cuda_graphs import CudaGraphDetector

            runner = CudaGraphDetector(model, autocast_dtype=DTYPES[dtype], copy_outputs=False)

            def forward(pixel_values, pixel_mask):
                runner(pixel_values, pixel_mask)
        else:
            runner = runner_for(model, variant)

            def forward(pixel_values, pixel_mask):
                with torch.inference_mode(), autocast_for(device, dtype):
                    runner(pixel_values=pixel_values, pixel_mask=pixel_mask)

        probe = None if variant.compiled else backend_probe(seen)
        times = time_calls(forward, lambda: random_images(*shape, device, generator), args.warmup, args.steps,
                           device, probe)
        finish_record(record, times, device, seen, variant)
    return record


def variants_for(family: str, args) -> list[Variant]:
    if family == "anchor":
        return [Variant("anchor")]
    variants = [Variant("ours", backend) for backend in args.backend_list]
    if args.cuda_graphs:
        variants += [Variant("ours", backend, cuda_graphs=True) for backend in args.backend_list]
    if args.compile:
        variants += [Variant("ours", backend, compiled=True) for backend in args.backend_list]
    return variants


def benchmark_family(family: str, config: SparseSemiDetrConfig, args, results: dict) -> None:
    """Build one model, run every training and inference measurement of its variants, free it.

    Each record is appended to ``results["records"]`` and saved (``--output``) as soon as it is measured, so a run
    cut short keeps what it measured.
    """
    device = torch.device(args.device)
    model = build_model(family, config, device, args.seed)
    results["parameters"][family] = count_parameters(model)
    initial_state = {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}
    for variant in variants_for(family, args):
        for dtype in args.dtype_list:
            if not variant.cuda_graphs:  # CUDA graphs serve the eval forward only
                print(f"- train     {variant.name:<32} {dtype}", flush=True)
                add_record(results, measure_train(model, variant, dtype, args, initial_state), args)
            for shape in args.infer_shapes:
                print(f"- inference {variant.name:<32} {dtype} {'x'.join(map(str, shape))}", flush=True)
                add_record(results, measure_inference(model, variant, dtype, shape, args, initial_state), args)
    del model, initial_state
    reset_memory(device)


def add_record(results: dict, record: dict, args) -> None:
    """Keep ``record``, print its median, and rewrite ``--output``."""
    results["records"].append(record)
    if "median_ms" in record:
        print(f"    {record['median_ms']:.1f} ms, {record['images_per_s']:.2f} images/s, peak "
              f"{_fmt(record['peak_memory_mib'], '.0f')} MiB", flush=True)
    save_results(results, args)


def save_results(results: dict, args) -> None:
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ semi-supervised


def time_semi_step(args) -> dict:
    """Time a full semi-supervised step through ``sparse_semi_detr_hf.training.trainer.build_benchmark_step``.

    Hook contract (the trainer's)::

        build_benchmark_step(config_kwargs, device, height=..., width=..., autocast_dtype=...)
            -> (step_fn, images_per_step)    # step_fn(): teacher, student losses, backward, optimizer, EMA

    ``config_kwargs`` are this benchmark's model settings (``our_config_kwargs``); ``autocast_dtype`` is None
    (fp32) or ``torch.bfloat16``; the labeled / unlabeled split is the trainer's default. Skipped with a printed
    note when the trainer or the hook is missing; a hook with another signature fails its record (``error``).
    """
    try:
        trainer = importlib.import_module("sparse_semi_detr_hf.training.trainer")
    except ImportError as error:
        return _semi_skipped(f"sparse_semi_detr_hf.training.trainer is not importable ({error})")
    build = getattr(trainer, "build_benchmark_step", None)
    if build is None:
        return _semi_skipped("sparse_semi_detr_hf.training.trainer has no build_benchmark_step(...)")
    device = torch.device(args.device)
    records = []
    # Sparse Semi-DETR (refined queries + RPF) against Semi-DETR (cross-view queries, no RPF).
    modes = {"refined": dict(query_mode="refined", use_rpf=True),
             "cross_view": dict(query_mode="cross_view", use_rpf=False)}
    for dtype, mode, backend in itertools.product(args.dtype_list, args.semi_query_modes.split(","),
                                                  args.backend_list):
        variant = Variant("ours", backend)
        record = new_record("semi", variant, dtype, (0, args.height, args.width))
        record["model"] = f"ours semi step ({mode}, {backend})"
        print(f"- semi      {record['model']:<32} {dtype}", flush=True)
        seen: set = set()
        with guarded(record), attention_backend(backend):
            reset_memory(device)
            step_fn, images_per_step = build(config_kwargs={**our_config_kwargs(args), **modes[mode]},
                                             device=device, height=args.height, width=args.width,
                                             autocast_dtype=DTYPES[dtype])
            record["batch"] = images_per_step
            times = time_calls(step_fn, lambda: (), args.warmup, args.steps, device, backend_probe(seen))
            finish_record(record, times, device, seen, variant)
        records.append(record)
    return {"records": records}


def _semi_skipped(reason: str) -> dict:
    note = f"semi-supervised step skipped: {reason}"
    print(note, flush=True)
    return {"skipped": note, "records": []}


# ------------------------------------------------------------------------------------------------ report


def _key(record: dict) -> tuple:
    return record["section"], record["dtype"], record["batch"], record["height"], record["width"]


def add_ratios(records: list[dict]) -> None:
    """``vs_anchor`` = anchor median / ours median (= throughput ratio ours / anchor; > 1: ours faster), and
    ``triton_speedup`` = PyTorch-path median / Triton median for the same model, dtype and shape."""
    timed = [record for record in records if "median_ms" in record]
    anchors = {_key(r): r["median_ms"] for r in timed if r["family"] == "anchor"}

    def mode(record):
        return record["compiled"], record.get("cuda_graphs", False)

    pytorch = {(_key(r), mode(r)): r["median_ms"] for r in timed if r["backend"] == "pytorch"}
    for record in timed:
        if _key(record) in anchors:
            record["vs_anchor"] = anchors[_key(record)] / record["median_ms"]
        if record["backend"] == "triton" and (_key(record), mode(record)) in pytorch:
            record["triton_speedup"] = pytorch[(_key(record), mode(record))] / record["median_ms"]


def _fmt(value, pattern: str) -> str:
    return "–" if value is None else format(value, pattern)


def markdown_table(records: list[dict], cpu_time: bool = False) -> str:
    """One row per measurement; ratios > 1 mean ours is faster (vs anchor) or Triton is faster (vs PyTorch).

    ``cpu_time`` adds the median process CPU time (all threads), the steadier figure on a shared CPU.
    """
    cpu_head, cpu_rule = (" CPU ms |", " ---: |") if cpu_time else ("", "")
    lines = [
        f"| benchmark | batch×H×W | dtype | model | median ms |{cpu_head} images/s | peak MiB | ours vs anchor "
        "| Triton vs PyTorch |",
        f"| --- | --- | --- | --- | ---: |{cpu_rule} ---: | ---: | ---: | ---: |",
    ]
    for r in records:
        head = f"| {r['section']} | {r['batch']}×{r['height']}×{r['width']} | {r['dtype']} | {r['model']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error'][:80].replace('|', '/')} |{' |' * (4 + cpu_time)}")
            continue
        cpu = f" {r['cpu_median_ms']:.1f} |" if cpu_time else ""
        ratio = f"{r['vs_anchor']:.2f}×" if "vs_anchor" in r else "–"
        speedup = f"{r['triton_speedup']:.2f}×" if "triton_speedup" in r else "–"
        lines.append(f"{head} {r['median_ms']:.1f} |{cpu} {r['images_per_s']:.2f} | "
                     f"{_fmt(r['peak_memory_mib'], '.0f')} | {ratio} | {speedup} |")
    return "\n".join(lines)


def collect_meta(args, argv: list[str]) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} "\
               "torch threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import timm

    return {
        "command": "python benchmarks/bench_model.py " + shlex.join(argv),
        "device": name, "torch": torch.__version__, "transformers": transformers.__version__,
        "timm": timm.__version__, "triton": triton_version, "python": platform.python_version(),
        "cuda": torch.version.cuda, "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "args": {key: value for key, value in vars(args).items() if not key.endswith("_list")},
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every measurement, print the table last, write ``--output``; returns the results dict."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    COMPILE_MODE[0] = args.compile_mode
    config = build_our_config(args)
    results = {"meta": collect_meta(args, argv), "records": [], "parameters": {}}
    print(f"device: {results['meta']['device']}  torch {torch.__version__}  transformers {transformers.__version__}",
          flush=True)
    families = ["ours"] + ([] if args.skip_anchor else ["anchor"])
    for family in families:
        benchmark_family(family, config, args, results)
    results["semi"] = time_semi_step(args) if args.semi else None
    add_ratios(results["records"])
    semi_records = results["semi"]["records"] if results["semi"] else []
    results["table"] = markdown_table(results["records"] + semi_records, torch.device(args.device).type == "cpu")
    save_results(results, args)
    print(f"\nparameters: {results['parameters']}\n")
    print(results["table"])
    return results


if __name__ == "__main__":
    main()
