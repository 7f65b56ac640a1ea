"""Triton kernels run under the interpreter on machines without CUDA (TRITON_INTERPRET is read when a kernel
is defined, so it is set here, before any test module imports ``minids.kernels``)."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# `python -m pytest` puts the checkout's root first on sys.path, and there kernels/ (installed as minids.kernels) would
# stand in for the top-level package of that name: Hugging Face's `kernels`, which transformers >= 5.25 requires and
# imports. Where minids is installed the root goes; a source tree run from PYTHONPATH (bench/device_env.sh) keeps it.
_ROOT, _PATH = Path(__file__).resolve().parents[1], list(sys.path)
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]
if importlib.util.find_spec("minids") is None:
    sys.path[:] = _PATH

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# kernels with an autotuner take one heuristic config per shape in tests (the benchmarks tune)
os.environ.setdefault("MINIDS_AUTOTUNE", "0")


@pytest.fixture
def nan_poison():
    """torch.empty returns NaN-filled memory while a test runs (torch.utils.deterministic.fill_uninitialized_memory),
    so an output element a kernel never writes stays NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(was)
    torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def launch_spy(monkeypatch):
    """spy(owner, name) replaces the Triton kernel ``owner.name`` for the test with a wrapper that launches the real
    kernel unchanged and records the keyword arguments of each ``kernel[grid](...)`` launch; returns that list. It shows which variant a
    launch took when the variants give the same values (a test of the values alone cannot)."""
    def spy(owner, name: str) -> list[dict]:
        kernel, calls = getattr(owner, name), []

        class Spy:
            def __getattr__(self, attr):  # everything but kernel[grid](...) goes to the kernel (an autotuner's run)
                return getattr(kernel, attr)

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    calls.append(kwargs)
                    return kernel[grid](*args, **kwargs)
                return launch

        monkeypatch.setattr(owner, name, Spy())
        return calls
    return spy
