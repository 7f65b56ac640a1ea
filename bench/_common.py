"""Shared pieces of the GPU benchmarks (bench/rmsnorm.py, moe.py, fp8.py, mla_decode.py, decode.py): run metadata
(device, versions, date, the commit and the tracked files changed from it), the two hardware ceilings measured in
the same process, a median timer, a CUDA-graph timer, a kernel-time timer (torch.profiler), the Nsight Compute
bracket of the profile_*.py scripts, and the JSON + markdown writer (each file written whole beside its name, then
renamed over it).

Ceilings (the device tool's METHOD.md): bandwidth from a device-to-device copy of 2 GiB (bytes read + bytes written), compute from an
8192^3 bf16 torch.matmul. Both are timed with triton.testing.do_bench (CUDA events, median, warm-up first). A third, per
shape: ``read_floor_ms``, the fastest read of a given number of bytes in one launch (a streaming Triton kernel,
CUDA-graph timed like the kernels it is set against), which shows what fraction of the copy rate a call that small can
reach at all.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from minids.fileio import atomic_write_text as write_atomic  # (text, path): beside path, then renamed


def metadata() -> dict:
    import triton

    from minids.train import _git_sha

    sha = (_git_sha() or "")[:7]
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": sha,
        "git_changed": git_changed(),
    }


def git_changed(where: Path | None = None) -> str | None:
    """The tracked files that differ from HEAD in the checkout holding ``where`` (this file's, by default),
    space-separated ("" when none; None without git): git_sha alone names the commit the measured tree started from,
    not uncommitted changes to it."""
    try:
        res = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=where or Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return " ".join(res.stdout.split()) if res.returncode == 0 else None


def median_ms(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of fn() over CUDA events (triton.testing.do_bench, L2 not flushed: rotate inputs)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def kernel_ms(fn: Callable[[], object], reps: int = 30) -> dict[str, float]:
    """Milliseconds of GPU time per fn() call of each CUDA kernel it launched, by kernel name (torch.profiler),
    over reps calls after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] = per.get(ev.name, 0.0) + ev.time_range.elapsed_us() / reps / 1e3
    return per


def device_ms(fn: Callable[[], object], reps: int = 30) -> float:
    """Milliseconds of GPU kernel time per fn() call: the summed durations of the CUDA kernels it launched
    (torch.profiler), over reps calls after a warm-up. Unlike ``median_ms`` this leaves out host time (Python,
    autograd, launch gaps), so a short kernel's bandwidth is its own; compare both columns to see host overhead."""
    return sum(kernel_ms(fn, reps).values())


def graph_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() replayed from a CUDA graph: GPU time without the host's launch overhead. fn runs once
    first (compiled and autotuned before the capture)."""
    from triton.testing import do_bench_cudagraph

    fn()
    return float(do_bench_cudagraph(fn, rep=50, return_mode="median"))


def profile_calls(calls: dict[str, Callable[[], object]]) -> None:
    """Each call once (already warmed up and compiled) between cudaProfilerStart and Stop, in an NVTX range of its
    name: what Nsight Compute's --profile-from-start off captures."""
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(calls))


def copy_bandwidth_gbs(n_bytes: int = 2 << 30) -> float:
    """Device-to-device copy of n_bytes: (read + written) bytes / median time, in GB/s."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * n_bytes / ms / 1e6


@functools.cache
def _read_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def read_xor(X, OUT, n, BLOCK: tl.constexpr):
        """OUT[p] = the xor of X[p BLOCK .. p BLOCK + BLOCK) (int32; past n: 0): every byte read, one word written."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(OUT + tl.program_id(0), tl.xor_sum(tl.load(X + offs, mask=offs < n, other=0), 0))

    return read_xor


def read_xor(x: torch.Tensor, block: int = 4096, warps: int = 4) -> torch.Tensor:
    """The xor of each block of int32 x (1-D) by ``_read_kernel``: one program a block; returns (blocks,) int32."""
    out = torch.empty(-(-x.numel() // block), dtype=torch.int32, device=x.device)
    _read_kernel()[(out.numel(),)](x, out, x.numel(), BLOCK=block, num_warps=warps)
    return out


READ_CONFIGS = ((2048, 4), (4096, 4), (4096, 8), (8192, 8))  # (int32 words a program, warps)


def _rotating_read(bufs: list[torch.Tensor], block: int, warps: int) -> Callable[[], torch.Tensor]:
    state = {"i": 0}

    def fn() -> torch.Tensor:
        state["i"] += 1
        return read_xor(bufs[state["i"] % len(bufs)], block, warps)

    return fn


def read_floor_ms(n_bytes: int, l2_bytes: float = 256e6) -> tuple[float, str]:
    """The fastest of ``READ_CONFIGS`` reading n_bytes (rounded up to 4) in one launch of ``read_xor``, as a CUDA-graph
    replay (``graph_ms``), rotating among copies that together exceed l2_bytes as bench/mla_decode.py rotates its
    inputs: (milliseconds, "words a program / warps")."""
    words = -(-n_bytes // 4)
    copies = max(1, min(8, math.ceil(l2_bytes / max(n_bytes, 1))))
    bufs = [torch.randint(-(1 << 31), 1 << 31, (words,), dtype=torch.int32, device="cuda") for _ in range(copies)]
    best = (float("inf"), "")
    for block, warps in READ_CONFIGS:
        fn = _rotating_read(bufs, block, warps)
        for _ in range(copies):
            fn()
        best = min(best, (graph_ms(fn), f"{block}/{warps}"))
    bufs.clear()
    torch.cuda.empty_cache()
    return best


def matmul_tflops(n: int = 8192) -> float:
    """bf16 n^3 torch.matmul on random data: 2 n^3 / median time, in TFLOP/s."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    ms = median_ms(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def write_results(out: Path, name: str, meta: dict, rows: list[dict], columns: list[str], notes: str) -> str:
    """Write out/name.json and out/name.md; return the markdown table."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(json.dumps({**meta, "rows": rows}, indent=2), out / f"{name}.json")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    head = ", ".join(f"{k}: {v}" for k, v in meta.items() if not isinstance(v, (dict, list)))
    write_atomic(f"# {name}\n\n{head}\n\n{table}\n\n{notes}\n", out / f"{name}.md")
    return table
