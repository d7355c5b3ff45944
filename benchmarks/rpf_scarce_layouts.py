"""How many random layouts with scarce predictions leave a pseudo-box fewer RPF positives than the plain assignment.

RPF (``matcher.rpf_assign``, joint matching, m = 6 groups, k = 4) must never give a pseudo-box fewer positives than
the plain one-to-many assignment at the same k (``one_to_many_assign``). This draws ``--layouts`` random problems
(``tests/test_matcher.py``'s ``scarce_rpf_layout``: random predictions and boxes, 3 classes) with ``n`` pseudo-boxes,
2 <= n < 12, and ``2n <= Q < 6n`` predictions, i.e. fewer predictions than copies, and prints how many leave a box
short. CPU, seconds:

    python benchmarks/rpf_scarce_layouts.py --layouts 1500
"""

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from test_matcher import scarce_rpf_layout  # noqa: E402


def short_layout(seed: int) -> bool:
    """One layout (seeded): does RPF give some pseudo-box fewer positives than the plain assignment?"""
    rpf, plain = scarce_rpf_layout(seed)
    return any(r < p for r, p in zip(rpf, plain))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", type=int, default=1500)
    args = parser.parse_args(argv)
    report = {"layouts": args.layouts, "short": sum(short_layout(seed) for seed in range(args.layouts))}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
