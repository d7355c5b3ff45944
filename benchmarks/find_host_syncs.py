"""List every place where one supervised training step (or the eval forward) makes the host wait for the GPU (CUDA).

    python benchmarks/find_host_syncs.py --output syncs.json            # default model, 2x512x512, ~10 boxes/image

Runs warm-up steps, then one step under ``torch.cuda.set_sync_debug_mode("warn")``: PyTorch warns at every
synchronizing operation (``.item()``, ``.cpu()``, ``nonzero``, a copy from pageable host memory, ...). Each warning's
Python stack is reduced to the frames of this repository and counted, so the output says which line syncs how many
times per step. Syncs raised inside autograd's backward thread carry no Python frames of ours and are listed as
``<no frame of ours>``. Needs CUDA.
"""

import argparse
import json
import os
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

from bench_model import random_images, random_targets  # noqa: E402
from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection  # noqa: E402


def our_frames(limit: int = 4) -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if str(REPO) in f.filename and "find_host_syncs" not in
              f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-limit:])) or \
        "<no frame of ours>"


def run(args) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = SparseSemiDetrConfig(backbone=args.backbone, num_queries=args.queries, num_labels=91)
    model = SparseSemiDetrForObjectDetection(config).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=args.fused_adamw)
    generator = torch.Generator(device=device).manual_seed(0)
    cpu_generator = torch.Generator().manual_seed(0)
    results = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        counts: Counter = Counter()

        def step(check: bool):
            pixel_values, pixel_mask = random_images(args.batch, args.size, args.size, device, generator)
            labels = random_targets(args.batch, 91, device, cpu_generator) if mode == "train" else None
            torch.cuda.synchronize()
            if check:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                if mode == "train":
                    optimizer.zero_grad(set_to_none=True)
                    model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels).loss.backward()
                    optimizer.step()
                else:
                    with torch.inference_mode():
                        model(pixel_values=pixel_values, pixel_mask=pixel_mask)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchronizing" in str(message):
                counts[our_frames()] += 1

        for _ in range(2):
            step(check=False)
        with warnings.catch_warnings():  # restores warnings.showwarning on exit
            warnings.simplefilter("always")
            warnings.showwarning = record
            step(check=True)
        results[mode] = {"total": sum(counts.values()), "sites": dict(counts.most_common())}
        print(f"{mode}: {sum(counts.values())} synchronizing operations")
        for site, count in counts.most_common(30):
            print(f"  {count:4d}  {site}")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--fused_adamw", action="store_true")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("find_host_syncs.py needs CUDA (torch.cuda.set_sync_debug_mode is CUDA-only).")
    results = run(args)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
