"""The semi-supervised study on the embedded synthetic benchmark: calibration, semi vs supervised, ablation.

Protocol (all runs: same model, 10 % labels, same total steps B + S, same seeds):
1. ``burnin``: supervised training on the labeled 10 % for B steps (one-to-many assignment; shared start).
2. From the burn-in model, for S more steps (one-to-many for S/2, then one-to-one), every variant of
   ``benchmarks/ablation.py`` and seed: ``supervised`` (more supervised steps), ``semi_detr``, ``qrm_only``,
   ``rpf_only``, ``sparse_semi_detr``.
3. Calibration arm, in parallel from scratch: ``supervised_100`` (all labels) for B + S steps with the same
   stage switch (B + S/2).
Runs execute as separate processes, ``--parallel`` at a time, on the same device.

    python benchmarks/synthetic_study.py --output_dir outputs/study --burnin_steps 1500 --steps 1500 \
        --seeds 0,1,2 --parallel 10 -- --synthetic_num_train 2000 --d_model 128 ...
"""

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ablation  # noqa: E402

PHASE2 = ("supervised", "semi_detr", "qrm_only", "rpf_only", "sparse_semi_detr")


def _namespace(output_dir: str, labeled_percent: float) -> argparse.Namespace:
    return argparse.Namespace(output_dir=output_dir, labeled_percent=labeled_percent)


def main(argv=None) -> dict:
    own, extra = ablation.split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/study")
    parser.add_argument("--burnin_steps", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="steps after the burn-in")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(PHASE2))
    parser.add_argument("--single_seed_variants", default="", help="variants run with the first seed only")
    parser.add_argument("--labeled_percent", type=float, default=10.0)
    parser.add_argument("--parallel", type=int, default=6)
    parser.add_argument("--skip_full", action="store_true", help="no supervised_100 calibration arm")
    args = parser.parse_args(own)
    os.makedirs(args.output_dir, exist_ok=True)
    started = time.time()
    total = args.burnin_steps + args.steps
    ns = _namespace(args.output_dir, args.labeled_percent)
    common = [*extra, "--synthetic_cache_dir", os.path.join(args.output_dir, "data_cache")]
    _prepare_data(common)
    with ThreadPoolExecutor(args.parallel) as pool:
        full = None if args.skip_full else pool.submit(
            ablation.run_one, "supervised_100", 0, ns, [*common, "--max_steps", str(total),
                                                       "--one_to_many_steps", str(args.burnin_steps + args.steps // 2)])
        burnin = ablation.run_one("supervised", 0, _namespace(os.path.join(args.output_dir, "burnin"),
                                                              args.labeled_percent),
                                  [*common, "--max_steps", str(args.burnin_steps),
                                   "--one_to_many_steps", str(args.burnin_steps)])
        if burnin["returncode"] != 0:
            raise SystemExit(f"burn-in failed: {burnin['command']}")
        init = os.path.join(args.output_dir, "burnin", "supervised_seed0", "best_model")
        phase2 = [*common, "--model_name_or_path", init, "--max_steps", str(args.steps),
                  "--one_to_many_steps", str(args.steps // 2)]
        jobs = ablation.select_jobs(args.variants, args.seeds, args.single_seed_variants)
        futures = [pool.submit(ablation.run_one, name, seed, ns, phase2) for name, seed in jobs]
        records = [f.result() for f in futures] + ([full.result()] if full else [])
    report = {"burnin": burnin, "records": records, "extra_args": extra, "burnin_steps": args.burnin_steps,
              "steps": args.steps, "wall_seconds": time.time() - started}
    return ablation.write_report(report, os.path.join(args.output_dir, "study.json"))


def _prepare_data(common: list[str]) -> None:
    """Generate the synthetic set once, before the parallel runs read it from the cache."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    from transformers import HfArgumentParser

    from sparse_semi_detr_hf.training.arguments import TrainingArguments
    from sparse_semi_detr_hf.training.trainer import synthetic_datasets

    (training_args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=common)
    synthetic_datasets(training_args)


if __name__ == "__main__":
    main()
