"""Triton kernels run under the interpreter on machines without CUDA (TRITON_INTERPRET is read when a kernel
is defined, so it is set here, before any test module imports ``minids.kernels``)."""

import os

import pytest
import torch

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
