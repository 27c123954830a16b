"""Brute-force float64 references built on ``torch.func.jacrev`` (the ground truth of the tests)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from gramnewton.lab.models import get_model

# Where the engine's float64 checks run (``test_hooks_engine``): the CPU, or a GPU when
# ``GRAMNEWTON_TEST_DEVICE=cuda`` (benchmarks/cuda_check.sh runs them so on a lent GPU machine).
DEVICE = torch.device(os.environ.get("GRAMNEWTON_TEST_DEVICE", "cpu"))
# The default device of the other numerics tests: unset, the CPU and nothing changes; with
# ``GRAMNEWTON_TEST_DEFAULT_DEVICE=cuda`` tests/conftest.py makes it torch's default device for the
# session, so every tensor and module a test makes without a device is on the GPU.
DEFAULT_DEVICE = torch.device(os.environ.get("GRAMNEWTON_TEST_DEFAULT_DEVICE", "cpu"))


def cpu_only(reason: str) -> pytest.MarkDecorator:
    """Skips a test that is about the CPU by nature (CPU autocast, a CPU-only path, a packed
    sequence's CPU lengths) when the tests run on another default device."""
    return pytest.mark.skipif(DEFAULT_DEVICE.type != "cpu", reason=f"CPU only: {reason}")


def seeded(seed: int) -> torch.Generator:
    """A generator seeded with ``seed`` on torch's default device (a CPU generator cannot draw
    tensors made on a GPU default device); on the CPU the stream of ``torch.Generator()``."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """``(b*k, m)`` Jacobian of ``model(x)`` flattened sample-major, columns in ``model.parameters()`` order."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])

    def outputs(*ps: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, ps)), (x,)).reshape(-1)

    with torch.backends.cudnn.flags(enabled=False):  # cuDNN's RNN refuses functorch's tensors
        jac = jacrev(outputs, argnums=tuple(range(len(params))))(*params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)


def autograd_rows(params: list[Tensor], closure: Callable[[], Tensor]) -> Tensor:
    """``(b*k, m)``: row ``r`` is the gradient of residual ``r`` of ``closure()`` (sample-major) for
    ``params``, one autograd pass each (zero columns for a parameter it does not reach)."""
    residuals = closure().reshape(-1)
    rows = []
    for r in range(residuals.numel()):
        grads = torch.autograd.grad(residuals[r], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)


def dense_step(model: nn.Module, x: Tensor, y: Tensor, lam: float, alpha: float) -> Tensor:
    """Eq. 11 by the explicit formula: ``-J^T (lam J J^T + alpha I)^{-1} (f - y)``, flat ``(m,)``."""
    jac = dense_jacobian(model, x)
    with torch.no_grad():
        r = (model(x) - y.reshape(x.shape[0], -1)).reshape(-1)
    mat = lam * jac @ jac.T + alpha * torch.eye(jac.shape[0], dtype=jac.dtype)
    return -jac.T @ torch.linalg.solve(mat, r)


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def assert_close(actual: Tensor, expected: Tensor, rtol: float, what: str) -> None:
    """Relative error in the max norm, printing the entries that differ most on failure."""
    actual, expected = actual.detach(), expected.detach()
    err = (actual - expected).abs()
    rel = float(err.max() / expected.abs().max().clamp_min(1e-300))
    if rel >= rtol:
        worst = torch.topk(err.reshape(-1), min(5, err.numel())).indices
        rows = "\n".join(
            f"  [{int(i)}] got {float(actual.reshape(-1)[i]):.17g} expected {float(expected.reshape(-1)[i]):.17g}"
            for i in worst
        )
        raise AssertionError(f"{what}: relative error {rel:.3g} >= {rtol:g}; largest differences:\n{rows}")


def assert_same_run(actual: Tensor, expected: Tensor, what: str = "two runs") -> None:
    """Two runs of one computation (a resumed and an uninterrupted run, a step and its twin's)
    agree bit for bit on the CPU. Off the CPU to 1e-9 relative in the max norm in float64 (1e-4
    in float32, 1e-2 (a few units in the last place) in half precision): cuBLAS and cuDNN may
    pick another kernel or add in another order (atomics) in the second run, so equal inputs
    need not give equal bits there; a lost or wrong state still differs by far more. Integers
    (counts) are compared exactly everywhere."""
    if actual.device.type == "cpu" or not expected.is_floating_point():
        assert torch.equal(actual, expected), what
    else:
        assert_close(actual, expected, {torch.float64: 1e-9, torch.float32: 1e-4}.get(expected.dtype, 1e-2), what)


def groupnorm_cnn(outputs: int = 2) -> nn.Module:
    """A small CNN with GroupNorm and a strided conv for ``(1, 6, 6)`` inputs, ``outputs`` outputs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.GroupNorm(4, 8),
        nn.Tanh(),
        nn.Conv2d(8, 4, 3, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, outputs),
    )


def perturbed_fixup() -> nn.Module:
    """ResNet-8-Fixup for one input channel, perturbed so that every Jacobian block is non-zero
    (Fixup zero-initialises its branches and head)."""
    model = get_model("resnet8_fixup", in_channels=1, num_outputs=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model
