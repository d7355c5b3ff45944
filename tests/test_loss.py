"""Tests of SetCriterion (tiny, seeded, CPU)."""

import math
from dataclasses import dataclass

import pytest
import torch
from torchvision.ops import box_convert, box_iou, sigmoid_focal_loss

from sparse_semi_detr_hf.configuration_sparse_semi_detr import SparseSemiDetrConfig
from sparse_semi_detr_hf.loss import SetCriterion
from sparse_semi_detr_hf.matcher import jitter_boxes, one_to_many_assign, rpf_assign

NUM_LABELS = 4


@dataclass
class DenoisingMeta:
    """Stand-in for denoising.DenoisingMeta (layout of docs/architecture.md)."""

    num_groups: int
    pad_size: int
    num_queries: int


def make_config(**overrides) -> SparseSemiDetrConfig:
    settings = {"num_labels": NUM_LABELS, "decoder_layers": 3, "d_model": 32, "neck_group_norm_groups": 8,
                "num_queries": 10}
    settings.update(overrides)
    return SparseSemiDetrConfig(**settings)


def random_boxes(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    centre = 0.25 + 0.5 * torch.rand(*shape, 2, generator=generator)
    size = 0.05 + 0.4 * torch.rand(*shape, 2, generator=generator)
    return torch.cat([centre, size], dim=-1)


def make_targets(sizes: list[int], generator: torch.Generator) -> list[dict]:
    return [{"class_labels": torch.randint(NUM_LABELS, (n,), generator=generator),
             "boxes": random_boxes((n,), generator), "scores": 0.5 + 0.5 * torch.rand(n, generator=generator)}
            for n in sizes]


def make_outputs(layers: int, batch: int, queries: int, generator: torch.Generator):
    logits = torch.randn(layers, batch, queries, NUM_LABELS, generator=generator).requires_grad_()
    boxes = random_boxes((layers, batch, queries), generator).requires_grad_()
    return logits, boxes


def make_denoising(layers: int, targets: list[dict], groups: int, generator: torch.Generator):
    pad = max(len(t["boxes"]) for t in targets)
    meta = DenoisingMeta(num_groups=groups, pad_size=pad, num_queries=2 * groups * pad)
    logits, boxes = make_outputs(layers, len(targets), meta.num_queries, generator)
    return logits, boxes, meta


def full_inputs(seed: int = 0, sizes: tuple[int, ...] = (3, 1)):
    generator = torch.Generator().manual_seed(seed)
    targets = make_targets(list(sizes), generator)
    logits, boxes = make_outputs(3, len(sizes), 10, generator)
    enc_logits, enc_boxes = make_outputs(1, len(sizes), 10, generator)
    dn_logits, dn_boxes, meta = make_denoising(3, targets, 2, generator)
    return dict(layer_logits=logits, layer_boxes=boxes, targets=targets, enc_logits=enc_logits[0].detach(),
                enc_boxes=enc_boxes[0].detach().requires_grad_(), dn_logits=dn_logits, dn_boxes=dn_boxes,
                dn_meta=meta)


def xyxy(boxes):
    return box_convert(boxes, "cxcywh", "xyxy")


# ---------------------------------------------------------------- keys and weights


@pytest.mark.parametrize("assignment", ["one_to_one", "one_to_many"])
@pytest.mark.parametrize("use_rpf", [False, True])
def test_all_keys_present_once_finite_and_backward(assignment, use_rpf):
    criterion = SetCriterion(make_config())
    inputs = full_inputs()
    losses = criterion(**inputs, assignment=assignment, use_rpf=use_rpf, generator=torch.Generator().manual_seed(0))
    expected = {f"{name}{suffix}" for name in ("loss_ce", "loss_bbox", "loss_giou")
                for suffix in ("", "_0", "_1", "_enc", "_dn", "_dn_0", "_dn_1")}
    assert set(losses) == expected == set(criterion.weight_dict)
    for key, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    criterion.weighted_sum(losses).backward()
    for tensor in (inputs["layer_logits"], inputs["layer_boxes"], inputs["enc_boxes"], inputs["dn_boxes"]):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()


def test_weighted_sum_uses_config_coefficients():
    config = make_config(class_loss_coefficient=2.0, bbox_loss_coefficient=5.0, giou_loss_coefficient=3.0)
    criterion = SetCriterion(config)
    losses = criterion(**full_inputs(1))
    coefficient = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 3.0}
    expected = sum(coefficient["_".join(key.split("_")[:2])] * value for key, value in losses.items())
    torch.testing.assert_close(criterion.weighted_sum(losses), expected)
    assert all(criterion.weight_dict[key] == coefficient["_".join(key.split("_")[:2])] for key in losses)


