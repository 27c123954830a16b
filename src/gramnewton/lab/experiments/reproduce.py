"""The paper's figures: which runs each needs, at which budget, on real data or stand-ins; drawing.

Every run starts from a file of the packaged ``gramnewton/lab/configs/`` (the paper's setting on the real data) rewritten by
:func:`run_config` for the budget and the data: without a local AFAD-LITE / RSNA copy the
stand-ins are used (rotated Fashion-MNIST for AFAD-LITE, rotated MNIST for RSNA), labelled as
such in run names, figure titles and file names. RSNA runs are warm-started from the AFAD run of
the same architecture (GN from an extra AFAD SGD-GN run, as the paper does not say which).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import load_config, resolve
from .figures import plot_curves, plot_heatmap
from .metrics import read_rows
from .runner import METRICS_FILE, run_labels

# The paper-setting configs ship inside the package, so this works from an installed wheel too.
CONFIGS_DIR = Path(str(resources.files("gramnewton.lab").joinpath("configs")))
STAND_INS = {"afad": "rotated-fashion-mnist", "rsna": "rotated-mnist"}
REAL_NAMES = {"afad": "AFAD-LITE", "rsna": "RSNA Bone Age"}
FIGURES = ("fig1", "fig2", "fig3", "fig4")
OPTIMIZER_LABELS = {"ggn": "GGN", "sgd": "SGD", "adam": "Adam", "kfac": "K-FAC"}
FIG1_RUNS = ("ggn_fixup", "sgd_fixup", "sgd_bn")
FIG4_RUNS = ("sgd_bn", "adam_bn", "sgd_gn", "adam_gn", "kfac_gn", "ggn_gn")


@dataclass(frozen=True)
class Budget:
    """How much of the paper's setting a budget runs.

    Attributes:
        depth: ResNet depth (8, 20 or 32) replacing the configs' ResNet-32.
        image_size: inputs resized to this (0: as the data set loads them).
        afad_subset, rsna_subset: ``(train, test)`` items kept (0: all).
        afad_epochs, rsna_epochs: epochs of the AFAD and RSNA runs.
        grid_epochs: epochs of the Fig. 2c grid runs (the paper reads the loss at epoch 10).
        lams, alphas: the Fig. 2c grid.
        kfac_inverse_every: K-FAC's inverse period (the paper's 100 is longer than a quick run).
        stand_ins: data set used for each task without a local copy.
        ggn_alpha: alpha of every GGN run outside the grid (0: the configs' paper values).
    """

    depth: int
    image_size: int
    afad_subset: tuple[int, int]
    rsna_subset: tuple[int, int]
    afad_epochs: int
    rsna_epochs: int
    grid_epochs: int
    lams: tuple[float, ...]
    alphas: tuple[float, ...]
    kfac_inverse_every: int
    stand_ins: Mapping[str, str] = field(default_factory=lambda: dict(STAND_INS))
    ggn_alpha: float = 0.0


LAMS = (0.25, 0.5, 1.0, 2.0, 4.0)
BUDGETS = {
    # About 25 minutes on 2 shared CPU cores: ResNet-8 on 14x14 inputs; AFAD stand-in 1,024 train
    # / 256 test images for 3 epochs; RSNA stand-in 256 / 256 for 10 epochs; a 5 x 2 grid.
    # GGN uses alpha = 3: the paper's 0.3 diverged here (mini-batch MSE 0.33 -> 102 in 4 steps).
    "quick": Budget(8, 14, (1024, 256), (256, 256), 3, 10, 10, LAMS, (0.3, 3.0), 10, ggn_alpha=3.0),
    # Twice the data and epochs of quick (about 20 minutes for fig1, fig3 and fig4 here).
    "long": Budget(8, 14, (2048, 512), (512, 512), 5, 20, 10, LAMS, (0.3, 3.0), 20, ggn_alpha=3.0),
    # The paper: ResNet-32, 64x64, all data, AFAD 100 epochs (Fig. 1b's axis), RSNA 40 (assumed).
    "paper": Budget(32, 64, (0, 0), (0, 0), 100, 40, 10, LAMS, (0.01, 0.03, 0.1, 0.3, 1.0), 100),
    # For the test suite: seconds.
    "test": Budget(
        8, 0, (64, 32), (64, 32), 1, 2, 2, (0.5, 1.0), (0.1,), 2, {"afad": "rotated-digits", "rsna": "rotated-digits"}
    ),
}


@dataclass(frozen=True)
class RunSpec:
    key: str  # run folder name under the output folder
    config: dict[str, Any]


def data_label(task: str, paths: Mapping[str, str | None], budget: Budget) -> str:
    """``"AFAD-LITE"``, or ``"AFAD-LITE stand-in: rotated-fashion-mnist"`` without a local copy."""
    return REAL_NAMES[task] if paths.get(task) else f"{REAL_NAMES[task]} stand-in: {budget.stand_ins[task]}"


def file_label(task: str, paths: Mapping[str, str | None], budget: Budget) -> str:
    return task if paths.get(task) else f"{task}-standin-{budget.stand_ins[task]}"


def run_config(
    stem: str,
    budget: Budget,
    paths: Mapping[str, str | None],
    out: Path,
    configs_dir: Path = CONFIGS_DIR,
    overrides: Iterable[str] = (),
) -> dict[str, Any]:
    """``configs/<stem>.toml`` rewritten for ``budget`` and the data in ``paths`` (task -> root or None)."""
    task = stem.split("_")[0]
    config = load_config(configs_dir / f"{stem}.toml")
    data = config["data"]
    if paths.get(task):
        data["root"] = str(paths[task])
    else:
        data.update(name=budget.stand_ins[task], root="", kwargs={})
    train, test = budget.afad_subset if task == "afad" else budget.rsna_subset
    data.update(train_subset=train, test_subset=test, image_size=budget.image_size)
    config["model"]["name"] = config["model"]["name"].replace("resnet32", f"resnet{budget.depth}")
    # Legends: optimizer and model; the figure titles name the data.
    config["name"] = f"{OPTIMIZER_LABELS[config['optimizer']['name']]} {config['model']['name']}"
    config["train"]["epochs"] = budget.afad_epochs if task == "afad" else budget.rsna_epochs
    if config["optimizer"]["name"] == "ggn" and budget.ggn_alpha:
        config["optimizer"]["alpha"] = budget.ggn_alpha
    if config["optimizer"]["name"] == "kfac":
        config["optimizer"]["inverse_every"] = budget.kfac_inverse_every
    if config["warm_start"]["run"]:
        config["warm_start"]["run"] = str(out / Path(config["warm_start"]["run"]).name)
    return resolve(config, overrides)


def grid_key(lam: float, alpha: float, budget: Budget, configs_dir: Path = CONFIGS_DIR) -> str:
    """Run folder of a Fig. 2c grid point: the RSNA GGN run itself when it is that point."""
    base = load_config(configs_dir / "rsna_ggn_fixup.toml")["optimizer"]
    if (lam, alpha) == (base["lam"], budget.ggn_alpha or base["alpha"]) and budget.grid_epochs == budget.rsna_epochs:
        return "rsna_ggn_fixup"
    return f"rsna_ggn_fixup_lam{lam:g}_alpha{alpha:g}"


def plan(
    figures: Sequence[str], budget: Budget, paths: Mapping[str, str | None], out: Path, configs_dir: Path = CONFIGS_DIR
) -> list[RunSpec]:
    """The runs ``figures`` need, each warm-start source before the runs that use it."""
    stems: list[str] = []
    for fig in figures:
        if fig == "fig1":
            stems += [f"{t}_{r}" for t in ("afad", "rsna") for r in FIG1_RUNS]
        elif fig == "fig2":
            stems += [f"rsna_{r}" for r in FIG1_RUNS]
        elif fig == "fig3":
            stems += [f"afad_{r}" for r in FIG1_RUNS]
        elif fig == "fig4":
            stems += [f"rsna_{r}" for r in FIG4_RUNS]
        else:
            raise ValueError(f"unknown figure {fig!r}; expected one of {FIGURES}")
    specs: dict[str, RunSpec] = {}

    def add(key: str, config: dict[str, Any]) -> None:
        source = config["warm_start"]["run"]
        if source and Path(source).name not in specs:
            add(Path(source).name, run_config(Path(source).name, budget, paths, out, configs_dir))
        specs.setdefault(key, RunSpec(key, config))

    for stem in dict.fromkeys(stems):
        add(stem, run_config(stem, budget, paths, out, configs_dir))
    if "fig2" in figures:
        for lam, alpha in grid_points(budget):
            config = run_config(
                "rsna_ggn_fixup",
                budget,
                paths,
                out,
                configs_dir,
                [f"optimizer.lam={lam!r}", f"optimizer.alpha={alpha!r}", f"train.epochs={budget.grid_epochs}"],
            )
            base = specs["rsna_ggn_fixup"].config
            config["name"] = f"{base['name']} lam={lam:g} alpha={alpha:g}"
            add(grid_key(lam, alpha, budget, configs_dir), config)
    return list(specs.values())


def grid_points(budget: Budget) -> list[tuple[float, float]]:
    return [(lam, alpha) for alpha in budget.alphas for lam in budget.lams]


def load_curves(run_dirs: Iterable[str | Path]) -> dict[str, list[dict[str, Any]]]:
    """Run label (:func:`~gramnewton.lab.experiments.runner.run_labels`) -> metric rows."""
    runs = [Path(run) for run in run_dirs]
    return {label: read_rows(run / METRICS_FILE) for label, run in zip(run_labels(runs), runs)}


def draw(
    figure: str,
    budget: Budget,
    paths: Mapping[str, str | None],
    out: Path,
    figures_dir: Path,
    configs_dir: Path = CONFIGS_DIR,
) -> list[Path]:
    """Draw ``figure`` from the finished runs under ``out``; returns the PNG paths."""
    afad, rsna = (data_label(t, paths, budget) for t in ("afad", "rsna"))
    tag = {t: file_label(t, paths, budget) for t in ("afad", "rsna")}

    def curves(keys: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        return load_curves(out / k for k in keys)

    def png(name: str) -> Path:
        return figures_dir / f"reproduce_{name}.png"

    if figure == "fig1":
        return [
            plot_curves(
                curves(f"{t}_{r}" for r in FIG1_RUNS),
                png(f"fig1_{tag[t]}"),
                metrics=("train_loss",),
                title=f"Fig. 1: training loss, {label} (log scale)",
                log=True,
            )
            for t, label in (("afad", afad), ("rsna", rsna))
        ]
    if figure == "fig3":
        return [
            plot_curves(
                curves(f"afad_{r}" for r in FIG1_RUNS),
                png(f"fig3_{tag['afad']}"),
                metrics=("test_loss",),
                title=f"Fig. 3: test loss, {afad} (log scale)",
                log=True,
            )
        ]
    if figure == "fig4":
        return [
            plot_curves(
                curves(f"rsna_{r}" for r in FIG4_RUNS),
                png(f"fig4_{tag['rsna']}"),
                title=f"Fig. 4: all baselines, {rsna} (log scale)",
                log=True,
            )
        ]
    if figure == "fig2":
        key = {point: grid_key(*point, budget, configs_dir) for point in grid_points(budget)}
        grid = {point: read_rows(out / key[point] / METRICS_FILE) for point in grid_points(budget)}
        final = {p: _loss_at(rows, budget.grid_epochs) for p, rows in grid.items()}
        values = [[final[(lam, alpha)] for lam in budget.lams] for alpha in budget.alphas]
        return [
            plot_curves(
                curves(f"rsna_{r}" for r in FIG1_RUNS),
                png(f"fig2a_{tag['rsna']}"),
                metrics=("test_loss",),
                title=f"Fig. 2a: test loss, {rsna} (log scale)",
                log=True,
            ),
            plot_curves(
                {f"lam={p[0]:g}, alpha={p[1]:g}": grid[p] for p in fig2b_points(budget, final)},
                png(f"fig2b_{tag['rsna']}"),
                metrics=("train_loss",),
                title=f"Fig. 2b: GGN lam/alpha, {rsna}",
                log=True,
            ),
            plot_heatmap(
                values,
                budget.lams,
                budget.alphas,
                png(f"fig2c_{tag['rsna']}"),
                title=f"Fig. 2c: train loss at epoch {budget.grid_epochs}, {rsna}",
            ),
        ]
    raise ValueError(f"unknown figure {figure!r}")


def fig2b_points(budget: Budget, final: Mapping[tuple[float, float], float]) -> list[tuple[float, float]]:
    """lam = 1 with every alpha, and the best alpha for the smallest and largest lam (the paper's Fig. 2b)."""
    points = [(1.0, a) for a in budget.alphas] if 1.0 in budget.lams else []
    for lam in (budget.lams[0], budget.lams[-1]):
        best = min(budget.alphas, key=lambda a: _finite(final[(lam, a)]))
        points.append((lam, best))
    return list(dict.fromkeys(points))


def _loss_at(rows: Sequence[Mapping[str, Any]], epoch: int) -> float:
    return next((float(r["train_loss"]) for r in rows if int(r["epoch"]) == epoch), float("nan"))


def _finite(value: float) -> float:
    return value if value == value else float("inf")
