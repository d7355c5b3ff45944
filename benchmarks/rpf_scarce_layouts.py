"""How many random layouts with scarce predictions leave a pseudo-box fewer RPF positives than the plain assignment.

RPF (``matcher.rpf_assign``, joint matching, m = 6 groups, k = 4) must never give a pseudo-box fewer positives than
the plain one-to-many assignment at the same k (``one_to_many_assign``). This draws ``--layouts`` random problems
(``tests/test_matcher.py``'s ``random_problem``: random predictions and boxes, 3 classes) with ``n`` pseudo-boxes,
2 <= n < 12, and ``2n <= Q < 6n`` predictions, i.e. fewer predictions than copies, and prints how many leave a box
short. CPU, seconds:

    python benchmarks/rpf_scarce_layouts.py --layouts 1500
"""

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from sparse_semi_detr_hf.matcher import one_to_many_assign, rpf_assign  # noqa: E402
from test_matcher import random_problem  # noqa: E402


def positives_per_box(assignment, num_boxes: int) -> list[int]:
    return torch.bincount(assignment.tgt_idx, minlength=num_boxes).tolist()


def short_layout(seed: int) -> bool:
    """One layout (seeded): does RPF give some pseudo-box fewer positives than the plain assignment?"""
    generator = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 12, (1,), generator=generator))
    queries = int(torch.randint(2 * n, 6 * n, (1,), generator=generator))
    logits, boxes, targets = random_problem(1, queries, 3, [n], seed=seed)
    ((rpf, _),) = rpf_assign(logits, boxes, targets, groups=6, topk=4, generator=generator)
    (plain,) = one_to_many_assign(logits, boxes, targets, topk=4)
    return any(r < p for r, p in zip(positives_per_box(rpf, n), positives_per_box(plain, n)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=int, default=1500)
    args = parser.parse_args(argv)
    report = {"layouts": args.layouts, "short": sum(short_layout(seed) for seed in range(args.layouts))}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
