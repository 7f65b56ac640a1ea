"""Sweep of the block-scaled FP8 GEMM's variants (minids.kernels.fp8.GEMM_VARIANTS) on DeepGEMM's shapes, side by side
with bf16 cuBLAS (torch.matmul) and block-scaled torch._scaled_mm: TFLOP/s per variant per shape, the best variant per
shape, and each result's error against the reference (minids.fp8.fp8_gemm).

    python3 bench/sweep_fp8_gemm.py --out bench/results     # the H200: under 150 s, Triton compilation included
    python3 bench/sweep_fp8_gemm.py --cpu-smoke             # here: every variant on two tiny shapes, interpreter
    python3 bench/sweep_fp8_gemm.py --wgrad                 # the FP8 linear's Wgrad GEMM: 1x128 scales on both operands

--wgrad times C (N, K) = dy^T x over 4096 tokens for each (N, K) of the shapes: both operands quantized 128x1 along the
tokens by act_quant_t, their scales token-block-major as it writes them (--rowmajor-scales: copied row-major, the
layout before; the kernel reads either).

Each variant runs with its fixed config (no autotuning: "base" is the heuristic config, as with MINIDS_AUTOTUNE=0).
Timing: median over CUDA events (_common.median_ms; L2 flushed before each call, so the host's launch overhead is
hidden behind the flush) at M > 256; at M <= 256, where the GEMM takes less time than the host's launch path, every
column is replayed from a CUDA graph (_common.graph_ms). A variant that fails to compile or run prints one line and
shows ERR; one whose error exceeds 2^-8 of max |C| (the GPU tests' bound) shows its TFLOP/s with a '!' and is never
the best.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
M_LIST = [64, 128, 4096]
SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
SMOKE_SHAPES = [(65, 200, 256), (300, 136, 384)]  # M <= 256 and M > 256 overrides, N and M tails
TOL = 2.0**-8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results; smoke: a temp dir)")
    p.add_argument("--variants", default="", help="comma-separated names (default: all of GEMM_VARIANTS)")
    p.add_argument("--budget", type=float, default=135.0, help="seconds; later timings are skipped past it")
    p.add_argument("--cpu-smoke", action="store_true", help="correctness only, tiny shapes, Triton's interpreter")
    p.add_argument("--wgrad", action="store_true", help="the Wgrad form (1x128 scales on both operands, K = tokens)")
    p.add_argument("--rowmajor-scales", action="store_true", help="--wgrad with the scales copied row-major")
    args = p.parse_args()
    if args.rowmajor_scales and not args.wgrad:
        p.error("--rowmajor-scales applies to --wgrad only")
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before minids.kernels is imported
    t_start = time.time()

    import torch

    sys.path.insert(0, str(HERE))
    from _common import copy_bandwidth_gbs, graph_ms, matmul_tflops, median_ms, metadata, write_results
    from minids.kernels import fp8 as kfp8

    import minids.fp8 as ref

    kfp8.AUTOTUNE = False  # "base" = the heuristic config; tuning every shape would not fit the budget
    spec = importlib.util.spec_from_file_location("bench_fp8", HERE / "fp8.py")
    bench_fp8 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_fp8)  # blockwise_scaled_mm (the form this torch accepts), fp8_scaled_mm_tflops

    variants = [v for v in args.variants.split(",") if v] or list(kfp8.GEMM_VARIANTS)
    unknown = set(variants) - set(kfp8.GEMM_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {list(kfp8.GEMM_VARIANTS)}")
    gpu = torch.cuda.is_available() and not args.cpu_smoke
    dev = "cuda" if gpu else "cpu"
    meta = metadata()
    if gpu:
        meta.update({"copy_GB/s": copy_bandwidth_gbs(), "bf16_matmul_TFLOPs": matmul_tflops(),
                     "fp8_scaled_mm_8192_TFLOPs": bench_fp8.fp8_scaled_mm_tflops()})
    if args.wgrad:  # (M, N, K) = (out features, in features, tokens)
        shapes = [(N, K, 4096) for N, K in SHAPES_NK] if gpu else [(200, 136, 384), (300, 64, 256)]
    else:
        shapes = [(M, N, K) for M in M_LIST for N, K in SHAPES_NK] if gpu else SMOKE_SHAPES
    sms = kfp8._sm_count(0) if gpu else kfp8._INTERPRET_SMS
    out_dtype = torch.bfloat16 if gpu else torch.float32  # the interpreter's bf16 stores do not round to nearest

    def timed(fn, graph: bool = False) -> float:
        """Milliseconds of one call: the CUDA-event median on the GPU (short runs: many variants), replayed from a
        CUDA graph where ``graph`` (M <= 256: per-call times there are the host's launch overhead); wall time here."""
        if gpu:
            return graph_ms(fn) if graph else median_ms(fn, warmup_ms=10, rep_ms=40)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    rows, failed, broken, skipped = [], [], {}, 0
    for M, N, K in shapes:
        g = torch.Generator(device=dev).manual_seed(M + N + K)
        a_hp = torch.randn(M, K, device=dev, generator=g)
        b_hp = torch.randn(N, K, device=dev, generator=g) * 0.05
        if args.wgrad:  # a^T (tokens, M) and b^T (tokens, N) quantized along the tokens: a (M, K), b (N, K)
            a_hp, b_hp = (a_hp.bfloat16(), b_hp.bfloat16()) if gpu else (a_hp, b_hp)
            (a, a_s), (b, b_s) = kfp8.act_quant_t(a_hp.t().contiguous()), kfp8.act_quant_t(b_hp.t().contiguous())
            if args.rowmajor_scales:
                a_s, b_s = a_s.contiguous(), b_s.contiguous()
        elif gpu:
            a_hp, b_hp = a_hp.bfloat16(), b_hp.bfloat16()
            (a, a_s), (b, b_s) = kfp8.act_quant(a_hp), kfp8.weight_quant(b_hp)
        else:
            (a, a_s), (b, b_s) = ref.act_quant(a_hp), ref.weight_quant(b_hp)
        want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
        want_max = want.abs().max().item()
        flop = 2 * M * N * K
        small = M <= 256 and not args.wgrad  # timed from CUDA graphs (see timed)
        row = {"M": M, "N": N, "K": K, "errors": {}, "configs": {}}
        row["bf16"] = flop / timed(lambda a_hp=a_hp, b_hp=b_hp: a_hp @ b_hp.t(), small) / 1e9
        if gpu:
            fn, label = bench_fp8.blockwise_scaled_mm(a, a_s, b, b_s)
            row["scaled_mm_form"] = label[:160]
            row["scaled_mm"] = flop / timed(fn, small) / 1e9 if fn is not None else float("nan")
        else:
            row["scaled_mm"] = float("nan")
        for v in variants:
            plan = kfp8._variant_plan(v, M, N, math.ceil(K / 128), sms)
            if plan is None:  # this variant has no config for this M
                continue
            cfg, split = plan
            row["configs"][v] = {**cfg, "split": split}
            if v in broken:
                row[v] = float("nan")
                continue
            if time.time() - t_start > args.budget:
                skipped += 1
                continue

            def call(v=v, a=a, a_s=a_s, b=b, b_s=b_s):
                return kfp8.fp8_gemm(a, a_s, b, b_s, out_dtype, variant=v)
            try:
                got = call().float()
                err = ((got - want).abs().max() / want_max).item()
                row[f"{v}_err"] = err
                if not err <= TOL:  # NaN fails too
                    failed.append(f"{v}@{M}x{N}x{K}:{err:.1e}")
                row[v] = flop / timed(call, small) / 1e9
            except Exception as e:  # noqa: BLE001  one variant that does not compile must not end the sweep
                broken[v] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:110] if str(e).strip() else ''}"
                print(f"!! {v} at {M}x{N}x{K} failed: {broken[v]}", flush=True)
                row[v] = float("nan")
        ok = {v: row[v] for v in variants if v in row and not math.isnan(row[v]) and row.get(f"{v}_err", 1) <= TOL}
        if ok:
            best = max(ok, key=ok.get)
            row.update({"best": best, "best_TFLOPs": ok[best], "best_vs_bf16": ok[best] / row["bf16"],
                        "best_vs_scaled_mm": ok[best] / row["scaled_mm"],
                        "base_vs_best": row.get("base", float("nan")) / ok[best]})
        row["max_err"] = max((row[f"{v}_err"] for v in variants if f"{v}_err" in row), default=float("nan"))
        rows.append(row)

    # ---- one compact table
    info = [f"{k}: {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in meta.items()]
    print("\nFP8 block-scaled GEMM sweep, TFLOP/s = 2MNK / median ms ('-': no config for this M, '!': wrong result)")
    print(", ".join(info[:5]))
    print("ceilings: " + (", ".join(info[5:]) or "none (CPU)"))
    widths = {v: max(5, len(v)) for v in variants}
    print(f"{'M':>5} {'N':>6} {'K':>6} {'bf16':>5} {'smm':>5} |" + "".join(f" {v:>{widths[v]}}" for v in variants)
          + f" | {'best':<10} {'TF':>5} {'xbf16':>5} {'xsmm':>5} {'maxerr':>7}")

    def cell(r, v):
        if v not in r.get("configs", {}):
            return "-"
        if v not in r:
            return "skip"
        x = r[v]
        if math.isnan(x):
            return "ERR"
        return f"{x:.0f}" + ("!" if not r.get(f"{v}_err", 1) <= TOL else "")

    for r in rows:
        best = (f"{r['best']:<10} {r['best_TFLOPs']:5.0f} {r['best_vs_bf16']:5.2f} {r['best_vs_scaled_mm']:5.2f}"
                if "best" in r else f"{'none':<10} {'':5} {'':5} {'':5}")
        print(f"{r['M']:5d} {r['N']:6d} {r['K']:6d} {r['bf16']:5.0f} {r['scaled_mm']:5.0f} |"
              + "".join(f" {cell(r, v):>{widths[v]}}" for v in variants) + f" | {best} {r['max_err']:7.1e}")
    wins = {}
    for r in rows:
        if "best" in r:
            wins.setdefault(r["best"], []).append(f"{r['M']}x{r['N']}x{r['K']}")
    print("best variant per shape, counts: " + ", ".join(f"{v} {len(s)}" for v, s in sorted(wins.items())))
    if gpu and not args.wgrad:
        head_row = next((r for r in rows if (r["M"], r["N"], r["K"]) == (4096, 7168, 16384)), None)
        if head_row is not None and "best" in head_row:
            print(f"target >= 900 TFLOP/s at 4096x7168x16384: best {head_row['best_TFLOPs']:.0f} ({head_row['best']})")
        big = [r for r in rows if r["M"] >= 4096 and "best" in r]
        small = [r for r in rows if r["M"] <= 128 and "best" in r]
        print(f"target never slower than bf16 at M >= 4096: best/bf16 min {min(r['best_vs_bf16'] for r in big):.2f}; "
              f"target faster than scaled_mm at M <= 128: best/smm min "
              f"{min(r['best_vs_scaled_mm'] for r in small):.2f}, "
              f"{sum(r['best_vs_scaled_mm'] > 1 for r in small)}/{len(small)} shapes")
    for v, msg in broken.items():
        print(f"ERR {v}: {msg}")
    if failed:
        print(f"!!! WRONG RESULTS (error > 2^-8 of max |C|): {' '.join(failed)[:600]}")
    if skipped:
        print(f"!! {skipped} timings skipped: past the --budget of {args.budget:.0f} s")
    out = args.out or (Path(tempfile.mkdtemp()) if args.cpu_smoke else HERE / "results")
    columns = ["M", "N", "K", "bf16", "scaled_mm", *variants, "best", "best_TFLOPs", "best_vs_bf16",
               "best_vs_scaled_mm", "base_vs_best", "max_err"]
    name = "fp8_gemm_sweep" + ("-wgrad" if args.wgrad else "") + ("-rowmajor" if args.rowmajor_scales else "")
    write_results(out, name + ("-cpu-smoke" if args.cpu_smoke else ""), meta, rows, columns,
                  "TFLOP/s = 2MNK / median ms (CUDA events, L2 flushed; M <= 256: replayed from CUDA graphs, "
                  "every column) of kfp8.fp8_gemm(variant=...) with each "
                  "variant's fixed config (kfp8.GEMM_VARIANTS; configs per row in the JSON); bf16: torch.matmul; "
                  "scaled_mm: block-wise torch._scaled_mm (row-wise where this torch has no block-wise form for these scales: "
                  "scaled_mm_form in the JSON). A variant absent for a shape has no config for that M.")
    print(f"wrote {out}/fp8_gemm_sweep*.json; {time.time() - t_start:.0f} s in all")
    if failed or broken:
        sys.exit(1)


if __name__ == "__main__":
    main()
