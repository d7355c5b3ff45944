"""Image processor of Sparse Semi-DETR: resize, normalize, pad, COCO annotations -> targets, post-processing.

Argument surface: that of transformers' ``DeformableDetrImageProcessor`` (``size`` as ``shortest_edge/longest_edge``,
``max_height/max_width`` or ``height/width``; ``do_pad``/``pad_size``; ``.pad()``; ``format="coco_detection"``;
``do_convert_annotations``; ``device``; ``return_tensors``; a torchvision default and a PIL backend,
``SparseSemiDetrImageProcessorPil``, chosen by ``AutoImageProcessor.from_pretrained(..., backend="pil")``), with the
same pixels (tests/test_image_processing.py compares both backends with transformers' own processors).

Design: the class subclasses ``transformers.image_processing_utils.BaseImageProcessor`` but implements ``__init__``,
``__call__``, ``preprocess``, ``pad`` and ``post_process_object_detection`` itself, on torch/torchvision only. It uses
nothing of the v5 backend machinery (``TorchvisionBackend``/``PilBackend``, ``_preprocess``, ``_set_attributes``,
``SizeDict``), which was reorganised between 5.x minors; what it inherits is the long-stable save/load surface of
``ImageProcessingMixin`` (``save_pretrained``/``from_pretrained``/``to_dict``, ``preprocessor_config.json``,
``register_for_auto_class``). This keeps the file usable as remote code on transformers 5.17 ... 5.24.

Boxes and padding, as in transformers: with padding, target boxes are normalized by the padded canvas and ``size``
is the canvas ``(h, w)``. The model predicts in the frame of the image's own pixels when it gets ``pixel_mask`` (its
reference points are scaled by the unpadded share of each feature map, as in DETR and DINO), so
``SparseSemiDetrForObjectDetection`` maps each target's boxes from its ``size`` frame into that frame before the loss.
Pass ``pixel_mask`` to the model: without it the padding counts as image, and boxes post-processed with
``target_sizes = orig_size`` are stretched by the padding.
"""

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from torch import Tensor
from torchvision.ops import batched_nms
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import load_image
from transformers.processing_utils import ImagesKwargs

from .box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh


logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = {"shortest_edge": 800, "longest_edge": 1333}

# PIL resampling codes (what transformers stores as ``resample``) -> torchvision interpolation modes.
_INTERPOLATION = {
    0: tvF.InterpolationMode.NEAREST,
    2: tvF.InterpolationMode.BILINEAR,
    3: tvF.InterpolationMode.BICUBIC,
}
_CHANNEL_COUNTS = (1, 3, 4)


class SparseSemiDetrImageProcessorKwargs(ImagesKwargs, total=False):
    """Keyword arguments of the processor beyond ``ImagesKwargs`` (lets ``from_pretrained`` override them)."""

    do_exif_transpose: bool | None
    nms_threshold: float | None
    format: str | None
    do_convert_annotations: bool | None


# The per-call overridable settings of ``preprocess`` (each also a processor attribute).
_SETTING_NAMES = ("do_exif_transpose", "do_resize", "size", "resample", "do_rescale", "rescale_factor",
                  "do_normalize", "image_mean", "image_std", "do_pad", "pad_size", "do_convert_annotations", "format")
# transformers' ImagesKwargs that change nothing here: RGB conversion always happens, images are never grouped.
_NO_EFFECT_KWARGS = ("do_convert_rgb", "disable_grouping", "default_to_square", "masks_path")


def get_resize_output_size(height: int, width: int, shortest_edge: int, longest_edge: int | None) -> tuple[int, int]:
    """DETR resize rule: shorter side -> ``shortest_edge`` unless the longer side would exceed ``longest_edge``.

    Keeps the aspect ratio (sizes truncated to int as in DETR / transformers' ``get_size_with_aspect_ratio``);
    e.g. ``(480, 640) -> (800, 1066)``, ``(500, 2000) -> (333, 1333)``.
    Returns ``(new_height, new_width)``, each at least 1.
    """
    size, raw_size = shortest_edge, None
    if longest_edge is not None:
        short, long = float(min(height, width)), float(max(height, width))
        if long / short * size > longest_edge:
            raw_size = longest_edge * short / long
            size = int(round(raw_size))
    if (height <= width and height == size) or (width <= height and width == size):
        new_h, new_w = height, width
    elif width < height:
        new_w = size
        new_h = int((raw_size if raw_size is not None else size) * height / width)
    else:
        new_h = size
        new_w = int((raw_size if raw_size is not None else size) * width / height)
    return max(1, new_h), max(1, new_w)


