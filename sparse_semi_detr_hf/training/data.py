"""Training-side data: ``datasets`` loaders, COCO-Partial splits, streaming, torch wrappers and collates.

Every detection ``datasets.Dataset`` made here has the same schema (:func:`detection_features`)::

    image     Image()          lazily decoded (COCO folders store only the file path)
    image_id  int64
    width     int32            original image size in pixels
    height    int32
    objects   {id: [int64], area: [float32], bbox: [[float32 x4]] COCO xywh absolute pixels,
               category: [ClassLabel] contiguous labels 0..C-1, iscrowd: [int64]}

``ds.info.description`` holds JSON ``{"category_ids": [...]}``: the original category id of each contiguous
label (:func:`dataset_category_ids`). The batch layout follows docs/architecture.md ("Training side data contract").
"""

import glob
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import PIL.Image
import torch
import torchvision.transforms.v2.functional as TF
from datasets import ClassLabel, Dataset, DatasetInfo, Features, Image, IterableDataset, List, Value
from datasets.distributed import split_dataset_by_node
from torch import Tensor

from ..box_ops import box_xyxy_to_cxcywh
from ..image_processing_sparse_semi_detr import to_rgb_pil
from .transforms import View

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# What PIL raises for an unreadable image (truncated, corrupt, not an image, too large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------- schema
def detection_features(class_names: Sequence[str]) -> Features:
    """The common detection schema with ``objects.category`` a ``ClassLabel`` over ``class_names``."""
    return Features({
        "image": Image(),
        "image_id": Value("int64"),
        "width": Value("int32"),
        "height": Value("int32"),
        "objects": {
            "id": List(Value("int64")),
            "area": List(Value("float32")),
            "bbox": List(List(Value("float32"), length=4)),
            "category": List(ClassLabel(names=list(class_names))),
            "iscrowd": List(Value("int64")),
        },
    })


def dataset_id2label(ds: Dataset | IterableDataset) -> dict[int, str]:
    """``{contiguous label: class name}`` read from ``objects.category``."""
    return dict(enumerate(ds.features["objects"]["category"].feature.names))


def dataset_label2id(ds: Dataset | IterableDataset) -> dict[str, int]:
    """``{class name: contiguous label}``."""
    return {name: i for i, name in dataset_id2label(ds).items()}


def dataset_category_ids(ds: Dataset | IterableDataset) -> list[int]:
    """Original (e.g. COCO) category id of each contiguous label; ``range(C)`` when none was recorded."""
    try:
        return list(json.loads(ds.info.description or "{}")["category_ids"])
    except (KeyError, TypeError, json.JSONDecodeError):
        return list(range(len(dataset_id2label(ds))))


def _info(category_ids: Sequence[int], features: Features, **extra) -> DatasetInfo:
    description = json.dumps({"category_ids": [int(c) for c in category_ids], **extra})
    return DatasetInfo(description=description, features=features)


def _valid_xywh(bbox) -> bool:
    """A COCO box with 4 finite numbers (numeric strings accepted) and a positive width and height."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return False
    return all(math.isfinite(v) for v in (x, y, w, h)) and w > 0 and h > 0


def _warn_dropped(dropped: int, source: str, examples: list) -> None:
    if dropped:
        logger.warning("dropped %d annotations with malformed, non-finite or non-positive-size boxes from %s "
                       "(e.g. ids %s)", dropped, source, examples[:5])


def read_coco_json(path: str) -> dict:
    """A COCO json file as a dict, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist (or is a folder)")
    try:
        with open(path) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file (a COCO instances json is expected): {err}") from err
    if not isinstance(coco, dict) or not isinstance(coco.get("images", []), list):
        raise ValueError(f"{path} is not a COCO instances json (a dict with 'images', 'annotations', "
                         f"'categories')")
    return coco


# ----------------------------------------------------------------------------------------------- COCO folder
def _coco_categories(coco: dict, source: str) -> tuple[list[int], list[str]]:
    cats = sorted(coco.get("categories", []), key=lambda c: c["id"])
    ids, names = [int(c["id"]) for c in cats], [str(c["name"]) for c in cats]
    if not cats:
        raise ValueError(f"{source}: no categories")
    if len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise ValueError(f"{source}: duplicate category ids or names in {list(zip(ids, names))}")
    return ids, names


