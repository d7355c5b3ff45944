"""COCO evaluation helpers against direct pycocotools runs."""

import contextlib
import io

import numpy as np
import pytest
import torch
from datasets import Dataset
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from sparse_semi_detr_hf.training.data import detection_features
from sparse_semi_detr_hf.training.evaluation import (
    METRIC_NAMES,
    coco_ground_truth_from_dataset,
    evaluate_detections,
    predictions_to_coco_results,
)
from sparse_semi_detr_hf.training.synthetic import make_synthetic_detection_dataset


@pytest.fixture(scope="module")
def gt():
    _, val = make_synthetic_detection_dataset(num_train=0, num_val=12, seed=5)
    return coco_ground_truth_from_dataset(val)


def gt_as_predictions(coco_gt: dict, shift: float = 0.0) -> list[dict]:
    preds = []
    for image in coco_gt["images"]:
        anns = [a for a in coco_gt["annotations"] if a["image_id"] == image["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes += shift
        preds.append({"image_id": image["id"], "boxes": boxes, "scores": torch.linspace(0.9, 0.5, len(anns)),
                      "labels": torch.tensor([a["category_id"] for a in anns])})
    return preds


def hand_coco_results(predictions: list[dict]) -> list[dict]:
    """COCO result list written out by hand from the raw arrays (xyxy -> xywh, score, category): an independent
    reference, not ``predictions_to_coco_results``."""
    results = []
    for pred in predictions:
        boxes = np.asarray(pred["boxes"], dtype=np.float64).reshape(-1, 4)
        scores = np.asarray(pred["scores"], dtype=np.float64).reshape(-1)
        labels = np.asarray(pred["labels"]).reshape(-1)
        for i in range(len(boxes)):
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            results.append({"image_id": int(pred["image_id"]), "category_id": int(labels[i]),
                            "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(scores[i])})
    return results


def direct_cocoeval(coco_gt: dict, predictions: list[dict], cat_ids: list[int] | None = None) -> np.ndarray:
    """pycocotools run directly on the hand-built results (optionally restricted to ``cat_ids``)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = {**coco_gt, "annotations": [dict(a) for a in coco_gt["annotations"]]}
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(hand_coco_results(predictions)), iouType="bbox")
        if cat_ids is not None:
            evaluator.params.catIds = list(cat_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:6]


def test_ground_truth_dict(gt):
    assert len(gt["images"]) == 12 and len(gt["categories"]) == 10
    assert [a["id"] for a in gt["annotations"]] == list(range(1, len(gt["annotations"]) + 1))
    assert all(set(a) >= {"bbox", "area", "iscrowd", "category_id", "image_id"} for a in gt["annotations"])
    assert gt["categories"][3] == {"id": 3, "name": "cross_dots", "original_id": 3}


def test_gt_as_predictions_is_perfect(gt):
    metrics = evaluate_detections(gt, gt_as_predictions(gt))
    assert set(metrics) == set(METRIC_NAMES)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    assert metrics["AP75"] == pytest.approx(1.0)


def test_shifted_boxes_lower_ap(gt):
    perfect = evaluate_detections(gt, gt_as_predictions(gt))["AP"]
    shifted = evaluate_detections(gt, gt_as_predictions(gt, shift=3.0))["AP"]
    assert shifted < perfect - 0.1


def test_empty_predictions_give_zero(gt):
    assert evaluate_detections(gt, []) == dict.fromkeys(METRIC_NAMES, 0.0)
    empty = [{"image_id": gt["images"][0]["id"], "boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
              "labels": torch.zeros(0, dtype=torch.long)}]
    assert evaluate_detections(gt, empty)["AP"] == 0.0


def test_matches_direct_pycocotools(gt):
    rng = np.random.default_rng(0)
    preds = gt_as_predictions(gt)
    for pred in preds:  # jitter, relabel some, add false positives
        n = len(pred["boxes"])
        pred["boxes"] = pred["boxes"] + torch.from_numpy(rng.normal(0, 2.0, (n, 4))).float()
        pred["labels"] = torch.where(torch.from_numpy(rng.random(n) < 0.2), (pred["labels"] + 1) % 10,
                                     pred["labels"])
        pred["scores"] = torch.from_numpy(rng.random(n)).float()
    metrics = evaluate_detections(gt, preds)
    expected = direct_cocoeval(gt, preds)
    np.testing.assert_allclose([metrics[k] for k in METRIC_NAMES], expected)
    assert 0.0 < metrics["AP"] < 1.0
    assert predictions_to_coco_results(preds) == hand_coco_results(preds)
    assert "ignore" not in gt["annotations"][0]  # the caller's dict is not modified


def crowd_dataset(crowd: int) -> Dataset:
    rows = {"image": [None], "image_id": [1], "width": [100], "height": [100],
            "objects": [{"id": [1, 2], "area": [400.0, 900.0], "bbox": [[10, 10, 20, 20], [50, 50, 30, 30]],
                         "category": [0, 0], "iscrowd": [0, crowd]}]}
    return Dataset.from_dict(rows, features=detection_features(["thing"]))


def test_crowd_regions_are_ignored():
    pred = [{"image_id": 1, "boxes": [[10.0, 10.0, 30.0, 30.0]], "scores": [0.9], "labels": [0]}]
    with_crowd = coco_ground_truth_from_dataset(crowd_dataset(1))
    without = coco_ground_truth_from_dataset(crowd_dataset(0))
    assert with_crowd["annotations"][1]["iscrowd"] == 1
    assert evaluate_detections(with_crowd, pred)["AP"] == pytest.approx(1.0)  # the crowd box is not missed
    assert evaluate_detections(without, pred)["AP"] < 0.6
    on_crowd = pred + [{"image_id": 1, "boxes": [[52.0, 52.0, 70.0, 70.0]], "scores": [0.95], "labels": [0]}]
    assert evaluate_detections(with_crowd, on_crowd)["AP"] == pytest.approx(1.0)  # not a false positive


def test_unknown_image_and_per_class(gt):
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(gt, [{"image_id": 10**9, "boxes": [[0, 0, 1, 1]], "scores": [1.0], "labels": [0]}])
    perfect = evaluate_detections(gt, gt_as_predictions(gt), per_class=True)
    present = {gt["categories"][a["category_id"]]["name"] for a in gt["annotations"]}
    assert all(perfect["per_class"][name] == pytest.approx(1.0) for name in present)


def test_per_class_ap_matches_pycocotools_per_category(gt):
    """Per-class AP differs between classes (class 0 perfect, class c misplaces a growing share of its boxes) and
    each equals pycocotools run directly with ``params.catIds = [c]``."""
    preds = gt_as_predictions(gt)
    seen = {}
    for pred in preds:
        for i, label in enumerate(pred["labels"].tolist()):
            seen[label] = seen.get(label, 0) + 1
            if label > 0 and seen[label] % 10 < label:  # class c: about c/10 of its boxes moved off the object
                pred["boxes"][i] += 60.0
    metrics = evaluate_detections(gt, preds, per_class=True)["per_class"]
    names = {c["id"]: c["name"] for c in gt["categories"]}
    expected = {names[c]: float(direct_cocoeval(gt, preds, cat_ids=[c])[0]) for c in names}
    assert metrics == pytest.approx(expected)
    assert expected[names[0]] == pytest.approx(1.0)
    assert expected[names[9]] < 0.3 and len({round(v, 3) for v in expected.values()}) >= 8  # the classes differ
