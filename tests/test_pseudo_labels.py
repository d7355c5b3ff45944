import math

import numpy as np
import pytest
import torch
from conftest import crowded_one_to_many_outputs

from sparse_semi_detr_hf.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from sparse_semi_detr_hf.training.pseudo_labels import (
    map_boxes_with_matrix,
    pseudo_label_quality,
    pseudo_labels_to_strong_view,
    select_pseudo_labels,
)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """cxcywh normalized boxes well inside the image."""
    centres = 0.3 + 0.4 * torch.rand(n, 2, generator=generator)
    sizes = 0.05 + 0.2 * torch.rand(n, 2, generator=generator)
    return torch.cat([centres, sizes], dim=1)


# ---------------------------------------------------------------- selection


def test_threshold_keeps_exactly_pairs_at_or_above_tau():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 30, 5, generator=generator) * 2
    boxes = _random_boxes(60, generator).view(2, 30, 4)
    threshold = 0.4
    out = select_pseudo_labels(logits, boxes, threshold=threshold, max_per_image=1000)
    scores = logits.sigmoid()
    for image, result in enumerate(out):
        query, label = torch.nonzero(scores[image] >= threshold, as_tuple=True)
        expected = sorted(zip(query.tolist(), label.tolist()))
        assert result["scores"].shape[0] == len(expected) > 0
        # Recover each kept pair from its box (unique per query) and label.
        got = []
        for box, cls, score in zip(result["boxes"], result["class_labels"], result["scores"]):
            q = int(torch.nonzero((boxes[image] == box).all(-1))[0])
            got.append((q, int(cls)))
            torch.testing.assert_close(score, scores[image, q, cls])
        assert sorted(got) == expected
        assert torch.all(result["scores"][:-1] >= result["scores"][1:])
        assert result["class_labels"].dtype == torch.long


def test_one_query_can_give_several_labels_and_top_k_limits():
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 2, 0] = _logit(0.9)
    logits[0, 2, 2] = _logit(0.8)
    logits[0, 1, 1] = _logit(0.7)
    logits[0, 3, 1] = 0.0  # sigmoid(0) == 0.5 exactly: kept at threshold 0.5, not above it
    boxes = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    out = select_pseudo_labels(logits, boxes, threshold=0.5)[0]
    assert out["class_labels"].tolist() == [0, 2, 1, 1]
    torch.testing.assert_close(out["boxes"], boxes[0, [2, 2, 1, 3]])
    assert select_pseudo_labels(logits, boxes, threshold=0.5000001)[0]["class_labels"].tolist() == [0, 2, 1]
    top2 = select_pseudo_labels(logits, boxes, threshold=0.5, max_per_image=2)[0]
    assert top2["class_labels"].tolist() == [0, 2]


def test_class_wise_nms_removes_same_class_duplicates_only():
    box = torch.tensor([0.5, 0.5, 0.2, 0.2])
    shifted = torch.tensor([0.505, 0.5, 0.2, 0.2])  # IoU ~0.95 with box
    far = torch.tensor([0.2, 0.2, 0.1, 0.1])
    boxes = torch.stack([box, shifted, shifted, far])[None]
    logits = torch.full((1, 4, 2), -10.0)
    logits[0, 0, 0] = _logit(0.9)  # class 0
    logits[0, 1, 0] = _logit(0.8)  # class 0 duplicate of query 0 -> removed
    logits[0, 2, 1] = _logit(0.7)  # class 1, same place -> kept
    logits[0, 3, 0] = _logit(0.6)  # class 0 elsewhere -> kept
    without = select_pseudo_labels(logits, boxes, threshold=0.5)[0]
    assert without["scores"].numel() == 4
    with_nms = select_pseudo_labels(logits, boxes, threshold=0.5, class_nms_iou=0.6)[0]
    torch.testing.assert_close(with_nms["scores"], torch.tensor([0.9, 0.7, 0.6]))
    assert with_nms["class_labels"].tolist() == [0, 1, 0]
    torch.testing.assert_close(with_nms["boxes"], boxes[0, [0, 2, 3]])


