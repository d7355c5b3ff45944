"""Hub dataset layouts users bring: cppe-5 (train/test splits only, xywh boxes) trains with a validation split
carved off the training split; xyxy boxes train with --bbox_format xyxy, and stop with an error naming the flag
without it. Offline: the datasets are local folders in the Hub's parquet layout."""

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, List, Value
from test_train_script import TINY
from test_trainer import parse

from sparse_semi_detr_hf.training.data import normalize_detection_dataset
from sparse_semi_detr_hf.training.trainer import SemiSupervisedTrainer, load_data

ARCHITECTURE = [flag for i, flag in enumerate(TINY)  # TINY without its synthetic-set flags and their values
                if not flag.startswith("--synthetic") and not (i and TINY[i - 1].startswith("--synthetic"))]


def _rows(count: int, seed: int, box_format: str) -> dict:
    """``count`` images of 60-90 px with 1-3 rectangles each; boxes in ``box_format`` (absolute pixels)."""
    rng = np.random.default_rng(seed)
    rows = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    for index in range(count):
        height, width = (int(v) for v in rng.integers(60, 91, 2))
        pixels = np.full((height, width, 3), 40, np.uint8)
        objects = {"id": [], "area": [], "bbox": [], "category": []}
        for k in range(int(rng.integers(1, 4))):
            w, h = (int(v) for v in rng.integers(12, 30, 2))
            x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            pixels[y:y + h, x:x + w] = (200, 60 + 100 * (k % 2), 30)
            box = {"xywh": [x, y, w, h], "xyxy": [x, y, x + w, y + h]}[box_format]
            objects["id"].append(100 * index + k)
            objects["area"].append(float(w * h))
            objects["bbox"].append([float(v) for v in box])
            objects["category"].append(k % 2)
        rows["image_id"].append(index)
        rows["image"].append({"bytes": _png(pixels), "path": None})
        rows["width"].append(width)
        rows["height"].append(height)
        rows["objects"].append(objects)
    return rows


def _png(pixels) -> bytes:
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


FEATURES = Features({
    "image_id": Value("int64"), "image": Image(), "width": Value("int32"), "height": Value("int32"),
    "objects": {"id": List(Value("int64")), "area": List(Value("float64")), "bbox": List(List(Value("float32"))),
                "category": List(ClassLabel(names=["mask", "glove"]))},
})


def _hub_folder(root, box_format: str):
    """A local dataset in the Hub's parquet layout with only train and test splits."""
    for split, count, seed in (("train", 24, 0), ("test", 6, 1)):
        path = root / "data" / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(_rows(count, seed, box_format), features=FEATURES).to_parquet(str(path))
    return str(root)


@pytest.fixture(scope="module")
def cppe5(tmp_path_factory):
    return _hub_folder(tmp_path_factory.mktemp("cppe5"), "xywh")


@pytest.fixture(scope="module")
def xyxy_dataset(tmp_path_factory):
    return _hub_folder(tmp_path_factory.mktemp("xyxy"), "xyxy")


def _args(tmp_path, dataset: str, *extra: str):
    return parse(*ARCHITECTURE, "--output_dir", str(tmp_path), "--dataset_name", dataset, "--preset", "synthetic",
                 "--max_steps", "2", "--eval_steps", "2", "--checkpointing_steps", "2",
                 "--detection_picture_images", "0", "--labeled_percent", "50", *extra)


def test_a_train_test_dataset_gets_a_validation_split_and_trains(tmp_path, cppe5):
    args = _args(tmp_path, cppe5)
    data = load_data(args)
    assert len(data.val) == round(0.15 * 24) and len(data.labeled) + len(data.unlabeled) == 24 - len(data.val)
    assert not set(data.val["image_id"]) & (set(data.labeled["image_id"]) | set(data.unlabeled["image_id"]))
    assert data.id2label == {0: "mask", 1: "glove"}
    results = SemiSupervisedTrainer(args).train()
    assert results["steps"] == 2 and set(results["final"]["teacher"]) >= {"AP", "APs"}


def test_xyxy_boxes_train_with_the_flag_and_stop_without_it(tmp_path, xyxy_dataset):
    with pytest.raises(ValueError, match=r"do not fit their image when read as --bbox_format xywh.*--bbox_format xyxy"):
        load_data(_args(tmp_path / "wrong", xyxy_dataset))
    args = _args(tmp_path / "right", xyxy_dataset, "--bbox_format", "xyxy")
    data = load_data(args)
    known = {index: objects["bbox"] for index, objects in enumerate(_rows(24, 0, "xywh")["objects"])}  # same draws
    checked = 0
    for split in (data.labeled, data.unlabeled, data.val):
        for row in split:  # every box is exactly the xywh box of the same rectangle
            np.testing.assert_allclose(row["objects"]["bbox"], known[row["image_id"]], rtol=0, atol=1e-6)
            checked += 1
    assert checked == 24
    assert SemiSupervisedTrainer(args).train()["steps"] == 2


def test_xyxy_boxes_are_converted():
    """xyxy boxes read with bbox_format="xyxy" become exactly the xywh boxes of the same rectangles."""
    rows = _rows(3, 2, "xyxy")
    expected = _rows(3, 2, "xywh")["objects"]
    assert rows["objects"][0]["bbox"] != expected[0]["bbox"]
    ds = normalize_detection_dataset(Dataset.from_dict(rows, features=FEATURES), bbox_format="xyxy")
    for row, objects in zip(ds, expected):
        np.testing.assert_allclose(row["objects"]["bbox"], objects["bbox"], rtol=0, atol=1e-6)
    x0, y0, x1, y1 = rows["objects"][0]["bbox"][0]  # and by hand, for one box
    np.testing.assert_allclose(ds[0]["objects"]["bbox"][0], [x0, y0, x1 - x0, y1 - y0], rtol=0, atol=1e-6)


def test_cxcywh_boxes_are_converted():
    rows = _rows(3, 2, "xywh")
    xywh = [[list(b) for b in objects["bbox"]] for objects in rows["objects"]]
    for objects, boxes in zip(rows["objects"], xywh):
        objects["bbox"] = [[x + w / 2, y + h / 2, w, h] for x, y, w, h in boxes]
    ds = normalize_detection_dataset(Dataset.from_dict(rows, features=FEATURES), bbox_format="cxcywh")
    for row, boxes in zip(ds, xywh):
        assert np.allclose(row["objects"]["bbox"], boxes)
