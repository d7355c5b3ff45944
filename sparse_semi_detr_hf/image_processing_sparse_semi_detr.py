"""Image processor of Sparse Semi-DETR: resize, normalize, pad, COCO annotations -> targets, post-processing.

Design: the class subclasses ``transformers.image_processing_utils.BaseImageProcessor`` but implements ``__init__``,
``__call__``, ``preprocess`` and ``post_process_object_detection`` itself, on torch/torchvision only. It uses nothing
of the v5 backend machinery (``TorchvisionBackend``/``PilBackend``, ``_preprocess``, ``_set_attributes``,
``SizeDict``), which was reorganised between 5.x minors; what it inherits is the long-stable save/load surface of
``ImageProcessingMixin`` (``save_pretrained``/``from_pretrained``/``to_dict``, ``preprocessor_config.json``,
``register_for_auto_class``). This keeps the file usable as remote code on transformers 5.17 ... 5.24.

Conventions (docs/architecture.md):

* ``pixel_values (B, 3, H, W)`` float32, ``pixel_mask (B, H, W)`` long, 1 on real pixels, 0 on the bottom/right
  padding of the batch canvas.
* Target ``boxes`` are ``cxcywh`` normalized by the **resized, unpadded** image size (not the padded canvas).
* ``post_process_object_detection`` returns ``xyxy`` boxes in absolute pixels of ``target_sizes``.
"""

import logging
import math
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


def _validate_size(size: Any) -> dict:
    """``{"shortest_edge": int, "longest_edge": int | None}`` (an int means ``{"shortest_edge": int}``)."""
    if isinstance(size, int):
        size = {"shortest_edge": size, "longest_edge": None}
    if not isinstance(size, dict) or not isinstance(size.get("shortest_edge"), int) or size["shortest_edge"] <= 0:
        raise ValueError(f"size must be a dict with a positive int 'shortest_edge' (and 'longest_edge'), got {size!r}")
    longest = size.get("longest_edge")
    if longest is not None and (not isinstance(longest, int) or longest < size["shortest_edge"]):
        raise ValueError(f"size['longest_edge'] must be None or an int >= shortest_edge, got {size!r}")
    return {"shortest_edge": size["shortest_edge"], "longest_edge": longest}


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


def _to_rgb_tensor(image: Any, do_exif_transpose: bool, input_data_format: str | None) -> Tensor:
    """PIL / numpy / torch image -> ``(3, H, W)`` tensor, dtype as given (uint8 stays uint8)."""
    if isinstance(image, PIL.Image.Image):
        return tvF.pil_to_tensor(to_rgb_pil(image, do_exif_transpose))
    if isinstance(image, np.ndarray):
        return _array_to_rgb_tensor(torch.from_numpy(np.ascontiguousarray(image)), False, input_data_format)
    if isinstance(image, Tensor):
        return _array_to_rgb_tensor(image, True, input_data_format)
    raise TypeError(f"expected a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")


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
    annotation: dict, orig_size: tuple[int, int], new_size: tuple[int, int], name: str = "image"
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
        clipping and crowd objects (``iscrowd=1``) are dropped, as in DETR, so ``iscrowd`` is all zeros.
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
    return {
        "class_labels": classes[keep],
        "boxes": box_xyxy_to_cxcywh(normalized).to(torch.float32),
        "image_id": torch.tensor([image_id], dtype=torch.long),
        "area": (areas[keep] * area_scale).to(torch.float32),
        "iscrowd": crowd[keep],
        "orig_size": torch.tensor([orig_h, orig_w], dtype=torch.long),
        "size": torch.tensor([new_h, new_w], dtype=torch.long),
    }


