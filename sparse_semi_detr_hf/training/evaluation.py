"""COCO box evaluation (pycocotools ``COCOeval``) of predictions against a dataset in the common schema.

Ground truth uses the CONTIGUOUS labels as COCO category ids (each category also carries ``original_id``), so
predictions with ``labels`` from the model can be scored directly. Crowd annotations keep ``iscrowd`` and are
handled by COCOeval as usual (a detection matched to a crowd region is ignored, not a false positive).
"""

import contextlib
import copy
import io
import logging
from collections.abc import Sequence

import numpy as np
from datasets import Dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from .data import dataset_category_ids, dataset_id2label

logger = logging.getLogger(__name__)

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ground_truth_from_dataset(ds: Dataset) -> dict:
    """COCO json dict (``images``, ``annotations``, ``categories``) from a dataset in the common schema.

    Category ids are the contiguous labels; annotation ids are renumbered ``1..N`` (COCOeval treats id 0 as
    "unmatched"); ``bbox`` COCO xywh absolute pixels of the original image; ``area`` and ``iscrowd`` as stored.
    """
    rows = ds.select_columns(["image_id", "width", "height", "objects"])
    names = dataset_id2label(ds)
    original = dataset_category_ids(ds)
    images, annotations = [], []
    for row in rows:
        images.append({"id": int(row["image_id"]), "width": int(row["width"]), "height": int(row["height"])})
        objs = row["objects"]
        for bbox, category, area, crowd in zip(objs["bbox"], objs["category"], objs["area"], objs["iscrowd"]):
            annotations.append({"id": len(annotations) + 1, "image_id": int(row["image_id"]),
                                "category_id": int(category), "bbox": [float(v) for v in bbox],
                                "area": float(area), "iscrowd": int(crowd)})
    categories = [{"id": i, "name": name, "original_id": int(original[i])} for i, name in names.items()]
    return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def restrict_to_images(coco_gt: dict, image_ids: set[int]) -> dict:
    """``coco_gt`` with only the images in ``image_ids`` and their annotations (a shallow copy; ``coco_gt`` itself
    is left as it is)."""
    images = [im for im in coco_gt["images"] if im["id"] in image_ids]
    annotations = [a for a in coco_gt["annotations"] if a["image_id"] in image_ids]
    return {**coco_gt, "images": images, "annotations": annotations}


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def predictions_to_coco_results(predictions: Sequence[dict]) -> list[dict]:
    """COCO result list from ``[{"image_id", "boxes" (n, 4) xyxy absolute original pixels, "scores" (n,),
    "labels" (n,)}]`` (tensors or arrays)."""
    results = []
    for pred in predictions:
        image_id = int(_as_numpy(pred["image_id"]).reshape(-1)[0])
        boxes = _as_numpy(pred["boxes"]).astype(np.float64).reshape(-1, 4)
        scores = _as_numpy(pred["scores"]).astype(np.float64).reshape(-1)
        labels = _as_numpy(pred["labels"]).astype(np.int64).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"image {image_id}: boxes, scores and labels differ in length")
        for (x0, y0, x1, y1), score, label in zip(boxes, scores, labels):
            results.append({"image_id": image_id, "category_id": int(label),
                            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)})
    return results


def _quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _per_class_ap(evaluator: COCOeval, names: dict[int, str]) -> dict[str, float]:
    """AP@[.5:.95] per category (all areas, 100 detections); -1 where the class has no ground truth."""
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    out = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k]
        out[names.get(cat_id, str(cat_id))] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return out


def evaluate_detections(coco_gt: dict, predictions: Sequence[dict], per_class: bool = False) -> dict:
    """COCO box metrics ``{AP, AP50, AP75, APs, APm, APl}`` (floats in [0, 1]; COCO's -1 where undefined, e.g.
    no small ground truth) for predictions as in :func:`predictions_to_coco_results`.

    COCOeval keeps the 100 highest-scoring detections per image. Empty predictions give zeros. Predictions for
    image ids missing from ``coco_gt`` raise ``ValueError``. ``per_class`` adds ``"per_class": {name: AP}``.
    COCOeval's printout goes to the debug log.
    """
    results = predictions_to_coco_results(predictions)
    known = {im["id"] for im in coco_gt["images"]}
    unknown = {r["image_id"] for r in results} - known
    if unknown:
        raise ValueError(f"predictions for {len(unknown)} image ids not in the ground truth: {sorted(unknown)[:5]}")
    if not results or not coco_gt["annotations"]:
        metrics = dict.fromkeys(METRIC_NAMES, 0.0)
        return {**metrics, "per_class": {c["name"]: 0.0 for c in coco_gt["categories"]}} if per_class else metrics
    gt = _quiet_coco(copy.deepcopy(coco_gt))  # COCOeval writes 'ignore' into the annotations
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    logger.debug("COCOeval:\n%s", buffer.getvalue())
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats[:6])}
    if per_class:
        metrics["per_class"] = _per_class_ap(evaluator, {c["id"]: c["name"] for c in coco_gt["categories"]})
    return metrics