SIZE_FORMS = ("{'shortest_edge', 'longest_edge'}", "{'max_height', 'max_width'}", "{'height', 'width'}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _validate_size(size: Any, max_size: int | None = None) -> dict:
    """One of transformers' DETR ``size`` forms -> a validated dict.

    * ``{"shortest_edge": s, "longest_edge": l}`` (or an int ``s``; ``longest_edge`` may be ``None`` / ``max_size``):
      the DETR rule, aspect ratio kept.
    * ``{"max_height": h, "max_width": w}``: the largest aspect-preserving size within ``h x w`` (small images are
      enlarged, as in transformers).
    * ``{"height": h, "width": w}`` (or a pair ``(h, w)``): exactly ``h x w``, aspect ratio not kept.
    """
    if _positive_int(size):
        size = {"shortest_edge": size, "longest_edge": max_size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict):
        raise ValueError(f"size must be one of {', '.join(SIZE_FORMS)} (or an int shortest edge), got {size!r}")
    if "shortest_edge" in size:
        longest = size.get("longest_edge", max_size)
        if not _positive_int(size["shortest_edge"]) or (longest is not None and (
                not _positive_int(longest) or longest < size["shortest_edge"])):
            raise ValueError(f"size needs a positive int shortest_edge and a longest_edge that is None or an int "
                             f">= shortest_edge, got {size!r}")
        return {"shortest_edge": size["shortest_edge"], "longest_edge": longest}
    for first, second in (("max_height", "max_width"), ("height", "width")):
        if first in size or second in size:
            if not (_positive_int(size.get(first)) and _positive_int(size.get(second))):
                raise ValueError(f"size needs positive ints {first!r} and {second!r}, got {size!r}")
            return {first: size[first], second: size[second]}
    raise ValueError(f"size must be one of {', '.join(SIZE_FORMS)}, got {size!r}")


def resize_output_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """``(new_height, new_width)`` of an image of ``height x width`` under a validated ``size`` (any form)."""
    if "shortest_edge" in size:
        return get_resize_output_size(height, width, size["shortest_edge"], size["longest_edge"])
    if "max_height" in size:  # transformers' get_image_size_for_max_height_width
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return max(1, int(height * scale)), max(1, int(width * scale))
    return size["height"], size["width"]


def _validate_pad_size(pad_size: Any) -> dict | None:
    """``None`` (pad to the batch's largest image) or ``{"height": int, "width": int}`` (a fixed canvas)."""
    if pad_size is None:
        return None
    if isinstance(pad_size, (tuple, list)) and len(pad_size) == 2:
        pad_size = {"height": pad_size[0], "width": pad_size[1]}
    if not isinstance(pad_size, dict) or not (_positive_int(pad_size.get("height"))
                                              and _positive_int(pad_size.get("width"))):
        raise ValueError(f"pad_size must be None or {{'height': int, 'width': int}}, got {pad_size!r}")
    return {"height": pad_size["height"], "width": pad_size["width"]}


def _validate_format(format: Any) -> str:
    value = str(getattr(format, "value", format))
    if value != "coco_detection":
        raise ValueError(f"format={value!r} is not supported: this detector takes 'coco_detection' annotations "
                         f"(no segmentation head, so no 'coco_panoptic')")
    return value


def _channels_first(shape: Sequence[int], default_channels_first: bool, input_data_format: str | None) -> bool:
    """Decide whether a 3-D image of ``shape`` is CHW (True) or HWC (False)."""
    if input_data_format is not None:
        if input_data_format not in ("channels_first", "channels_last"):
            raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format}")
        return input_data_format == "channels_first"
    chw, hwc = shape[0] in _CHANNEL_COUNTS, shape[-1] in _CHANNEL_COUNTS
    if chw and hwc:
        return default_channels_first
    if chw or hwc:
        return chw
    raise ValueError(f"cannot find a channel axis of size 1, 3 or 4 in image shape {tuple(shape)}")


def _array_to_rgb_tensor(image: Tensor, default_channels_first: bool, input_data_format: str | None) -> Tensor:
    """``(H, W)``, ``(C, H, W)`` or ``(H, W, C)``, C in {1, 3, 4} -> ``(3, H, W)`` (gray repeated, alpha dropped)."""
    if image.ndim == 2:
        image = image.unsqueeze(0)
    elif image.ndim == 3:
        if not _channels_first(image.shape, default_channels_first, input_data_format):
            image = image.permute(2, 0, 1)
    else:
        raise ValueError(f"an image must have 2 or 3 dimensions, got shape {tuple(image.shape)}")
    channels = image.shape[0]
    if channels not in _CHANNEL_COUNTS:
        raise ValueError(f"an image must have 1, 3 or 4 channels, got shape {tuple(image.shape)}")
    if channels == 1:
        image = image.expand(3, -1, -1)
    return image[:3]


