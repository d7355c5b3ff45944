"""Loaders on the real COCO-format sets, bad inputs, COCO-Partial splits, streaming, wrappers and collates."""

import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image, List, Value

from sparse_semi_detr_hf.training.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LabeledDetectionDataset,
    UnlabeledPairDataset,
    UnlabeledPairIterableDataset,
    align_categories,
    as_streaming,
    collate_labeled,
    collate_unlabeled,
    dataset_category_ids,
    dataset_id2label,
    detection_features,
    load_coco_folder,
    load_unlabeled_images,
    normalize_detection_dataset,
    split_labeled_unlabeled,
)
from sparse_semi_detr_hf.training.transforms import (
    EvalTransform,
    LabeledTransform,
    UnlabeledPairTransform,
    ViewConfig,
)

DATA = "/work/shared/data"
COCO_MINI = os.path.join(DATA, "coco2017_train_mini")
BCCD = os.path.join(DATA, "bccd")
SMALL_VIEWS = ViewConfig(scales=(96, 112, 128), max_size=200)
needs_data = pytest.mark.skipif(not os.path.isdir(BCCD) or not os.path.isdir(COCO_MINI),
                                reason="shared real data not available")


@pytest.fixture(scope="module")
def coco_mini():
    return load_coco_folder(os.path.join(COCO_MINI, "images"), os.path.join(COCO_MINI, "annotations.json"))


@pytest.fixture(scope="module")
def bccd():
    return load_coco_folder(os.path.join(BCCD, "images"), os.path.join(BCCD, "annotations.json"))


def tiny_coco(tmp_path, num_images: int = 3, corrupt: int | None = None) -> tuple[str, str, dict]:
    """A temp COCO folder with the first ``num_images`` BCCD images (image ``corrupt`` replaced by garbage)."""
    with open(os.path.join(BCCD, "annotations.json")) as f:
        full = json.load(f)
    images = full["images"][:num_images]
    keep = {im["id"] for im in images}
    coco = {"images": images, "categories": full["categories"],
            "annotations": [a for a in full["annotations"] if a["image_id"] in keep]}
    folder = tmp_path / "images"
    folder.mkdir()
    for i, im in enumerate(images):
        if i == corrupt:
            (folder / im["file_name"]).write_bytes(b"\xff\xd8 this is not a jpeg " * 10)
        else:
            shutil.copy(os.path.join(BCCD, "images", im["file_name"]), folder / im["file_name"])
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(coco))
    return str(folder), str(path), coco


# ----------------------------------------------------------------------------------------------- loaders
@needs_data
def test_coco_mini_loader(coco_mini):
    with open(os.path.join(COCO_MINI, "annotations.json")) as f:
        raw = json.load(f)
    assert len(coco_mini) == 120
    assert coco_mini.features == detection_features([c["name"] for c in sorted(raw["categories"],
                                                                             key=lambda c: c["id"])])
    objects = coco_mini["objects"]
    assert sum(len(o["bbox"]) for o in objects) == 890
    assert sum(sum(o["iscrowd"]) for o in objects) == 9
    id2label = dataset_id2label(coco_mini)
    original = dataset_category_ids(coco_mini)
    assert len(id2label) == 80 and original == sorted(original) and original[:3] == [1, 2, 3] and original[-1] == 90
    assert id2label[0] == "person" and id2label[79] == "toothbrush"
    # every annotation's contiguous label maps back to its original category id
    by_id = {a["id"]: a["category_id"] for a in raw["annotations"]}
    for row in objects:
        for ann_id, label in zip(row["id"], row["category"]):
            assert original[label] == by_id[ann_id]
    example = coco_mini[0]
    assert example["image"].size == (example["width"], example["height"])


@needs_data
def test_bccd_loader_and_decoded_example(bccd):
    assert len(bccd) == 364
    assert dataset_id2label(bccd) == {0: "RBC", 1: "WBC", 2: "Platelets"}
    assert dataset_category_ids(bccd) == [1, 2, 3]
    counts = np.bincount([c for o in bccd["objects"] for c in o["category"]], minlength=3)
    assert counts.tolist() == [4153, 372, 361]
    item = LabeledDetectionDataset(bccd, EvalTransform(SMALL_VIEWS))[0]
    assert item["image"].shape == (3, 128, 170) and item["orig_size"] == (480, 640)
    assert item["boxes"].shape[0] == len(bccd[0]["objects"]["bbox"]) > 0
    box = bccd[0]["objects"]["bbox"][0]
    scale = torch.tensor([170 / 640, 128 / 480] * 2)
    expected = torch.tensor([box[0], box[1], box[0] + box[2], box[1] + box[3]]) * scale
    torch.testing.assert_close(item["boxes"][0], expected, atol=1e-3, rtol=0)


