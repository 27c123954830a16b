"""Data-parallel GGN under bad input: ranks that disagree (parameters, hyper-parameters, what they
train), empty shards (a global batch smaller than the number of ranks), and a checkpoint resumed
bit for bit. 2 processes, gloo on 127.0.0.1, 1 thread each,
float64; one spawn runs every scenario and each test reads its record (as tests/test_distributed.py).

The contract (docs/distributed.md, "Errors"): every rank raises the same clear error, nothing is
changed on any rank, no rank is left waiting, and the next good step works.
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dense import assert_close
from test_distributed import run_scenarios
from torch import nn

from gramnewton import GramGaussNewton

WORLD, SHARDS = 2, (3, 2)
FIXED = dict(lam=1.0, alpha=0.1, adaptive_damping=False, momentum=0.0)  # the formula of Eq. 11


def _mlp(width: int = 8) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 1)).double()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A union batch of 5 samples, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(sum(SHARDS), 4, generator=gen, dtype=torch.float64),
        torch.randn(sum(SHARDS), 1, generator=gen, dtype=torch.float64),
    )


def _shard(t: torch.Tensor) -> torch.Tensor:
    start = sum(SHARDS[: dist.get_rank()])
    return t[start : start + SHARDS[dist.get_rank()]]


def flat_params(model: nn.Module) -> torch.Tensor:
    """Every parameter, frozen or not, flat ``(m,)``."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _state(opt: GramGaussNewton) -> str:
    """The optimizer's per-parameter state (an empty entry, which torch's defaultdict creates on
    a look-up, counts as none)."""
    return str({index: value for index, value in opt.state_dict()["state"].items() if value})


def _model() -> nn.Module:
    torch.manual_seed(1000 * dist.get_rank())  # a different init on each rank: rank 0's is broadcast
    return _mlp()


def _same_on_all_ranks(model: nn.Module) -> None:
    flat = flat_params(model)
    others = [torch.empty_like(flat) for _ in range(WORLD)]
    dist.all_gather(others, flat)
    assert all(torch.equal(o, flat) for o in others), "parameters differ across ranks"


def _raises_everywhere(step: Callable[[], object], match: str) -> None:
    """``step()`` raises ``ValueError`` with ``match`` in its message on this rank (the scenario
    runs on every rank). Not ``pytest.raises``: its failure is no ``Exception`` and would end the
    worker, leaving the other rank waiting."""
    try:
        step()
    except ValueError as error:
        assert match in str(error), str(error)
    else:
        raise AssertionError(f"rank {dist.get_rank()} did not raise ValueError ({match!r})")


def _unchanged_then_works(model: nn.Module, opt: GramGaussNewton, before: torch.Tensor, state: str) -> None:
    """Nothing changed on this rank, and a step that every rank agrees on still works."""
    assert torch.equal(flat_params(model), before), "parameters changed"
    assert _state(opt) == state, "optimizer state changed"
    x, y = _batch(9)
    opt.step(lambda: model(_shard(x)) - _shard(y))
    _same_on_all_ranks(model)


def _construct_differs(kind: str) -> None:
    """Models that differ between ranks are refused at construction on every rank (rank 0's
    parameters cannot be broadcast into other shapes), and the ranks stay usable."""
    torch.manual_seed(0)
    other = dist.get_rank() == 1
    if kind == "shape":
        model = _mlp(9 if other else 8)
    elif kind == "count":
        model = nn.Sequential(_mlp(), nn.Linear(1, 1).double()) if other else _mlp()
    else:  # kind == "dtype"
        model = _mlp().float() if other else _mlp()
    _raises_everywhere(lambda: GramGaussNewton(model, distributed="exact", **FIXED), "disagree")
    model = _model()
    opt = GramGaussNewton(model, distributed="exact", **FIXED)
    x, y = _batch(1)
    opt.step(lambda: model(_shard(x)) - _shard(y))
    _same_on_all_ranks(model)


