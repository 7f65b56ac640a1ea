"""Hardware counters of the MLA decode kernels (``mla_decode``'s default path: the Gluon kernels on sm_90 with V3's
latent, ``GLUON_MLA``) on cases far from their targets in bench/results/mla_decode.md (chosen from the Triton sweep): V3's latent (C=512, R=64), bf16, causal, fixed lengths. Each case is called once to
compile and autotune it, then once between cudaProfilerStart and Stop, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section SchedulerStats python3 bench/profile_mla_decode.py
    python3 bench/profile_mla_decode.py --floor     # no profiler: time against cache length, B=32, H=16, s_q=1

--floor replays each call from a CUDA graph (bench/_common.graph_ms) for cache lengths 0 to 4096: the time at
length 0 is what a launch costs with no cache to read (the schedule, the exits), and the slope the cost per token.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from minids.kernels import mla_decode as mla_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, graph_ms, profile_calls

CASES = {  # (batch, heads, cache length, s_q): 0.29, 0.23 of copy and 167 TFLOP/s in mla_decode.md
    "B=32 H=16 len=1024 s_q=1": (32, 16, 1024, 1),
    "B=32 H=16 len=1024 s_q=2": (32, 16, 1024, 2),
    "B=128 H=128 len=1024 s_q=1": (128, 128, 1024, 1),
}


def floor() -> None:
    C, R, B, H = 512, 64, 32, 16
    copy = copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s; B={B} H={H} s_q=1, C={C} R={R}, bf16, graph-replayed")
    for T in (0, 64, 256, 1024, 4096):
        cap = max(T, 64)
        q = torch.randn(B, 1, H, C + R, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(B, cap, C + R, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        fn = lambda q=q, kv=kv, lens=lens: mla_mod.mla_decode(q, kv, lens, C, (C + R) ** -0.5)
        fn()
        us = graph_ms(fn) * 1e3
        nbytes = (B * T * (C + R) + B * H * (2 * C + R)) * 2
        print(f"len {T:5d}: {us:7.2f} us, {nbytes / us / 1e3:7.0f} GB/s ({nbytes / us / 1e3 / copy:.0%} of copy), "
              f"config {mla_mod.LAST_LAUNCH['cfg']}", flush=True)


def main() -> None:
    if "--floor" in sys.argv:
        return floor()
    C, R = 512, 64
    calls = {}
    for name, (B, H, T, s_q) in CASES.items():
        q = torch.randn(B, s_q, H, C + R, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(B, T, C + R, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        calls[name] = lambda q=q, kv=kv, lens=lens: mla_mod.mla_decode(q, kv, lens, C, (C + R) ** -0.5)
    for name, fn in calls.items():
        fn()
        launch = mla_mod.LAST_LAUNCH  # the Gluon path reports its grid, the Triton kernel its row block
        print(name, launch.get("grid", launch.get("block_m")), launch["cfg"], flush=True)
    profile_calls(calls)


if __name__ == "__main__":
    main()
