"""The benchmark prototype ``benchmarks/subsampled_ggn.py`` (curvature of a sub-batch) against its
dense parameter-space formula, in float64: a prototype whose measurements are recorded must
compute what its docstring says."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from dense import assert_close, flat_params
from test_classification import _blockdiag, _blocks, _derivatives, _mlp, _sum_loss, _top_c_hessian

from gramnewton import GramGaussNewton

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # last: shadows nothing
from subsampled_ggn import SubsampledGaussNewton  # noqa: E402


def _closure(model, x, y):
    return lambda rows=slice(None): (model(x[rows]), y[rows])


def test_subsampled_steps_match_the_dense_formula():
    """Two steps with momentum: ``phi_t = (lam (b/s) J_S^T H_S J_S + alpha I)^{-1} (J^T g + alpha mu phi_{t-1})``,
    ``H_S`` the "gradient" curvature of the first ``s`` samples, ``J`` and ``g`` of the whole batch."""
    k, b, s, lam, alpha, mu = 4, 6, 3, 0.7, 0.3, 0.5
    model = _mlp(k).double()
    opt = SubsampledGaussNewton(model, rows=s, lam=lam, alpha=alpha, momentum=mu, loss="cross_entropy")
    phi = torch.zeros(flat_params(model).numel(), dtype=torch.float64)
    for _ in range(2):
        x, y = torch.randn(b, 3, 4, dtype=torch.float64), torch.randint(0, k, (b,))
        jac, _, g, h = _derivatives(model, x, _sum_loss("cross_entropy", y))
        h_sub = _blockdiag(_top_c_hessian(_blocks(h, b, k), g.reshape(b, k), 0)[:s])
        j_sub = jac[: s * k]
        matrix = lam * b / s * j_sub.T @ h_sub @ j_sub + alpha * torch.eye(jac.shape[1], dtype=torch.float64)
        phi = torch.linalg.solve(matrix, jac.T @ g + alpha * mu * phi)
        expected = flat_params(model) - phi
        opt.step(_closure(model, x, y))
        assert_close(flat_params(model), expected, 1e-9, "subsampled Gauss-Newton step")


def test_whole_batch_is_gram_gauss_newtons_step():
    """With ``s = b`` and no momentum the prototype takes the optimizer's ("gradient" curvature) step."""
    k, b = 4, 6
    model = _mlp(k).double()
    twin = _mlp(k).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(b, 3, 4, dtype=torch.float64), torch.randint(0, k, (b,))
    SubsampledGaussNewton(model, rows=b, lam=3.0, alpha=0.7, momentum=0.0, loss="cross_entropy").step(
        _closure(model, x, y)
    )
    GramGaussNewton(
        twin, lam=3.0, alpha=0.7, momentum=0.0, loss="cross_entropy", curvature="gradient", adaptive_damping=False
    ).step(_closure(twin, x, y))
    assert_close(flat_params(model), flat_params(twin), 1e-12, "s = b against GramGaussNewton")