@needs_data
def test_evaluation_view_equals_the_image_processor(bccd):
    """Bug fixed: the evaluation view rounded the resized width (640 x 480 at 128: 171 px) where the exported image
    processor truncates (170 px, DETR's rule), so the AP reported in training was not the exported model's."""
    from sparse_semi_detr_hf import SparseSemiDetrImageProcessor

    processor = SparseSemiDetrImageProcessor(size={"shortest_edge": 128, "longest_edge": 200})
    batch = collate_labeled([LabeledDetectionDataset(bccd, EvalTransform(SMALL_VIEWS))[0]])
    expected = processor(images=bccd[0]["image"], return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == expected.shape == (1, 3, 128, 170)
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-5, rtol=0)


@needs_data
def test_unknown_category_and_missing_file(tmp_path):
    images, path, coco = tiny_coco(tmp_path)
    coco["annotations"][1]["category_id"] = 77
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=r"annotation id \d+ .*unknown category_id 77"):
        load_coco_folder(images, str(bad))
    os.remove(os.path.join(images, coco["images"][2]["file_name"]))
    with pytest.raises(FileNotFoundError, match=coco["images"][2]["file_name"]):
        load_coco_folder(images, path)


@needs_data
def test_bad_boxes_dropped_with_warning(tmp_path, caplog):
    images, path, coco = tiny_coco(tmp_path)
    total = len(coco["annotations"])
    coco["annotations"][0]["bbox"] = [1.0, 2.0, -3.0, 4.0]
    coco["annotations"][1]["bbox"] = [float("nan"), 2.0, 3.0, 4.0]
    coco["annotations"][2]["bbox"] = [1.0, 2.0, 3.0, 0.0]
    path2 = tmp_path / "boxes.json"
    path2.write_text(json.dumps(coco))
    with caplog.at_level(logging.WARNING):
        ds = load_coco_folder(images, str(path2))
    assert sum(len(o["bbox"]) for o in ds["objects"]) == total - 3
    assert "dropped 3 annotations" in caplog.text


@needs_data
def test_corrupt_image_skipped_with_warning(tmp_path, caplog):
    images, path, coco = tiny_coco(tmp_path, corrupt=1)
    ds = load_coco_folder(images, path)
    labeled = LabeledDetectionDataset(ds, LabeledTransform(SMALL_VIEWS), seed=0)
    with caplog.at_level(logging.WARNING):
        item = labeled[1]
    assert item["image_id"] == coco["images"][2]["id"]  # deterministic fallback: the next index
    assert coco["images"][1]["file_name"] in caplog.text and "skipping image" in caplog.text
    pairs = UnlabeledPairDataset(ds, UnlabeledPairTransform(SMALL_VIEWS), seed=0)
    assert [pairs[i]["image_id"] for i in range(3)] == [coco["images"][i]["id"] for i in (0, 2, 2)]
    stream = UnlabeledPairIterableDataset(as_streaming(ds, num_shards=1, shuffle_buffer=0), UnlabeledPairTransform(
        SMALL_VIEWS), seed=0)
    assert [item["image_id"] for item in stream] == [coco["images"][i]["id"] for i in (0, 2)]


@needs_data
def test_unlabeled_folder_and_json(tmp_path):
    images, path, coco = tiny_coco(tmp_path)
    nested = tmp_path / "images" / "more"
    nested.mkdir()
    PIL.Image.new("RGB", (20, 10)).save(nested / "extra.png")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    folder = load_unlabeled_images(str(tmp_path / "images"), read_sizes=True)
    assert len(folder) == 4 and folder["image_id"][:] == [0, 1, 2, 3]
    assert folder["width"][3] == 20 and folder[3]["image"].size == (20, 10)
    from_json = load_unlabeled_images(path)
    assert from_json["image_id"][:] == [im["id"] for im in coco["images"]]
    assert "objects" not in from_json.column_names