def test_auxiliary_and_encoder_flags():
    inputs = full_inputs(2)
    losses = SetCriterion(make_config(auxiliary_loss=False, encoder_loss=False))(**inputs)
    assert set(losses) == {f"{name}{suffix}" for name in ("loss_ce", "loss_bbox", "loss_giou") for suffix in
                           ("", "_dn")}
    losses = SetCriterion(make_config(auxiliary_loss=False))(**inputs)
    assert {key for key in losses if key.endswith("_enc")} == {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}


def test_unknown_assignment_is_rejected():
    with pytest.raises(ValueError, match="assignment"):
        SetCriterion(make_config())(**full_inputs(), assignment="many_to_one")


@pytest.mark.parametrize("assignment", ["one_to_one", "one_to_many"])
def test_encoder_and_aux_layers_use_the_same_rule_as_the_final_layer(assignment):
    criterion = SetCriterion(make_config(auxiliary_loss=False))
    inputs = full_inputs(3)
    losses = criterion(**inputs, assignment=assignment)
    alone = criterion(inputs["enc_logits"][None], inputs["enc_boxes"][None], inputs["targets"], assignment=assignment)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[f"{name}_enc"], alone[name])
    full = SetCriterion(make_config())(**inputs, assignment=assignment)
    first = criterion(inputs["layer_logits"][:1], inputs["layer_boxes"][:1], inputs["targets"], assignment=assignment)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(full[f"{name}_0"], first[name])


# ---------------------------------------------------------------- one-to-one


def test_one_to_one_equals_transformers_deformable_detr_loss():
    module = pytest.importorskip("transformers.loss.loss_deformable_detr")
    generator = torch.Generator().manual_seed(4)
    targets = make_targets([3, 2, 4], generator)
    logits, boxes = make_outputs(1, 3, 9, generator)
    matcher = module.DeformableDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    reference = module.DeformableDetrImageLoss(matcher, NUM_LABELS, focal_alpha=0.25, losses=["labels", "boxes"])
    expected = reference({"logits": logits[0], "pred_boxes": boxes[0]}, targets)
    losses = SetCriterion(make_config(auxiliary_loss=False, encoder_loss=False))(logits, boxes, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[name], expected[name])


@pytest.mark.parametrize("assignment", ["one_to_one", "one_to_many"])
def test_zero_targets_give_background_class_loss_and_zero_connected_box_losses(assignment):
    from transformers.loss.loss_for_object_detection import sigmoid_focal_loss as hf_sigmoid_focal_loss

    generator = torch.Generator().manual_seed(5)
    targets = make_targets([0, 0], generator)
    logits, boxes = make_outputs(3, 2, 6, generator)
    enc_logits, enc_boxes = make_outputs(1, 2, 6, generator)
    criterion = SetCriterion(make_config())
    losses = criterion(logits, boxes, targets, enc_logits[0], enc_boxes[0], assignment=assignment, use_rpf=True)
    assert not any(key.startswith("loss_ce_dn") for key in losses)
    if assignment == "one_to_one":  # focal loss against all-background targets, num_boxes clamped to 1
        expected = hf_sigmoid_focal_loss(logits[-1], torch.zeros_like(logits[-1]), 1) * logits.shape[2]
    else:  # quality focal loss with y = 0: p^gamma * BCE(x, 0), normalizer clamped to 1
        p = logits[-1].sigmoid()
        expected = (p**2 * -torch.log1p(-p)).sum()
    torch.testing.assert_close(losses["loss_ce"], expected)
    for key, value in losses.items():
        if "bbox" in key or "giou" in key:
            assert value.item() == 0.0 and value.requires_grad, key
    criterion.weighted_sum(losses).backward()
    assert boxes.grad is not None and torch.isfinite(boxes.grad).all() and torch.isfinite(logits.grad).all()
    assert enc_boxes.grad is not None


