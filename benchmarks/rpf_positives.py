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
                          "duplicates": int(duplicates.sum()) if duplicates is not None else 0})
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
            "class_loss_per_call": sum(c["class_loss"] for c in calls) / max(1, len(calls))}


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