def test_nms_comes_before_the_cap_so_duplicates_do_not_crowd_out_objects():
    """Bug fixed: the top ``max_per_image`` pairs were taken before the class-wise NMS, so in the one-to-many stage
    an image with more than ``max_per_image / duplicates`` confident objects lost whole objects (30 objects x 13
    copies, cap 300: 24 pseudo-labels). Semi-DETR's ``multiclass_nms`` caps after the NMS: all 30."""
    logits, boxes = crowded_one_to_many_outputs()
    out = select_pseudo_labels(logits, boxes, threshold=0.4, class_nms_iou=0.6, max_per_image=300)[0]
    assert len(out["scores"]) == 30
    torch.testing.assert_close(out["boxes"], boxes[0, ::13])  # the best copy of each object
    capped = select_pseudo_labels(logits, boxes, threshold=0.4, class_nms_iou=0.6, max_per_image=10)[0]
    torch.testing.assert_close(capped["scores"], out["scores"][:10])  # the cap keeps the 10 best after NMS
    no_nms = select_pseudo_labels(logits, boxes, threshold=0.4, max_per_image=300)[0]
    assert len(no_nms["scores"]) == 300


def test_mean_std_filter():
    probs = torch.tensor([0.95, 0.9, 0.45, 0.42, 0.41, 0.02, 0.005])
    logits = torch.full((1, 7, 1), 0.0)
    logits[0, :, 0] = torch.log(probs / (1 - probs))
    boxes = _random_boxes(7, torch.Generator().manual_seed(1))[None]
    plain = select_pseudo_labels(logits, boxes, threshold=0.4)[0]
    assert plain["scores"].numel() == 5
    filtered = select_pseudo_labels(logits, boxes, threshold=0.4, mean_std_filter=True)[0]
    candidates = probs[probs >= 0.01]  # 0.005 is below Semi-DETR's score floor
    cut = candidates.mean() + candidates.std(correction=0)
    expected = probs[(probs >= cut) & (probs >= 0.4)]
    assert 0 < expected.numel() < 5
    torch.testing.assert_close(filtered["scores"], expected)


def test_selection_empty_inputs():
    out = select_pseudo_labels(torch.full((2, 5, 3), -10.0), torch.rand(2, 5, 4), class_nms_iou=0.6)
    assert len(out) == 2
    for result in out:
        assert result["boxes"].shape == (0, 4)
        assert result["class_labels"].shape == result["scores"].shape == (0,)
    assert select_pseudo_labels(torch.zeros(0, 5, 3), torch.zeros(0, 5, 4)) == []
    assert select_pseudo_labels(torch.zeros(1, 0, 3), torch.zeros(1, 0, 4))[0]["boxes"].shape == (0, 4)
    filtered = select_pseudo_labels(torch.full((1, 5, 3), -10.0), torch.rand(1, 5, 4), mean_std_filter=True)
    assert filtered[0]["scores"].numel() == 0


# ---------------------------------------------------------------- matrix mapping


def _affine(angle_deg=0.0, scale=(1.0, 1.0), translate=(0.0, 0.0), shear=0.0, centre=(50.0, 40.0)):
    """A 3x3 pixel transform: rotate/scale/shear around ``centre``, then translate."""
    a = math.radians(angle_deg)
    to_origin = torch.tensor([[1, 0, -centre[0]], [0, 1, -centre[1]], [0, 0, 1.0]], dtype=torch.float64)
    back = torch.tensor([[1, 0, centre[0] + translate[0]], [0, 1, centre[1] + translate[1]], [0, 0, 1.0]],
                        dtype=torch.float64)
    rotate = torch.tensor([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]],
                          dtype=torch.float64)
    scale_m = torch.diag(torch.tensor([scale[0], scale[1], 1.0], dtype=torch.float64))
    shear_m = torch.tensor([[1, shear, 0], [0, 1, 0], [0, 0, 1.0]], dtype=torch.float64)
    return back @ rotate @ shear_m @ scale_m @ to_origin


