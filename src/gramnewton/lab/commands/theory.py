"""``gramnewton theory quadratic|minibatch``: Theorems 1 and 2 measured on the two-layer net of Eq. 12."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..cli import DEBUG_HELP, describe_error
from ..experiments.runner import CONFIG_FILE, METRICS_FILE
from ..experiments.setup import CHECKPOINT
from ..files import write_atomically
from ..models import activation
from ..theory.closed_form import ENGINES
from ..theory.data import sphere_data
from ..theory.figures import plot_minibatch, plot_quadratic
from ..theory.gauss_seidel import best_sgd_rate, iteration_matrix, spectral_radius
from ..theory.minibatch import MinibatchRun, MinibatchStudy, minibatch_run
from ..theory.ntk import ntk_limit, positive_lambda_0
from ..theory.quadratic import QuadraticRun, QuadraticStudy, quadratic_run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("theory", help="measure the convergence theorems on the wide two-layer net")
    studies = parser.add_subparsers(dest="study", required=True, metavar="STUDY")

    q = studies.add_parser("quadratic", help="Theorem 1: full-batch GGN, quadratic rate against width")
    _common(q, n=64, out="runs/theory/quadratic")
    q.add_argument(
        "--widths",
        type=_exponents,
        default=list(range(8, 19)),
        help="log2 of the widths, e.g. 8:18 or 8,12,16 (default 8:18)",
    )
    q.add_argument("--steps", type=_positive, default=8, help="GGN steps T (default 8; stops at round-off)")
    q.add_argument("--seeds", type=_positive, default=3, help="network initialisations per width (default 3)")
    q.set_defaults(run=run_quadratic)

    m = studies.add_parser("minibatch", help="Theorem 2: cyclic mini-batch GGN against rho(A), and SGD")
    _common(m, n=32, out="runs/theory/minibatch")
    m.add_argument(
        "--widths", type=_exponents, default=list(range(4, 17, 2)), help="log2 of the widths (default 4:16:2)"
    )
    m.add_argument("--batch-size", type=_positive, default=8, help="b; n must be a multiple (default 8)")
    m.add_argument("--epochs", type=_positive, default=200, help="epochs (default 200)")
    m.set_defaults(run=run_minibatch)


def _common(p: argparse.ArgumentParser, n: int, out: str) -> None:
    p.add_argument("--n", type=_positive, default=n, help=f"samples (default {n})")
    p.add_argument("--d", type=_positive, default=10, help="input dimension (default 10)")
    p.add_argument("--act", default="softplus", help="activation of Eq. 12 (default softplus)")
    p.add_argument("--seed", type=int, default=0, help="data seed and first network seed (default 0)")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="closed_form",
        help="Gram engine: closed form of Eq. 12 (default) or the dense reference engine",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="torch intra-op threads (default 1: these problems are small, and on a shared "
        "machine extra threads made steps up to 50x slower)",
    )
    p.add_argument("--out", type=Path, default=Path(out), help=f"output folder (default {out})")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace this study's earlier output in --out, or write beside a training run there",
    )
    # The main parser adds --debug to `theory`, whose study parser then refused it after the
    # study's name, where every error message says to put it.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _positive(text: str) -> int:
    """An integer >= 1 (a usage error otherwise: ``--n 0`` ended in an IndexError)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _exponents(text: str) -> list[int]:
    """``8:18`` (inclusive), ``4:16:2`` or ``8,12,16``: log2 of widths, each >= 0, at least one."""
    if ":" in text:
        parts = [int(v) for v in text.split(":")]
        exponents = list(range(parts[0], parts[1] + 1, parts[2] if len(parts) > 2 else 1))
    else:
        exponents = [int(v) for v in text.split(",")]
    if not exponents or min(exponents) < 0:
        raise argparse.ArgumentTypeError(f"must give at least one log2 width, each >= 0, got {text!r}")
    return exponents


