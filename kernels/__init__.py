"""minids' Triton kernels, installed as ``minids.kernels`` (the top-level name ``kernels`` belongs to a PyPI package).

Each kernel mirrors a pure-PyTorch reference in ``minids`` with the same signature; the reference is the
spec and the tests compare the two on fresh random inputs (on the CPU under ``TRITON_INTERPRET=1``).
The library calls a kernel only where it runs: CUDA tensors with Triton installed, or the interpreter.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # Triton is optional: the references run everywhere
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# MINIDS_AUTOTUNE=0: every kernel takes its heuristic (or first) config instead of autotuning per shape (the tests
# set it: autotuning each small test shape would cost minutes)
AUTOTUNE = os.environ.get("MINIDS_AUTOTUNE", "1") != "0"


@functools.cache
def sm_count(device_index: int | None) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the property query is slow for a per-launch call)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def runs_here(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can take tensor ``t``: CUDA with Triton, or any device under the interpreter."""
    return HAVE_TRITON and (t.is_cuda or INTERPRET)
