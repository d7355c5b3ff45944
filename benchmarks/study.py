"""One driver for semi-supervised studies: burn-in -> arms x seeds -> tables (docs/results.md).

    python benchmarks/study.py --output_dir outputs/study --preset synthetic_benchmark --burnin_steps 3000 \\
        --steps 1500 --seeds 0,1,2 --arms supervised,semi_detr,qrm_only,rpf_only,sparse_semi_detr \\
        --parallel 2 -- --pseudo_label_threshold 0.5 --unsup_weight 4.0

Stages (``--stages``, default all, in this order; a run whose folder already has ``results.json`` is read, not
trained again, so an interrupted study continues where it stopped):

1. ``burnin``: supervised training on the labeled split (``--labeled_percent``, default 10) from scratch for
   ``--burnin_steps`` (seed 0, every step one-to-many): the shared start of every arm (its ``best_model``, chosen
   on the validation set). With ``--calibration``, also the same supervised training on 100 % of the labels for
   ``burnin_steps + steps`` (the room unlabeled data could fill, at equal steps).
2. ``arms``: each arm (``ARMS``) and seed from the burn-in model for ``--steps`` more steps, evaluated on the
   validation set at the start and every ``--eval_every`` steps, and once on the held-out test set at the end
   (``--synthetic_num_test`` / ``--test_images``; never used to choose anything).
3. ``table``: per arm, mean ± sample standard deviation over seeds: the validation curve (teacher and student AP
   at every step all seeds reached, with the pseudo-labels per unlabeled image), and the final test metrics
   (AP, AP50, APs). Printed as markdown and saved as ``study.json``.

Everything after ``--`` goes to every training run (``examples/train_ssod.py`` flags); an arm's own flags win.
Runs are separate processes, ``--parallel`` at a time (one thread each with ``OMP_NUM_THREADS=1``, as set here
unless already set). With ``--deadline`` seconds the runs still going are stopped and the tables read their
evaluation lines from ``log.txt`` (a lent GPU's time limit).
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_ssod.py")

# arm -> flags. "semi_detr" is the cross-view baseline without RPF (the paper's Table 5a first row). Every method
# setting an arm depends on is stated: an arm continues the burn-in's saved config, whose values would otherwise win
# (a burn-in saved with rpf_joint_matching=false once made the RPF arms run the earlier reading of RPF).
RPF_FLAGS = ["--use_rpf", "true", "--rpf_joint_matching", "true"]
ARMS = {
    "supervised": ["--supervised_only", "--query_mode", "none", "--use_rpf", "false"],
    "semi_detr": ["--query_mode", "cross_view", "--use_rpf", "false"],
    "qrm_only": ["--query_mode", "refined", "--use_rpf", "false"],
    "rpf_only": ["--query_mode", "cross_view", *RPF_FLAGS],
    "sparse_semi_detr": ["--query_mode", "refined", *RPF_FLAGS],
    # RPF's direct baseline: Semi-DETR's plain one-to-many assignment with RPF's k = 4 positives instead of 13.
    "semi_detr_top4": ["--query_mode", "cross_view", "--use_rpf", "false", "--one_to_many_topk", "4"],
}
SUPERVISED_FLAGS = ARMS["supervised"]
PAPER_ARMS = ("supervised", "semi_detr", "qrm_only", "rpf_only", "sparse_semi_detr")  # the default --arms
EVAL_LINE = re.compile(r"trainer: step (\d+): student AP ([0-9.]+), teacher AP ([0-9.]+)")
METRICS = ("AP", "AP50", "AP75", "APs")


# ------------------------------------------------------------------------------------------------ running
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


class Runner:
    """Starts training runs as processes; stops them all at a deadline."""

    def __init__(self, deadline: float | None = None, fresh: bool = False):
        self.deadline = None if deadline is None else time.monotonic() + deadline
        self.fresh = fresh

    def run(self, out_dir: str, flags: list[str]) -> dict:
        """``train_ssod.py --output_dir out_dir *flags`` unless ``out_dir/results.json`` exists (then read)."""
        os.makedirs(out_dir, exist_ok=True)
        results_path = os.path.join(out_dir, "results.json")
        command = [sys.executable, SCRIPT, "--output_dir", out_dir, *flags]
        record = {"dir": out_dir, "command": " ".join(command)}
        if os.path.exists(results_path) and not self.fresh:
            return {**record, "returncode": 0, "reused": True}
        if os.path.exists(results_path):
            os.remove(results_path)  # never report a previous run's results for a run that fails now
        started = time.time()
        with open(os.path.join(out_dir, "log.txt"), "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                       env={"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"})
            code = self._wait(process)
        return {**record, "returncode": code, "wall_seconds": time.time() - started, "reused": False,
                "stopped_at_deadline": code == -signal.SIGTERM}

    def _wait(self, process: subprocess.Popen) -> int:
        while True:
            try:
                return process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    process.terminate()
                    return process.wait()


def burnin_flags(args, extra: list[str], labeled_percent: float, steps: int) -> list[str]:
    return ["--preset", args.preset, *extra, *SUPERVISED_FLAGS, "--labeled_percent", str(labeled_percent),
            "--seed", "0", "--max_steps", str(steps), "--one_to_many_steps", str(steps)]


def arm_flags(args, extra: list[str], arm: str, seed: int) -> list[str]:
    start = os.path.join(args.output_dir, "burnin", "best_model")
    return ["--preset", args.preset, "--model_name_or_path", start, "--labeled_percent", str(args.labeled_percent),
            "--max_steps", str(args.steps), "--one_to_many_steps", str(args.steps), "--eval_steps",
            str(args.eval_every or max(1, args.steps // 4)), "--checkpointing_steps", str(args.steps),
            *extra, *ARMS[arm], "--seed", str(seed)]


def arm_dir(output_dir: str, arm: str, seed: int) -> str:
    return os.path.join(output_dir, "arms", f"{arm}_seed{seed}")


def run_study(args, extra: list[str]) -> list[dict]:
    runner, records = Runner(args.deadline, args.fresh), []
    stages = args.stages.split(",")
    if "burnin" in stages:
        jobs = [(os.path.join(args.output_dir, "burnin"),
                 burnin_flags(args, extra, args.labeled_percent, args.burnin_steps))]
        if args.calibration:
            jobs.append((os.path.join(args.output_dir, "calibration_100"),
                         burnin_flags(args, extra, 100.0, args.burnin_steps + args.steps)))
        with ThreadPoolExecutor(args.parallel) as pool:
            records += list(pool.map(lambda job: runner.run(*job), jobs))
        if records[0]["returncode"] != 0:
            raise SystemExit(f"the burn-in failed: {records[0]['dir']}/log.txt")
    if "arms" in stages:
        jobs = [(arm_dir(args.output_dir, arm, seed), arm_flags(args, extra, arm, seed))
                for seed in parse_ints(args.seeds) for arm in args.arms.split(",")]
        with ThreadPoolExecutor(args.parallel) as pool:
            records += list(pool.map(lambda job: runner.run(*job), jobs))
    return records


# ------------------------------------------------------------------------------------------------ tables
def run_evaluations(run_dir: str) -> dict[int, dict]:
    """``{step: {"teacher": AP, "student": AP, "pseudo": per-image rate or None}}`` of one run (``dir`` or
    ``dir+dir``: a run continued in a second folder, the later winning on equal steps), from ``results.json``, or
    from the evaluation lines of ``log.txt`` for a run stopped before it finished."""
    merged = {}
    for part in run_dir.split("+"):
        merged.update(_folder_evaluations(part))
    return merged


def _folder_evaluations(run_dir: str) -> dict[int, dict]:
    results = os.path.join(run_dir, "results.json")
    if os.path.exists(results):
        with open(results) as f:
            history = json.load(f)["history"]
        return {r["step"]: {"teacher": r["teacher"]["AP"], "student": r["student"]["AP"],
                            "pseudo": r.get("pseudo_labels_per_image"), "precision": r.get("pseudo_precision"),
                            "recall": r.get("pseudo_recall")} for r in history}
    log = os.path.join(run_dir, "log.txt")
    if not os.path.exists(log):
        return {}
    with open(log, errors="replace") as f:
        text = f.read()
    return {int(step): {"teacher": float(teacher), "student": float(student), "pseudo": None, "precision": None,
                        "recall": None} for step, student, teacher in EVAL_LINE.findall(text)}


def stats(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of ``values``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": std, "n": len(values), "values": values}


def curve(run_dirs: list[str]) -> dict[int, dict]:
    """Steps every run reached -> {"teacher"|"student": AP x 100 stats, "pseudo": stats of the pseudo-labels per
    unlabeled image since the previous evaluation, "precision" / "recall": of those pseudo-labels (None without)}."""
    runs = [run_evaluations(run_dir) for run_dir in run_dirs]
    common = set.intersection(*(set(run) for run in runs)) if runs else set()
    table = {}
    for step in sorted(common):
        row = {who: stats([100 * run[step][who] for run in runs]) for who in ("teacher", "student")}
        for key in ("pseudo", "precision", "recall"):
            values = [run[step].get(key) for run in runs if run[step].get(key) is not None]
            row[key] = stats(values) if values else None
        table[step] = row
    return table


def test_metrics(run_dirs: list[str]) -> dict | None:
    """Stats over runs of the final test metrics (x 100) of teacher and student, or None when a run lacks them."""
    tests = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir.split("+")[-1], "results.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            test = json.load(f).get("test")
        if test is None:
            return None
        tests.append(test)
    return {"step": tests[0]["step"], "images": tests[0]["images"],
            **{who: {m: stats([100 * t[who][m] for t in tests]) for m in METRICS} for who in ("teacher", "student")}}


def summarize(arms: dict[str, list[str]]) -> dict:
    """label -> {"curve": ..., "test": ...} for run folders grouped into arms."""
    return {label: {"runs": dirs, "curve": curve(dirs), "test": test_metrics(dirs)} for label, dirs in arms.items()}


def cell(entry: dict | None, digits: int = 1) -> str:
    if entry is None:
        return "–"
    text = f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"
    return text if entry["n"] > 1 else f"{entry['mean']:.{digits}f} (1)"


def curve_markdown(summary: dict, who: str) -> str:
    steps = sorted({step for arm in summary.values() for step in arm["curve"]})
    lines = [f"| step ({who} AP, validation) | " + " | ".join(summary) + " |", "|---" * (len(summary) + 1) + "|"]
    for step in steps:
        cells = [cell(arm["curve"][step][who]) if step in arm["curve"] else "–" for arm in summary.values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_label_markdown(summary: dict) -> str:
    """Per arm and step: pseudo-labels per unlabeled image, their precision and recall (interval means)."""
    lines = ["| arm | step | pseudo-labels / image | precision | recall |", "|---|---|---|---|---|"]
    for label, arm in summary.items():
        for step, row in arm["curve"].items():
            if row["pseudo"] is None:
                continue
            cells = [cell(row[key], 2) for key in ("pseudo", "precision", "recall")]
            lines.append(f"| {label} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_markdown(summary: dict) -> str:
    lines = ["| arm | seeds | " + " | ".join(f"{who} {m}" for who in ("teacher", "student") for m in METRICS) + " |",
             "|---|---|" + "---|" * (2 * len(METRICS))]
    for label, arm in summary.items():
        test = arm["test"]
        if test is None:
            continue
        cells = [cell(test[who][m]) for who in ("teacher", "student") for m in METRICS]
        lines.append(f"| {label} | {test['teacher']['AP']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def study_arms(args) -> dict[str, list[str]]:
    """The run folders of this study, grouped into arms (the burn-in and the calibration arm included)."""
    arms = {}
    for name in ("burnin", "calibration_100"):
        if os.path.isdir(os.path.join(args.output_dir, name)):
            arms[name] = [os.path.join(args.output_dir, name)]
    for arm in args.arms.split(","):
        dirs = [arm_dir(args.output_dir, arm, seed) for seed in parse_ints(args.seeds)]
        dirs = [d for d in dirs if os.path.isdir(d)]
        if dirs:
            arms[arm] = dirs
    return arms


def report(summary: dict) -> str:
    parts = [test_markdown(summary)]
    arms_only = {k: v for k, v in summary.items() if k not in ("burnin", "calibration_100")}
    for who in ("teacher", "student"):
        parts.append(curve_markdown(arms_only, who))
    parts.append(pseudo_label_markdown(arms_only))
    return "\n\n".join(parts)


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def main(argv=None) -> dict:
    own, extra = split_passthrough(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--preset", default="synthetic_benchmark")
    parser.add_argument("--burnin_steps", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=1500, help="steps of every arm after the burn-in")
    parser.add_argument("--eval_every", type=int, default=None, help="evaluation interval of the arms "
                                                                     "(default steps / 4)")
    parser.add_argument("--labeled_percent", type=float, default=10.0)
    parser.add_argument("--arms", default=",".join(PAPER_ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calibration", action="store_true", help="also train the 100 %% label arm")
    parser.add_argument("--stages", default="burnin,arms,table")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once")
    parser.add_argument("--deadline", type=float, default=None, help="stop the runs after this many seconds")
    parser.add_argument("--fresh", action="store_true", help="train again runs that already have results.json")
    args = parser.parse_args(own)
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; known: {sorted(ARMS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    records = run_study(args, extra)
    summary = summarize(study_arms(args))
    study = {"command": sys.argv if argv is None else argv, "extra_args": extra, "records": records,
             "summary": summary}
    with open(os.path.join(args.output_dir, "study.json"), "w") as f:
        json.dump(study, f, indent=2)
    failed = [r["dir"] for r in records if r["returncode"] not in (0, -signal.SIGTERM)]
    if failed:
        print("FAILED runs (see their log.txt):", ", ".join(failed))
    if "table" in args.stages.split(","):
        print(report(summary))
    return study


if __name__ == "__main__":
    main()
