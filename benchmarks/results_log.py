"""The benchmarks' result files: a JSON list per file, one record appended per run, each stamped
with the machine it ran on (:func:`host`)."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch

from gramnewton.lab.files import write_atomically

# CPU features that change which kernels torch runs (AVX-512, bfloat16 and AMX tiles)
NOTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def host() -> dict[str, Any]:
    """The machine a measurement ran on: CPU model and noted flags (``/proc/cpuinfo``), the CPUs
    this process may use, torch's version and this process's intra-op threads.

    The development machines of this project have changed CPU between sessions (AMD EPYC, later
    an Intel Xeon with AMX), with the same 2 cores: a timing or ratio is comparable with another
    only on the same CPU, so every record carries it.
    """
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():  # the first processor's block: "key : value" lines
        for line in cpuinfo.read_text().split("\n\n", 1)[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in NOTED_FLAGS if f in flags],
        "cpus": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON list of records in ``path`` (none if the file does not exist yet)."""
    return json.loads(path.read_text()) if path.exists() else []


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to the JSON list in ``path`` (created, with its folder, if missing), with
    a ``host`` entry (:func:`host`) unless it has one.

    The list is written to a temporary file that then replaces ``path``: writing ``path`` in place
    truncated it first, so a write that failed (a full disk, an interrupt) lost every earlier record.
    """
    records = read_records(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([*records, {**record, "host": record.get("host", host())}], indent=1)
    write_atomically(path, lambda tmp: tmp.write_text(text))
