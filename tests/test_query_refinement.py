"""Tests of the QRM, the cross-view projector, RoI extraction and the query consistency loss."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from sparse_semi_detr_hf.configuration_sparse_semi_detr import SparseSemiDetrConfig
from sparse_semi_detr_hf.query_refinement import (
    CrossViewProjector,
    QueryRefinementModule,
    RoiAttentionPool,
    RoiMeanPool,
    assign_roi_levels,
    boxes_to_rois,
    cross_view_query_groups,
    extract_roi_features,
    match_query_partners,
    multi_level_roi_align,
    partner_alignment_loss,
    query_consistency_loss,
    refined_query_group,
    same_image_similarity,
)

D = 32
STRIDES = [8, 16, 32, 64]
IMAGE = 128  # padded input side in pixels


def make_config(**kwargs) -> SparseSemiDetrConfig:
    defaults = dict(d_model=D, qrm_reduced_dim=16, qrm_attention_heads=4, qrm_roi_size=4)
    defaults.update(kwargs)
    return SparseSemiDetrConfig(**defaults)


def make_features(batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, D, IMAGE // s, IMAGE // s, generator=generator) for s in STRIDES]


def random_boxes(n: int, generator: torch.Generator, min_size: float = 8.0, max_size: float = 60.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * (IMAGE - max_size)
    wh = min_size + torch.rand(n, 2, generator=generator) * (max_size - min_size)
    return torch.cat([xy, xy + wh], dim=1)


def qrm_inputs(counts: list[int], seed: int = 0, roi_size: int = 4):
    generator = torch.Generator().manual_seed(seed)
    boxes = [random_boxes(n, generator) for n in counts]
    (high, low), batch_index = extract_roi_features(make_features(len(counts), seed), boxes, STRIDES, [0, 2], roi_size)
    scores = torch.rand(len(batch_index), generator=generator)
    return high, low, batch_index, scores


def seeded_qrm(seed: int = 0, **kwargs) -> QueryRefinementModule:
    torch.manual_seed(seed)
    return QueryRefinementModule(make_config(**kwargs))


# ---------------------------------------------------------------------------------------------- RoI extraction


def test_extract_roi_features_equals_torchvision_roi_align():
    generator = torch.Generator().manual_seed(1)
    features = make_features(3, seed=1)
    boxes = [random_boxes(2, generator), torch.zeros(0, 4), random_boxes(3, generator)]
    (high, low), batch_index = extract_roi_features(features, boxes, STRIDES, [0, 2], output_size=5)
    torch.testing.assert_close(batch_index, torch.tensor([0, 0, 2, 2, 2]))
    for pooled, level in ((high, 0), (low, 2)):
        expected = roi_align(features[level], boxes, 5, 1.0 / STRIDES[level], sampling_ratio=2, aligned=True)
        assert pooled.shape == (5, D, 5, 5)
        torch.testing.assert_close(pooled, expected)


def test_extract_roi_features_keeps_pixel_precision_for_bfloat16_maps():
    features = [f.to(torch.bfloat16) for f in make_features(1)]
    boxes = [torch.tensor([[3.3, 7.1, 120.7, 101.9], [0.0, 0.0, 127.0, 127.0]])]
    (pooled,), _ = extract_roi_features(features, boxes, STRIDES, [0], output_size=3)
    expected = roi_align(features[0].float(), boxes, 3, 1.0 / 8, sampling_ratio=2, aligned=True)
    assert pooled.dtype == torch.bfloat16
    torch.testing.assert_close(pooled, expected.to(torch.bfloat16))


def test_extract_roi_features_without_any_box():
    pooled, batch_index = extract_roi_features(make_features(2), [torch.zeros(0, 4)] * 2, STRIDES, [0, 2, 3])
    assert [p.shape for p in pooled] == [(0, D, 7, 7)] * 3
    assert batch_index.shape == (0,) and batch_index.dtype == torch.long


def test_extract_roi_features_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="strides"):
        extract_roi_features(make_features(1), [torch.zeros(0, 4)], STRIDES[:3], [0])
    with pytest.raises(ValueError, match="images"):
        extract_roi_features(make_features(2), [torch.zeros(0, 4)], STRIDES, [0])


# ---------------------------------------------------------------------------------------------- similarity step


def test_match_query_partners_rule():
    # image 0: boxes 0, 1, 2; image 1: boxes 3, 4, 5. Unit vectors make the similarities exact.
    e = torch.eye(4)
    low = torch.stack([e[0], e[0], e[3] + e[2], e[1], e[1], -(e[0] + e[1] + e[3])])
    high = torch.stack([e[0], e[1], e[3], e[1], e[3], e[0]])
    batch_index = torch.tensor([0, 0, 0, 1, 1, 1])
    scores = torch.tensor([0.3, 0.9, 0.8, 0.5, 0.5, 0.99])
    keep, partner = match_query_partners(low, high, batch_index, scores, threshold=0.5)
    # boxes 0 and 1 both pick partner 0 (not 5: other image) -> the better-scoring box 1 wins; box 2 pairs with 2
    # (similarity 0.71); boxes 3 and 4 pick partner 3 with equal scores -> the lower index wins; box 5's best
    # similarity is negative: dropped, and it does not take partner 3 from box 3 despite its higher score.
    torch.testing.assert_close(keep, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(partner, torch.tensor([0, 2, 3]))
    keep, partner = match_query_partners(low, high, batch_index, scores, threshold=0.8)
    torch.testing.assert_close(keep, torch.tensor([1, 3]))
    torch.testing.assert_close(partner, torch.tensor([0, 3]))
    keep, _ = match_query_partners(low, high, batch_index, scores, threshold=-1.0)
    torch.testing.assert_close(keep, torch.tensor([1, 2, 5]))  # now box 5 (score 0.99) takes partner 3


def test_match_query_partners_never_crosses_images():
    generator = torch.Generator().manual_seed(3)
    low, high = torch.randn(12, 8, generator=generator), torch.randn(12, 8, generator=generator)
    batch_index = torch.tensor([0] * 5 + [1] * 1 + [2] * 6)
    keep, partner = match_query_partners(low, high, batch_index, torch.rand(12, generator=generator), -1.0)
    assert torch.equal(batch_index[keep], batch_index[partner])
    assert len(set(partner.tolist())) == len(partner)  # every partner is used once
    assert set(batch_index[keep].tolist()) == {0, 1, 2}  # threshold -1: every image keeps a query


# ---------------------------------------------------------------------------------------------- QRM


@pytest.mark.parametrize("attention_on", ["low", "high", "both", "none"])
def test_qrm_variants_run_and_never_add_queries(attention_on):
    qrm = seeded_qrm(qrm_attention_on=attention_on)
    assert isinstance(qrm.low_encoder, RoiAttentionPool) == (attention_on in ("low", "both"))
    assert isinstance(qrm.high_encoder, RoiAttentionPool) == (attention_on in ("high", "both"))
    assert isinstance(qrm.high_encoder, RoiMeanPool) == (attention_on in ("low", "none"))
    for seed in range(3):
        high, low, batch_index, scores = qrm_inputs([4, 0, 7], seed=seed)
        out = qrm(high, low, batch_index, scores)
        num = len(out.keep)
        assert 0 < num <= len(batch_index)
        assert out.content.shape == (num, D) and out.batch_index.shape == (num,) and out.partner.shape == (num,)
        assert torch.all(out.keep[1:] > out.keep[:-1])
        torch.testing.assert_close(out.batch_index, batch_index[out.keep])


def test_qrm_drops_a_duplicate_pseudo_box():
    qrm = seeded_qrm(qrm_similarity_threshold=-1.0)
    generator = torch.Generator().manual_seed(5)
    boxes = [random_boxes(3, generator), random_boxes(2, generator)]
    boxes[0][2] = boxes[0][0]  # box 2 duplicates box 0
    (high, low), batch_index = extract_roi_features(make_features(2, 5), boxes, STRIDES, [0, 2], 4)
    scores = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9])
    out = qrm(high, low, batch_index, scores)
    kept = set(out.keep.tolist())
    assert len(out.keep) < len(batch_index)
    assert 2 in kept and 0 not in kept  # the higher-scoring copy survives


def test_qrm_without_similarity_keeps_all_and_pairs_each_box_with_itself():
    qrm = seeded_qrm(qrm_use_similarity=False)
    high, low, batch_index, scores = qrm_inputs([3, 5])
    out = qrm(high, low, batch_index, scores)
    torch.testing.assert_close(out.keep, torch.arange(8))
    torch.testing.assert_close(out.partner, torch.arange(8))
    expected = qrm.fuse(torch.cat([qrm.low_encoder(low), qrm.high_encoder(high)], dim=-1))
    torch.testing.assert_close(out.content, expected)


@pytest.mark.parametrize("counts", [[0, 0], [0, 3], [0], [2, 0, 1]])
@pytest.mark.parametrize("use_similarity", [True, False])
def test_qrm_with_empty_images(counts, use_similarity):
    qrm = seeded_qrm(qrm_use_similarity=use_similarity, qrm_similarity_threshold=-1.0)
    high, low, batch_index, scores = qrm_inputs(counts)
    out = qrm(high, low, batch_index, scores)
    assert set(out.batch_index.tolist()) == {i for i, n in enumerate(counts) if n}  # threshold -1: >= 1 per image
    assert out.content.shape == (len(out.keep), D) and out.keep.dtype == torch.long
    if sum(counts) == 0:
        out.content.sum().backward()  # still graph-connected: all parameters get (zero) gradients
        assert all(p.grad is not None for p in qrm.parameters())


@pytest.mark.parametrize("attention_on", ["low", "high", "both", "none"])
@pytest.mark.parametrize("use_similarity", [True, False])
def test_qrm_gradients_reach_every_parameter(attention_on, use_similarity):
    qrm = seeded_qrm(qrm_attention_on=attention_on, qrm_use_similarity=use_similarity)
    high, low, batch_index, scores = qrm_inputs([3, 4])
    out = qrm(high, low, batch_index, scores)
    assert len(out.keep) > 0
    out.content.sum().backward()
    for name, parameter in qrm.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_qrm_mlp_projector_runs_semi_detr_convs_on_both_roi_sets_first():
    """Table 5(c)'s "MLP" arm: each RoI set goes through its own projector stack before the QRM branches."""
    qrm = seeded_qrm(qrm_use_similarity=False, qrm_mlp_projector=True)
    assert seeded_qrm().high_projector is None and seeded_qrm().low_projector is None
    assert [type(m) for m in qrm.low_projector] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] * 2
    high, low, batch_index, scores = qrm_inputs([3, 5])
    out = qrm(high, low, batch_index, scores)
    projected_low, projected_high = qrm.low_projector(low), qrm.high_projector(high)
    expected = qrm.fuse(torch.cat([qrm.low_encoder(projected_low), qrm.high_encoder(projected_high)], dim=-1))
    torch.testing.assert_close(out.content, expected)
    plain = qrm.fuse(torch.cat([qrm.low_encoder(low), qrm.high_encoder(high)], dim=-1))
    assert not torch.allclose(out.content, plain)
    out.content.sum().backward()
    for name, parameter in qrm.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("counts", [[0, 0], [1, 0]])
