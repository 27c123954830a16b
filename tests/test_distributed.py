"""Data-parallel GGN: 2 processes, gloo on 127.0.0.1, 1 thread each, float64.

One spawn runs every scenario (starting processes costs seconds); each rank records per
scenario ``"ok"`` or the failure, and the tests below read those records. Shards are uneven
(rank 0 holds 3 samples, rank 1 holds 2) so that no step is right by symmetry.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import traceback
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dense import assert_close, dense_jacobian, dense_step, flat_params, groupnorm_cnn, perturbed_fixup
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gramnewton import GramGaussNewton, NonFiniteError
from gramnewton.damping import GainRatioDamping
from gramnewton.distributed import resolve_mode
from gramnewton.lab.experiments.config import resolve
from gramnewton.lab.experiments.metrics import read_rows
from gramnewton.lab.experiments.runner import run_experiment
from gramnewton.lab.models import get_model

WORLD, SHARDS = 2, (3, 2)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 1))


def _two_layer() -> nn.Module:
    return get_model("two_layer", in_channels=5, width=64)


# name -> (builder, input shape, outputs k)
MODELS = {
    "mlp": (_mlp, (3, 4), 1),
    "groupnorm_cnn": (groupnorm_cnn, (1, 6, 6), 2),
    "resnet8_fixup": (perturbed_fixup, (1, 8, 8), 1),
    "two_layer": (_two_layer, (5,), 1),
}


def _setup(name: str, seed: int) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model (a different init on each rank: the optimizer must broadcast rank 0's) and two
    union batches of 5 samples (the same on every rank)."""
    build, shape, k = MODELS[name]
    torch.manual_seed(seed + 1000 * dist.get_rank())
    model = build().double()
    gen = torch.Generator().manual_seed(seed)
    data = [
        (torch.randn(sum(SHARDS), *shape, generator=gen, dtype=torch.float64),
         torch.randn(sum(SHARDS), k, generator=gen, dtype=torch.float64))
        for _ in range(2)
    ]  # fmt: skip
    return model, data


def _shard(t: torch.Tensor) -> torch.Tensor:
    start = sum(SHARDS[: dist.get_rank()])
    return t[start : start + SHARDS[dist.get_rank()]]


def _rank0_copy(model: nn.Module) -> nn.Module:
    """A single-process twin holding rank 0's initial state."""
    twin = copy.deepcopy(model)
    for t in [*twin.parameters(), *twin.buffers()]:
        dist.broadcast(t.data, src=0)
    return twin


def _same_on_all_ranks(model: nn.Module) -> None:
    flat = flat_params(model)
    others = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(others, flat)
    assert all(torch.equal(o, flat) for o in others), "parameters differ across ranks"


def _record_shard_grams(opt: GramGaussNewton) -> list:
    """The Gram of every system the rank's own engine returns from now on (exact mode forms the
    union's Gram from ``J``'s column slices, so the shard's own is never needed)."""
    shard_engine, grams = opt.engine.engine, []
    compute = shard_engine.compute

    def recording(closure, **options):
        system = compute(closure, **options)
        grams.append(system.gram)
        return system

    shard_engine.compute = recording
    return grams


def _exact(name: str, engine: str, lam: float, alpha: float, wd: float, ddp: bool = False) -> None:
    model, data = _setup(name, seed=len(name) + int(10 * alpha))
    single = _rank0_copy(model)
    trained = DistributedDataParallel(model) if ddp else model
    counted = []
    if ddp:  # any gradient all-reduce DDP starts goes through this hook
        trained.register_comm_hook(None, lambda state, bucket: counted.append(1) or _allreduce(bucket))
    opt = GramGaussNewton(
        trained,
        lam=lam,
        alpha=alpha,
        weight_decay=wd,
        engine=engine,
        distributed="exact",
        adaptive_damping=False,
        momentum=0.0,
    )
    reference = GramGaussNewton(
        single,
        lam=lam,
        alpha=alpha,
        weight_decay=wd,
        engine=engine,
        distributed=None,
        adaptive_damping=False,
        momentum=0.0,
    )
    assert opt.distributed == "exact" and reference.distributed is None
    shard_grams = _record_shard_grams(opt)
    for i, (x, y) in enumerate(data):
        expected = (1 - wd) * flat_params(single) + dense_step(single, x, y, lam, alpha)
        loss = opt.step(lambda: trained(_shard(x)) - _shard(y))
        reference_loss = reference.step(lambda: single(x) - y)
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: exact vs single process")
        assert_close(flat_params(model), expected, 1e-10, f"step {i}: exact vs the dense formula")
        assert_close(loss, reference_loss, 1e-12, f"step {i}: loss of the union batch")
        _same_on_all_ranks(model)
    assert len(shard_grams) == len(data) and all(g is None for g in shard_grams), "a shard's own Gram was formed"
    if ddp:
        assert not counted, "DDP ran its gradient all-reduce"
        assert all(p.grad is None for p in model.parameters())


