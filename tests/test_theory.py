"""The theory studies: exact statements on linear models, the closed-form engine, the NTK limit, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gramnewton import cli
from gramnewton.engines import ReferenceEngine
from gramnewton.lab.theory import (
    TwoLayerEngine,
    block_split,
    ggn_batch_step,
    iteration_matrix,
    ntk_limit,
    run_epochs,
    run_full_batch,
    seeded_two_layer,
    sgd_batch_step,
    sgd_epoch_matrix,
    spectral_radius,
    sphere_data,
    tail_contraction,
)

N, P, B = 12, 30, 4  # samples, parameters of the linear model, batch size


def linear_problem(seed: int = 0) -> tuple[nn.Linear, torch.Tensor]:
    """``f(x) = w . x`` with ``P > N`` parameters: its Gram matrix ``X X^T`` is constant and invertible."""
    torch.manual_seed(seed)
    model = nn.Linear(P, 1, bias=False).double()
    x = torch.randn(N, P, dtype=torch.float64)
    return model, x


def epoch_map(model: nn.Linear, x: torch.Tensor, make_step) -> torch.Tensor:
    """Column ``j``: the residual after one epoch started from residual ``e_j`` (the map is linear)."""
    w0 = model.weight.detach().clone()
    cols = []
    for j in range(N):
        with torch.no_grad():
            model.weight.copy_(w0)
            y = model(x).squeeze(1) - torch.eye(N, dtype=torch.float64)[j]
        cols.append(run_epochs(model, x, y, B, 1, make_step(model))[-1])
    return torch.stack(cols, dim=1)


def test_full_batch_ggn_solves_a_linear_model_in_one_step():
    model, x = linear_problem()
    y = torch.randn(N, dtype=torch.float64)
    trace = run_full_batch(model, x, y, steps=2, engine="reference")
    assert trace.residuals[1].norm() < 1e-10 * trace.residuals[0].norm()


def test_minibatch_ggn_epoch_map_is_A_on_a_linear_model():
    model, x = linear_problem()
    gram = x @ x.T
    measured = epoch_map(model, x, lambda m: ggn_batch_step(m, engine="reference"))
    expected = iteration_matrix(gram, B)
    assert torch.allclose(measured, expected, rtol=0, atol=1e-10), (measured - expected).abs().max()
    assert spectral_radius(expected) < 1


def test_sgd_epoch_map_on_a_linear_model():
    model, x = linear_problem(1)
    lr = 0.5 / float(torch.linalg.eigvalsh(x @ x.T)[-1])
    measured = epoch_map(model, x, lambda m: sgd_batch_step(m, lr))
    assert torch.allclose(measured, sgd_epoch_matrix(x @ x.T, B, lr), rtol=0, atol=1e-10)


def test_A_is_one_block_gauss_seidel_sweep_on_the_residual():
    gen = torch.Generator().manual_seed(3)
    j = torch.randn(N, 2 * N, generator=gen, dtype=torch.float64)
    gram, rhs = j @ j.T, torch.randn(N, generator=gen, dtype=torch.float64)
    diag, low = block_split(gram, B)
    assert torch.equal(diag - low - low.T, gram)
    r = torch.randn(N, generator=gen, dtype=torch.float64)
    before = rhs - gram @ r
    for i in range(0, N, B):  # block Gauss-Seidel, each block solved with the latest values
        s = slice(i, i + B)
        others = rhs[s] - gram[s] @ r + gram[s, s] @ r[s]
        r[s] = torch.linalg.solve(gram[s, s], others)
    after = rhs - gram @ r
    assert torch.allclose(after, iteration_matrix(gram, B) @ before, rtol=0, atol=1e-10)


def test_closed_form_engine_equals_reference_engine():
    model = seeded_two_layer(5, 64, "softplus", seed=2)
    x, y = sphere_data(7, 5, seed=2)
    closure = lambda: model(x).squeeze(1) - y  # noqa: E731
    fast = TwoLayerEngine(model, x).compute(closure)
    ref = ReferenceEngine([model.hidden.weight]).compute(closure)
    assert torch.allclose(fast.gram, ref.gram, rtol=0, atol=1e-10)
    v = torch.randn(7, dtype=torch.float64)
    assert torch.allclose(fast.jt_times(v)[0], ref.jt_times(v)[0], rtol=0, atol=1e-10)
    u = [torch.randn_like(model.hidden.weight)]
    assert torch.allclose(fast.j_times(u), ref.j_times(u), rtol=0, atol=1e-10)


class GaussSoftplus(nn.Module):
    """``sigma(z) = z Phi(z) + phi(z)``: ``sigma' = Phi``, for which Eq. 13 has a closed form."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        normal = torch.distributions.Normal(torch.zeros((), dtype=z.dtype), torch.ones((), dtype=z.dtype))
        return z * normal.cdf(z) + normal.log_prob(z).exp()


def test_ntk_quadrature_matches_a_closed_form():
    x, _ = sphere_data(9, 4, seed=1)
    rho = (x @ x.T).clamp(-1, 1)
    # E[Phi(u) Phi(v)] = P(Z1 <= u, Z2 <= v) = 1/4 + arcsin(rho / 2) / (2 pi) (an orthant probability).
    expected = rho * (0.25 + torch.asin(rho / 2) / (2 * math.pi))
    assert torch.allclose(ntk_limit(x, GaussSoftplus()), expected, rtol=0, atol=1e-12)


def test_ntk_quadrature_matches_monte_carlo_for_softplus():
    x, _ = sphere_data(6, 4, seed=1)
    w = torch.randn(400_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = torch.sigmoid(x @ w.T)
    monte_carlo = (x @ x.T) * (s @ s.T) / w.shape[0]
    assert torch.allclose(ntk_limit(x, nn.Softplus()), monte_carlo, rtol=0, atol=3e-3)


def test_tail_contraction_of_a_geometric_sequence():
    assert tail_contraction([0.5**t for t in range(10)]) == pytest.approx(0.5, rel=1e-12)


def test_theory_commands_run_end_to_end(tmp_path, capsys):
    q_out, m_out = tmp_path / "q", tmp_path / "m"
    assert (
        cli.main(
            [
                "theory",
                "quadratic",
                "--n",
                "8",
                "--d",
                "3",
                "--widths",
                "6,8",
                "--seeds",
                "1",
                "--steps",
                "3",
                "--out",
                str(q_out),
            ]
        )
        == 0
    )
    assert (
        cli.main(
            [
                "theory",
                "minibatch",
                "--n",
                "8",
                "--d",
                "3",
                "--batch-size",
                "4",
                "--widths",
                "6,8",
                "--epochs",
                "4",
                "--out",
                str(m_out),
            ]
        )
        == 0
    )
    quadratic = json.loads((q_out / "quadratic.json").read_text())
    minibatch = json.loads((m_out / "minibatch.json").read_text())
    assert [r["width"] for r in quadratic["rows"]] == [64, 256]
    assert len(minibatch["study"]["runs"][0]["ggn_norms"]) == 5
    assert (q_out / "quadratic.png").stat().st_size > 0 and (m_out / "minibatch.png").stat().st_size > 0
    assert "Theorem 2" in capsys.readouterr().out
