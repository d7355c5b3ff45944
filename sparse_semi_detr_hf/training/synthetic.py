"""A deterministic, deliberately hard synthetic detection dataset made in code (the embedded default dataset).

Each class is one *shape x texture* combination (e.g. ``circle_stripes``), so neither shape, texture nor colour
alone tells the class: every shape appears in two default classes, every texture in two or three, and colours
are random. The other combinations and four extra shapes (ellipse, bar, half disc, square frame) are drawn as
un-annotated distractors, on cluttered backgrounds (gradient, blobs, lines, textured patches, pixel noise).
Radii are log-uniform (many small objects); objects may overlap. An object is annotated with the box of its
VISIBLE pixels (COCO convention) and its visible pixel count as ``area``; objects with less than
``min_visible`` (default 40 %) of their shape visible (occluded or outside the frame) are not annotated.

Images depend only on ``(seed, split, index)`` through numpy's PCG64 and plain IEEE arithmetic (no PIL drawing,
no transcendental per-pixel functions), so they are identical across machines; they are stored as PNG.
"""

import io
import json
import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace

import numpy as np
import PIL.Image
from datasets import Dataset

from .data import _info, detection_features

logger = logging.getLogger(__name__)

SHAPES = ("circle", "square", "triangle", "cross", "ring")
TEXTURES = ("solid", "stripes", "checker", "dots")
DISTRACTOR_SHAPES = ("ellipse", "bar", "half_disc", "frame")
# All 20 combinations, ordered so that every prefix of length 10 uses each shape twice and each texture 2-3 times.
COMBINATIONS = tuple((SHAPES[i], TEXTURES[(i + k) % 4]) for k in range(4) for i in range(5))
SYNTHETIC_CLASSES = tuple(f"{s}_{t}" for s, t in COMBINATIONS[:10])
_SPLITS = {"train": 0, "val": 1, "test": 2}
_SQRT2, _SQRT3 = float(np.sqrt(2.0)), float(np.sqrt(3.0))


@dataclass(frozen=True)
class SyntheticConfig:
    """Difficulty knobs. Ranges are inclusive ``(min, max)``.

    ``image_size``: range of each side (h and w drawn independently). ``num_classes``: 2..20 (the first
    ``num_classes`` of :data:`COMBINATIONS`; the rest become distractors). ``radius_range``: log-uniform object
    radius in pixels. ``distractor_combo_prob``: share of distractors that are unlisted shape x texture
    combinations (the rest are the extra shapes). ``clutter``: scales the number of background lines, blobs
    and textured patches and the noise amplitude (0 = plain gradient). ``min_visible``: visible fraction below
    which an object is not annotated. ``placement_tries``: attempts to place an object without hiding more than
    ``1 - min_visible`` of an annotated one (after that it is placed anyway).
    """

    image_size: tuple[int, int] = (192, 256)
    num_classes: int = 10
    objects_per_image: tuple[int, int] = (3, 15)
    distractors_per_image: tuple[int, int] = (1, 6)
    distractor_combo_prob: float = 0.5
    radius_range: tuple[float, float] = (4.0, 40.0)
    clutter: float = 1.0
    min_visible: float = 0.4
    placement_tries: int = 5

    def __post_init__(self):
        if not 2 <= self.num_classes <= len(COMBINATIONS):
            raise ValueError(f"num_classes must be in [2, {len(COMBINATIONS)}], got {self.num_classes}")
        for name in ("image_size", "objects_per_image", "distractors_per_image", "radius_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be an increasing pair >= 0, got {(lo, hi)}")
        if self.radius_range[0] < 2 or self.image_size[0] < 32:
            raise ValueError("radius_range must start at >= 2 px and image sides must be >= 32 px")

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the annotated classes, ``"<shape>_<texture>"``."""
        return tuple(f"{s}_{t}" for s, t in COMBINATIONS[: self.num_classes])


# ----------------------------------------------------------------------------------------------- masks
def _orient(dx: np.ndarray, dy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rotated by ``k * 90`` degrees (exact), or by 45 degrees for ``k >= 4``."""
    if k >= 4:
        return (dx + dy) / _SQRT2, (dx - dy) / _SQRT2
    return [(dx, dy), (dy, -dx), (-dx, -dy), (-dy, dx)][k]


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, k: int) -> np.ndarray:
    """Bool mask of ``shape`` with radius ``r`` at offsets ``(dx, dy)`` from its centre, orientation ``k``.

    ``dx``, ``dy`` may be open grids (``np.ogrid``); the mask has their broadcast shape.
    """
    return np.broadcast_to(_shape_mask(shape, dx, dy, r, k), np.broadcast_shapes(np.shape(dx), np.shape(dy)))


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, k: int) -> np.ndarray:
    u, v = _orient(dx, dy, k % 4)
    d2 = dx * dx + dy * dy
    if shape == "circle":
        return d2 <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    if shape == "triangle":
        return (_SQRT3 * np.abs(u) <= v + r) & (v <= 0.5 * r)
    if shape == "cross":
        u, v = _orient(dx, dy, 4 if k % 2 else 0)
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.3 * r) & (av <= r)) | ((av <= 0.3 * r) & (au <= r))
    if shape == "ring":
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "ellipse":
        return (u / r) ** 2 + (v / (0.45 * r)) ** 2 <= 1.0
    if shape == "bar":
        return (np.abs(u) <= r) & (np.abs(v) <= 0.25 * r)
    if shape == "half_disc":
        return (d2 <= r * r) & (v >= 0)
    if shape == "frame":
        m = np.maximum(np.abs(dx), np.abs(dy))
        return (m <= 0.85 * r) & (m >= 0.55 * r)
    raise ValueError(f"unknown shape {shape!r}")


