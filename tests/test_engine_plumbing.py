"""The plumbing around the engines: which engine and solve space a step takes, the hooks engine's
workspace and row check, the size check before a large allocation, the step's diagnostics and the
allocator tuning.

Numbers are checked in float64 against dense ``torch.func.jacrev`` Jacobians (``tests/dense.py``)
or one autograd row per residual, to 1e-10 relative unless said otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from dense import autograd_rows, cpu_only, dense_jacobian, dense_step, flat_params
from torch import Tensor, nn
from torch.func import functional_call

import gramnewton.allocator as allocator
import gramnewton.engines.base as base
from gramnewton import GramGaussNewton, tune_allocator
from gramnewton.engines import FunctionalResidual, HooksEngine, Term, handlers, hooks

D = torch.float64
RTOL = 1e-10


def relative(got: Tensor, want: Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def mlp(dtype: torch.dtype = D, outputs: int = 2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, outputs)).to(dtype)  # m = 15 + 6 * outputs


# --- the engine and the solve space a step takes --------------------------------------------------


@pytest.mark.parametrize("rows", [26, 28, 54, 56])  # b*k around m = 27 (float32's rule) and 2m (float64's)
@pytest.mark.parametrize("engine", ["auto", "hooks", "reference", "functional"])
def test_the_engine_and_solve_space_chosen_do_not_change_the_step(engine: str, rows: int) -> None:
    """``solve_space="auto"`` flips from the sample to the parameter space at ``b*k > 2m`` (float64);
    each engine on each side of it takes the step of the dense formula
    ``-J^T (lam J J^T + alpha I)^{-1} r`` (jacrev), to round-off."""
    model = mlp()
    x, y = torch.randn(rows // 2, 2, dtype=D), torch.randn(rows // 2, 2, dtype=D)
    want = dense_step(model, x, y, 2.0, 0.1)
    if engine == "functional":
        names = dict(model.named_parameters())

        def one(params: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
            return functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0) - yi

        closure = FunctionalResidual(names, Term(one, (x, y)))
    else:

        def closure() -> Tensor:
            return model(x) - y

    before = flat_params(model)
    opt = GramGaussNewton(model, lam=2.0, alpha=0.1, momentum=0.0, adaptive_damping=False, metric=None, engine=engine)
    opt.step(closure)
    assert opt.last_diagnostics.solve_space == ("parameter" if rows > 54 else "sample")
    assert relative(flat_params(model) - before, want) < RTOL


# --- the hooks engine's workspace -----------------------------------------------------------------


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d
    return nn.Sequential(
        conv(2, 3, 3, padding=1), nn.Tanh(), conv(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)
    ).to(D)


CPU_WORKSPACE = cpu_only("the hooks engine's workspace is used on the CPU only")


@CPU_WORKSPACE
@pytest.mark.parametrize("path", ["patches", "grouped", "grouped_chunks"])
def test_workspace_buffers_across_batch_sizes_and_a_failed_step(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The workspace reuses its buffers while shapes repeat: batches of 4, 8, 4, 6 samples in a
    row, one step raising half-way through its backward pass (the first layer's input changed in
    place, found after the second layer had written its buffer), then 8 and 4 again. Every step's
    Gram, ``J^T v``, ``J u`` and dense ``J`` equal jacrev's; the Gram and ``J`` columns a user kept
    from earlier steps are unchanged (no buffer of the workspace is handed to the user); a system
    whose buffers a later step wrote over refuses ``J^T v`` rather than use them."""
    monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", "grouped" if path == "grouped_chunks" else path)
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", float("inf"))  # gradients kept in the workspace
    if path == "grouped_chunks":
        monkeypatch.setattr(handlers, "GROUPED_CHUNK_BYTES", 2 * 8 * 54)  # two samples a chunk
    model = conv_net()
    params = list(model.parameters())
    engine = HooksEngine(model, params)
    kept: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    first = None
    for b in (4, 8, 4, 6, None, 8, 4):
        if b is None:  # the first convolution's input changed after its call: found when its gradients come,
            x, y = torch.randn(5, 2, 4, 4, dtype=D), torch.randn(5, 2, dtype=D)  # the second one's buffer written

            def changed_input() -> Tensor:
                out = model(x)
                x.mul_(2.0)
                return out - y

            with pytest.raises(RuntimeError, match="modified in place"):
                engine.compute(changed_input)
            continue
        x, y = torch.randn(b, 2, 4, 4, dtype=D), torch.randn(b, 2, dtype=D)
        system = engine.compute(lambda: model(x) - y)
        first = first or system
        jac = dense_jacobian(model, x)
        v, u = torch.randn(2 * b, dtype=D), [torch.randn_like(p) for p in params]
        columns = system.jacobian_columns(0, jac.shape[1])
        assert relative(system.gram, jac @ jac.T) < RTOL
        assert relative(torch.cat([t.reshape(-1) for t in system.jt_times(v)]), jac.T @ v) < RTOL
        assert relative(system.j_times(u), jac @ torch.cat([t.reshape(-1) for t in u])) < RTOL
        assert relative(columns, jac) < RTOL
        conv_columns = system.jacobian_columns(0, params[0].numel())
        kept.append((system.gram, system.gram.clone(), conv_columns, conv_columns.clone()))
        with torch.no_grad():
            for p in params:
                p.mul_(1.05)
    for gram, gram_copy, conv_columns, columns_copy in kept:
        assert torch.equal(gram, gram_copy) and torch.equal(conv_columns, columns_copy)
    with pytest.raises(RuntimeError, match="later step"):
        first.jt_times(torch.randn(8, dtype=D))