def _parameters_idiom(ddp: bool) -> None:
    """``GramGaussNewton(model.parameters(), distributed="exact")``: every rank's first step finds
    the model its closure calls (the hooks engine under the exact mode's engine), and the steps are
    the single process's on the union batch; with a DDP-wrapped model's parameters too (the
    wrapper found is treated as if given: its forward passes under ``no_sync()``), and no gradient
    all-reduce runs."""
    model, data = _setup("groupnorm_cnn", seed=5)
    single = _rank0_copy(model)
    trained = DistributedDataParallel(model) if ddp else model
    counted = []
    if ddp:
        trained.register_comm_hook(None, lambda state, bucket: counted.append(1) or _allreduce(bucket))
    options = dict(lam=1.0, alpha=0.1, adaptive_damping=False, momentum=0.0)
    opt = GramGaussNewton(trained.parameters(), distributed="exact", **options)
    reference = GramGaussNewton(single, distributed=None, **options)
    for i, (x, y) in enumerate(data):
        opt.step(lambda: trained(_shard(x)) - _shard(y))
        reference.step(lambda: single(x) - y)
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: the parameters idiom, exact mode")
    assert type(opt.engine.engine).__name__ == "HooksEngine"
    assert not counted, "DDP ran its gradient all-reduce"
    _same_on_all_ranks(model)


def _cross_entropy(engine: str, mode: str, adaptive: bool = False) -> None:
    """Cross-entropy (closures return (logits, labels)): exact = single process on the union
    batch; local = the shard-size-weighted mean of the single-process steps of the shards."""
    model, data = _setup("groupnorm_cnn", seed=11)
    single = _rank0_copy(model)
    data = [
        (x, torch.randint(0, 2, (len(x),), generator=torch.Generator().manual_seed(i))) for i, (x, _) in enumerate(data)
    ]
    kwargs = dict(alpha=0.05, loss="cross_entropy", engine=engine, adaptive_damping=adaptive)
    opt = GramGaussNewton(model, distributed=mode, **{"momentum": 0.0, **kwargs})
    reference = GramGaussNewton(single, distributed=None, **{"momentum": 0.0, **kwargs})
    for i, (x, y) in enumerate(data):
        loss = opt.step(lambda: (model(_shard(x)), _shard(y)))
        if mode == "exact":
            reference_loss = reference.step(lambda: (single(x), y))
            assert opt.param_groups[0]["alpha"] == reference.param_groups[0]["alpha"]
        else:
            start, d = flat_params(single), 0
            with torch.no_grad():
                reference_loss = torch.nn.functional.cross_entropy(single(x), y)
            for lo, hi in ((0, SHARDS[0]), (SHARDS[0], sum(SHARDS))):
                twin = copy.deepcopy(single)
                GramGaussNewton(twin, distributed=None, **{"momentum": 0.0, **kwargs}).step(
                    lambda: (twin(x[lo:hi]), y[lo:hi])
                )
                d = d + (hi - lo) / sum(SHARDS) * (flat_params(twin) - start)
            torch.nn.utils.vector_to_parameters(start + d, single.parameters())
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: cross-entropy, {mode} mode")
        assert_close(loss, reference_loss, 1e-12, f"step {i}: cross-entropy loss of the union batch")
        _same_on_all_ranks(model)


def _allreduce(bucket: dist.GradBucket) -> torch.futures.Future:
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


def _local(name: str, engine: str, alpha: float) -> None:
    model, data = _setup(name, seed=7)
    single = _rank0_copy(model)
    opt = GramGaussNewton(
        model, alpha=alpha, engine=engine, distributed="local", lam=1.0, adaptive_damping=False, momentum=0.0
    )
    for i, (x, y) in enumerate(data):
        # the documented formula: d = sum_p (b_p / B) d_p, d_p the dense step of shard p alone
        d, start = 0, 0
        for b in SHARDS:
            d = d + b / sum(SHARDS) * dense_step(single, x[start : start + b], y[start : start + b], 1.0, alpha)
            start += b
        expected = flat_params(single) + d
        loss = opt.step(lambda: model(_shard(x)) - _shard(y))
        assert_close(flat_params(model), expected, 1e-10, f"step {i}: local mode vs its formula")
        with torch.no_grad():
            assert_close(loss, (single(x) - y).pow(2).mean(), 1e-12, f"step {i}: loss of the union batch")
            for p, q in zip(single.parameters(), model.parameters()):
                p.copy_(q)
        _same_on_all_ranks(model)


