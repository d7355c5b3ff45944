"""Export a trained model to ONNX (any image size and batch size), and check it against PyTorch with ONNX Runtime.

    pip install -e ".[onnx]"     # onnx, onnxscript (torch's exporter), onnxruntime (the check)
    python examples/export_onnx.py --model outputs/sparse-semi-detr --output_dir outputs/sparse-semi-detr-onnx

Writes ``model.onnx`` (inputs ``pixel_values (B, 3, H, W)`` float32 and ``pixel_mask (B, H, W)`` int64, both as the
image processor gives them with ``return_tensors="np"``; outputs ``logits (B, K, C)`` and ``pred_boxes (B, K, 4)``
cxcywh normalized), ``config.json`` (``id2label``) and the image processor with its code, so
``AutoImageProcessor.from_pretrained(output_dir, trust_remote_code=True)`` pre- and post-processes for it
(README, "Export to ONNX"). Batch, height and width are dynamic; sides must exceed the coarsest feature stride (65 px
for the default model).

The check (skipped with ``--no_check``) runs ONNX Runtime and the PyTorch model on processed random images: one
small image (fewer encoder tokens than queries for the default model) and a padded batch of two larger ones, none of
the export's sizes, and fails unless logits and boxes agree within ``--atol``. The export goes through
``torch.export`` (``torch.onnx.export(..., dynamo=True)``); onnxscript's graph optimizer is off by default
(``--optimize``): with torch 2.14 / onnxscript 0.7 it wrote a graph ONNX Runtime refuses to load.
"""

import argparse
import json
import os
import time
import warnings

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModelForObjectDetection

INPUT_NAMES = ["pixel_values", "pixel_mask"]
OUTPUT_NAMES = ["logits", "pred_boxes"]


class DetectionHead(nn.Module):
    """The eval forward with plain tensor inputs and outputs: ``(pixel_values, pixel_mask) -> (logits, pred_boxes)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        return outputs.logits, outputs.pred_boxes


def coarsest_stride(model: nn.Module) -> int:
    """Stride of the lowest-resolution feature level (64 px by default): image sides are chosen relative to it."""
    return int(model.model.strides[-1])


def dynamic_shapes(model: nn.Module) -> dict:
    """Batch, height and width dynamic; a side must exceed the coarsest stride (a feature level of size 1 is a
    special case ``torch.export`` would otherwise bake in)."""
    min_side = coarsest_stride(model) + 1
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=min_side, max=8192)
    width = torch.export.Dim("width", min=min_side, max=8192)
    return {"pixel_values": {0: batch, 2: height, 3: width}, "pixel_mask": {0: batch, 1: height, 2: width}}


def random_inputs(processor, sizes: list[tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    """Random RGB images processed to exactly the given ``(height, width)`` sizes, as one batch (padded to the
    largest, with ``pixel_mask``)."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    processed = [processor(images=image, size={"height": h, "width": w}, return_tensors="pt")["pixel_values"][0]
                 for image, (h, w) in zip(images, sizes)]
    batch = processor.pad(list(processed), return_tensors="np")
    return {name: batch[name] for name in INPUT_NAMES}


def export(model: nn.Module, processor, path: str, optimize: bool = False) -> None:
    """``torch.onnx.export`` of ``DetectionHead(model)`` with dynamic batch, height and width."""
    side = 4 * coarsest_stride(model)  # sample sizes: not 0 or 1 anywhere (special cases for torch.export)
    sample = random_inputs(processor, [(side, side + 64), (side + 32, side)], seed=0)
    head = DetectionHead(model).eval()
    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    with warnings.catch_warnings():  # "The axis name: batch will not be used, since it shares ... with another axis"
        warnings.filterwarnings("ignore", message="# The axis name")
        program = torch.onnx.export(head, args, dynamo=True, optimize=optimize, dynamic_shapes=dynamic_shapes(model),
                                    input_names=INPUT_NAMES, output_names=OUTPUT_NAMES)
    program.save(path)


def check(model: nn.Module, processor, path: str, atol: float) -> dict:
    """Largest absolute difference between ONNX Runtime and PyTorch, per output, over a few batches and sizes."""
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    head = DetectionHead(model).eval()
    worst = dict.fromkeys(OUTPUT_NAMES, 0.0)
    stride = coarsest_stride(model)
    # batch 1, small: fewer encoder tokens than queries (K = tokens); batch 2, padded: more (K = num_queries)
    batches = [[(2 * stride, 4 * stride)], [(4 * stride + 16, 5 * stride), (3 * stride, 4 * stride + 8)]]
    for seed, sizes in enumerate(batches, start=1):
        inputs = random_inputs(processor, sizes, seed)
        got = session.run(OUTPUT_NAMES, inputs)
        with torch.no_grad():
            expected = head(*(torch.from_numpy(inputs[name]) for name in INPUT_NAMES))
        for name, ours, theirs in zip(OUTPUT_NAMES, got, expected):
            if ours.shape != tuple(theirs.shape):
                raise AssertionError(f"{name}: ONNX shape {ours.shape} != PyTorch {tuple(theirs.shape)} for {sizes}")
            worst[name] = max(worst[name], float(np.abs(ours - theirs.numpy()).max()))
    if max(worst.values()) > atol:
        raise AssertionError(f"ONNX Runtime and PyTorch differ by {worst} (> {atol})")
    return worst


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model folder or Hub id")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--optimize", action="store_true", help="run onnxscript's graph optimizer (see above)")
    parser.add_argument("--no_check", action="store_true", help="skip the ONNX Runtime check")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed ONNX vs PyTorch difference")
    args = parser.parse_args(argv)
    model = AutoModelForObjectDetection.from_pretrained(args.model, trust_remote_code=True).eval().float()
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=True)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "model.onnx")
    start = time.perf_counter()
    export(model, processor, path, args.optimize)
    report = {"onnx": path, "export_seconds": round(time.perf_counter() - start, 1),
              "megabytes": round(os.path.getsize(path) / 2**20, 1)}
    model.config.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    if not args.no_check:
        report["max_abs_difference"] = check(model, processor, path, args.atol)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
