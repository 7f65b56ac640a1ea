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
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # Triton is optional: the references run everywhere
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def grouped_order(pid, n_pid_m, n_pid_n, GROUP_M: tl.constexpr):
        """(pid_m, pid_n) of a GEMM tile in grouped order: GROUP_M row tiles sweep the column tiles together, so the
        operand tiles they share (a weight's columns, an expert's weights) stay in L2 between them."""
        width = GROUP_M * n_pid_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(n_pid_m - first_m, GROUP_M)
        return first_m + (pid % width) % size_m, (pid % width) // size_m

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


def require_runs_here(t: torch.Tensor, what: str, instead: str) -> None:
    """One clear line where a kernel wrapper is called where it cannot run (no Triton, or a CPU tensor without the
    interpreter), naming the torch function to use instead."""
    if not HAVE_TRITON:
        raise ValueError(f"{what} needs Triton installed; use {instead}")
    if not runs_here(t):
        raise ValueError(f"{what} needs CUDA tensors, or TRITON_INTERPRET=1 on the CPU; use {instead}")


# Arrival counters of the kernels that combine partial results in a fixed order inside one launch (the last program
# to arrive does the final sum: MLA decoding's split sequences, RMSNorm's dweight sum). (owner, device) -> buffers,
# the last one current. Each last arriver zeroes its own counter, so a buffer is zero between launches and every
# call reuses it; launches of one owner must not overlap on two streams of a device.
COUNTER_BUFFERS: dict[tuple[str, torch.device], list[torch.Tensor]] = {}


def arrival_counters(owner: str, device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed int32 counters for a launch of ``owner``'s kernel on ``device``.

    A call that needs more gets a fresh zeroed buffer; old ones are kept, since a captured CUDA graph may still
    use them. A buffer first made inside a graph capture is not kept: its zeroing is part of the graph (it runs at
    each replay) and never ran eagerly, so a later eager call must not read it."""
    bufs = COUNTER_BUFFERS.setdefault((owner, device), [])
    if bufs and bufs[-1].numel() >= n:
        return bufs[-1]
    buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        bufs.append(buf)
    return buf