def _momentum(mode: str, engine: str) -> None:
    """Sample-space momentum: exact = the single-process momentum step on the union batch;
    local = ``phi_t = mu phi_{t-1} + sum_p (b_p / B) J_p^T c_p`` with the shared ``phi_{t-1}``."""
    model, data = _setup("groupnorm_cnn", seed=13)
    single = _rank0_copy(model)
    lam, alpha, mu = 0.8, 0.3, 0.6
    opt = GramGaussNewton(
        model, lam=lam, alpha=alpha, momentum=mu, engine=engine, distributed=mode, adaptive_damping=False
    )
    reference = GramGaussNewton(
        single, lam=lam, alpha=alpha, momentum=mu, engine=engine, distributed=None, adaptive_damping=False
    )
    phi = torch.zeros_like(flat_params(single))
    for i, (x, y) in enumerate(data):
        opt.step(lambda: model(_shard(x)) - _shard(y))
        if mode == "exact":
            reference.step(lambda: single(x) - y)
        else:
            combined, start = mu * phi, 0
            for b in SHARDS:
                jac = dense_jacobian(single, x[start : start + b])
                with torch.no_grad():
                    r = (single(x[start : start + b]) - y[start : start + b]).reshape(-1)
                mat = lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
                combined = combined + b / sum(SHARDS) * jac.T @ torch.linalg.solve(mat, r - lam * mu * jac @ phi)
                start += b
            phi = combined
            torch.nn.utils.vector_to_parameters(flat_params(single) - phi, single.parameters())
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: momentum, {mode} mode")
        _same_on_all_ranks(model)


def _metric(engine: str) -> None:
    """A metric with one weight per tensor: exact = the single-process steps on the union batch
    (the weighted Gram all-reduced from each rank's column slice, the second moment from the
    union's gradient), with momentum; a per-entry metric and local mode refuse it."""
    model, data = _setup("groupnorm_cnn", seed=17)
    single = _rank0_copy(model)
    options = dict(lam=0.8, alpha=0.3, momentum=0.6, engine=engine, adaptive_damping=False)
    metric = {"name": "second_moment", "per_tensor": True, "power": 1.0}
    opt = GramGaussNewton(model, distributed="exact", metric=metric, **options)
    reference = GramGaussNewton(single, distributed=None, metric=metric, **options)
    for i, (x, y) in enumerate(data):
        opt.step(lambda: model(_shard(x)) - _shard(y))
        reference.step(lambda: single(x) - y)
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: per-tensor metric, exact mode")
        _same_on_all_ranks(model)
    with pytest.raises(ValueError, match="one weight per tensor"):
        GramGaussNewton(_mlp(), distributed="exact", metric="second_moment")
    with pytest.raises(ValueError, match="local"):
        GramGaussNewton(_mlp(), distributed="local", metric=metric, adaptive_damping=False)


def _adaptive(retries: int = 0, recheck: bool = False) -> None:
    """Exact mode's gain-ratio steps equal the single process's; with ``retries`` (and a
    ``reject_below`` that rejects some steps, momentum 0.5) the retried steps too; with
    ``recheck`` a trusted rule whose steps (``lam = 1``: each nearly fits its batch) promise more
    than ``recheck_above`` of the loss, measured anyway on every rank alike."""
    model, data = _setup("mlp", seed=3)
    single = _rank0_copy(model)
    options = dict(alpha=1e-3, lam=1.0, momentum=0.5 if retries else 0.0)

    def rule() -> GainRatioDamping | bool:
        if recheck:
            return GainRatioDamping(min_alpha=1e-3, check_every=100, trust_above=0.25, trust_after=1)
        return GainRatioDamping(reject_below=0.9, retries=retries) if retries else True

    opt = GramGaussNewton(model, adaptive_damping=rule(), distributed="exact", **options)
    # metric="auto" (the default) with a damping rule: one metric weight per tensor, in both
    assert opt.metric is not None and opt.metric.per_tensor
    reference = GramGaussNewton(single, adaptive_damping=rule(), distributed=None, **options)
    retried = rechecked = 0
    for x, y in data:
        trusted = opt.damping.trusted
        opt.step(lambda: model(_shard(x)) - _shard(y))
        reference.step(lambda: single(x) - y)
        rechecked += trusted and opt.last_gain_ratio is not None
        assert opt.last_gain_ratio == pytest.approx(reference.last_gain_ratio, rel=1e-9)
        assert opt.param_groups[0]["alpha"] == reference.param_groups[0]["alpha"]
        assert opt.last_diagnostics.retries == reference.last_diagnostics.retries
        retried += opt.last_diagnostics.retries
        assert_close(flat_params(model), flat_params(single), 1e-10, "adaptive damping, exact mode")
    assert retried > 0 or not retries
    assert rechecked > 0 or not recheck