_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb_pil(image: PIL.Image.Image, exif_transpose: bool = True) -> PIL.Image.Image:
    """Any PIL image -> 8-bit RGB, as displayed: the EXIF orientation applied (``PIL.ImageOps.exif_transpose``,
    what annotation tools show), 16-bit and 32-bit integer images scaled to 8 bits (``// 257``: 65535 -> 255, not
    clipped to white), float images scaled from ``[0, 1]`` (or clipped to ``[0, 255]`` when larger), palette images
    with transparency through RGBA, CMYK / LA / RGBA converted by PIL (alpha dropped). The one decoding rule of
    training, evaluation, this processor and ``examples/infer.py``."""
    if exif_transpose:
        image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            values = values * 255.0 if values.size and values.max() <= 1.0 else values
        elif values.size and values.max() > 255:
            values = values / 257.0
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(source: str | os.PathLike) -> PIL.Image.Image:
    """A local image file (decoded now, mode as stored) or an ``http(s)://`` URL (transformers' ``load_image``)."""
    text = os.fspath(source)
    if text.startswith(("http://", "https://")):
        return load_image(text)
    if not os.path.isfile(text):
        raise FileNotFoundError(f"no image file at {text!r}")
    with PIL.Image.open(text) as image:
        image.load()
        return image