def test_identity_mapping():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0], [0.0, 0.0, 100.0, 80.0]])
    mapped, keep = map_boxes_with_matrix(boxes, torch.eye(3), (80, 100))
    torch.testing.assert_close(mapped, boxes)
    assert keep.all()


def test_flip_mapping():
    width = 100.0
    flip = torch.tensor([[-1.0, 0, width], [0, 1, 0], [0, 0, 1]])
    boxes = torch.tensor([[10.0, 20.0, 30.0, 50.0]])
    mapped, keep = map_boxes_with_matrix(boxes, flip, (80, 100))
    torch.testing.assert_close(mapped, torch.tensor([[70.0, 20.0, 90.0, 50.0]]))
    assert keep.all()


def test_scale_mapping():
    scale = torch.diag(torch.tensor([2.0, 0.5, 1.0]))
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    mapped, keep = map_boxes_with_matrix(boxes, scale, (100, 200))
    torch.testing.assert_close(mapped, torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    assert keep.all()


def test_rotation_mapping_takes_corner_min_max():
    # 90 degrees around (50, 50): (x, y) -> (100 - y, x) (y axis down, so this is a rotation in pixel space).
    rot90 = torch.tensor([[0.0, -1.0, 100.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    mapped, keep = map_boxes_with_matrix(boxes, rot90, (100, 100))
    torch.testing.assert_close(mapped, torch.tensor([[40.0, 10.0, 80.0, 30.0]]))
    # 45 degrees: a square of side s becomes an axis-aligned box of side s * sqrt(2) around the mapped centre.
    square = torch.tensor([[40.0, 30.0, 60.0, 50.0]])
    matrix = _affine(angle_deg=45.0, centre=(50.0, 40.0)).float()
    mapped, keep = map_boxes_with_matrix(square, matrix, (200, 200))
    half = 10.0 * math.sqrt(2)
    torch.testing.assert_close(mapped, torch.tensor([[50 - half, 40 - half, 50 + half, 40 + half]]))
    assert keep.all()


def test_clipping_and_dropping():
    shift = torch.tensor([[1.0, 0.0, 60.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    boxes = torch.tensor(
        [
            [10.0, 10.0, 30.0, 30.0],  # -> 70..90: inside
            [30.0, 10.0, 50.0, 30.0],  # -> 90..110: clipped to 90..100
            [50.0, 10.0, 70.0, 30.0],  # -> 110..130: outside, dropped
            [39.5, 10.0, 41.5, 30.0],  # -> 99.5..101.5: 0.5 px left after clipping, dropped
        ]
    )
    mapped, keep = map_boxes_with_matrix(boxes, shift, (50, 100))
    assert keep.tolist() == [True, True, False, False]
    torch.testing.assert_close(mapped[:2], torch.tensor([[70.0, 10.0, 90.0, 30.0], [90.0, 10.0, 100.0, 30.0]]))
    assert (mapped[:, 0::2] <= 100).all() and (mapped >= 0).all()
    assert mapped.shape == (4, 4)


def test_mapping_empty():
    mapped, keep = map_boxes_with_matrix(torch.zeros(0, 4), torch.eye(3), (10, 10))
    assert mapped.shape == (0, 4) and keep.shape == (0,) and keep.dtype == torch.bool


# ---------------------------------------------------------------- weak -> strong


def _reference_weak_to_strong(boxes_cxcywh, weak_hw, strong_hw, matrix, min_size=1.0):
    """Independent numpy reference: weak xyxy pixels (clipped to the weak image), the enclosing box of its 4 corners
    sent through ``matrix`` (clipped to the strong image) and whether it keeps ``min_size`` on both sides."""
    cx, cy, bw, bh = boxes_cxcywh.double().numpy().T
    (h, w), (sh, sw) = weak_hw, strong_hw
    weak = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1) * [w, h, w, h]
    weak = np.clip(weak, 0.0, [w, h, w, h])
    corners = np.stack([weak[:, [0, 1]], weak[:, [2, 1]], weak[:, [0, 3]], weak[:, [2, 3]]], axis=1)  # (n, 4, 2)
    m = matrix.double().numpy()
    mapped = corners @ m[:2, :2].T + m[:2, 2]
    strong = np.clip(np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1), 0.0, [sw, sh, sw, sh])
    keep = (strong[:, 2] - strong[:, 0] >= min_size) & (strong[:, 3] - strong[:, 1] >= min_size)
    return weak, strong, keep


def test_weak_to_strong_round_trip_random_affines():
    """Strong boxes are the clipped enclosing boxes of the 4 mapped weak corners (numpy reference), labels and
    scores follow them, and unclipped centres map back onto the weak centres."""
    generator = torch.Generator().manual_seed(3)
    weak_sizes = torch.tensor([[80, 100], [120, 90], [64, 64]])
    strong_sizes = torch.tensor([[160, 200], [240, 180], [64, 64]])
    matrices, pseudo = [], []
    for image in range(3):
        h, w = weak_sizes[image].tolist()
        sh, sw = strong_sizes[image].tolist()
        resize = torch.diag(torch.tensor([sw / w, sh / h, 1.0], dtype=torch.float64))
        geometry = _affine(
            angle_deg=float(torch.empty(1).uniform_(-30, 30, generator=generator)),
            translate=tuple(torch.empty(2).uniform_(-5, 5, generator=generator).tolist()),
            shear=float(torch.empty(1).uniform_(-0.3, 0.3, generator=generator)),
            centre=(sw / 2, sh / 2),
        )
        matrices.append((geometry @ resize).float())
        n = 6
        pseudo.append(
            {
                "class_labels": torch.randint(0, 3, (n,), generator=generator),
                "boxes": _random_boxes(n, generator),
                "scores": torch.rand(n, generator=generator),
            }
        )
    weak_to_strong = torch.stack(matrices)
    strong, weak_xyxy = pseudo_labels_to_strong_view(pseudo, weak_sizes, strong_sizes, weak_to_strong)
    assert len(strong) == len(weak_xyxy) == 3
    for image in range(3):
        h, w = weak_sizes[image].tolist()
        sh, sw = strong_sizes[image].tolist()
        kept = strong[image]
        n_kept = kept["boxes"].shape[0]
        assert weak_xyxy[image].shape == (n_kept, 4) and n_kept > 0
        # Each strong box is the corner min/max of its weak box; mapping its centre back lands on the weak centre
        # (affine maps keep the centre of a parallelogram), as long as nothing was clipped.
        strong_abs = box_cxcywh_to_xyxy(kept["boxes"]) * torch.tensor([sw, sh, sw, sh])
        ref_weak, ref_strong, ref_keep = _reference_weak_to_strong(pseudo[image]["boxes"], (h, w), (sh, sw),
                                                                   weak_to_strong[image])
        assert n_kept == int(ref_keep.sum())
        np.testing.assert_allclose(weak_xyxy[image].double().numpy(), ref_weak[ref_keep], atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(strong_abs.double().numpy(), ref_strong[ref_keep], atol=1e-3, rtol=1e-5)
        inverse = torch.linalg.inv(weak_to_strong[image].double()).float()
        centres = torch.cat([box_xyxy_to_cxcywh(strong_abs)[:, :2], torch.ones(n_kept, 1)], dim=1)
        back = (centres @ inverse.T)[:, :2]
        unclipped = (strong_abs[:, :2] > 0).all(1) & (strong_abs[:, 2] < sw) & (strong_abs[:, 3] < sh)
        assert unclipped.any()
        torch.testing.assert_close(back[unclipped], box_xyxy_to_cxcywh(weak_xyxy[image])[unclipped, :2],
                                   atol=1e-3, rtol=1e-4)
        assert (kept["boxes"] >= 0).all() and (kept["boxes"] <= 1).all()
        # labels/scores follow their boxes
        source = pseudo[image]
        weak_norm = box_xyxy_to_cxcywh(weak_xyxy[image] / torch.tensor([w, h, w, h]))
        for box, cls, score in zip(weak_norm, kept["class_labels"], kept["scores"]):
            index = int(torch.argmin((source["boxes"] - box).abs().sum(-1)))
            assert int(source["class_labels"][index]) == int(cls)
            torch.testing.assert_close(source["scores"][index], score)


def test_weak_to_strong_identity_and_drops():
    sizes = torch.tensor([[100, 100]])
    pseudo = [
        {
            "class_labels": torch.tensor([1, 2, 0]),
            # inside; mapped out of the strong view; sticking out of the weak view (clipped there first)
            "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.95, 0.5, 0.2, 0.2]]),
            "scores": torch.tensor([0.9, 0.8, 0.7]),
        }
    ]
    shift_left = torch.tensor([[[1.0, 0.0, -30.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    strong, weak = pseudo_labels_to_strong_view(pseudo, sizes, sizes, shift_left)
    assert strong[0]["class_labels"].tolist() == [1, 0]
    torch.testing.assert_close(strong[0]["boxes"], torch.tensor([[0.2, 0.5, 0.2, 0.4], [0.625, 0.5, 0.15, 0.2]]))
    torch.testing.assert_close(weak[0], torch.tensor([[40.0, 30.0, 60.0, 70.0], [85.0, 40.0, 100.0, 60.0]]))
    torch.testing.assert_close(strong[0]["scores"], torch.tensor([0.9, 0.7]))


def test_weak_to_strong_empty():
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "scores": torch.zeros(0)}
    sizes = torch.tensor([[10, 10], [20, 20]])
    strong, weak = pseudo_labels_to_strong_view([empty, empty], sizes, sizes, torch.eye(3).repeat(2, 1, 1))
    assert [t["boxes"].shape for t in strong] == [(0, 4), (0, 4)]
    assert [w.shape for w in weak] == [(0, 4), (0, 4)]
    assert pseudo_labels_to_strong_view([], torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 3, 3)) == ([], [])


# ---------------------------------------------------------------- quality


def test_pseudo_label_quality():
    gt = [{"class_labels": torch.tensor([0, 1, 2]), "boxes": torch.tensor(
        [[0.2, 0.2, 0.1, 0.1], [0.6, 0.6, 0.2, 0.2], [0.8, 0.3, 0.1, 0.1]])}]
    pseudo = [
        {
            "class_labels": torch.tensor([0, 0, 2, 1]),
            "boxes": torch.tensor(
                [
                    [0.2, 0.2, 0.1, 0.1],  # TP (class 0)
                    [0.201, 0.2, 0.1, 0.1],  # duplicate of the same gt: FP
                    [0.6, 0.6, 0.2, 0.2],  # right place, wrong class: FP
                    [0.5, 0.5, 0.05, 0.05],  # class 1 but IoU < 0.5: FP
                ]
            ),
            "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
        }
    ]
    quality = pseudo_label_quality(pseudo, gt, iou=0.5)
    assert quality["num_pseudo"] == 4 and quality["num_gt"] == 3 and quality["num_true_positive"] == 1
    assert quality["precision"] == pytest.approx(0.25)
    assert quality["recall"] == pytest.approx(1 / 3)


def test_pseudo_label_quality_empty():
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    one = {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}
    assert pseudo_label_quality([empty], [one]) == pytest.approx(
        {"precision": 1.0, "recall": 0.0, "num_pseudo": 0.0, "num_gt": 1.0, "num_true_positive": 0.0})
    assert pseudo_label_quality([one], [empty])["precision"] == 0.0
    assert pseudo_label_quality([], [])["recall"] == 1.0