def perfect_predictions(assignment: str):
    generator = torch.Generator().manual_seed(6)
    targets = make_targets([2, 3], generator)
    logits = torch.full((1, 2, 8, NUM_LABELS), -6.0)
    boxes = torch.tensor([0.05, 0.05, 0.02, 0.02]).repeat(1, 2, 8, 1)  # far from every target
    for b, target in enumerate(targets):
        n = len(target["boxes"])
        boxes[0, b, :n] = target["boxes"]
        logits[0, b, torch.arange(n), target["class_labels"]] = 6.0
    return logits, boxes, targets


@pytest.mark.parametrize("assignment", ["one_to_one", "one_to_many"])
def test_perfect_predictions_have_near_zero_box_losses(assignment):
    logits, boxes, targets = perfect_predictions(assignment)
    losses = SetCriterion(make_config(encoder_loss=False))(logits, boxes, targets, assignment=assignment)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-6)
    shifted = SetCriterion(make_config(encoder_loss=False))(logits, boxes + 0.01, targets, assignment=assignment)
    assert shifted["loss_bbox"] > 0.01 and shifted["loss_giou"] > 0.01


# ---------------------------------------------------------------- denoising


def test_denoising_losses_pick_positive_negative_and_padding_slots():
    generator = torch.Generator().manual_seed(7)
    targets = make_targets([2, 1], generator)
    meta = DenoisingMeta(num_groups=2, pad_size=2, num_queries=8)
    dn_logits, _ = make_outputs(2, 2, 8, generator)
    dn_boxes = torch.rand(2, 2, 8, 4, generator=generator) * 0.5 + 0.25  # garbage everywhere ...
    positives = {0: [(0, 0), (1, 1), (4, 0), (5, 1)], 1: [(0, 0), (4, 0)]}  # (query, target) per image
    negatives = {0: [2, 3, 6, 7], 1: [2, 6]}
    for b, pairs in positives.items():
        for query, j in pairs:
            dn_boxes[:, b, query] = targets[b]["boxes"][j]  # ... except exact boxes at the positive slots
    criterion = SetCriterion(make_config(encoder_loss=False, denoising_padding_is_background=False))
    layer_logits, layer_boxes = make_outputs(2, 2, 5, generator)
    losses = criterion(layer_logits, layer_boxes, targets, dn_logits=dn_logits, dn_boxes=dn_boxes, dn_meta=meta)
    for key in ("loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0", "loss_giou_dn_0"):
        assert losses[key].item() == pytest.approx(0.0, abs=1e-6), key
    # class loss by hand: positives -> their class, negatives -> background, padding (image 1, j = 1) excluded
    expected = 0.0
    for b in (0, 1):
        onehot = torch.zeros(8, NUM_LABELS)
        for query, j in positives[b]:
            onehot[query, targets[b]["class_labels"][j]] = 1.0
        rows = [query for query, _ in positives[b]] + negatives[b]
        expected = expected + sigmoid_focal_loss(dn_logits[-1, b, rows], onehot[rows], reduction="sum")
    torch.testing.assert_close(losses["loss_ce_dn"], expected / (3 * meta.num_groups))
    padded = dn_logits.detach().clone()
    padded[:, 1, [1, 3, 5, 7]] = 9.0  # padding slots of image 1
    same = criterion(layer_logits, layer_boxes, targets, dn_logits=padded, dn_boxes=dn_boxes, dn_meta=meta)
    torch.testing.assert_close(same["loss_ce_dn"], losses["loss_ce_dn"])
    negative = dn_logits.detach().clone()
    negative[:, 1, 2] = 9.0
    changed = criterion(layer_logits, layer_boxes, targets, dn_logits=negative, dn_boxes=dn_boxes, dn_meta=meta)
    assert changed["loss_ce_dn"] > losses["loss_ce_dn"] + 0.1
    # DINO's rule (the default): the padding slots are background too
    dino = SetCriterion(make_config(encoder_loss=False))
    with_padding = dino(layer_logits, layer_boxes, targets, dn_logits=dn_logits, dn_boxes=dn_boxes, dn_meta=meta)
    padding_rows = sigmoid_focal_loss(dn_logits[-1, 1, [1, 3, 5, 7]], torch.zeros(4, NUM_LABELS), reduction="sum")
    torch.testing.assert_close(with_padding["loss_ce_dn"], (expected + padding_rows) / (3 * meta.num_groups))


