"""Figures of the two theory studies (matplotlib, small PNGs)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .minibatch import MinibatchStudy  # noqa: E402
from .quadratic import QuadraticStudy  # noqa: E402

DPI = 80


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_quadratic(study: QuadraticStudy, path: str | Path) -> Path:
    """Residual per step (first seed, one curve per ``M``), ``C`` against ``M``, drift and ``lambda_min`` against ``M``."""
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.8))
    first_seed = min(r.seed for r in study.runs)
    cmap = plt.get_cmap("viridis")
    widths = sorted({r.width for r in study.runs})
    for i, run in enumerate(r for r in study.runs if r.seed == first_seed):
        ax[0].semilogy(
            run.residual_norms,
            marker=".",
            color=cmap(i / max(1, len(widths) - 1)),
            label=f"M=2^{run.width.bit_length() - 1}",
        )
    ax[0].set(xlabel="step t", ylabel="||f_t - y||", title="full-batch GGN residual")
    ax[0].legend(fontsize=6, ncol=2)
    rows = study.rows()
    ms = [r.width for r in rows]
    for run in study.runs:
        ax[1].scatter([run.width] * len(run.constants), [_nan(c) for c in run.constants], s=8, color="0.6")
    for t in range(min(2, study.steps)):  # one C_t per step taken
        ax[1].plot(ms, [_nan(r.constants[t]) for r in rows], "o-", label=f"median C_{t}")
    ax[1].plot(ms, [_nan(r.constant_max) for r in rows], "k:", lw=0.8, label="median max_t C_t")
    ax[1].set(
        xscale="log", yscale="log", xlabel="width M", ylabel="C = sqrt(M) e_{t+1} / e_t^2", title="Theorem 1 constant"
    )
    ax[1].legend(fontsize=7)
    drift = [r.drift_max for r in rows]
    ax[2].loglog(ms, drift, "o-", label="max_t ||G_t - G_0|| / ||G_0||")
    ax[2].loglog(ms, [r.kernel_error for r in rows], "s-", label="||G_0 - K|| / ||K||")
    ax[2].loglog(ms, [drift[0] * (ms[0] / m) ** 0.5 for m in ms], "k--", lw=0.8, label="~ M^-1/2")
    ax[2].loglog(ms, [drift[0] * ms[0] / m for m in ms], "k:", lw=0.8, label="~ M^-1")
    ax[2].set(xlabel="width M", title="Gram drift")
    ax[2].legend(fontsize=7)
    ax[3].semilogx(ms, [r.lambda_min_g0 for r in rows], "o-", label="lambda_min(G_0)")
    ax[3].axhline(study.lambda_0, color="k", ls="--", lw=0.8, label="lambda_0 = lambda_min(K)")
    ax[3].set(xlabel="width M", title="least eigenvalue")
    ax[3].legend(fontsize=7)
    fig.suptitle(f"Theorem 1: n={study.n}, d={study.d}, {study.act}", fontsize=9)
    return _save(fig, Path(path))


def plot_minibatch(study: MinibatchStudy, path: str | Path) -> Path:
    """Per-epoch contraction of GGN against ``rho(A)`` per ``M``, residual curves, and the rates against ``M``."""
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    cmap = plt.get_cmap("viridis")
    for i, run in enumerate(study.runs):
        color = cmap(i / max(1, len(study.runs) - 1))
        label = f"M=2^{run.width.bit_length() - 1}"
        ratios = [b / a for a, b in zip(run.ggn_norms, run.ggn_norms[1:])]
        ax[0].plot(range(1, len(ratios) + 1), ratios, color=color, lw=0.8, label=label)
        ax[1].semilogy(run.ggn_norms, color=color, lw=1, label=f"GGN {label}")
        ax[1].semilogy(run.sgd_norms, color=color, lw=1, ls=":")
    widest = study.runs[-1]
    ax[1].semilogy(widest.ggn_predicted, "k--", lw=0.8, label="||A^t e_0|| (widest)")
    ax[0].axhline(study.rho_a_limit, color="k", ls="--", lw=0.8, label="rho(A) from K")
    ax[0].set(
        xlabel="epoch",
        ylabel="||e_(t+1)k|| / ||e_tk||",
        title="GGN per-epoch contraction",
        ylim=(min(0.8, study.rho_a_limit - 0.05), 1.01),
    )
    ax[0].legend(fontsize=6, ncol=2)
    # A diverging SGD run (small M) would squash every other curve.
    top = 10 * max(run.ggn_norms[0] for run in study.runs)
    ax[1].set(xlabel="epoch", ylabel="||f - y||", title="residual (GGN solid, SGD dotted)", ylim=(None, top))
    ax[1].legend(fontsize=6, ncol=2)
    ms = [r.width for r in study.runs]
    ax[2].semilogx(ms, [r.ggn_contraction for r in study.runs], "o-", label="GGN measured")
    ax[2].semilogx(ms, [r.rho_a for r in study.runs], "x--", label="rho(A) from G_0")
    ax[2].semilogx(ms, [r.sgd_contraction for r in study.runs], "s-", label="SGD measured (best lr)")
    ax[2].semilogx(ms, [r.rho_sgd for r in study.runs], "+--", label="SGD spectral radius")
    ax[2].axhline(study.rho_a_limit, color="k", ls=":", lw=0.8, label="rho(A) from K")
    ax[2].set(xlabel="width M", ylabel="per-epoch contraction (tail)", title="rates against width")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"Theorem 2: n={study.n}, d={study.d}, batch {study.batch_size}, {study.act}", fontsize=9)
    return _save(fig, Path(path))
