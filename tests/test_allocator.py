"""``gramnewton.tune_allocator``: opt-in, does what it says, import changes nothing.

Each case runs in a fresh interpreter (``mallopt`` is process-wide). Whether a large block is
mapped separately or taken from the heap is read from glibc's ``mallinfo2`` (``hblks``: blocks
served by ``mmap``), so the tests check malloc's behaviour, not only return values.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gramnewton import tune_allocator
from gramnewton.allocator import ENV_VAR

JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc")

# Allocates 100 MB after the given statement and reports whether glibc mapped it on its own.
PROBE = """
import ctypes, json, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
result = None
exec(sys.argv[1])
before = libc.mallinfo2().hblks
block = libc.malloc(100 << 20)
mapped = libc.mallinfo2().hblks > before
libc.free(ctypes.c_void_p(block))
print(json.dumps({"mapped": mapped, "result": result}))
"""


def probe(statement: str, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, statement],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


TUNE = "import gramnewton; t = gramnewton.tune_allocator(); result = [t.applied, t.reason, t.settings]"


@glibc_only
def test_import_changes_nothing() -> None:
    assert probe("pass")["mapped"]  # glibc's default: a 100 MB block gets its own mmap
    assert probe("import gramnewton, gramnewton.allocator")["mapped"]


@glibc_only
def test_tuning_keeps_large_blocks_in_the_heap() -> None:
    out = probe(TUNE)
    applied, reason, settings = out["result"]
    assert applied, reason
    assert settings["M_MMAP_THRESHOLD"] >= 1 << 30
    assert not out["mapped"]


@glibc_only
def test_environment_variable_turns_it_off() -> None:
    out = probe(TUNE, **{ENV_VAR: "0"})
    applied, reason, settings = out["result"]
    assert not applied and ENV_VAR in reason and settings == {}
    assert out["mapped"]


@pytest.mark.skipif(not JEMALLOC.exists(), reason="jemalloc not installed")
def test_replaced_malloc_is_left_alone() -> None:
    out = probe(TUNE, LD_PRELOAD=str(JEMALLOC))
    applied, reason, _ = out["result"]
    assert not applied and "not glibc's" in reason


def test_bad_values_are_refused() -> None:
    with pytest.raises(ValueError, match="M_TOP_PAD"):
        tune_allocator(top_pad=1 << 40)
    with pytest.raises(ValueError, match="M_MMAP_THRESHOLD"):
        tune_allocator(mmap_threshold=-1)
