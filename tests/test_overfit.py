"""A tiny detector must overfit four synthetic images (AP50 by pycocotools) within a bounded number of steps."""

import contextlib
import io

import numpy as np
import torch
from conftest import tiny_config_kwargs
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor

SIZE = 64
LAYOUTS = [  # (class, x, y, w, h) in pixels
    [(0, 8, 8, 24, 24), (1, 36, 30, 20, 28)],
    [(2, 20, 20, 30, 16)],
    [(0, 4, 40, 20, 18), (2, 34, 4, 24, 24), (1, 40, 40, 18, 18)],
    [(1, 10, 10, 40, 40)],
]
COLOURS = [(255, 40, 40), (40, 255, 40), (60, 60, 255)]


def make_batch():
    rng = np.random.default_rng(0)
    processor = SparseSemiDetrImageProcessor(do_resize=False)
    images, annotations = [], []
    for index, layout in enumerate(LAYOUTS):
        image = np.full((SIZE, SIZE, 3), 20.0) + rng.normal(0, 5, (SIZE, SIZE, 3))
        objects = []
        for label, x, y, w, h in layout:
            image[y:y + h, x:x + w] = COLOURS[label]
            objects.append({"bbox": [x, y, w, h], "category_id": label, "area": w * h, "iscrowd": 0})
        images.append(image.clip(0, 255).astype(np.uint8))
        annotations.append({"image_id": index, "annotations": objects})
    batch = processor(images=images, annotations=annotations, return_tensors="pt")
    return processor, batch, annotations


def coco_ap50(processor, outputs, annotations) -> float:
    results = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[(SIZE, SIZE)] * 4)
    gt = {"images": [{"id": a["image_id"], "height": SIZE, "width": SIZE} for a in annotations],
          "categories": [{"id": c} for c in range(3)], "annotations": []}
    detections = []
    for ann, result in zip(annotations, results):
        for obj in ann["annotations"]:
            gt["annotations"].append({**obj, "id": len(gt["annotations"]) + 1, "image_id": ann["image_id"]})
        for score, label, box in zip(result["scores"], result["labels"], result["boxes"]):
            x0, y0, x1, y1 = box.tolist()
            detections.append({"image_id": ann["image_id"], "category_id": int(label),
                               "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score)})
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])


def test_tiny_model_overfits_four_images():
    torch.manual_seed(0)
    model = SparseSemiDetrForObjectDetection(SparseSemiDetrConfig(**tiny_config_kwargs(num_queries=30, query_mode="none")))
    processor, batch, annotations = make_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
        model.train()
        return coco_ap50(processor, outputs, annotations)

    history = [evaluate()]
    assert history[0] < 0.5, "an untrained model must not already score"
    for step in range(1, 81):
        loss = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if step % 10 == 0:
            history.append(evaluate())
            if history[-1] >= 0.9:
                break
    assert history[-1] >= 0.9, f"AP50 every 10 steps: {history}"