def _to_rgb_tensor(image: Any, do_exif_transpose: bool, input_data_format: str | None) -> Tensor:
    """PIL / numpy / torch image, or a path or URL of one -> ``(3, H, W)`` tensor, dtype as given (uint8 stays
    uint8)."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    if isinstance(image, PIL.Image.Image):
        return tvF.pil_to_tensor(to_rgb_pil(image, do_exif_transpose))
    if isinstance(image, np.ndarray):
        return _array_to_rgb_tensor(torch.from_numpy(np.ascontiguousarray(image)), False, input_data_format)
    if isinstance(image, Tensor):
        return _array_to_rgb_tensor(image, True, input_data_format)
    raise TypeError(f"expected a PIL image, a numpy array, a torch tensor or a file path, got {type(image).__name__}")


def _to_image_list(images: Any) -> list:
    """One image, a list/tuple of images, or a 4-D batch array/tensor -> list of images."""
    if isinstance(images, (list, tuple)):
        return list(images)
    if isinstance(images, (np.ndarray, Tensor)) and images.ndim == 4:
        return list(images)
    return [images]


def _validate_objects(objects: Any, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """COCO objects -> ``bbox (n, 4)`` xywh float64, ``category (n,)``, ``area (n,)``, ``iscrowd (n,)``."""
    if not isinstance(objects, (list, tuple)):
        raise ValueError(f"{name}: 'annotations' must be a list of objects, got {type(objects).__name__}")
    boxes, classes, areas, crowd = [], [], [], []
    for j, obj in enumerate(objects):
        where = f"{name}, object {j}"
        if not isinstance(obj, dict) or "bbox" not in obj or "category_id" not in obj:
            raise ValueError(f"{where}: each object needs 'bbox' and 'category_id', got {obj!r}")
        if not isinstance(obj["bbox"], (list, tuple, np.ndarray, Tensor)):
            raise ValueError(f"{where}: 'bbox' must be a list [x, y, w, h], got {obj['bbox']!r}")
        try:
            bbox = [float(v) for v in obj["bbox"]]
            values = [float(obj["category_id"]), float(obj.get("area", 0.0)), float(obj.get("iscrowd", 0))]
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: non-numeric bbox/category_id/area/iscrowd in {obj!r}") from err
        if len(bbox) != 4:
            raise ValueError(f"{where}: 'bbox' must be [x, y, w, h], got {obj['bbox']!r}")
        if not all(math.isfinite(v) for v in bbox + values):
            raise ValueError(f"{where}: non-finite number in {obj!r}")
        if values[0] != int(values[0]) or values[0] < 0:
            raise ValueError(f"{where}: 'category_id' must be a non-negative integer, got {obj['category_id']!r}")
        boxes.append(bbox)
        classes.append(int(values[0]))
        areas.append(values[1] if "area" in obj else bbox[2] * bbox[3])
        crowd.append(int(values[2]))
    return (
        torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
        torch.tensor(classes, dtype=torch.long),
        torch.tensor(areas, dtype=torch.float64),
        torch.tensor(crowd, dtype=torch.long),
    )


def convert_coco_annotation(
    annotation: dict, orig_size: tuple[int, int], new_size: tuple[int, int], name: str = "image",
    normalize: bool = True,
) -> dict[str, Tensor]:
    """One COCO-detection dict -> a training target of the resized image.

    Args:
        annotation: ``{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id", "area", "iscrowd"}]}``,
            boxes in absolute pixels of the (EXIF-oriented) input image.
        orig_size: ``(h, w)`` of the input image. new_size: ``(h, w)`` after resizing.

    Returns:
        ``class_labels (n,)`` long, ``boxes (n, 4)`` float32 cxcywh normalized by ``new_size`` (the unpadded resized
        image), ``image_id (1,)``, ``area (n,)`` float32 scaled to ``new_size``, ``iscrowd (n,)``, ``orig_size (2,)``
        and ``size (2,)`` long ``(h, w)``. Boxes are clipped to the image; boxes with no width or height after
        clipping and crowd objects (``iscrowd=1``) are dropped, as in DETR, so ``iscrowd`` is all zeros. With
        ``normalize=False`` (``do_convert_annotations=False``) boxes are absolute ``xyxy`` pixels of ``new_size``.
    """
    if not isinstance(annotation, dict) or "annotations" not in annotation or "image_id" not in annotation:
        raise ValueError(f"{name}: expected a dict with 'image_id' and 'annotations', got {annotation!r}")
    try:
        image_id = int(annotation["image_id"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: 'image_id' must be an integer") from err
    xywh, classes, areas, crowd = _validate_objects(annotation["annotations"], name)
    (orig_h, orig_w), (new_h, new_w) = orig_size, new_size
    xyxy = torch.cat((xywh[:, :2], xywh[:, :2] + xywh[:, 2:]), dim=1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(min=0, max=orig_w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(min=0, max=orig_h)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1]) & (crowd == 0)
    normalized = xyxy[keep] / torch.tensor([orig_w, orig_h, orig_w, orig_h], dtype=torch.float64)
    area_scale = (new_h * new_w) / (orig_h * orig_w)
    if normalize:
        boxes = box_xyxy_to_cxcywh(normalized)
    else:
        boxes = normalized * torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float64)
    return {
        "class_labels": classes[keep],
        "boxes": boxes.to(torch.float32),
        "image_id": torch.tensor([image_id], dtype=torch.long),
        "area": (areas[keep] * area_scale).to(torch.float32),
        "iscrowd": crowd[keep],
        "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.long),
        "size": torch.tensor([new_h, new_w], dtype=torch.long),
    }


def pad_images(images: list[Tensor], pad_size: dict | None = None, fill: float = 0.0) -> tuple[Tensor, Tensor]:
    """List of ``(C, h_i, w_i)`` -> ``pixel_values (B, C, H, W)`` padded bottom/right with ``fill`` and
    ``pixel_mask (B, H, W)`` long (1 = real pixel). ``(H, W)``: ``pad_size`` when given (an image larger than it is an
    error), else the batch maxima. Device and dtype follow the first image."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    if pad_size is not None:
        if height > pad_size["height"] or width > pad_size["width"]:
            raise ValueError(f"pad_size {pad_size} is smaller than a processed image ({height}x{width} at most); "
                             f"make pad_size at least the resize bound (size)")
        height, width = pad_size["height"], pad_size["width"]
    first = images[0]
    pixel_values = first.new_full((len(images), first.shape[0], height, width), fill)
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.long, device=first.device)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        pixel_values[i, :, :h, :w] = image.to(first.device)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


def _stack_unpadded(images: list[Tensor]) -> Tensor:
    """``do_pad=False``: images of one size -> ``(B, 3, H, W)``; different sizes are an error."""
    shapes = sorted({tuple(image.shape[-2:]) for image in images})
    if len(shapes) > 1:
        raise ValueError(f"do_pad=False needs images of one size after resizing, got sizes {shapes}; keep do_pad=True "
                         f"(pixel_mask marks the padding) or resize to a fixed size={{'height': h, 'width': w}}")
    return torch.stack(images)


def _refuse_unsupported(return_segmentation_masks: Any, data_format: Any, kwargs: dict) -> None:
    """Errors for what this detector cannot do, a warning for arguments it does not know."""
    if return_segmentation_masks:
        raise ValueError("return_segmentation_masks=True is not supported: Sparse Semi-DETR is a box detector")
    if data_format is not None and str(getattr(data_format, "value", data_format)) != "channels_first":
        raise ValueError(f"data_format={data_format!r} is not supported: pixel_values are channels_first")
    unknown = sorted(key for key in kwargs if key not in _NO_EFFECT_KWARGS)
    if unknown:
        logger.warning("SparseSemiDetrImageProcessor ignores unknown arguments %s", unknown)