def test_qrm_mlp_projector_with_zero_or_one_box(counts):
    qrm = seeded_qrm(qrm_mlp_projector=True)
    out = qrm(*qrm_inputs(counts))
    assert out.content.shape == (sum(counts), D)
    (out.content.sum() + out.alignment_loss).backward()
    assert all(p.grad is not None for p in qrm.parameters())


def test_qrm_images_do_not_interact():
    qrm = seeded_qrm()
    high, low, batch_index, scores = qrm_inputs([4, 5], seed=2)
    reference = qrm(high, low, batch_index, scores)
    image1 = batch_index == 1
    high2, low2 = high.clone(), low.clone()
    high2[image1] = torch.randn_like(high2[image1])
    low2[image1] = torch.randn_like(low2[image1])
    changed = qrm(high2, low2, batch_index, scores)
    assert not torch.allclose(high, high2)
    ref0, new0 = reference.batch_index == 0, changed.batch_index == 0
    torch.testing.assert_close(changed.keep[new0], reference.keep[ref0])
    torch.testing.assert_close(changed.content[new0], reference.content[ref0])


def test_qrm_rejects_mismatched_inputs():
    high, low, batch_index, scores = qrm_inputs([2, 2])
    with pytest.raises(ValueError, match="disagree"):
        seeded_qrm()(high, low[:3], batch_index, scores)
    with pytest.raises(ValueError, match="cells"):
        seeded_qrm()(high, low[..., :3, :3], batch_index, scores)