def test_denoising_layout_mismatch_is_reported():
    inputs = full_inputs(8)
    inputs["dn_meta"] = DenoisingMeta(num_groups=1, pad_size=1, num_queries=2)
    with pytest.raises(ValueError, match="Denoising"):
        SetCriterion(make_config())(**inputs)


# ---------------------------------------------------------------- one-to-many and RPF


def test_one_to_many_losses_follow_the_task_aligned_formula():
    generator = torch.Generator().manual_seed(9)
    targets = make_targets([2, 3], generator)
    logits, boxes = make_outputs(1, 2, 12, generator)
    criterion = SetCriterion(make_config(auxiliary_loss=False, encoder_loss=False, one_to_many_topk=3))
    losses = criterion(logits, boxes, targets, assignment="one_to_many")
    assignments = one_to_many_assign(logits[0].detach(), boxes[0].detach(), targets, topk=3)
    soft = torch.zeros(2, 12, NUM_LABELS)
    l1, giou, total = 0.0, 0.0, 0.0
    for b, (assigned, target) in enumerate(zip(assignments, targets)):
        for i, j, w in zip(*assigned):
            soft[b, i, target["class_labels"][j]] = w
            pred, tgt = boxes[0, b, i], target["boxes"][j]
            l1 = l1 + w * (pred - tgt).abs().sum()
            giou = giou + w * (1 - box_iou(xyxy(pred[None]), xyxy(tgt[None]))[0, 0]
                               + _hull_penalty(xyxy(pred[None])[0], xyxy(tgt[None])[0]))
            total += w.item()
    assert total > 0
    p = logits[0].sigmoid()
    bce = -(soft * torch.log(p) + (1 - soft) * torch.log1p(-p))
    normalizer = max(1.0, total)
    torch.testing.assert_close(losses["loss_ce"], ((soft - p).abs() ** 2 * bce).sum() / normalizer)
    torch.testing.assert_close(losses["loss_bbox"], l1 / normalizer)
    torch.testing.assert_close(losses["loss_giou"], giou / normalizer)


