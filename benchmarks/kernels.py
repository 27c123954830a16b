"""Kernel choices of the optimizer step, timed in isolation: the symmetric Gram update, the
orientation of a factorised ``J^T v`` product, the mirror of the Gram and the finiteness checks.

Not a test. ``torch.set_num_threads(2)``, ``OMP_WAIT_POLICY=PASSIVE`` (set before torch starts;
``OMP_WAIT_POLICY=unset`` in the environment runs with libgomp's default instead, what a user has),
variants interleaved round by round, medians; the load average and the policy are recorded.

- Gram update ``G += J J^T`` of one layer, ``J`` of shape ``(128, K)`` for the per-sample gradient
  widths of ResNet-32's three stages: ``full`` (one product), ``halves`` (what
  ``handlers.add_gram_lower`` does where ``handlers.halves_pay``: ``G[:h,:h] += J1 J1^T`` and
  ``G[h:,:] += J2 J^T``, 3/4 of the multiply-adds), and ``recursive-d`` (the off-diagonal block
  once, the two diagonal blocks recursively to depth ``d``: 5/8 of the multiply-adds at depth 2,
  9/16 at depth 3); and ``full`` against ``halves`` over a grid of ``(n, K)``, 32-256 rows and
  16-16384 columns (the sizes of small networks' layers, where ``halves_pay`` draws its line).
- ``Factored.jt_times``' product ``sum_rows g_r a_r^T`` as ``g^T a`` or as ``(a^T g)^T`` (the
  longer side as the columns of the product), for the two-layer net's factors.
- Mirror of the Gram after the symmetric update: from the lower triangle (``tril`` twice, an
  add and a copy, what the engine did before perf4) or the one block the update leaves out
  (``handlers.mirror_lower``: ``G[:h, h:] = G[h:, :h]^T``).
- Finiteness check of a tensor: ``isfinite(t).all()`` (five kernels), ``solve.all_finite`` (one
  sum; the elementwise check only when the sum is not finite) and the float64 norm the step's
  diagnostics need anyway (``vector_norm(t, dtype=float64)``), for the two-layer net's direction
  ``(4096, 10)`` and a ResNet's ``(64, 64, 3, 3)``, and for ``(32, 1)`` residuals.
- The padded channels-last input of the conv patch view (``handlers.padded_channels_last``):
  ``F.pad`` then a channels-last copy (what it did before gram8), or one copy into a zeroed
  channels-last buffer, at b = 128 for the inputs of the ResNets' patch-path layers (resnet8 at
  28x28: 64 x 7 x 7 and 32 x 14 x 14; ResNet-32 at 32x32: 64 x 8 x 8 and 32 x 16 x 16).
- The block sums of a factorised Gram part with ``S`` positions, ``(n*S, n*S) -> (n, n)``: over the
  ``(n, S, n, S)`` view's axes ``(1, 3)`` at once (what ``Factored`` did before the twentieth
  session) or one axis at a time, the contiguous one last, at n = 128 and S = 4, 9.
- The factorised Gram part of a 3x3 convolution on small maps, b = 128 (``Factored.add_gram_lower``
  as the handler builds it, the patches' im2col included): ``A A^T`` from the patches or from the
  input positions (``handlers.InputOverlap``), for resnet8's last-stage layers on 8x8 images
  (64 -> 64 at 2x2; 32 -> 64 with stride 2 from 4x4) and a 64 -> 64 layer at 3x3.

Usage::

    python benchmarks/kernels.py
    OMP_WAIT_POLICY=unset python benchmarks/kernels.py --out benchmarks/results/kernels_unset.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

if os.environ.get("OMP_WAIT_POLICY") == "unset":  # before torch starts OpenMP
    del os.environ["OMP_WAIT_POLICY"]
else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from results_log import append_record  # noqa: E402
from torch import Tensor  # noqa: E402

from gramnewton.engines import handlers  # noqa: E402
from gramnewton.engines.handlers import mirror_lower, padded_channels_last  # noqa: E402
from gramnewton.solve import all_finite  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def recursive(gram: Tensor, jac: Tensor, depth: int) -> None:
    """Lower triangle of ``gram += jac jac^T``: the off-diagonal block, then each diagonal block."""
    n = jac.shape[0]
    if depth == 0:
        gram.addmm_(jac, jac.T)
        return
    h = n // 2
    gram[h:, :h].addmm_(jac[h:], jac[:h].T)
    recursive(gram[:h, :h], jac[:h], depth - 1)
    recursive(gram[h:, h:], jac[h:], depth - 1)


def halves(gram: Tensor, jac: Tensor) -> None:
    h = jac.shape[0] // 2
    gram[:h, :h].addmm_(jac[:h], jac[:h].T)
    gram[h:].addmm_(jac[h:], jac.T)


def conv_gram_part(module: torch.nn.Conv2d, x: Tensor, g: Tensor, overlap: bool) -> Callable[[], object]:
    """``module``'s factorised weight piece (bias folded in) built and added to a Gram, with
    ``A A^T`` from the input positions (``overlap``) or from the patches."""
    gram = x.new_zeros(x.shape[0], x.shape[0])
    handler = handlers.handler_for(module)

    def run() -> None:
        chosen = handlers.factored_is_cheaper, handlers.overlap_is_cheaper
        handlers.factored_is_cheaper = lambda *a, **k: True
        handlers.overlap_is_cheaper = lambda *a, **k: overlap
        try:
            pieces = handler.contributions(module, x, g, frozenset({"weight", "bias"}))
        finally:
            handlers.factored_is_cheaper, handlers.overlap_is_cheaper = chosen
        pieces["weight"].add_gram_lower(gram)

    return run


def interleaved(variants: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each variant, the variants run in turn every round."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kernels.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    run = {"started": datetime.datetime.now(datetime.UTC).isoformat(), "load_average": os.getloadavg()}
    run["threads"], run["torch"] = torch.get_num_threads(), torch.__version__
    run["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "unset")
    run["gram_update_s"] = {}
    for width in (2304, 9216, 36864):  # 16-, 32- and 64-channel 3x3 convolutions
        jac, gram = torch.randn(128, width), torch.zeros(128, 128)
        variants = {
            "full": lambda: gram.addmm_(jac, jac.T),
            "halves": lambda: halves(gram, jac),
            **{f"recursive-{d}": lambda d=d: recursive(gram, jac, d) for d in (1, 2, 3)},
        }
        run["gram_update_s"][f"(128, {width})"] = interleaved(variants, args.rounds)
    for n in (32, 64, 128, 256):
        for width in (16, 256, 4096, 16384):
            jac, gram = torch.randn(n, width), torch.zeros(n, n)
            variants = {"full": lambda: gram.addmm_(jac, jac.T), "halves": lambda: halves(gram, jac)}
            run["gram_update_s"][f"({n}, {width})"] = interleaved(variants, args.rounds * 5)
    run["jt_product_s"] = {}
    for rows, kin, kout in ((32, 10, 4096), (128, 10, 4096), (128, 4096, 10)):
        a, g = torch.randn(rows, kin), torch.randn(rows, kout)
        variants = {"g^T a": lambda: (g.T @ a).reshape(-1), "(a^T g)^T": lambda: (a.T @ g).T.reshape(-1)}
        run["jt_product_s"][f"rows {rows}, kin {kin}, kout {kout}"] = interleaved(variants, args.rounds)
    run["mirror_s"] = {}
    for n in (32, 128):
        gram = torch.randn(n, n)
        variants = {
            "tril": lambda gram=gram: gram.copy_(torch.tril(gram) + torch.tril(gram, -1).mT),
            "block": lambda gram=gram: mirror_lower(gram),
        }
        run["mirror_s"][f"({n}, {n})"] = interleaved(variants, args.rounds * 10)
    run["finite_check_s"] = {}
    for shape in ((4096, 10), (64, 64, 3, 3), (32, 1)):
        t = torch.randn(shape)
        variants = {
            "isfinite.all": lambda t=t: bool(torch.isfinite(t).all()),
            "all_finite": lambda t=t: all_finite(t),
            "float64 norm": lambda t=t: float(torch.linalg.vector_norm(t, dtype=torch.float64)),
        }
        run["finite_check_s"][str(shape)] = interleaved(variants, args.rounds * 10)
    run["padded_input_s"] = {}
    for shape in ((128, 64, 7, 7), (128, 32, 14, 14), (128, 64, 8, 8), (128, 32, 16, 16)):
        x = torch.randn(shape)
        variants = {
            "pad then channels-last": lambda x=x: F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last),
            "one copy": lambda x=x: padded_channels_last(x, (1, 1)),
        }
        run["padded_input_s"][str(shape)] = interleaved(variants, args.rounds * 5)
    run["block_sums_s"] = {}
    for positions in (4, 9):
        products = torch.randn(128 * positions, 128 * positions)
        variants = {
            "axes (1, 3)": lambda p=products, s=positions: p.view(128, s, 128, s).sum((1, 3)),
            "one axis at a time": lambda p=products, s=positions: (
                p.view(128, s, 128 * s).sum(1).view(128, 128, s).sum(2)
            ),
        }
        run["block_sums_s"][f"n 128, S {positions}"] = interleaved(variants, args.rounds * 5)
    run["conv_gram_part_s"] = {}
    for cin, cout, size, stride in ((64, 64, 2, 1), (32, 64, 4, 2), (64, 64, 3, 1)):
        module = torch.nn.Conv2d(cin, cout, 3, stride, padding=1)
        x = torch.randn(128, cin, size, size)
        g = torch.randn(128, cout, *module(x[:1]).shape[2:])
        variants = {
            "patches": conv_gram_part(module, x, g, overlap=False),
            "input positions": conv_gram_part(module, x, g, overlap=True),
        }
        run["conv_gram_part_s"][f"{cin}->{cout}, {size}x{size}, stride {stride}"] = interleaved(variants, args.rounds)
    run["load_average_after"] = os.getloadavg()
    append_record(args.out, run)
    print(f"load {run['load_average'][0]:.1f}, OMP_WAIT_POLICY {run['omp_wait_policy']}")
    sections = ("gram_update_s", "jt_product_s", "mirror_s", "finite_check_s", "padded_input_s")
    for section in (*sections, "block_sums_s", "conv_gram_part_s"):
        for case, seconds in run[section].items():
            print(f"{section} {case}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in seconds.items()))


if __name__ == "__main__":
    main()
