"""Triton kernels run under the interpreter on machines without CUDA (TRITON_INTERPRET is read when a kernel
is defined, so it is set here, before any test module imports ``minids.kernels``)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# kernels with an autotuner take one heuristic config per shape in tests (the benchmarks tune)
os.environ.setdefault("MINIDS_AUTOTUNE", "0")