def _error(mode: str, failing: int, kind: str) -> None:
    """Bad residuals on one rank: every rank raises, nothing changes, the next step still works."""
    model, data = _setup("mlp", seed=5)
    opt = GramGaussNewton(model, alpha=0.1, distributed=mode, lam=1.0, adaptive_damping=False, momentum=0.0)
    x, y = data[0]
    before, state = flat_params(model).clone(), copy.deepcopy(opt.state_dict())

    def closure() -> torch.Tensor:
        r = model(_shard(x)) - _shard(y)
        if dist.get_rank() == failing:
            if kind == "nan":
                return r * float("nan")
            if kind == "raise":
                raise RuntimeError("data loader broke")
            return torch.cat([r, r], 1)  # kind == "k": another number of outputs than the other rank
        return r

    expected = {"nan": NonFiniteError, "k": ValueError}.get(kind, RuntimeError)
    try:
        opt.step(closure)
    except expected as error:
        if dist.get_rank() != failing and kind != "k":
            assert f"rank {failing} of 2 failed" in str(error), str(error)
    else:
        raise AssertionError(f"rank {dist.get_rank()} did not raise")
    assert torch.equal(flat_params(model), before), "parameters changed"
    assert str(opt.state_dict()) == str(state), "optimizer state changed"
    opt.step(lambda: model(_shard(x)) - _shard(y))  # the ranks are still in step
    _same_on_all_ranks(model)


