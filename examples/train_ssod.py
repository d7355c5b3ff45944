"""Semi-supervised training of Sparse Semi-DETR.

    accelerate launch examples/train_ssod.py                      # embedded synthetic default (CPU, minutes)
    accelerate launch examples/train_ssod.py --train_images coco/train2017 \
        --train_annotations coco/annotations/instances_train2017.json \
        --val_images coco/val2017 --val_annotations coco/annotations/instances_val2017.json \
        --labeled_percent 10 --fold 1 --pretrained_backbone      # COCO-Partial 10 % (paper preset)

Every flag is a field of ``sparse_semi_detr_hf.training.arguments.TrainingArguments`` (``--help`` lists them).
"""

import logging
import os
import sys

from transformers import HfArgumentParser

from sparse_semi_detr_hf.training.arguments import TrainingArguments, document_defaults
from sparse_semi_detr_hf.training.trainer import SemiSupervisedTrainer


def parse_args(argv=None) -> TrainingArguments:
    parser = HfArgumentParser(TrainingArguments)
    document_defaults(parser)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def summary(results: dict, output_dir: str) -> str:
    """What the run achieved, in a few lines: start and end AP of the teacher and student, the best model."""
    history, lines = results.get("history") or [], []
    if history:
        start, end = history[0], history[-1]
        for who in ("teacher", "student"):
            line = f"{who} AP (x100): "
            if start is not end:
                line += f"{100 * start[who]['AP']:.1f} at step {start['step']} -> "
            lines.append(line + f"{100 * end[who]['AP']:.1f} at step {end['step']} (AP50 {100 * end[who]['AP50']:.1f})")
    if results.get("test"):
        test = results["test"]
        lines.append(f"test set ({test['images']} images): teacher AP {100 * test['teacher']['AP']:.1f}, "
                     f"student AP {100 * test['student']['AP']:.1f}")
    best = results.get("best") or {}
    if best:
        lines.append(f"best: {best['model']} at step {best['step']} (AP {100 * best['metrics']['AP']:.1f}) -> "
                     f"{os.path.join(output_dir, 'best_model')}")
    picture = os.path.join(output_dir, "teacher_detections.png")
    if os.path.isfile(picture):
        lines.append(f"teacher detections beside the ground truth: {picture}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    trainer = SemiSupervisedTrainer(args)
    results = trainer.train()
    if trainer.accelerator.is_main_process:
        print(summary(results, args.output_dir), flush=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
