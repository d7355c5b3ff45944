"""Mean ± standard deviation over seeds of each arm's evaluations, at every step all of the arm's runs reached.

Each arm is ``label=run_dir[,run_dir...]`` (one folder per seed, as ``benchmarks/ablation.py`` writes them). A run's
evaluations come from its ``results.json`` history or, for a run stopped before it finished (a deadline on a lent
GPU), from the ``step N: student AP x, teacher AP y`` lines of its ``log.txt``:

    python benchmarks/seed_table.py "supervised=out/w4/supervised_seed0,out/w4/supervised_seed1" \\
        "sparse=out/w1/sparse_semi_detr_seed0,out/w1/sparse_semi_detr_seed1" [--json summary.json]

A cell is ``mean ± std (n)`` of AP x 100 (sample standard deviation; 0 for one seed). A run continued in a second
invocation (``--resume_from_checkpoint``) is ``first_dir+second_dir``: its evaluations are merged, the later folder
winning on equal steps (a checkpoint saved at the last step precedes that step's final evaluation, so the resumed
run's history lacks it).
"""

import argparse
import json
import os
import re
import statistics

EVAL_LINE = re.compile(r"step (\d+): student AP ([0-9.]+), teacher AP ([0-9.]+)")


def run_evaluations(run_dir: str) -> dict[int, dict[str, float]]:
    """``{step: {"teacher": AP, "student": AP}}`` of one run (``dir`` or ``dir+dir+...``, later parts win)."""
    merged = {}
    for part in run_dir.split("+"):
        merged.update(_folder_evaluations(part))
    return merged


def _folder_evaluations(run_dir: str) -> dict[int, dict[str, float]]:
    """One folder's evaluations: its ``results.json`` history, else the evaluation lines of its ``log.txt``."""
    results = os.path.join(run_dir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            history = json.load(f)["history"]
        return {r["step"]: {"teacher": r["teacher"]["AP"], "student": r["student"]["AP"]} for r in history}
    with open(os.path.join(run_dir, "log.txt"), errors="replace") as f:
        text = f.read()
    return {int(step): {"teacher": float(teacher), "student": float(student)}
            for step, student, teacher in EVAL_LINE.findall(text)}


def summarize(arms: dict[str, list[str]]) -> dict[str, dict[int, dict]]:
    """label -> {step reached by every run of the arm: {"teacher"|"student": {mean, std, n, values}}}."""
    table = {}
    for label, run_dirs in arms.items():
        runs = [run_evaluations(run_dir) for run_dir in run_dirs]
        common = set.intersection(*(set(run) for run in runs)) if runs else set()
        table[label] = {step: {which: _stats([100 * run[step][which] for run in runs])
                               for which in ("teacher", "student")} for step in sorted(common)}
    return table


def _stats(values: list[float]) -> dict:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "n": len(values), "values": values}


def markdown(table: dict[str, dict[int, dict]], which: str) -> str:
    steps = sorted({step for arm in table.values() for step in arm})
    lines = [f"| step ({which} AP) | " + " | ".join(table) + " |", "|---" * (len(table) + 1) + "|"]
    for step in steps:
        cells = [_cell(arm[step][which]) if step in arm else "–" for arm in table.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f} ({stats['n']})"


def parse_arm(spec: str) -> tuple[str, list[str]]:
    label, _, dirs = spec.partition("=")
    if not label or not dirs:
        raise ValueError(f"expected label=run_dir[,run_dir...], got {spec!r}")
    return label, dirs.split(",")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("arms", nargs="+", help="label=run_dir[,run_dir...]")
    parser.add_argument("--json", help="also write the summary (with every seed's value) here")
    args = parser.parse_args(argv)
    table = summarize(dict(parse_arm(spec) for spec in args.arms))
    for which in ("teacher", "student"):
        print(markdown(table, which), "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arms": dict(parse_arm(spec) for spec in args.arms), "summary": table}, f, indent=2)
    return table


if __name__ == "__main__":
    main()