def run_quadratic(args: argparse.Namespace) -> int:
    config = _config(args)
    earlier = check_out(args.out, "quadratic", overwrite=args.overwrite, config=config)
    torch.set_num_threads(args.threads)
    x, y = sphere_data(args.n, args.d, args.seed)
    kernel = ntk_limit(x, activation(args.act))
    study = QuadraticStudy(n=args.n, d=args.d, steps=args.steps, act=args.act, lambda_0=positive_lambda_0(kernel, x))
    make_out(args.out)
    jobs = [(2**p, args.seed + s) for p in args.widths for s in range(args.seeds)]
    run_jobs(
        study,
        QuadraticRun,
        jobs,
        lambda width, seed: quadratic_run(x, y, kernel, width, args.steps, seed, args.act, args.engine),
        earlier,
        args.out,
        "quadratic",
        config,
        unit="run",
    )
    rows = study.rows()
    print(
        f"\nTheorem 1, full-batch GGN: n={args.n}, d={args.d}, {args.act}, lambda_0 = lambda_min(K) = "
        f"{study.lambda_0:.4g}; medians over {args.seeds} seeds"
    )
    print("C_t = sqrt(M) ||f_(t+1)-y|| / ||f_t-y||^2 ('-': f_(t+1) at round-off); drift = max_t ||G_t-G_0||/||G_0||")
    print(
        f"{'M':>8} {'C_0':>7} {'C_1':>7} {'C_2':>7} {'drift':>9} {'|G0-K|/|K|':>10} {'lmin(G0)':>9} {'steps':>5}"
        f"   log10||f_t-y|| (seed {args.seed})"
    )
    for row in rows:
        first = next(r for r in study.runs if r.width == row.width and r.seed == args.seed)
        digits = " ".join(f"{math.log10(v):6.1f}" for v in first.residual_norms)
        cs = " ".join("      -" if c is None else f"{c:7.3g}" for c in (row.constants + [None] * 3)[:3])
        print(
            f"{row.width:>8} {cs} {row.drift_max:>9.2e} {row.kernel_error:>10.2e} {row.lambda_min_g0:>9.3g} "
            f"{row.steps_to_floor:>5g}   {digits}"
        )
    slopes = study.slopes()
    wide = study.slopes(min_width=2**12)
    print(
        "log-log slopes against M (all widths / M >= 4096): "
        + ", ".join(f"{k} {slopes[k]:.2f} / {wide[k]:.2f}" for k in slopes)
    )
    # the figure first: a failure drawing it leaves the study incomplete, and the rerun draws it
    plot_quadratic(study, args.out / "quadratic.png")
    payload = {
        "config": config,
        "complete": True,
        "study": asdict(study),
        "rows": [asdict(r) for r in rows],
        "slopes": slopes,
        "slopes_from_4096": wide,
    }
    _write(args.out, payload, "quadratic")
    print(f"wrote {args.out / 'quadratic.json'} and {args.out / 'quadratic.png'}")
    return 0


def run_minibatch(args: argparse.Namespace) -> int:
    check_widths(args.widths, args.n, args.d)
    config = _config(args)
    earlier = check_out(args.out, "minibatch", overwrite=args.overwrite, config=config)
    torch.set_num_threads(args.threads)
    x, y = sphere_data(args.n, args.d, args.seed)
    kernel = ntk_limit(x, activation(args.act))
    study = MinibatchStudy(
        n=args.n,
        d=args.d,
        batch_size=args.batch_size,
        epochs=args.epochs,
        act=args.act,
        lambda_0=positive_lambda_0(kernel, x),
        rho_a_limit=spectral_radius(iteration_matrix(kernel, args.batch_size)),
        sgd_limit=best_sgd_rate(kernel, args.batch_size),
    )
    make_out(args.out)
    run_jobs(
        study,
        MinibatchRun,
        [(2**p, args.seed) for p in args.widths],
        lambda width, seed: minibatch_run(x, y, width, args.batch_size, args.epochs, seed, args.act, args.engine),
        earlier,
        args.out,
        "minibatch",
        config,
        unit="width",
    )
    print(
        f"\nTheorem 2, cyclic mini-batch GGN: n={args.n}, d={args.d}, b={args.batch_size}, {args.epochs} epochs, "
        f"{args.act}; lambda_0 = {study.lambda_0:.4g}; from K: rho(A) = {study.rho_a_limit:.4f}, "
        f"best SGD rho = {study.sgd_limit.rho:.4f} (lr {study.sgd_limit.lr:.3g}; lr {study.sgd_limit.lr_batch:.3g} "
        f"= 1/max lambda_max(G_BB) gives {study.sgd_limit.rho_batch:.4f})"
    )
    print(
        "contraction = geometric mean of ||e_(t+1)k||/||e_tk|| over the second half of the epochs; "
        "pred = the same for the linear map from G_0"
    )
    print(
        f"{'M':>8} {'rho(A)':>8} {'GGN':>8} {'GGN pred':>8} {'SGD lr':>8} {'rho SGD':>8} {'SGD':>8} {'SGD pred':>8} "
        f"{'GGN end':>9} {'SGD end':>9}"
    )
    for r in study.runs:
        print(
            f"{r.width:>8} {r.rho_a:>8.4f} {r.ggn_contraction:>8.4f} {r.ggn_predicted_contraction:>8.4f} "
            f"{r.sgd_lr:>8.3g} {r.rho_sgd:>8.4f} {r.sgd_contraction:>8.4f} {r.sgd_predicted_contraction:>8.4f} "
            f"{r.ggn_norms[-1]:>9.2e} {r.sgd_norms[-1]:>9.2e}"
        )
    width = study.first_matching_width()
    print(
        "GGN contraction within 5% of rho(A) (in 1 - rate) from M = "
        + ("none" if width is None else str(width))
        + " on"
    )
    plot_minibatch(study, args.out / "minibatch.png")  # before the study is marked complete, as above
    payload = {"config": config, "complete": True, "study": asdict(study), "first_matching_width": width}
    _write(args.out, payload, "minibatch")
    print(f"wrote {args.out / 'minibatch.json'} and {args.out / 'minibatch.png'}")
    return 0


