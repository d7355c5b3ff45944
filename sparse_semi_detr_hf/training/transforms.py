"""Box-aware training views (SPEC §2; Semi-DETR / Soft-Teacher RandAug, SEMI_DETR_CODE_FACTS §1.3).

Every view records its geometric transform as a 3x3 matrix ``M`` from ORIGINAL-image pixels to view pixels,
acting on column vectors ``(x, y, 1)``. Coordinates are continuous pixel coordinates: pixel ``(row i, col j)``
covers ``[j, j + 1] x [i, i + 1]``, so an image of width ``W`` spans ``x in [0, W]`` and boxes are ``xyxy`` in the
same frame. The image warp (:func:`warp_affine`, ``grid_sample`` with ``align_corners=False``) samples each
output pixel centre ``(j + 0.5, i + 0.5)`` at ``M^-1 (j + 0.5, i + 0.5, 1)``, so pixels and boxes move together.

Images are ``uint8`` tensors ``(3, H, W)`` throughout; normalization happens at collate time. Randomness comes
from an explicit ``numpy.random.Generator`` so a view is reproducible from its seed.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as nnf
import torchvision.transforms.v2.functional as F
from torch import Tensor

from ..image_processing_sparse_semi_detr import get_resize_output_size

COLOUR_OPS = (
    "identity", "autocontrast", "equalize", "solarize", "colour", "contrast", "brightness", "sharpness", "posterize",
)
GEOMETRIC_OPS = ("translate_x", "translate_y", "rotate", "shear")
DEFAULT_SCALES = tuple(range(480, 801, 32))


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of the training views. Defaults are the paper's (COCO scale); use :meth:`scaled` for small images.

    ``scales``: candidate short sides; the long side is capped at ``max_size`` (aspect ratio kept).
    ``magnitude_range``: inclusive range of the colour magnitude ``m`` (of ``max_magnitude``).
    ``erase_patches``: inclusive range of the number of erased patches in the strong view; a patch is
    ``int(r * H) x int(r * W)`` with ``r ~ U(0, erase_max_frac)``, filled with ``fill``.
    ``min_box_size``: boxes narrower or shorter than this (view pixels) after clipping are dropped.
    ``eval_scale``: short side of the deterministic evaluation view (``None``: ``max(scales)``).
    """

    scales: tuple[int, ...] = DEFAULT_SCALES
    max_size: int = 1333
    flip_prob: float = 0.5
    colour_ops: tuple[str, ...] = COLOUR_OPS
    magnitude_range: tuple[int, int] = (1, 9)
    max_magnitude: int = 10
    geometric_ops: tuple[str, ...] = GEOMETRIC_OPS
    translate_frac: float = 0.1
    rotate_degrees: float = 30.0
    shear_degrees: float = 30.0
    erase_patches: tuple[int, int] = (1, 4)
    erase_max_frac: float = 0.2
    fill: int = 125
    min_box_size: float = 1.0
    eval_scale: int | None = None

    def __post_init__(self):
        if not self.scales or min(self.scales) <= 0 or self.max_size < max(self.scales):
            raise ValueError(f"scales must be positive and <= max_size, got {self.scales} / {self.max_size}")
        unknown = set(self.colour_ops) - set(COLOUR_OPS) | set(self.geometric_ops) - set(GEOMETRIC_OPS)
        if unknown or not self.colour_ops or not self.geometric_ops:
            raise ValueError(f"unknown or empty op lists: {sorted(unknown)}")
        lo, hi = self.magnitude_range
        if not 0 <= lo <= hi <= self.max_magnitude:
            raise ValueError(f"magnitude_range {self.magnitude_range} must lie in [0, {self.max_magnitude}]")
        if not 0 <= self.erase_patches[0] <= self.erase_patches[1]:
            raise ValueError(f"erase_patches must be an increasing pair >= 0, got {self.erase_patches}")
        if not 0.0 <= self.flip_prob <= 1.0 or not 0 <= self.fill <= 255:
            raise ValueError("flip_prob must be in [0, 1] and fill in [0, 255]")

    def scaled(self, factor: float, multiple: int = 8) -> "ViewConfig":
        """Same config with ``scales`` and ``max_size`` multiplied by ``factor`` (rounded to ``multiple``)."""
        scales = tuple(sorted({max(multiple, int(round(s * factor / multiple)) * multiple) for s in self.scales}))
        max_size = max(int(round(self.max_size * factor)), max(scales))
        eval_scale = None if self.eval_scale is None else int(round(self.eval_scale * factor))
        return replace(self, scales=scales, max_size=max_size, eval_scale=eval_scale)