@CPU_WORKSPACE
@pytest.mark.parametrize("path", ["patches", "grouped"])
def test_workspace_buffers_follow_the_models_dtype(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model cast float32 -> float64 -> float32 -> float64 between steps: the workspace's
    buffers take each step's dtype; every Gram equals jacrev's in float64 (float32 to 1e-5)."""
    monkeypatch.setattr(handlers.CONV_WEIGHT_PATHS, "forced", path)
    monkeypatch.setattr(handlers, "MAX_PATCHES_OVER_GRADIENTS", float("inf"))
    monkeypatch.setattr(handlers, "factored_is_cheaper", lambda *a, **k: False)
    monkeypatch.setattr(handlers, "KEEP_FACTORS_ABOVE", float("inf"))
    model = conv_net()
    engine = HooksEngine(model, list(model.parameters()))
    for dtype in (torch.float32, D, torch.float32, D):
        model.to(dtype)
        x = torch.randn(5, 2, 4, 4, dtype=dtype)
        gram = engine.compute(lambda: model(x)).gram
        assert {b.dtype for b in engine.workspace._buffers.values()} == {dtype}
        jac = dense_jacobian(model.double(), x.double()).detach()
        assert gram.dtype == dtype and relative(gram.double(), jac @ jac.T) < (RTOL if dtype == D else 1e-5)


# --- the row check's cached verdict ---------------------------------------------------------------


def _reorder(kind: str, h: Tensor, swap: bool) -> Tensor:
    """``h`` ``(5, 2)`` with its rows as they are (``swap`` False), or samples 0 and 1 exchanged /
    rolled / flipped (``swap`` True) by one operation of the same kind and node type."""
    order = torch.tensor([1, 0, 2, 3, 4] if swap else [0, 1, 2, 3, 4])
    if kind == "index":
        return h[order]
    if kind == "index_select":
        return h.index_select(0, order)
    if kind == "gather":
        return h.gather(0, order.unsqueeze(1).expand_as(h))
    if kind == "roll":
        return torch.roll(h, int(swap), 0)
    return h.flip(0 if swap else 1)  # flip


@pytest.mark.parametrize("kind", ["index", "index_select", "gather", "roll", "flip"])
def test_the_row_check_sees_rows_reordered_by_the_same_operation(kind: str) -> None:
    """The closure reorders the model's output rows by an operation that keeps its rows at the
    first two forwards (``h[arange(b)]``, ``roll`` by 0, ``flip(1)``) and exchanges samples at the
    3rd (``h[[1, 0, ...]]``, ``roll`` by 1, ``flip(0)``): one node type, so the 3rd forward used the
    cached verdict "rows are the samples", and the Gram was 38-49% off, silently. The signature
    now holds the operations' dimensions and shifts and, along dimension 0, the indices' values:
    the 3rd forward is checked, its layers routed, every Gram exact."""
    model = mlp()
    params = list(model.parameters())
    engine = HooksEngine(model, params)
    x, y = torch.randn(5, 2, dtype=D), torch.randn(5, 2, dtype=D)
    for swap in (False, False, True, True):

        def closure(swap: bool = swap) -> Tensor:
            return _reorder(kind, model(x), swap) - y

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # routing warns; exactness is what is checked
            system = engine.compute(closure)
        jac = autograd_rows(params, closure)
        assert relative(system.gram, jac @ jac.T) < RTOL


def test_the_row_check_is_not_run_again_for_data_that_cannot_mix_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """Token indices (an Embedding), dropout masks and a random subset of each sample's outputs
    (``h[:, cols]``) change at every step without mixing samples: they are not part of the
    signature, so the check runs at the 1st, 2nd and 4th of 5 forwards only (two backward passes
    each), not at every one."""
    runs = []
    check = hooks.rows_not_samples
    monkeypatch.setattr(hooks, "rows_not_samples", lambda *a: runs.append(1) or check(*a))
    torch.manual_seed(0)
    emb, head = nn.Embedding(7, 6).to(D), nn.Linear(6, 6).to(D)
    model = nn.ModuleDict({"emb": emb, "head": head})
    engine = HooksEngine(model, list(model.parameters()))
    for _ in range(5):
        tokens, cols = torch.randint(0, 7, (4, 3)), torch.randperm(6)[:3]
        y = torch.randn(4, 3, dtype=D)
        closure = lambda: head(F.dropout(emb(tokens).mean(1), 0.5))[:, cols] - y  # noqa: E731
        engine.compute(closure)
    assert len(runs) == 3


# --- the size check before a large allocation -----------------------------------------------------


@pytest.mark.parametrize("engine", ["auto", "reference"])
def test_a_parameter_space_jacobian_larger_than_the_machine_is_refused(
    engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step solved in parameter space materialises the dense ``(b*k, m)`` ``J``. The reference
    engine compared it with the device's memory; the hooks engine formed it from its pieces
    unchecked (a machine too small: the allocator's error or the process killed). Both now
    refuse before the allocation, nothing changed. (The machine is made 8 KiB small.)"""
    monkeypatch.setattr(base, "device_memory", lambda device: 8 * 1024)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, padding=1)).to(D)
    x, y = torch.randn(8, 1, 6, 6, dtype=D), torch.randn(8, 1, 6, 6, dtype=D)
    opt = GramGaussNewton(model, engine=engine, solve_space="parameter")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"the dense Jacobian of 288 x 39 entries \(b = 8 samples x k = 36"):
        opt.step(lambda: model(x) - y)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)) and not opt.state