# A ``gramnewton train`` run folder holds these; a study's files beside them would mix the two.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, CHECKPOINT)


# Options that change no number of a study: a rerun with others still resumes it.
NOT_STUDY_OPTIONS = ("out", "overwrite", "threads", "debug")


def check_out(out: Path, study: str, *, overwrite: bool, config: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse, before the study runs, an ``out`` that is a file, or (without ``overwrite``) a folder
    holding this study's ``<study>.json`` or ``.png`` or a training run: both were overwritten or
    written into without a word. Another study's files are left alone, as ``train --out`` and
    ``demo --out`` refuse a folder they would overwrite.

    Returns the payload of an incomplete ``<study>.json`` (``"complete": false``, written by
    :func:`run_jobs`) whose ``config`` equals ``config`` but for :data:`NOT_STUDY_OPTIONS`: the
    study to resume, with or without ``overwrite`` (its finished runs are what a fresh start would
    compute again); ``None`` for a fresh start. An incomplete study of other options is refused
    without ``overwrite``, naming them."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pick another --out")
    earlier = _read_incomplete(out / f"{study}.json")
    if earlier is not None:
        changed = [
            f"--{key.replace('_', '-')} {earlier['config'].get(key)} there, {value} here"
            for key, value in config.items()
            if key not in NOT_STUDY_OPTIONS and earlier["config"].get(key) != value
        ]
        if not changed:
            return earlier
        if not overwrite:
            raise ValueError(
                f"{out / f'{study}.json'} is an incomplete study of other options ({'; '.join(changed)}): rerun "
                "with its options to resume it, pass --overwrite to replace it, or pick another --out"
            )
    if overwrite or not out.is_dir():
        return None
    earlier = [name for name in (f"{study}.json", f"{study}.png") if (out / name).exists()]
    if earlier:
        raise ValueError(
            f"{out} already holds {' and '.join(earlier)} from an earlier study: pass --overwrite to replace them, "
            "or pick another --out"
        )
    run = [name for name in RUN_FILES if (out / name).exists()]
    if run:
        raise ValueError(
            f"{out} holds a training run ({', '.join(run)}): pick another --out, "
            "or pass --overwrite to write the study beside it"
        )
    return None


