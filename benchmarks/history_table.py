"""Evaluation histories of several runs side by side, by total training steps (markdown).

Each run is ``label=path/to/results.json[+offset]``; ``offset`` is the number of steps the run's starting model had
already been trained (``--model_name_or_path``), so runs chained from a shared start line up:

    python benchmarks/history_table.py "10 %=outputs/s/start10/results.json" \\
        "10 %=outputs/s/burnin/results.json+1000" "100 %=outputs/s/start100/results.json" ...

Runs with the same label are one arm. A cell is ``teacher AP / student AP`` (x100); ``*`` marks an evaluation
made without the one-to-many stage's NMS on weights trained one-to-many (the trainer's evaluation-stage bug,
fixed on 2026-11-26: the evaluation right after step T1), which is not comparable with the others.
"""

import argparse
import json


def parse_run(spec: str) -> tuple[str, str, int]:
    """``label=path[+offset]`` -> ``(label, path, offset)``."""
    label, _, rest = spec.partition("=")
    if not label or not rest:
        raise ValueError(f"expected label=path[+offset], got {spec!r}")
    path, plus, offset = rest.rpartition("+")
    if not plus or not offset.isdigit():  # no offset: a "+" belongs to the path
        path, offset = rest, "0"
    return label, path, int(offset)


def arm_histories(specs: list[str]) -> dict[str, dict[int, dict]]:
    """label -> {total step: history record}; the later run wins where two cover the same step."""
    arms: dict[str, dict[int, dict]] = {}
    for spec in specs:
        label, path, offset = parse_run(spec)
        with open(path) as f:
            results = json.load(f)
        t1 = results.get("args", {}).get("one_to_many_steps")
        for record in results["history"]:
            record = dict(record, unfair=_evaluated_without_nms(record, t1))
            arms.setdefault(label, {})[offset + record["step"]] = record
    return arms


def _evaluated_without_nms(record: dict, t1: int | None) -> bool:
    """Old runs evaluated the step-T1 weights (trained one-to-many) with the one-to-one post-processing."""
    return t1 is not None and record["step"] == t1 and record["stage"] == "one_to_one"


def markdown(arms: dict[str, dict[int, dict]]) -> str:
    steps = sorted({step for history in arms.values() for step in history})
    lines = ["| total steps | " + " | ".join(f"{label} (teacher / student AP)" for label in arms) + " |",
             "|---" * (len(arms) + 1) + "|"]
    for step in steps:
        cells = []
        for history in arms.values():
            record = history.get(step)
            if record is None:
                cells.append("–")
                continue
            mark = "*" if record["unfair"] else ""
            cells.append(f"{100 * record['teacher']['AP']:.1f} / {100 * record['student']['AP']:.1f}{mark}")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="label=path/to/results.json[+offset]")
    table = markdown(arm_histories(parser.parse_args(argv).runs))
    print(table)
    return table


if __name__ == "__main__":
    main()
