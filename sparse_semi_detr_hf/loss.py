"""Set criterion: classification and box losses on the decoder layers, the encoder proposals and denoising queries.

Inputs follow docs/architecture.md: boxes are cxcywh normalized to ``[0, 1]``; targets are dicts with
``class_labels (n,)``, ``boxes (n, 4)`` and, for pseudo-labels, ``scores (n,)``. Every returned loss is an
unweighted scalar; ``SetCriterion.weight_dict`` / ``weighted_sum`` apply the config's coefficients.

Assignments:
- ``"one_to_one"``: Hungarian per layer; sigmoid focal loss over all queries x classes, L1 and GIoU on matched
  pairs, each divided by ``num_boxes``. With RPF, duplicate pseudo-labels are dropped first.
- ``"one_to_many"``: task-aligned assignment per layer (or RPF's); quality focal loss with soft targets, and
  L1/GIoU weighted by the soft weights, each divided by ``max(1, sum of weights)``. RPF duplicates get no class loss.
- Denoising: matched by construction (DenoisingMeta layout), focal + L1 + GIoU, divided by
  ``num_boxes * num_groups``, in both assignments.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import sigmoid_focal_loss

from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from .matcher import (
    Assignment,
    HungarianMatcher,
    host_to_device,
    one_to_many_assign,
    rpf_assign,
    rpf_duplicate_pseudo_labels,
)

ASSIGNMENTS = ("one_to_one", "one_to_many")
LOSS_NAMES = ("loss_ce", "loss_bbox", "loss_giou")


def global_mean(value: Tensor) -> Tensor:
    """Mean of a tensor over processes when ``torch.distributed`` is initialized (identity otherwise); detached."""
    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


def quality_focal_loss(logits: Tensor, soft_targets: Tensor, gamma: float = 2.0) -> Tensor:
    """Task-aligned (quality) focal loss, element-wise ``|y - p|^gamma * BCE_with_logits(x, y)``, like ``logits``."""
    logits = logits.float()
    modulation = (soft_targets - logits.sigmoid()).abs().pow(gamma)
    return modulation * F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")


def box_losses(pred: Tensor, target: Tensor, normalizer: Tensor, weight: Tensor | None = None,
               anchor: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """L1 (cxcywh) and ``1 - GIoU`` of matched pairs ``(k, 4)``, optionally weighted ``(k,)``, summed / ``normalizer``.

    With ``k = 0`` both are exactly 0 yet connected to ``anchor`` (the layer's boxes) so every parameter gets a
    (zero) gradient, as DDP requires.
    """
    if pred.shape[0] == 0:
        zero = (anchor if anchor is not None else pred).sum() * 0.0
        return zero, zero.clone()
    pred, target = pred.float(), target.float()
    l1 = (pred - target).abs().sum(-1)
    giou = 1.0 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    if weight is not None:
        l1, giou = l1 * weight, giou * weight
    return l1.sum() / normalizer, giou.sum() / normalizer


def _count_boxes(targets: list[dict], dn_targets: list[dict], device: torch.device) -> tuple[Tensor, Tensor]:
    """``num_boxes`` of the matched and of the denoising targets -> two 0-d float tensors.

    Batch totals averaged over processes, at least 1; one collective, always called, so that every process
    runs the same collectives whether or not it has denoising queries.
    """
    counts = torch.tensor([float(sum(len(t["boxes"]) for t in group)) for group in (targets, dn_targets)])
    return tuple(global_mean(host_to_device(counts, device)).clamp(min=1.0).unbind())


def _denoising_pairs(counts: list[int], num_groups: int, pad: int, device) -> list[tuple[Tensor, Tensor]]:
    """Positive ``(query_idx, target_idx)`` per image of the denoising layout, built on the host (no sync).

    Image ``b``'s target ``j`` has its positive copy at query ``2 * g * pad + j`` in every group ``g``.
    """
    queries, targets = [], []
    for n in counts:
        index = torch.arange(n)
        queries.append((torch.arange(num_groups)[:, None] * 2 * pad + index[None]).flatten())
        targets.append(index.repeat(num_groups))
    flat = host_to_device(torch.stack((torch.cat(queries), torch.cat(targets))), device)
    sizes = [n * num_groups for n in counts]
    return list(zip(flat[0].split(sizes), flat[1].split(sizes)))


def _keep(target: dict, keep: Tensor) -> dict:
    """A copy of ``target`` restricted to the boxes where ``keep (n,)`` is True."""
    filtered = dict(target)
    for key in ("class_labels", "boxes", "scores"):
        if key in target:
            filtered[key] = target[key][keep]
    return filtered


def _flatten_pairs(targets: list[dict], pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, ...]:
    """Per-image ``(pred_idx, tgt_idx)`` -> flat ``(batch_idx, pred_idx, labels, target boxes)`` over the batch."""
    batch_idx = torch.cat([torch.full_like(pred, b) for b, (pred, _) in enumerate(pairs)])
    pred_idx = torch.cat([pred for pred, _ in pairs])
    labels = torch.cat([t["class_labels"][tgt] for t, (_, tgt) in zip(targets, pairs)])
    boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, pairs)])
    return batch_idx, pred_idx, labels, boxes


def _one_hot_at(logits: Tensor, batch_idx: Tensor, query_idx: Tensor, labels: Tensor) -> Tensor:
    """fp32 zeros like ``logits (B, Q, C)`` with 1 at ``(batch_idx, query_idx, labels)`` (each ``(k,)``).

    The 1 is a device tensor: ``onehot[...] = 1.0`` copies a host scalar to the device, a stream sync on CUDA.
    """
    onehot = torch.zeros_like(logits, dtype=torch.float32)
    return onehot.index_put_((batch_idx, query_idx, labels), onehot.new_ones(()))


class SetCriterion(nn.Module):
    """DINO / Semi-DETR detection losses (no parameters). Build once: ``SetCriterion(config)``.

    ``forward`` returns the unweighted loss dict of docs/architecture.md: ``loss_{ce,bbox,giou}`` (final layer),
    ``loss_*_{i}`` (earlier layers, with ``auxiliary_loss``), ``loss_*_enc`` (with ``encoder_loss`` and encoder
    outputs), ``loss_*_dn`` and ``loss_*_dn_{i}`` (with denoising outputs and meta).
    """

    def __init__(self, config):
        super().__init__()
        self.matcher = HungarianMatcher.from_config(config)
        self.focal_alpha, self.focal_gamma = config.focal_alpha, config.focal_gamma
        self.coefficients = {"loss_ce": config.class_loss_coefficient, "loss_bbox": config.bbox_loss_coefficient,
                             "loss_giou": config.giou_loss_coefficient}
        self.num_layers = config.decoder_layers
        self.auxiliary_loss, self.encoder_loss = config.auxiliary_loss, config.encoder_loss
        self.o2m = {"topk": config.one_to_many_topk, "alpha": config.one_to_many_alpha,
                    "beta": config.one_to_many_beta}
        self.rpf = {"groups": config.rpf_groups, "topk": config.rpf_topk, "jitter": config.rpf_jitter,
                    "alpha": config.one_to_many_alpha, "beta": config.one_to_many_beta}
        self.rpf_joint_matching = config.rpf_joint_matching
        self.rpf_ignore_duplicates = config.rpf_ignore_duplicates
        self.denoising_padding_is_background = config.denoising_padding_is_background
        self.rpf_duplicate_iou = config.rpf_duplicate_iou

    @property
    def weight_dict(self) -> dict[str, float]:
        """Every key this criterion can return (for ``config.decoder_layers`` layers) -> its coefficient."""
        layers = range(self.num_layers) if self.auxiliary_loss else [self.num_layers - 1]
        suffixes = [self._suffix(layer, self.num_layers, "") for layer in layers]
        suffixes += [self._suffix(layer, self.num_layers, "_dn") for layer in layers]
        suffixes += ["_enc"] if self.encoder_loss else []
        return {name + suffix: self.coefficients[name] for suffix in suffixes for name in LOSS_NAMES}

    def coefficient(self, key: str) -> float:
        """Coefficient of any loss key (``loss_ce*`` -> class, ``loss_bbox*`` -> L1, ``loss_giou*`` -> GIoU)."""
        for name, value in self.coefficients.items():
            if key == name or key.startswith(name + "_"):
                return value
        raise KeyError(f"{key!r} is not a loss of SetCriterion.")

    def weighted_sum(self, loss_dict: dict[str, Tensor]) -> Tensor:
        """``sum(coefficient(key) * loss)`` over the dict."""
        return sum(self.coefficient(key) * value for key, value in loss_dict.items())

    @staticmethod
    def _suffix(layer: int, num_layers: int, kind: str) -> str:
        return kind if layer == num_layers - 1 else f"{kind}_{layer}"

    def forward(self, layer_logits: Tensor, layer_boxes: Tensor, targets: list[dict], enc_logits: Tensor | None = None,
                enc_boxes: Tensor | None = None, dn_logits: Tensor | None = None, dn_boxes: Tensor | None = None,
                dn_meta=None, assignment: str = "one_to_one", use_rpf: bool = False,
                generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Losses of one batch.

        Args:
            layer_logits / layer_boxes: ``(L, B, Q, C)`` / ``(L, B, Q, 4)`` decoder outputs, last layer = final.
            targets: ``B`` dicts (``class_labels``, ``boxes``; ``scores`` when ``use_rpf`` in ``"one_to_one"``).
            enc_logits / enc_boxes: ``(B, K, C)`` / ``(B, K, 4)`` selected encoder proposals.
            dn_logits / dn_boxes: ``(L, B, Ndn, C)`` / ``(L, B, Ndn, 4)``; ``dn_meta``: ``DenoisingMeta``.
            assignment: ``"one_to_one"`` (Hungarian) or ``"one_to_many"`` (task-aligned).
            use_rpf: Reliable Pseudo-Label Filtering (see ``matcher.rpf_assign`` / ``rpf_duplicate_pseudo_labels``).
            generator: random generator of RPF's jittered copies.
        """
        if assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment={assignment!r} is not one of {ASSIGNMENTS}.")
        dn_targets = targets
        if use_rpf and assignment == "one_to_one":
            targets = self.drop_duplicate_pseudo_labels(layer_logits[-1], layer_boxes[-1], targets, generator)
        num_boxes, dn_num_boxes = _count_boxes(targets, dn_targets, layer_logits.device)
        num_layers = layer_logits.shape[0]
        layers = range(num_layers) if self.auxiliary_loss else [num_layers - 1]
        sets = [(layer_logits[layer], layer_boxes[layer], self._suffix(layer, num_layers, "")) for layer in layers]
        if self.encoder_loss and enc_logits is not None and enc_boxes is not None:
            sets.append((enc_logits, enc_boxes, "_enc"))
        matched = [None] * len(sets)
        if assignment == "one_to_one":  # every set's Hungarian matching with one copy each way (one host sync)
            matched = self.matcher.match_sets([(logits.detach(), boxes.detach()) for logits, boxes, _ in sets],
                                              targets)
        losses = {}
        for (logits, boxes, suffix), pairs in zip(sets, matched):
            terms = self._layer_losses(logits, boxes, targets, num_boxes, assignment, use_rpf, generator, pairs)
            losses.update(self._named(terms, suffix))
        if dn_meta is not None and dn_logits is not None and dn_boxes is not None:
            for layer in (range(dn_logits.shape[0]) if self.auxiliary_loss else [dn_logits.shape[0] - 1]):
                terms = self.denoising_losses(dn_logits[layer], dn_boxes[layer], dn_targets, dn_meta, dn_num_boxes)
                losses.update(self._named(terms, self._suffix(layer, dn_logits.shape[0], "_dn")))
        return losses

    @staticmethod
    def _named(terms: tuple[Tensor, Tensor, Tensor], suffix: str) -> dict[str, Tensor]:
        return {name + suffix: value for name, value in zip(LOSS_NAMES, terms)}

    def drop_duplicate_pseudo_labels(self, logits: Tensor, pred_boxes: Tensor, targets: list[dict],
                                     generator: torch.Generator | None = None) -> list[dict]:
        """RPF, one-to-one side: targets without the duplicate pseudo-boxes found on ``(B, Q, C)``/``(B, Q, 4)``."""
        duplicates = rpf_duplicate_pseudo_labels(logits.detach(), pred_boxes.detach(), targets,
                                                 duplicate_iou=self.rpf_duplicate_iou, generator=generator,
                                                 matcher=self.matcher, joint=self.rpf_joint_matching, **self.rpf)
        return [_keep(target, ~duplicate) for target, duplicate in zip(targets, duplicates)]

    def _layer_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], num_boxes: Tensor, assignment: str,
                      use_rpf: bool, generator: torch.Generator | None,
                      pairs: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(ce, bbox, giou)`` of one set of predictions ``(B, Q, C)``, ``(B, Q, 4)`` (``pairs``: its Hungarian
        matching, when already computed)."""
        if assignment == "one_to_one":
            return self.one_to_one_losses(logits, boxes, targets, num_boxes, pairs)
        if use_rpf:
            results = rpf_assign(logits.detach(), boxes.detach(), targets, generator=generator,
                                 matcher=self.matcher, joint=self.rpf_joint_matching, **self.rpf)
            assignments = [assigned for assigned, _ in results]
            duplicates = torch.stack([duplicate for _, duplicate in results]) if self.rpf_ignore_duplicates else None
        else:
            assignments = one_to_many_assign(logits.detach(), boxes.detach(), targets, **self.o2m)
            duplicates = None
        return self.one_to_many_losses(logits, boxes, targets, assignments, duplicates)

    def one_to_one_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], num_boxes: Tensor,
                          pairs: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Hungarian matching (unless ``pairs`` is given), then focal loss (all queries x classes) and L1/GIoU
        (matched), each / ``num_boxes``."""
        if pairs is None:
            pairs = self.matcher(logits.detach(), boxes.detach(), targets)
        batch_idx, pred_idx, labels, target_boxes = _flatten_pairs(targets, pairs)
        onehot = _one_hot_at(logits, batch_idx, pred_idx, labels)
        focal = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma, reduction="sum")
        bbox, giou = box_losses(boxes[batch_idx, pred_idx], target_boxes, num_boxes, anchor=boxes)
        return focal / num_boxes, bbox, giou

    def one_to_many_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], assignments: list[Assignment],
                           duplicates: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Quality focal loss with soft targets, weighted L1/GIoU; all / ``max(1, sum of weights over processes)``.

        ``duplicates (B, Q)`` bool (RPF): those predictions get no classification loss at all.
        """
        pairs = [(assigned.pred_idx, assigned.tgt_idx) for assigned in assignments]
        batch_idx, pred_idx, labels, target_boxes = _flatten_pairs(targets, pairs)
        weight = torch.cat([assigned.weight for assigned in assignments]).float()
        normalizer = global_mean(weight.sum()).clamp(min=1.0)
        soft_targets = torch.zeros_like(logits, dtype=torch.float32)
        soft_targets[batch_idx, pred_idx, labels] = weight
        class_loss = quality_focal_loss(logits, soft_targets, self.focal_gamma)
        if duplicates is not None:
            class_loss = class_loss.masked_fill(duplicates[..., None], 0.0)
        bbox, giou = box_losses(boxes[batch_idx, pred_idx], target_boxes, normalizer, weight, anchor=boxes)
        return class_loss.sum() / normalizer, bbox, giou

    def denoising_losses(self, logits: Tensor, boxes: Tensor, targets: list[dict], meta,
                         num_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Denoising losses of one layer: ``(B, Ndn, C)``, ``(B, Ndn, 4)`` laid out as ``meta`` says.

        Query ``2*g*pad + j`` is the positive copy of target j in group g, ``2*g*pad + pad + j`` its negative.
        Focal loss on positives (target class) and negatives (background); padding slots ``j >= n_b`` carry no
        loss. L1/GIoU on positives. All divided by ``num_boxes * num_groups``.
        """
        pad, num_queries = meta.pad_size, logits.shape[1]
        counts = [len(t["boxes"]) for t in targets]  # shapes: checked on the host without a device sync
        if num_queries != meta.num_queries or num_queries != 2 * meta.num_groups * pad or max(counts) > pad:
            raise ValueError(f"Denoising outputs ({num_queries} queries, {counts} targets) do not fit {meta}.")
        sizes = host_to_device(torch.tensor(counts), logits.device)
        target_idx = torch.arange(num_queries, device=logits.device) % pad
        valid = target_idx[None] < sizes[:, None]  # (B, Ndn): positive and negative slots of real targets
        pairs = _denoising_pairs(counts, meta.num_groups, pad, logits.device)
        batch_idx, query_idx, labels, target_boxes = _flatten_pairs(targets, pairs)
        onehot = _one_hot_at(logits, batch_idx, query_idx, labels)
        focal = sigmoid_focal_loss(logits.float(), onehot, self.focal_alpha, self.focal_gamma)
        normalizer = num_boxes * meta.num_groups
        if not self.denoising_padding_is_background:
            focal = focal * valid[..., None]
        focal = focal.sum() / normalizer
        bbox, giou = box_losses(boxes[batch_idx, query_idx], target_boxes, normalizer, anchor=boxes)
        return focal, bbox, giou
