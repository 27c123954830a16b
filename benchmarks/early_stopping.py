"""Early stopping on a validation split against the same run without it, through ``gramnewton train``.

For each task, seed and optimizer two runs of the CLI (``gramnewton.lab.cli.main``, in this
process, one after the other; each clocked by its own training seconds, evaluations excluded):

- ``early``: 10% of the training set held out, stop ``PATIENCE`` evaluations (epochs) after the
  lowest validation MSE or at the seconds budget, ``best.pt`` keeps the lowest-validation model;
- ``plain``: today's run, every training sample, the whole seconds budget, the last model.

Tasks: ``rotated-mnist`` (the demo's task: the packaged ``rotated_mnist_{ggn,adam}_fixup``
configs, 90 s, patience 5) and ``concrete`` (full-batch GGN, ``lam = 1, alpha = 0.1`` fixed, the
over-fitting configuration of docs/benchmarks.md, and ``GramGaussNewton(model)`` at batch 128,
against Adam lr 1e-2 at batch 128, on the 8-96-96-1 tanh MLP; 10 s, patience 10). Every run's summary (and the 1-minute load average before and after
it) is merged into the JSON by ``(task, seed, optimizer, variant)``, so seeds can be run in
separate commands; ``--report`` prints the markdown tables and draws the figure.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/early_stopping.py --task rotated-mnist --seeds 0
    OMP_WAIT_POLICY=PASSIVE python benchmarks/early_stopping.py --task concrete --seeds 0 1 2
    python benchmarks/early_stopping.py --report --figure docs/figures/early_stopping.png

2 threads (the configs' ``train.threads``; ``torch.set_num_threads(2)``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

from gramnewton.lab.cli import main as cli
from gramnewton.lab.experiments.config import load_config
from gramnewton.lab.experiments.early_stopping import load_best
from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.reproduce import CONFIGS_DIR

RESULTS = Path(__file__).parent / "results" / "early_stopping.json"
# Evaluations without a lower validation MSE that end a run: concrete's full-batch GGN takes one
# step per epoch, and its first ~10 steps are a transient (validation MSE 0.8 -> 8.5 -> 0.4).
PATIENCE = {"rotated-mnist": 5, "concrete": 10}
EARLY = ["data.validation_fraction=0.1", "train.keep_best=true"]
PLAIN = ["data.validation_fraction=0", "train.early_stopping_patience=0", "train.keep_best=false"]
CONCRETE = """
name = "concrete {optimizer}"
[model]
name = "mlp"
kwargs = {{ hidden = [96, 96], act = "tanh" }}
[data]
name = "concrete"
[optimizer]
{hyper}
[train]
batch_size = {batch}
epochs = 100000
seconds = 10.0
weight_decay = 0.0
threads = 2
"""
CONCRETE_OPTIMIZERS = {
    "GGN": ('name = "ggn"\nlam = 1.0\nmomentum = 0.0\nalpha = 0.1\nadaptive_damping = false', 1000),
    "GGN-b128": ('name = "ggn"', 128),  # GramGaussNewton(model) at the first-order batch size
    "Adam": ('name = "adam"\nlr = 0.01', 128),
}


def configs(task: str, folder: Path) -> dict[str, Path]:
    """Optimizer label -> config file of ``task``."""
    if task == "rotated-mnist":
        return {name: CONFIGS_DIR / f"rotated_mnist_{name.lower()}_fixup.toml" for name in ("GGN", "Adam")}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (hyper, batch) in CONCRETE_OPTIMIZERS.items():
        paths[name] = folder / f"concrete_{name.lower()}.toml"
        paths[name].write_text(CONCRETE.format(optimizer=name, hyper=hyper, batch=batch))
    return paths


def run(config: Path, out: Path, overrides: list[str]) -> dict[str, Any]:
    """One ``gramnewton train`` run; its summary with the load average before and after."""
    load_before, start, started = os.getloadavg()[0], time.perf_counter(), time.strftime("%H:%M:%S", time.gmtime())
    args = ["train", str(config), "--out", str(out), "--overwrite", *(a for o in overrides for a in ("--set", o))]
    if cli(args) != 0:
        raise RuntimeError(f"gramnewton {' '.join(args)} failed")
    return {
        **summarise(out),
        "started_utc": started,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "wall_s": time.perf_counter() - start,
    }


def summarise(out: Path) -> dict[str, Any]:
    """What a run folder says: its last row, its lowest test MSE (an oracle: it looks at the test
    set) and, with a validation split, the kept model's row."""
    rows = [r for r in read_rows(out / "metrics.csv") if not math.isnan(r["test_loss"])]
    last, oracle = rows[-1], min(rows, key=lambda r: r["test_loss"])
    summary = {
        "config": load_config(out / "config.toml"),
        "epochs": last["epoch"],
        "seconds": last["seconds"],
        "last_train": last["train_loss"],
        "last_test": last["test_loss"],
        "oracle_test": oracle["test_loss"],
        "oracle_seconds": oracle["seconds"],
        "oracle_epoch": oracle["epoch"],
        "curve": thin([[r["seconds"], r["train_loss"], r.get("val_loss", math.nan), r["test_loss"]] for r in rows]),
    }
    if (out / "best.pt").is_file():
        best = load_best(out)
        summary |= {
            "kept_epoch": best["epoch"],
            "kept_seconds": best["seconds"],
            "kept_val": best["val_loss"],
            "kept_train": best["train_loss"],
            "kept_test": best["test_loss"],
            "stopped_early": last["epoch"] < summary["config"]["train"]["epochs"]
            and last["seconds"] < summary["config"]["train"]["seconds"],
        }
    return summary