@dataclass
class View:
    """One augmented view: ``image`` uint8 ``(3, h, w)``, ``boxes`` float32 ``(n, 4)`` xyxy view pixels,
    ``labels`` int64 ``(n,)``, ``matrix`` float64 ``(3, 3)`` original pixels -> view pixels."""

    image: Tensor
    boxes: Tensor
    labels: Tensor
    matrix: Tensor = field(default_factory=lambda: torch.eye(3, dtype=torch.float64))

    @property
    def size(self) -> tuple[int, int]:
        """``(h, w)`` of the view."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])


# ----------------------------------------------------------------------------------------------- matrices
def _affine(a: float, b: float, c: float, d: float, e: float, f: float) -> Tensor:
    return torch.tensor([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]], dtype=torch.float64)


def scale_matrix(sx: float, sy: float) -> Tensor:
    """``(3, 3)`` float64: ``(x, y) -> (sx x, sy y)``."""
    return _affine(sx, 0.0, 0.0, 0.0, sy, 0.0)


def hflip_matrix(width: float) -> Tensor:
    """``(3, 3)`` float64 horizontal flip of an image of width ``width``: ``x -> width - x``."""
    return _affine(-1.0, 0.0, float(width), 0.0, 1.0, 0.0)


def translation_matrix(tx: float, ty: float) -> Tensor:
    """``(3, 3)`` float64: ``(x, y) -> (x + tx, y + ty)``."""
    return _affine(1.0, 0.0, tx, 0.0, 1.0, ty)


def _about_centre(matrix: Tensor, height: int, width: int) -> Tensor:
    cx, cy = width / 2.0, height / 2.0
    return translation_matrix(cx, cy) @ matrix @ translation_matrix(-cx, -cy)


def rotation_matrix(degrees: float, height: int, width: int) -> Tensor:
    """``(3, 3)`` float64 rotation by ``degrees`` (counter-clockwise as displayed) about the image centre."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return _about_centre(_affine(c, s, 0.0, -s, c, 0.0), height, width)


def shear_matrix(shear_x: float, shear_y: float, height: int, width: int) -> Tensor:
    """``(3, 3)`` float64 ShearX(``shear_x``) then ShearY(``shear_y``) about the image centre (factors, not angles)."""
    sx = _affine(1.0, shear_x, 0.0, 0.0, 1.0, 0.0)
    sy = _affine(1.0, 0.0, 0.0, shear_y, 1.0, 0.0)
    return _about_centre(sy @ sx, height, width)


