"""Query modules for unlabeled images: Sparse Semi-DETR's Query Refinement Module and Semi-DETR's projector.

Both turn pseudo-boxes of the teacher's weak view into content queries that join the decoder input as extra
query groups (``query_groups.py``); a consistency loss between the student's and the teacher's decoded
queries trains them.

- ``extract_roi_features``: parameter-free RoIAlign of xyxy pixel boxes on chosen neck levels.
- ``QueryRefinementModule`` (``query_mode="refined"``): attention on the low-resolution RoIs, mean pooling of
  the high-resolution RoIs, cosine-similarity matching that drops duplicates (``n' <= n``), and a linear
  fusion of each kept low-resolution feature with its high-resolution partner (SPEC §3). It also returns an
  alignment loss (``partner_alignment_loss``) that trains the similarity to pair each box with itself.
- ``CrossViewProjector`` (``query_mode="cross_view"``): Semi-DETR's multi-level RoIAlign + conv/FC projector.
- ``query_consistency_loss``: MSE of L2-normalized decoder states, summed over decoder layers.

See docs/method.md for what each step does and why.
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .query_groups import QueryGroup, pack_query_group

ROI_SAMPLING_RATIO = 2
"""Bilinear samples per bin side. Fixed (not mmdet's adaptive 0) so the cost of a box does not grow with its size."""

MMDET_FINEST_SCALE = 56
"""mmdet ``SingleRoIExtractor.finest_scale``: boxes with sqrt(area) < 112 px go to the finest level."""

CROSS_VIEW_HIDDEN_DIM = 1024
"""Width of the fully connected layer of Semi-DETR's ``Projector``."""


def boxes_to_rois(boxes: Sequence[Tensor], reference: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate per-image boxes into torchvision's RoI format.

    Args:
        boxes: one ``(n_i, 4)`` xyxy tensor per image (``n_i = 0`` allowed).
        reference: the feature map: the RoIs take its device and its dtype promoted to at least float32
            (bfloat16 would round pixel coordinates by up to 4 px at 1000 px).
    Returns:
        ``rois (N, 5)`` rows ``[image, x0, y0, x1, y1]`` and ``batch_index (N,)`` long, ``N = sum(n_i)``.
    """
    device, dtype = reference.device, torch.promote_types(reference.dtype, torch.float32)
    counts = torch.tensor([len(b) for b in boxes], device=device, dtype=torch.long)
    batch_index = torch.repeat_interleave(torch.arange(len(boxes), device=device), counts)
    flat = torch.cat([b.reshape(-1, 4).to(device=device, dtype=dtype) for b in boxes], dim=0)
    rois = torch.cat([batch_index.to(dtype)[:, None], flat], dim=1)
    return rois, batch_index


def _roi_align(feature: Tensor, rois: Tensor, output_size: int, stride: int, sampling_ratio: int) -> Tensor:
    """``torchvision.ops.roi_align`` (aligned) computed in the RoIs' dtype, returned in the feature's dtype."""
    pooled = roi_align(feature.to(rois.dtype), rois, output_size, 1.0 / stride, sampling_ratio, aligned=True)
    return pooled.to(feature.dtype)


def extract_roi_features(
    features: Sequence[Tensor],
    boxes: Sequence[Tensor],
    strides: Sequence[int],
    levels: Sequence[int],
    output_size: int = 7,
    sampling_ratio: int = ROI_SAMPLING_RATIO,
) -> tuple[list[Tensor], Tensor]:
    """RoIAlign of the same boxes on several feature levels (no parameters, fine under ``torch.no_grad``).

    Args:
        features: all levels, ``(B, D, H_l, W_l)`` each.
        boxes: ``B`` tensors ``(n_i, 4)``, xyxy in absolute pixels of the padded input tensor of that view.
        strides: the stride of every level in ``features`` (same length).
        levels: indices into ``features`` to pool from.
        output_size: ``s``, the side of the pooled grid.
        sampling_ratio: bilinear samples per bin side (see ``ROI_SAMPLING_RATIO``).
    Returns:
        ``([ (N, D, s, s) for each level in levels ], batch_index (N,))``; boxes are in image order.
    """
    _check_levels(features, boxes, strides)
    rois, batch_index = boxes_to_rois(boxes, features[0])
    pooled = [_roi_align(features[level], rois, output_size, strides[level], sampling_ratio) for level in levels]
    return pooled, batch_index


def _check_levels(features: Sequence[Tensor], boxes: Sequence[Tensor], strides: Sequence[int]) -> None:
    if len(features) != len(strides):
        raise ValueError(f"Got {len(features)} feature levels but {len(strides)} strides.")
    if len(boxes) != features[0].shape[0]:
        raise ValueError(f"Got boxes for {len(boxes)} images but features for {features[0].shape[0]}.")


@dataclass
class RefinedQueries:
    """Output of the Query Refinement Module.

    Attributes:
        content: ``(N', D)`` refined content queries.
        batch_index: ``(N',)`` long, the image of each query.
        keep: ``(N',)`` long, ascending indices into the ``N`` input boxes (take their anchors with it).
        partner: ``(N',)`` long, index into the ``N`` inputs of the high-resolution feature each query was fused
            with (equals ``keep`` without the similarity step).
        alignment_loss: float32 scalar, ``partner_alignment_loss`` of the similarity matrix (unweighted: the caller
            multiplies by ``config.qrm_alignment_loss_coefficient``). A zero connected to the module's encoders when
            no image has 2 boxes, when ``qrm_use_similarity`` is False or when that coefficient is 0.
    """

    content: Tensor
    batch_index: Tensor
    keep: Tensor
    partner: Tensor
    alignment_loss: Tensor


class RoiAttentionPool(nn.Module):
    """``(N, D_in, s, s) -> (N, D_out)``: 1×1 conv to ``reduced_dim``, multi-head self-attention over the
    ``s*s`` cells (pre-LayerNorm, learned cell position on queries and keys, residual), mean over cells, linear."""

    def __init__(self, in_dim: int, reduced_dim: int, num_heads: int, roi_size: int, out_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.roi_size = roi_size
        self.reduce = nn.Conv2d(in_dim, reduced_dim, kernel_size=1)
        self.norm = nn.LayerNorm(reduced_dim)
        self.cell_embed = nn.Embedding(roi_size * roi_size, reduced_dim)
        self.query_key = nn.Linear(reduced_dim, 2 * reduced_dim)
        self.value = nn.Linear(reduced_dim, reduced_dim)
        self.out_proj = nn.Linear(reduced_dim, reduced_dim)
        self.proj = nn.Linear(reduced_dim, out_dim)

    def forward(self, rois: Tensor) -> Tensor:
        if rois.shape[-2:] != (self.roi_size, self.roi_size):
            raise ValueError(f"Expected RoIs of {self.roi_size}x{self.roi_size} cells, got {tuple(rois.shape[-2:])}.")
        tokens = self.reduce(rois).flatten(2).transpose(1, 2)  # (N, s*s, r)
        normed = self.norm(tokens)
        query, key = self.query_key(normed + self.cell_embed.weight).chunk(2, dim=-1)
        value = self.value(normed)
        attended = F.scaled_dot_product_attention(*(self._split_heads(x) for x in (query, key, value)))
        attended = attended.transpose(1, 2).reshape(tokens.shape)
        tokens = tokens + self.out_proj(attended)
        return self.proj(tokens.mean(dim=1))

    def _split_heads(self, x: Tensor) -> Tensor:
        """``(N, S, r) -> (N, heads, S, r / heads)``."""
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)


class RoiMeanPool(nn.Module):
    """``(N, D_in, s, s) -> (N, D_out)``: mean over the cells, then one linear layer (no MLP stack)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, rois: Tensor) -> Tensor:
        return self.proj(rois.mean(dim=(2, 3)))


def same_image_similarity(low: Tensor, high: Tensor, batch_index: Tensor) -> Tensor:
    """Cosine similarity ``S = norm(low) · norm(high)ᵀ`` in float32, ``-inf`` between boxes of different images.

    Args:
        low: ``(N, D)`` attended low-resolution features ``a``; high: ``(N, D)`` pooled high-resolution features ``h``.
        batch_index: ``(N,)`` long image of every box.
    Returns:
        ``(N, N)`` float32, differentiable in ``low`` and ``high``; every row has its diagonal entry finite.
    """
    similarity = F.normalize(low.float(), dim=-1) @ F.normalize(high.float(), dim=-1).T
    same_image = batch_index[:, None] == batch_index[None, :]
    return similarity.masked_fill(~same_image, float("-inf"))


def select_partners(similarity: Tensor, scores: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Partner choice and drop rule on a ``same_image_similarity`` matrix ``(N, N)`` (no gradient).

    Partner ``σ(i) = argmax_j S_ij`` (first index on ties). Box ``i`` is kept iff ``S_iσ(i) >= threshold`` and no
    better-scoring box that passed the threshold has the same partner (equal scores: the lower index wins).

    Args:
        similarity: ``(N, N)``, ``-inf`` across images. scores: ``(N,)`` teacher scores (priority).
    Returns:
        ``keep (N',)`` ascending indices and ``partner (N',)`` = ``σ(keep)``, both into the ``N`` boxes.
    """
    num = similarity.shape[0]
    if num == 0:
        empty = torch.zeros(0, dtype=torch.long, device=similarity.device)
        return empty, empty
    with torch.no_grad():
        best, partner = similarity.max(dim=1)
        rank = torch.empty_like(partner)
        rank[torch.argsort(scores, descending=True, stable=True)] = torch.arange(num, device=rank.device)
        candidate = best >= threshold
        never = torch.full_like(rank, num)
        winner = never.scatter_reduce(0, partner[candidate], rank[candidate], reduce="amin")
        kept = candidate & (rank == winner[partner])
        keep = torch.nonzero(kept).squeeze(1)
    return keep, partner[keep]


def match_query_partners(
    low: Tensor, high: Tensor, batch_index: Tensor, scores: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """Similarity step of the QRM: pair every box with its most similar high-resolution feature, drop the rest.

    ``select_partners(same_image_similarity(low, high, batch_index), scores, threshold)`` without gradient.

    Args:
        low: ``(N, D)`` attended low-resolution features ``a``.
        high: ``(N, D)`` pooled high-resolution features ``h``.
        batch_index: ``(N,)`` long image of every box.
        scores: ``(N,)`` teacher scores of the pseudo-boxes (priority).
        threshold: minimum best cosine similarity.
    Returns:
        ``keep (N',)`` ascending indices and ``partner (N',)`` = ``σ(keep)``, both into the ``N`` boxes.
    """
    with torch.no_grad():
        return select_partners(same_image_similarity(low, high, batch_index), scores, threshold)


def partner_alignment_loss(similarity: Tensor, temperature: float) -> Tensor:
    """InfoNCE with target ``σ(i) = i``: ``mean_i -log softmax_j(S_ij / T)[i]`` over the boxes of the same image.

    Trains the similarity to mean "same object": each box's low-resolution feature should be closest to its own
    high-resolution feature. Rows with fewer than 2 finite entries (the only box of its image) carry no
    information and are left out of the mean; exact duplicates cannot be separated and keep colliding.

    Args:
        similarity: ``(N, N)`` from ``same_image_similarity`` (``-inf`` across images).
        temperature: ``T > 0``.
    Returns:
        A float32 scalar; a zero connected to ``similarity`` when no row has 2 candidates (``N = 0`` included).
    """
    log_probs = (similarity / temperature).log_softmax(dim=1).diagonal()  # finite: the diagonal is same-image
    counted = torch.isfinite(similarity).sum(dim=1) >= 2
    return -(log_probs * counted).sum() / counted.sum().clamp(min=1)


def projector_convs(dim: int) -> nn.Sequential:
    """Semi-DETR's ``Projector`` convolutions on RoI maps, ``(N, D, s, s) -> (N, D, s, s)``: conv3×3 (no bias),
    BatchNorm2d, ReLU, twice."""
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
        nn.Conv2d(dim, dim, 3, padding=1, bias=False), nn.BatchNorm2d(dim), nn.ReLU(inplace=True),
    )


class QueryRefinementModule(nn.Module):
    """Sparse Semi-DETR's Query Refinement Module (SPEC §3, steps 2-5) and its alignment loss (docs/method.md).

    Config fields: ``d_model``, ``qrm_reduced_dim``, ``qrm_attention_heads``, ``qrm_roi_size``,
    ``qrm_attention_on`` (``low|high|both|none``: which RoI set goes through ``RoiAttentionPool``; the other
    is mean-pooled), ``qrm_use_similarity``, ``qrm_similarity_threshold``, ``qrm_alignment_temperature``,
    ``qrm_alignment_loss_coefficient`` (0: the alignment loss is not computed and returned as zero) and
    ``qrm_mlp_projector`` (the paper's Table 5(c) ablation: each RoI set first goes through Semi-DETR's projector
    convolutions, ``projector_convs``).
    """

    def __init__(self, config):
        super().__init__()
        self.high_projector = projector_convs(config.d_model) if config.qrm_mlp_projector else None
        self.low_projector = projector_convs(config.d_model) if config.qrm_mlp_projector else None
        self.use_similarity = config.qrm_use_similarity
        self.similarity_threshold = config.qrm_similarity_threshold
        self.alignment_temperature = config.qrm_alignment_temperature
        self.use_alignment = config.qrm_use_similarity and config.qrm_alignment_loss_coefficient > 0
        self.low_encoder = self._branch(config, attend=config.qrm_attention_on in ("low", "both"))
        self.high_encoder = self._branch(config, attend=config.qrm_attention_on in ("high", "both"))
        self.fuse = nn.Linear(2 * config.d_model, config.d_model)

    @staticmethod
    def _branch(config, attend: bool) -> nn.Module:
        if attend:
            return RoiAttentionPool(
                config.d_model, config.qrm_reduced_dim, config.qrm_attention_heads, config.qrm_roi_size, config.d_model
            )
        return RoiMeanPool(config.d_model, config.d_model)

    def forward(self, high_rois: Tensor, low_rois: Tensor, batch_index: Tensor, scores: Tensor) -> RefinedQueries:
        """Refine and sparsify the queries of ``N`` pseudo-boxes.

        Args:
            high_rois: ``(N, D, s, s)`` RoIs on the high-resolution level (stride 8 by default).
            low_rois: ``(N, D, s, s)`` RoIs of the same boxes on the low-resolution level (stride 32).
            batch_index: ``(N,)`` long image of every box.
            scores: ``(N,)`` pseudo-label scores; higher wins when two boxes pick the same partner.
        Returns:
            ``RefinedQueries`` with ``N' <= N`` queries and the (unweighted) alignment loss; ``N' = 0`` gives
            empty, still graph-connected tensors.
        """
        num = high_rois.shape[0]
        if not (low_rois.shape[0] == batch_index.shape[0] == scores.shape[0] == num):
            raise ValueError(
                f"high_rois, low_rois, batch_index and scores disagree on N: {num}, {low_rois.shape[0]}, "
                f"{batch_index.shape[0]}, {scores.shape[0]}."
            )
        if self.high_projector is not None:
            high_rois, low_rois = self.high_projector(high_rois), self.low_projector(low_rois)
        low = self.low_encoder(low_rois)
        high = self.high_encoder(high_rois)
        if self.use_similarity:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.use_alignment):
                similarity = same_image_similarity(low, high, batch_index)
            keep, partner = select_partners(similarity.detach(), scores, self.similarity_threshold)
        else:
            keep = partner = torch.arange(num, device=batch_index.device)
        if self.use_alignment:
            alignment_loss = partner_alignment_loss(similarity, self.alignment_temperature)
        else:
            alignment_loss = (low.float().sum() + high.float().sum()) * 0.0  # connected zero
        content = self.fuse(torch.cat([low[keep], high[partner]], dim=-1))
        return RefinedQueries(content, batch_index[keep], keep, partner, alignment_loss)


def refined_query_group(
    refined: RefinedQueries, anchors: Tensor, batch_size: int, see_matching: bool = True
) -> QueryGroup:
    """Pack refined queries into one extra decoder group.

    Args:
        refined: the QRM output.
        anchors: ``(N, 4)`` cxcywh in ``[0, 1]`` of the view being decoded, for all ``N`` QRM input boxes
            (the student's strong-view or the teacher's weak-view boxes); ``refined.keep`` selects from them.
        batch_size: ``B``.
    """
    return pack_query_group(refined.content, anchors[refined.keep], refined.batch_index, batch_size, see_matching)


def assign_roi_levels(boxes: Tensor, num_levels: int, finest_scale: int = MMDET_FINEST_SCALE) -> Tensor:
    """mmdet's level of each box: ``floor(log2(sqrt(area) / finest_scale + 1e-6))`` clamped to ``0..L-1``.

    Args:
        boxes: ``(N, 4)`` xyxy in pixels of the input.
    Returns:
        ``(N,)`` long level indices.
    """
    scale = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
    levels = torch.floor(torch.log2(scale / finest_scale + 1e-6))
    return levels.clamp(0, num_levels - 1).long()


def multi_level_roi_align(
    features: Sequence[Tensor], rois: Tensor, strides: Sequence[int], output_size: int
) -> Tensor:
    """RoIAlign of each RoI on its mmdet level (``assign_roi_levels``).

    Args:
        features: ``L`` maps ``(B, D, H_l, W_l)``; strides: their ``L`` strides.
        rois: ``(N, 5)`` rows ``[image, x0, y0, x1, y1]`` in input pixels.
    Returns:
        ``(N, D, s, s)``.
    """
    levels = assign_roi_levels(rois[:, 1:], len(features))
    pooled = features[0].new_zeros(rois.shape[0], features[0].shape[1], output_size, output_size)
    for level, feature in enumerate(features):
        index = torch.nonzero(levels == level).squeeze(1)
        level_rois = _roi_align(feature, rois[index], output_size, strides[level], ROI_SAMPLING_RATIO)
        pooled = pooled.index_copy(0, index, level_rois)
    return pooled


class SmallBatchBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` that normalizes with its running statistics (and leaves them untouched) when a
    training-mode call gets fewer than 2 samples, where batch statistics are undefined."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] < 2:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class CrossViewProjector(nn.Module):
    """Semi-DETR's cross-view query projector: multi-level RoIAlign, two conv3×3-BN-ReLU, FC 1024-BN-ReLU,
    FC ``d_model``-ReLU. Config fields: ``d_model``, ``qrm_roi_size`` (7, Semi-DETR's RoIAlign size)."""

    def __init__(self, config):
        super().__init__()
        dim, self.roi_size = config.d_model, config.qrm_roi_size
        self.convs = projector_convs(dim)
        self.fc = nn.Sequential(
            nn.Linear(dim * self.roi_size**2, CROSS_VIEW_HIDDEN_DIM), SmallBatchBatchNorm1d(CROSS_VIEW_HIDDEN_DIM),
            nn.ReLU(inplace=True), nn.Linear(CROSS_VIEW_HIDDEN_DIM, dim), nn.ReLU(inplace=True),
        )

    def forward(
        self, features: Sequence[Tensor], boxes: Sequence[Tensor], strides: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Content queries of the pseudo-boxes.

        Args:
            features: ``L`` maps ``(B, D, H_l, W_l)`` (the teacher's weak-view neck levels).
            boxes: ``B`` tensors ``(n_i, 4)``, xyxy in pixels of the padded input of that view.
            strides: the ``L`` strides.
        Returns:
            ``content (N, D)`` and ``batch_index (N,)`` long, boxes in image order.
        """
        _check_levels(features, boxes, strides)
        rois, batch_index = boxes_to_rois(boxes, features[0])
        pooled = multi_level_roi_align(features, rois, strides, self.roi_size)
        return self.fc(self.convs(pooled).flatten(1)), batch_index


def cross_view_query_groups(
    content: Tensor, anchors: Tensor, batch_index: Tensor, batch_size: int, num_groups: int, see_matching: bool = True
) -> list[QueryGroup]:
    """``num_groups`` identical extra groups of projected queries (Semi-DETR repeats them 5 times).

    Args:
        content: ``(N, D)`` from ``CrossViewProjector``; anchors: ``(N, 4)`` cxcywh in ``[0, 1]`` of the view decoded.
        batch_index: ``(N,)`` long; batch_size: ``B``; num_groups: ``config.cross_view_groups``.
    """
    group = pack_query_group(content, anchors, batch_index, batch_size, see_matching)
    return [dataclasses.replace(group) for _ in range(num_groups)]


def query_consistency_loss(student_states: Tensor, teacher_states: Tensor, valid: Tensor) -> Tensor:
    """Semi-DETR's query consistency: ``sum_l mean_valid MSE(l2norm(h_s[l]), stopgrad(l2norm(h_t[l])))``.

    The mean runs over valid queries and channels; padding slots are ignored (even if non-finite). Computed in
    float32. The coefficient is applied by the caller.

    Args:
        student_states: ``(L, B, n, D)`` decoder hidden states of a query group (student).
        teacher_states: ``(L, B, n, D)`` the same group decoded by the teacher (gets no gradient).
        valid: ``(B, n)`` bool, ``False`` on padding slots.
    Returns:
        A scalar; ``0`` connected to ``student_states`` when no query is valid.
    """
    if student_states.shape != teacher_states.shape or student_states.shape[1:3] != valid.shape:
        raise ValueError(
            f"Shapes disagree: student {tuple(student_states.shape)}, teacher {tuple(teacher_states.shape)}, "
            f"valid {tuple(valid.shape)}."
        )
    student = student_states[:, valid]  # (L, N_valid, D)
    if student.shape[1] == 0:
        return student.float().sum()
    student = F.normalize(student.float(), dim=-1)
    teacher = F.normalize(teacher_states.detach()[:, valid].float(), dim=-1)
    return F.mse_loss(student, teacher, reduction="none").mean(dim=(1, 2)).sum()