def test_refined_query_group_takes_the_anchors_of_kept_boxes():
    qrm = seeded_qrm()
    high, low, batch_index, scores = qrm_inputs([3, 0, 4])
    out = qrm(high, low, batch_index, scores)
    anchors = torch.rand(len(batch_index), 4)
    group = refined_query_group(out, anchors, batch_size=3, see_matching=False)
    assert group.valid.sum() == len(out.keep) and not group.see_matching and not group.valid[1].any()
    torch.testing.assert_close(group.anchors[group.valid], anchors[out.keep])
    torch.testing.assert_close(group.content[group.valid], out.content)


# ---------------------------------------------------------------------------------------------- alignment loss


def test_alignment_config_fields():
    config = make_config()
    assert config.qrm_alignment_temperature == 0.1 and config.qrm_alignment_loss_coefficient == 1.0
    for field, value in (("qrm_alignment_temperature", 0.0), ("qrm_alignment_temperature", -0.1),
                         ("qrm_alignment_loss_coefficient", -1.0)):
        with pytest.raises(ValueError, match=field):
            make_config(**{field: value})
    make_config(qrm_alignment_loss_coefficient=0.0)


def test_alignment_loss_is_the_per_image_infonce():
    qrm = seeded_qrm(qrm_alignment_temperature=0.2)
    high, low, batch_index, scores = qrm_inputs([3, 1, 0, 4], seed=4)
    out = qrm(high, low, batch_index, scores)
    a, h = qrm.low_encoder(low), qrm.high_encoder(high)
    total = 0.0
    for image in (0, 3):  # image 1 has one box: no candidates to tell apart, left out of the mean
        rows = batch_index == image
        logits = F.normalize(a[rows], dim=-1) @ F.normalize(h[rows], dim=-1).T / 0.2
        total = total + F.cross_entropy(logits, torch.arange(int(rows.sum())), reduction="sum")
    assert out.alignment_loss.dtype == torch.float32 and out.alignment_loss.shape == ()
    torch.testing.assert_close(out.alignment_loss, total / 7)
    assert out.alignment_loss > 0
    out.alignment_loss.backward()
    for name, parameter in [*qrm.low_encoder.named_parameters(), *qrm.high_encoder.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in qrm.fuse.parameters())  # the loss trains the similarity only


