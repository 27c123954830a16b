"""The hooks engine's proof from the graph that a module's output rows are the samples
(``engines.rows.rows_kept_by_graph``), checked in float64 against the residuals' dense Jacobian
with respect to the module's output: the proof must hold exactly where that Jacobian is block
diagonal (row ``j`` reaches sample ``j`` only), for each rule of the node-type tables; where it
does not hold, the engine's numerical check routes the module and the Gram stays exact."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from dense import assert_close, dense_jacobian, seeded
from torch import Tensor, nn

from gramnewton.engines import HooksEngine, hooks
from gramnewton.engines.rows import post_order, rows_kept_by_graph

B, D = 4, 8  # samples, width of the module's output h (b, d): D a multiple of B, so that (D, B) passes the row count


def _constants() -> dict[str, Tensor]:
    g = seeded(1)
    f64 = dict(dtype=torch.float64, generator=g)
    return {
        "A": torch.randn(B, B, **f64),  # a data matrix over the samples
        "C": torch.randn(B, B, D, **f64),
        "W": torch.randn(2, 1, 2, 2, **f64),
        "mean": torch.randn(D, **f64),
        "var": 1 + torch.rand(D, **f64),
    }


# expression of h (b, d) -> (b, ...), and whether row j of the result depends on row j of h alone
CASES: dict[str, tuple[Callable[[Tensor, dict[str, Tensor]], Tensor], bool]] = {
    # rows kept: one case per table entry kind
    "elementwise": (lambda h, c: torch.tanh(h) * h.sin() + 2.0, True),
    "linear_on_a_sequence": (lambda h, c: F.linear(h.view(B, 2, 4), c["C"][0, :4, :4]).flatten(1), True),
    "layer_norm_over_features": (lambda h, c: F.layer_norm(h, (D,)), True),
    "softmax_over_features": (lambda h, c: h.softmax(-1), True),
    "centred_features": (lambda h, c: h - h.mean(-1, keepdim=True), True),
    "columns_joined": (lambda h, c: torch.cat([h, h.exp()], 1), True),
    "inner_transpose": (lambda h, c: h.view(B, 2, 4).transpose(1, 2).reshape(B, D), True),
    "per_sample_products": (lambda h, c: torch.bmm(h.view(B, 2, 4), h.view(B, 4, 2)).flatten(1), True),
    "padded_convolution_pooled": (
        lambda h, c: F.max_pool2d(F.conv2d(F.pad(h.view(B, 1, 2, 4), (1, 1, 1, 1)), c["W"]), 2).flatten(1),
        True,
    ),
    "batch_norm_eval": (lambda h, c: F.batch_norm(h, c["mean"], c["var"], training=False), True),
    "columns_sliced": (lambda h, c: h[:, 1:4] * h[:, 0:1], True),
    "view_within_samples": (lambda h, c: h.view(2 * B, D // 2).softmax(-1).view(B, D), True),
    # rows mixed: each is what one rule's condition refuses
    "mean_over_samples": (lambda h, c: h - h.mean(0), False),
    "softmax_over_samples_negative_dim": (lambda h, c: h.softmax(-2), False),
    "view_across_samples": (lambda h, c: h.view(B // 2, 2 * D).softmax(-1).view(B, D), False),
    "softmax_over_samples": (lambda h, c: h.softmax(0), False),
    "product_from_the_left": (lambda h, c: c["A"] @ h, False),  # mm's second operand
    "broadcast_into_rows": (lambda h, c: (h * c["C"]).sum(1), False),  # (b, d) * (b, b, d): h along dim 1
    "unsqueezed_into_rows": (lambda h, c: (h.unsqueeze(0) * c["C"].transpose(0, 1)).sum(1), False),
    "layer_norm_over_samples": (lambda h, c: F.layer_norm(h, (B, D)), False),
    "batch_norm_training": (lambda h, c: F.batch_norm(h, None, None, training=True), False),
    "padding_shifts_rows": (lambda h, c: F.pad(h, (0, 0, 1, -1)), False),
    # (b, 2, d/2) with d/2 = b: the transposed or permuted tensor has b rows again
    "transpose_of_samples": (lambda h, c: h.view(B, 2, D // 2).transpose(0, 2).reshape(B, D), False),
    "permutation_of_samples": (lambda h, c: h.view(B, 2, D // 2).permute(2, 1, 0).reshape(B, D), False),
    "rows_rotated": (lambda h, c: torch.cat([h[1:], h[:1]]), False),
    "rows_flipped": (lambda h, c: h.flip(0), False),
}


@pytest.mark.parametrize("name", CASES)
def test_the_proof_holds_exactly_where_rows_reach_their_own_sample(name: str) -> None:
    expression, kept = CASES[name]
    consts = _constants()
    g = seeded(0)
    lin = nn.Linear(3, D).double()
    h = lin(torch.randn(B, 3, dtype=torch.float64, generator=g))
    residuals = expression(h, consts).reshape(B, -1)
    proven = rows_kept_by_graph(post_order(residuals.grad_fn), {h.grad_fn}, B)

    jac = torch.autograd.functional.jacobian(lambda t: expression(t, consts).reshape(B, -1), h.detach())
    blocks = jac.permute(0, 2, 1, 3).abs().sum((2, 3))  # (b, b): |d r_i / d h_j| summed
    off_diagonal = float((blocks - torch.diag(torch.diag(blocks))).max())
    assert (off_diagonal == 0) == kept, f"{name}: the case itself is mislabelled (off-diagonal {off_diagonal})"
    assert (h.grad_fn in proven) == kept


class Between(nn.Module):
    """Two Linears with ``expression`` between them: the first one's rows are the samples iff the
    expression keeps rows."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.expression, self.consts = CASES[name][0], _constants()
        width = self.expression(torch.zeros(B, D, dtype=torch.float64), self.consts).reshape(B, -1).shape[1]
        self.inp, self.out = nn.Linear(3, D), nn.Linear(width, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.expression(self.inp(x), self.consts).reshape(B, -1)))


@pytest.mark.parametrize("name", CASES)
def test_a_proven_module_skips_the_numerical_check_and_a_mixed_one_is_routed(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = CASES[name][1]
    runs = []
    check = hooks.rows_not_samples
    monkeypatch.setattr(hooks, "rows_not_samples", lambda *a: runs.append(1) or check(*a))
    torch.manual_seed(0)
    model = Between(name).double()
    x = torch.randn(B, 3, dtype=torch.float64)
    y = torch.randn(B, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        system = HooksEngine(model).compute(lambda: model(x) - y)
    routed = any("rows of its output are not the samples" in str(w.message) for w in caught)
    assert (routed, bool(runs)) == (not kept, not kept)
    jac = dense_jacobian(model, x)
    assert_close(system.gram, jac @ jac.T, 1e-10, f"{name}: Gram")