def _coco_images(coco: dict, images_dir: str, source: str) -> list[dict]:
    images = sorted(coco.get("images", []), key=lambda im: im["id"])
    ids = [im["id"] for im in images]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{source}: duplicate image ids {repeated[:5]}")
    missing = [im["file_name"] for im in images if not os.path.isfile(os.path.join(images_dir, im["file_name"]))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image files listed in {source} are missing under {images_dir}: "
                                f"{missing[:5]}")
    readable = []
    for im in images:
        if "width" not in im or "height" not in im:  # read from the header (as displayed: EXIF orientation)
            try:
                im["width"], im["height"] = _header_size(os.path.join(images_dir, im["file_name"]))
            except DECODE_ERRORS as err:
                logger.warning("skipping unreadable image %s (image_id %s, listed in %s): %s",
                               im["file_name"], im["id"], source, err)
                continue
        readable.append(im)
    return readable


def _coco_objects(coco: dict, image_ids: set, cat_to_label: dict, source: str) -> dict[int, dict]:
    objects = {i: {"id": [], "area": [], "bbox": [], "category": [], "iscrowd": []} for i in image_ids}
    skipped_ids = {im.get("id") for im in coco.get("images", [])} - set(image_ids)
    dropped = []
    for ann in coco.get("annotations", []):
        if ann.get("category_id") not in cat_to_label:
            raise ValueError(f"{source}: annotation id {ann.get('id')} (image {ann.get('image_id')}) has unknown "
                             f"category_id {ann.get('category_id')}; known ids: {sorted(cat_to_label)}")
        if ann.get("image_id") not in objects:
            if ann.get("image_id") in skipped_ids:  # its image was skipped as unreadable
                continue
            raise ValueError(f"{source}: annotation id {ann.get('id')} refers to unknown image_id "
                             f"{ann.get('image_id')}")
        if not _valid_xywh(ann.get("bbox")):
            dropped.append(ann.get("id"))
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        obj = objects[ann["image_id"]]
        obj["id"].append(int(ann.get("id", -1)))
        obj["area"].append(float(ann.get("area", w * h)))
        obj["bbox"].append([x, y, w, h])
        obj["category"].append(cat_to_label[ann["category_id"]])
        obj["iscrowd"].append(int(ann.get("iscrowd", 0)))
    _warn_dropped(len(dropped), source, dropped)
    return objects


def load_coco_folder(images_dir: str, annotations_json: str) -> Dataset:
    """Load a COCO-format detection set (image folder + instances json) into the common schema.

    Category ids become contiguous labels in sorted-id order (original ids: :func:`dataset_category_ids`).
    Images are stored as paths and decoded lazily. Raises ``FileNotFoundError`` for missing image files and
    ``ValueError`` for annotations with an unknown category or image id; non-finite or non-positive-size boxes
    are dropped with one logged warning.
    """
    coco = read_coco_json(annotations_json)
    cat_ids, names = _coco_categories(coco, annotations_json)
    images = _coco_images(coco, images_dir, annotations_json)
    objects = _coco_objects(coco, {im["id"] for im in images}, {c: i for i, c in enumerate(cat_ids)},
                            annotations_json)
    columns = {
        "image": [os.path.join(images_dir, im["file_name"]) for im in images],
        "image_id": [int(im["id"]) for im in images],
        "width": [int(im["width"]) for im in images],
        "height": [int(im["height"]) for im in images],
        "objects": [objects[im["id"]] for im in images],
    }
    features = detection_features(names)
    return Dataset.from_dict(columns, features=features, info=_info(cat_ids, features))


def align_categories(ds: Dataset, reference: Dataset, source: str) -> Dataset:
    """``ds`` with its labels moved into ``reference``'s label space, matched by class name.

    Splits loaded on their own number their classes on their own (a COCO json's sorted ids, a Hub split's sorted
    names): a validation json with other ids or fewer categories than the training json, or a split without
    some class, would score the model against the wrong classes. Classes of ``ds`` that have boxes but are
    unknown to ``reference`` raise a ``ValueError`` naming them; ``ds`` is returned as it is when the names agree.
    """
    names, reference_names = list(dataset_id2label(ds).values()), list(dataset_id2label(reference).values())
    if names == reference_names:
        return ds
    index = {name: label for label, name in enumerate(reference_names)}
    used = {names[c] for objects in ds["objects"] for c in objects["category"]}
    unknown = sorted(used - set(index))
    if unknown:
        raise ValueError(f"{source} has boxes of categories {unknown} that the training set does not have "
                         f"(training categories: {reference_names}); a model trained on that set cannot detect "
                         "them: add them to the training annotations' categories or remove those boxes.")
    mapping = [index.get(name, -1) for name in names]
    logger.info("%s: categories matched to the training set's by name (%s)", source,
                {name: index[name] for name in names if name in index})
    features = ds.features.copy()
    features["objects"] = detection_features(reference_names)["objects"]

    def relabel(objects: dict) -> dict:
        return {"objects": {**objects, "category": [mapping[c] for c in objects["category"]]}}

    out = ds.map(relabel, input_columns="objects", features=features)
    out.info.description = json.dumps({"category_ids": dataset_category_ids(reference)})
    return out


