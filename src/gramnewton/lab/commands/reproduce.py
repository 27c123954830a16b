"""``gramnewton reproduce fig1|fig2|fig3|fig4|all``: run each figure's configs and draw it.

Finished runs are reused and interrupted ones resumed, so the command can be rerun cheaply.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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
    summary = []
    for i, spec in enumerate(specs, 1):
        folder = out / spec.key
        if is_complete(folder, spec.config):
            status = "reused"
        else:
            start = time.perf_counter()
            # the run folders under --out are reproduce's own: a stale run (another config) is replaced
            resume = resumable(folder, spec.config)
            train_with_progress(
                spec.config, folder, resume=resume, overwrite=not resume, desc=f"[{i}/{len(specs)}] {spec.key}"
            )
            status = f"ran in {time.perf_counter() - start:.0f} s"
        last = read_rows(folder / "metrics.csv")[-1]
        summary.append({"run": spec.key, "name": spec.config["name"], **last})
        print(
            f"[{i}/{len(specs)}] {spec.key:<34} {status:<14} epoch {last['epoch']:g}: train {last['train_loss']:.4g} "
            f"test {last['test_loss']:.4g} ({last['seconds']:.0f} s of training)"
        )
    write_rows(out / "summary.csv", summary)
    for figure in figures:
        for path in draw(figure, budget, paths, out, out / "figures", args.configs):
            print(f"wrote {path}")
    print(f"wrote {out / 'summary.csv'}")
    return 0
