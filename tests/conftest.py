import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config: pytest.Config) -> None:
    """With ``GRAMNEWTON_TEST_DEFAULT_DEVICE`` set (e.g. ``cuda``, by benchmarks/cuda_check.sh), it
    is torch's default device for the whole session; unset, nothing changes."""
    if "GRAMNEWTON_TEST_DEFAULT_DEVICE" in os.environ:
        from dense import DEFAULT_DEVICE

        torch.set_default_device(DEFAULT_DEVICE)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed every test; one intra-op thread, since the tests' tensors are tiny and on a shared
    machine OpenMP threads that wait for each other make them up to 100x slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_conv_path_choice(monkeypatch: pytest.MonkeyPatch):
    """A fresh per-layer choice of the convolution path for every test: the process-wide one
    counts each layer shape's uses across tests and may switch paths at its re-check (the 9th
    use), so a test comparing two engines bit for bit would see one step on each side of a
    switch depending on which tests ran before it."""
    from gramnewton.engines import handlers

    monkeypatch.setattr(handlers, "CONV_WEIGHT_PATHS", handlers.MeasuredChoice())