def test_check_fits_reports_sizes_beyond_int64_without_overflow() -> None:
    """``rows * columns * bytes`` beyond ``2**63`` (Python integers): refused with the size."""
    residuals = torch.zeros(2**2, 1, dtype=D)
    with pytest.raises(
        ValueError, match=r"of 4,294,967,296 x 4,294,967,296 entries .* would take 137,438,953,472\.0 GiB"
    ):
        base.check_fits((2**32, 2**32), residuals, "Gram matrix")


def test_an_empty_parameter_has_empty_jacobian_columns_with_k_outputs() -> None:
    """``jacobian_columns(s, s)`` of the hooks engine had ``b`` rows, not ``b*k``: a model with an
    empty parameter (``nn.Linear(4, 0)``) and two outputs per sample stopped a step in a per-entry
    metric, ``RuntimeError: Bad in-place call: input tensor size [12, 12] and output tensor size
    [6, 6]``. Now that step equals the reference engine's."""

    class WithEmpty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # initialising a zero-element tensor
                self.a, self.empty, self.b = nn.Linear(3, 4), nn.Linear(4, 0), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.a(x))
            return self.b(h) + self.empty(h).sum(1, keepdim=True)

    x, y = torch.randn(6, 3, dtype=D), torch.randn(6, 2, dtype=D)
    steps = []
    for engine in ("hooks", "reference"):
        torch.manual_seed(0)
        model = WithEmpty().to(D)
        before = flat_params(model)
        opt = GramGaussNewton(model, engine=engine, metric="second_moment", adaptive_damping=False, momentum=0.0)
        opt.step(lambda: model(x) - y)
        steps.append(flat_params(model) - before)
    assert relative(steps[0], steps[1]) < RTOL