def texture_mask(texture: str, dx: np.ndarray, dy: np.ndarray, period: float, k: int,
                 phase: tuple[float, float]) -> np.ndarray:
    """Bool mask of the texture's second colour (all False for ``solid``); broadcast shape of ``dx``, ``dy``."""
    mask = _texture_mask(texture, dx, dy, period, k, phase)
    return np.broadcast_to(mask, np.broadcast_shapes(np.shape(dx), np.shape(dy)))


def _texture_mask(texture: str, dx: np.ndarray, dy: np.ndarray, period: float, k: int,
                  phase: tuple[float, float]) -> np.ndarray:
    x, y = dx + phase[0], dy + phase[1]
    if texture == "solid":
        return np.zeros(dx.shape, dtype=bool)
    if texture == "stripes":
        t = [x, y, (x + y) / _SQRT2, (x - y) / _SQRT2][k % 4]
        return np.floor(t / period) % 2 == 1
    if texture == "checker":
        return (np.floor(x / period) + np.floor(y / period)) % 2 == 1
    if texture == "dots":
        qx, qy = np.mod(x, period) - period / 2, np.mod(y, period) - period / 2
        return qx * qx + qy * qy <= (0.32 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}")


# ----------------------------------------------------------------------------------------------- drawing
def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None, min_dist: int = 150) -> np.ndarray:
    """A random RGB colour at L1 distance >= ``min_dist`` from ``away_from`` (a few tries, then the inverse)."""
    for _ in range(8):
        c = rng.integers(0, 256, 3)
        if away_from is None or np.abs(c - away_from).sum() >= min_dist:
            return c
    return 255 - away_from


def _paint(img: np.ndarray, region: tuple[slice, slice], mask: np.ndarray, second: np.ndarray | None,
           c1: np.ndarray, c2: np.ndarray | None = None, alpha: float = 1.0) -> None:
    """Paint ``c1`` (``c2`` where ``second``) onto ``img[region]`` inside ``mask``, blended with ``alpha``."""
    patch = img[region]
    colours = np.broadcast_to(c1, (int(mask.sum()), 3)) if second is None else np.where(second[mask][:, None], c2, c1)
    patch[mask] = colours if alpha >= 1.0 else np.round(alpha * colours + (1.0 - alpha) * patch[mask])


