"""Export the student or the EMA teacher of a training checkpoint as a loadable model.

    python examples/export_checkpoint.py outputs/run/checkpoints/checkpoint-500 --model teacher \\
        --output_dir outputs/run/teacher-500
    # then: AutoModelForObjectDetection.from_pretrained("outputs/run/teacher-500")

A checkpoint (``checkpoints/checkpoint-<step>``) holds accelerate's training state: the student's weights
(``model.safetensors``), the teacher (``custom_checkpoint_0.pkl``, registered first), the optimizer, and the model
config (``config.json``). The export is ``save_pretrained`` of the chosen model plus the image processor settings
of ``--processor_from`` (default: the run's ``best_model/``, else transformers' defaults for this processor).
"""

import argparse
import os

import torch
from safetensors.torch import load_file

from sparse_semi_detr_hf import SparseSemiDetrConfig, SparseSemiDetrForObjectDetection, SparseSemiDetrImageProcessor

STUDENT_PREFIX = "detector."  # the trainer's SemiSupervisedStudent wraps the detector
TEACHER_FILE = "custom_checkpoint_0.pkl"


def student_state(checkpoint: str) -> dict[str, torch.Tensor]:
    weights = load_file(os.path.join(checkpoint, "model.safetensors"))
    return {key.removeprefix(STUDENT_PREFIX): value for key, value in weights.items()}


def teacher_state(checkpoint: str) -> dict[str, torch.Tensor]:
    return torch.load(os.path.join(checkpoint, TEACHER_FILE), map_location="cpu", weights_only=True)["model"]


def export(checkpoint: str, output_dir: str, which: str = "teacher", processor_from: str | None = None) -> str:
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        raise FileNotFoundError(f"{checkpoint} has no config.json (checkpoints of this version save one); pass a "
                                "checkpoint folder checkpoints/checkpoint-<step>")
    config = SparseSemiDetrConfig.from_pretrained(checkpoint)
    model = SparseSemiDetrForObjectDetection(config)
    state = teacher_state(checkpoint) if which == "teacher" else student_state(checkpoint)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(output_dir)
    run_dir = os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))
    source = processor_from or os.path.join(run_dir, "best_model")
    if os.path.isfile(os.path.join(source, "preprocessor_config.json")):
        processor = SparseSemiDetrImageProcessor.from_pretrained(source)
    else:
        processor = SparseSemiDetrImageProcessor()
    processor.save_pretrained(output_dir)
    return output_dir


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoints/checkpoint-<step> folder")
    parser.add_argument("--model", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--processor_from", default=None, help="a saved model folder whose image processor to copy")
    args = parser.parse_args(argv)
    path = export(args.checkpoint, args.output_dir, args.model, args.processor_from)
    print(f"{args.model} of {args.checkpoint} saved to {path}")
    return path


if __name__ == "__main__":
    main()
