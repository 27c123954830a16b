"""Gram-Gauss-Newton on a CUDA GPU: exactness in float64, float32's error, step cost, NCCL.

Not a test: CI has no GPU. ``benchmarks/cuda_check.sh`` runs it (after the hooks engine's float64
tests with ``GRAMNEWTON_TEST_DEVICE=cuda``) on a lent GPU machine; ``--device cpu`` runs it here.
Every tensor is placed on the device explicitly (no default device), so a library tensor made on
the CPU by mistake fails here as it would for a user.

1. **Exact, float64**: one ``GramGaussNewton`` step against its dense formula from
   ``torch.func.jacrev`` on the device (relative error, max norm): Eq. 11 on an MLP, a GroupNorm
   CNN and resnet8_fixup; two steps with momentum (SPRING); the exact cross-entropy step
   ``-(lam J^T H J + alpha I)^{-1} J^T g``; ``solve_space="parameter"`` (where ``m x m`` is
   small); and ``distributed="exact"``
   in a one-rank NCCL group against the plain step (with the status exchange on the CPU too,
   which NCCL refuses); and what users do there (:func:`usage_checks`: a CPU model under a GPU
   default device, ``torch.autocast``, ``torch.compile``, an autograd-Laplacian PINN with the
   defaults, a dropout network's gain ratio).
2. **float32**: the same steps with float32 parameters against the float64 step from the same
   weights (TF32 as PyTorch sets it by default: on for cuDNN convolutions, off for matmul).
3. **Step cost**, float32, batch 128 (32 for the two-layer net; ``--batch`` for all): SGD, Adam and GGN steps as
   training takes them (:func:`make_train_step`, the lab's optimizer factory), interleaved, each
   timed from a synchronised start to a synchronised end; median of ``--reps``, ratio to SGD;
   peak GPU memory of each method's steps above the model's (``torch.cuda.max_memory_allocated``);
   and any parameter routed to the reference engine (its warning), in the checks and the timings.

Usage::

    python benchmarks/cuda_check.py --out benchmarks/results/cuda_check.json
    python benchmarks/cuda_check.py --device cpu --reps 3 --out /tmp/cuda_check.json   # a dry run
    python benchmarks/cuda_check.py --profile fixup32   # where the device time of each step goes
    python benchmarks/cuda_check.py --matmul-precision high --out /tmp/tf32.json   # TF32 products too
    python benchmarks/cuda_check.py --no-checks --batch 512 --models fixup32 --out /tmp/b512.json
    python benchmarks/cuda_check.py --no-checks --no-timing --autocast-cost --out /tmp/amp.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gramnewton import GramGaussNewton
from gramnewton.distributed import Communicator
from gramnewton.engines import HooksEngine, ReferenceEngine
from gramnewton.lab.experiments.optimizers import build_optimizer
from gramnewton.lab.experiments.training import make_train_step
from gramnewton.lab.models import TwoLayerNet, get_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the float64 references of the tests (tests/dense.py)
from dense import dense_jacobian, groupnorm_cnn  # noqa: E402

LAM, ALPHA, MU = 2.0, 0.5, 0.9


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


def resnet8() -> nn.Module:
    return get_model("resnet8_fixup", in_channels=1, num_outputs=1)


# name -> (model, input shape, batch)
EXACT_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (mlp, (5,), 12),
    "gn_cnn": (groupnorm_cnn, (1, 6, 6), 10),
    "resnet8_fixup": (resnet8, (1, 8, 8), 8),
}


def perturbed(build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """The model in float64 on ``device``, its weights moved off Fixup's zeros (which hide most of J)."""
    torch.manual_seed(0)
    model = build().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.to(device)


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def jacobian(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The outputs ``f`` ``(b, k)`` and the dense Jacobian ``(b*k, m)`` of ``f.reshape(-1)``
    (the tests' ``torch.func.jacrev`` reference)."""
    with torch.no_grad():
        f = model(x).reshape(x.shape[0], -1)
    return f, dense_jacobian(model, x)


def eye(n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device)


def sample_space_step(jac: Tensor, r: Tensor, lam: float, alpha: float) -> Tensor:
    """Eq. 11's direction ``J^T (lam J J^T + alpha I)^{-1} r`` ``(m,)`` (the step subtracts it)."""
    return jac.T @ torch.linalg.solve(lam * jac @ jac.T + alpha * eye(jac.shape[0], jac), r)


def relative(got: Tensor, want: Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def ggn(model: nn.Module, alpha: float = ALPHA, **options) -> GramGaussNewton:
    return GramGaussNewton(model, lam=LAM, alpha=alpha, adaptive_damping=False, **{"momentum": 0.0, **options})


def mse_closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    return lambda: model(x).reshape(x.shape[0], -1) - y


def exact_checks(device: torch.device, dtype: torch.dtype, alpha: float = ALPHA) -> list[dict]:
    """Each step's relative error against its dense float64 formula (``dtype``: the parameters')."""
    rows = []
    for name, (build, shape, b) in EXACT_MODELS.items():
        model = perturbed(build, device)
        torch.manual_seed(1)
        batches = [torch.randn(b, *shape, dtype=torch.float64, device=device) for _ in range(2)]
        k = model(batches[0]).reshape(b, -1).shape[1]
        targets = [torch.randn(b, k, dtype=torch.float64, device=device) for _ in range(2)]
        start = flat(model)

        # Eq. 11, one step
        f, jac = jacobian(model, batches[0])
        want = start - sample_space_step(jac, (f - targets[0]).reshape(-1), LAM, alpha)
        for space in ("sample", "parameter") if start.numel() <= 5000 else ("sample",):  # m x m fits
            low = copy.deepcopy(model).to(dtype)
            ggn(low, alpha, solve_space=space).step(mse_closure(low, batches[0].to(dtype), targets[0].to(dtype)))
            rows.append(dict(model=name, check=f"eq11_{space}", error=relative(flat(low).double(), want)))

        # SPRING: phi_t = mu phi_{t-1} + J^T (lam G + alpha I)^{-1} (r - lam mu J phi_{t-1}), w -= phi_t
        reference, phi = copy.deepcopy(model), torch.zeros_like(start)
        for x, y in zip(batches, targets):
            f, jac = jacobian(reference, x)
            r = (f - y).reshape(-1) - LAM * MU * jac @ phi
            phi = MU * phi + sample_space_step(jac, r, LAM, alpha)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(flat(reference) - phi, reference.parameters())
        low = copy.deepcopy(model).to(dtype)
        opt = ggn(low, alpha, momentum=MU)
        for x, y in zip(batches, targets):
            opt.step(mse_closure(low, x.to(dtype), y.to(dtype)))
        rows.append(dict(model=name, check="spring_two_steps", error=relative(flat(low).double(), flat(reference))))

        # exact cross-entropy: -(lam J^T H J + alpha I)^{-1} J^T g of the summed loss
        if k > 1:
            labels = torch.randint(0, k, (b,), device=device)
            f, jac = jacobian(model, batches[0])
            p = torch.softmax(f, 1)
            g = (p - F.one_hot(labels, k).to(p)).reshape(-1)
            h = torch.block_diag(*[torch.diag(pi) - torch.outer(pi, pi) for pi in p])
            m = jac.shape[1]
            want = start - torch.linalg.solve(LAM * jac.T @ h @ jac + alpha * eye(m, jac), jac.T @ g)
            low = copy.deepcopy(model).to(dtype)
            x = batches[0].to(dtype)
            ggn(low, alpha, loss="cross_entropy", curvature="exact").step(lambda: (low(x).reshape(b, k), labels))
            rows.append(dict(model=name, check="cross_entropy_exact", error=relative(flat(low).double(), want)))
    return rows


def usage_checks(device: torch.device) -> list[dict]:
    """What users do on a GPU that the float64 checks do not: a step of a CPU model while the
    default device is the GPU (against the same step without), a closure under ``torch.autocast``
    (bfloat16; the hooks engine against the reference engine, to bfloat16's precision), a ``torch.compile``d model
    (float64, inductor; against the reference engine on the plain model), and
    ``GramGaussNewton(model)`` on an autograd-Laplacian PINN closure on the GPU (the
    re-evaluations need autograd), and a dropout MLP's gain ratio on a tiny step (about 1 when
    the re-evaluation replays the step's CUDA draws) with the generator left as one forward leaves it."""
    rows = []
    model = perturbed(groupnorm_cnn, torch.device("cpu"))
    x, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    plain, other = copy.deepcopy(model), copy.deepcopy(model)
    for _ in range(2):
        ggn(plain, momentum=MU).step(mse_closure(plain, x, y))
    with torch.device(device):
        for _ in range(2):
            ggn(other, momentum=MU).step(mse_closure(other, x, y))
    rows.append(dict(model="gn_cnn", check="cpu_model_gpu_default", error=relative(flat(other), flat(plain))))

    model = perturbed(groupnorm_cnn, device).float()
    x = torch.randn(10, 1, 6, 6, device=device)
    y = torch.randn(10, 2, device=device)

    def autocast_closure() -> Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x)
        return out.float() - y

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = HooksEngine(model).compute(autocast_closure)
    reference = ReferenceEngine(list(model.parameters())).compute(autocast_closure)
    reasons = sorted(
        {str(w.message).split("engine (", 1)[-1][:70] for w in caught if "reference engine" in str(w.message)}
    )
    rows.append(dict(model="gn_cnn", check="autocast_bf16_gram", error=relative(fast.gram, reference.gram)))
    rows.append(dict(model="gn_cnn", check="autocast_bf16_routed", outcome="; ".join(reasons) or "nothing"))

    model = perturbed(groupnorm_cnn, device)
    compiled = torch.compile(model)  # the default backend: inductor's generated kernels
    x = torch.randn(10, 1, 6, 6, dtype=torch.float64, device=device)
    y = torch.randn(10, 2, dtype=torch.float64, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = HooksEngine(compiled, list(model.parameters())).compute(lambda: compiled(x) - y)
    reference = ReferenceEngine(list(model.parameters())).compute(lambda: model(x) - y)
    routed = [w for w in caught if "reference engine" in str(w.message)]
    rows.append(dict(model="gn_cnn", check="compiled_inductor_gram", error=relative(fast.gram, reference.gram)))
    rows.append(dict(model="gn_cnn", check="compiled_inductor_routed", outcome=str(len(routed))))

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)).double().to(device)
    points = torch.rand(24, 2, dtype=torch.float64, device=device)

    def laplacian_closure() -> Tensor:
        z = points.detach().requires_grad_(True)
        u = net(z).squeeze(-1)
        (grad,) = torch.autograd.grad(u.sum(), z, create_graph=True)
        lap = sum(torch.autograd.grad(grad[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return -lap - 2 * math.pi**2 * torch.sin(math.pi * points).prod(-1)

    first = float(laplacian_closure().detach().pow(2).mean())
    opt = GramGaussNewton(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the autograd Laplacian's routing
        for _ in range(8):
            opt.step(laplacian_closure)
    last = float(laplacian_closure().detach().pow(2).mean())
    rows.append(dict(model="pinn_mlp", check="defaults_autograd_laplacian", outcome=f"MSE {first:.3g} -> {last:.3g}"))

    torch.manual_seed(0)  # dropout on the GPU: the re-evaluation replays the CUDA generator's draws
    net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 1)).double().to(device)
    x = torch.randn(16, 4, dtype=torch.float64, device=device)
    y = torch.randn(16, 1, dtype=torch.float64, device=device)
    opt = GramGaussNewton(net, alpha=1e4)  # a tiny step: its gain ratio is 1 to about 1e-3
    torch.manual_seed(7)
    opt.step(lambda: net(x) - y)
    stream = torch.rand(3, device=device)
    torch.manual_seed(7)  # the step's one forward: one mask drawn
    nn.functional.dropout(torch.ones(16, 32, dtype=torch.float64, device=device), 0.5)
    kept = torch.equal(torch.rand(3, device=device), stream)
    ratio = opt.last_diagnostics.gain_ratio
    rows.append(dict(model="dropout_mlp", check="dropout_gain_ratio", outcome=f"{ratio:.6f}; stream kept: {kept}"))
    return rows


def nccl_checks(device: torch.device) -> list[dict]:
    """``distributed="exact"`` in a one-rank NCCL group against the plain step (float64), and the
    status exchange with its numbers on the CPU (what it did before it took the parameters' device)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model = perturbed(groupnorm_cnn, device)
        x = torch.randn(10, 1, 6, 6, dtype=torch.float64, device=device)
        y = torch.randn(10, 2, dtype=torch.float64, device=device)
        plain, spread = copy.deepcopy(model), copy.deepcopy(model)
        ggn(plain, momentum=MU).step(mse_closure(plain, x, y))
        ggn(spread, momentum=MU, distributed="exact").step(mse_closure(spread, x, y))
        rows = [dict(model="gn_cnn", check="nccl_exact_vs_plain", error=relative(flat(spread), flat(plain)))]
        try:
            Communicator(None, torch.device("cpu")).agree(None, [1.0])
            outcome = "accepted"
        except Exception as error:  # noqa: BLE001 - recorded, not handled
            outcome = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
        rows.append(dict(model="-", check="nccl_status_on_cpu", outcome=outcome))
        return rows
    finally:
        dist.destroy_process_group()


# name -> (model, input shape, batch, outputs)
TIMED_MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int, int]] = {
    "fixup32": (lambda: get_model("resnet32_fixup"), (3, 32, 32), 128, 1),
    "gn32": (lambda: get_model("resnet32_gn"), (3, 32, 32), 128, 1),
    "resnet8_28x28": (lambda: get_model("resnet8_fixup", in_channels=1, num_outputs=1), (1, 28, 28), 128, 1),
    "resnet8_28x28_ce10": (lambda: get_model("resnet8_fixup", in_channels=1, num_outputs=10), (1, 28, 28), 128, 10),
    "two_layer_4096": (lambda: TwoLayerNet(10, width=4096), (10,), 32, 1),
}
# the optimizer factory's settings of each timed method; GGN with a large fixed alpha stays where it is
METHODS = {
    "sgd": {"name": "sgd", "lr": 1e-6},
    "adam": {"name": "adam", "lr": 1e-6},
    "ggn": {"name": "ggn", "momentum": 0.0, "alpha": 1e6, "adaptive_damping": False},
    "ggn_defaults": {"name": "ggn"},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_model(build: Callable[[], nn.Module]) -> nn.Module:
    """A timed model, its weights moved a little off Fixup's zeros (seed 0)."""
    torch.manual_seed(0)
    model = build()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def interleaved_medians(steps: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each step over ``reps`` rounds, the order rotated every round, each
    timed from a synchronised start to a synchronised end."""
    times: dict[str, list[float]] = {m: [] for m in steps}
    for r in range(reps):
        for method in list(steps)[r % len(steps) :] + list(steps)[: r % len(steps)]:
            synchronize(device)
            start = time.perf_counter()
            steps[method]()
            synchronize(device)
            times[method].append(time.perf_counter() - start)
    return {method: statistics.median(seconds) for method, seconds in times.items()}


def warm_up(step: Callable[[], object], warmup: int) -> list[str]:
    """Run ``step`` ``warmup`` times; the warnings that name the reference engine (routed parameters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(warmup):
            step()
    return sorted({str(w.message) for w in caught if "reference engine" in str(w.message)})


def timing_rows(
    name: str, b: int, medians: dict[str, float], routed: dict[str, list[str]], **extra: dict
) -> list[dict]:
    """One row per timed method: median ms, ratio to SGD's, the routing warnings, and each of
    ``extra``'s per-method values (``peak_mib_above_model=...``)."""
    return [
        dict(
            model=name,
            batch=b,
            method=method,
            median_ms=1e3 * median,
            ratio_to_sgd=median / medians["sgd"],
            **{key: values.get(method) for key, values in extra.items()},
            routed_to_reference=routed[method],
        )
        for method, median in medians.items()
    ]


def step_cost(device: torch.device, reps: int, warmup: int, models: list[str], batch: int | None = None) -> list[dict]:
    """Median step time of each method per model, interleaved rounds, ratio to SGD's; ``batch``
    replaces every model's own batch."""
    rows = []
    for name in models:
        build, shape, b, k = TIMED_MODELS[name]
        b = batch or b
        base = timed_model(build)
        x = torch.randn(b, *shape, device=device)
        y = torch.randint(0, k, (b,), device=device) if k > 1 else torch.randn(b, device=device)
        loss = "cross_entropy" if k > 1 else "mse"
        steps, peaks, routed = {}, {}, {}
        for method, settings in METHODS.items():
            model = copy.deepcopy(base).to(device)
            settings = {**settings, "loss": loss} if settings["name"] == "ggn" else settings
            step = make_train_step(model, build_optimizer(settings, model), loss=loss)
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            steps[method] = functools.partial(step, x, y)
            routed[method] = warm_up(steps[method], warmup)
            if device.type == "cuda":
                peaks[method] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        medians = interleaved_medians(steps, reps, device)
        rows += timing_rows(name, b, medians, routed, peak_mib_above_model=peaks)
    return rows


def autocast_cost(device: torch.device, reps: int, warmup: int, models: list[str], batch: int | None) -> list[dict]:
    """SGD and GGN steps (momentum 0, fixed ``alpha``) with the forward in float32 and under
    ``torch.autocast`` (bfloat16), interleaved; median ms and ratio to the float32 SGD step."""
    rows = []
    for name in models:
        build, shape, b, k = TIMED_MODELS[name]
        if k > 1:
            continue
        b = batch or b
        base = timed_model(build)
        x, y = torch.randn(b, *shape, device=device), torch.randn(b, device=device)
        steps, routed = {}, {}
        for method in ("sgd", "ggn"):
            for amp in (False, True):
                model = copy.deepcopy(base).to(device)

                def residuals(model: nn.Module = model, amp: bool = amp) -> Tensor:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        out = model(x)
                    return out.float().reshape(b) - y

                if method == "sgd":
                    opt = torch.optim.SGD(model.parameters(), lr=1e-6, momentum=0.9)

                    def step(opt: torch.optim.Optimizer = opt, residuals: Callable[[], Tensor] = residuals) -> None:
                        opt.zero_grad()
                        residuals().pow(2).mean().backward()
                        opt.step()

                else:
                    ggn = GramGaussNewton(model, momentum=0.0, alpha=1e6, adaptive_damping=False)
                    step = functools.partial(ggn.step, residuals)
                key = f"{method}{'_autocast' if amp else ''}"
                routed[key], steps[key] = warm_up(step, warmup), step
        rows += timing_rows(name, b, interleaved_medians(steps, reps, device), routed)
    return rows


def profile(device: torch.device, name: str, rows: int, batch: int | None = None) -> str:
    """The operators taking the most device time over 5 steps of each of SGD and GGN (the
    timings' settings) on ``TIMED_MODELS[name]`` (at ``batch``, else its own), by
    ``torch.profiler``, after 3 warm-up steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    build, shape, b, k = TIMED_MODELS[name]
    b = batch or b
    torch.manual_seed(0)
    x = torch.randn(b, *shape, device=device)
    y = torch.randint(0, k, (b,), device=device) if k > 1 else torch.randn(b, device=device)
    loss = "cross_entropy" if k > 1 else "mse"
    tables = []
    for method in ("sgd", "ggn"):
        model = build().to(device)
        settings = {**METHODS[method], "loss": loss} if method == "ggn" else METHODS[method]
        step = make_train_step(model, build_optimizer(settings, model), loss=loss)
        for _ in range(3):
            step(x, y)
        synchronize(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profiler(activities=activities) as prof:
            for _ in range(5):
                step(x, y)
            synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        tables.append(f"{method}, 5 steps of {name}:\n" + prof.key_averages().table(sort_by=sort, row_limit=rows))
    return "\n".join(tables)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=30, help="timed steps per method (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cuda_check.json")
    p.add_argument("--profile", choices=list(TIMED_MODELS), help="only profile SGD and GGN steps of this model")
    p.add_argument("--rows", type=int, default=18, help="operators per profile table")
    p.add_argument(
        "--matmul-precision",
        choices=["highest", "high", "medium"],
        help="torch.set_float32_matmul_precision for the whole run (high: TF32 matrix products)",
    )
    p.add_argument("--alpha", type=float, default=ALPHA, help="alpha of the exactness checks")
    p.add_argument("--no-timing", action="store_true", help="the checks only")
    p.add_argument("--no-checks", action="store_true", help="the step costs only")
    p.add_argument("--models", nargs="+", choices=list(TIMED_MODELS), default=list(TIMED_MODELS), help="timed models")
    p.add_argument("--batch", type=int, help="the batch of every timed model (default: each its own)")
    p.add_argument("--autocast-cost", action="store_true", help="also time float32 and autocast (bfloat16) steps")
    args = p.parse_args()
    if args.matmul_precision:
        torch.set_float32_matmul_precision(args.matmul_precision)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    if args.profile:
        print(profile(device, args.profile, args.rows, args.batch))
        return
    record = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
        matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        threads=torch.get_num_threads(),
        load_average=os.getloadavg()[0],
    )
    if not args.no_checks:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            record["exact_float64"] = exact_checks(device, torch.float64, args.alpha)
            record["float32_against_float64"] = exact_checks(device, torch.float32, args.alpha)
        record["exact_routed_to_reference"] = sorted(
            {str(w.message) for w in caught if "reference engine" in str(w.message)}
        )
        record["usage"] = usage_checks(device)
        if device.type == "cuda" and dist.is_nccl_available():
            record["nccl"] = nccl_checks(device)
        record["alpha"] = args.alpha
    record["step_cost"] = [] if args.no_timing else step_cost(device, args.reps, args.warmup, args.models, args.batch)
    if args.autocast_cost:
        record["autocast_cost"] = autocast_cost(device, args.reps, args.warmup, args.models, args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")

    print(
        f"{record['device']}, torch {record['torch']}, TF32 cuDNN {record['cudnn_allow_tf32']}, "
        f"float32 matmul precision {record['float32_matmul_precision']}"
    )
    for key in ("exact_float64", "float32_against_float64", "usage", "nccl"):
        for row in record.get(key, []):
            value = f"{row['error']:.2e}" if "error" in row else row["outcome"]
            print(f"{key:24s} {row['model']:14s} {row['check']:22s} {value}")
    if "exact_routed_to_reference" in record:
        print("routed to the reference engine in the checks:", record["exact_routed_to_reference"] or "nothing")
    print(f"{'model':20s} {'method':13s} {'ms':>8s} {'/SGD':>6s} {'MiB':>8s} routed")
    for row in record["step_cost"] + record.get("autocast_cost", []):
        peak = "-" if row.get("peak_mib_above_model") is None else f"{row['peak_mib_above_model']:.0f}"
        print(
            f"{row['model']:20s} {row['method']:13s} {row['median_ms']:8.2f} {row['ratio_to_sgd']:6.2f} {peak:>8s} {len(row['routed_to_reference'])}"
        )


if __name__ == "__main__":
    main()
