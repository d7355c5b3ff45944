"""Assignments between predictions and targets.

Three assigners, all gradient-free:

- ``HungarianMatcher``: DETR's one-to-one matching (Deformable-DETR focal class cost, L1 and -GIoU box costs).
- ``one_to_many_assign``: Semi-DETR's task-aligned one-to-many assignment (TOOD's alignment metric).
- ``rpf_assign`` / ``rpf_duplicate_pseudo_labels``: Reliable Pseudo-Label Filtering (SPEC §4, our reading).

Shared shapes: ``logits (B, Q, C)`` raw class logits (sigmoid classifier, no background class),
``pred_boxes (B, Q, 4)`` cxcywh normalized to ``[0, 1]``; ``targets`` is a list of ``B`` dicts with
``class_labels (n,)`` long, ``boxes (n, 4)`` cxcywh normalized and, for pseudo-labels, ``scores (n,)``.
``n = 0`` is legal everywhere: it yields no positives (every prediction is background).
"""

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh, generalized_box_iou

# Replaces NaN/inf costs: larger than any real cost, finite so that scipy can still solve the problem.
INVALID_COST = 1e8


class Assignment(NamedTuple):
    """Positives of one image: prediction ``pred_idx[k]`` learns target ``tgt_idx[k]`` with soft weight ``weight[k]``.

    Shapes: ``(k,)`` each; indices long, weight float32, all on the predictions' device.
    """

    pred_idx: Tensor
    tgt_idx: Tensor
    weight: Tensor