def test_partner_alignment_loss_is_small_when_each_box_is_its_own_best_match():
    batch_index = torch.tensor([0, 0, 0, 1, 1])
    features = torch.eye(5)
    matched = same_image_similarity(features, features, batch_index)
    swapped = same_image_similarity(features, features[[1, 0, 2, 4, 3]], batch_index)
    assert partner_alignment_loss(matched, 0.1) < 1e-3
    assert partner_alignment_loss(swapped, 0.1) > 5.0


@pytest.mark.parametrize("counts", [[0, 0], [1], [1, 0, 1]])
def test_alignment_loss_without_two_boxes_in_any_image_is_a_connected_zero(counts):
    qrm = seeded_qrm()
    out = qrm(*qrm_inputs(counts))
    assert out.alignment_loss.item() == 0.0 and out.alignment_loss.requires_grad
    out.alignment_loss.backward()
    for name, parameter in [*qrm.low_encoder.named_parameters(), *qrm.high_encoder.named_parameters()]:
        assert parameter.grad is not None and parameter.grad.abs().sum() == 0, name


@pytest.mark.parametrize("disabled", [{"qrm_alignment_loss_coefficient": 0.0}, {"qrm_use_similarity": False}])
def test_alignment_loss_disabled(disabled):
    inputs = qrm_inputs([4, 3], seed=1)
    reference = seeded_qrm()(*inputs)
    out = seeded_qrm(**disabled)(*inputs)
    assert reference.alignment_loss > 0
    assert out.alignment_loss.item() == 0.0 and out.alignment_loss.requires_grad
    if disabled.get("qrm_use_similarity", True):  # coefficient 0: same selection and queries, no loss
        torch.testing.assert_close(out.keep, reference.keep)
        torch.testing.assert_close(out.content, reference.content)


