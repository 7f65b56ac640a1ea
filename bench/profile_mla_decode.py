"""Hardware counters of the MLA decode kernel (kernels/mla_decode.py) on the cases furthest from their targets in
bench/results/mla_decode.md: V3's latent (C=512, R=64), bf16, causal, fixed lengths. Each case is called once to
compile and autotune it, then once between cudaProfilerStart and Stop, for Nsight Compute:

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section SchedulerStats python3 bench/profile_mla_decode.py
"""

from __future__ import annotations

import torch
from minids.kernels import mla_decode as mla_mod

CASES = {  # (batch, heads, cache length, s_q): 0.29, 0.23 of copy and 167 TFLOP/s in mla_decode.md
    "B=32 H=16 len=1024 s_q=1": (32, 16, 1024, 1),
    "B=32 H=16 len=1024 s_q=2": (32, 16, 1024, 2),
    "B=128 H=128 len=1024 s_q=1": (128, 128, 1024, 1),
}


def main() -> None:
    C, R = 512, 64
    calls = {}
    for name, (B, H, T, s_q) in CASES.items():
        q = torch.randn(B, s_q, H, C + R, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(B, T, C + R, device="cuda", dtype=torch.bfloat16)
        lens = torch.full((B,), T, dtype=torch.int32, device="cuda")
        calls[name] = lambda q=q, kv=kv, lens=lens: mla_mod.mla_decode(q, kv, lens, C, (C + R) ** -0.5)
    for name, fn in calls.items():
        fn()
        print(name, mla_mod.LAST_LAUNCH["block_m"], mla_mod.LAST_LAUNCH["cfg"], flush=True)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in calls.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("profiled:", ", ".join(calls))


if __name__ == "__main__":
    main()
