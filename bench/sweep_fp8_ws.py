"""Sweep of the warp-specialized Gluon FP8 GEMM (kernels/fp8_ws.py) on an sm_90 GPU: its error against the reference on
tail shapes, then TFLOP/s on DeepGEMM's shapes for its tile widths and schedules, beside the Triton kernel's default
("base" / tma_s4 / m64 as ``_auto_variant`` picks) and block-wise torch._scaled_mm, in the same run.

    python3 bench/sweep_fp8_ws.py --out bench/results      # the H200: about 40 s
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8 as bench_fp8
from _common import graph_ms, median_ms, metadata, write_results
from minids.kernels import fp8 as kfp8
from minids.kernels import fp8_ws

import minids.fp8 as ref

# name, block_n, persistent, split, stages (None: the kernel's default)
VARIANTS = [("ws256p", 256, True, 1, None), ("ws128p", 128, True, 1, None), ("ws192p", 192, True, 1, None),
            ("ws192p-s3", 192, True, 1, 3), ("ws128p-k2", 128, True, 2, None), ("ws128p-k2s5", 128, True, 2, 5),
            ("ws128p-k3s5", 128, True, 3, 5), ("ws256p-k2", 256, True, 2, None)]
SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--m", default="128,4096")
    p.add_argument("--stem", default="fp8_gemm_ws-sweep", help="results file name (without extension)")
    args = p.parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    for M, N, K in [(4097, 384, 512), (7, 256, 384), (130, 2112, 208), (200, 136, 256), (129, 640, 1024), (128, 2112, 7168), (300, 136, 384), (4096, 7168, 2048)]:
        a, a_s = kfp8.act_quant(torch.randn(M, K, device=dev, dtype=torch.bfloat16))
        b, b_s = kfp8.weight_quant(torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.05)
        want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
        scale = want.abs().max().item()
        for name, bn, pers, split, stages in VARIANTS:
            got = fp8_ws.fp8_gemm_ws(a, a_s, b, b_s, block_n=bn, persistent=pers, split=split, stages=stages).float()
            err = ((got - want).abs().max() / scale).item()
            print(f"check {M}x{N}x{K} {name}: max err {err:.2e} of max |C|  {'OK' if err <= 2**-8 else 'FAIL'}",
                  flush=True)
    rows = []
    for M in [int(m) for m in args.m.split(",")]:
        for N, K in SHAPES_NK:
            a, a_s = kfp8.act_quant(torch.randn(M, K, device=dev, dtype=torch.bfloat16))
            b, b_s = kfp8.weight_quant(torch.randn(N, K, device=dev, dtype=torch.bfloat16) * 0.05)
            flop = 2 * M * N * K
            small = M <= 256
            timed = graph_ms if small else (lambda f: median_ms(f, warmup_ms=10, rep_ms=60))
            row = {"M": M, "N": N, "K": K}
            triton_v = kfp8._auto_variant(M, K)  # the Triton kernel's own pick (fp8_gemm's "auto" may run ws)
            row["triton_auto"] = flop / timed(lambda a=a, a_s=a_s, b=b, b_s=b_s, v=triton_v: kfp8.fp8_gemm(
                a, a_s, b, b_s, variant=v)) / 1e9
            fn, _ = bench_fp8.blockwise_scaled_mm(a, a_s, b, b_s)
            row["scaled_mm"] = flop / timed(fn) / 1e9 if fn is not None else float("nan")
            want = kfp8.fp8_gemm(a, a_s, b, b_s, variant=triton_v).float()
            for name, bn, pers, split, stages in VARIANTS:
                kw = {"block_n": bn, "persistent": pers, "split": split, "stages": stages}
                try:
                    got = fp8_ws.fp8_gemm_ws(a, a_s, b, b_s, **kw).float()
                    row[f"{name}_err"] = ((got - want).abs().max() / want.abs().max()).item()
                    row[name] = flop / timed(lambda a=a, a_s=a_s, b=b, b_s=b_s, kw=kw: fp8_ws.fp8_gemm_ws(
                        a, a_s, b, b_s, **kw)) / 1e9
                except Exception as e:  # noqa: BLE001 - a probe: report and go on
                    print(f"{name} at {M}x{N}x{K}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    row[name] = float("nan")
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            rows.append(row)
    if args.out:
        cols = ["M", "N", "K", "triton_auto", "scaled_mm"] + [v[0] for v in VARIANTS] + [f"{v[0]}_err" for v in VARIANTS]
        write_results(Path(args.out), args.stem, metadata(), rows, cols,
                      "TFLOP/s = 2MNK / median time (M <= 256: CUDA-graph replay; else CUDA events, L2 flushed). "
                      "ws<width>p[-k<split>][s<stages>]: kernels/fp8_ws.py, persistent, tiles <width> columns wide (192: three 64-wide column blocks), K split in <split> ranges (float32 partials summed by a second kernel), <stages> stages (else the default); *_err: max |ws - triton| / max |triton|; triton_auto: the Triton kernel's own variant (kfp8._auto_variant).")


if __name__ == "__main__":
    main()
