"""Tests of the Hungarian matcher, the one-to-many assignment and Reliable Pseudo-Label Filtering (tiny, CPU)."""

import itertools

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from sparse_semi_detr_hf.matcher import (
    HungarianMatcher,
    duplicates_from_candidates,
    jitter_boxes,
    one_to_many_assign,
    rpf_assign,
    rpf_candidates,
    rpf_duplicate_pseudo_labels,
)


def random_boxes(n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 4)`` cxcywh boxes well inside the unit square."""
    centre = 0.25 + 0.5 * torch.rand(n, 2, generator=generator)
    size = 0.05 + 0.4 * torch.rand(n, 2, generator=generator)
    return torch.cat([centre, size], dim=-1)


def random_problem(batch: int, queries: int, classes: int, sizes: list[int], seed: int):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=generator)
    boxes = random_boxes(batch * queries, generator).view(batch, queries, 4)
    targets = [{"class_labels": torch.randint(classes, (n,), generator=generator),
                "boxes": random_boxes(n, generator)} for n in sizes]
    return logits, boxes, targets


def xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def brute_force_optimum(cost: torch.Tensor) -> float:
    """Minimum total cost of a maximal one-to-one assignment of a small ``(Q, n)`` matrix."""
    queries, targets = cost.shape
    if queries >= targets:
        return min(sum(cost[p, j].item() for j, p in enumerate(perm))
                   for perm in itertools.permutations(range(queries), targets))
    return min(sum(cost[i, p].item() for i, p in enumerate(perm))
               for perm in itertools.permutations(range(targets), queries))


# ---------------------------------------------------------------- Hungarian


def test_hungarian_matches_brute_force_optimum():
    matcher = HungarianMatcher()
    for seed in range(40):
        generator = torch.Generator().manual_seed(1000 + seed)
        queries = int(torch.randint(1, 6, (1,), generator=generator))
        num_targets = int(torch.randint(1, 5, (1,), generator=generator))
        logits, boxes, targets = random_problem(1, queries, 3, [num_targets], seed)
        (pred_idx, tgt_idx), = matcher(logits, boxes, targets)
        cost = matcher.cost_matrix(logits[0], boxes[0], targets[0]["class_labels"], targets[0]["boxes"])
        assert len(pred_idx) == min(queries, num_targets)
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(tgt_idx.tolist())) == len(tgt_idx)
        assert cost[pred_idx, tgt_idx].sum().item() == pytest.approx(brute_force_optimum(cost), abs=1e-5)


def test_batched_matching_equals_per_image_matching():
    matcher = HungarianMatcher()
    logits, boxes, targets = random_problem(3, 7, 4, [3, 0, 5], seed=0)
    batched = matcher(logits, boxes, targets)
    for b in range(3):
        (pred_single, tgt_single), = matcher(logits[b:b + 1], boxes[b:b + 1], targets[b:b + 1])
        torch.testing.assert_close(batched[b][0], pred_single)
        torch.testing.assert_close(batched[b][1], tgt_single)


def test_zero_targets_give_zero_matches():
    matcher = HungarianMatcher()
    logits, boxes, targets = random_problem(2, 5, 3, [0, 0], seed=1)
    for pred_idx, tgt_idx in matcher(logits, boxes, targets):
        assert pred_idx.numel() == 0 and tgt_idx.numel() == 0 and pred_idx.dtype == torch.long
    logits, boxes, targets = random_problem(2, 5, 3, [0, 2], seed=1)
    matched = matcher(logits, boxes, targets)
    assert matched[0][0].numel() == 0 and matched[1][0].numel() == 2


def test_nan_and_inf_predictions_do_not_crash_linear_sum_assignment():
    """Regression: NaN/inf logits or boxes made scipy raise "matrix contains invalid numeric entries"."""
    matcher = HungarianMatcher()
    logits, boxes, targets = random_problem(1, 5, 3, [3], seed=2)
    logits[0, 0] = float("nan")
    boxes[0, 1] = float("inf")
    boxes[0, 2, 0] = float("nan")
    (pred_idx, tgt_idx), = matcher(logits, boxes, targets)
    assert len(pred_idx) == 3 and {3, 4} <= set(pred_idx.tolist())  # the finite predictions are used first
    # with enough finite predictions, the broken ones are never chosen
    logits, boxes, targets = random_problem(1, 6, 3, [2], seed=3)
    logits[0, 0] = float("nan")
    boxes[0, 1] = float("inf")
    (pred_idx, _), = matcher(logits, boxes, targets)
    assert set(pred_idx.tolist()).isdisjoint({0, 1})


def test_half_precision_inputs_are_matched_in_fp32():
    matcher = HungarianMatcher()
    logits, boxes, targets = random_problem(2, 6, 3, [2, 3], seed=4)
    logits, boxes = logits.bfloat16(), boxes.bfloat16()
    half = matcher(logits, boxes, targets)  # scipy cannot take bfloat16: the cost must be fp32
    full = matcher(logits.float(), boxes.float(), targets)
    for (pred_half, tgt_half), (pred_full, tgt_full) in zip(half, full):
        torch.testing.assert_close(pred_half, pred_full)
        torch.testing.assert_close(tgt_half, tgt_full)


def test_hungarian_cost_equals_transformers_deformable_detr_matcher():
    module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    reference = module.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    matcher = HungarianMatcher(2, 5, 2, focal_alpha=0.25, focal_gamma=2.0)
    for seed in range(5):
        logits, boxes, targets = random_problem(2, 8, 5, [3, 4], seed=50 + seed)
        ours = matcher(logits, boxes, targets)
        theirs = reference({"logits": logits, "pred_boxes": boxes}, targets)
        for b, target in enumerate(targets):
            cost = matcher.cost_matrix(logits[b], boxes[b], target["class_labels"], target["boxes"])
            torch.testing.assert_close(cost[ours[b][0], ours[b][1]].sum(), cost[theirs[b][0], theirs[b][1]].sum())
    # and the cost itself: recompute the transformers formula for one pair of sets
    from transformers.loss.loss_for_object_detection import generalized_box_iou as hf_giou

    logits, boxes, targets = random_problem(1, 4, 3, [3], seed=9)
    prob, labels, tgt = logits[0].sigmoid(), targets[0]["class_labels"], targets[0]["boxes"]
    neg = 0.75 * prob**2 * -(1 - prob + 1e-8).log()
    pos = 0.25 * (1 - prob) ** 2 * -(prob + 1e-8).log()
    expected = 2 * (pos[:, labels] - neg[:, labels]) + 5 * torch.cdist(boxes[0], tgt, p=1)
    expected = expected - 2 * hf_giou(xyxy(boxes[0]), xyxy(tgt))
    torch.testing.assert_close(matcher.cost_matrix(logits[0], boxes[0], labels, tgt), expected)


# ---------------------------------------------------------------- one-to-many


def reference_one_to_many(logits, boxes, labels, tgt_boxes, topk, alpha, beta):
    """Loop implementation of the TOOD assignment: {pred: (target, weight)}."""
    scores = logits.sigmoid()[:, labels]
    iou = box_iou(xyxy(boxes), xyxy(tgt_boxes))
    t = scores**alpha * iou**beta
    claims = {}
    for j in range(len(labels)):
        ranked = sorted(range(len(boxes)), key=lambda i: -t[i, j].item())[:topk]
        for i in ranked:
            if t[i, j] > 0:
                claims.setdefault(i, []).append(j)
    owner = {i: max(js, key=lambda j: iou[i, j].item()) for i, js in claims.items()}
    result = {}
    for j in range(len(labels)):
        mine = [i for i, o in owner.items() if o == j]
        if mine:
            max_t, max_iou = max(t[i, j] for i in mine), max(iou[i, j] for i in mine)
            result.update({i: (j, (t[i, j] / max_t * max_iou).item()) for i in mine})
    return result


def as_dict(assignment):
    return {int(i): (int(j), float(w)) for i, j, w in zip(*assignment)}


def test_one_to_many_hand_made_topk_and_conflict():
    # two overlapping targets of different classes; p2 lies between them, closer to B
    targets = [{"class_labels": torch.tensor([0, 1]),
                "boxes": torch.tensor([[0.30, 0.5, 0.2, 0.2], [0.40, 0.5, 0.2, 0.2]])}]
    boxes = torch.tensor([[[0.30, 0.5, 0.2, 0.2],   # p0: exactly A
                           [0.31, 0.5, 0.2, 0.2],   # p1: near A
                           [0.37, 0.5, 0.2, 0.2],   # p2: between, closer to B
                           [0.40, 0.5, 0.2, 0.2],   # p3: exactly B
                           [0.80, 0.1, 0.1, 0.1],   # p4: far away
                           [0.10, 0.9, 0.1, 0.1]]])  # p5: far away
    logits = torch.full((1, 6, 2), 2.0)
    logits[0, 1, 0] = -5.0  # p1 unsure of class 0: ranked below p2 for A despite a larger IoU
    (assignment,) = one_to_many_assign(logits, boxes, targets, topk=2, alpha=1.0, beta=6.0)
    got = as_dict(assignment)
    assert len(assignment.pred_idx) == len(got)  # every prediction assigned at most once
    # A's top-2 by t: p0 and p2; B's top-2: p3 and p2 -> p2 goes to B (larger IoU); p1 is only 3rd for A
    assert {i: j for i, (j, _) in got.items()} == {0: 0, 2: 1, 3: 1}
    assert got[0][1] == pytest.approx(1.0) and got[3][1] == pytest.approx(1.0)  # best positive: weight = max IoU = 1
    expected = reference_one_to_many(logits[0], boxes[0], targets[0]["class_labels"], targets[0]["boxes"], 2, 1, 6)
    assert got.keys() == expected.keys()
    for i, (j, w) in expected.items():
        assert got[i][0] == j and got[i][1] == pytest.approx(w, rel=1e-5)


def test_one_to_many_matches_reference_on_random_problems_and_weights_are_normalized():
    for seed in range(10):
        logits, boxes, targets = random_problem(1, 12, 3, [4], seed=200 + seed)
        (assignment,) = one_to_many_assign(logits, boxes, targets, topk=3, alpha=1.0, beta=6.0)
        got = as_dict(assignment)
        expected = reference_one_to_many(logits[0], boxes[0], targets[0]["class_labels"], targets[0]["boxes"],
                                         3, 1.0, 6.0)
        assert got.keys() == expected.keys()
        for i, (j, w) in expected.items():
            assert got[i][0] == j and got[i][1] == pytest.approx(w, rel=1e-4, abs=1e-12)
        iou = box_iou(xyxy(boxes[0]), xyxy(targets[0]["boxes"]))
        for j in assignment.tgt_idx.unique().tolist():
            mine = assignment.tgt_idx == j
            max_iou = iou[assignment.pred_idx[mine], j].max()
            torch.testing.assert_close(assignment.weight[mine].max(), max_iou)


def test_one_to_many_empty_targets_and_fewer_queries_than_topk():
    logits, boxes, targets = random_problem(2, 3, 2, [0, 2], seed=5)
    empty, small = one_to_many_assign(logits, boxes, targets, topk=13)
    assert empty.pred_idx.numel() == 0 and empty.weight.numel() == 0
    assert small.pred_idx.numel() <= 3 and len(set(small.pred_idx.tolist())) == small.pred_idx.numel()


# ---------------------------------------------------------------- RPF


def controlled_rpf_problem(seed: int, groups: int = 6, jitter: float = 0.25):
    """One pseudo-box; prediction g sits exactly on copy g of the box (copies from the same seeded generator)."""
    box = torch.tensor([[0.5, 0.5, 0.3, 0.3]])
    copies = jitter_boxes(box, groups, jitter, torch.Generator().manual_seed(seed))[:, 0]
    far = torch.tensor([[0.05, 0.05, 0.05, 0.05], [0.95, 0.95, 0.05, 0.05]])
    boxes = torch.cat([copies, far])[None]
    logits = torch.tensor([-1.0, 3.0, 0.0, 2.0, 1.0, -2.0, 4.0, 4.0])[None, :, None]
    targets = [{"class_labels": torch.tensor([0]), "boxes": box, "scores": torch.tensor([0.9])}]
    return logits, boxes, targets


def test_jitter_boxes_keeps_group_zero_and_stays_in_image():
    boxes = torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.95, 0.05, 0.1, 0.1]])
    copies = jitter_boxes(boxes, 4, 0.1, torch.Generator().manual_seed(0))
    assert copies.shape == (4, 2, 4)
    torch.testing.assert_close(copies[0], boxes)
    corners = xyxy(copies[1:].reshape(-1, 4))
    assert corners.min() >= 0 and corners.max() <= 1
    assert ((copies[1:, 0] - boxes[0]).abs() <= 0.1 * 0.3 + 1e-6).all()


def test_rpf_topk_by_alignment_are_positives_and_the_rest_duplicates():
    logits, boxes, targets = controlled_rpf_problem(seed=7)
    geometric = HungarianMatcher(class_cost=0.0)
    (candidate,) = rpf_candidates(logits, boxes, targets, groups=6, jitter=0.25,
                                  generator=torch.Generator().manual_seed(7), matcher=geometric)
    assert candidate[:, 0].tolist() == [True] * 6 + [False] * 2
    ((assignment, duplicate),) = rpf_assign(logits, boxes, targets, groups=6, topk=4, jitter=0.25,
                                            generator=torch.Generator().manual_seed(7), matcher=geometric)
    t = logits[0, :6, 0].sigmoid() * box_iou(xyxy(boxes[0, :6]), xyxy(targets[0]["boxes"]))[:, 0] ** 6
    ranked = t.argsort(descending=True).tolist()
    assert sorted(assignment.pred_idx.tolist()) == sorted(ranked[:4])
    assert duplicate.nonzero()[:, 0].tolist() == sorted(ranked[4:])
    assert not duplicate[6:].any()  # far predictions are background, not duplicates
    iou = box_iou(xyxy(boxes[0, :6]), xyxy(targets[0]["boxes"]))[:, 0]
    positives = assignment.pred_idx
    torch.testing.assert_close(assignment.weight, t[positives] / t[positives].max() * iou[positives].max())


def test_rpf_zero_targets_and_fewer_queries_than_topk():
    logits, boxes, targets = random_problem(2, 3, 2, [0, 1], seed=8)
    targets[1]["scores"] = torch.tensor([0.8])
    (empty, empty_dup), (one, one_dup) = rpf_assign(logits, boxes, targets, groups=6, topk=4,
                                                    generator=torch.Generator().manual_seed(0))
    assert empty.pred_idx.numel() == 0 and not empty_dup.any() and empty_dup.shape == (3,)
    assert one.pred_idx.numel() <= 3 and not (one_dup & torch.isin(torch.arange(3), one.pred_idx)).any()
    masks = rpf_duplicate_pseudo_labels(logits, boxes, targets, generator=torch.Generator().manual_seed(0))
    assert masks[0].shape == (0,) and masks[1].tolist() == [False]


def test_duplicates_from_candidates_hand_made():
    # boxes: 0 (score .9) and 1 (score .6) overlap strongly, same class; 2 same place, other class; 3 elsewhere
    target = {"class_labels": torch.tensor([0, 0, 1, 0]), "scores": torch.tensor([0.9, 0.6, 0.95, 0.8]),
              "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.51, 0.5, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3],
                                     [0.1, 0.1, 0.1, 0.1]])}
    candidate = torch.zeros(6, 4, dtype=torch.bool)
    candidate[[0, 1, 2], 0] = True   # box 0 claims p0, p1, p2
    candidate[[1, 2], 1] = True      # box 1's candidates are all claimed by box 0
    candidate[[0, 1, 2], 2] = True   # box 2 (other class, higher score) claims all of box 0's predictions
    candidate[[5], 3] = True
    t = torch.full((6, 4), 0.5)
    assert duplicates_from_candidates(candidate, t, target, topk=4, duplicate_iou=0.7).tolist() == [
        False, True, False, False]
    # box 1 keeps a positive that box 0 never claimed -> not a duplicate
    candidate[4, 1] = True
    assert not duplicates_from_candidates(candidate, t, target, topk=4, duplicate_iou=0.7).any()
    # ... unless that prediction falls outside box 1's top-k
    t[4, 1] = 0.1
    assert duplicates_from_candidates(candidate, t, target, topk=2, duplicate_iou=0.7).tolist() == [
        False, True, False, False]
    # a lower IoU threshold than the overlap is required
    assert not duplicates_from_candidates(candidate, t, target, topk=2, duplicate_iou=0.99).any()


@pytest.mark.parametrize("joint", [True, False])
def test_rpf_duplicate_pseudo_labels_drops_lower_scoring_copy_end_to_end(joint):
    # pseudo-boxes: A (0.9) and its near copy A' (0.6), same class; B: same place, another class; C elsewhere
    box_a = [0.5, 0.5, 0.3, 0.3]
    target = {"class_labels": torch.tensor([0, 0, 1, 0]), "scores": torch.tensor([0.9, 0.6, 0.7, 0.8]),
              "boxes": torch.tensor([box_a, [0.505, 0.5, 0.3, 0.3], box_a, [0.15, 0.15, 0.1, 0.1]])}
    boxes = torch.tensor([[0.495, 0.5, 0.3, 0.3], [0.505, 0.5, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3],
                          [0.15, 0.15, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05], [0.9, 0.1, 0.05, 0.05]])[None]
    logits = torch.full((1, 6, 2), -4.0)
    logits[0, :2, 0] = 3.0   # p0, p1: confident class 0 around A
    logits[0, 2, 1] = 3.0    # p2: class 1 at the same place
    logits[0, 3, 0] = 3.0    # p3: C
    (drop,) = rpf_duplicate_pseudo_labels(logits, boxes, [target], groups=12, topk=4, jitter=0.3, joint=joint,
                                          duplicate_iou=0.7, generator=torch.Generator().manual_seed(0))
    assert drop.tolist() == [False, True, False, False]


def test_rpf_joint_matching_gives_each_copy_its_own_prediction():
    """``joint``: the m copies share one assignment, so a box gets min(m, Q // n) distinct candidates and no two boxes
    share one; separately matched copies of a box mostly pick the same prediction (measured on the CPU study)."""
    logits, boxes, targets = random_problem(1, 20, 3, [2], seed=11)
    kwargs = dict(groups=6, jitter=0.1, matcher=HungarianMatcher())
    (joint,) = rpf_candidates(logits, boxes, targets, generator=torch.Generator().manual_seed(0), joint=True, **kwargs)
    (separate,) = rpf_candidates(logits, boxes, targets, generator=torch.Generator().manual_seed(0), **kwargs)
    assert joint.sum(0).tolist() == [6, 6] and joint.sum(1).max() == 1
    assert (separate.sum(0) <= 6).all() and (separate.sum(0) >= 1).all()
    (few,) = rpf_candidates(logits[:, :5], boxes[:, :5], targets, generator=torch.Generator().manual_seed(0),
                            joint=True, **kwargs)
    assert few.sum(0).tolist() == [2, 2]  # fewer predictions than copies: 5 // 2 copies of each box
    ((assignment, duplicate),) = rpf_assign(logits, boxes, targets, topk=4, joint=True,
                                            generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(assignment.pred_idx) <= 8 and not set(assignment.pred_idx.tolist()) & set(
        duplicate.nonzero()[:, 0].tolist())


# ---------------------------------------------------------------- RPF, joint matching (SPEC §4 revised, default)


def near_prediction_problem(predictions_near: int, seed: int = 0):
    """One pseudo-box with ``predictions_near`` predictions scattered tightly around it, 10 far ones."""
    generator = torch.Generator().manual_seed(seed)
    box = torch.tensor([[0.5, 0.5, 0.3, 0.3]])
    near = box + torch.cat([torch.rand(predictions_near, 2, generator=generator) * 0.04 - 0.02,
                            torch.rand(predictions_near, 2, generator=generator) * 0.04 - 0.02], dim=1)
    far = torch.tensor([[0.05 + 0.09 * i, 0.05, 0.04, 0.04] for i in range(10)])
    boxes = torch.cat([near, far])[None]
    logits = torch.randn(1, len(boxes[0]), 2, generator=generator)
    targets = [{"class_labels": torch.tensor([0]), "boxes": box, "scores": torch.tensor([0.9])}]
    return logits, boxes, targets


@pytest.mark.parametrize("near", [6, 8])
def test_joint_rpf_gives_k_positives_when_m_predictions_are_near(near):
    logits, boxes, targets = near_prediction_problem(near)
    ((assignment, duplicate),) = rpf_assign(logits, boxes, targets, groups=6, topk=4,
                                            generator=torch.Generator().manual_seed(0))
    assert len(assignment.pred_idx) == 4 and set(assignment.pred_idx.tolist()) <= set(range(near))
    assert int(duplicate.sum()) == 2 and not duplicate[near:].any()  # the other 2 of the 6 matched: duplicates
    (baseline,) = one_to_many_assign(logits, boxes, targets, topk=4)
    assert len(baseline.pred_idx) == 4


def one_best_prediction_problem():
    """One pseudo-box; p0 exactly on it and confident, p1..p7 just off it and less confident, p8..p11 far."""
    box = torch.tensor([[0.5, 0.5, 0.3, 0.3]])
    offsets = torch.tensor([[0.0, 0.0], [0.01, 0.0], [-0.01, 0.0], [0.0, 0.01], [0.0, -0.01], [0.015, 0.015],
                            [-0.015, 0.015], [0.015, -0.015]])
    near = torch.cat([box[:, :2] + offsets, box[:, 2:].expand(8, 2)], dim=1)
    far = torch.tensor([[0.05 + 0.09 * i, 0.05, 0.04, 0.04] for i in range(4)])
    logits = torch.full((1, 12, 2), -4.0)
    logits[0, 0, 0] = 4.0
    logits[0, 1:8, 0] = 1.0
    targets = [{"class_labels": torch.tensor([0]), "boxes": box, "scores": torch.tensor([0.9])}]
    return logits, torch.cat([near, far])[None], targets


def test_separate_rpf_gives_fewer_positives_than_joint_when_copies_pick_one_prediction():
    """Unjittered copies (jitter 0) matched separately all pick the best prediction p0: one candidate, one
    positive, no duplicate (and no fallback to the baseline's top-k). Matched jointly, the 6 copies take 6
    distinct near predictions: 4 positives (top-k) and 2 duplicates."""
    logits, boxes, targets = one_best_prediction_problem()
    kwargs = dict(groups=6, jitter=0.0)
    (separate,) = rpf_candidates(logits, boxes, targets, joint=False, generator=torch.Generator().manual_seed(0),
                                 **kwargs)
    (joint,) = rpf_candidates(logits, boxes, targets, joint=True, generator=torch.Generator().manual_seed(0), **kwargs)
    assert separate[:, 0].nonzero().flatten().tolist() == [0]
    assert int(joint.sum()) == 6 and set(joint[:, 0].nonzero().flatten().tolist()) <= set(range(8))
    ((alone, alone_duplicate),) = rpf_assign(logits, boxes, targets, topk=4, joint=False,
                                             generator=torch.Generator().manual_seed(0), **kwargs)
    assert alone.pred_idx.tolist() == [0] and alone.tgt_idx.tolist() == [0] and not alone_duplicate.any()
    ((together, together_duplicate),) = rpf_assign(logits, boxes, targets, topk=4, joint=True,
                                                   generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(together.pred_idx) == 4 and 0 in together.pred_idx.tolist() and int(together_duplicate.sum()) == 2
    positives_and_duplicates = set(together.pred_idx.tolist()) | set(together_duplicate.nonzero()[:, 0].tolist())
    assert positives_and_duplicates == set(joint[:, 0].nonzero().flatten().tolist())


def _positives_per_box(assignment, num_boxes: int) -> list[int]:
    return torch.bincount(assignment.tgt_idx, minlength=num_boxes).tolist()


@pytest.mark.parametrize("seed", range(40))
def test_joint_rpf_never_gives_a_box_fewer_positives_than_the_baseline(seed):
    """Pseudo-boxes apart from each other (a prediction can overlap only one), random predictions, m = 6 > k = 4:
    per box, RPF's positives >= those of the plain one-to-many assignment at the same k."""
    generator = torch.Generator().manual_seed(seed)
    cells = torch.randperm(9, generator=generator)[: int(torch.randint(1, 6, (1,), generator=generator))]
    centres = torch.stack([(cells % 3) * 0.33 + 0.17, (cells // 3) * 0.33 + 0.17], dim=1)
    boxes = torch.cat([centres, torch.full_like(centres, 0.12)], dim=1)
    pred_centres = centres.repeat_interleave(8, 0) + torch.randn(len(cells) * 8, 2, generator=generator) * 0.04
    pred_sizes = 0.12 * (1 + torch.randn(len(cells) * 8, 2, generator=generator) * 0.2).clamp(0.6, 1.4)
    pred_boxes = torch.cat([pred_centres, pred_sizes], dim=1)[None]
    logits = torch.randn(1, len(pred_boxes[0]), 3, generator=generator)
    targets = [{"class_labels": torch.randint(3, (len(cells),), generator=generator), "boxes": boxes}]
    ((rpf, _),) = rpf_assign(logits, pred_boxes, targets, groups=6, topk=4, generator=generator)
    (baseline,) = one_to_many_assign(logits, pred_boxes, targets, topk=4)
    rpf_counts, baseline_counts = _positives_per_box(rpf, len(cells)), _positives_per_box(baseline, len(cells))
    assert all(r >= b for r, b in zip(rpf_counts, baseline_counts)), (rpf_counts, baseline_counts)


def scarce_rpf_layout(seed: int) -> tuple[list[int], list[int]]:
    """A random layout with fewer predictions than copies (n pseudo-boxes, 2 <= n < 12, 2n <= Q < 6n; boxes overlap
    each other's predictions) -> positives per box of joint RPF (m = 6, k = 4) and of the plain assignment at k.
    Also used by ``benchmarks/rpf_scarce_layouts.py``."""
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 12, (1,), generator=generator))
    queries = int(torch.randint(2 * n, 6 * n, (1,), generator=generator))
    logits, boxes, targets = random_problem(1, queries, 3, [n], seed=seed)
    ((rpf, _),) = rpf_assign(logits, boxes, targets, groups=6, topk=4, generator=generator)
    (baseline,) = one_to_many_assign(logits, boxes, targets, topk=4)
    return _positives_per_box(rpf, n), _positives_per_box(baseline, n)


@pytest.mark.parametrize("seed", range(40))
def test_joint_rpf_never_gives_fewer_positives_when_predictions_are_scarce(seed):
    """Bug fixed: with fewer predictions than copies, the fallback's conflict rule could hand a box's baseline
    prediction to a box holding it as a candidate (429 of 1500 such random layouts had a box one positive short)."""
    rpf_counts, baseline_counts = scarce_rpf_layout(seed)
    assert all(r >= b for r, b in zip(rpf_counts, baseline_counts)), (rpf_counts, baseline_counts)


@pytest.mark.parametrize("queries, boxes, copies", [(10, 4, 2), (11, 4, 2), (3, 5, 1), (40, 4, 6)])
def test_joint_candidates_give_every_box_the_copies_the_predictions_allow(queries, boxes, copies):
    """min(groups, Q // n) copies of each box (at least 1) join the assignment, so every box gets as many
    candidates as the others instead of the costs deciding which boxes lose them."""
    logits, pred_boxes, targets = random_problem(1, queries, 3, [boxes], seed=queries + boxes)
    (candidate,) = rpf_candidates(logits, pred_boxes, targets, groups=6, generator=torch.Generator().manual_seed(0))
    per_box = candidate.sum(0).tolist()
    assert per_box == [copies] * boxes if copies * boxes <= queries else sum(per_box) == queries


def test_joint_rpf_falls_back_to_the_baseline_when_its_candidates_miss_the_box():
    """Class cost only: the joint assignment picks the confident far predictions for the box's copies; the box
    then takes the plain top-k instead of having fewer positives."""
    logits, boxes, targets = near_prediction_problem(5, seed=3)
    logits[0, :5, 0] = -6.0
    logits[0, 5:, 0] = 6.0
    class_only = HungarianMatcher(class_cost=1.0, bbox_cost=0.0, giou_cost=0.0)
    (candidate,) = rpf_candidates(logits, boxes, targets, groups=6, generator=torch.Generator().manual_seed(0),
                                  matcher=class_only)
    assert not candidate[:5].any()  # every copy went to a far prediction (t = 0 against the box)
    ((assignment, _),) = rpf_assign(logits, boxes, targets, groups=6, topk=4, matcher=class_only,
                                    generator=torch.Generator().manual_seed(0))
    (baseline,) = one_to_many_assign(logits, boxes, targets, topk=4)
    assert sorted(assignment.pred_idx.tolist()) == sorted(baseline.pred_idx.tolist()) and len(baseline.pred_idx) == 4


def test_per_box_candidates_let_near_copies_share_predictions():
    logits, boxes, targets = random_problem(1, 20, 3, [3], seed=5)
    targets[0]["boxes"][1] = targets[0]["boxes"][0] + 0.005
    (per_box,) = rpf_candidates(logits, boxes, targets, groups=6, matching="per_box",
                                generator=torch.Generator().manual_seed(0))
    assert per_box.sum(0).tolist() == [6, 6, 6] and (per_box[:, 0] & per_box[:, 1]).sum() >= 3
    with pytest.raises(ValueError, match="matching"):
        rpf_candidates(logits, boxes, targets, matching="bogus")


def test_joint_duplicate_rule_hand_made():
    # boxes 0 (score .9) and 1 (.6): same class, IoU > 0.9; 2: same place, other class; 3 elsewhere
    target = {"class_labels": torch.tensor([0, 0, 1, 0]), "scores": torch.tensor([0.9, 0.6, 0.95, 0.8]),
              "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.51, 0.5, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3],
                                     [0.1, 0.1, 0.1, 0.1]])}
    candidate = torch.zeros(6, 4, dtype=torch.bool)
    candidate[[0, 1, 2], 0] = True
    candidate[[3], 1] = True
    candidate[[0, 1, 2], 2] = True
    candidate[[5], 3] = True
    t = torch.full((6, 4), 0.1)
    t[1, 1] = 0.9  # box 1's best prediction p1 is one of box 0's candidates -> box 1 is a duplicate of box 0
    assert duplicates_from_candidates(candidate, t, target, duplicate_iou=0.7, joint=True).tolist() == [
        False, True, False, False]
    t[3, 1] = 0.95  # box 1's best prediction is its own -> kept
    assert not duplicates_from_candidates(candidate, t, target, duplicate_iou=0.7, joint=True).any()
    t[3, 1], t[:, 1] = 0.1, 0.0  # nothing overlaps box 1 at all -> no evidence, kept
    assert not duplicates_from_candidates(candidate, t, target, duplicate_iou=0.7, joint=True).any()


@pytest.mark.parametrize("joint", [True, False])
def test_duplicate_rule_keeps_two_apart_objects_of_one_class(joint):
    target = {"class_labels": torch.tensor([0, 0]), "scores": torch.tensor([0.9, 0.6]),
              "boxes": torch.tensor([[0.3, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2]])}
    boxes = torch.tensor([[0.3, 0.5, 0.2, 0.2], [0.31, 0.5, 0.2, 0.2], [0.7, 0.5, 0.2, 0.2], [0.69, 0.5, 0.2, 0.2]])
    logits = torch.full((1, 4, 2), -4.0)
    logits[0, :, 0] = 3.0
    (drop,) = rpf_duplicate_pseudo_labels(logits, boxes[None], [target], groups=6, topk=4, joint=joint,
                                          generator=torch.Generator().manual_seed(0))
    assert drop.tolist() == [False, False]


def test_match_sets_equals_one_matching_per_set():
    """Several prediction sets (decoder layers, encoder proposals with another query count) matched in one go give
    each set's own matching, an image without targets included."""
    matcher = HungarianMatcher()
    layer_logits, layer_boxes, targets = random_problem(3, 12, 4, [2, 0, 5], seed=7)
    enc_logits, enc_boxes, _ = random_problem(3, 9, 4, [2, 0, 5], seed=8)
    sets = [(layer_logits, layer_boxes), (layer_logits * 0.5, layer_boxes.flip(1)), (enc_logits, enc_boxes)]
    together = matcher.match_sets(sets, targets)
    assert len(together) == len(sets)
    for (logits, boxes), matched in zip(sets, together):
        for (pred, tgt), (pred_alone, tgt_alone) in zip(matched, matcher(logits, boxes, targets), strict=True):
            assert torch.equal(pred, pred_alone) and torch.equal(tgt, tgt_alone)
            assert pred.dtype == torch.long and pred.device == logits.device
    assert [len(pred) for pred, _ in together[2]] == [2, 0, 5]


def test_criterion_reads_the_costs_of_all_layers_back_once(monkeypatch):
    """One device-to-host read of the Hungarian costs per loss computation (final + auxiliary layers + encoder),
    not one per layer: each read is a host sync on CUDA."""
    from sparse_semi_detr_hf.configuration_sparse_semi_detr import SparseSemiDetrConfig
    from sparse_semi_detr_hf.loss import SetCriterion

    reads = []
    original = HungarianMatcher.host_cost_blocks_of_sets

    def counting(self, predictions, targets):
        reads.append(len(predictions))
        return original(self, predictions, targets)

    monkeypatch.setattr(HungarianMatcher, "host_cost_blocks_of_sets", counting)
    criterion = SetCriterion(SparseSemiDetrConfig(num_labels=4, decoder_layers=3))
    logits, boxes, targets = random_problem(2, 10, 4, [3, 1], seed=9)
    criterion(torch.stack([logits, logits, logits]), torch.stack([boxes, boxes, boxes]), targets,
              enc_logits=logits, enc_boxes=boxes)
    assert reads == [4]