def _bytes() -> None:
    """The counted traffic of an exact step equals the volume stated in gramnewton.distributed."""
    model, data = _setup("mlp", seed=1)
    opt = GramGaussNewton(model, distributed="exact", engine="reference", lam=1.0, adaptive_damping=False, momentum=0.0)
    comm = opt.communicator
    comm.sent_bytes.clear()
    x, y = data[0]
    opt.step(lambda: model(_shard(x)) - _shard(y))
    m, n, b, q = sum(p.numel() for p in model.parameters()), sum(SHARDS), SHARDS[dist.get_rank()], 0.5
    lo, hi = comm.bounds(m)[dist.get_rank()]
    sent = dict(comm.sent_bytes)
    assert sent.pop("all_to_all") == 8 * b * (m - (hi - lo)), "all-to-all: J_p minus the own columns"
    assert sent.pop("all_reduce") == int(8 * 2 * q * n * n), "Gram all-reduce (ring)"
    assert sent.pop("all_gather") == 8 * (max(SHARDS) + (m + 1) // 2), "residuals and direction slices"
    # status: (failed, settings' fingerprint, b_p, k, one unused number)
    assert sent.pop("status") == 8 * 5 and not sent, sent


# a small run of the training CLI's runner (the diabetes data ship with scikit-learn)
RUN = {
    "name": "diabetes-two-layer",
    "model": {"name": "two_layer", "kwargs": {"width": 256}},
    "data": {"name": "diabetes"},
    "optimizer": {"name": "ggn", "momentum": 0.0, "alpha": 1.0},
    "train": {"batch_size": 64, "epochs": 2, "weight_decay": 0.0, "threads": 1},
}
RUN_DIR: list[Path] = []  # set by the worker


def _train_run() -> None:
    """One epoch, then a resume to two, by 2 processes: rank 0 alone returns and writes the rows."""
    out = RUN_DIR[0] / "run"
    first = run_experiment(resolve(RUN, ["train.epochs=1"]), out)
    rows = run_experiment(resolve(RUN), out, resume=True)
    if dist.get_rank() == 0:
        assert [r["epoch"] for r in first] == [0, 1] and [r["epoch"] for r in rows] == [0, 1, 2]
    else:
        assert first == rows == []


SCENARIOS: dict[str, Callable[[], None]] = {
    **{
        f"exact-{engine}-{name}": (lambda n=name, e=engine: _exact(n, e, lam=1.0, alpha=0.1, wd=0.0))
        for engine in ("reference", "hooks")
        for name in MODELS
    },
    "exact-hooks-mlp-lam-wd": lambda: _exact("mlp", "hooks", lam=0.5, alpha=0.0, wd=0.01),
    "exact-hooks-groupnorm_cnn-ddp": lambda: _exact("groupnorm_cnn", "hooks", lam=2.0, alpha=3.0, wd=0.0, ddp=True),
    "exact-adaptive-damping": _adaptive,
    "exact-adaptive-damping-retries": lambda: _adaptive(retries=2),
    "exact-adaptive-damping-recheck": lambda: _adaptive(recheck=True),
    "exact-metric-hooks": lambda: _metric("hooks"),
    "exact-metric-reference": lambda: _metric("reference"),
    "exact-momentum-hooks": lambda: _momentum("exact", "hooks"),
    "exact-momentum-reference": lambda: _momentum("exact", "reference"),
    "local-momentum-hooks": lambda: _momentum("local", "hooks"),
    "exact-cross-entropy-hooks": lambda: _cross_entropy("hooks", "exact"),
    "exact-parameters-idiom": lambda: _parameters_idiom(ddp=False),
    "exact-parameters-idiom-ddp": lambda: _parameters_idiom(ddp=True),
    "exact-cross-entropy-reference-adaptive": lambda: _cross_entropy("reference", "exact", adaptive=True),
    "local-cross-entropy-hooks": lambda: _cross_entropy("hooks", "local"),
    "local-hooks-mlp": lambda: _local("mlp", "hooks", alpha=0.1),
    "local-reference-groupnorm_cnn": lambda: _local("groupnorm_cnn", "reference", alpha=0.5),
    **{
        f"error-{mode}-{kind}-rank{failing}": (lambda m=mode, f=failing, k=kind: _error(m, f, k))
        for mode in ("exact", "local")
        for failing in (0, 1)
        for kind in ("nan", "raise")
    },
    "error-exact-k": lambda: _error("exact", 1, "k"),
    "bytes-exact": _bytes,
    "train-run-resume": _train_run,
}


def run_scenarios(scenarios: Mapping[str, Callable[[], None]], rank: int, store: str, out: str, timeout: float) -> None:
    """Run ``scenarios`` in turn as ``rank`` of a ``WORLD``-process gloo group (1 thread); each one's
    result, ``"ok"`` or its traceback, is written to ``out/rank{rank}.json`` after it (what ran,
    should a later one abort the process). ``timeout`` (s): how long a collective may wait."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=timeout)
    )
    results = {}
    for name, scenario in scenarios.items():
        try:
            scenario()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()
    # Free what the scenarios left in reference cycles while the group is alive, then destroy it
    # on both ranks together. Without this a worker aborted at its exit now and then ("terminate
    # called without an active exception", after every scenario had finished): in 2 of 14 rounds
    # of two sessions of this file run side by side, and in 0 of 30 with it. Which object's
    # teardown aborted was not found (a DDP model, checked alone, is not kept by a cycle).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _worker(rank: int, store: str, out: str) -> None:
    RUN_DIR.append(Path(out))
    run_scenarios(SCENARIOS, rank, store, out, timeout=60)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("distributed")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD)
    return [json.loads((tmp / f"rank{r}.json").read_text()) | {"dir": str(tmp)} for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks(results: list[dict[str, str]], scenario: str) -> None:
    for rank, by_name in enumerate(results):
        assert by_name[scenario] == "ok", f"rank {rank}:\n{by_name[scenario]}"


def test_training_run_equals_single_process(results: list[dict[str, str]], tmp_path: Path) -> None:
    """The 2-process exact run (resumed after epoch 1) logs the single-process run's losses, to
    float32 round-off; resuming it with 1 process is refused."""
    distributed = Path(results[0]["dir"]) / "run"
    assert results[0]["train-run-resume"] == "ok"
    single = run_experiment(resolve(RUN), tmp_path / "single")
    logged = read_rows(distributed / "metrics.csv")
    for a, b in zip(logged, single, strict=True):
        for key in ("running_loss", "train_loss", "test_loss"):
            if a["epoch"]:
                assert float(a[key]) == pytest.approx(b[key], rel=1e-4), (a["epoch"], key)
    with pytest.raises(ValueError, match="trained by 2 process"):
        run_experiment(resolve(RUN, ["train.epochs=3"]), distributed, resume=True)


def test_modes_without_torch_distributed() -> None:
    assert resolve_mode("auto") is None and resolve_mode(None) is None
    for mode in ("exact", "local"):
        with pytest.raises(ValueError, match="init_process_group"):
            GramGaussNewton(_mlp(), distributed=mode, lam=1.0, adaptive_damping=False, momentum=0.0)
    with pytest.raises(ValueError, match="Invalid distributed mode"):
        GramGaussNewton(_mlp(), distributed="sharded", lam=1.0, adaptive_damping=False, momentum=0.0)