def _to_canvas(target: dict, canvas: tuple[int, int], update_boxes: bool) -> dict:
    """A target whose boxes are normalized cxcywh by ``target["size"]`` -> the same boxes normalized by the padded
    ``canvas (H, W)`` (padding is bottom/right, so only the scale changes), ``size`` set to the canvas. Boxes are left
    as they are with ``update_boxes=False`` (absolute boxes) or when the target has no ``size``."""
    if "size" not in target:
        return target
    size = torch.as_tensor(target["size"])
    target = dict(target)
    if update_boxes:
        height, width = (float(v) for v in size)
        scale = torch.tensor([width / canvas[1], height / canvas[0]] * 2, dtype=target["boxes"].dtype)
        target["boxes"] = target["boxes"] * scale.to(target["boxes"].device)
    target["size"] = torch.tensor(canvas, dtype=torch.long, device=size.device)
    return target


def _labels_to(labels: list[dict], device: Any) -> list[dict]:
    return [{key: value.to(device) for key, value in target.items()} for target in labels]


def _validate_nms_threshold(value: Any) -> float | None:
    if value is None:
        return None
    if not 0.0 < float(value) <= 1.0:
        raise ValueError(f"nms_threshold must be an IoU in (0, 1] or None, got {value}")
    return float(value)


def _image_name(index: int, annotation: Any) -> str:
    """How error messages name an annotated image: its batch index and ``image_id``."""
    image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
    return f"image {index} (image_id={image_id!r})"


def _get_output(outputs: Any, name: str) -> Tensor:
    return outputs[name] if isinstance(outputs, dict) else getattr(outputs, name)


