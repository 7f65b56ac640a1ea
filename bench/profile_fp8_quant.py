"""Hardware counters of the FP8 quantization kernels (8192 x 7168 bf16, the shape of bench/fp8.py's quant table):
each kernel once, after a warm-up call that compiles it, between cudaProfilerStart and Stop, for Nsight Compute.

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis python3 bench/profile_fp8_quant.py
"""

from __future__ import annotations

import torch
from _common import profile_calls
from minids.kernels import fp8 as kfp8


def main() -> None:
    x = torch.randn(8192, 7168, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(7168, 7168, dtype=torch.bfloat16, device="cuda")
    xq, xs = kfp8.act_quant(x)
    calls = {
        "act_quant": lambda: kfp8.act_quant(x),
        "act_quant_t": lambda: kfp8.act_quant_t(x),
        "act_quant_both": lambda: kfp8.act_quant_both(x),
        "act_quant_t from fp8": lambda: kfp8.act_quant_t(xq, in_scale=xs),
        "weight_quant (+transpose)": lambda: kfp8.weight_quant(w, transposed=True),
    }
    for fn in calls.values():
        fn()
    profile_calls(calls)


if __name__ == "__main__":
    main()