# ----------------------------------------------------------------------------------------------- unlabeled
def _image_files(folder: str) -> list[str]:
    files = glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)
    return sorted(f for f in files if os.path.isfile(f) and f.lower().endswith(IMAGE_EXTENSIONS))


def load_unlabeled_images(path: str, images_dir: str | None = None, read_sizes: bool = False) -> Dataset:
    """Unlabeled images from a folder (recursive, common extensions) or a COCO json (annotations ignored).

    Folder: ``image_id`` is the index in sorted path order; ``width``/``height`` only with ``read_sizes``
    (reads each file's header). COCO json: ids and sizes from the json; files under ``images_dir`` (default:
    ``<json dir>/images`` if it exists, else the json's directory). Returns ``Dataset(image, image_id[, width,
    height])`` with lazy images.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"--unlabeled_images {path} does not exist")
    if not os.path.isdir(path) and not path.lower().endswith(".json"):
        raise ValueError(f"--unlabeled_images {path} is a file: give a folder of images or a COCO json")
    if os.path.isdir(path):
        files = _image_files(path)
        if not files:
            raise FileNotFoundError(f"no images with extensions {IMAGE_EXTENSIONS} under {path}")
        columns = {"image": files, "image_id": list(range(len(files)))}
        if read_sizes:
            sizes = [_header_size(f) for f in files]
            columns.update(width=[s[0] for s in sizes], height=[s[1] for s in sizes])
    else:
        coco = read_coco_json(path)
        if images_dir is None:
            parent = os.path.dirname(os.path.abspath(path))
            images_dir = os.path.join(parent, "images") if os.path.isdir(os.path.join(parent, "images")) else parent
        images = _coco_images(coco, images_dir, path)
        columns = {"image": [os.path.join(images_dir, im["file_name"]) for im in images],
                   "image_id": [int(im["id"]) for im in images],
                   "width": [int(im["width"]) for im in images], "height": [int(im["height"]) for im in images]}
    features = {"image": Image(), "image_id": Value("int64")}
    features.update({k: Value("int32") for k in ("width", "height") if k in columns})
    return Dataset.from_dict(columns, features=Features(features))


EXIF_ORIENTATION = 0x0112
_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def _header_size(path_or_value) -> tuple[int, int]:
    """``(w, h)`` of the image as displayed (EXIF orientation applied), read from the header only."""
    if isinstance(path_or_value, dict):
        path_or_value = io.BytesIO(path_or_value["bytes"]) if path_or_value.get("bytes") else path_or_value["path"]
    with PIL.Image.open(path_or_value) as pil:
        rotated = pil.getexif().get(EXIF_ORIENTATION) in _ROTATED_ORIENTATIONS
        return pil.size[::-1] if rotated else pil.size


# ----------------------------------------------------------------------------------------------- Hub datasets
def _category_names(ds: Dataset, objects_column: str, category_key: str) -> tuple[list[str], dict | None]:
    """Class names and, for string categories, a name -> label mapping."""
    feat = ds.features[objects_column]
    feat = feat.feature if isinstance(feat, List) else feat
    cat = feat[category_key]
    cat = cat.feature if isinstance(cat, List) else cat
    if isinstance(cat, ClassLabel):
        return list(cat.names), None
    values = [c for objs in ds[objects_column] for c in _as_dict_of_lists(objs).get(category_key, [])]
    if cat.dtype == "string":
        names = sorted(set(values))
        return names, {n: i for i, n in enumerate(names)}
    return [f"class_{i}" for i in range(max(values, default=-1) + 1)], None


def _as_dict_of_lists(objects) -> dict:
    if isinstance(objects, dict):
        return objects
    keys = objects[0].keys() if objects else ()
    return {k: [o[k] for o in objects] for k in keys}


BBOX_FORMATS = ("xywh", "xyxy", "cxcywh")  # absolute pixels; "coco" is accepted for "xywh"
# A box reaching past its image by more than this share of the image side counts as not fitting the image.
BOX_OVERFLOW_TOLERANCE = 0.02
# More than this share of such boxes: the declared bbox format is wrong (an error that names --bbox_format).
MAX_OVERFLOWING_BOXES = 0.05


def to_xywh(box: list[float], bbox_format: str) -> list[float]:
    """One absolute-pixel box in ``bbox_format`` -> COCO ``[x, y, w, h]`` (other lengths are returned as given)."""
    if len(box) != 4 or bbox_format in ("xywh", "coco"):
        return box
    if bbox_format == "xyxy":
        return [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    return [box[0] - box[2] / 2, box[1] - box[3] / 2, box[2], box[3]]  # cxcywh


def _overflows(box: list[float], width: float, height: float) -> bool:
    """True when the xywh ``box`` reaches past its ``width x height`` image by more than the tolerance."""
    x, y, w, h = box
    tol_x, tol_y = BOX_OVERFLOW_TOLERANCE * width, BOX_OVERFLOW_TOLERANCE * height
    return x < -tol_x or y < -tol_y or x + w > width + tol_x or y + h > height + tol_y


def _normalize_objects(objs: dict, category_key: str, bbox_format: str, name_map: dict | None, next_id: int):
    """Objects of one example in the common layout, and the number of dropped boxes."""
    out = {"id": [], "area": [], "bbox": [], "category": [], "iscrowd": []}
    n = len(objs.get("bbox", []))
    dropped = 0
    for j in range(n):
        box = to_xywh([float(v) for v in objs["bbox"][j]], bbox_format)
        if not _valid_xywh(box):
            dropped += 1
            continue
        cat = objs[category_key][j]
        out["id"].append(int(objs["id"][j]) if "id" in objs else next_id + j)
        out["area"].append(float(objs["area"][j]) if "area" in objs else box[2] * box[3])
        out["bbox"].append(box)
        out["category"].append(name_map[cat] if name_map is not None else int(cat))
        out["iscrowd"].append(int(objs["iscrowd"][j]) if "iscrowd" in objs else 0)
    return out, dropped


def normalize_detection_dataset(ds: Dataset, bbox_format: str = "coco", image_column: str = "image",
                                objects_column: str = "objects", category_key: str = "category") -> Dataset:
    """Bring a Hub-style detection dataset (cppe-5 layout) to the common schema.

    Accepts ``objects`` as a dict of lists or a list of dicts with ``bbox`` (``bbox_format`` ``"xywh"`` = COCO,
    ``"xyxy"`` or ``"cxcywh"``, absolute pixels) and ``category`` (``ClassLabel``, int or string); ``id``,
    ``area``, ``iscrowd``, ``image_id``, ``width``, ``height`` are filled in when missing (ids from the row index,
    sizes from the image header). Invalid boxes (non-finite, no width or height) are dropped with a logged count.
    If more than 5 % of the boxes reach past their image (by more than 2 % of its side) under the declared
    format, the format is wrong: a ``ValueError`` names the flag and the boxes (xyxy boxes read as xywh do this).
    """
    if bbox_format not in (*BBOX_FORMATS, "coco"):
        raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {bbox_format!r}")
    if image_column != "image":
        ds = ds.rename_column(image_column, "image")
    names, name_map = _category_names(ds, objects_column, category_key)
    ds = ds.cast_column("image", Image(decode=False))
    has = set(ds.column_names)

    def convert(example, idx):
        objs, dropped = _normalize_objects(_as_dict_of_lists(example[objects_column]), category_key, bbox_format,
                                           name_map, next_id=idx * 1000)
        w, h = ((example["width"], example["height"]) if {"width", "height"} <= has
                else _header_size(example["image"]))
        image_id = example["image_id"] if "image_id" in has else idx
        overflowing = sum(_overflows(box, w, h) for box in objs["bbox"])
        return {"image_id": image_id, "width": w, "height": h, "objects": objs, "_dropped": dropped,
                "_overflowing": overflowing}

    features = detection_features(names)
    features["image"] = Image(decode=False)
    features["_dropped"] = Value("int64")
    features["_overflowing"] = Value("int64")
    out = ds.map(convert, with_indices=True, features=features,
                 remove_columns=[c for c in ds.column_names if c != "image"])
    _warn_dropped(int(sum(out["_dropped"])), "the dataset", [])
    _check_box_format(out, bbox_format)
    out = out.remove_columns(["_dropped", "_overflowing"]).cast_column("image", Image())
    out.info.description = json.dumps({"category_ids": list(range(len(names)))})
    return out


def _check_box_format(ds: Dataset, bbox_format: str) -> None:
    """Raise when too many boxes do not fit their images under ``bbox_format`` (a wrong declared format)."""
    overflowing = int(sum(ds["_overflowing"]))
    boxes = sum(len(objects["bbox"]) for objects in ds["objects"])
    if boxes and overflowing > MAX_OVERFLOWING_BOXES * boxes:
        row = next(i for i, count in enumerate(ds["_overflowing"]) if count)
        example = ds[row]
        box = next(b for b in example["objects"]["bbox"] if _overflows(b, example["width"], example["height"]))
        others = [f for f in BBOX_FORMATS if f != ("xywh" if bbox_format == "coco" else bbox_format)]
        raise ValueError(
            f"{overflowing} of {boxes} boxes do not fit their image when read as --bbox_format "
            f"{bbox_format} (e.g. image_id {example['image_id']}: [x, y, w, h] = {[round(v, 1) for v in box]} in "
            f"a {example['width']}x{example['height']} image). If the dataset's boxes are "
            f"{' or '.join(others)}, pass --bbox_format {others[0]} (or {others[1]}).")


def load_hub_detection_dataset(name: str, split: str = "train", config_name: str | None = None,
                               revision: str | None = None, bbox_format: str = "xywh", **load_kwargs) -> Dataset:
    """``datasets.load_dataset(name, config_name, split=split, revision=revision, **load_kwargs)``, then
    :func:`normalize_detection_dataset` (see docs/datasets.md for the expected layout)."""
    from datasets import load_dataset

    ds = load_dataset(name, config_name, split=split, revision=revision, **load_kwargs)
    return normalize_detection_dataset(ds, bbox_format=bbox_format)


def hub_dataset_splits(name: str, config_name: str | None = None, **load_kwargs) -> list[str]:
    """The split names of a Hub (or local) dataset, without loading its data."""
    from datasets import get_dataset_split_names

    return list(get_dataset_split_names(name, config_name, **load_kwargs))


# ----------------------------------------------------------------------------------------------- splits
def read_image_id_list(path: str) -> list[int]:
    """Image ids from a text file (one per line, ``#`` comments) or a json (list of ids or a COCO dict)."""
    with open(path) as f:
        text = f.read()
    if path.lower().endswith(".json"):
        data = json.loads(text)
        return [int(im["id"]) for im in data["images"]] if isinstance(data, dict) else [int(i) for i in data]
    return [int(line.split("#")[0]) for line in text.splitlines() if line.split("#")[0].strip()]


def split_labeled_unlabeled(ds: Dataset, labeled_percent: float | None = None, fold: int = 0, seed: int = 0,
                            labeled_ids: Iterable[int] | str | None = None) -> tuple[Dataset, Dataset]:
    """COCO-Partial style split into ``(labeled, unlabeled)``; both keep ``ds``'s row order and columns.

    Either ``labeled_ids`` (ids or a file for :func:`read_image_id_list`) or ``labeled_percent`` in ``(0, 100]``:
    the first ``round(N * p / 100)`` (at least 1) of a ``numpy.random.default_rng([seed, fold])`` permutation
    of the sorted image ids are labeled, so the split is the same on every machine. The unlabeled part keeps
    its annotations (only for measuring pseudo-label quality; never train on them).
    """
    ids = [int(i) for i in ds["image_id"]]
    if len(set(ids)) != len(ids):
        raise ValueError("image_id values must be unique to split a dataset")
    if labeled_ids is not None:
        chosen = set(read_image_id_list(labeled_ids) if isinstance(labeled_ids, str) else map(int, labeled_ids))
        unknown = chosen - set(ids)
        if unknown:
            raise ValueError(f"{len(unknown)} labeled ids are not in the dataset, e.g. {sorted(unknown)[:5]}")
    elif labeled_percent is not None and 0 < labeled_percent <= 100:
        order = np.random.default_rng([seed, fold]).permutation(len(ids))
        n_labeled = max(1, int(round(len(ids) * labeled_percent / 100)))
        chosen = set(np.asarray(sorted(ids))[order[:n_labeled]].tolist())
    else:
        raise ValueError(f"give labeled_ids or labeled_percent in (0, 100], got {labeled_percent}")
    labeled = [i for i, image_id in enumerate(ids) if image_id in chosen]
    unlabeled = [i for i, image_id in enumerate(ids) if image_id not in chosen]
    return ds.select(labeled), ds.select(unlabeled)


# ----------------------------------------------------------------------------------------------- streaming
def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def as_streaming(source: Dataset | str, num_shards: int = 64, rank: int | None = None,
                 world_size: int | None = None, seed: int = 0, shuffle_buffer: int = 1000,
                 decode_images: bool = False) -> IterableDataset:
    """An ``IterableDataset`` of ``source`` (a Dataset, an image folder or a COCO json) for this process.

    Sharded into ``num_shards`` (clamped to the row count), shuffled with the fixed ``seed`` (the same on every
    rank; call ``set_epoch`` each epoch), then ``split_dataset_by_node(ds, rank, world_size)``. ``rank`` and
    ``world_size`` default to ``torch.distributed`` (or ``RANK``/``WORLD_SIZE``). Images stay undecoded
    (``{"bytes", "path"}``) unless ``decode_images`` so that the wrappers can skip corrupt files.
    """
    ds = source if isinstance(source, Dataset) else load_unlabeled_images(source)
    if not decode_images:
        ds = ds.cast_column("image", Image(decode=False))
    stream = ds.to_iterable_dataset(num_shards=max(1, min(num_shards, len(ds))))
    if shuffle_buffer > 0:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    rank, world_size = _rank_and_world(rank, world_size)
    return split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream


# ----------------------------------------------------------------------------------------------- decoding
def decode_image(value) -> Tensor:
    """uint8 ``(3, H, W)`` RGB tensor from a PIL image, an ``{"bytes", "path"}`` dict or a path, as displayed:
    EXIF orientation applied, 16-bit / float / palette / CMYK converted (``to_rgb_pil``, the image processor's rule).

    Raises ``OSError``/``ValueError``/``SyntaxError`` for unreadable files (PIL's errors).
    """
    if isinstance(value, dict):
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
    if isinstance(value, PIL.Image.Image):
        return TF.pil_to_tensor(to_rgb_pil(value))
    with PIL.Image.open(value) as pil:
        return TF.pil_to_tensor(to_rgb_pil(pil))


class ImageSizeMismatch(ValueError):
    """A decoded image whose size differs from the ``width``/``height`` its annotation file declares."""


def check_declared_size(row: dict, image: Tensor) -> None:
    """Raise :class:`ImageSizeMismatch` when ``row`` declares a ``width``/``height`` the decoded (EXIF-oriented)
    ``image (3, H, W)`` does not have: its boxes would not fit the pixels."""
    width, height = row.get("width"), row.get("height")
    if width is None or height is None:
        return
    actual_h, actual_w = int(image.shape[-2]), int(image.shape[-1])
    if (int(width), int(height)) != (actual_w, actual_h):
        hint = (" (width and height swapped: the file's EXIF orientation rotates it; annotations are expected on "
                "the displayed image)" if (int(width), int(height)) == (actual_h, actual_w) else "")
        raise ImageSizeMismatch(f"the annotation declares {width}x{height} but the image decodes to "
                                f"{actual_w}x{actual_h}{hint}")


def _image_name(value) -> str:
    return str(value.get("path") or "<bytes>") if isinstance(value, dict) else str(value)


def _targets_from_objects(objects: dict | None, drop_crowd: bool) -> tuple[Tensor, Tensor]:
    """``(boxes (n, 4) xyxy absolute, labels (n,))`` from COCO-layout objects."""
    if not objects or not objects.get("bbox"):
        return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    boxes = torch.tensor(objects["bbox"], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(objects["category"], dtype=torch.long)
    if drop_crowd and objects.get("iscrowd"):
        keep = torch.tensor(objects["iscrowd"]) == 0
        boxes, labels = boxes[keep], labels[keep]
    boxes[:, 2:] += boxes[:, :2]
    return boxes, labels


class _DecodingDataset(torch.utils.data.Dataset):
    """Map-style base: undecoded rows, per-example RNG, corrupt images skipped deterministically."""

    def __init__(self, hf_ds: Dataset, seed: int | None = None, max_skips: int = 50):
        self.ds = hf_ds.cast_column("image", Image(decode=False))
        self.seed, self.epoch, self.max_skips = seed, 0, max_skips
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.ds)

    def set_epoch(self, epoch: int) -> None:
        """Change the per-example seeds (only used when ``seed`` is set)."""
        self.epoch = epoch

    def rng(self, image_id: int) -> np.random.Generator:
        """``default_rng([seed, epoch, image_id])``, or one seeded from torch's RNG when ``seed`` is None."""
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([self.seed, self.epoch, int(image_id)])

    def load(self, index: int) -> tuple[dict, Tensor]:
        """``(row, image)`` for ``index``, or for the next readable index after it (with a warning)."""
        for step in range(min(self.max_skips, len(self)) + 1):
            i = (index + step) % len(self)
            if i in self._bad:
                continue
            row = self.ds[i]
            try:
                image = decode_image(row["image"])
                check_declared_size(row, image)
                return row, image
            except DECODE_ERRORS as err:
                self._bad.add(i)
                logger.warning("skipping image %s (index %d, image_id %s): %s",
                               _image_name(row["image"]), i, row.get("image_id"), err)
        raise RuntimeError(f"no readable image within {self.max_skips} indices after {index}")


class LabeledDetectionDataset(_DecodingDataset):
    """Torch dataset of labeled views. ``transform(image, boxes, labels, rng) -> View`` (e.g. ``LabeledTransform``).

    Item: ``{"image": uint8 (3, h, w), "boxes": (n, 4) xyxy view pixels, "class_labels": (n,), "image_id": int,
    "orig_size": (h0, w0)}``. Crowd boxes are dropped when ``drop_crowd``.
    """

    def __init__(self, hf_ds: Dataset, transform: Callable, seed: int | None = None, drop_crowd: bool = True):
        super().__init__(hf_ds, seed)
        self.transform, self.drop_crowd = transform, drop_crowd

    def __getitem__(self, index: int) -> dict:
        row, image = self.load(index)
        boxes, labels = _targets_from_objects(row.get("objects"), self.drop_crowd)
        view = self.transform(image, boxes, labels, self.rng(row["image_id"]))
        return {"image": view.image, "boxes": view.boxes, "class_labels": view.labels,
                "image_id": int(row["image_id"]), "orig_size": tuple(image.shape[-2:])}


def _pair_item(row: dict, image: Tensor, transform: Callable, rng: np.random.Generator, keep_gt: bool) -> dict:
    has_gt = keep_gt and bool(row.get("objects"))
    boxes, labels = _targets_from_objects(row.get("objects") if has_gt else None, drop_crowd=True)
    weak, strong, weak_to_strong = transform(image, boxes, labels, rng)
    return {"weak": weak, "strong": strong, "weak_to_strong": weak_to_strong, "image_id": int(row["image_id"]),
            "orig_size": tuple(image.shape[-2:]), "has_gt": has_gt}


class UnlabeledPairDataset(_DecodingDataset):
    """Torch dataset of weak/strong pairs. ``transform(image, boxes, labels, rng) -> (weak, strong, weak_to_strong)``
    (e.g. ``UnlabeledPairTransform``).

    Item: ``{"weak": View, "strong": View, "weak_to_strong": (3, 3), "image_id", "orig_size", "has_gt"}``; the
    views carry the image's ground truth when the rows have ``objects`` and ``keep_ground_truth`` (for measuring
    pseudo-label quality only).
    """

    def __init__(self, hf_ds: Dataset, transform: Callable, seed: int | None = None, keep_ground_truth: bool = True):
        super().__init__(hf_ds, seed)
        self.transform, self.keep_gt = transform, keep_ground_truth and "objects" in hf_ds.column_names

    def __getitem__(self, index: int) -> dict:
        row, image = self.load(index)
        return _pair_item(row, image, self.transform, self.rng(row["image_id"]), self.keep_gt)


class UnlabeledPairIterableDataset(torch.utils.data.IterableDataset):
    """Weak/strong pairs from a streamed ``IterableDataset`` (see :func:`as_streaming`); corrupt images are skipped
    with a warning. Items as :class:`UnlabeledPairDataset`. DataLoader workers split the stream's shards."""

    def __init__(self, stream: IterableDataset, transform: Callable, seed: int | None = None,
                 keep_ground_truth: bool = True):
        self.stream, self.transform, self.seed, self.epoch = stream, transform, seed, 0
        self.keep_gt = keep_ground_truth

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle the stream and change the per-example seeds."""
        self.epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        for row in self.stream:
            try:
                image = decode_image(row["image"])
                check_declared_size(row, image)
            except DECODE_ERRORS as err:
                logger.warning("skipping image %s (image_id %s): %s", _image_name(row["image"]),
                               row.get("image_id"), err)
                continue
            rng = (np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item())) if self.seed is None
                   else np.random.default_rng([self.seed, self.epoch, int(row["image_id"])]))
            yield _pair_item(row, image, self.transform, rng, self.keep_gt)


# ----------------------------------------------------------------------------------------------- collate
def pad_and_normalize(images: Sequence[Tensor], image_mean: Sequence[float] = IMAGENET_MEAN,
                      image_std: Sequence[float] = IMAGENET_STD, pad_to_multiple: int = 1) -> tuple[Tensor, Tensor]:
    """uint8 ``(3, h_i, w_i)`` images -> ``pixel_values (B, 3, H, W)`` float32 normalized (zero padding after
    normalization, bottom/right) and ``pixel_mask (B, H, W)`` int64 (1 = real pixel)."""
    h = max(int(im.shape[-2]) for im in images)
    w = max(int(im.shape[-1]) for im in images)
    h, w = -(-h // pad_to_multiple) * pad_to_multiple, -(-w // pad_to_multiple) * pad_to_multiple
    pixel_values = torch.zeros(len(images), 3, h, w)
    pixel_mask = torch.zeros(len(images), h, w, dtype=torch.long)
    mean = torch.tensor(image_mean).view(3, 1, 1)
    std = torch.tensor(image_std).view(3, 1, 1)
    for i, im in enumerate(images):
        ih, iw = im.shape[-2:]
        pixel_values[i, :, :ih, :iw] = (im.float() / 255.0 - mean) / std
        pixel_mask[i, :ih, :iw] = 1
    return pixel_values, pixel_mask


def normalized_targets(boxes: Tensor, labels: Tensor, size: tuple[int, int]) -> dict:
    """``{"class_labels" (n,), "boxes" (n, 4) cxcywh / (w, h, w, h)}`` from xyxy pixels of an unpadded ``(h, w)``."""
    h, w = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    return {"class_labels": labels.long(), "boxes": box_xyxy_to_cxcywh(boxes.float().reshape(-1, 4)) / scale}


def collate_labeled(batch: Sequence[dict], image_mean: Sequence[float] = IMAGENET_MEAN,
                    image_std: Sequence[float] = IMAGENET_STD, pad_to_multiple: int = 1) -> dict:
    """Labeled batch: ``pixel_values (B, 3, H, W)``, ``pixel_mask (B, H, W)``, ``labels``: list of
    ``{class_labels (n,), boxes (n, 4) normalized cxcywh of the unpadded view, image_id () int64,
    orig_size (2,), size (2,)}`` (sizes are (h, w) int64)."""
    pixel_values, pixel_mask = pad_and_normalize([b["image"] for b in batch], image_mean, image_std,
                                                 pad_to_multiple)
    labels = []
    for b in batch:
        size = tuple(b["image"].shape[-2:])
        target = normalized_targets(b["boxes"], b["class_labels"], size)
        target.update(image_id=torch.tensor(b["image_id"], dtype=torch.long),
                      orig_size=torch.tensor(b["orig_size"], dtype=torch.long),
                      size=torch.tensor(size, dtype=torch.long))
        labels.append(target)
    return {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}


def collate_unlabeled(batch: Sequence[dict], image_mean: Sequence[float] = IMAGENET_MEAN,
                      image_std: Sequence[float] = IMAGENET_STD, pad_to_multiple: int = 1) -> dict:
    """Unlabeled batch: ``weak_pixel_values``, ``weak_pixel_mask``, ``strong_pixel_values``, ``strong_pixel_mask``,
    ``weak_to_strong (B, 3, 3)`` float32 (weak-view pixels -> strong-view pixels), ``weak_sizes``,
    ``strong_sizes``, ``orig_sizes`` ``(B, 2)`` int64 (h, w), ``image_ids (B,)``; plus ``gt_labels`` (targets
    normalized to the unpadded WEAK view) when every image carries ground truth."""
    weak: list[View] = [b["weak"] for b in batch]
    strong: list[View] = [b["strong"] for b in batch]
    out = {}
    for name, views in (("weak", weak), ("strong", strong)):
        values, mask = pad_and_normalize([v.image for v in views], image_mean, image_std, pad_to_multiple)
        out[f"{name}_pixel_values"], out[f"{name}_pixel_mask"] = values, mask
        out[f"{name}_sizes"] = torch.tensor([v.size for v in views], dtype=torch.long).reshape(-1, 2)
    out["weak_to_strong"] = torch.stack([b["weak_to_strong"] for b in batch]).float()
    out["orig_sizes"] = torch.tensor([b["orig_size"] for b in batch], dtype=torch.long).reshape(-1, 2)
    out["image_ids"] = torch.tensor([b["image_id"] for b in batch], dtype=torch.long)
    if batch and all(b.get("has_gt") for b in batch):
        out["gt_labels"] = [normalized_targets(v.boxes, v.labels, v.size) for v in weak]
    return out