# ----------------------------------------------------------------------------------------------- boxes
def transform_boxes(boxes: Tensor, matrix: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Map xyxy boxes ``(n, 4)`` through ``matrix`` ``(3, 3)``: min/max of the 4 transformed corners.

    Clipped to ``[0, w] x [0, h]`` when ``size = (h, w)`` is given. Device and dtype follow ``boxes``;
    ``n = 0`` is fine.
    """
    x0, y0, x1, y1 = boxes.unbind(-1)
    xs = torch.stack((x0, x1, x1, x0), dim=-1)
    ys = torch.stack((y0, y0, y1, y1), dim=-1)
    m = matrix.to(device=boxes.device, dtype=torch.float64)
    px = m[0, 0] * xs.double() + m[0, 1] * ys.double() + m[0, 2]
    py = m[1, 0] * xs.double() + m[1, 1] * ys.double() + m[1, 2]
    out = torch.stack((px.amin(-1), py.amin(-1), px.amax(-1), py.amax(-1)), dim=-1)
    if size is not None:
        h, w = size
        out = torch.minimum(out.clamp(min=0), out.new_tensor([w, h, w, h]))
    return out.to(boxes.dtype)


def valid_boxes(boxes: Tensor, min_size: float = 1.0) -> Tensor:
    """Bool ``(n,)``: finite boxes with width and height ``>= min_size`` and ``> 0``."""
    wh = boxes[:, 2:] - boxes[:, :2]
    return torch.isfinite(boxes).all(-1) & (wh > 0).all(-1) & (wh >= min_size).all(-1)


def _move(view: View, matrix: Tensor, image: Tensor, min_size: float) -> View:
    """New view after applying ``matrix`` (old view pixels -> new view pixels) whose warped image is ``image``."""
    boxes = transform_boxes(view.boxes, matrix, (int(image.shape[-2]), int(image.shape[-1])))
    keep = valid_boxes(boxes, min_size)
    return View(image, boxes[keep], view.labels[keep], matrix @ view.matrix)


# ----------------------------------------------------------------------------------------------- image ops
def warp_affine(image: Tensor, matrix: Tensor, out_size: tuple[int, int] | None = None, fill: int = 125) -> Tensor:
    """Warp a uint8 ``(C, H, W)`` image with ``matrix`` (input pixels -> output pixels), bilinear, ``fill`` outside.

    Output is uint8 ``(C, h, w)`` with ``(h, w) = out_size`` (default: input size).
    """
    h_in, w_in = image.shape[-2:]
    h, w = out_size if out_size is not None else (h_in, w_in)
    inv = torch.linalg.inv(matrix.to(torch.float64))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5,
                            torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    grid = torch.stack((2.0 * sx / w_in - 1.0, 2.0 * sy / h_in - 1.0), dim=-1).float()[None]
    shifted = image.float()[None] - fill
    out = nnf.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0] + fill
    return out.round_().clamp_(0, 255).to(torch.uint8)


def apply_colour_op(image: Tensor, name: str, magnitude: int, max_magnitude: int = 10) -> Tensor:
    """One RandAug colour op on a uint8 ``(3, H, W)`` image (Soft-Teacher magnitudes).

    Enhance ops (colour, contrast, brightness, sharpness): factor ``1.8 m / M + 0.1``; solarize threshold
    ``min(int(256 m / M), 255)``; posterize bits ``max(1, 4 - int(4 m / M))``.
    """
    level = magnitude / max_magnitude
    factor = 1.8 * level + 0.1
    ops = {
        "identity": lambda x: x,
        "autocontrast": F.autocontrast,
        "equalize": F.equalize,
        "solarize": lambda x: F.solarize(x, threshold=min(int(256 * level), 255)),
        "colour": lambda x: F.adjust_saturation(x, factor),
        "contrast": lambda x: F.adjust_contrast(x, factor),
        "brightness": lambda x: F.adjust_brightness(x, factor),
        "sharpness": lambda x: F.adjust_sharpness(x, factor),
        "posterize": lambda x: F.posterize(x, bits=max(1, 4 - int(4 * level))),
    }
    if name not in ops:
        raise ValueError(f"unknown colour op {name!r}; expected one of {COLOUR_OPS}")
    return ops[name](image)


def random_colour(image: Tensor, config: ViewConfig, rng: np.random.Generator) -> Tensor:
    """Apply one colour op drawn uniformly from ``config.colour_ops`` with a random magnitude."""
    name = config.colour_ops[rng.integers(len(config.colour_ops))]
    magnitude = int(rng.integers(config.magnitude_range[0], config.magnitude_range[1] + 1))
    return apply_colour_op(image, name, magnitude, config.max_magnitude)


def random_erase(image: Tensor, config: ViewConfig, rng: np.random.Generator) -> Tensor:
    """Fill 1-4 (``config.erase_patches``) rectangles of ``int(r H) x int(r W)``, ``r ~ U(0, erase_max_frac)``."""
    out = image.clone()
    h, w = image.shape[-2:]
    for _ in range(int(rng.integers(config.erase_patches[0], config.erase_patches[1] + 1))):
        r = rng.uniform(0.0, config.erase_max_frac)
        ph, pw = int(h * r), int(w * r)
        y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        out[:, y0:y0 + ph, x0:x0 + pw] = config.fill
    return out


# ----------------------------------------------------------------------------------------------- geometry
def resized_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """``(h, w)`` after scaling the short side to ``short_side`` with the long side capped at ``max_size``: the image
    processor's rule (``get_resize_output_size``, sizes truncated as in DETR), so the evaluation during training
    sees the pixels an exported model's processor gives (rounding instead made 640 x 480 at 128 one pixel wider)."""
    return get_resize_output_size(height, width, short_side, max_size)


def resize_view(view: View, size: tuple[int, int], min_size: float) -> View:
    """Resize (bilinear, antialiased) to ``size = (h, w)``; boxes and matrix follow."""
    h, w = view.size
    image = F.resize(view.image, list(size), antialias=True)
    return _move(view, scale_matrix(size[1] / w, size[0] / h), image, min_size)


def flip_view(view: View, min_size: float) -> View:
    """Horizontal flip; boxes and matrix follow."""
    return _move(view, hflip_matrix(view.size[1]), F.horizontal_flip(view.image), min_size)


def random_resize_flip(view: View, config: ViewConfig, rng: np.random.Generator) -> View:
    """Random short side from ``config.scales`` (long side <= ``max_size``), then flip with ``flip_prob``."""
    short = int(config.scales[rng.integers(len(config.scales))])
    view = resize_view(view, resized_size(*view.size, short, config.max_size), config.min_box_size)
    if rng.random() < config.flip_prob:
        view = flip_view(view, config.min_box_size)
    return view


def sample_geometric_matrix(config: ViewConfig, height: int, width: int, rng: np.random.Generator) -> Tensor:
    """One geometric op drawn from ``config.geometric_ops`` as a ``(3, 3)`` float64 matrix on an ``h x w`` image.

    translate: ``U(-f, f) * W`` (or ``H``); rotate: ``U(-a, a)`` degrees about the centre; shear: ShearX then ShearY
    with independent factors ``tanh(U(-a, a) * pi / 180)`` (the reference's tanh), about the centre.
    """
    name = config.geometric_ops[rng.integers(len(config.geometric_ops))]
    if name == "translate_x":
        return translation_matrix(rng.uniform(-1, 1) * config.translate_frac * width, 0.0)
    if name == "translate_y":
        return translation_matrix(0.0, rng.uniform(-1, 1) * config.translate_frac * height)
    if name == "rotate":
        return rotation_matrix(rng.uniform(-1, 1) * config.rotate_degrees, height, width)
    shx, shy = (math.tanh(math.radians(rng.uniform(-1, 1) * config.shear_degrees)) for _ in range(2))
    return shear_matrix(shx, shy, height, width)


def geometric_view(view: View, matrix: Tensor, config: ViewConfig) -> View:
    """Warp the view by ``matrix`` (view pixels -> view pixels, same canvas), filling with ``config.fill``."""
    image = warp_affine(view.image, matrix, view.size, config.fill)
    return _move(view, matrix, image, config.min_box_size)


def _initial_view(image: Tensor, boxes: Tensor | None, labels: Tensor | None) -> View:
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"expected a uint8 (C, H, W) image, got {tuple(image.shape)} {image.dtype}")
    boxes = torch.zeros(0, 4) if boxes is None else boxes.float().reshape(-1, 4)
    labels = torch.zeros(0, dtype=torch.long) if labels is None else labels.long().reshape(-1)
    keep = valid_boxes(boxes, 0.0)
    return View(image, boxes[keep], labels[keep])


