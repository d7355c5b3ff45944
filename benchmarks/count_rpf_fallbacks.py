"""How often RPF's rules for scarce predictions fire during a training run (CPU or GPU).

Runs ``examples/train_ssod.py`` with the given flags and counts, per image and prediction set of every RPF
(one-to-many) loss computation: the pseudo-boxes that took the plain one-to-many top-k (per-box fallback), the
joint assignments whose copies were capped (``Q < groups * n``), and the image-sets whose every box took the
plain assignment's positives (the fallback's conflict rule left a box short). Nothing in training changes: the
counts are recomputed beside the library's own calls, and a recomputation that disagrees with the library's
positives stops the run. Prints ``RPF_COUNTS {...}`` at the end and writes it to ``--counts_output``.

    OMP_NUM_THREADS=1 python benchmarks/count_rpf_fallbacks.py --counts_output counts.json -- --seed 42 \\
        --output_dir /tmp/demo/count_seed42                      # the main job, seed 42
"""

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from sparse_semi_detr_hf import matcher  # noqa: E402


@contextlib.contextmanager
def counting(stats: collections.Counter):
    """Inside the block ``matcher._matchable_copies`` and ``matcher._rpf_single`` also count into ``stats``."""
    copies, single = matcher._matchable_copies, matcher._rpf_single

    def counting_copies(groups: int, num_boxes: int, num_queries: int) -> int:
        stats["joint_assignments"] += 1
        stats["copies_capped"] += groups * num_boxes > num_queries
        return copies(groups, num_boxes, num_queries)

    def counting_single(candidate, t, iou, topk, fallback=True):
        result = single(candidate, t, iou, topk, fallback)
        if fallback:
            owned = matcher._keep_largest_iou(candidate & (t > 0), iou)
            positive = matcher._topk_mask(t, topk, allowed=owned)
            baseline = matcher._topk_mask(t, topk)
            short = positive.sum(0) < baseline.sum(0)
            swapped = matcher._keep_largest_iou(torch.where(short[None], baseline, positive), iou)
            plain = matcher._keep_largest_iou(baseline, iou)
            whole = bool((swapped.sum(0) < plain.sum(0)).any())
            expected = (plain if whole else swapped).nonzero().tolist()
            assigned = result[0]
            if sorted(zip(assigned.pred_idx.tolist(), assigned.tgt_idx.tolist())) != sorted(map(tuple, expected)):
                raise RuntimeError("count_rpf_fallbacks no longer recomputes matcher._rpf_single's positives")
            stats["image_sets"] += 1
            stats["pseudo_boxes"] += t.shape[1]
            stats["boxes_taking_plain_topk"] += int(short.sum())
            stats["image_sets_taking_plain_positives"] += whole
        return result

    matcher._matchable_copies, matcher._rpf_single = counting_copies, counting_single
    try:
        yield stats
    finally:
        matcher._matchable_copies, matcher._rpf_single = copies, single


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts_output", default=None, help="write the counts to this JSON file")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then examples/train_ssod.py's flags")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    import train_ssod

    with counting(collections.Counter()) as stats:
        train_ssod.main(train_args)
    counts = dict(stats)
    print("RPF_COUNTS", json.dumps(counts), flush=True)
    if args.counts_output:
        Path(args.counts_output).write_text(json.dumps(counts, indent=2))
    return counts


if __name__ == "__main__":
    main()
