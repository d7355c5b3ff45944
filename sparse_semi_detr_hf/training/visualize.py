"""A picture of detections beside the ground truth (what a user looks at first after a run)."""

import logging

import PIL.Image
import PIL.ImageDraw
import torchvision.transforms.v2.functional as TF
from datasets import Image as ImageFeature

from .data import DECODE_ERRORS, decode_image

logger = logging.getLogger(__name__)

GROUND_TRUTH_COLOUR = (40, 200, 60)
DETECTION_COLOUR = (235, 50, 40)


def _image(row: dict) -> PIL.Image.Image:
    """The row's image as training and evaluation decode it (``decode_image``: EXIF orientation applied, RGB)."""
    return TF.to_pil_image(decode_image(row["image"]))


def _draw_boxes(image: PIL.Image.Image, boxes, texts, colour, scale: float) -> PIL.Image.Image:
    """``boxes``: xyxy pixels of ``image``; drawn on a copy enlarged ``scale`` times."""
    size = (round(image.width * scale), round(image.height * scale))
    canvas = image.resize(size, PIL.Image.Resampling.NEAREST)
    draw = PIL.ImageDraw.Draw(canvas)
    for (x0, y0, x1, y1), text in zip(boxes, texts):
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=colour, width=2)
        draw.text((x0 * scale + 2, y0 * scale + 1), text, fill=colour)
    return canvas


def save_detection_grid(dataset, predictions: list[dict], id2label: dict, path: str, threshold: float = 0.3,
                        scale: float = 2.0) -> PIL.Image.Image:
    """One row per image of ``dataset`` (common detection schema): ground truth (green) | detections with score
    >= ``threshold`` (red, ``label score``). ``predictions``: records ``{image_id, boxes (n, 4) xyxy original
    pixels, scores (n,), labels (n,)}``, matched to the rows by ``image_id``. Saved as PNG at ``path``. Images that
    cannot be read are left out with a warning."""
    by_id = {int(p["image_id"]): p for p in predictions}
    rows = []
    for row in dataset.cast_column("image", ImageFeature(decode=False)):
        try:
            image = _image(row)
        except DECODE_ERRORS as error:  # an unreadable image is left out of the picture, as out of the evaluation
            logger.warning("detection picture: image %s could not be read (%s); left out", row["image_id"], error)
            continue
        objects = row["objects"]
        gt_boxes = [(x, y, x + w, y + h) for x, y, w, h in objects["bbox"]]
        truth = _draw_boxes(image, gt_boxes, [id2label[int(c)] for c in objects["category"]], GROUND_TRUTH_COLOUR,
                            scale)
        found = by_id.get(int(row["image_id"]), {"boxes": [], "scores": [], "labels": []})
        keep = [i for i, score in enumerate(found["scores"]) if float(score) >= threshold]
        detected = _draw_boxes(image, [[float(v) for v in found["boxes"][i]] for i in keep],
                               [f"{id2label[int(found['labels'][i])]} {float(found['scores'][i]):.2f}" for i in keep],
                               DETECTION_COLOUR, scale)
        rows.append((truth, detected))
    width = max((a.width + b.width for a, b in rows), default=1) + 6
    height = sum(max(a.height, b.height) for a, b in rows) + 4 * max(0, len(rows) - 1)
    sheet = PIL.Image.new("RGB", (width, max(1, height)), (255, 255, 255))
    top = 0
    for truth, detected in rows:
        sheet.paste(truth, (0, top))
        sheet.paste(detected, (truth.width + 6, top))
        top += max(truth.height, detected.height) + 4
    sheet.save(path)
    return sheet