def _trainable_differs(mode: str, change: str) -> None:
    """A parameter frozen (or unfrozen) on one rank only: every rank refuses the step; once the
    ranks agree again the steps go on."""
    torch.manual_seed(0)  # the same init on every rank: a frozen parameter is not broadcast (_frozen_broadcast)
    model = _mlp()
    if change == "unfreeze":
        model[0].bias.requires_grad_(False)
    opt = GramGaussNewton(model, distributed=mode, **FIXED)
    before, state = flat_params(model).clone(), _state(opt)
    x, y = _batch(2)
    if dist.get_rank() == 1:
        model[0].bias.requires_grad_(change == "unfreeze")
    _raises_everywhere(lambda: opt.step(lambda: model(_shard(x)) - _shard(y)), "disagree")
    model[0].bias.requires_grad_(change == "unfreeze")  # every rank alike again
    assert torch.equal(flat_params(model), before), "parameters changed"
    _same_on_all_ranks(model)
    assert _state(opt) == state, "optimizer state changed"
    opt.step(lambda: model(_shard(x)) - _shard(y))
    _same_on_all_ranks(model)


def _hyper_differs(mode: str, key: str, hook: bool = False) -> None:
    """A hyper-parameter that differs between ranks: every rank refuses the step (it would be a
    mixture of the ranks' steps, or leave their parameters apart, or wait forever). ``hook``:
    four settings handed to the communicator by hand instead of GramGaussNewton's own (the
    exchange's mechanism alone)."""
    model = _model()
    value = {"alpha": (0.1, 0.5), "momentum": (0.5, 0.0), "lr": (1.0, 0.5), "lam": (1.0, 2.0)}[key]
    opt = GramGaussNewton(model, distributed=mode, **{**FIXED, key: value[dist.get_rank()]})
    if hook:
        opt.communicator.settings = lambda: {k: opt.param_groups[0][k] for k in ("lam", "alpha", "momentum", "lr")}
    x, y = _batch(3)
    if key == "momentum":  # phi_{t-1} exists from the second step on
        opt.param_groups[0]["momentum"] = 0.5
        opt.step(lambda: model(_shard(x)) - _shard(y))
        opt.param_groups[0]["momentum"] = value[dist.get_rank()]
    before, state = flat_params(model).clone(), _state(opt)
    _raises_everywhere(lambda: opt.step(lambda: model(_shard(x)) - _shard(y)), f"disagree on {key}")
    opt.param_groups[0][key] = value[0]
    _unchanged_then_works(model, opt, before, state)


def _refused_on_one_rank() -> None:
    """A check at the start of a step that fails on one rank only (here an invalid ``alpha``
    written into rank 1's ``param_groups``): every rank raises, none waits for it."""
    model = _model()
    opt = GramGaussNewton(model, distributed="exact", **FIXED)
    before, state = flat_params(model).clone(), _state(opt)
    if dist.get_rank() == 1:
        opt.param_groups[0]["alpha"] = -1.0
    x, y = _batch(5)
    try:
        opt.step(lambda: model(_shard(x)) - _shard(y))
    except ValueError as error:
        assert dist.get_rank() == 1 or "rank 1 of 2 failed" in str(error), str(error)
    else:
        raise AssertionError(f"rank {dist.get_rank()} did not raise")
    opt.param_groups[0]["alpha"] = FIXED["alpha"]
    _unchanged_then_works(model, opt, before, state)


def _checkpoint_on_one_rank() -> None:
    """An optimizer checkpoint loaded by rank 0 only (momentum, damping and metric state on one
    rank): every rank refuses the step; once every rank has loaded it the steps go on."""
    model = _model()
    opt = GramGaussNewton(model, distributed="exact")
    for i in range(2):
        x, y = _batch(30 + i)
        opt.step(lambda: model(_shard(x)) - _shard(y))
    checkpoint = copy.deepcopy(opt.state_dict())
    resumed = copy.deepcopy(model)
    again = GramGaussNewton(resumed, distributed="exact")
    if dist.get_rank() == 0:
        again.load_state_dict(checkpoint)
    x, y = _batch(32)
    _raises_everywhere(lambda: again.step(lambda: resumed(_shard(x)) - _shard(y)), "disagree")
    assert torch.equal(flat_params(resumed), flat_params(model)), "parameters changed"
    if dist.get_rank() == 1:
        again.load_state_dict(checkpoint)
    again.step(lambda: resumed(_shard(x)) - _shard(y))
    opt.step(lambda: model(_shard(x)) - _shard(y))
    assert torch.equal(flat_params(resumed), flat_params(model)), "the resumed run left the uninterrupted one"
    _same_on_all_ranks(resumed)


