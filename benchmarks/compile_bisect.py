"""Where torch.compile's eval outputs part from eager (GPU; runs on CPU as a smoke test).

On the H100, ``torch.compile`` of the eval model gave detections that differ from eager far beyond rounding
(``docs/performance.md``: boxes outside ``[0, 1]`` although every box is a sigmoid). This script splits the
suspects in one run, each variant compiled afresh on the same weights and the same fixed input:

- attention path: our Triton kernel (``triton``) or the PyTorch ``grid_sample`` path (``pytorch``);
- compiler backend: ``inductor`` (code generation) or ``aot_eager`` (Dynamo + AOTAutograd tracing, eager kernels);
- what is compiled: the whole model, or only the backbone, the encoder or the decoder;
- inductor settings that change memory layouts on CUDA only (``comprehensive_padding``, ``layout_optimization``).

Each variant is compared with the eager model **of the same attention path**. The order-free signals come first:
``memory`` (the encoder's output, before the top-k proposal selection, whose order near-ties can flip) and
``boxes_in_unit_range`` (every returned box is a sigmoid, so a value outside ``[0, 1]`` is a wrong result, not a
rounding); then the per-query and sorted-score differences. Results are written after every variant
(``compile_bisect.json``), so a timeout keeps what finished.

    python benchmarks/compile_bisect.py --device cuda --output outputs/compile_bisect.json      # ResNet-50, 2+2
    python benchmarks/compile_bisect.py --preset cpu_smoke                                     # tiny, CPU
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch._dynamo.utils  # noqa: E402
import torch._inductor.config as inductor_config  # noqa: E402

from bench_model import parse_with_preset, random_images  # noqa: E402
from profile_step import max_difference  # noqa: E402
from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection  # noqa: E402
from sparse_semi_detr_hf.deformable_attention_triton import is_triton_available  # noqa: E402

# A variant is ``part/backend/attention[/setting...]``; the default list splits the suspects on the GPU.
SETTINGS = {"no_padding": {"comprehensive_padding": False}, "no_layout_optimization": {"layout_optimization": False}}
PARTS = {"whole": "", "backbone": "model.backbone", "encoder": "model.encoder", "decoder": "model.decoder"}
BACKENDS = ("inductor", "aot_eager")
ATTENTIONS = ("triton", "pytorch")
VARIANTS = ("whole/inductor/triton", "whole/inductor/pytorch", "whole/aot_eager/triton", "whole/aot_eager/pytorch",
            "whole/inductor/triton/no_padding", "whole/inductor/triton/no_layout_optimization",
            "backbone/inductor/triton", "encoder/inductor/triton", "decoder/inductor/triton")
DEFAULTS = dict(device=None, backbone="resnet50", queries=900, layers=2, infer="1x800x1333",
                variants=",".join(VARIANTS), calls=3)
PRESETS = {"cpu_smoke": dict(device="cpu", backbone="resnet18", queries=30, layers=1, infer="1x96x128",
                             variants="whole/aot_eager/pytorch,encoder/inductor/pytorch", calls=1)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS))
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name}", type=type(value) if value is not None else str)
    parser.add_argument("--output", default="outputs/compile_bisect.json")
    parser.set_defaults(**DEFAULTS)
    args = parse_with_preset(parser, PRESETS, argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        args.variant_specs = {name: parse_variant(name) for name in args.variants.split(",") if name}
    except ValueError as error:
        parser.error(str(error))
    return args


def parse_variant(name: str) -> tuple[str, str, str, dict]:
    """``"encoder/inductor/triton/no_padding"`` -> ``("triton", "inductor", "encoder", {inductor settings})``."""
    part, backend, attention, *settings = name.split("/") + [""] * max(0, 2 - name.count("/"))
    if part not in PARTS or backend not in BACKENDS or attention not in ATTENTIONS or set(settings) - set(SETTINGS):
        raise ValueError(f"variant {name!r} is not part/backend/attention[/setting]: parts {sorted(PARTS)}, "
                         f"backends {list(BACKENDS)}, attention {list(ATTENTIONS)}, settings {sorted(SETTINGS)}")
    merged = {key: value for setting in settings for key, value in SETTINGS[setting].items()}
    return attention, backend, part, merged


def build_model(args, attention: str) -> SparseSemiDetrForObjectDetection:
    """The same random weights (seed 0) for either attention path; eval mode on ``args.device``."""
    torch.manual_seed(0)
    config = SparseSemiDetrConfig(backbone=args.backbone, num_queries=args.queries, encoder_layers=args.layers,
                                  decoder_layers=args.layers, num_labels=91, deformable_attention_backend=attention)
    return SparseSemiDetrForObjectDetection(config).to(args.device).eval()


def run(model, pixel_values, pixel_mask):
    with torch.inference_mode():
        return model(pixel_values=pixel_values, pixel_mask=pixel_mask)


def compare(output, reference) -> dict:
    """Differences of ``output`` to ``reference`` (both ``SparseSemiDetrObjectDetectionOutput``), largest absolute.

    ``memory``: encoder output ``(B, S, D)``, before any top-k; ``boxes_in_unit_range``: every ``pred_boxes``
    value of ``output`` in ``[0, 1]`` (as a sigmoid must be); then ``profile_step.max_difference``'s per-query and
    sorted-score differences.
    """
    boxes = output.pred_boxes.float()
    memory = output.encoder_last_hidden_state.float() - reference.encoder_last_hidden_state.float()
    return {"memory": memory.abs().max().item(), "boxes_in_unit_range": bool(((boxes >= 0) & (boxes <= 1)).all()),
            "pred_boxes_min_max": [boxes.min().item(), boxes.max().item()], **max_difference(output, reference)}


def compile_in_place(model, backend: str, part: str) -> None:
    """Compile ``part`` of ``model`` in place (``Module.compile``: weights stay where they are)."""
    torch._dynamo.reset()
    target = model if part == "whole" else model.get_submodule(PARTS[part])
    target.compile(backend=backend)


def measure_variant(name: str, spec: tuple, models: dict, references: dict, inputs, args) -> dict:
    attention, backend, part, settings = spec
    record = {"variant": name, "attention": attention, "backend": backend, "compiled": part,
              "inductor_settings": settings}
    if attention not in models:
        return {**record, "skipped": "the Triton path needs CUDA and triton"}
    model = models[attention]
    started = time.perf_counter()
    try:
        with inductor_config.patch(settings):
            compile_in_place(model, backend, part)
            frames = torch._dynamo.utils.counters["frames"]["ok"]
            output = run(model, *inputs)  # compiles here, under the settings
            record["first_call_s"] = round(time.perf_counter() - started, 1)
            record["frames_compiled"] = torch._dynamo.utils.counters["frames"]["ok"] - frames
            for _ in range(args.calls - 1):
                output = run(model, *inputs)
        record["difference_to_eager"] = compare(output, references[attention])
    except Exception as error:  # noqa: BLE001 - a failing variant must not lose the others
        record["error"] = f"{type(error).__name__}: {error}"[:800]
    finally:
        _uncompile(model)
    return record


def _uncompile(model) -> None:
    for module in model.modules():
        module._compiled_call_impl = None
    torch._dynamo.reset()


def main(argv=None) -> dict:
    args = parse_args(argv)
    output_path = Path(args.output)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    specs = args.variant_specs
    generator = torch.Generator(device=args.device).manual_seed(3)
    inputs = random_images(*(int(v) for v in args.infer.split("x")), args.device, generator)
    triton_runs = args.device.type == "cuda" and is_triton_available()
    attentions = sorted({spec[0] for spec in specs.values()} - (set() if triton_runs else {"triton"}))
    models = {a: build_model(args, a) for a in attentions}
    references = {a: run(m, *inputs) for a, m in models.items()}
    device = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "CPU"
    results = {"meta": {"device": device, "torch": torch.__version__, "command": sys.argv,
                        "args": {k: str(v) for k, v in vars(args).items()}}, "variants": []}
    if len(references) == 2:
        results["meta"]["eager_triton_vs_eager_pytorch"] = compare(references["triton"], references["pytorch"])
    for name, spec in specs.items():
        record = measure_variant(name, spec, models, references, inputs, args)
        results["variants"].append(record)
        output_path.write_text(json.dumps(results, indent=2))
        print(json.dumps(record), flush=True)
    return results


if __name__ == "__main__":
    main()