# ----------------------------------------------------------------------------------------------- pipelines
@dataclass
class LabeledTransform:
    """Labeled view: random resize + flip + one colour op. Call ``(image, boxes, labels, rng) -> View``."""

    config: ViewConfig = field(default_factory=ViewConfig)

    def __call__(self, image: Tensor, boxes: Tensor | None, labels: Tensor | None, rng: np.random.Generator) -> View:
        view = random_resize_flip(_initial_view(image, boxes, labels), self.config, rng)
        view.image = random_colour(view.image, self.config, rng)
        return view


@dataclass
class WeakTransform:
    """Weak (teacher) view: random resize + flip only."""

    config: ViewConfig = field(default_factory=ViewConfig)

    def __call__(self, image: Tensor, boxes: Tensor | None, labels: Tensor | None, rng: np.random.Generator) -> View:
        return random_resize_flip(_initial_view(image, boxes, labels), self.config, rng)


@dataclass
class StrongTransform:
    """Strong (student) view: resize + flip, then [one colour op, one geometric op] in random order, then erase."""

    config: ViewConfig = field(default_factory=ViewConfig)

    def __call__(self, image: Tensor, boxes: Tensor | None, labels: Tensor | None, rng: np.random.Generator) -> View:
        view = random_resize_flip(_initial_view(image, boxes, labels), self.config, rng)
        colour_first = rng.random() < 0.5
        if colour_first:
            view.image = random_colour(view.image, self.config, rng)
        view = geometric_view(view, sample_geometric_matrix(self.config, *view.size, rng), self.config)
        if not colour_first:
            view.image = random_colour(view.image, self.config, rng)
        view.image = random_erase(view.image, self.config, rng)
        return view


@dataclass
class UnlabeledPairTransform:
    """Weak and strong views of one image plus ``weak_to_strong = M_strong @ M_weak^-1`` ``(3, 3)`` float64.

    Call ``(image, boxes, labels, rng) -> (weak View, strong View, weak_to_strong)``; boxes (ground truth, if any)
    only ride along for measuring pseudo-label quality.
    """

    weak_config: ViewConfig = field(default_factory=ViewConfig)
    strong_config: ViewConfig | None = None

    def __call__(self, image: Tensor, boxes: Tensor | None, labels: Tensor | None,
                 rng: np.random.Generator) -> tuple[View, View, Tensor]:
        weak = WeakTransform(self.weak_config)(image, boxes, labels, rng)
        strong = StrongTransform(self.strong_config or self.weak_config)(image, boxes, labels, rng)
        return weak, strong, strong.matrix @ torch.linalg.inv(weak.matrix)


@dataclass
class EvalTransform:
    """Deterministic evaluation view: resize to ``config.eval_scale`` (default ``max(scales)``), no flip/colour.

    ``rng`` is accepted for a uniform call signature and ignored.
    """

    config: ViewConfig = field(default_factory=ViewConfig)

    def __call__(self, image: Tensor, boxes: Tensor | None, labels: Tensor | None,
                 rng: np.random.Generator | None = None) -> View:
        view = _initial_view(image, boxes, labels)
        short = self.config.eval_scale or max(self.config.scales)
        return resize_view(view, resized_size(*view.size, short, self.config.max_size), self.config.min_box_size)