def _read_incomplete(path: Path) -> dict[str, Any] | None:
    """The payload of ``path`` if it is an incomplete study (:func:`run_jobs`), else ``None`` (no
    file, a complete study, or a file that is no study's JSON: :func:`check_out` refuses those as
    before)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, unreadable, not UTF-8, not JSON
        return None
    if not (isinstance(payload, dict) and payload.get("complete") is False):
        return None
    parts = payload.get("config"), payload.get("jobs_done"), payload.get("study", {}).get("runs")
    return payload if all(isinstance(part, t) for part, t in zip(parts, (dict, list, list))) else None


Job = tuple[int, int]  # (width M, network seed)


def run_jobs(
    study: QuadraticStudy | MinibatchStudy,
    run_type: type[QuadraticRun] | type[MinibatchRun],
    jobs: list[Job],
    run_job: Callable[[int, int], QuadraticRun | MinibatchRun],
    earlier: dict[str, Any] | None,
    out: Path,
    name: str,
    config: dict[str, Any],
    unit: str,
) -> None:
    """Append ``run_job(width, seed)`` of each job to ``study.runs``, in order, writing the finished
    runs to ``out/<name>.json`` (atomically, ``"complete": false``) after each: a failure or an
    interrupt hours into a study kept nothing. ``earlier`` (from :func:`check_out`) holds the
    runs of the first jobs, done by an earlier invocation: they are read back and not redone.

    The first failing job stops the study with a ``ValueError`` naming it and its cause (the
    original error chained): the jobs run by growing width, and what fails at one width (memory,
    a system too ill-conditioned) mostly fails at the next; the rerun resumes at that job. A
    ``KeyboardInterrupt`` propagates, the runs finished before it on disk."""
    done: list[Job] = []
    if earlier is not None:
        done = [(int(width), int(seed)) for width, seed in earlier["jobs_done"]]
        if done != jobs[: len(done)] or len(earlier["study"]["runs"]) != len(done):
            raise ValueError(
                f"{out / f'{name}.json'} lists finished jobs {done} that are not the first of this study's "
                f"{jobs}: pass --overwrite to start it again, or pick another --out"
            )
        study.runs.extend(_run_from_json(run_type, run) for run in earlier["study"]["runs"])
        print(f"resuming {out / f'{name}.json'}: {len(done)} of {len(jobs)} {unit}s done")
    path = out / f"{name}.json"
    for width, seed in tqdm(jobs[len(done) :], desc=f"theory {name}", unit=unit, total=len(jobs), initial=len(done)):
        try:
            run = run_job(width, seed)
        except Exception as error:
            k = len(done)
            kept = (
                f"{'jobs 1-' if k > 1 else 'job '}{k} {'are' if k > 1 else 'is'} kept in {path}, marked incomplete: "
                f"rerun the same command to resume from job {k + 1}"
                if done
                else "no job had finished, nothing is written"
            )
            raise ValueError(
                f"theory {name}: job {k + 1} of {len(jobs)} (width M = {width}, seed {seed}) failed; {kept}; "
                f"the cause: {describe_error(error)}"
            ) from error
        study.runs.append(run)
        done.append((width, seed))
        _write(out, {"config": config, "complete": False, "jobs_done": done, "study": asdict(study)}, name)
        # a figure belongs to a finished study: one left by a study this one replaces would
        # lie beside its JSON (the finished study redraws it)
        (out / f"{name}.png").unlink(missing_ok=True)


def _run_from_json(run_type: type[QuadraticRun] | type[MinibatchRun], fields: dict[str, Any]) -> Any:
    """A run as :func:`_finite` wrote it, back: ``null`` is NaN again in ``float`` fields and lists
    (``float | None`` ones keep ``None``). Finite floats are written by ``repr``: bit for bit."""

    def back(kind: str, value: Any) -> Any:
        if kind == "float":
            return math.nan if value is None else value
        if kind == "list[float]":
            return [math.nan if v is None else v for v in value]
        return value

    # the run modules use ``from __future__ import annotations``: ``f.type`` is the annotation's text
    return run_type(**{f.name: back(str(f.type), fields[f.name]) for f in dataclasses.fields(run_type)})


def check_widths(exponents: list[int], n: int, d: int) -> None:
    """Refuse, before the minibatch study runs, a width ``M`` with ``M d < n``: its ``G_0`` (rank
    ``<= M d``) is singular, so ``rho(A) = 1`` and no SGD learning rate contracts; the study ended
    there in ``min() arg is an empty sequence``, the widths before it lost, or printed an SGD rate
    picked by round-off."""
    small = [p for p in exponents if 2**p * d < n]
    if small:
        least = math.ceil(math.log2(n / d))
        raise ValueError(
            f"--widths {small[0]}: width M = {2 ** small[0]} has M d = {2 ** small[0] * d} trained weights for n = {n} "
            f"samples, so G_0 is singular and Theorem 2's rates are undefined; use log2 widths >= {least}"
        )


def make_out(out: Path) -> None:
    """Create ``out`` once the set-up is done, before the study runs: an ``--out`` under a file
    failed only when the results were written, after the whole study."""
    out.mkdir(parents=True, exist_ok=True)


def _config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "run"}


def _finite(obj: Any) -> Any:
    """NaN and Inf become ``null``: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _write(out: Path, payload: dict[str, Any], name: str) -> Path:
    """Write ``out/<name>.json`` atomically: cut short, the earlier file stands whole."""
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(payload), indent=1)
    return write_atomically(out / f"{name}.json", lambda tmp: tmp.write_text(text))