def thin(curve: list[list[float]], points: int = 200) -> list[list[float]]:
    """At most about ``points`` evenly spaced entries of ``curve`` and its last (for the figure;
    concrete's runs log over 1,000 epochs)."""
    every = max(1, len(curve) // points)
    return curve[::every] + ([curve[-1]] if (len(curve) - 1) % every else [])


def merge(path: Path, task: str, seed: int, name: str, variant: str, summary: dict[str, Any]) -> None:
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault(task, {}).setdefault(str(seed), {}).setdefault(name, {})[variant] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))


def _s(seconds: float) -> str:
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}"


def report(results: dict[str, Any]) -> str:
    """Markdown: per task a row per (seed, optimizer), then the medians over seeds."""
    lines = []
    for task, seeds in results.items():
        lines += [
            f"### {task}",
            "",
            "| seed | optimizer | early stopping: stopped at epoch (s) | kept model: epoch (s) | val MSE | test MSE "
            "| without: epochs (s) | test MSE of the last model | lowest test MSE (s) | load |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for seed, names in sorted(seeds.items()):
            for name, v in names.items():
                e, p = v["early"], v["plain"]
                stop = f"{e['epochs']:g} ({_s(e['seconds'])})" + ("" if e["stopped_early"] else ", budget")
                loads = [x[k] for x in (e, p) for k in ("load_before", "load_after")]
                lines.append(
                    f"| {seed} | {name} | {stop} | {e['kept_epoch']:g} ({_s(e['kept_seconds'])}) | {e['kept_val']:.4f} "
                    f"| **{e['kept_test']:.4f}** | {p['epochs']:g} ({_s(p['seconds'])}) | {p['last_test']:.4f} "
                    f"| {p['oracle_test']:.4f} ({_s(p['oracle_seconds'])}) | {min(loads):.1f}-{max(loads):.1f} |"
                )
        others = sorted({v for names in seeds.values() for runs in names.values() for v in runs} - {"early", "plain"})
        for variant in others:
            lines += [
                "",
                f"With patience {variant.removeprefix('early_p')} (kept model's test MSE, seconds to it, stop):",
                "",
            ]
            lines += ["| seed | optimizer | stopped at epoch (s) | kept model: epoch (s) | val MSE | test MSE | load |"]
            lines += ["|---|---|---|---|---|---|---|"]
            for seed, names in sorted(seeds.items()):
                for name, v in names.items():
                    if variant in v:
                        e = v[variant]
                        lines.append(
                            f"| {seed} | {name} | {e['epochs']:g} ({_s(e['seconds'])}) | {e['kept_epoch']:g} "
                            f"({_s(e['kept_seconds'])}) | {e['kept_val']:.4f} | {e['kept_test']:.4f} "
                            f"| {e['load_before']:.1f}-{e['load_after']:.1f} |"
                        )
        lines += ["", "Medians over seeds:", ""]
        lines += ["| optimizer | seeds | s to stop | s to kept model | kept test MSE | last test MSE without |"]
        lines += ["|---|---|---|---|---|---|"]
        for name in next(iter(seeds.values())):
            runs = [names[name] for names in seeds.values() if name in names]
            med = lambda key, variant: statistics.median(r[variant][key] for r in runs)  # noqa: E731
            lines.append(
                f"| {name} | {len(runs)} | {_s(med('seconds', 'early'))} | {_s(med('kept_seconds', 'early'))} "
                f"| {med('kept_test', 'early'):.4f} | {med('last_test', 'plain'):.4f} |"
            )
        lines.append("")
    return "\n".join(lines)


def figure(results: dict[str, Any], path: Path) -> None:
    """Seed 0 of each task: test MSE against training seconds with and without early stopping,
    the validation MSE, and the kept model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in results if "0" in results[t]]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (name, v), color in zip(results[task]["0"].items(), ("C0", "C1", "C2")):
            e, p = v["early"], v["plain"]
            seconds, _, val, test = zip(*e["curve"])
            ax.plot(*zip(*[(c[0], c[3]) for c in p["curve"]]), color=color, alpha=0.45, label=f"{name}: test, no split")
            ax.plot(seconds, test, color=color, label=f"{name}: test, 10% held out")
            ax.plot(seconds, val, color=color, linestyle=":", label=f"{name}: validation")
            ax.plot([e["kept_seconds"]], [e["kept_test"]], "o", color=color, markersize=8)
            ax.axvline(e["seconds"], color=color, linestyle="--", linewidth=0.8)
        stops = [v["early"]["seconds"] for v in results[task]["0"].values()]
        ax.set_xlim(0, min(max(c[0] for v in results[task]["0"].values() for c in v["plain"]["curve"]), 4 * max(stops)))
        ax.set(xlabel="training seconds", ylabel="MSE", yscale="log", title=f"{task}, seed 0 (dot: kept model)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("rotated-mnist", "concrete"), default="rotated-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--optimizers", nargs="+", help="labels to run (default: all of the task's)")
    parser.add_argument("--runs", type=Path, default=Path("runs/early-stopping"), help="folder of the run folders")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--patience", type=int, help="run only the early-stopping runs, with this patience")
    parser.add_argument("--report", action="store_true", help="print the tables of --json (no runs)")
    parser.add_argument("--figure", type=Path, help="with --report: draw seed 0 of each task here")
    args = parser.parse_args()
    if args.report:
        results = json.loads(args.json.read_text())
        print(report(results))
        if args.figure:
            figure(results, args.figure)
        return
    paths = configs(args.task, args.runs)
    for seed in args.seeds:
        patience = args.patience or PATIENCE[args.task]
        early = [*EARLY, f"train.early_stopping_patience={patience}"]
        variants = {"early" if patience == PATIENCE[args.task] else f"early_p{patience}": early, "plain": PLAIN}
        for variant, overrides in variants.items():
            if variant == "plain" and args.patience:  # another patience: the plain runs are the same
                continue
            for name in args.optimizers or paths:
                out = args.runs / f"{args.task}-{name.lower()}-{variant}-s{seed}"
                summary = run(paths[name], out, [*overrides, f"seed={seed}"])
                merge(args.json, args.task, seed, name, variant, summary)
                print(
                    f"{args.task} seed {seed} {name} {variant}: {json.dumps({k: v for k, v in summary.items() if k not in ('config', 'curve')})}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
