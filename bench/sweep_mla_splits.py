"""Sweep of the number of programs the Gluon MLA decode kernels split the work over (``mla_decode(num_splits=...)``;
the default is one per SM), on the V3 shapes where the kernels sit furthest below the issue's targets: short caches
(1K, 4K) at batch 32, and 1K at batch 128, fixed and ragged lengths, s_q 1 and 2, 16 and 128 heads.

    python3 bench/sweep_mla_splits.py --out bench/results        # the H200: about a minute

Each (shape, splits) is checked against the float32 reference (``mla_decode_ref``; max relative error of out
over rows, 0.02 allowed for bf16) and timed from a CUDA graph as bench/mla_decode.py times it; GB/s and TFLOP/s
are counted as there. Splits "default" is the kernels' own (one program per SM and row block).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, graph_ms, metadata, write_results
from minids.kernels.mla_decode import mla_decode
from mla_decode import lengths, make_inputs, rotating, work

from minids.attention import mla_decode_ref

TOL = 2e-2
SPLITS = (None, 99, 66, 44, 33)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stem", default="mla_decode-splits")
    args = ap.parse_args()
    copy_gbs = copy_bandwidth_gbs()
    C, R = 512, 64
    scale = (128 + 64) ** -0.5
    rows = []
    cases = [(32, 16, mean, var, s_q) for mean in (1024, 4096) for var in (False, True) for s_q in (1, 2)]
    cases += [(128, 16, 1024, var, s_q) for var in (False, True) for s_q in (1, 2)]
    cases += [(32, 128, 1024, var, 1) for var in (False, True)]
    for B, H, mean, var, s_q in cases:
        gen = torch.Generator().manual_seed(B * 7 + mean + s_q)
        lens = lengths(B, mean, var, s_q, gen)
        seqlens = lens.cuda()
        sets = make_inputs(B, s_q, H, C, R, lens, False, gen)
        q, kv, _ = sets[0]
        want = mla_decode_ref(q, kv, seqlens, C, scale, causal=True)[0].float()
        nbytes, flops = work(int(lens.sum()), B, s_q, H, C, R)
        name = f"V3 B={B} H={H} len={mean}{'~' if var else ''} s_q={s_q}"
        for splits in SPLITS:
            got = mla_decode(q, kv, seqlens, C, scale, causal=True, num_splits=splits)[0].float()
            err = ((got - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1e-6)).max().item()
            fn = rotating(sets, lambda q_, kv_, t_, s=splits, n=seqlens: mla_decode(
                q_, kv_, n, C, scale, causal=True, num_splits=s))
            for _ in range(len(sets) - 1):
                fn()
            ms = graph_ms(fn)
            gbs, tfl = nbytes / ms / 1e6, flops / ms / 1e9
            rows.append({"shape": name, "splits": "default" if splits is None else splits, "us": ms * 1e3,
                         "GBps": gbs, "frac_copy": gbs / copy_gbs, "TFLOPs": tfl, "err": err, "ok": err <= TOL})
            print(f"{name:34s} splits {rows[-1]['splits']!s:7s} {ms * 1e3:7.1f} us {gbs:6.0f} GB/s "
                  f"({gbs / copy_gbs:.0%}) {tfl:5.0f} TFLOP/s err {err:.1e}{'' if err <= TOL else ' FAIL'}",
                  flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.out:
        write_results(args.out, args.stem, {**metadata(), "copy_GBps": copy_gbs}, rows,
                      ["shape", "splits", "us", "GBps", "frac_copy", "TFLOPs", "err", "ok"],
                      "splits: num_splits of minids.kernels.mla_decode (programs per row block; default: one per "
                      "SM); us from a CUDA graph; bytes and FLOPs as bench/mla_decode.py counts them; err: max "
                      "relative error of out against the float32 reference over rows.")


if __name__ == "__main__":
    main()
