"""``gramnewton reproduce fig1|fig2|fig3|fig4|all``: run each figure's configs and draw it.

Finished runs are reused and interrupted ones resumed, so the command can be rerun cheaply. A run
that fails is reported and the others go on (those warm-started from it are not run); the figures
that need it are not drawn, and the command ends with an error naming it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..cli import describe_error
from ..experiments.metrics import read_rows, write_rows
from ..experiments.reproduce import BUDGETS, CONFIGS_DIR, FIGURES, data_label, draw, plan
from ..experiments.runner import is_complete, resumable
from .train import train_with_progress


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="run the configs of the paper's figures and draw them")
    p.add_argument("figures", nargs="+", choices=[*FIGURES, "all"])
    p.add_argument("--afad", help="local AFAD-LITE folder (default: stand-in rotated-fashion-mnist)")
    p.add_argument("--rsna", help="local RSNA Bone Age folder (default: stand-in rotated-mnist)")
    p.add_argument(
        "--budget",
        choices=["quick", "long", "paper"],
        default="quick",
        help="quick: minutes on 2 CPU cores; long: twice quick's data and epochs; paper: the paper's "
        "settings (see BUDGETS in experiments/reproduce.py)",
    )
    p.add_argument("--test-budget", dest="budget", action="store_const", const="test", help=argparse.SUPPRESS)
    p.add_argument("--configs", type=Path, default=CONFIGS_DIR, help="folder of the base TOML configs")
    p.add_argument("--out", type=Path, help="output folder (default runs/reproduce-<budget>)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run folder under --out that holds another config's run (else that run is refused)",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    figures = list(FIGURES) if "all" in args.figures else list(dict.fromkeys(args.figures))
    budget, paths = BUDGETS[args.budget], {"afad": args.afad, "rsna": args.rsna}
    out = args.out or Path("runs") / f"reproduce-{args.budget}"
    specs = plan(figures, budget, paths, out, args.configs)
    print(
        f"{len(specs)} runs for {', '.join(figures)} at budget {args.budget!r} on "
        f"{data_label('afad', paths, budget)} and {data_label('rsna', paths, budget)}; output in {out}"
    )
    summary, failed = [], {}
    for i, spec in enumerate(specs, 1):
        folder, source = out / spec.key, Path(spec.config["warm_start"]["run"] or "").name
        if source in failed:  # its warm start would be a failed (perhaps diverged) run's weights
            failed[spec.key] = f"not run: it warm-starts from {source}, which failed"
        else:
            try:
                status = run_one(spec.config, folder, args.overwrite, f"[{i}/{len(specs)}] {spec.key}")
            except Exception as error:
                if args.debug:
                    raise
                failed[spec.key] = f"failed: {describe_error(error)}"
        if spec.key in failed:
            print(f"[{i}/{len(specs)}] {spec.key:<34} {failed[spec.key]}")
            continue
        last = read_rows(folder / "metrics.csv")[-1]
        summary.append({"run": spec.key, "name": spec.config["name"], **last})
        print(
            f"[{i}/{len(specs)}] {spec.key:<34} {status:<14} epoch {last['epoch']:g}: train {last['train_loss']:.4g} "
            f"test {last['test_loss']:.4g} ({last['seconds']:.0f} s of training)"
        )
    if summary:
        write_rows(out / "summary.csv", summary)
    for figure in figures:
        missing = [s.key for s in plan([figure], budget, paths, out, args.configs) if s.key in failed]
        if missing:
            print(f"not drawn: {figure}, which needs the unfinished run(s) {', '.join(missing)}")
            continue
        for path in draw(figure, budget, paths, out, out / "figures", args.configs):
            print(f"wrote {path}")
    if summary:
        print(f"wrote {out / 'summary.csv'}")
    if failed:
        first = next(iter(failed))  # a run that failed: one not run follows a failed one
        print(
            f"error: {len(failed)} of {len(specs)} runs did not finish ({', '.join(failed)}; see above); "
            f"{first} {failed[first]}",
            file=sys.stderr,
        )
        return 1
    return 0


def run_one(config: dict[str, Any], folder: Path, overwrite: bool, desc: str) -> str:
    """Train the run ``config`` into ``folder`` unless it is finished there (resumed if it was
    interrupted); returns what was done. A folder holding another config's run (a ``gramnewton
    train`` run, say) is refused before anything changes, unless ``overwrite``."""
    if is_complete(folder, config):
        return "reused"
    start = time.perf_counter()
    resume = not overwrite or resumable(folder, config)
    train_with_progress(config, folder, resume=resume, overwrite=not resume, desc=desc)
    return f"ran in {time.perf_counter() - start:.0f} s"
