"""Memory of each training step: peak resident set per step and the allocator's heap.

Not a test. ``benchmarks/step_cost.py`` records one figure per method, the peak resident set
(``VmHWM``) of a child running two steps. This script follows a child step by step, to tell the
one-time work of the first step (the hooks engine's row check, the conv-path timing trials) from
the steady state, and live memory from what the allocator keeps:

- ``peak_mb``: the step's own peak resident set (``VmHWM``, reset before the step by writing ``5``
  to ``/proc/self/clear_refs``);
- ``peak_in_use_mb``: the largest bytes in use that a thread polling ``mallinfo2()`` every
  millisecond saw during the step (what is alive at the peak; ``peak_mb`` minus it is freed
  memory the allocator kept resident);
- ``heap_mb`` / ``in_use_mb``: glibc's ``mallinfo2()`` after the step, the bytes its arenas hold
  from the kernel and the bytes allocated in them (``null`` with another allocator). A heap that
  grows step after step with the same bytes in use is fragmentation: something small and
  long-lived sits between the step's large blocks.
- ``forward_faults`` / ``faults``: minor page faults (pages the kernel mapped and zeroed for the
  allocator) during the model's forward pass (from its forward pre-hook to its forward hook, the
  same span for SGD and GGN, whose closure calls the model) and during the whole step.

Each (model, method, allocator) runs in a fresh child process (``torch.set_num_threads(2)``,
``OMP_WAIT_POLICY=PASSIVE``), as in ``step_cost.py``, with the same models and allocators.

Usage::

    python benchmarks/step_memory.py --models fixup32 --methods sgd ggn_fast --allocators system tuned --steps 5
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import step_cost
import torch
from results_log import append_record

ROOT = Path(__file__).resolve().parent.parent


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def heap() -> tuple[float, float] | None:
    """glibc's ``(heap, in use)`` in MB (arenas plus mapped blocks), or ``None`` without glibc's malloc."""
    if "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return None
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.arena + info.hblkhd) / 2**20, (info.uordblks + info.hblkhd) / 2**20


class InUsePeak:
    """The largest glibc in-use figure (:func:`heap`) seen while the block runs, polled by a thread
    every ``interval`` seconds (torch kernels release the GIL). A lower bound on the true peak (a
    shorter one can fall between two polls); ``None`` without glibc's malloc."""

    def __init__(self, interval: float = 0.001):
        self.interval, self.peak_mb = interval, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            sample = heap()
            if sample is None:
                return
            self.peak_mb = max(self.peak_mb or 0.0, sample[1])
            time.sleep(self.interval)

    def __enter__(self) -> InUsePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(model_name: str, batch: int, method: str, steps: int) -> list[dict]:
    """In this process: ``steps`` steps of ``method``, one record per step."""
    model, x, y = step_cost.setup(model_name, batch)
    step, _ = step_cost.make_step(method, model, x, y)
    marks: dict[str, int] = {}
    model.register_forward_pre_hook(lambda *_: marks.__setitem__("forward_start", minor_faults()))
    model.register_forward_hook(lambda *_: marks.__setitem__("forward_end", minor_faults()))
    records = []
    for _ in range(steps):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current resident set
        start = minor_faults()
        with InUsePeak() as live:
            step()
        heap_mb, in_use_mb = heap() or (None, None)
        records.append(
            {
                "peak_mb": step_cost.high_water_kb() / 1024,
                "peak_in_use_mb": live.peak_mb,
                "heap_mb": heap_mb,
                "in_use_mb": in_use_mb,
                "forward_faults": marks["forward_end"] - marks["forward_start"],
                "faults": minor_faults() - start,
            }
        )
    return records


def minor_faults() -> int:
    """Minor page faults of this process so far (all threads)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["fixup32"], choices=list(step_cost.MODELS))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["sgd", "ggn_fast"], choices=["sgd", "adam", "ggn_fast"])
    p.add_argument("--allocators", nargs="+", default=["system", "tuned"], choices=step_cost.ALLOCATORS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--label", default="", help="recorded with each run, e.g. the commit measured")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_memory.json")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "METHOD", "ALLOCATOR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model_name, method, allocator = args.child
        step_cost.apply_allocator(allocator)
        torch.set_num_threads(2)
        print(json.dumps(measure(model_name, args.batch, method, args.steps)))
        return
    for model_name in args.models:
        for allocator in args.allocators:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--batch", str(args.batch), "--steps", str(args.steps)]
                cmd += ["--child", model_name, method, allocator]
                env = step_cost.allocator_env(allocator, "PASSIVE")
                load = os.getloadavg()
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
                steps = json.loads(out.strip().splitlines()[-1])
                append_record(
                    args.out,
                    {
                        "model": model_name,
                        "batch": args.batch,
                        "method": method,
                        "allocator": allocator,
                        "label": args.label,
                        "started": datetime.datetime.now(datetime.UTC).isoformat(),
                        "load_average": load,
                        "torch": torch.__version__,
                        "steps": steps,
                    },
                )
                peaks = " ".join(f"{s['peak_mb']:.0f}" for s in steps)
                live = " ".join("-" if s["peak_in_use_mb"] is None else f"{s['peak_in_use_mb']:.0f}" for s in steps)
                heaps = " ".join("-" if s["heap_mb"] is None else f"{s['heap_mb']:.0f}" for s in steps)
                faults = " ".join(f"{s['forward_faults']}/{s['faults']}" for s in steps)
                print(
                    f"{model_name} b={args.batch} {method} [{allocator}, load {load[0]:.1f}]: peak MB per step {peaks}; "
                    f"in use at peak {live}; heap MB {heaps}; faults forward/step {faults}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