def _hull_penalty(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(hull - union) / hull of two xyxy boxes, the GIoU penalty."""
    inter = (torch.minimum(a[2:], b[2:]) - torch.maximum(a[:2], b[:2])).clamp(min=0).prod()
    union = (a[2:] - a[:2]).prod() + (b[2:] - b[:2]).prod() - inter
    hull = (torch.maximum(a[2:], b[2:]) - torch.minimum(a[:2], b[:2])).prod()
    return (hull - union) / hull


def rpf_problem():
    """One pseudo-box; predictions 0..5 sit on its 6 jittered copies (seed 7), 6 and 7 far away."""
    box = torch.tensor([[0.5, 0.5, 0.3, 0.3]])
    copies = jitter_boxes(box, 6, 0.25, torch.Generator().manual_seed(7))[:, 0]
    boxes = torch.cat([copies, torch.tensor([[0.05, 0.05, 0.05, 0.05], [0.95, 0.95, 0.05, 0.05]])])
    logits = torch.tensor([-1.0, 3.0, 0.0, 2.0, 1.0, -2.0, -3.0, 0.5])[:, None].repeat(1, NUM_LABELS)
    targets = [{"class_labels": torch.tensor([0]), "boxes": box, "scores": torch.tensor([0.9])}]
    return logits[None, None], boxes[None, None], targets


def test_rpf_duplicate_predictions_get_no_class_loss():
    config = make_config(auxiliary_loss=False, encoder_loss=False, matcher_class_cost=0.0, rpf_groups=6,
                         rpf_topk=4, rpf_jitter=0.25)
    criterion = SetCriterion(config)
    logits, boxes, targets = rpf_problem()

    def class_loss(layer_logits):
        return criterion(layer_logits, boxes, targets, assignment="one_to_many", use_rpf=True,
                         generator=torch.Generator().manual_seed(7))["loss_ce"]

    ((_, duplicate),) = rpf_assign(logits[0], boxes[0], targets, groups=6, topk=4, jitter=0.25,
                                   generator=torch.Generator().manual_seed(7), matcher=criterion.matcher)
    assert duplicate.sum() == 2
    quieter = logits.clone()
    quieter[0, 0, duplicate] = -8.0  # duplicates pushed down: still not positives, still no class loss
    torch.testing.assert_close(class_loss(quieter), class_loss(logits))
    background = logits.clone()
    background[0, 0, 7] = 6.0  # a far prediction is background: its loss must count
    assert class_loss(background) > class_loss(logits) + 0.1
    without_rpf = criterion(logits, boxes, targets, assignment="one_to_many")["loss_ce"]
    assert not math.isclose(without_rpf.item(), class_loss(logits).item(), rel_tol=1e-4)


def test_rpf_duplicates_are_background_when_not_ignored():
    """``rpf_ignore_duplicates=False`` (ablation): the same positives, and the duplicates count as background."""
    kwargs = dict(auxiliary_loss=False, encoder_loss=False, matcher_class_cost=0.0, rpf_groups=6, rpf_topk=4,
                  rpf_jitter=0.25)
    logits, boxes, targets = rpf_problem()
    ((assigned, duplicate),) = rpf_assign(logits[0], boxes[0], targets, groups=6, topk=4, jitter=0.25,
                                          generator=torch.Generator().manual_seed(7),
                                          matcher=SetCriterion(make_config(**kwargs)).matcher)
    criterion = SetCriterion(make_config(**kwargs, rpf_ignore_duplicates=False))
    losses = criterion(logits, boxes, targets, assignment="one_to_many", use_rpf=True,
                       generator=torch.Generator().manual_seed(7))
    expected = criterion.one_to_many_losses(logits[0], boxes[0], targets, [assigned], duplicates=None)
    for name, value in zip(("loss_ce", "loss_bbox", "loss_giou"), expected):
        torch.testing.assert_close(losses[name], value)
    louder = logits.clone()
    louder[0, 0, duplicate] = 6.0  # duplicates pushed up now cost classification loss
    assert criterion(louder, boxes, targets, assignment="one_to_many", use_rpf=True,
                     generator=torch.Generator().manual_seed(7))["loss_ce"] > losses["loss_ce"] + 0.1


def duplicate_pseudo_label_problem():
    """Pseudo-boxes A (0.9) and its near copy A' (0.6) of class 0, B (class 1) on A, C elsewhere."""
    box_a = [0.5, 0.5, 0.3, 0.3]
    targets = [{"class_labels": torch.tensor([0, 0, 1, 0]), "scores": torch.tensor([0.9, 0.6, 0.7, 0.8]),
                "boxes": torch.tensor([box_a, [0.505, 0.5, 0.3, 0.3], box_a, [0.15, 0.15, 0.1, 0.1]])}]
    boxes = torch.tensor([[0.495, 0.5, 0.3, 0.3], [0.505, 0.5, 0.3, 0.3], [0.5, 0.5, 0.3, 0.3],
                          [0.15, 0.15, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05], [0.9, 0.1, 0.05, 0.05]])
    logits = torch.full((6, NUM_LABELS), -4.0)
    logits[:2, 0] = 3.0
    logits[2, 1] = 3.0
    logits[3, 0] = 3.0
    return logits[None, None], boxes[None, None], targets


def test_rpf_one_to_one_drops_duplicate_pseudo_labels_before_matching():
    criterion = SetCriterion(make_config(encoder_loss=False, rpf_groups=12, rpf_jitter=0.3, rpf_topk=4))
    logits, boxes, targets = duplicate_pseudo_label_problem()
    losses = criterion(logits, boxes, targets, use_rpf=True, generator=torch.Generator().manual_seed(0))
    kept = [{key: value[[0, 2, 3]] for key, value in targets[0].items()}]
    expected = criterion(logits, boxes, kept)
    unfiltered = criterion(logits, boxes, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        torch.testing.assert_close(losses[name], expected[name])
    assert not math.isclose(losses["loss_ce"].item(), unfiltered["loss_ce"].item(), rel_tol=1e-3)


def test_rpf_one_to_one_needs_scores():
    logits, boxes, targets = duplicate_pseudo_label_problem()
    del targets[0]["scores"]
    with pytest.raises(ValueError, match="scores"):
        SetCriterion(make_config())(logits, boxes, targets, use_rpf=True)


DISTRIBUTED_SIZES = ((3, 1), (6, 4))  # per rank: 4 and 10 boxes, so the mean (7) is neither rank's own count


def _one_to_many_weight_sums(criterion: SetCriterion, inputs: dict) -> dict[str, float]:
    """Local sum of the one-to-many soft weights of each prediction set, by loss-key suffix."""
    logits, boxes = inputs["layer_logits"].detach(), inputs["layer_boxes"].detach()
    sets = {("" if layer == len(logits) - 1 else f"_{layer}"): (logits[layer], boxes[layer])
            for layer in range(len(logits))}
    sets["_enc"] = (inputs["enc_logits"].detach(), inputs["enc_boxes"].detach())
    return {suffix: float(sum(a.weight.sum() for a in one_to_many_assign(*pair, inputs["targets"], **criterion.o2m)))
            for suffix, pair in sets.items()}


def _distributed_worker(rank: int, world_size: int, init_file: str, out_file: str) -> None:
    """One gloo process: losses alone (no process group), then inside a ``world_size`` group; saved to a file."""
    import datetime

    import torch.distributed as dist

    torch.manual_seed(0)
    criterion = SetCriterion(make_config())
    inputs = full_inputs(10 + rank, DISTRIBUTED_SIZES[rank])
    assignments = ("one_to_one", "one_to_many")
    alone = {a: criterion(**inputs, assignment=a) for a in assignments}
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        grouped = {a: criterion(**inputs, assignment=a) for a in assignments}
    finally:
        dist.destroy_process_group()
    torch.save({"alone": alone, "grouped": grouped, "num_boxes": sum(DISTRIBUTED_SIZES[rank]),
                "weights": _one_to_many_weight_sums(criterion, inputs)}, out_file)


def test_num_boxes_is_all_reduced_when_distributed_is_initialized(tmp_path):
    """Two gloo processes with 4 and 10 boxes: every loss of each rank is divided by the MEAN over ranks (of
    ``num_boxes``, and of each set's one-to-many weight sum), i.e. equals its single-process value times
    ``local / mean``."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), "2", str(tmp_path / "store"), str(out)],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for rank, out in enumerate(outs)]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    no_gloo = any("gloo" in e.lower() and "interface" in e.lower() for e in errors)
    if any(proc.returncode for proc in procs) and no_gloo:
        pytest.skip(f"gloo unavailable: {errors[0][-500:]}")
    assert all(proc.returncode == 0 for proc in procs), "\n".join(e[-3000:] for e in errors)
    ranks = [torch.load(out, weights_only=False) for out in outs]
    mean_boxes = sum(r["num_boxes"] for r in ranks) / 2
    assert mean_boxes == 7.0
    for r in ranks:
        assert set(r["grouped"]["one_to_one"]) == set(r["alone"]["one_to_one"])
        for key, value in r["grouped"]["one_to_one"].items():  # matched and denoising: all / num_boxes
            torch.testing.assert_close(value, r["alone"]["one_to_one"][key] * r["num_boxes"] / mean_boxes)
        for key, value in r["grouped"]["one_to_many"].items():
            suffix = key.split("loss_")[1].partition("_")[2]
            suffix = "_" + suffix if suffix else ""
            if suffix.startswith("_dn"):
                local, mean = r["num_boxes"], mean_boxes
            else:
                local = max(1.0, r["weights"][suffix])
                mean = max(1.0, sum(other["weights"][suffix] for other in ranks) / 2)
                assert abs(local - mean) > 0.1, key  # the ranks' normalisers differ
            torch.testing.assert_close(value, r["alone"]["one_to_many"][key] * local / mean,
                                       msg=lambda m, key=key: f"{key}: {m}")


if __name__ == "__main__":  # _distributed_worker, run by the test above: rank world_size init_file out_file
    import sys

    _distributed_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
