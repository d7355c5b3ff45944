"""Run a Sparse Semi-DETR (or any transformers object detector) on image files and save the detections.

    python examples/infer.py --model PATH_OR_HUB_ID img1.jpg img2.png --output_dir out --threshold 0.3 \
        [--trust_remote_code] [--device cpu|cuda] [--batch_size 4] [--top_k 300] [--cuda_graphs] [--bf16]

``--cuda_graphs`` replays the forward from CUDA graphs (``sparse_semi_detr_hf.cuda_graphs.CudaGraphDetector``; same
outputs, one capture per padded batch shape, ~2x faster at batch 1 on an H100 — docs/performance.md); ``--bf16``
runs under bfloat16 autocast. On CPU both fall back to the plain forward (``--bf16`` still applies).

For every readable input ``<stem>.<ext>`` it writes ``<output_dir>/<stem>.png`` (the image with boxes and labels
drawn) and ``<output_dir>/<stem>.json`` (``[{"label", "label_id", "score", "box": [x0, y0, x1, y1]}]``, absolute
pixels of the EXIF-oriented image). Unreadable files are reported, skipped, and make the exit code 1.
"""

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch
from transformers import AutoImageProcessor, AutoModelForObjectDetection


logger = logging.getLogger("infer")

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


class ImageLoadError(RuntimeError):
    """An input file could not be read as an image."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--model", required=True, help="local directory or Hub id of the detector")
    parser.add_argument("--output_dir", type=Path, default=Path("out"))
    parser.add_argument("--threshold", type=float, default=0.3, help="minimum score of a kept detection")
    parser.add_argument("--top_k", type=int, default=300, help="(query, class) pairs kept before thresholding")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow code shipped with the checkpoint")
    parser.add_argument("--cuda_graphs", action="store_true",
                        help="replay the forward from CUDA graphs (needs sparse_semi_detr_hf; eager on CPU)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    return args


def load_model_and_processor(model_id: str, device: str, trust_remote_code: bool):
    """Auto model (eval mode, on ``device``) and image processor of ``model_id``."""
    try:  # registers the Sparse Semi-DETR Auto classes when the package is installed
        import sparse_semi_detr_hf  # noqa: F401
    except ImportError:
        logger.info("sparse_semi_detr_hf is not installed; relying on the checkpoint's own code or transformers")
    model = AutoModelForObjectDetection.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """The package's decoding rule (EXIF orientation, 16-bit / float / palette images) when it is installed."""
    try:
        from sparse_semi_detr_hf.image_processing_sparse_semi_detr import to_rgb_pil
    except ImportError:
        return PIL.ImageOps.exif_transpose(image).convert("RGB")
    return to_rgb_pil(image)


def load_image(path: Path) -> PIL.Image.Image:
    """Decode ``path`` fully, apply its EXIF orientation, convert to RGB; raise ImageLoadError naming the file."""
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as err:
        raise ImageLoadError(f"cannot read image {path}: {err}") from err


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def with_cuda_graphs(model, bf16: bool):
    """``model`` wrapped in ``CudaGraphDetector`` (one CUDA graph per input shape; eager on CPU)."""
    from sparse_semi_detr_hf.cuda_graphs import CudaGraphDetector

    return CudaGraphDetector(model, autocast_dtype=torch.bfloat16 if bf16 else None)


@torch.inference_mode()
def detect(model, processor, images: list[PIL.Image.Image], threshold: float, top_k: int,
           bf16: bool = False) -> list[list[dict]]:
    """Batched detection -> per image ``[{"label", "label_id", "score", "box": [x0, y0, x1, y1]}]`` by score."""
    inputs = processor(images=images, return_tensors="pt")
    parameter = next(model.parameters())
    pixel_values = inputs["pixel_values"].to(device=parameter.device, dtype=parameter.dtype)
    with torch.autocast(parameter.device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = model(pixel_values=pixel_values, pixel_mask=inputs["pixel_mask"].to(parameter.device))
    sizes = [(image.height, image.width) for image in images]
    results = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=sizes, top_k=top_k)
    id2label = model.config.id2label
    detections = []
    for result in results:
        detections.append(
            [
                {
                    "label": id2label.get(int(label), str(int(label))),
                    "label_id": int(label),
                    "score": round(float(score), 5),
                    "box": [round(float(v), 2) for v in box],
                }
                for score, label, box in zip(result["scores"], result["labels"], result["boxes"])
            ]
        )
    return detections


def draw_detections(image: PIL.Image.Image, detections: list[dict]) -> PIL.Image.Image:
    """Copy of ``image`` with each box (clipped to the image) and ``label score`` drawn."""
    canvas = image.copy()
    draw = PIL.ImageDraw.Draw(canvas)
    width, height = canvas.size
    for det in sorted(detections, key=lambda d: d["score"]):
        x0, y0, x1, y1 = det["box"]
        x0, x1 = sorted((min(max(x0, 0), width - 1), min(max(x1, 0), width - 1)))
        y0, y1 = sorted((min(max(y0, 0), height - 1), min(max(y1, 0), height - 1)))
        color = _PALETTE[det["label_id"] % len(_PALETTE)]
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        text = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x0, y0), text)
        top_shift = min(bottom - top + 2, y0)
        draw.rectangle([left, top - top_shift, right + 2, bottom - top_shift], fill=color)
        draw.text((x0 + 1, y0 - top_shift), text, fill=(255, 255, 255))
    return canvas


def output_stems(paths: Sequence[Path]) -> list[str]:
    """File stems made unique (``a.jpg``, ``b/a.png`` -> ``a``, ``a_1``) so outputs do not overwrite each other."""
    seen: dict[str, int] = {}
    stems = []
    for path in paths:
        stem = path.stem
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        stems.append(stem if count == 0 else f"{stem}_{count}")
    return stems


def write_outputs(output_dir: Path, stem: str, image: PIL.Image.Image, detections: list[dict]) -> None:
    draw_detections(image, detections).save(output_dir / f"{stem}.png")
    (output_dir / f"{stem}.json").write_text(json.dumps(detections, indent=2))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0 if every image was processed, 1 otherwise)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = load_model_and_processor(args.model, device, args.trust_remote_code)
    if args.cuda_graphs:
        model = with_cuda_graphs(model, args.bf16)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    failed, total = [], 0
    jobs = list(zip(args.images, output_stems(args.images)))
    for batch in batched(jobs, args.batch_size):
        loaded = []
        for path, stem in batch:
            try:
                loaded.append((path, stem, load_image(path)))
            except ImageLoadError as err:
                logger.error("%s; skipping it", err)
                failed.append(path)
        if not loaded:
            continue
        detections = detect(model, processor, [image for _, _, image in loaded], args.threshold, args.top_k,
                            args.bf16)
        for (path, stem, image), dets in zip(loaded, detections):
            write_outputs(args.output_dir, stem, image, dets)
            total += len(dets)
            logger.info("%s: %d detections -> %s", path, len(dets), args.output_dir / f"{stem}.png")
    done = len(args.images) - len(failed)
    logger.info("%d/%d images processed, %d detections, outputs in %s", done, len(args.images), total, args.output_dir)
    if failed:
        logger.error("could not read %d file(s): %s", len(failed), ", ".join(str(p) for p in failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