def pad_images(images: list[Tensor]) -> tuple[Tensor, Tensor]:
    """List of ``(3, h_i, w_i)`` -> ``pixel_values (B, 3, H, W)`` zero-padded bottom/right and ``pixel_mask (B, H, W)``
    long (1 = real pixel), with ``H, W`` the batch maxima. Device and dtype follow the first image."""
    height = max(image.shape[-2] for image in images)
    width = max(image.shape[-1] for image in images)
    first = images[0]
    pixel_values = first.new_zeros((len(images), 3, height, width))
    pixel_mask = torch.zeros((len(images), height, width), dtype=torch.long, device=first.device)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        pixel_values[i, :, :h, :w] = image.to(first.device)
        pixel_mask[i, :h, :w] = 1
    return pixel_values, pixel_mask


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
    r"""Image processor for Sparse Semi-DETR (DINO-style detector).

    ``preprocess``: image(s) -> EXIF orientation (PIL inputs) -> RGB -> DETR resize (shortest edge 800, longest
    ≤ 1333) -> rescale -> ImageNet normalization -> zero padding to the batch's max ``(H, W)`` with ``pixel_mask``.

    Inputs: PIL images (any mode; converted to RGB), numpy arrays (``HWC``, or ``HW`` grayscale), torch tensors
    (``CHW``, or ``HWC`` when the layout is unambiguous), with 1 (gray, repeated), 3 or 4 (alpha dropped) channels.
    Integer images (uint8) are multiplied by ``rescale_factor`` when ``do_rescale``; floating-point images are taken
    to be in ``[0, 1]`` already and are never rescaled (torchvision convention; a warning is logged if one has values
    above 1). ``annotations`` are assumed to refer to the image as displayed, i.e. after EXIF orientation
    (set ``do_exif_transpose=False`` for datasets annotated on the raw pixel array).
    """

    model_input_names = ["pixel_values", "pixel_mask"]
    valid_kwargs = SparseSemiDetrImageProcessorKwargs

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
        nms_threshold: float | None = None,
        **kwargs,
    ) -> None:
        kwargs.pop("image_processor_type", None)
        kwargs.pop("processor_class", None)
        super().__init__(**kwargs)
        self.do_exif_transpose = bool(do_exif_transpose)
        self.do_resize = bool(do_resize)
        self.size = _validate_size(dict(DEFAULT_SIZE) if size is None else size)
        self.resample = self._validate_resample(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(v) for v in (IMAGENET_DEFAULT_MEAN if image_mean is None else image_mean)]
        self.image_std = [float(v) for v in (IMAGENET_DEFAULT_STD if image_std is None else image_std)]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(f"image_mean/image_std need 3 values (std > 0), got {self.image_mean}, {self.image_std}")
        self.nms_threshold = _validate_nms_threshold(nms_threshold)

    @staticmethod
    def _validate_resample(resample: Any) -> int:
        code = int(getattr(resample, "value", resample))
        if code not in _INTERPOLATION:
            raise ValueError(f"resample must be a PIL code in {sorted(_INTERPOLATION)} (nearest/bilinear/bicubic)")
        return code

    def to_dict(self) -> dict[str, Any]:
        """Serializable settings (``preprocessor_config.json``)."""
        output = super().to_dict()
        for key in [k for k in output if k.startswith("_")]:
            output.pop(key)
        output["image_processor_type"] = type(self).__name__
        return output

    def __call__(self, images: Any, annotations: list[dict] | dict | None = None, **kwargs) -> BatchFeature:
        """Same as :meth:`preprocess`."""
        return self.preprocess(images, annotations=annotations, **kwargs)

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
        input_data_format: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Image(s) (+ COCO annotations) -> model inputs.

        Returns a ``BatchFeature`` with ``pixel_values (B, 3, H, W)`` float32, ``pixel_mask (B, H, W)`` long and,
        when ``annotations`` are given (one dict per image), ``labels``: a list of target dicts (torch tensors; see
        :func:`convert_coco_annotation`). Arguments left ``None`` take the processor's settings. ``return_tensors``
        may be ``None``/``"pt"`` (torch) or ``"np"`` (pixel arrays as numpy; labels stay torch).
        """
        if kwargs:
            logger.warning("SparseSemiDetrImageProcessor.preprocess ignores unknown arguments %s", sorted(kwargs))
        settings = {
            "do_exif_transpose": self.do_exif_transpose if do_exif_transpose is None else do_exif_transpose,
            "do_resize": self.do_resize if do_resize is None else do_resize,
            "size": self.size if size is None else _validate_size(size),
            "resample": self.resample if resample is None else self._validate_resample(resample),
            "do_rescale": self.do_rescale if do_rescale is None else do_rescale,
            "rescale_factor": self.rescale_factor if rescale_factor is None else rescale_factor,
            "do_normalize": self.do_normalize if do_normalize is None else do_normalize,
            "image_mean": self.image_mean if image_mean is None else list(image_mean),
            "image_std": self.image_std if image_std is None else list(image_std),
            "input_data_format": input_data_format,
        }
        images = _to_image_list(images)
        if not images:
            raise ValueError("preprocess needs at least one image")
        if isinstance(annotations, dict):
            annotations = [annotations]
        if annotations is not None and len(annotations) != len(images):
            raise ValueError(f"got {len(annotations)} annotation dicts for {len(images)} images")

        processed, labels = [], []
        for i, image in enumerate(images):
            pixels, orig_size = self._process_image(image, **settings)
            processed.append(pixels)
            if annotations is not None:
                name = _image_name(i, annotations[i])
                labels.append(convert_coco_annotation(annotations[i], orig_size, tuple(pixels.shape[-2:]), name))
        pixel_values, pixel_mask = pad_images(processed)
        encoded = BatchFeature(
            data={"pixel_values": pixel_values, "pixel_mask": pixel_mask},
            tensor_type=None if return_tensors in (None, "pt") else return_tensors,
        )
        if annotations is not None:
            encoded["labels"] = labels
        return encoded

    def _process_image(
        self,
        image: Any,
        do_exif_transpose: bool,
        do_resize: bool,
        size: dict,
        resample: int,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: list[float],
        image_std: list[float],
        input_data_format: str | None,
    ) -> tuple[Tensor, tuple[int, int]]:
        """One raw image -> ``((3, h, w) float32 normalized, (orig_h, orig_w))``."""
        image = _to_rgb_tensor(image, do_exif_transpose, input_data_format)
        orig_size = (int(image.shape[-2]), int(image.shape[-1]))
        if min(orig_size) < 1:
            raise ValueError(f"empty image of shape {tuple(image.shape)}")
        if image.dtype == torch.bool or image.is_complex():
            raise TypeError(f"images of dtype {image.dtype} are not supported; pass uint8 or float")
        is_integer = not image.is_floating_point()
        pixels = image.to(torch.float32)
        if is_integer and do_rescale:
            pixels = pixels * rescale_factor
        elif not is_integer and pixels.numel() and float(pixels.max()) > 1.0 + 1e-3:
            logger.warning("a floating-point image has values above 1; float images are expected in [0, 1]")
        if do_resize:
            new_size = get_resize_output_size(*orig_size, size["shortest_edge"], size["longest_edge"])
            if new_size != orig_size:
                pixels = tvF.resize(pixels, list(new_size), interpolation=_INTERPOLATION[resample], antialias=True)
        if do_normalize:
            pixels = tvF.normalize(pixels, mean=image_mean, std=image_std)
        return pixels, orig_size

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
        yield several labels), then pairs with ``score > threshold`` are kept, sorted by score.

        Args:
            target_sizes: ``(B, 2)`` tensor or list of ``(h, w)``; boxes are scaled to these sizes (else left in
                normalized coordinates).
            nms_threshold: class-wise NMS IoU applied to the kept pairs; ``None`` takes the processor's
                ``nms_threshold`` (set on models exported from the one-to-many stage, whose queries duplicate
                each other; ``None`` there, the one-to-one default: no NMS); ``1.0`` switches NMS off.

        Returns:
            One dict per image: ``scores (k,)``, ``labels (k,)`` long, ``boxes (k, 4)`` xyxy.
        """
        logits, pred_boxes = _get_output(outputs, "logits"), _get_output(outputs, "pred_boxes")
        batch_size, num_queries, num_classes = logits.shape
        if target_sizes is not None and len(target_sizes) != batch_size:
            raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {batch_size}")
        prob = logits.sigmoid().reshape(batch_size, -1)
        scores, index = torch.topk(prob, min(int(top_k), prob.shape[1]), dim=1)
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
        iou = self.nms_threshold if nms_threshold is None else _validate_nms_threshold(nms_threshold)
        results = []
        for s, l, b in zip(scores, labels, boxes):
            keep = torch.nonzero(s > threshold).squeeze(1)
            if iou is not None and iou < 1.0 and keep.numel() > 0:
                keep = keep[batched_nms(b[keep].float(), s[keep].float(), l[keep], iou)]
            results.append({"scores": s[keep], "labels": l[keep], "boxes": b[keep]})
        return results


__all__ = ["SparseSemiDetrImageProcessor", "convert_coco_annotation", "get_resize_output_size", "pad_images",
           "to_rgb_pil"]
