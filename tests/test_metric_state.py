"""The metric's optimizer state: the root second moment ``metric_root_moment = sqrt(v)`` (and
``metric_count``), saved and resumed bit for bit in float64 and float32 with gradients whose
squares float32 cannot hold, and an older version's ``metric_moment = v`` loaded as its root
(``load_state_dict``, ``copy.deepcopy``)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from dense import assert_close, assert_same_run, flat_params, seeded
from torch import Tensor, nn

from gramnewton import GramGaussNewton


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(dtype)


def _batches(dtype: torch.dtype, count: int = 6) -> list[tuple[Tensor, Tensor]]:
    g = seeded(1)
    return [(torch.randn(5, 3, generator=g).to(dtype), torch.randn(5, 2, generator=g).to(dtype)) for _ in range(count)]


def _saved(opt: GramGaussNewton) -> dict:
    """``opt.state_dict()`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("per_tensor", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_resumed_run_with_tiny_gradients_is_the_uninterrupted_one_bit_for_bit(dtype, per_tensor):
    """Residuals ``c r`` with ``c = 1e-11`` (``alpha`` scaled by ``c^2`` with them): batch
    gradients ``~1e-22``, whose squares float32 cannot hold. Three steps, the state saved and
    loaded into a fresh optimizer and model: the root moment is kept, positive, in the parameters'
    dtype, and the next three steps of both are equal bit for bit (the round trip at ordinary
    scales, with the damping rule: ``test_metric_geodesic_numerics.py``)."""
    scale = 1e-11
    metric = {"name": "second_moment", "power": 1.0, "per_tensor": per_tensor}
    options = dict(alpha=0.2 * scale**2, momentum=0.5, adaptive_damping=False, metric=metric)
    model, batches = _model(dtype), _batches(dtype)
    opt = GramGaussNewton(model, **options)
    for x, y in batches[:3]:
        opt.step(lambda x=x, y=y: scale * (model(x) - y))
    twin = copy.deepcopy(model)
    resumed = GramGaussNewton(twin, **options)
    resumed.load_state_dict(_saved(opt))
    for p in model.parameters():
        root = opt.state[p]["metric_root_moment"]
        assert root.dtype == dtype and bool((root > 0).all()) and "metric_moment" not in opt.state[p]
    for x, y in batches[3:]:
        opt.step(lambda x=x, y=y: scale * (model(x) - y))
        resumed.step(lambda x=x, y=y: scale * (twin(x) - y))
        assert_same_run(flat_params(model), flat_params(twin))


@pytest.mark.parametrize("per_tensor", [False, True])
def test_an_older_state_dict_with_the_second_moment_itself_is_loaded_as_its_root(per_tensor):
    """A ``state_dict`` of an older version holds ``metric_moment = v``: loaded (and copied with
    ``copy.deepcopy``) it becomes ``metric_root_moment = sqrt(v)``, the caller's dict untouched,
    and the next steps are the uninterrupted run's to round-off."""
    metric = {"name": "second_moment", "power": 1.0, "beta2": 0.9, "per_tensor": per_tensor}
    options = dict(lam=0.7, alpha=0.2, momentum=0.5, adaptive_damping=False, metric=metric)
    model, batches = _model(torch.float64), _batches(torch.float64, count=4)
    opt = GramGaussNewton(model, **options)
    for x, y in batches[:2]:
        opt.step(lambda x=x, y=y: model(x) - y)
    old = _saved(opt)
    for state in old["state"].values():
        state["metric_moment"] = state.pop("metric_root_moment").square()
    before = copy.deepcopy(old)
    twin = copy.deepcopy(model)
    resumed = GramGaussNewton(twin, **options)
    resumed.load_state_dict(old)
    for key, state in old["state"].items():
        assert torch.equal(state["metric_moment"], before["state"][key]["metric_moment"])
        assert set(state) == set(before["state"][key])
    older = copy.deepcopy(resumed)  # an optimizer of an older version, copied (or unpickled)
    for state in older.state.values():
        state["metric_moment"] = state.pop("metric_root_moment").square()
    for state in [*resumed.state.values(), *copy.deepcopy(older).state.values()]:
        assert "metric_moment" not in state and "metric_root_moment" in state
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(resumed.state[q]["metric_root_moment"], opt.state[p]["metric_root_moment"], 1e-15, "root")
    for x, y in batches[2:]:
        opt.step(lambda x=x, y=y: model(x) - y)
        resumed.step(lambda x=x, y=y: twin(x) - y)
        assert_close(flat_params(twin), flat_params(model), 1e-12, "steps resumed from v")