def _batchnorm_on_one_rank() -> None:
    """A BatchNorm left in training mode on one rank only (refused by the step's own check on that
    rank): every rank raises, none waits for it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).double().eval()
    opt = GramGaussNewton(model, distributed="exact", **FIXED)
    before = flat_params(model).clone()
    model.train(dist.get_rank() == 1)
    x, y = _batch(6)
    _raises_everywhere(lambda: opt.step(lambda: model(_shard(x)) - _shard(y)), "BatchNorm1d")
    model.eval()
    _unchanged_then_works(model, opt, before, _state(opt))


def _inference_mode_on_one_rank() -> None:
    """``step`` inside ``torch.inference_mode()`` on one rank only (and, as a torch.optim user
    might, without a closure on the other): every rank raises, none waits (the checks at the very
    start of a step were outside the report to the other ranks: they waited at the status
    exchange until the group's timeout)."""
    model = _model()
    opt = GramGaussNewton(model, distributed="exact", **FIXED)
    before, state = flat_params(model).clone(), _state(opt)
    x, y = _batch(7)
    if dist.get_rank() == 1:
        with torch.inference_mode():
            _raises_everywhere(lambda: opt.step(lambda: model(_shard(x)) - _shard(y)), "inference_mode")
    else:
        _raises_everywhere(lambda: opt.step(lambda: model(_shard(x)) - _shard(y)), "rank 1 of 2 failed")
    _unchanged_then_works(model, opt, before, state)
    _raises_everywhere(
        lambda: opt.step(None if dist.get_rank() == 0 else lambda: model(_shard(x)) - _shard(y)), "closure"
    )


def _frozen_broadcast() -> None:
    """A parameter frozen at construction is rank 0's on every rank too (as DDP broadcasts every
    parameter): each rank's forward pass must be the one model's, or the union's Gram mixes models."""
    model = _model()
    model[0].weight.requires_grad_(False)  # e.g. a frozen pretrained layer
    opt = GramGaussNewton(model, distributed="exact", **FIXED)
    _same_on_all_ranks(model)
    x, y = _batch(4)
    opt.step(lambda: model(_shard(x)) - _shard(y))
    _same_on_all_ranks(model)


def _resume(mode: str) -> None:
    """Defaults (exact: gain-ratio damping, metric, momentum), 3 steps, checkpoint through
    ``torch.save``/``torch.load(weights_only=True)``, 3 more: bit for bit the uninterrupted run,
    on fresh models whose own init differs on every rank."""
    model = _model()
    opt = GramGaussNewton(model, distributed=mode, **({} if mode == "exact" else {"lam": 1.0, "alpha": 0.1}))
    batches = [_batch(10 + i) for i in range(6)]
    for x, y in batches[:3]:
        opt.step(lambda: model(_shard(x)) - _shard(y))
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    for x, y in batches[3:]:
        opt.step(lambda: model(_shard(x)) - _shard(y))
    torch.manual_seed(7 + dist.get_rank())
    resumed = _mlp()
    again = GramGaussNewton(resumed, distributed=mode, **({} if mode == "exact" else {"lam": 1.0, "alpha": 0.1}))
    resumed.load_state_dict(checkpoint["model"])
    again.load_state_dict(checkpoint["optimizer"])
    for x, y in batches[3:]:
        again.step(lambda: resumed(_shard(x)) - _shard(y))
    assert torch.equal(flat_params(resumed), flat_params(model)), "the resumed run left the uninterrupted one"
    assert str(again.state_dict()) == str(opt.state_dict())
    _same_on_all_ranks(resumed)


def _defaults_equal_single_process() -> None:
    """Exact mode with every default (gain ratio every 4 steps, per-tensor metric, momentum 0.9,
    weight decay, lr) takes the single process's steps on the union batch, alpha included."""
    model = _model()
    single = copy.deepcopy(model)
    for t in single.parameters():
        dist.broadcast(t.data, src=0)
    options = dict(weight_decay=0.01, lr=0.8)
    opt = GramGaussNewton(model, distributed="exact", **options)
    reference = GramGaussNewton(single, distributed=None, **options)
    for i in range(8):
        x, y = _batch(20 + i)
        loss = opt.step(lambda: model(_shard(x)) - _shard(y))
        reference_loss = reference.step(lambda: single(x) - y)
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: defaults, exact vs single process")
        assert_close(loss, reference_loss, 1e-12, f"step {i}: loss of the union batch")
        assert opt.param_groups[0]["alpha"] == reference.param_groups[0]["alpha"]
        assert opt.last_diagnostics.rejected == reference.last_diagnostics.rejected
    _same_on_all_ranks(model)


def _shards_against_one_process(mode: str, shard_sizes: list[tuple[int, int]], seed: int, **options) -> None:
    """Steps on shards of the given sizes (empty ones included) equal one process's on their
    union batch (parameters, loss, ``alpha``), every rank alike; then every shard empty is refused
    on every rank and changes nothing."""
    model = _model()
    single = copy.deepcopy(model)
    for t in single.parameters():
        dist.broadcast(t.data, src=0)
    opt = GramGaussNewton(model, distributed=mode, **options)
    reference = GramGaussNewton(single, distributed=None, **options)
    for i, sizes in enumerate(shard_sizes):
        x, y = _batch(seed + i)
        x, y = x[: sum(sizes)], y[: sum(sizes)]
        lo = sum(sizes[: dist.get_rank()])
        mine = slice(lo, lo + sizes[dist.get_rank()])
        loss = opt.step(lambda: model(x[mine]) - y[mine])
        reference_loss = reference.step(lambda: single(x) - y)
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: shards {sizes}, {mode} mode")
        assert_close(loss, reference_loss, 1e-12, f"step {i}: loss of the union batch")
        assert opt.param_groups[0]["alpha"] == reference.param_groups[0]["alpha"]
        _same_on_all_ranks(model)
    before, state = flat_params(model).clone(), _state(opt)
    _raises_everywhere(lambda: opt.step(lambda: model(x[:0]) - y[:0]), "every rank's closure returned an empty batch")
    _unchanged_then_works(model, opt, before, state)


def _local_empty_shard() -> None:
    """Local mode with an empty shard: the other shards' weighted steps (weights ``b_p / B``, the
    empty one 0), i.e. here the single-process step of the one non-empty shard."""
    _shards_against_one_process("local", [(3, 0), (0, 2)], 50, **FIXED)


def _empty_shard() -> None:
    """A global batch with fewer samples than ranks (the last batch of an epoch under torchrun):
    a rank whose shard is empty takes part with no sample, and exact mode still takes the single
    process's step on the union batch (defaults: gain ratio, metric, momentum); every shard empty
    is refused on every rank."""
    _shards_against_one_process("exact", [(3, 0), (0, 2), (3, 2), (1, 0)], 40)


def _functional_engine() -> None:
    """A closure object the engine recognises by its type (a ``FunctionalResidual``) reaches it
    as is in exact mode (the empty-shard guard wraps plain functions only): the single process's
    step on the union batch."""
    from torch.func import functional_call

    from gramnewton.engines.functional import FunctionalResidual, Term

    model = _model()
    single = copy.deepcopy(model)
    for t in single.parameters():
        dist.broadcast(t.data, src=0)

    def residual(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> FunctionalResidual:
        def fn(params: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
            return functional_call(net, params, (xi.unsqueeze(0),)).reshape(()) - yi.reshape(())

        return FunctionalResidual(dict(net.named_parameters()), Term(fn, (x, y)))

    opt = GramGaussNewton(model, distributed="exact", engine="functional", **FIXED)
    reference = GramGaussNewton(single, distributed=None, engine="functional", **FIXED)
    for i in range(2):
        x, y = _batch(60 + i)
        opt.step(residual(model, _shard(x), _shard(y)))
        reference.step(residual(single, x, y))
        assert_close(flat_params(model), flat_params(single), 1e-10, f"step {i}: functional engine, exact mode")
    _same_on_all_ranks(model)


OUT: list[Path] = []  # the worker's folder, set by _worker


def _train_last_batch_of_one() -> None:
    """``torchrun -m gramnewton train`` on the 354 diabetes training samples in global batches of 353: the
    second batch of each epoch has one sample, so rank 1's shard is empty. The run trains
    (it used to stop at that batch with "closure returned an empty residual tensor")."""
    from gramnewton.lab.experiments.config import resolve
    from gramnewton.lab.experiments.runner import run_experiment

    run = {
        "name": "diabetes-last-batch",
        "model": {"name": "two_layer", "kwargs": {"width": 16}},
        "data": {"name": "diabetes"},
        "optimizer": {"name": "ggn"},
        "train": {"batch_size": 353, "epochs": 1, "weight_decay": 0.0, "threads": 1},
    }
    rows = run_experiment(resolve(run), OUT[0] / "last-batch")
    if dist.get_rank() == 0:
        assert [r["step"] for r in rows] == [0, 2], rows


SCENARIOS: dict[str, Callable[[], None]] = {
    **{f"construct-{kind}-differs": (lambda k=kind: _construct_differs(k)) for kind in ("shape", "count", "dtype")},
    **{
        f"{mode}-{change}-one-rank": (lambda m=mode, c=change: _trainable_differs(m, c))
        for mode in ("exact", "local")
        for change in ("freeze", "unfreeze")
    },
    **{f"local-{key}-differs": (lambda k=key: _hyper_differs("local", k)) for key in ("alpha", "lam", "momentum")},
    "exact-alpha-differs-settings": lambda: _hyper_differs("exact", "alpha", hook=True),
    "exact-momentum-differs-settings": lambda: _hyper_differs("exact", "momentum", hook=True),
    "exact-resume-bit-for-bit": lambda: _resume("exact"),
    "local-resume-bit-for-bit": lambda: _resume("local"),
    "exact-defaults-equal-single-process": _defaults_equal_single_process,
    "exact-empty-shard": _empty_shard,
    "local-empty-shard": _local_empty_shard,
    "exact-functional-engine": _functional_engine,
    "train-run-last-batch-of-one": _train_last_batch_of_one,
    "exact-alpha-differs": lambda: _hyper_differs("exact", "alpha"),
    "exact-lr-differs": lambda: _hyper_differs("exact", "lr"),
    "exact-frozen-parameter-broadcast": _frozen_broadcast,
    "local-lr-differs": lambda: _hyper_differs("local", "lr"),
    "exact-momentum-differs": lambda: _hyper_differs("exact", "momentum"),
    "exact-refused-on-one-rank": _refused_on_one_rank,
    "exact-checkpoint-on-one-rank": _checkpoint_on_one_rank,
    "exact-batchnorm-on-one-rank": _batchnorm_on_one_rank,
    "exact-inference-mode-on-one-rank": _inference_mode_on_one_rank,
}


def _worker(rank: int, store: str, out: str) -> None:
    OUT.append(Path(out))
    # a short timeout: a scenario that leaves a rank waiting fails in seconds, not in 30 minutes
    run_scenarios(SCENARIOS, rank, store, out, timeout=15)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("distributed_reliability")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD)
    except Exception as error:  # a rank aborted: the scenarios it finished still have their records
        print(f"a worker ended abnormally: {error}")
    return [
        json.loads(path.read_text()) if path.exists() else {} for path in (tmp / f"rank{r}.json" for r in range(WORLD))
    ]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks(results: list[dict[str, str]], scenario: str) -> None:
    for rank, by_name in enumerate(results):
        assert by_name.get(scenario) == "ok", f"rank {rank}:\n{by_name.get(scenario, 'did not run (a rank aborted)')}"