# ----------------------------------------------------------------------------------------------- hub schema
def test_normalize_hub_schema_dict_of_lists():
    """cppe-5 layout: objects {id, area, bbox xywh, category ClassLabel}, plus a bad box."""
    features = Features({"image_id": Value("int64"), "image": Image(), "width": Value("int32"),
                         "height": Value("int32"),
                         "objects": {"id": List(Value("int64")), "area": List(Value("int64")),
                                     "bbox": List(List(Value("float32"), length=4)),
                                     "category": List(ClassLabel(names=["Coverall", "Face_Shield", "Gloves"]))}})
    rows = {"image_id": [10, 11], "image": [PIL.Image.new("RGB", (40, 30)), PIL.Image.new("RGB", (50, 20))],
            "width": [40, 50], "height": [30, 20],
            "objects": [{"id": [1, 2], "area": [20, 6], "bbox": [[1, 2, 5, 4], [3, 3, 2, 3]], "category": [2, 0]},
                        {"id": [3], "area": [0], "bbox": [[1, 1, 0, 5]], "category": [1]}]}
    ds = normalize_detection_dataset(Dataset.from_dict(rows, features=features))
    assert ds.features == detection_features(["Coverall", "Face_Shield", "Gloves"])
    assert ds["image_id"][:] == [10, 11] and ds["width"][:] == [40, 50]
    assert ds[0]["objects"] == {"id": [1, 2], "area": [20.0, 6.0], "bbox": [[1, 2, 5, 4], [3, 3, 2, 3]],
                                "category": [2, 0], "iscrowd": [0, 0]}
    assert ds[1]["objects"]["bbox"] == []  # zero-width box dropped
    assert ds[1]["image"].size == (50, 20)
    assert dataset_category_ids(ds) == [0, 1, 2]


def test_normalize_hub_schema_list_of_dicts_xyxy():
    features = Features({"img": Image(),
                         "objects": List({"bbox": List(Value("float32"), length=4), "category": Value("string")})})
    rows = {"img": [PIL.Image.new("RGB", (32, 24))],
            "objects": [[{"bbox": [2, 4, 12, 10], "category": "dog"}, {"bbox": [0, 0, 8, 8], "category": "cat"}]]}
    ds = normalize_detection_dataset(Dataset.from_dict(rows, features=features), bbox_format="xyxy",
                                     image_column="img")
    assert dataset_id2label(ds) == {0: "cat", 1: "dog"}
    row = ds[0]
    assert (row["image_id"], row["width"], row["height"]) == (0, 32, 24)
    assert row["objects"]["bbox"] == [[2, 4, 10, 6], [0, 0, 8, 8]] and row["objects"]["category"] == [1, 0]
    assert row["objects"]["area"] == [60.0, 64.0]


def test_list_of_dicts_with_an_image_without_objects():
    """Bug fixed: ``objects`` as a list of dicts with one image's list empty raised ``KeyError: 'category'``."""
    features = Features({"image": Image(),
                         "objects": List({"bbox": List(Value("float32"), length=4), "category": Value("string")})})
    rows = {"image": [PIL.Image.new("RGB", (32, 24)), PIL.Image.new("RGB", (32, 24))],
            "objects": [[{"bbox": [2, 4, 10, 6], "category": "dog"}], []]}
    ds = normalize_detection_dataset(Dataset.from_dict(rows, features=features))
    assert dataset_id2label(ds) == {0: "dog"}
    assert ds[0]["objects"]["category"] == [0] and ds[1]["objects"]["bbox"] == []


def _renumbered(path: str, tmp_path, name: str, ids: dict, drop: tuple = ()) -> str:
    """The COCO json ``path`` with category ids renumbered by ``ids`` (old -> new) and categories ``drop`` removed
    (with their boxes)."""
    with open(path) as f:
        coco = json.load(f)
    dropped = {c["id"] for c in coco["categories"] if c["name"] in drop}
    coco["categories"] = [dict(c, id=ids[c["id"]]) for c in coco["categories"] if c["id"] not in dropped]
    coco["annotations"] = [dict(a, category_id=ids[a["category_id"]]) for a in coco["annotations"]
                           if a["category_id"] not in dropped]
    out = tmp_path / name
    out.write_text(json.dumps(coco))
    return str(out)


def _boxes_by_name(ds) -> list[list[tuple]]:
    names = dataset_id2label(ds)
    return [sorted((names[c], tuple(b)) for c, b in zip(o["category"], o["bbox"])) for o in ds["objects"]]


