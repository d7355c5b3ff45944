"""Semi-supervised training of Sparse Semi-DETR.

    accelerate launch examples/train_ssod.py                      # embedded synthetic default (CPU, minutes)
    accelerate launch examples/train_ssod.py --train_images coco/train2017 \
        --train_annotations coco/annotations/instances_train2017.json \
        --val_images coco/val2017 --val_annotations coco/annotations/instances_val2017.json \
        --labeled_percent 10 --fold 1 --pretrained_backbone      # COCO-Partial 10 % (paper preset)

Every flag is a field of ``sparse_semi_detr_hf.training.arguments.TrainingArguments`` (``--help`` lists them).
"""

import logging
import sys

from transformers import HfArgumentParser

from sparse_semi_detr_hf.training.arguments import TrainingArguments
from sparse_semi_detr_hf.training.trainer import SemiSupervisedTrainer


def parse_args(argv=None) -> TrainingArguments:
    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    results = SemiSupervisedTrainer(args).train()
    best = results.get("best") or {}
    if best:
        logging.getLogger("train_ssod").info(
            "best %s model at step %s: %s", best["model"], best["step"],
            {k: round(v, 4) for k, v in best["metrics"].items()},
        )
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
