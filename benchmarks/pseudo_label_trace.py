"""The teacher's pseudo-labels per unlabeled image during the first training steps, averaged over windows.

Trains ``--steps`` optimizer steps with the trainer (the same code path as ``examples/train_ssod.py``, no
evaluation) and prints the mean pseudo-labels per unlabeled image of each ``--window`` steps, with the EMA momentum
of the window's last step. Made to see how fast a burn-in teacher's pseudo-labels change, e.g. with and without the
EMA warm-up:

    python benchmarks/pseudo_label_trace.py --steps 60 --window 10 -- <train_ssod flags> \\
        --model_name_or_path outputs/cpu_study2/small_sup10/best_model --ema_warmup true
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from study import split_passthrough, trainer_with_batches  # noqa: E402


def trace(extra: list[str], steps: int, window: int) -> list[dict]:
    """``[{"steps": "a-b", "pseudo_labels_per_image": mean, "ema_momentum": m}, ...]`` for consecutive windows."""
    trainer, labeled, unlabeled = trainer_with_batches(extra)
    trainer.student.train()
    rows, total = [], 0.0
    for step in range(1, steps + 1):
        logs = trainer.optimizer_step([next(labeled)], [next(unlabeled)])
        total += logs["pseudo_per_image"]
        if step % window == 0 or step == steps:
            size = window if step % window == 0 else step % window
            rows.append({"steps": f"{step - size + 1}-{step}", "pseudo_labels_per_image": total / size,
                         "ema_momentum": logs["ema_momentum"]})
            total = 0.0
    return rows


def main(argv=None) -> list[dict]:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args(own)
    rows = trace(extra, args.steps, args.window)
    print(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