@needs_data
def test_validation_categories_are_matched_to_the_training_set_by_name(tmp_path):
    """Bug fixed: a validation / test json numbering its categories differently from the training json (or listing
    fewer) was loaded with its own labels, so the model was scored against the wrong classes (BCCD: AP 0.004
    instead of 0.267 for the same model, measured with the trainer). Labels are matched by class name now."""
    images, path, coco = tiny_coco(tmp_path, num_images=4)
    train = load_coco_folder(images, path)
    ids = {c["id"]: c["id"] for c in coco["categories"]}
    permuted = dict(zip(sorted(ids), sorted(ids)[1:] + sorted(ids)[:1]))  # every class gets another id
    val = load_coco_folder(images, _renumbered(path, tmp_path, "val.json", permuted))
    assert dataset_id2label(val) != dataset_id2label(train)  # labels in another order (sorted ids)...
    assert _boxes_by_name(val) == _boxes_by_name(train)  # ...of the same boxes and classes
    aligned = align_categories(val, train, "the validation set")
    assert [o["category"] for o in aligned["objects"]] == [o["category"] for o in train["objects"]]
    assert dataset_category_ids(aligned) == dataset_category_ids(train)
    fewer = load_coco_folder(images, _renumbered(path, tmp_path, "fewer.json", ids, drop=("WBC",)))
    aligned = align_categories(fewer, train, "the validation set")
    assert dataset_id2label(aligned) == dataset_id2label(train)
    expected = [[box for box in image if box[0] != "WBC"] for image in _boxes_by_name(train)]
    assert _boxes_by_name(aligned) == expected
    assert align_categories(train, train, "same") is train
    with pytest.raises(ValueError, match=r"categories \['WBC'\] that the training set does not have"):
        align_categories(train, fewer, "the validation set")


# ----------------------------------------------------------------------------------------------- splits
def id_dataset(n: int = 200) -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_dict({"image_id": rng.permutation(10 * n)[:n].tolist()})


def test_split_deterministic_disjoint_complete():
    ds = id_dataset()
    lab, unl = split_labeled_unlabeled(ds, labeled_percent=10, fold=1, seed=3)
    lab2, _ = split_labeled_unlabeled(ds, labeled_percent=10, fold=1, seed=3)
    other, _ = split_labeled_unlabeled(ds, labeled_percent=10, fold=2, seed=3)
    lab_ids, unl_ids = set(lab["image_id"]), set(unl["image_id"])
    assert len(lab_ids) == 20 and lab_ids.isdisjoint(unl_ids) and lab_ids | unl_ids == set(ds["image_id"])
    assert list(lab2["image_id"]) == list(lab["image_id"])
    assert set(other["image_id"]) != lab_ids
    # the rule is independent of row order: permuting the rows gives the same labeled set
    shuffled = ds.select(np.random.default_rng(1).permutation(len(ds)).tolist())
    assert set(split_labeled_unlabeled(shuffled, labeled_percent=10, fold=1, seed=3)[0]["image_id"]) == lab_ids
    # pinned: sorted ids permuted by numpy's PCG64 (platform independent)
    expected = np.sort(np.asarray(ds["image_id"]))[np.random.default_rng([3, 1]).permutation(200)[:20]]
    assert lab_ids == set(expected.tolist())


def test_split_by_id_list_and_file(tmp_path):
    ds = id_dataset(20)
    chosen = list(ds["image_id"])[:5]
    lab, unl = split_labeled_unlabeled(ds, labeled_ids=chosen)
    assert list(lab["image_id"]) == chosen and len(unl) == 15
    path = tmp_path / "ids.txt"
    path.write_text("# labeled\n" + "\n".join(map(str, chosen)) + "\n")
    assert list(split_labeled_unlabeled(ds, labeled_ids=str(path))[0]["image_id"]) == chosen
    with pytest.raises(ValueError):
        split_labeled_unlabeled(ds, labeled_ids=[-5])
    with pytest.raises(ValueError):
        split_labeled_unlabeled(ds, labeled_percent=0)


@needs_data
def test_split_keeps_schema_and_category_ids(coco_mini):
    lab, unl = split_labeled_unlabeled(coco_mini, labeled_percent=10)
    assert len(lab) == 12 and len(unl) == 108
    assert dataset_category_ids(lab) == dataset_category_ids(coco_mini) and lab.features == coco_mini.features


