"""What the one-to-many assignment does with pseudo-labels: positives per pseudo-box, RPF duplicates, the loss
normaliser and the classification loss, for the plain one-to-many assignment (Semi-DETR's top-13, and top-4 = RPF's
k), RPF with jointly matched groups (the default) and RPF with separately matched groups (the earlier reading) —
on the same unlabeled batches of a saved model, without training.

    python benchmarks/rpf_positives.py --model outputs/cpu_study2/burnin_reeval/best_model --batches 10 \\
        -- <train_ssod flags: data, model size, --pseudo_label_threshold ...>

Every decoder layer's call on the unlabeled (pseudo-labeled) images counts; the labeled images are left out.
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study import split_passthrough, trainer_with_batches  # noqa: E402

MODES = {"one_to_many": ["--use_rpf", "false"],
         "one_to_many_top4": ["--use_rpf", "false", "--one_to_many_topk", "4"],
         "rpf_joint": ["--use_rpf", "true", "--rpf_joint_matching", "true"],
         "rpf_separate": ["--use_rpf", "true", "--rpf_joint_matching", "false"]}


def against_plain_top_k(criterion, logits, boxes, targets, assignments, duplicates) -> dict:
    """How this assignment's positives relate to the plain one-to-many top-k (k = RPF's k) on the same predictions:
    shared positives, plain positives this assignment trains as background (neither positive nor duplicate), and
    the summed soft weight of the positives of each."""
    from sparse_semi_detr_hf.matcher import one_to_many_assign

    plain = one_to_many_assign(logits.detach(), boxes.detach(), targets, topk=criterion.rpf["topk"],
                               alpha=criterion.o2m["alpha"], beta=criterion.o2m["beta"])
    shared = background = 0
    for image, (ours, reference) in enumerate(zip(assignments, plain)):
        ours_set, reference_set = set(ours.pred_idx.tolist()), set(reference.pred_idx.tolist())
        ignored = set(duplicates[image].nonzero().flatten().tolist()) if duplicates is not None else set()
        shared += len(ours_set & reference_set)
        background += len(reference_set - ours_set - ignored)
    return {"shared_with_plain_top_k": shared, "plain_top_k_trained_as_background": background,
            "weight_sum": float(torch.cat([a.weight for a in assignments]).sum()),
            "plain_top_k_weight_sum": float(torch.cat([a.weight for a in plain]).sum())}


def measure(extra: list[str], model: str, batches: int) -> dict:
    """One assignment mode: means per criterion call on pseudo-labeled targets."""
    from sparse_semi_detr_hf.loss import SetCriterion
    from sparse_semi_detr_hf.training.step import ONE_TO_MANY

    calls = []
    original = SetCriterion.one_to_many_losses

    def recording(self, logits, boxes, targets, assignments, duplicates=None):
        out = original(self, logits, boxes, targets, assignments, duplicates)
        if all("scores" in t for t in targets):
            weight = torch.cat([a.weight for a in assignments]).float()
            calls.append({"boxes": sum(len(t["boxes"]) for t in targets), "positives": weight.numel(),
                          "normaliser": max(1.0, float(weight.sum())), "class_loss": float(out[0]),
                          "duplicates": int(duplicates.sum()) if duplicates is not None else 0,
                          **against_plain_top_k(self, logits, boxes, targets, assignments, duplicates)})
        return out

    SetCriterion.one_to_many_losses = recording
    try:
        trainer, labeled, unlabeled = trainer_with_batches(["--model_name_or_path", model, *extra])
        with torch.no_grad():
            for _ in range(batches):
                trainer.compute_loss(next(labeled), next(unlabeled), ONE_TO_MANY)
    finally:
        SetCriterion.one_to_many_losses = original
    boxes = max(1, sum(c["boxes"] for c in calls))
    return {"calls": len(calls), "pseudo_boxes_per_call": boxes / max(1, len(calls)),
            "positives_per_box": sum(c["positives"] for c in calls) / boxes,
            "duplicates_per_box": sum(c["duplicates"] for c in calls) / boxes,
            "normaliser_per_call": sum(c["normaliser"] for c in calls) / max(1, len(calls)),
            "class_loss_per_call": sum(c["class_loss"] for c in calls) / max(1, len(calls)),
            "shared_with_plain_top_k_per_box": sum(c["shared_with_plain_top_k"] for c in calls) / boxes,
            "plain_top_k_trained_as_background_per_box":
                sum(c["plain_top_k_trained_as_background"] for c in calls) / boxes,
            "soft_weight_per_box": sum(c["weight_sum"] for c in calls) / boxes,
            "plain_top_k_soft_weight_per_box": sum(c["plain_top_k_weight_sum"] for c in calls) / boxes}


def main(argv=None) -> dict:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved model (save_pretrained folder) used as student and "
                                                       "teacher")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(own)
    report = {mode: measure([*extra, *MODES[mode]], args.model, args.batches) for mode in args.modes.split(",")}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
