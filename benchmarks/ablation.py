"""Ablation of Sparse Semi-DETR's modules on the embedded synthetic benchmark (issue: Tables 5, 6, 10, 11).

Trains, with the same seed(s), labels and steps, each variant through ``examples/train_ssod.py`` in its own
process (several at once on one GPU with ``--parallel``), then prints a table of AP, AP50, APs and the mean
time per training step (evaluation and checkpoints excluded; measured while ``--parallel`` runs share the
device, so compare step times only between runs of the same invocation, or use ``bench_model.py --semi``).

    python benchmarks/ablation.py --output_dir outputs/ablation --seeds 0,1,2 --parallel 6 -- --max_steps 2000
Everything after ``--`` is passed to every run (e.g. model size, steps, ``--report_to tensorboard``).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> flags; "Semi-DETR" is the cross-view baseline without RPF (paper Table 5a's first row).
VARIANTS = {
    "supervised": ["--supervised_only", "--query_mode", "none", "--use_rpf", "false"],
    "supervised_100": ["--supervised_only", "--labeled_percent", "100", "--query_mode", "none", "--use_rpf", "false"],
    "semi_detr": ["--query_mode", "cross_view", "--use_rpf", "false"],
    "qrm_only": ["--query_mode", "refined", "--use_rpf", "false"],
    "rpf_only": ["--query_mode", "cross_view", "--use_rpf", "true"],
    "sparse_semi_detr": ["--query_mode", "refined", "--use_rpf", "true"],
}


def run_one(name: str, seed: int, args, extra: list[str]) -> dict:
    out_dir = os.path.join(args.output_dir, f"{name}_seed{seed}")
    os.makedirs(out_dir, exist_ok=True)
    command = [sys.executable, os.path.join(ROOT, "examples", "train_ssod.py"), "--output_dir", out_dir,
               "--seed", str(seed), "--labeled_percent", str(args.labeled_percent), *VARIANTS[name], *extra]
    # argparse keeps the last value of a repeated flag: a variant's own --labeled_percent wins.
    results_path = os.path.join(out_dir, "results.json")
    if getattr(args, "reuse_finished", False) and os.path.exists(results_path):
        code, wall = 0, None  # finished before (e.g. by an interrupted invocation): read, do not train again
    else:
        if os.path.exists(results_path):
            os.remove(results_path)  # never report a previous run's results for a run that failed now
        started = time.time()
        with open(os.path.join(out_dir, "log.txt"), "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        wall = time.time() - started
    record = {"name": name, "seed": seed, "returncode": code, "wall_seconds": wall, "command": " ".join(command),
              "reused": wall is None}
    if code == 0 and os.path.exists(results_path):
        with open(results_path) as f:
            results = json.load(f)
        record.update(final=results["final"], seconds_per_step=results["seconds_per_step"])
    return record


def summarize(records: list[dict], which: str) -> list[dict]:
    """Mean and spread over seeds of each variant's final metrics of the ``which`` model (teacher|student)."""
    rows = []
    for name in VARIANTS:
        done = [r for r in records if r["name"] == name and "final" in r]
        if not done:
            continue
        row = {"variant": name, "seeds": len(done)}
        for metric in ("AP", "AP50", "APs"):
            values = [100 * r["final"][which][metric] for r in done]
            row[metric] = statistics.mean(values)
            row[metric + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["s_per_step"] = statistics.mean(r["seconds_per_step"] for r in done)
        rows.append(row)
    return rows


def markdown(rows: list[dict], which: str) -> str:
    lines = [f"| variant ({which}) | seeds | AP | AP50 | APs | s / step |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[m]:.1f} ± {r[m + '_std']:.1f}" for m in ("AP", "AP50", "APs")]
        lines.append(f"| {r['variant']} | {r['seeds']} | " + " | ".join(cells) + f" | {r['s_per_step']:.3f} |")
    return "\n".join(lines)


def split_passthrough(argv) -> tuple[list[str], list[str]]:
    """``[own args] -- [args for every run]`` -> ``(own, passed)``."""
    argv = list(argv)
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def trainer_with_batches(argv: list[str]):
    """A ``SemiSupervisedTrainer`` built from ``train_ssod`` flags (``--output_dir`` unused, data in the main
    process) and endless iterators over its labeled and unlabeled batches, for the diagnostic scripts."""
    import torch
    from transformers import HfArgumentParser

    from sparse_semi_detr_hf.training.arguments import TrainingArguments
    from sparse_semi_detr_hf.training.trainer import SemiSupervisedTrainer

    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", "unused", "--num_workers", "0", *argv])
    torch.manual_seed(args.seed)
    trainer = SemiSupervisedTrainer(args)
    labeled_loader, unlabeled_loader = trainer._loaders()
    return trainer, iter(labeled_loader), iter(unlabeled_loader)


def main(argv=None) -> dict:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/ablation")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--labeled_percent", type=float, default=10.0)
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (they share the device)")
    parser.add_argument("--single_seed_variants", default="", help="variants run with the first seed only")
    parser.add_argument("--reuse_finished", action="store_true",
                        help="a run whose folder already has results.json is read, not trained again (finishes an "
                             "interrupted ablation; delete a run's folder to train it again)")
    args = parser.parse_args(own)
    jobs = select_jobs(args.variants, args.seeds, args.single_seed_variants)
    unknown = {name for name, _ in jobs} - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
    with ThreadPoolExecutor(args.parallel) as pool:
        records = list(pool.map(lambda job: run_one(job[0], job[1], args, extra), jobs))
    return write_report({"records": records, "extra_args": extra}, os.path.join(args.output_dir, "ablation.json"))


def select_jobs(variants: str, seeds: str, single_seed_variants: str = "") -> list[tuple[str, int]]:
    """``(variant, seed)`` runs: every variant with every seed, except ``single_seed_variants`` (first seed only);
    all seeds of the other variants come first."""
    seed_list = [int(seed) for seed in seeds.split(",")]
    single = set(filter(None, single_seed_variants.split(",")))
    jobs = [(name, seed) for seed in seed_list for name in variants.split(",")
            if name not in single or seed == seed_list[0]]
    return sorted(jobs, key=lambda job: job[0] in single)


def write_report(report: dict, path: str) -> dict:
    """Add the teacher and student summaries of ``report["records"]``, save it as JSON, print the tables."""
    records = report["records"]
    for which in ("teacher", "student"):
        report[which] = summarize(records, which)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    failed = [f"{r['name']}_seed{r['seed']}" for r in records if r["returncode"] != 0]
    if failed:
        print("FAILED runs (see their log.txt):", ", ".join(failed))
    for which in ("teacher", "student"):
        print(markdown(report[which], which), "\n")
    return report


if __name__ == "__main__":
    main()
