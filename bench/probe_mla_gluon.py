"""The Gluon MLA decode path (kernels/mla_decode_gluon.py, kernels.mla_decode's GLUON_MLA) against the Triton kernel
(its first GPU run: bench/results/probe_mla_gluon.log): each shape through ``mla_decode`` with the flag on and off, both checked against ``mla_decode_ref``
(fp32, where it fits) and timed from CUDA graphs in the same run. bench/mla_decode.py's V3 shapes (C=512, R=64),
bf16, causal; rows = s_q * H of 16 and 32 take the narrow (transposed) kernel, multiples of 64 the wide one.

    python3 bench/probe_mla_gluon.py            # an sm_90 GPU with Triton 3.6's Gluon: ~3 min

TFLOP/s and the fraction of the copy rate are counted as bench/mla_decode.py counts them (FlashMLA's way).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, graph_ms, matmul_tflops, metadata
from minids.kernels import mla_decode as mod
from minids.kernels import mla_decode_gluon

from minids.attention import mla_decode_ref

CASES = [  # (B, H, mean length, s_q, variable lengths): small checks first, then bench/mla_decode.py's shapes
    (2, 16, 200, 1, True), (4, 16, 1000, 2, True), (2, 64, 200, 1, True), (4, 128, 1000, 2, True),
    (32, 16, 1024, 1, False), (32, 16, 1024, 2, False), (32, 16, 4096, 1, False), (128, 16, 4096, 1, False),
    (128, 16, 4096, 2, False), (128, 16, 16384, 1, False),
    (32, 128, 1024, 1, False), (32, 128, 4096, 1, False), (128, 128, 1024, 1, False), (128, 128, 4096, 1, False),
    (32, 128, 4096, 2, False), (128, 128, 4096, 1, True), (32, 128, 16384, 1, False),
]


def main() -> None:
    if not mla_decode_gluon.HAVE_GLUON:
        sys.exit("probe_mla_gluon.py: no Gluon with Triton 3.6's API here (kernels/mla_decode_gluon.py)")
    torch.manual_seed(0)
    C, R = 512, 64
    print(metadata(), flush=True)
    copy = copy_bandwidth_gbs()
    print(f"bf16 matmul {matmul_tflops():.0f} TFLOP/s, copy {copy:.0f} GB/s", flush=True)
    default = mod.GLUON_MLA
    for B, H, L, s_q, var in CASES:
        T = -(-2 * L // 64) * 64 if var else L
        q = torch.randn(B, s_q, H, C + R, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(B, T, C + R, device="cuda", dtype=torch.bfloat16)
        if var:
            lens = torch.normal(float(L), L / 2, (B,)).clamp(s_q, 2 * L).round().to(torch.int32).cuda()
        else:
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        scale = (C + R) ** -0.5
        name = f"B={B} H={H} len={L}{'~' if var else ''} s_q={s_q}"
        res = {}
        for flag in (True, False):
            mod.GLUON_MLA = flag
            try:
                out, lse = mod.mla_decode(q, kv, lens, C, scale, causal=True)
                path = mod.LAST_LAUNCH["cfg"]
                ms = graph_ms(lambda q=q, kv=kv, lens=lens, sc=scale: mod.mla_decode(q, kv, lens, C, sc, causal=True))
                res[flag] = (out.float(), lse, ms, path)
            except Exception as e:  # noqa: BLE001 - a first run: report and go on
                print(f"{name} gluon={flag}: failed: {type(e).__name__}: {str(e)[:600]}", flush=True)
        mod.GLUON_MLA = default
        if True not in res:
            continue
        tokens = int(lens.sum())
        flop = 2 * s_q * tokens * H * (2 * C + R)
        nbytes = (tokens * (C + R) + B * s_q * H * (2 * C + R)) * 2
        line = f"{name}: "
        if B * L * H <= 32 * 4096 * 128:
            want, want_lse = mla_decode_ref(q.float(), kv.float(), lens, C, scale, causal=True)
            for flag, (out, lse, _, _) in res.items():
                err = ((out - want).norm() / want.norm()).item()
                fin = want_lse.isfinite()
                lerr = (lse[fin] - want_lse[fin]).abs().max().item()
                line += f"{'gluon' if flag else 'triton'} err {err:.1e} / lse {lerr:.1e}; "
        for flag, (_, _, ms, path) in res.items():
            line += (f"{'gluon' if flag else 'triton'} {ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s "
                     f"{nbytes / ms / 1e6 / copy:4.0%} of copy ({path}); ")
        print(line, flush=True)


if __name__ == "__main__":
    main()