class SparseSemiDetrImageProcessor(BaseImageProcessor):
    r"""Image processor for Sparse Semi-DETR (DINO-style detector); arguments as transformers'
    ``DeformableDetrImageProcessor``.

    ``preprocess``: image(s) -> EXIF orientation (PIL inputs) -> RGB -> resize (``size``: DETR rule by default,
    shortest edge 800, longest ≤ 1333) -> rescale -> ImageNet normalization -> zero padding bottom/right to the
    batch's largest image or to ``pad_size``, with ``pixel_mask``.

    Inputs: PIL images (any mode; converted to RGB), numpy arrays (``HWC``, or ``HW`` grayscale), torch tensors
    (``CHW``, or ``HWC`` when the layout is unambiguous), with 1 (gray, repeated), 3 or 4 (alpha dropped) channels.
    Integer images (uint8) are multiplied by ``rescale_factor`` when ``do_rescale``; floating-point images are taken
    to be in ``[0, 1]`` already and are never rescaled (torchvision convention; a warning is logged if one has values
    above 1). ``annotations`` (``format="coco_detection"``: ``{"image_id", "annotations": [{"bbox": xywh, ...}]}``)
    are assumed to refer to the image as displayed, i.e. after EXIF orientation (set ``do_exif_transpose=False`` for
    datasets annotated on the raw pixel array).

    Backends: this class resizes with torchvision (``backend="torchvision"``, transformers' default);
    :class:`SparseSemiDetrImageProcessorPil` resizes with PIL (``AutoImageProcessor.from_pretrained(...,
    backend="pil")``). ``device`` runs the processing on that device and returns tensors there.
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = SparseSemiDetrImageProcessorKwargs
    backend = "torchvision"

    def __init__(
        self,
        do_exif_transpose: bool = True,
        do_resize: bool = True,
        size: dict | int | None = None,
        resample: int = 2,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_pad: bool = True,
        pad_size: dict | None = None,
        do_convert_annotations: bool | None = None,
        format: str = "coco_detection",
        nms_threshold: float | None = None,
        **kwargs,
    ) -> None:
        max_size = kwargs.pop("max_size", None)  # transformers' legacy DETR argument: the longest edge
        do_pad = kwargs.pop("pad_and_return_pixel_mask", do_pad)  # its legacy name of do_pad
        for key in ("image_processor_type", "processor_class", "backend", "use_fast"):
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        self.do_exif_transpose = bool(do_exif_transpose)
        self.do_resize = bool(do_resize)
        self.size = _validate_size(dict(DEFAULT_SIZE) if size is None else size, max_size)
        self.resample = self._validate_resample(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(v) for v in (IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean)]
        self.image_std = [float(v) for v in (IMAGENET_DEFAULT_STD if image_std is None else image_std)]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std need 3 values (std > 0), got {self.image_mean}, {self.image_std}")
        self.do_pad = bool(do_pad)
        self.pad_size = _validate_pad_size(pad_size)
        # transformers' rule: annotations are converted (normalized cxcywh) when not said otherwise, unless
        # do_normalize is off.
        self.do_convert_annotations = self.do_normalize if do_convert_annotations is None else bool(
            do_convert_annotations)
        self.format = _validate_format(format)
        self.nms_threshold = _validate_nms_threshold(nms_threshold)

    @staticmethod
    def _validate_resample(resample: Any) -> int:
        code = int(getattr(resample, "value", resample))
        if code not in _INTERPOLATION:
            raise ValueError(f"resample must be a PIL code in {sorted(_INTERPOLATION)} (nearest/bilinear/bicubic)")
        return code

    def to_dict(self) -> dict[str, Any]:
        """Serializable settings (``preprocessor_config.json``). ``auto_map`` names both backends (``[pil,
        torchvision]``, the form transformers resolves by ``backend``), so remote code honours ``backend="pil"``."""
        output = super().to_dict()
        for key in [k for k in output if k.startswith("_")] + ["backend"]:
            output.pop(key, None)
        output["image_processor_type"] = SparseSemiDetrImageProcessor.__name__
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            module = auto_map["AutoImageProcessor"].rsplit(".", 1)[0]
            auto_map = dict(auto_map)
            auto_map["AutoImageProcessor"] = [f"{module}.{SparseSemiDetrImageProcessorPil.__name__}",
                                              f"{module}.{SparseSemiDetrImageProcessor.__name__}"]
            output["auto_map"] = auto_map
        return output

    def __call__(self, images: Any, annotations: list[dict] | dict | None = None, **kwargs) -> BatchFeature:
        """Same as :meth:`preprocess`."""
        return self.preprocess(images, annotations=annotations, **kwargs)

    def _settings(self, overrides: dict) -> dict:
        """The processor's settings with the non-``None`` ``overrides`` of one call, validated."""
        settings = {key: getattr(self, key) for key in _SETTING_NAMES}
        settings.update({key: value for key, value in overrides.items() if value is not None})
        settings["size"] = _validate_size(settings["size"])
        settings["resample"] = self._validate_resample(settings["resample"])
        settings["pad_size"] = _validate_pad_size(settings["pad_size"])
        settings["format"] = _validate_format(settings["format"])
        return settings

    def preprocess(
        self,
        images: Any,
        annotations: list[dict] | dict | None = None,
        return_tensors: str | None = None,
        do_exif_transpose: bool | None = None,
        do_resize: bool | None = None,
        size: dict | int | None = None,
        resample: int | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        do_pad: bool | None = None,
        pad_size: dict | None = None,
        do_convert_annotations: bool | None = None,
        format: str | None = None,
        return_segmentation_masks: bool | None = None,
        input_data_format: str | None = None,
        data_format: str | None = None,
        device: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """Image(s) (+ COCO annotations) -> model inputs.

        Returns a ``BatchFeature`` with ``pixel_values (B, 3, H, W)`` float32, ``pixel_mask (B, H, W)`` long (when
        ``do_pad``) and, when ``annotations`` are given (one dict per image), ``labels``: a list of target dicts
        (torch tensors; see :func:`convert_coco_annotation`). Arguments left ``None`` take the processor's settings.
        ``return_tensors`` may be ``None``/``"pt"`` (torch) or ``"np"`` (pixel arrays as numpy; labels stay torch).
        """
        _refuse_unsupported(return_segmentation_masks, data_format, kwargs)
        settings = self._settings({
            "do_exif_transpose": do_exif_transpose, "do_resize": do_resize, "size": size, "resample": resample,
            "do_rescale": do_rescale, "rescale_factor": rescale_factor, "do_normalize": do_normalize,
            "image_mean": image_mean, "image_std": image_std, "do_pad": do_pad, "pad_size": pad_size,
            "do_convert_annotations": do_convert_annotations, "format": format,
        })
        images = _to_image_list(images)
        if not images:
            raise ValueError("preprocess needs at least one image")
        if isinstance(annotations, dict):
            annotations = [annotations]
        if annotations is not None and len(annotations) != len(images):
            raise ValueError(f"got {len(annotations)} annotation dicts for {len(images)} images")

        processed, labels = [], []
        for i, image in enumerate(images):
            pixels, orig_size = self._process_image(image, settings, input_data_format, device)
            processed.append(pixels)
            if annotations is not None:
                name = _image_name(i, annotations[i])
                labels.append(convert_coco_annotation(annotations[i], orig_size, tuple(pixels.shape[-2:]), name,
                                                      normalize=settings["do_convert_annotations"]))
        if settings["do_pad"]:
            pixel_values, pixel_mask = pad_images(processed, settings["pad_size"])
            data = {"pixel_values": pixel_values, "pixel_mask": pixel_mask}
            canvas = tuple(pixel_values.shape[-2:])
            labels = [_to_canvas(target, canvas, settings["do_convert_annotations"]) for target in labels]
        else:
            data = {"pixel_values": _stack_unpadded(processed)}
        encoded = BatchFeature(data=data, tensor_type=None if return_tensors in (None, "pt") else return_tensors)
        if annotations is not None:
            encoded["labels"] = labels if device is None else _labels_to(labels, device)
        return encoded

    def pad(
        self,
        images: Any,
        annotations: list[dict] | dict | None = None,
        return_pixel_mask: bool = True,
        return_tensors: str | None = None,
        pad_size: dict | None = None,
        constant_values: float = 0.0,
        device: Any = None,
        **kwargs,
    ) -> BatchFeature:
        """Pad already processed images to one canvas: what a collate function needs for variable-size examples.

        Args:
            images: a list of ``(3, h_i, w_i)`` tensors or arrays (e.g. each example's ``pixel_values``), or one
                ``(B, 3, h, w)`` batch.
            annotations: the matching target dicts (from :meth:`preprocess`), returned as ``labels`` with their
                boxes re-normalized from their ``size`` to the new canvas and ``size`` set to it (boxes unchanged
                with ``update_bboxes=False``, e.g. absolute ones).
            pad_size: ``{"height", "width"}`` canvas; default the processor's ``pad_size``, else the batch maxima.

        Returns:
            ``BatchFeature`` with ``pixel_values (B, 3, H, W)``, ``pixel_mask (B, H, W)`` long (if
            ``return_pixel_mask``) and ``labels`` (if ``annotations``).
        """
        update_bboxes = bool(kwargs.pop("update_bboxes", True))
        kwargs.pop("input_data_format", None)
        _refuse_unsupported(None, kwargs.pop("data_format", None), kwargs)
        tensors = [torch.as_tensor(np.asarray(image)) if not isinstance(image, Tensor) else image
                   for image in _to_image_list(images)]
        if not tensors or any(t.ndim != 3 for t in tensors):
            raise ValueError("pad expects processed (C, H, W) images: a list of them or one (B, C, H, W) batch")
        if device is not None:
            tensors = [t.to(device) for t in tensors]
        canvas = _validate_pad_size(pad_size) if pad_size is not None else self.pad_size
        pixel_values, pixel_mask = pad_images(tensors, canvas, fill=constant_values)
        data = {"pixel_values": pixel_values}
        if return_pixel_mask:
            data["pixel_mask"] = pixel_mask
        encoded = BatchFeature(data=data, tensor_type=None if return_tensors in (None, "pt") else return_tensors)
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, dict) else list(annotations)
            canvas = tuple(pixel_values.shape[-2:])
            annotations = [_to_canvas(target, canvas, update_bboxes) for target in annotations]
            encoded["labels"] = annotations if device is None else _labels_to(annotations, device)
        return encoded

    def _process_image(self, image: Any, settings: dict, input_data_format: str | None,
                       device: Any) -> tuple[Tensor, tuple[int, int]]:
        """One raw image -> ``((3, h, w) float32 normalized, (orig_h, orig_w))``: resize on the input's dtype (uint8
        stays uint8, as in transformers), then rescale and normalize."""
        image = _to_rgb_tensor(image, settings["do_exif_transpose"], input_data_format)
        if device is not None:
            image = image.to(device)
        orig_size = (int(image.shape[-2]), int(image.shape[-1]))
        if min(orig_size) < 1:
            raise ValueError(f"empty image of shape {tuple(image.shape)}")
        if image.dtype == torch.bool or image.is_complex():
            raise TypeError(f"images of dtype {image.dtype} are not supported; pass uint8 or float")
        if image.is_floating_point() and image.numel() and float(image.max()) > 1.0 + 1e-3:
            logger.warning("a floating-point image has values above 1; float images are expected in [0, 1]")
        is_integer = not image.is_floating_point()
        if settings["do_resize"]:
            new_size = resize_output_size(*orig_size, settings["size"])
            if new_size != orig_size:
                image = self._resize(image, new_size, settings["resample"])
        pixels = image.to(torch.float32)
        if is_integer and settings["do_rescale"]:
            pixels = pixels * settings["rescale_factor"]
        if settings["do_normalize"]:
            pixels = tvF.normalize(pixels, mean=settings["image_mean"], std=settings["image_std"])
        return pixels, orig_size

    def _resize(self, image: Tensor, new_size: tuple[int, int], resample: int) -> Tensor:
        """``(3, h, w)`` -> ``(3, *new_size)`` with torchvision (antialiased), same dtype."""
        if not image.is_floating_point() and image.dtype != torch.uint8:
            image = image.to(torch.float32)
        return tvF.resize(image, list(new_size), interpolation=_INTERPOLATION[resample], antialias=True)

    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.5,
        target_sizes: Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int = 300,
        nms_threshold: float | None = None,
    ) -> list[dict[str, Tensor]]:
        """Raw model outputs -> detections, DINO style (no NMS unless asked for).

        Reads only ``outputs.logits (B, Q, C)`` and ``outputs.pred_boxes (B, Q, 4)`` (cxcywh in [0, 1]). Sigmoid
        scores over all ``Q * C`` (query, class) pairs, top ``min(top_k, Q * C)`` pairs per image (so a query may
        yield several labels), then pairs with ``score > threshold`` are kept, sorted by score. With NMS every pair
        above ``threshold`` is a candidate and the ``top_k`` best are kept after it (mmdet's ``multiclass_nms``, as
        Semi-DETR evaluates), so the duplicates of a one-to-many model do not crowd out other objects.

        Args:
            target_sizes: ``(B, 2)`` tensor or list of ``(h, w)``; boxes are scaled to these sizes (else left in
                normalized coordinates).
            nms_threshold: class-wise NMS IoU applied to the kept pairs; ``None`` takes the processor's
                ``nms_threshold`` (set on models exported from the one-to-many stage, whose queries duplicate
                each other; ``None`` there, the one-to-one default: no NMS); ``1.0`` switches NMS off.

        Returns:
            One dict per image: ``scores (k,)``, ``labels (k,)`` long, ``boxes (k, 4)`` xyxy; scores and boxes in
            float32 (float64 stays float64) whatever the model's dtype.
        """
        logits, pred_boxes = _get_output(outputs, "logits"), _get_output(outputs, "pred_boxes")
        # at least float32: bfloat16 keeps 8 significant bits, i.e. pixel coordinates above 1024 in steps of 8
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        pred_boxes = pred_boxes.to(torch.promote_types(pred_boxes.dtype, torch.float32))
        batch_size, num_queries, num_classes = logits.shape
        if target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {batch_size}")
        iou = self.nms_threshold if nms_threshold is None else _validate_nms_threshold(nms_threshold)
        nms = iou is not None and iou < 1.0
        prob = logits.sigmoid().reshape(batch_size, -1)
        top_k = min(int(top_k), prob.shape[1])
        scores, index = torch.topk(prob, prob.shape[1] if nms else top_k, dim=1)
        labels = index % num_classes
        query_index = torch.div(index, num_classes, rounding_mode="floor")
        boxes = torch.gather(box_cxcywh_to_xyxy(pred_boxes), 1, query_index.unsqueeze(-1).expand(-1, -1, 4))
        if target_sizes is not None:
            if isinstance(target_sizes, Tensor):
                sizes = target_sizes.to(device=boxes.device, dtype=boxes.dtype)
            else:
                sizes = torch.tensor([[float(v) for v in hw] for hw in target_sizes], device=boxes.device)
                sizes = sizes.to(boxes.dtype)
            boxes = boxes * sizes[:, [1, 0, 1, 0]].unsqueeze(1)
        results = []
        for s, l, b in zip(scores, labels, boxes):
            keep = torch.nonzero(s > threshold).squeeze(1)
            if nms and keep.numel() > 0:
                keep = keep[batched_nms(b[keep].float(), s[keep].float(), l[keep], iou)][:top_k]
            results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
        return results