def _box_region(x0: float, y0: float, x1: float, y1: float, h: int, w: int) -> tuple[tuple[slice, slice], tuple]:
    """Region of the image covering ``[x0, x1] x [y0, y1]`` (clipped) and its pixel-centre grid ``(ys, xs)``."""
    r0, r1 = max(0, int(np.floor(y0))), min(h, int(np.ceil(y1)) + 1)
    c0, c1 = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)) + 1)
    region = (slice(r0, max(r0, r1)), slice(c0, max(c0, c1)))
    return region, _open_grid(region)


def _open_grid(region: tuple[slice, slice]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(ys (n, 1), xs (1, m))`` of a region, float32."""
    ys, xs = np.ogrid[region]
    return (ys + 0.5).astype(np.float32), (xs + 0.5).astype(np.float32)


def _background(h: int, w: int, clutter: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(h, w, 3)`` float32 cluttered background and its mean colour."""
    ys, xs = np.arange(h)[:, None] + 0.5, np.arange(w)[None, :] + 0.5
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = rng.uniform(-1, 1) * xs / w + rng.uniform(-1, 1) * ys / h
    t = (t - t.min()) / (t.max() - t.min() + 1e-9)
    t = t.astype(np.float32)[..., None]
    img = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t
    mean = c0 + (c1 - c0) * float(t.mean())
    for _ in range(int(round(clutter * rng.integers(3, 9)))):  # soft blobs
        cx, cy, rx, ry = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, w / 4), rng.uniform(5, h / 4)
        region, (gy, gx) = _box_region(cx - rx, cy - ry, cx + rx, cy + ry, h, w)
        mask = ((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2 <= 1.0
        _paint(img, region, mask, None, rng.integers(0, 256, 3), alpha=0.5)
    for _ in range(int(round(clutter * rng.integers(2, 5)))):  # textured patches (texture alone is no cue)
        x0, y0 = rng.uniform(0, w - 8), rng.uniform(0, h - 8)
        region, (gy, gx) = _box_region(x0, y0, x0 + rng.uniform(8, w / 3), y0 + rng.uniform(8, h / 3), h, w)
        tex = TEXTURES[1 + int(rng.integers(3))]
        second = texture_mask(tex, gx, gy, float(rng.uniform(2, 8)), int(rng.integers(4)), (0.0, 0.0))
        _paint(img, region, np.ones_like(second), second, rng.integers(0, 256, 3), rng.integers(0, 256, 3), 0.4)
    for _ in range(int(round(clutter * rng.integers(4, 12)))):  # line segments
        _draw_line(img, rng.uniform(0, [w, h]), rng.uniform(0, [w, h]), rng.uniform(0.5, 2.0), rng.integers(0, 256, 3))
    return img, mean


def _draw_line(img: np.ndarray, p: np.ndarray, q: np.ndarray, half_width: float, colour: np.ndarray) -> None:
    """Stamp a disc of radius ``half_width`` every half pixel along the segment ``p -> q`` (x, y)."""
    n = max(2, int(np.ceil(2 * np.abs(q - p).max())) + 1)
    pts = np.floor(p + (np.arange(n) / (n - 1))[:, None] * (q - p)).astype(np.int64)
    k = int(np.ceil(half_width))
    oy, ox = np.mgrid[-k:k + 1, -k:k + 1]
    disc = ox * ox + oy * oy <= half_width * half_width + 0.25
    xs = (pts[:, 0:1] + ox[disc][None]).ravel()
    ys = (pts[:, 1:2] + oy[disc][None]).ravel()
    inside = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[inside], xs[inside]] = colour


@dataclass
class _Item:
    shape: str
    texture: str
    label: int  # -1 for distractors
    r: float
    cx: float
    cy: float
    region: tuple[slice, slice] = (slice(0), slice(0))
    mask: np.ndarray | None = None
    full: int = 0


def _sample_items(config: SyntheticConfig, rng: np.random.Generator) -> list[_Item]:
    """Class objects and distractors (shape, texture, label, radius) in random drawing order."""
    lo, hi = np.log(config.radius_range[0]), np.log(config.radius_range[1])
    items = []
    for _ in range(int(rng.integers(config.objects_per_image[0], config.objects_per_image[1] + 1))):
        label = int(rng.integers(config.num_classes))
        items.append(_Item(*COMBINATIONS[label], label, 0, 0, 0))
    for _ in range(int(rng.integers(config.distractors_per_image[0], config.distractors_per_image[1] + 1))):
        if config.num_classes < len(COMBINATIONS) and rng.random() < config.distractor_combo_prob:
            shape, texture = COMBINATIONS[int(rng.integers(config.num_classes, len(COMBINATIONS)))]
        else:
            shape, texture = DISTRACTOR_SHAPES[int(rng.integers(4))], TEXTURES[int(rng.integers(4))]
        items.append(_Item(shape, texture, -1, 0, 0, 0))
    for item in items:
        item.r = float(np.exp(rng.uniform(lo, hi)))
    return [items[i] for i in rng.permutation(len(items))]


def _locate(item: _Item, h: int, w: int, rng: np.random.Generator, k: int) -> None:
    """Random centre inside the image; sets the item's in-image ``region``, ``mask`` and full pixel count."""
    item.cx, item.cy = rng.uniform(0, w), rng.uniform(0, h)
    half = int(np.ceil(item.r)) + 1
    x0, y0 = int(np.floor(item.cx)) - half, int(np.floor(item.cy)) - half
    ys, xs = _open_grid((slice(y0, y0 + 2 * half + 1), slice(x0, x0 + 2 * half + 1)))
    mask = shape_mask(item.shape, xs - item.cx, ys - item.cy, item.r, k)
    item.full = int(mask.sum())
    cy0, cx0 = max(y0, 0), max(x0, 0)
    cy1, cx1 = min(y0 + 2 * half + 1, h), min(x0 + 2 * half + 1, w)
    item.region = (slice(cy0, cy1), slice(cx0, cx1))
    item.mask = mask[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]


def _hides_too_much(item: _Item, owner: np.ndarray, visible: np.ndarray, items: list[_Item], min_vis: float) -> bool:
    covered = owner[item.region][item.mask]
    counts = np.bincount(covered[covered >= 0], minlength=len(items))
    for j in np.nonzero(counts)[0]:
        if items[j].label >= 0 and visible[j] - counts[j] < min_vis * items[j].full:
            return True
    return False


def _draw_item(img: np.ndarray, item: _Item, bg_mean: np.ndarray, rng: np.random.Generator, k: int) -> None:
    c1 = _colour(rng, bg_mean, 120)
    c2 = _colour(rng, c1, 150)
    ys, xs = _open_grid(item.region)
    period = max(2.0, item.r * rng.uniform(0.3, 0.6)) if item.texture != "dots" else max(3.0, item.r * 0.6)
    phase = (float(rng.uniform(0, period)), float(rng.uniform(0, period)))
    second = texture_mask(item.texture, xs - item.cx, ys - item.cy, period, k, phase)
    _paint(img, item.region, item.mask, second, c1, c2)


def render_synthetic_image(config: SyntheticConfig, seed: int, split: str, index: int) -> tuple[np.ndarray, dict]:
    """One image ``(h, w, 3)`` uint8 and its objects (COCO layout: ``bbox`` xywh, ``category``, ``area``).

    Deterministic in ``(config, seed, split, index)``.
    """
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    h, w = (int(v) for v in rng.integers(config.image_size[0], config.image_size[1] + 1, 2))
    img, bg_mean = _background(h, w, config.clutter, rng)
    items = _sample_items(config, rng)
    owner = np.full((h, w), -1, dtype=np.int32)
    visible = np.zeros(len(items), dtype=np.int64)
    for i, item in enumerate(items):
        k = int(rng.integers(8))
        for _ in range(max(1, config.placement_tries)):
            _locate(item, h, w, rng, k)
            if not _hides_too_much(item, owner, visible, items, config.min_visible):
                break
        covered = owner[item.region][item.mask]
        np.subtract.at(visible, covered[covered >= 0], 1)
        owner[item.region][item.mask] = i
        visible[i] = int(item.mask.sum())
        _draw_item(img, item, bg_mean, rng, k)
    amplitude = int(round(8 * config.clutter))
    if amplitude:  # luminance noise (same offset on the three channels)
        img += rng.integers(-amplitude, amplitude + 1, (h, w, 1))
    return np.clip(img, 0, 255).astype(np.uint8), _annotations(items, owner, visible, config.min_visible, index)


def _annotations(items: list[_Item], owner: np.ndarray, visible: np.ndarray, min_vis: float, index: int) -> dict:
    objects = {"id": [], "area": [], "bbox": [], "category": [], "iscrowd": []}
    for i, item in enumerate(items):
        if item.label < 0 or item.full == 0 or visible[i] < max(1, min_vis * item.full):
            continue
        ys, xs = np.nonzero(owner[item.region] == i)
        x0, y0 = xs.min() + item.region[1].start, ys.min() + item.region[0].start
        x1, y1 = xs.max() + 1 + item.region[1].start, ys.max() + 1 + item.region[0].start
        objects["id"].append(index * 100 + i)
        objects["area"].append(float(visible[i]))
        objects["bbox"].append([float(x0), float(y0), float(x1 - x0), float(y1 - y0)])
        objects["category"].append(item.label)
        objects["iscrowd"].append(0)
    return objects


def _png(image: np.ndarray) -> dict:
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return {"bytes": buf.getvalue(), "path": None}


def _render_rows(config: SyntheticConfig, seed: int, split: str, indices: range) -> list[tuple]:
    """``(png, image_id, width, height, objects)`` per index (top level so worker processes can run it)."""
    rows = []
    for index in indices:
        image, objects = render_synthetic_image(config, seed, split, index)
        rows.append((_png(image), index, image.shape[1], image.shape[0], objects))
    return rows


def make_synthetic_split(num_images: int, split: str = "train", seed: int = 0,
                         config: SyntheticConfig | None = None, num_proc: int = 1) -> Dataset:
    """``num_images`` synthetic images of ``split`` ("train", "val" or "test": independent random streams) in the
    common detection schema.

    ``num_proc > 1`` renders chunks in worker processes; the result does not depend on it.
    """
    config = config or SyntheticConfig()
    if num_proc > 1 and num_images > num_proc:
        step = -(-num_images // num_proc)
        chunks = [range(i, min(i + step, num_images)) for i in range(0, num_images, step)]
        with ProcessPoolExecutor(num_proc) as pool:
            parts = list(pool.map(_render_rows, *zip(*[(config, seed, split, chunk) for chunk in chunks])))
        rows = [row for part in parts for row in part]
    else:
        rows = _render_rows(config, seed, split, range(num_images))
    names = ("image", "image_id", "width", "height", "objects")
    columns = {name: [row[k] for row in rows] for k, name in enumerate(names)}
    features = detection_features(config.class_names)
    info = _info(range(config.num_classes), features, synthetic={"seed": seed, "split": split, **asdict(config)})
    return Dataset.from_dict(columns, features=features, info=info)


def make_synthetic_detection_dataset(num_train: int = 2000, num_val: int = 200,
                                     image_size: int | tuple[int, int] = (192, 256),
                                     seed: int = 0, config: SyntheticConfig | None = None, num_proc: int = 1,
                                     **overrides) -> tuple[Dataset, Dataset]:
    """``(train, val)`` synthetic detection datasets (PNG images, COCO xywh boxes, ``SyntheticConfig.class_names``).

    ``image_size`` is the inclusive range of each side; other knobs via ``config`` or keyword ``overrides`` of
    :class:`SyntheticConfig` fields. Train and val are drawn from different random streams of the same ``seed``.
    ``num_proc`` worker processes render in parallel (same result).
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    config = replace(config or SyntheticConfig(), image_size=size, **overrides)
    train = make_synthetic_split(num_train, "train", seed, config, num_proc)
    val = make_synthetic_split(num_val, "val", seed, config, num_proc)
    logger.info("synthetic dataset: %s", json.dumps({"train": num_train, "val": num_val, **asdict(config)}))
    return train, val