# ----------------------------------------------------------------------------------------------- streaming
def test_streaming_split_by_node_partitions_ids():
    ds = id_dataset(40)
    per_rank = [[row["image_id"] for row in as_streaming(ds, num_shards=4, rank=r, world_size=2, seed=7)]
                for r in range(2)]
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ds["image_id"])
    again = [row["image_id"] for row in as_streaming(ds, num_shards=4, rank=0, world_size=2, seed=7)]
    assert again == per_rank[0]  # fixed seed: same order on every call


# ----------------------------------------------------------------------------------------------- collate
def view_item(h: int, w: int, boxes: list, labels: list, image_id: int) -> dict:
    return {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "class_labels": torch.tensor(labels, dtype=torch.long), "image_id": image_id, "orig_size": (2 * h, 2 * w)}


def test_collate_labeled_shapes_masks_and_boxes():
    batch = [view_item(30, 40, [[0, 0, 40, 30], [10, 5, 20, 25]], [1, 2], 7), view_item(50, 20, [], [], 8)]
    out = collate_labeled(batch)
    assert out["pixel_values"].shape == (2, 3, 50, 40) and out["pixel_mask"].shape == (2, 50, 40)
    assert out["pixel_mask"][0].sum() == 30 * 40 and out["pixel_mask"][0, :30, :40].all()
    assert out["pixel_mask"][1, :, 20:].sum() == 0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out["pixel_values"][0, :, :30, :40], (batch[0]["image"] / 255.0 - mean) / std)
    assert (out["pixel_values"][0, :, 30:, :] == 0).all()
    first = out["labels"][0]
    torch.testing.assert_close(first["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.375, 0.5, 0.25, 2 / 3]]))
    assert first["class_labels"].tolist() == [1, 2] and first["size"].tolist() == [30, 40]
    assert first["orig_size"].tolist() == [60, 80] and int(first["image_id"]) == 7
    assert out["labels"][1]["boxes"].shape == (0, 4) and out["labels"][1]["class_labels"].shape == (0,)


@needs_data
def test_collate_unlabeled_pairs(bccd):
    pairs = UnlabeledPairDataset(bccd.select(range(3)), UnlabeledPairTransform(SMALL_VIEWS), seed=0)
    items = [pairs[i] for i in range(3)]
    out = collate_unlabeled(items)
    b = 3
    assert out["weak_to_strong"].shape == (b, 3, 3) and out["weak_to_strong"].dtype == torch.float32
    for name in ("weak", "strong"):
        values, mask, sizes = out[f"{name}_pixel_values"], out[f"{name}_pixel_mask"], out[f"{name}_sizes"]
        assert values.shape[:2] == (b, 3) and mask.shape == (b, *values.shape[2:]) and sizes.shape == (b, 2)
        for i in range(b):
            h, w = sizes[i].tolist()
            assert mask[i].sum() == h * w and (h, w) == items[i][name].size
    assert out["image_ids"].tolist() == bccd["image_id"][:3]
    assert out["orig_sizes"].tolist() == [[480, 640]] * 3
    gt = out["gt_labels"][0]
    h, w = out["weak_sizes"][0].tolist()
    xyxy = torch.cat((gt["boxes"][:, :2] - gt["boxes"][:, 2:] / 2, gt["boxes"][:, :2] + gt["boxes"][:, 2:] / 2), 1)
    torch.testing.assert_close(xyxy * torch.tensor([w, h, w, h]), items[0]["weak"].boxes, atol=1e-3, rtol=0)
    # no ground truth when the rows carry none
    no_gt = UnlabeledPairDataset(bccd.select(range(2)).remove_columns("objects"), UnlabeledPairTransform(SMALL_VIEWS))
    assert "gt_labels" not in collate_unlabeled([no_gt[0], no_gt[1]])


@needs_data
def test_wrappers_reproducible_with_seed(bccd):
    small = bccd.select(range(2))
    a = LabeledDetectionDataset(small, LabeledTransform(SMALL_VIEWS), seed=1)
    b = LabeledDetectionDataset(small, LabeledTransform(SMALL_VIEWS), seed=1)
    assert torch.equal(a[0]["image"], b[0]["image"]) and torch.equal(a[0]["boxes"], b[0]["boxes"])
    b.set_epoch(1)
    assert not (a[0]["image"].shape == b[0]["image"].shape and torch.equal(a[0]["image"], b[0]["image"]))
    loader = torch.utils.data.DataLoader(a, batch_size=2, collate_fn=collate_labeled)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape[0] == 2 and len(batch["labels"]) == 2
