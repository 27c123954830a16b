"""``gramnewton demo``: GGN vs SGD vs Adam on the embedded task; table, metrics.csv, curves.png."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from ..experiments.demo import DEMO_SETTINGS, DemoConfig, best_settings, run_demo, sweep_points
from ..experiments.figures import plot_curves
from ..experiments.metrics import as_rows, write_rows
from ..experiments.training import ProgressBar, seconds_to_target


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train a small Fixup ResNet with GGN, SGD and Adam on rotated digits")
    p.add_argument("--dataset", default=DemoConfig.dataset, help="rotated-mnist (default) or rotated-digits")
    p.add_argument("--model", default=DemoConfig.model)
    p.add_argument("--seconds", type=float, default=DemoConfig.seconds, help="training seconds per optimizer")
    p.add_argument("--max-epochs", type=int, default=DemoConfig.max_epochs)
    p.add_argument("--batch-size", type=int, default=DemoConfig.batch_size)
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--target", type=float, default=0.1, help="train MSE whose time to reach is reported")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument(
        "--sweep",
        action="store_true",
        help="first run the hyper-parameter sweep (each point for --sweep-seconds) and use its winners",
    )
    p.add_argument("--sweep-seconds", type=float, default=20.0)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = DemoConfig(args.dataset, args.model, args.batch_size, args.seconds, args.max_epochs, args.seed)
    settings = sweep(args, config) if args.sweep else DEMO_SETTINGS
    logs = run_demo(config, settings, progress=lambda name: ProgressBar(f"demo {name}"))
    rows = [row for name, records in logs.items() for row in as_rows(records, optimizer=name)]
    write_rows(args.out / "metrics.csv", rows)
    curves = {name: as_rows(records) for name, records in logs.items()}
    plot_curves(
        curves, args.out / "curves.png", title=f"{config.model} on {config.dataset} ({config.seconds:g} s each)"
    )
    print(
        f"\n{config.model} on {config.dataset}, batch {config.batch_size}, {config.seconds:g} s of training each, "
        f"{torch.get_num_threads()} threads"
    )
    print(
        f"{'optimizer':<8} {'hyper-parameters':<18} {'epochs':>6} {'train MSE':>10} {'test MSE':>10} "
        f"{'seconds':>8} {'s to ' + format(args.target, 'g'):>9}"
    )
    for name, records in logs.items():
        last, hit = records[-1], seconds_to_target(records, args.target)
        hp = _format(settings[name])
        print(
            f"{name:<8} {hp:<18} {last.epoch:>6} {last.train_loss:>10.4g} {last.test_loss:>10.4g} "
            f"{last.seconds:>8.1f} {'-' if hit is None else format(hit, '.1f'):>9}"
        )
    print(f"wrote {args.out / 'metrics.csv'} and {args.out / 'curves.png'}")
    return 0


def sweep(args: argparse.Namespace, config: DemoConfig) -> dict[str, dict[str, float]]:
    """Run every grid point for ``--sweep-seconds``; write sweep.csv; return the winners."""
    short = DemoConfig(
        config.dataset, config.model, config.batch_size, args.sweep_seconds, config.max_epochs, config.seed
    )
    results = []
    for name, hp in tqdm(sweep_points(), desc="sweep", unit="run"):
        final = run_demo(short, {name: hp})[name][-1]
        results.append((name, hp, final.train_loss))
    write_rows(
        args.out / "sweep.csv",
        [{"optimizer": n, "hyper_parameters": _format(hp), "train_loss": loss} for n, hp, loss in results],
    )
    winners = best_settings(results)
    print("sweep winners:", winners)
    return winners


def _format(hp: dict[str, float]) -> str:
    return ",".join(f"{k}={v:g}" for k, v in hp.items())
