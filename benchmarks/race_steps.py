"""Where a time_to_target race's seconds go: the steps to each target, the first step, the later ones.

Not a test, and it times nothing: it reads result files of ``benchmarks/time_to_target.py``. For
one task of each file, per method and target, from the runs the report chose for that target (its
``target_runs``: one configuration per method, every seed), medians over the seeds that reached it:

- ``seconds``: training seconds to the target (the report's figure);
- ``steps``: the steps taken by then;
- ``first``: the seconds at the first evaluation after a step (the race evaluates after each of
  the first steps, so this is the first step: a fresh process's one-time costs and the engine's
  path trials are paid there);
- ``per step``: the seconds of each later step, ``(seconds - first) / (steps - first_steps)``;
- ``x base``: ``per step`` over the baseline method's (``--baseline``, default Adam) at the same
  target, in the same file: a method's step in baseline steps, as the race ran them.

Given two files of one task (the records carry the CPU they ran on, ``meta.host``), it tells
whether a ratio moved between them with the step counts or with the steps' cost. Usage::

    git show c12078b~1:benchmarks/results/time_to_target.json > /tmp/epyc.json   # resnet8 on the AMD EPYC
    python benchmarks/race_steps.py --task resnet8 /tmp/epyc.json benchmarks/results/time_to_target.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_to_target as ttt  # noqa: E402


def race_steps(run: dict[str, Any], fraction: float) -> dict[str, float] | None:
    """``seconds``, ``steps``, ``first`` and ``per_step`` (module docstring) of one run at
    ``fraction`` x its initial training MSE; ``None`` if it did not reach it."""
    hit = ttt.reached_at(run, fraction)
    first = next((r for r in run.get("curve", []) if r["steps"] >= 1), None)
    if hit is None or first is None:
        return None
    later = hit["steps"] - first["steps"]
    per_step = (hit["seconds"] - first["seconds"]) / later if later else float("nan")
    return {"seconds": hit["seconds"], "steps": hit["steps"], "first": first["seconds"], "per_step": per_step}


def summary(task_result: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """method -> target (as written in the file) -> ``config``, ``reached`` (of ``seeds``) and
    the medians of :func:`race_steps` over the seeds that reached it."""
    result = ttt.unpooled(task_result)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method, by_target in result["target_runs"].items():
        for target, runs in by_target.items():
            rows = [r for r in (race_steps(run, float(target)) for run in runs) if r is not None]
            entry: dict[str, Any] = {
                "config": runs[0]["config"] if runs else None,
                "reached": len(rows),
                "seeds": len(runs),
            }
            if rows:
                entry.update({key: statistics.median(r[key] for r in rows) for key in rows[0]})
            out.setdefault(method, {})[target] = entry
    return out


def table(path: Path, task: str, baseline: str) -> list[str]:
    """The printed lines for ``task`` in the result file at ``path``."""
    document = json.loads(path.read_text())
    task_result = document["tasks"][task]
    meta = task_result.get("meta", document.get("meta", {}))
    cpu = meta.get("host", {}).get("cpu", "unknown CPU")
    lines = [f"{path} ({task}, {cpu}, git {meta.get('git', '?')})"]
    lines.append(
        f"  {'method':8} {'target':7} {'reached':>8} {'seconds':>9} {'steps':>7} {'first ms':>9} {'per step ms':>12} {'x base':>7}  config"
    )
    rows = summary(task_result)
    for method, by_target in rows.items():
        for target, e in by_target.items():
            base = rows.get(baseline, {}).get(target, {}).get("per_step")
            if "seconds" not in e:
                lines.append(f"  {method:8} {target:7} {e['reached']:>3} of {e['seeds']:<2}  (not reached)")
                continue
            ratio = f"{e['per_step'] / base:7.2f}" if base else f"{'-':>7}"
            lines.append(
                f"  {method:8} {target:7} {e['reached']:>3} of {e['seeds']:<2} {e['seconds']:9.3f} {e['steps']:7.1f} "
                f"{e['first'] * 1e3:9.1f} {e['per_step'] * 1e3:12.2f} {ratio}  {json.dumps(e['config'])}"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", type=Path, nargs="+", help="time_to_target.py result files (JSON)")
    p.add_argument("--task", required=True, help="a task of the files, e.g. resnet8")
    p.add_argument("--baseline", default="adam", help="method whose later steps the ratio divides by")
    args = p.parse_args(argv)
    for path in args.files:
        try:
            lines = table(path, args.task, args.baseline)
        except (OSError, json.JSONDecodeError, KeyError) as error:
            p.error(f"{path}: no time_to_target result for task {args.task!r} ({type(error).__name__}: {error})")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