class SparseSemiDetrImageProcessorPil(SparseSemiDetrImageProcessor):
    """:class:`SparseSemiDetrImageProcessor` resizing with PIL (transformers' ``backend="pil"``, as
    ``DeformableDetrImageProcessorPil``): the image is resized as an 8-bit PIL image, then rescaled and normalized."""

    backend = "pil"

    def _resize(self, image: Tensor, new_size: tuple[int, int], resample: int) -> Tensor:
        """``(3, h, w)`` -> ``(3, *new_size)`` through ``PIL.Image.resize`` (floats in [0, 1] pass through 8 bits and
        come back as floats, as in transformers' ``resize``)."""
        is_float = image.is_floating_point()
        eight_bit = (image * 255).to(torch.uint8) if is_float else image.clamp(0, 255).to(torch.uint8)
        pil = PIL.Image.fromarray(eight_bit.permute(1, 2, 0).cpu().numpy(), mode="RGB")
        resized = pil.resize((new_size[1], new_size[0]), resample=resample)
        output = torch.from_numpy(np.array(resized)).permute(2, 0, 1).to(image.device)
        return output.to(torch.float32) / 255 if is_float else output


__all__ = ["SparseSemiDetrImageProcessor", "SparseSemiDetrImageProcessorPil", "convert_coco_annotation",
           "get_resize_output_size", "pad_images", "resize_output_size", "to_rgb_pil"]