def test_alignment_loss_images_do_not_interact():
    qrm = seeded_qrm()
    counts = [4, 1, 5]
    high, low, batch_index, scores = qrm_inputs(counts, seed=2)
    total = qrm(high, low, batch_index, scores).alignment_loss
    per_image = []
    for image in (0, 2):
        rows = batch_index == image
        alone = qrm(high[rows], low[rows], torch.zeros(int(rows.sum()), dtype=torch.long), scores[rows])
        per_image.append(alone.alignment_loss * counts[image])
    torch.testing.assert_close(total, sum(per_image) / 9)


def feature_pyramid(batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Levels that see the same scene, as a neck's do: each coarser level average-pools the stride-8 map."""
    fine = F.avg_pool2d(torch.randn(batch_size, D, IMAGE // 8, IMAGE // 8, generator=generator), 3, 1, 1)
    return [fine] + [F.avg_pool2d(fine, s // 8) * (s // 8) ** 0.5 for s in STRIDES[1:]]


def distinct_boxes(n: int, generator: torch.Generator, cells: int = 4) -> torch.Tensor:
    """``n`` boxes in ``n`` different cells of a ``cells x cells`` grid (no overlap), half to full cell size."""
    cell = IMAGE / cells
    index = torch.randperm(cells * cells, generator=generator)[:n]
    corner = torch.stack([index % cells, index // cells], dim=1).float() * cell
    size = cell * (0.5 + 0.5 * torch.rand(n, 2, generator=generator))
    corner = corner + (cell - size) * torch.rand(n, 2, generator=generator)
    return torch.cat([corner, corner + size], dim=1)


def pyramid_inputs(boxes: list[torch.Tensor], generator: torch.Generator):
    (high, low), batch_index = extract_roi_features(feature_pyramid(len(boxes), generator), boxes, STRIDES, [0, 2], 4)
    return high, low, batch_index, torch.rand(len(batch_index), generator=generator)


def distinct_inputs(seed: int, batch_size: int, boxes_per_image: int = 8):
    generator = torch.Generator().manual_seed(seed)
    return pyramid_inputs([distinct_boxes(boxes_per_image, generator) for _ in range(batch_size)], generator)


@pytest.fixture(scope="module")
def aligned_qrm():
    """A QRM trained for 40 steps on the alignment loss alone, fresh distinct boxes every step; with the
    training losses, held-out images and the QRM's output on them before training."""
    qrm = seeded_qrm()
    held_out = distinct_inputs(seed=1000, batch_size=8)
    with torch.no_grad():
        before = qrm(*held_out)
    optimizer = torch.optim.Adam(qrm.parameters(), lr=3e-3)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend with the other tests' processes
    try:
        for step in range(40):
            loss = qrm(*distinct_inputs(seed=step, batch_size=4)).alignment_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    return qrm.eval(), losses, held_out, before


def test_alignment_training_lowers_the_loss(aligned_qrm):
    qrm, losses, held_out, before = aligned_qrm
    assert losses[0] > 1.0  # ~log(8) at initialisation
    assert sum(losses[-5:]) / 5 < 0.4 * sum(losses[:5]) / 5
    with torch.no_grad():
        assert qrm(*held_out).alignment_loss < 0.4 * before.alignment_loss


def test_aligned_qrm_keeps_distinct_boxes_as_their_own_partners(aligned_qrm):
    qrm, _, held_out, before = aligned_qrm
    num = len(held_out[2])
    assert len(before.keep) < 0.7 * num  # untrained: most distinct boxes collide on a few partners and drop
    with torch.no_grad():
        out = qrm(*held_out)
    assert len(out.keep) >= 0.9 * num
    assert (out.keep == out.partner).sum() >= 0.85 * num


@pytest.mark.parametrize("jitter", [0.0, 1.0])
def test_aligned_qrm_still_drops_duplicates(aligned_qrm, jitter):
    qrm = aligned_qrm[0]
    generator = torch.Generator().manual_seed(2000)
    boxes = []
    for _ in range(4):  # per image: 6 distinct boxes, then copies of the first 3 moved by up to `jitter` px
        distinct = distinct_boxes(6, generator)
        shift = (2 * torch.rand(3, 4, generator=generator) - 1) * jitter
        boxes.append(torch.cat([distinct, distinct[:3] + shift]))
    high, low, batch_index, scores = pyramid_inputs(boxes, generator)
    with torch.no_grad():
        kept = set(qrm(high, low, batch_index, scores).keep.tolist())
    pairs_kept = 0
    for original in [9 * image + j for image in range(4) for j in range(3)]:
        copy = original + 6
        winner = original if scores[original] > scores[copy] else copy
        survivors = {original, copy} & kept
        assert survivors <= {winner}, original  # never both copies; a survivor is the higher-scoring copy
        pairs_kept += len(survivors)
    assert pairs_kept >= 10  # of 12 pairs: one copy survives (a pair can also lose its partner to another box)
    distinct_kept = sum(9 * image + j in kept for image in range(4) for j in range(3, 6))
    assert distinct_kept >= 10  # of 12 boxes without a copy


# ---------------------------------------------------------------------------------------------- cross-view projector


def test_assign_roi_levels_by_box_size():
    sides = torch.tensor([0.0, 20.0, 111.0, 112.0, 223.0, 224.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros_like(sides), torch.zeros_like(sides), sides, sides], dim=1)
    torch.testing.assert_close(assign_roi_levels(boxes, 4), torch.tensor([0, 0, 0, 1, 1, 2, 3, 3]))
    wide = torch.tensor([[10.0, 10.0, 10.0 + 448.0, 10.0 + 28.0]])  # sqrt(448 * 28) = 112 -> level 1
    torch.testing.assert_close(assign_roi_levels(wide, 4), torch.tensor([1]))


def test_multi_level_roi_align_pools_each_box_on_its_level():
    features = [torch.randn(2, D, 512 // s, 512 // s) for s in STRIDES]
    boxes = [torch.tensor([[0.0, 0.0, 30.0, 30.0], [10.0, 10.0, 250.0, 250.0]]), torch.tensor([[5.0, 5, 150, 140]])]
    rois, _ = boxes_to_rois(boxes, features[0])
    pooled = multi_level_roi_align(features, rois, STRIDES, 7)
    for row, level in enumerate(assign_roi_levels(rois[:, 1:], 4).tolist()):
        expected = roi_align(features[level], rois[row : row + 1], 7, 1.0 / STRIDES[level], 2, True)
        torch.testing.assert_close(pooled[row : row + 1], expected)
    assert assign_roi_levels(rois[:, 1:], 4).tolist() == [0, 2, 1]


def test_cross_view_projector_shapes_and_small_batches():
    torch.manual_seed(0)
    projector = CrossViewProjector(make_config(qrm_roi_size=7)).train()
    features = make_features(2)
    generator = torch.Generator().manual_seed(0)
    content, batch_index = projector(features, [random_boxes(3, generator), random_boxes(2, generator)], STRIDES)
    assert content.shape == (5, D) and torch.all(content >= 0)
    torch.testing.assert_close(batch_index, torch.tensor([0, 0, 0, 1, 1]))
    fc_norm = projector.fc[1]
    running_mean = fc_norm.running_mean.clone()
    assert not torch.equal(running_mean, torch.zeros_like(running_mean))  # N >= 2 trains the statistics
    for counts in ([0, 0], [1, 0]):
        boxes = [random_boxes(n, generator) for n in counts]
        content, batch_index = projector(features, boxes, STRIDES)
        assert content.shape == (sum(counts), D) and batch_index.shape == (sum(counts),)
        assert torch.isfinite(content).all()
        torch.testing.assert_close(fc_norm.running_mean, running_mean)  # N < 2 leaves them alone
    content.sum().backward()
    assert all(p.grad is not None for p in projector.parameters())


def test_cross_view_query_groups_repeat_the_queries():
    content, anchors = torch.randn(3, D), torch.rand(3, 4)
    groups = cross_view_query_groups(content, anchors, torch.tensor([0, 0, 2]), batch_size=3, num_groups=5)
    assert len(groups) == 5 and len({id(g) for g in groups}) == 5
    for group in groups:
        assert group.content.shape == (3, 2, D)
        torch.testing.assert_close(group.valid, torch.tensor([[True, True], [False, False], [True, False]]))
        torch.testing.assert_close(group.content[group.valid], content)


# ---------------------------------------------------------------------------------------------- consistency loss


def consistency_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 2, 4, 8, generator=generator)
    teacher = torch.randn(3, 2, 4, 8, generator=generator)
    valid = torch.tensor([[True, True, False, False], [True, True, True, False]])
    return student, teacher, valid


def test_consistency_loss_matches_the_per_layer_definition():
    student, teacher, valid = consistency_inputs()
    loss = query_consistency_loss(student, teacher, valid)
    expected = 0.0
    for layer in range(3):
        s = torch.nn.functional.normalize(student[layer][valid], dim=-1)
        t = torch.nn.functional.normalize(teacher[layer][valid], dim=-1)
        expected = expected + ((s - t) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    assert loss > 0


def test_consistency_loss_is_zero_for_equal_directions():
    student, _, valid = consistency_inputs()
    torch.testing.assert_close(query_consistency_loss(student, student.clone(), valid), torch.tensor(0.0))
    torch.testing.assert_close(query_consistency_loss(student, 3.0 * student, valid), torch.tensor(0.0))


def test_consistency_loss_ignores_padding_slots():
    student, teacher, valid = consistency_inputs()
    loss = query_consistency_loss(student, teacher, valid)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[:, ~valid] = float("nan")
    teacher2[:, ~valid] = torch.randn_like(teacher2[:, ~valid])
    torch.testing.assert_close(query_consistency_loss(student2, teacher2, valid), loss)


def test_consistency_loss_gradient_goes_to_the_student_only():
    student, teacher, valid = consistency_inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    query_consistency_loss(student, teacher, valid).backward()
    assert teacher.grad is None
    assert student.grad[:, valid].abs().sum() > 0
    assert student.grad[:, ~valid].abs().sum() == 0


def test_consistency_loss_without_valid_queries_is_a_connected_zero():
    student, teacher, valid = consistency_inputs()
    student.requires_grad_(True)
    loss = query_consistency_loss(student, teacher, torch.zeros_like(valid))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() == 0


def test_consistency_loss_rejects_mismatched_shapes():
    student, teacher, valid = consistency_inputs()
    with pytest.raises(ValueError, match="disagree"):
        query_consistency_loss(student, teacher[:2], valid)
