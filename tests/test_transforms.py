"""Box-aware views: the kept 3x3 matrices, the warped pixels and the boxes must agree."""

import math

import numpy as np
import pytest
import torch

from sparse_semi_detr_hf.training.transforms import (
    COLOUR_OPS,
    GEOMETRIC_OPS,
    EvalTransform,
    LabeledTransform,
    StrongTransform,
    UnlabeledPairTransform,
    View,
    ViewConfig,
    WeakTransform,
    apply_colour_op,
    flip_view,
    geometric_view,
    random_erase,
    resize_view,
    rotation_matrix,
    transform_boxes,
    translation_matrix,
    warp_affine,
)

SMALL = dict(scales=(56, 64, 72, 80, 96), max_size=160)


def geometry_only(ops=GEOMETRIC_OPS) -> ViewConfig:
    """Views without colour changes or erasing, black fill: the pixels show only the geometry."""
    return ViewConfig(**SMALL, colour_ops=("identity",), erase_patches=(0, 0), fill=0, geometric_ops=tuple(ops))


def rectangle_image(rng: np.random.Generator, height: int = 70, width: int = 90) -> tuple[torch.Tensor, torch.Tensor]:
    """Black uint8 image with one white axis-aligned rectangle and its xyxy box ``(1, 4)``."""
    x0, y0 = int(rng.integers(4, width // 2)), int(rng.integers(4, height // 2))
    x1, y1 = x0 + int(rng.integers(6, width // 2 - 2)), y0 + int(rng.integers(6, height // 2 - 2))
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[:, y0:y1, x0:x1] = 255
    return image, torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)


def pixel_box(image: torch.Tensor, threshold: int = 20) -> torch.Tensor | None:
    """xyxy box of the pixels brighter than ``threshold`` (pixel (i, j) covers [j, j+1] x [i, i+1])."""
    ys, xs = torch.nonzero(image[0] > threshold, as_tuple=True)
    if len(xs) == 0:
        return None
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centroid ``(x, y)`` of channel 0 in continuous pixel coordinates."""
    weight = image[0].double()
    ys, xs = torch.meshgrid(torch.arange(image.shape[1]) + 0.5, torch.arange(image.shape[2]) + 0.5, indexing="ij")
    return torch.stack(((weight * xs).sum(), (weight * ys).sum())) / weight.sum()


def apply_point(matrix: torch.Tensor, x: float, y: float) -> torch.Tensor:
    return (matrix @ torch.tensor([x, y, 1.0], dtype=torch.float64))[:2]


def resize_flip_matrix(config: ViewConfig, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Matrix of the resize + flip alone that ``rng``'s next draws give (a weak view consumes the same draws)."""
    return WeakTransform(config)(image, None, None, rng).matrix


def assert_op_applied(op: str, matrix: torch.Tensor, size: tuple[int, int], config: ViewConfig) -> None:
    """``matrix`` (view -> view, on an ``h x w`` canvas) is not the identity and moves points as ``op`` does:
    one common non-zero shift along x (translate_x) or y (translate_y); about the fixed centre, distances kept
    (rotate) or not (shear)."""
    h, w = size
    points = [(0.0, 0.0), (w, 0.0), (0.3 * w, 0.8 * h), (w, h)]
    moves = torch.stack([apply_point(matrix, x, y) - torch.tensor([x, y], dtype=torch.float64) for x, y in points])
    assert moves.abs().max() > 1e-3, f"{op}: the sampled matrix is the identity"
    if op.startswith("translate"):
        axis = 0 if op == "translate_x" else 1
        torch.testing.assert_close(moves, moves[:1].expand_as(moves), atol=1e-9, rtol=0)  # one shift everywhere
        shift, across = moves[0, axis].abs(), moves[0, 1 - axis].abs()
        assert across < 1e-9 and 1e-3 < shift <= config.translate_frac * size[1 - axis]
        return
    centre = torch.tensor([w / 2.0, h / 2.0], dtype=torch.float64)
    torch.testing.assert_close(apply_point(matrix, *centre.tolist()), centre, atol=1e-9, rtol=0)
    radii = [(torch.tensor(p, dtype=torch.float64) - centre).norm() for p in points]
    moved = [(apply_point(matrix, *p) - centre).norm() for p in points]
    linear = matrix[:2, :2]
    if op == "rotate":
        torch.testing.assert_close(torch.stack(moved), torch.stack(radii), atol=1e-9, rtol=0)
        angle = math.degrees(math.atan2(float(linear[0, 1]), float(linear[0, 0])))
        assert 1e-3 < abs(angle) <= config.rotate_degrees + 1e-9
    else:  # shear: ShearX then ShearY, determinant 1 but not a rotation
        assert abs(float(torch.linalg.det(linear)) - 1.0) < 1e-9 and float(linear[0, 0]) == pytest.approx(1.0)
        assert max(abs(float(a - b)) for a, b in zip(moved, radii)) > 1e-3


@pytest.mark.parametrize("op", GEOMETRIC_OPS)
def test_matrix_moves_pixels_exactly(op):
    """The centroid of a small blob lands where the view matrix sends the blob's centre (sub-pixel); the view's
    matrix, resize/flip taken off, is the op's (not the identity)."""
    transform = StrongTransform(geometry_only([op]))
    checked = 0
    for seed in range(25):
        rng = np.random.default_rng(seed)
        image = torch.zeros(3, 60, 80, dtype=torch.uint8)
        cx, cy = int(rng.integers(20, 60)), int(rng.integers(15, 45))
        image[:, cy - 2:cy + 2, cx - 2:cx + 2] = 255
        blob = torch.tensor([[cx - 2.0, cy - 2.0, cx + 2.0, cy + 2.0]])
        replay = np.random.default_rng(seed)
        replay.integers(20, 60), replay.integers(15, 45)
        view = transform(image, blob, torch.tensor([0]), rng)
        geometric = view.matrix @ torch.linalg.inv(resize_flip_matrix(transform.config, image, replay))
        assert_op_applied(op, geometric, view.size, transform.config)
        moved = transform_boxes(blob, view.matrix)[0]
        h, w = view.size
        if moved[0] < 1 or moved[1] < 1 or moved[2] > w - 1 or moved[3] > h - 1:
            continue  # blob partly outside the canvas: its centroid is not the mapped centre
        torch.testing.assert_close(centroid(view.image), apply_point(view.matrix, cx, cy), atol=0.25, rtol=0)
        checked += 1
    assert checked >= 15


def test_half_pixel_error_would_be_caught():
    """The centroid check resolves a half-pixel convention error (e.g. pixel centres at integers)."""
    image = torch.zeros(3, 40, 40, dtype=torch.uint8)
    image[:, 18:22, 18:22] = 255
    matrix = rotation_matrix(20.0, 40, 40)
    warped = warp_affine(image, matrix, fill=0)
    off_by_half = translation_matrix(0.5, 0.5) @ matrix
    assert (centroid(warped) - apply_point(matrix, 20, 20)).abs().max() < 0.1
    assert (centroid(warped) - apply_point(off_by_half, 20, 20)).abs().max() > 0.4


@pytest.mark.parametrize("op", GEOMETRIC_OPS)
def test_weak_boxes_map_onto_strong_pixels(op):
    """A weak-view box sent through ``weak_to_strong`` covers the rectangle's pixels in the strong view; the strong
    matrix, its resize/flip taken off, is the op's (not the identity)."""
    config = geometry_only([op])
    transform = UnlabeledPairTransform(config)
    compared = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        image, box = rectangle_image(rng)
        weak, strong, weak_to_strong = transform(image, box, torch.tensor([3]), rng)
        replay = np.random.default_rng(100 + seed)
        rectangle_image(replay)
        torch.testing.assert_close(resize_flip_matrix(config, image, replay), weak.matrix)  # the weak draws
        geometric = strong.matrix @ torch.linalg.inv(resize_flip_matrix(config, image, replay))
        assert_op_applied(op, geometric, strong.size, config)
        torch.testing.assert_close(weak_to_strong @ weak.matrix, strong.matrix)
        assert len(weak.boxes) == 1
        torch.testing.assert_close(weak.boxes[0], pixel_box(weak.image), atol=1.5, rtol=0)
        mapped = transform_boxes(weak.boxes, weak_to_strong, strong.size)
        seen = pixel_box(strong.image)
        if len(strong.boxes) == 0:  # clipped away: the rectangle is (nearly) out of the strong canvas
            assert seen is None or (seen[2:] - seen[:2]).min() <= 2
            continue
        torch.testing.assert_close(mapped, strong.boxes, atol=1e-3, rtol=0)
        assert strong.labels.tolist() == [3]
        torch.testing.assert_close(strong.boxes[0], seen, atol=2.5, rtol=0)
        compared += 1
    assert compared >= 15


def test_resize_and_flip_are_exact():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    image[:, 10:30, 5:25] = 255
    view = View(image, torch.tensor([[5.0, 10.0, 25.0, 30.0]]), torch.tensor([1]))
    view = flip_view(resize_view(view, (80, 120), 1.0), 1.0)
    torch.testing.assert_close(view.boxes, torch.tensor([[70.0, 20.0, 110.0, 60.0]]))
    torch.testing.assert_close(view.boxes[0], pixel_box(view.image, 127))
    torch.testing.assert_close(apply_point(view.matrix, 0.0, 0.0), torch.tensor([120.0, 0.0], dtype=torch.float64))


def test_boxes_clipped_and_degenerate_dropped():
    image = torch.zeros(3, 50, 50, dtype=torch.uint8)
    boxes = torch.tensor([[40.0, 10.0, 48.0, 20.0], [2.0, 2.0, 12.0, 12.0], [20.0, 30.0, 30.0, 40.0]])
    view = View(image, boxes, torch.tensor([7, 8, 9]))
    moved = geometric_view(view, translation_matrix(5.0, 0.0), geometry_only())
    # box 0 is clipped at x = 50, the others move by 5 px
    torch.testing.assert_close(moved.boxes, torch.tensor([[45.0, 10.0, 50.0, 20.0], [7.0, 2.0, 17.0, 12.0],
                                                          [25.0, 30.0, 35.0, 40.0]]))
    gone = geometric_view(view, translation_matrix(11.5, 0.0), geometry_only())
    assert gone.labels.tolist() == [8, 9]  # box 0 left the image with its label
    empty = transform_boxes(torch.zeros(0, 4), rotation_matrix(10.0, 50, 50), (50, 50))
    assert empty.shape == (0, 4)


def test_views_reproducible_per_seed():
    image, box = rectangle_image(np.random.default_rng(0))
    transform = UnlabeledPairTransform(ViewConfig(**SMALL))
    a = transform(image, box, torch.tensor([0]), np.random.default_rng(5))
    b = transform(image, box, torch.tensor([0]), np.random.default_rng(5))
    c = transform(image, box, torch.tensor([0]), np.random.default_rng(6))
    assert torch.equal(a[1].image, b[1].image) and torch.equal(a[2], b[2])
    assert not (a[1].image.shape == c[1].image.shape and torch.equal(a[1].image, c[1].image))


def test_resize_respects_scales_and_max_size():
    config = ViewConfig(scales=(64, 96), max_size=120, colour_ops=("identity",))
    transform = LabeledTransform(config)
    sizes = set()
    for seed in range(30):
        view = transform(torch.zeros(3, 50, 150, dtype=torch.uint8), None, None, np.random.default_rng(seed))
        sizes.add(view.size)
        assert max(view.size) <= 120
    assert sizes == {(40, 120)}  # the long side caps both scales
    view = EvalTransform(ViewConfig(**SMALL))(torch.zeros(3, 40, 60, dtype=torch.uint8), None, None)
    assert view.size == (96, 144) and view.boxes.shape == (0, 4)


def test_colour_op_magnitudes():
    image = torch.tensor([[[0, 100, 200, 255]]], dtype=torch.uint8).expand(3, 4, 4).contiguous()
    solarized = apply_colour_op(image, "solarize", 5)  # threshold int(256 * 0.5) = 128
    assert solarized[0, 0].tolist() == [0, 100, 55, 0]
    posterized = apply_colour_op(image, "posterize", 9)  # bits 4 - int(3.6) = 1
    assert set(posterized.unique().tolist()) <= {0, 128}
    assert torch.equal(apply_colour_op(image, "brightness", 5), image)  # factor 1.8 * 0.5 + 0.1 = 1.0
    darker = apply_colour_op(image, "brightness", 1)  # factor 0.28
    assert darker[0, 0, 3].item() == round(255 * 0.28)
    for name in COLOUR_OPS:
        out = apply_colour_op(image, name, 3)
        assert out.dtype == torch.uint8 and out.shape == image.shape
    with pytest.raises(ValueError):
        apply_colour_op(image, "blur", 3)


def test_random_erase_patches():
    config = ViewConfig(erase_patches=(1, 4), erase_max_frac=0.2, fill=125)
    for seed in range(10):
        out = random_erase(torch.zeros(3, 100, 100, dtype=torch.uint8), config, np.random.default_rng(seed))
        erased = (out[0] == 125).float().mean().item()
        assert erased <= 4 * 0.2 * 0.2 + 1e-6
        assert ((out == 125) | (out == 0)).all()


def test_strong_view_changes_pixels_and_keeps_types():
    """Over several seeds the strong view's pixels differ from the same image after the same resize/flip alone
    (colour op, geometric op, erasing applied); with identity colour, no erasing and a zero translation they do
    not. Types and sizes are kept."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 60, 80), dtype=torch.uint8, generator=generator)
    box, label = torch.tensor([[10.0, 10.0, 40.0, 40.0]]), torch.tensor([2])
    plain = ViewConfig(**SMALL, colour_ops=("identity",), erase_patches=(0, 0), geometric_ops=("translate_x",),
                       translate_frac=0.0)
    for seed in range(8):
        for config, changed in ((ViewConfig(**SMALL), True), (plain, False)):
            strong = StrongTransform(config)(image, box, label, np.random.default_rng(seed))
            resized = WeakTransform(config)(image, box, label, np.random.default_rng(seed))  # same resize/flip
            assert strong.size == resized.size and strong.image.dtype == torch.uint8
            same = torch.equal(strong.image, resized.image)
            assert same is not changed, f"seed {seed}: strong pixels {'equal' if same else 'differ from'} resized"
            if not changed:
                torch.testing.assert_close(strong.matrix, resized.matrix)
                torch.testing.assert_close(strong.boxes, resized.boxes)
    weak, strong, weak_to_strong = UnlabeledPairTransform(ViewConfig(**SMALL))(image, box, label,
                                                                               np.random.default_rng(0))
    assert weak.image.dtype == strong.image.dtype == torch.uint8
    assert weak_to_strong.shape == (3, 3) and weak_to_strong.dtype == torch.float64
    assert min(weak.size) in SMALL["scales"] and min(strong.size) in SMALL["scales"]


def test_config_validation_and_scaling():
    with pytest.raises(ValueError):
        ViewConfig(colour_ops=("nope",))
    with pytest.raises(ValueError):
        ViewConfig(scales=(900,), max_size=800)
    small = ViewConfig().scaled(0.3)
    assert min(small.scales) == 144 and max(small.scales) == 240 and small.max_size == 400