def focal_class_cost(prob: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Deformable-DETR focal matching cost: ``(N, C)`` sigmoid probabilities, ``(M,)`` labels -> ``(N, M)``."""
    prob = prob[:, labels]
    neg = (1 - alpha) * prob.pow(gamma) * -(1 - prob + 1e-8).log()
    pos = alpha * (1 - prob).pow(gamma) * -(prob + 1e-8).log()
    return pos - neg


def host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without waiting for the device (pinned, non-blocking copy on CUDA).

    A plain ``torch.tensor(values, device="cuda")`` or ``.to("cuda")`` of pageable memory synchronizes the stream;
    the pinned buffer is kept alive by the copy's caching-allocator record until the copy has run.
    """
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def solve_assignment(cost: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """Optimal assignment of a host cost matrix ``(Q, n)`` -> ``(pred_idx (m,), tgt_idx (m,))``, ``m = min(Q, n)``."""
    return solve_assignments([cost], device)[0]


def solve_assignments(costs: list[Tensor], device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """Optimal assignment of each host cost matrix ``(Q_i, n_i)`` -> per matrix ``(pred_idx (m_i,), tgt_idx (m_i,))``
    with ``m_i = min(Q_i, n_i)``, long, on ``device``; all indices reach the device in one non-blocking copy."""
    solved = [linear_sum_assignment(cost.numpy()) if cost.numel() else (np.zeros(0), np.zeros(0)) for cost in costs]
    sizes = [len(rows) for rows, _ in solved]
    flat = torch.from_numpy(np.concatenate([np.stack((rows, cols)).astype(np.int64).reshape(2, -1)
                                            for rows, cols in solved], axis=1) if solved else np.zeros((2, 0), np.int64))
    flat = host_to_device(flat, device)
    return list(zip(flat[0].split(sizes), flat[1].split(sizes)))


class HungarianMatcher(nn.Module):
    """One-to-one matching minimising ``class_cost * focal + bbox_cost * L1(cxcywh) + giou_cost * (-GIoU)``.

    The class cost is Deformable DETR's focal cost (``focal_alpha``, ``focal_gamma``). Costs are computed in fp32
    without gradient; NaN/inf entries become ``INVALID_COST`` so that a bad prediction is only matched when nothing
    else is left. The cost of the whole batch is one ``(B*Q, sum n)`` matrix, copied to the host once.
    """

    def __init__(self, class_cost: float = 2.0, bbox_cost: float = 5.0, giou_cost: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("HungarianMatcher needs at least one non-zero cost.")
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    @classmethod
    def from_config(cls, config) -> "HungarianMatcher":
        """Build from a ``SparseSemiDetrConfig`` (``matcher_*_cost``, ``focal_alpha``, ``focal_gamma``)."""
        return cls(config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost,
                   config.focal_alpha, config.focal_gamma)

    @torch.no_grad()
    def cost_matrix(self, logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor) -> Tensor:
        """``(N, C)`` logits, ``(N, 4)`` cxcywh, ``(M,)`` labels, ``(M, 4)`` cxcywh -> finite fp32 cost ``(N, M)``."""
        with torch.autocast(device_type=logits.device.type, enabled=False):
            out_boxes, tgt_boxes = pred_boxes.float(), boxes.float()
            class_cost = focal_class_cost(logits.float().sigmoid(), labels, self.focal_alpha, self.focal_gamma)
            bbox_cost = torch.cdist(out_boxes, tgt_boxes, p=1)
            giou = generalized_box_iou(box_cxcywh_to_xyxy(out_boxes), box_cxcywh_to_xyxy(tgt_boxes))
            cost = self.class_cost * class_cost + self.bbox_cost * bbox_cost - self.giou_cost * giou
        cost = cost.nan_to_num(nan=INVALID_COST, posinf=INVALID_COST, neginf=INVALID_COST)
        return cost.clamp(-INVALID_COST, INVALID_COST)

    @torch.no_grad()
    def host_cost_blocks(self, logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> list[Tensor]:
        """Per-image host cost matrices ``(Q, n_b)`` from one batched computation and one device-to-host copy."""
        return self.host_cost_blocks_of_sets([(logits, pred_boxes)], targets)[0]

    @torch.no_grad()
    def host_cost_blocks_of_sets(self, predictions: list[tuple[Tensor, Tensor]],
                                 targets: list[dict]) -> list[list[Tensor]]:
        """Per prediction set ``(B, Q_s, C)``, ``(B, Q_s, 4)`` and image, the host cost matrix ``(Q_s, n_b)``.

        The costs of every set (e.g. every decoder layer and the encoder proposals) are computed on the device and
        read back in one device-to-host copy: one host sync per loss computation instead of one per set.
        """
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [[torch.zeros(logits.shape[1], 0) for _ in sizes] for logits, _ in predictions]
        device = predictions[0][0].device
        labels = torch.cat([t["class_labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)
        costs = [self.cost_matrix(logits.flatten(0, 1), pred_boxes.flatten(0, 1), labels, boxes)
                 for logits, pred_boxes in predictions]
        host = torch.cat(costs).cpu()  # (sum_s B * Q_s, sum n)
        blocks = []
        for (logits, _), cost in zip(predictions, host.split([c.shape[0] for c in costs])):
            per_image = cost.view(logits.shape[0], logits.shape[1], -1).split(sizes, dim=-1)
            blocks.append([block[b] for b, block in enumerate(per_image)])
        return blocks

    @torch.no_grad()
    def match_sets(self, predictions: list[tuple[Tensor, Tensor]],
                   targets: list[dict]) -> list[list[tuple[Tensor, Tensor]]]:
        """``forward`` for several prediction sets against the same targets with one copy each way."""
        blocks = self.host_cost_blocks_of_sets(predictions, targets)
        flat = solve_assignments([block for per_set in blocks for block in per_set], predictions[0][0].device)
        return [flat[index * len(targets):(index + 1) * len(targets)] for index in range(len(predictions))]

    @torch.no_grad()
    def forward(self, logits: Tensor, pred_boxes: Tensor, targets: list[dict]) -> list[tuple[Tensor, Tensor]]:
        """``(B, Q, C)``, ``(B, Q, 4)``, targets -> per image ``(pred_idx (m,), tgt_idx (m,))``, long, logits' device.

        ``m = min(Q, n_b)``; an image without targets gets two empty index tensors.
        """
        return self.match_sets([(logits, pred_boxes)], targets)[0]


def _alignment(logits: Tensor, pred_boxes: Tensor, labels: Tensor, boxes: Tensor, alpha: float,
               beta: float) -> tuple[Tensor, Tensor]:
    """Task alignment of one image: ``(Q, C)``, ``(Q, 4)``, ``(n,)``, ``(n, 4)`` -> ``(t, IoU)``, each ``(Q, n)``.

    ``t = s^alpha * IoU^beta`` with ``s`` the sigmoid probability of each target's class; NaNs (degenerate
    boxes) count as 0.
    """
    scores = logits.float().sigmoid()[:, labels]
    iou = box_iou(box_cxcywh_to_xyxy(pred_boxes.float()), box_cxcywh_to_xyxy(boxes.float())).nan_to_num(0.0)
    return (scores.pow(alpha) * iou.pow(beta)).nan_to_num(0.0), iou


def _topk_mask(t: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """Per column of ``t (Q, n)``: the ``k`` rows of largest ``t`` among ``allowed``, ``t > 0`` -> bool ``(Q, n)``."""
    if allowed is not None:
        t = t.masked_fill(~allowed, 0.0)
    mask = torch.zeros_like(t, dtype=torch.bool)
    k = min(k, t.shape[0])
    if k == 0 or t.shape[1] == 0:
        return mask
    values, index = t.topk(k, dim=0)
    return mask.scatter_(0, index, values > 0)


def _keep_largest_iou(mask: Tensor, iou: Tensor) -> Tensor:
    """Rows of ``mask (Q, n)`` claimed by several targets keep only the target of largest IoU -> bool ``(Q, n)``."""
    best = iou.masked_fill(~mask, -1.0).argmax(dim=1, keepdim=True)
    return mask & (torch.arange(mask.shape[1], device=mask.device)[None] == best)


def _soft_weighted(positive: Tensor, t: Tensor, iou: Tensor) -> Assignment:
    """Positives ``(Q, n)`` (at most one per row) -> ``Assignment`` with weight ``t / max t * max IoU`` per target.

    Maxima run over each target's own positives (after conflict resolution), so a target's best positive
    gets weight = its best IoU.
    """
    pred_idx, tgt_idx = positive.nonzero(as_tuple=True)
    t_pos, iou_pos = t[pred_idx, tgt_idx], iou[pred_idx, tgt_idx]
    zeros = t.new_zeros(t.shape[1])
    max_t = zeros.scatter_reduce(0, tgt_idx, t_pos, reduce="amax", include_self=True)
    max_iou = zeros.scatter_reduce(0, tgt_idx, iou_pos, reduce="amax", include_self=True)
    weight = t_pos / max_t[tgt_idx].clamp_min(torch.finfo(t.dtype).tiny) * max_iou[tgt_idx]
    return Assignment(pred_idx, tgt_idx, weight)


def _empty_assignment(device: torch.device) -> Assignment:
    index = torch.empty(0, dtype=torch.long, device=device)
    return Assignment(index, index.clone(), torch.empty(0, device=device))


@torch.no_grad()
def one_to_many_assign(logits: Tensor, pred_boxes: Tensor, targets: list[dict], topk: int = 13, alpha: float = 1.0,
                       beta: float = 6.0) -> list[Assignment]:
    """Semi-DETR's one-to-many (TOOD task-aligned) assignment, per image.

    Alignment ``t_ij = s_ij^alpha * IoU_ij^beta`` (``s_ij``: sigmoid probability of target j's class at prediction i).
    For each target the ``topk`` predictions of largest ``t`` with ``t > 0`` are its positives (``min(topk, Q)``
    when there are fewer predictions); a prediction claimed by several targets goes to the one of largest IoU.
    Soft weight of a positive: ``t / max t * max IoU``, both maxima over that target's positives.
    Everything else is background. Returns one ``Assignment`` per image.
    """
    assignments = []
    for image_logits, image_boxes, target in zip(logits, pred_boxes, targets):
        if len(target["boxes"]) == 0 or image_logits.shape[0] == 0:
            assignments.append(_empty_assignment(logits.device))
            continue
        t, iou = _alignment(image_logits, image_boxes, target["class_labels"], target["boxes"], alpha, beta)
        positive = _keep_largest_iou(_topk_mask(t, topk), iou)
        assignments.append(_soft_weighted(positive, t, iou))
    return assignments


def jitter_boxes(boxes: Tensor, groups: int, jitter: float, generator: torch.Generator | None = None) -> Tensor:
    """Augmented copies of cxcywh boxes ``(n, 4)`` -> ``(groups, n, 4)``; copy 0 is ``boxes`` unchanged.

    Copies 1..groups-1: centre ``+ u * jitter * size`` and size ``* (1 + u * jitter)`` with independent
    ``u ~ U(-1, 1)`` per coordinate drawn from ``generator``, then clipped to the image (xyxy in ``[0, 1]``).
    """
    noise_device = generator.device if generator is not None else boxes.device
    noise = torch.rand((groups - 1, *boxes.shape), generator=generator, device=noise_device).to(boxes) * 2 - 1
    centre = boxes[:, :2] + noise[..., :2] * jitter * boxes[:, 2:]
    size = boxes[:, 2:] * (1 + noise[..., 2:] * jitter)
    copies = box_cxcywh_to_xyxy(torch.cat([centre, size], dim=-1)).clamp(0.0, 1.0)
    return torch.cat([boxes[None], box_xyxy_to_cxcywh(copies)], dim=0)


RPF_MATCHINGS = ("joint", "per_box", "separate")


@torch.no_grad()
def rpf_candidates(logits: Tensor, pred_boxes: Tensor, targets: list[dict], groups: int = 6, jitter: float = 0.1,
                   generator: torch.Generator | None = None, matcher: HungarianMatcher | None = None,
                   joint: bool = True, matching: str | None = None) -> list[Tensor]:
    """RPF candidate sets: per image a bool ``(Q, n)``, True where prediction i was matched to a copy of box j.

    ``groups`` copies of the pseudo-boxes (``jitter_boxes``: copy 0 exact, the others jittered), each copy keeping
    its box's class, are Hungarian-matched against all ``Q`` predictions with ``matcher``'s costs. ``matching``:

    - ``"joint"`` (``joint=True``; SPEC §4, the one-to-many side): all copies form one target set matched in a
      single assignment (H-DETR's repeated targets): every copy gets a distinct prediction, so box j has
      ``groups`` distinct candidates and no two boxes share one; with fewer predictions than copies, only
      ``Q // n`` copies of each box join (``_matchable_copies``);
    - ``"per_box"`` (the one-to-one duplicate rule): the ``groups`` copies of each box form their own assignment:
      each box gets ``min(groups, Q)`` distinct candidates, and near-identical boxes share theirs;
    - ``"separate"`` (``joint=False``; the earlier reading): each copy set is matched on its own; box j's
      candidates are the union of its copies' matches (1 to ``groups``; measured: mostly the same prediction).
    """
    matching = matching or ("joint" if joint else "separate")
    if matching not in RPF_MATCHINGS:
        raise ValueError(f"matching={matching!r} is not one of {RPF_MATCHINGS}.")
    matcher = matcher if matcher is not None else HungarianMatcher()
    group_targets = [
        {"class_labels": t["class_labels"].repeat(groups),
         "boxes": jitter_boxes(t["boxes"], groups, jitter, generator).flatten(0, 1)}
        for t in targets
    ]
    blocks = matcher.host_cost_blocks(logits, pred_boxes, group_targets)
    members = []
    for block, target in zip(blocks, targets):
        num_boxes = len(target["boxes"])
        member = np.zeros((logits.shape[1], num_boxes), dtype=bool)
        copies = _matchable_copies(groups, num_boxes, logits.shape[1]) if matching == "joint" else groups
        for columns in _rpf_column_sets(num_boxes, copies, matching):  # column c is copy c // n of box c % n
            rows, cols = linear_sum_assignment(block[:, columns].numpy())
            member[rows, np.asarray(columns)[cols] % num_boxes] = True
        members.append(member)
    sizes = [member.shape[1] for member in members]
    flat = np.concatenate(members, axis=1) if members else np.zeros((logits.shape[1], 0), dtype=bool)
    return list(host_to_device(torch.from_numpy(flat), logits.device).split(sizes, dim=1))


def _matchable_copies(groups: int, num_boxes: int, num_queries: int) -> int:
    """Copies of each box that one joint assignment can all match: ``min(groups, Q // n)``, at least 1.

    With more copies than predictions (``groups * n > Q``) the assignment would leave ``groups * n - Q`` copies
    unmatched, and which boxes lose candidates would follow the costs: a box could then end with fewer positives
    than the plain one-to-many assignment gives it. Capping the copies keeps every box at the same number of
    candidates (copy 0 and the first jittered ones); ``_rpf_single``'s fallback then guarantees the count.
    """
    return max(1, min(groups, num_queries // max(1, num_boxes)))


def _rpf_column_sets(num_boxes: int, groups: int, matching: str) -> list[list[int]]:
    """Which columns of the ``(Q, groups * n)`` copy cost matrix are solved together, one list per assignment."""
    if num_boxes == 0:
        return []
    if matching == "joint":
        return [list(range(groups * num_boxes))]
    if matching == "per_box":
        return [[g * num_boxes + j for g in range(groups)] for j in range(num_boxes)]
    return [list(range(g * num_boxes, (g + 1) * num_boxes)) for g in range(groups)]


def _rpf_single(candidate: Tensor, t: Tensor, iou: Tensor, topk: int,
                fallback: bool = True) -> tuple[Assignment, Tensor]:
    """One image: candidates, alignment and IoU ``(Q, n)`` -> ``(Assignment, duplicate_mask (Q,))``.

    ``fallback``: a box whose candidates give fewer positives than the plain one-to-many assignment's top-k
    (``_topk_mask(t, topk)``) takes that top-k instead. When that swap hands one of its predictions to a box that
    holds it as a candidate of larger IoU (mostly when predictions are scarce, ``Q < groups * n``, but not only),
    the image takes the plain assignment's positives (``one_to_many_assign``'s) for every box, chosen on the device:
    RPF never gives a box fewer positives than the baseline. Its other RPF candidates stay duplicates (no
    classification loss), as in every image.
    """
    owned = _keep_largest_iou(candidate & (t > 0), iou)
    positive = _topk_mask(t, topk, allowed=owned)
    if fallback:
        baseline = _topk_mask(t, topk)
        short = positive.sum(0) < baseline.sum(0)
        positive = _keep_largest_iou(torch.where(short[None], baseline, positive), iou)
        plain = _keep_largest_iou(baseline, iou)  # one_to_many_assign's positives
        positive = torch.where((positive.sum(0) < plain.sum(0)).any(), plain, positive)
    return _soft_weighted(positive, t, iou), owned.any(1) & ~positive.any(1)


@torch.no_grad()
def rpf_assign(logits: Tensor, pred_boxes: Tensor, targets: list[dict], groups: int = 6, topk: int = 4,
               jitter: float = 0.1, alpha: float = 1.0, beta: float = 6.0, generator: torch.Generator | None = None,
               matcher: HungarianMatcher | None = None, joint: bool = True) -> list[tuple[Assignment, Tensor]]:
    """Reliable Pseudo-Label Filtering, one-to-many side (SPEC §4, our reading). Per image:

    1. Candidates (``rpf_candidates``): ``groups`` copies of the pseudo-boxes (copy 0 exact, copies 1.. jittered by
       ``jitter`` of the box size), all copies Hungarian-matched in one assignment against the ``Q`` predictions
       (``joint``; or each copy set separately); the candidates of box j are the predictions matched to any of
       its copies.
    2. Alignment ``t = s^alpha * IoU^beta`` against the *un-jittered* box (``s``: sigmoid probability of the box's
       class). Candidates with ``t = 0`` (no overlap) are dropped; a prediction that remains a candidate of
       several boxes belongs to the one of largest IoU.
    3. Per box, its ``topk`` candidates of largest ``t`` are positives, weighted ``t / max t * max IoU`` (maxima over
       the box's positives), as in ``one_to_many_assign``.
    4. Its remaining candidates (``t > 0``, not positive) are *duplicates*: ``duplicate_mask[i] = True``. The loss
       leaves them out of the classification loss entirely (neither positive nor background).

    Returns per image ``(Assignment, duplicate_mask (Q,) bool)``; with no pseudo-box, no positive and no duplicate.
    """
    candidates = rpf_candidates(logits, pred_boxes, targets, groups, jitter, generator, matcher, joint)
    results = []
    for image_logits, image_boxes, target, candidate in zip(logits, pred_boxes, targets, candidates):
        if candidate.shape[1] == 0:
            no_duplicate = torch.zeros(image_logits.shape[0], dtype=torch.bool, device=logits.device)
            results.append((_empty_assignment(logits.device), no_duplicate))
            continue
        t, iou = _alignment(image_logits, image_boxes, target["class_labels"], target["boxes"], alpha, beta)
        results.append(_rpf_single(candidate, t, iou, topk, fallback=joint))
    return results


def _ranked_ahead(scores: Tensor) -> Tensor:
    """``(n,)`` scores -> bool ``(n, n)``, ``[i, j]`` True when box i ranks ahead of box j (higher score; ties: index)."""
    index = torch.arange(len(scores), device=scores.device)
    return (scores[:, None] > scores[None]) | ((scores[:, None] == scores[None]) & (index[:, None] < index[None]))


def _shared_top_k(candidate: Tensor, t: Tensor, topk: int) -> Tensor:
    """Separate matching: ``[i, j]`` True when box j's top-k candidates (non-empty) all are candidates of box i."""
    top = _topk_mask(t, topk, allowed=candidate)  # P_j: box j's own top-k, before conflict resolution
    shared = candidate.T.float() @ top.float()  # (n, n): |C_i ∩ P_j|
    return (shared == top.sum(0)[None]) & top.any(0)[None]


def _claims_best_prediction(candidate: Tensor, t: Tensor) -> Tensor:
    """Joint matching: ``[i, j]`` True when box j's best prediction (largest ``t > 0`` over all predictions) is one
    of box i's candidates (a positive or a duplicate of i)."""
    best_t, best = t.max(0)
    return candidate[best].T & (best_t > 0)[None]


def duplicates_from_candidates(candidate: Tensor, t: Tensor, target: dict, topk: int = 4,
                               duplicate_iou: float = 0.7, joint: bool = False) -> Tensor:
    """One image: candidates and alignment ``(Q, n)`` -> bool ``(n,)``, True for the pseudo-boxes to drop.

    The rule of ``rpf_duplicate_pseudo_labels`` on given candidate sets (``target`` needs ``scores``): box j is
    dropped when a box i ranked ahead of it, of the same class and with ``IoU(i, j) >= duplicate_iou`` claims what
    fits j — with ``joint`` (per-box candidate sets), j's best prediction is one of i's candidates; with separately
    matched ones, all of j's top-k candidates are candidates of i.
    """
    if "scores" not in target:
        raise ValueError("rpf_duplicate_pseudo_labels needs pseudo-label targets with 'scores'.")
    claims = _claims_best_prediction(candidate, t) if joint else _shared_top_k(candidate, t, topk)
    boxes = box_cxcywh_to_xyxy(target["boxes"].float())
    overlap = box_iou(boxes, boxes) >= duplicate_iou
    labels = target["class_labels"]
    same_class = labels[:, None] == labels[None]
    return (claims & overlap & same_class & _ranked_ahead(target["scores"])).any(0)


@torch.no_grad()
def rpf_duplicate_pseudo_labels(logits: Tensor, pred_boxes: Tensor, targets: list[dict], groups: int = 6,
                                topk: int = 4, jitter: float = 0.1, alpha: float = 1.0, beta: float = 6.0,
                                duplicate_iou: float = 0.7, generator: torch.Generator | None = None,
                                matcher: HungarianMatcher | None = None, joint: bool = True) -> list[Tensor]:
    """Reliable Pseudo-Label Filtering, one-to-one side (SPEC §4, our reading): which pseudo-boxes are duplicates.

    Candidate sets ``C_j`` from ``rpf_candidates``; ``t = s^alpha * IoU^beta`` against box j. Pseudo-box j is a
    duplicate when some pseudo-box i ranked ahead of it (higher ``scores``; equal scores: lower index) has the same
    class, ``IoU(i, j) >= duplicate_iou`` and claims what fits j:

    - ``joint`` (default): candidate sets matched ``"per_box"`` (box i's m copies in one assignment: its m
      distinct nearest predictions, its top-k positives and "remaining predictions"); j's best prediction
      (largest ``t > 0`` over all predictions) is in ``C_i``. (The global joint assignment of the one-to-many side
      cannot be used here: it gives j its own candidates, so two copies of one object never share any.)
    - separate matching: j's top-k candidates ``P_j`` are non-empty and all in ``C_i``.

    The test is against every box ranked ahead, dropped or not (no NMS-style chaining). Targets must carry
    ``scores (n,)``. Returns per image a bool ``(n,)`` mask, True = drop.
    """
    candidates = rpf_candidates(logits, pred_boxes, targets, groups, jitter, generator, matcher,
                                matching="per_box" if joint else "separate")
    masks = []
    for image_logits, image_boxes, target, candidate in zip(logits, pred_boxes, targets, candidates):
        if candidate.shape[1] == 0:
            masks.append(torch.zeros(0, dtype=torch.bool, device=logits.device))
            continue
        t, _ = _alignment(image_logits, image_boxes, target["class_labels"], target["boxes"], alpha, beta)
        masks.append(duplicates_from_candidates(candidate, t, target, topk, duplicate_iou, joint))
    return masks
