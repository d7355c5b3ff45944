"""How many pseudo-labels a (burn-in) teacher gives per unlabeled image at several thresholds tau.

Label-free calibration of tau for short, reduced-scale runs, where a weak teacher's scores stay below the paper's
0.4: it reads only the teacher's detections on the UNLABELED images (never their hidden annotations) and the
annotated boxes per LABELED image, and prints both, plus the largest tau of the grid whose pseudo-labels per
image reach ``--min_fraction`` of the labeled mean. Same data flags as ``examples/train_ssod.py``:

    python benchmarks/pseudo_label_rate.py --model outputs/study/burnin/best_model -- <train_ssod data flags>

``--hidden_annotations`` (a diagnostic, never for choosing tau) also reports the precision and recall of the
pseudo-labels at IoU 0.5, class-aware (a one-to-one matching, ``training.pseudo_labels.pseudo_label_quality``, the
trainer's ``pseudo_precision`` / ``pseudo_recall``), against the annotations the unlabeled split hides (the synthetic set and COCO-Partial splits keep them).
"""

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study import split_passthrough  # noqa: E402


def main(argv=None) -> dict:
    from transformers import HfArgumentParser

    from sparse_semi_detr_hf import SparseSemiDetrForObjectDetection
    from sparse_semi_detr_hf.training.arguments import TrainingArguments
    from sparse_semi_detr_hf.training.data import LabeledDetectionDataset, collate_labeled
    from sparse_semi_detr_hf.training.pseudo_labels import pseudo_label_quality, select_pseudo_labels
    from sparse_semi_detr_hf.training.trainer import load_data
    from sparse_semi_detr_hf.training.transforms import EvalTransform, ViewConfig

    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved teacher (save_pretrained folder)")
    parser.add_argument("--thresholds", default="0.2,0.25,0.3,0.35,0.4")
    parser.add_argument("--images", type=int, default=300, help="unlabeled images to look at")
    parser.add_argument("--min_fraction", type=float, default=0.5)
    parser.add_argument("--class_nms_iou", type=float, default=0.6, help="as in the one-to-many stage")
    parser.add_argument("--hidden_annotations", action="store_true",
                        help="also report precision / recall against the unlabeled images' hidden annotations")
    args = parser.parse_args(own)
    (train_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", "unused", *extra])
    data = load_data(train_args)
    model = SparseSemiDetrForObjectDetection.from_pretrained(args.model).eval()
    views = ViewConfig(scales=train_args.training_scales, max_size=train_args.max_image_size,
                       eval_scale=train_args.eval_image_size)
    unlabeled = data.unlabeled.select(range(min(args.images, len(data.unlabeled))))
    loader = torch.utils.data.DataLoader(LabeledDetectionDataset(unlabeled, EvalTransform(views), seed=0),
                                         batch_size=8, collate_fn=collate_labeled)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    counts, correct, annotated = dict.fromkeys(thresholds, 0), dict.fromkeys(thresholds, 0), 0
    with torch.inference_mode():
        for batch in loader:
            outputs = model(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])
            annotated += sum(len(target["boxes"]) for target in batch["labels"])
            for t in thresholds:
                selected = select_pseudo_labels(outputs.logits, outputs.pred_boxes, t, args.class_nms_iou)
                counts[t] += sum(len(p["class_labels"]) for p in selected)
                correct[t] += int(pseudo_label_quality(selected, batch["labels"])["num_true_positive"])
    labeled_mean = sum(len(objects["bbox"]) for objects in data.labeled["objects"]) / len(data.labeled)
    per_image = {t: counts[t] / len(unlabeled) for t in thresholds}
    reaching = [t for t in thresholds if per_image[t] >= args.min_fraction * labeled_mean]
    report = {"labeled_boxes_per_image": labeled_mean, "pseudo_labels_per_image": per_image,
              "images": len(unlabeled), "min_fraction": args.min_fraction,
              "largest_tau_reaching": max(reaching) if reaching else None}
    if args.hidden_annotations:
        if annotated == 0:
            raise ValueError("--hidden_annotations: the unlabeled images carry no annotations to compare with.")
        report["hidden_annotations"] = {"annotated_boxes_per_image": annotated / len(unlabeled), **{
            t: {"precision": correct[t] / counts[t] if counts[t] else None, "recall": correct[t] / annotated}
            for t in thresholds}}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