# --- diagnostics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "duplicate", "alpha", "space", "method"),
    [
        (D, False, 0.1, "sample", "cholesky"),
        (D, True, 1e-30, "sample", "jitter"),
        (D, True, 0.0, "sample", "eigh"),
        (D, False, 0.1, "parameter", "qr"),
        (D, False, 0.0, "parameter", "svd"),
        (torch.float32, False, 0.1, "parameter", "normal_equations"),
    ],
)
def test_diagnostics_report_the_jitter_added_and_a_lower_bound_of_the_condition(
    dtype: torch.dtype, duplicate: bool, alpha: float, space: str, method: str
) -> None:
    """``last_diagnostics``: the step equals the dense formula with ``alpha + jitter`` (the jitter
    is what the solve added), and ``condition`` lies between 1 and ``the condition number of
    the dense matrix solved (it is documented as a lower bound; measured 0.01-1 times the true one).
    The diagnostics of a step stay as they were after the next step."""
    model = mlp(dtype, outputs=1)
    b = 8 if space == "sample" else 40
    x, y = torch.randn(b, 2, dtype=dtype), torch.randn(b, 1, dtype=dtype)
    if duplicate:  # two equal samples: G singular
        x[1] = x[0]
    jac = dense_jacobian(mlp(D, outputs=1), x.double()).detach()
    r = (mlp(D, outputs=1)(x.double()) - y.double()).reshape(-1).detach()
    before = flat_params(model).double()
    opt = GramGaussNewton(
        model, lam=1.0, alpha=alpha, momentum=0.0, adaptive_damping=False, metric=None, solve_space=space
    )
    opt.step(lambda: model(x) - y)
    diagnostics = opt.last_diagnostics
    assert (diagnostics.solve_method, diagnostics.solve_space) == (method, space)
    step = flat_params(model).double() - before
    damping = alpha + diagnostics.jitter
    n, m = jac.shape
    if space == "sample":
        mat = jac @ jac.T + damping * torch.eye(n, dtype=D)
        inverse = torch.linalg.pinv(mat, rtol=n * torch.finfo(D).eps, hermitian=True) if damping == 0 else mat.inverse()
        want = -jac.T @ inverse @ r
    else:
        mat = jac.T @ jac + damping * torch.eye(m, dtype=D)
        want = -torch.linalg.pinv(jac) @ r if damping == 0 else -torch.linalg.solve(mat, jac.T @ r)
    assert (diagnostics.jitter > 0) == (method == "jitter")
    assert relative(step, want) < (1e-5 if dtype == torch.float32 else 1e-6 if method == "jitter" else 1e-10)
    # the true condition from J's singular values (torch.linalg.cond of J^T J loses cond * eps of itself)
    squares = torch.linalg.svdvals(jac) ** 2
    eigenvalues = torch.cat([squares, squares.new_zeros(max(0, mat.shape[0] - squares.numel()))]) + damping
    assert 1 <= diagnostics.condition <= float(eigenvalues.max() / eigenvalues.min()) * (1 + 1e-9)
    kept = (diagnostics.loss_before, diagnostics.condition, diagnostics.jitter)
    opt.step(lambda: model(x) - y)
    assert (diagnostics.loss_before, diagnostics.condition, diagnostics.jitter) == kept


# --- allocator tuning -----------------------------------------------------------------------------


def test_tune_allocator_on_windows_is_a_reported_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """On Windows ``ctypes.CDLL(None)`` raises ``TypeError`` (``'/' in None``), which the glibc probe
    did not catch: ``tune_allocator()``, and with it the ``gramnewton`` command at start, failed.
    It now says the C library is not glibc and changes nothing (Windows simulated: the module sees
    ``os.name == "nt"``, and ``ctypes.CDLL(None)`` raises as there)."""

    def windows_cdll(name: object, *args: object, **kwargs: object) -> None:
        raise TypeError("argument of type 'NoneType' is not iterable")

    monkeypatch.setattr(allocator, "os", SimpleNamespace(name="nt", environ=os.environ))
    monkeypatch.setattr(allocator.ctypes, "CDLL", windows_cdll)
    tuning = tune_allocator()
    assert not tuning.applied and "not glibc" in tuning.reason and tuning.settings == {}


SHIM = """
#include <stddef.h>
void *__libc_malloc(size_t); void __libc_free(void *);
void *__libc_calloc(size_t, size_t); void *__libc_realloc(void *, size_t);
void *malloc(size_t n) { return __libc_malloc(n); }
void free(void *p) { __libc_free(p); }
void *calloc(size_t a, size_t b) { return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { return __libc_realloc(p, n); }
"""


@pytest.mark.skipif(sys.platform != "linux" or shutil.which("cc") is None, reason="needs Linux and a C compiler")
def test_a_malloc_replaced_by_ld_preload_is_left_alone_without_jemalloc(tmp_path: Path) -> None:
    """``tests/test_allocator.py`` checks a replaced ``malloc`` with jemalloc, where installed; here
    a four-function ``malloc`` of our own, preloaded, stands in for it: not applied, and says why."""
    source, library = tmp_path / "shim.c", tmp_path / "libshim.so"
    source.write_text(SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True, capture_output=True)
    # the module alone (ctypes and the standard library), without importing torch in the child
    code = (
        "import importlib.util, sys; spec = importlib.util.spec_from_file_location('allocator', sys.argv[1]); "
        "a = sys.modules['allocator'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(a); "
        "t = a.tune_allocator(); print(t.applied, '|', t.reason)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, allocator.__file__],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "LD_PRELOAD": str(library)},
    )
    applied, reason = out.stdout.strip().splitlines()[-1].split(" | ")
    assert applied == "False" and "not glibc's" in reason
