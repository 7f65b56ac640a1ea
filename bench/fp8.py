"""FP8 on the GPU: the Triton quantization kernels and block-scaled GEMM (minids.kernels.fp8), and the FP8 linear.

    python3 bench/fp8.py --out bench/results [--quick]

Measured in one process, side by side:
- ceilings: device-to-device copy (GB/s, bytes read + written), bf16 torch.matmul 8192^3, and a per-tensor-scaled
  FP8 torch._scaled_mm 8192^3 (TFLOP/s);
- quantization kernels (act_quant 1x128, act_quant_t 128x1 transposed, act_quant_both, weight_quant 128x128 with
  its transpose, weight_dequant) in both modes, exact (bit-exact) and fast (exact=False: native FP8 conversion),
  against the torch reference in minids.fp8: effective GB/s = bytes read + written; plus the fraction of FP8 values
  where fast and exact differ (one FP8 step each, expected ~1e-3 or less; 0 with UE8M0);
- ``tiles``: the fast mode's tile per program of the transposing kernels (kfp8._TILES: features, warps, packed
  stores) swept, each checked bit for bit against the default, to pick defaults;
- ``tma_quant``: the TMA-pipelined Gluon quantization that the transposing kernels run on sm_90
  (kernels/fp8_tma_quant.py), its configs swept against the Triton kernels, outputs compared bit for bit;
- the GEMM on DeepGEMM's shapes (M in 64, 128, 4096): minids' Triton kernel (autotuned, timed per call with CUDA
  events as everything else, and replayed from a CUDA graph, which leaves out the host's launch overhead that
  dominates at small M; and the heuristic config alone, as with MINIDS_AUTOTUNE=0), torch._scaled_mm with block-wise
  scales (1x128 activations, 128x128 weights; row-wise if this torch has no block-wise form), bf16 cuBLAS, and the
  reference (minids.fp8.fp8_gemm); the official kernel's figures quoted in the issue (measured on this project's
  H200 with torch 2.11, Triton 3.6) are listed for the ratio;
- ``plans``: at M = 64 and 128, every (BLOCK_N, split-K) the small-M heuristic (kfp8._gemm_plan) chooses from, timed
  from CUDA graphs, against its choice;
- the FP8 linear (``fp8: real``) forward + backward against bf16 F.linear and against the simulation (``sim``);
- ``linear_kernels``: that forward + backward's CUDA time per kernel, FP8 real beside bf16 (where the time goes);
- ``scales``: the weight-form GEMM reading a's 1x128 scales row-major against M-major;
- ``linear_gemms``: its three GEMMs one by one (Fprop, Dgrad, Wgrad): the Triton GEMM, block-scaled torch._scaled_mm
  where a layout works, bf16 cuBLAS on the same dimensions;
- ``host``: host microseconds per call of each wrapper and of the FP8 linear step (small shapes, so the host is the
  bottleneck), a bare Triton launch and torch's own calls beside them, and a cProfile of the linear step.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    copy_bandwidth_gbs, graph_ms, kernel_ms, matmul_tflops, median_ms, metadata, write_results,
)

import minids.fp8 as ref  # noqa: E402
from minids.kernels import fp8 as kfp8  # noqa: E402

SHAPES_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
# the official DeepSeek-V3 fp8_gemm on this project's H200 (the figures), TFLOP/s
OFFICIAL = {
    4096: {(2112, 7168): 532, (24576, 1536): 581, (7168, 16384): 609, (4096, 7168): 639, (7168, 2048): 615},
    128: {(2112, 7168): 162, (24576, 1536): 242, (7168, 16384): 384, (4096, 7168): 237, (7168, 2048): 81},
}


def fp8_scaled_mm_tflops(n: int = 8192) -> float:
    """Per-tensor-scaled FP8 cuBLAS (torch._scaled_mm) n^3: the FP8 ceiling of this run."""
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.tensor(1.0, device="cuda")
    ms = median_ms(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
    return 2 * n**3 / ms / 1e9


def blockwise_scaled_mm(a, a_s, b, b_s):
    """torch._scaled_mm with DeepSeek's block-wise scales, in the first layout this torch accepts; returns (fn, label)
    or (None, reason). The result is checked against the reference before it is timed."""
    M, N = a.shape[0], b.shape[0]
    want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    tries = {
        "blockwise a_s M-major, b_s (N/128,K/128)": (a_s.t().contiguous().t(), b_s),
        "blockwise a_s M-major, b_s K-major": (a_s.t().contiguous().t(), b_s.t().contiguous().t()),
        "blockwise a_s M-major, b_s^T": (a_s.t().contiguous().t(), b_s.t()),
    }
    errors = []
    for label, (sa, sb) in tries.items():
        try:
            def fn(sa=sa, sb=sb):
                return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
            got = fn().float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            if err < 2e-2:
                return fn, label
            errors.append(f"{label}: wrong result ({err:.2e})")
        except (RuntimeError, ValueError, TypeError) as e:
            errors.append(f"{label}: {str(e).splitlines()[0][:120]}")
    # row-wise fallback: one scale per row of a and per column of b (not DeepSeek's recipe, timed for reference)
    try:
        sa = torch.ones(M, 1, device="cuda")
        sb = torch.ones(1, N, device="cuda")

        def fn():
            return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        fn()
        return fn, "row-wise (no block-wise form here: " + "; ".join(errors)[:300] + ")"
    except (RuntimeError, ValueError, TypeError) as e:
        return None, "; ".join(errors + [f"row-wise: {str(e).splitlines()[0][:120]}"])


def _quant_cases(x, w, xq, xs):
    """(name, kernel call taking exact=, reference call, bytes moved)."""
    M, K = x.shape
    nb_bytes = lambda m, k: 4 * m * math.ceil(k / 128)  # noqa: E731  float32 scales
    return [
        ("act_quant 1x128", lambda e: kfp8.act_quant(x, exact=e), lambda: ref.act_quant(x), 3 * M * K + nb_bytes(M, K)),
        ("act_quant_t 128x1", lambda e: kfp8.act_quant_t(x, exact=e), lambda: ref.act_quant_t(x),
         3 * M * K + nb_bytes(K, M)),
        ("act_quant_both", lambda e: kfp8.act_quant_both(x, exact=e), lambda: ref.act_quant_both(x),
         4 * M * K + nb_bytes(M, K) + nb_bytes(K, M)),
        ("act_quant_t from fp8 (Wgrad requant)", lambda e: kfp8.act_quant_t(xq, in_scale=xs, exact=e),
         lambda: ref.act_quant_t(xq, in_scale=xs), 2 * M * K + nb_bytes(M, K) + nb_bytes(K, M)),
        ("weight_quant 128x128 (+transpose)", lambda e: kfp8.weight_quant(w, transposed=True, exact=e),
         lambda: ref.weight_quant(w, transposed=True), 4 * w.numel()),
    ]


def _fp8_differ(a: tuple, b: tuple) -> float:
    """Fraction of the FP8 values that differ between two results (tuples of outputs)."""
    n = d = 0
    for u, v in zip(a, b):
        if u.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            d += (u.view(torch.uint8) != v.view(torch.uint8)).sum().item()
            n += u.numel()
    return d / n


def _tma_path(x: torch.Tensor) -> bool:
    """Whether the transposing quantizations of x run on the TMA-pipelined Gluon kernel (kernels/fp8_tma_quant.py)."""
    M, K = x.shape
    outs = (torch.empty(K, M, dtype=torch.float8_e4m3fn, device=x.device),)
    return kfp8._tma_quant(x, 128, kfp8._flags("e4m3", False, False), outs)


def bench_quant(rows: list, copy_gbs: float, quick: bool) -> None:
    M, K = 8192, 7168
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(7168, 16384 if not quick else 7168, dtype=torch.bfloat16, device="cuda")
    xq, xs = kfp8.act_quant(x)
    wq, ws = kfp8.weight_quant(w)
    tma = _tma_path(x)
    reg_act = kfp8._reg_quant(x, 128, kfp8._flags("e4m3", False, False))
    for name, kernel, slow, nbytes in _quant_cases(x, w, xq, xs):
        reg = reg_act and ("weight" not in name or kfp8.REG_QUANT_WEIGHT)
        shape = f"{M}x{K}" if "weight" not in name else f"{w.shape[0]}x{w.shape[1]}"
        # replayed from CUDA graphs: this host's Python takes 50-80 us a wrapper call (fp8_host.md), as long as
        # these kernels, so a per-call time measures the host as much as the kernel (per_call_GB/s)
        ms_exact, ms_fast = graph_ms(lambda: kernel(True)), graph_ms(lambda: kernel(False))
        ms_call = median_ms(lambda: kernel(False))
        # the calls a Gluon kernel may take (weight_quant's +W^T form: the register-layout one only)
        transposing = "act_quant_t" in name or "both" in name or ("weight" in name and reg)
        ms_triton = ms_fast
        if (tma or reg) and transposing:  # the Triton kernel of the same call, for the side-by-side
            flags = kfp8.TMA_QUANT, kfp8.REG_QUANT
            kfp8.TMA_QUANT = kfp8.REG_QUANT = False
            try:
                ms_triton = graph_ms(lambda: kernel(False))
            finally:
                kfp8.TMA_QUANT, kfp8.REG_QUANT = flags
        ms_ref = median_ms(slow)
        row = {"kernel": name, "shape": shape, "ms": ms_fast, "GB/s": nbytes / ms_fast / 1e6,
               "frac_copy": nbytes / ms_fast / 1e6 / copy_gbs, "per_call_GB/s": nbytes / ms_call / 1e6,
               "path": ("gluon-reg" if reg else "gluon-tma" if tma else "triton") if transposing else "triton",
               "triton_GB/s": nbytes / ms_triton / 1e6, "exact_ms": ms_exact,
               "exact_GB/s": nbytes / ms_exact / 1e6, "fast_differs": _fp8_differ(kernel(False), kernel(True)),
               "ref_ms": ms_ref, "ref_GB/s": nbytes / ms_ref / 1e6}
        rows.append(row)
        print(f"{name:40s} {shape:12s} fast {row['GB/s']:6.0f} GB/s ({row['frac_copy']:.0%} of copy, {row['path']}; "
              f"triton {row['triton_GB/s']:6.0f})  exact {row['exact_GB/s']:6.0f}  fast != exact "
              f"{row['fast_differs']:.1e}  reference {row['ref_GB/s']:6.0f} GB/s", flush=True)
    nbytes = 3 * w.numel()
    ms, ms_ref = graph_ms(lambda: kfp8.weight_dequant(wq, ws)), median_ms(lambda: ref.weight_dequant(wq, ws))
    rows.append({"kernel": "weight_dequant -> bf16", "shape": f"{w.shape[0]}x{w.shape[1]}", "ms": ms,
                 "GB/s": nbytes / ms / 1e6, "frac_copy": nbytes / ms / 1e6 / copy_gbs, "ref_ms": ms_ref,
                 "ref_GB/s": nbytes / ms_ref / 1e6})
    print(f"{'weight_dequant -> bf16':40s} {rows[-1]['shape']:12s} {rows[-1]['GB/s']:6.0f} GB/s", flush=True)


TILE_SWEEP = {  # kfp8._TILES key: the fast mode's (features per program, num_warps, pack) to try
    "act_quant_t": [(64, 4, False), (64, 4, True), (64, 8, True), (128, 4, True), (128, 8, True), (32, 4, True)],
    "act_quant_t_fp8": [(64, 4, False), (64, 4, True), (128, 4, True), (128, 8, True), (64, 2, True)],
    "act_quant_both": [(128, 4, False), (128, 4, True), (128, 8, True), (128, 8, False), (256, 8, True)],
    "weight_quant": [(128, 4, False), (128, 4, True), (128, 8, True), (256, 8, True)],
}


def _same_outputs(a: tuple, b: tuple) -> bool:
    """Whether two results (tuples of outputs) are bit-identical (FP8 values compared as bytes)."""
    def bits(t):
        return t.view(torch.uint8) if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else t
    return all(torch.equal(bits(u), bits(v)) for u, v in zip(a, b))


def bench_tiles(rows: list, copy_gbs: float) -> None:
    """The fast mode's tiles of the transposing kernels, one at a time (the default is restored after); each tile's
    outputs are compared bit for bit with the default's."""
    M, K = 8192, 7168
    x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(7168, 7168, dtype=torch.bfloat16, device="cuda")
    xq, xs = kfp8.act_quant(x)
    cases = {name: (kernel, nbytes) for name, kernel, _, nbytes in _quant_cases(x, w, xq, xs)}
    uses = {"act_quant_t": "act_quant_t 128x1", "act_quant_t_fp8": "act_quant_t from fp8 (Wgrad requant)",
            "act_quant_both": "act_quant_both", "weight_quant": "weight_quant 128x128 (+transpose)"}
    tma, kfp8.TMA_QUANT = kfp8.TMA_QUANT, False  # the Triton kernels' tiles (the Gluon kernel: section tma_quant)
    try:
        _sweep_tiles(rows, copy_gbs, cases, uses)
    finally:
        kfp8.TMA_QUANT = tma


def _sweep_tiles(rows: list, copy_gbs: float, cases: dict, uses: dict) -> None:
    for key, tiles in TILE_SWEEP.items():
        default = kfp8._TILES[key][False]
        kernel, nbytes = cases[uses[key]]
        want = tuple(t.clone() for t in kernel(False))
        try:
            for tile in tiles:
                kfp8._TILES[key][False] = tile
                same = _same_outputs(kernel(False), want)
                gbs = nbytes / median_ms(lambda: kernel(False)) / 1e6
                rows.append({"kernel": uses[key], "features": tile[0], "num_warps": tile[1], "pack": tile[2],
                             "GB/s": gbs, "frac_copy": gbs / copy_gbs, "same_as_default": same,
                             "default": tile == default})
                print(f"{uses[key]:40s} {tile[0]:4d} features {tile[1]:3d} warps pack {tile[2]!s:5} {gbs:6.0f} GB/s "
                      f"({gbs / copy_gbs:.0%} of copy) same bits {same}{'  (default)' if tile == default else ''}",
                      flush=True)
        finally:
            kfp8._TILES[key][False] = default


def bench_reg_quant(rows: list, copy_gbs: float) -> None:
    """The transposing quantizations on the Triton kernels against the register-layout Gluon kernel
    (kernels/fp8_reg_quant.py, kfp8.REG_QUANT) at its layouts (``SPECS``; bench/sweep_reg_quant.py sweeps them);
    outputs compared bit for bit."""
    from minids.kernels import fp8_reg_quant

    reg, tma, reg_w = kfp8.REG_QUANT, kfp8.TMA_QUANT, kfp8.REG_QUANT_WEIGHT
    kfp8.TMA_QUANT, kfp8.REG_QUANT_WEIGHT = False, True  # the weight form too (off by default)
    names = ("act_quant_t 128x1", "act_quant_both", "act_quant_t from fp8 (Wgrad requant)",
             "weight_quant 128x128 (+transpose)")
    try:
        for M, K in ((8192, 7168), (4096, 32768)):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            xq, xs = kfp8.act_quant(x)
            w = torch.randn(K, M, dtype=torch.bfloat16, device="cuda")  # a weight of the same size (O, I) = (K, M)
            cases = {name: (kernel, nbytes) for name, kernel, _, nbytes in _quant_cases(x, w, xq, xs)}
            for name, call in zip(names, ("t", "both", "requant", "weight")):
                kernel, nbytes = cases[name]
                kfp8.REG_QUANT = False
                want = tuple(t.clone() for t in kernel(False))
                for label, on in (("triton", False), (f"gluon-reg {fp8_reg_quant.SPECS[call]}", True)):
                    kfp8.REG_QUANT = on
                    same = _same_outputs(kernel(False), want)
                    gbs = nbytes / graph_ms(lambda: kernel(False)) / 1e6
                    rows.append({"kernel": name, "shape": f"{M}x{K}", "path": label, "GB/s": gbs,
                                 "frac_copy": gbs / copy_gbs, "same_as_triton": same})
                    print(f"{name:38s} {M}x{K} {label:13s} {gbs:6.0f} GB/s ({gbs / copy_gbs:.0%} of copy) "
                          f"same bits {same}", flush=True)
    finally:
        kfp8.REG_QUANT, kfp8.TMA_QUANT, kfp8.REG_QUANT_WEIGHT = reg, tma, reg_w


TMA_QUANT_SWEEP = [(3, 8, 1, False), (3, 8, 1, True), (2, 8, 1, True), (2, 4, 2, False), (2, 4, 2, True),
                   (3, 4, 2, True), (2, 8, 2, True), (2, 4, 1, True)]


def bench_tma_quant(rows: list, copy_gbs: float) -> None:
    """The TMA-pipelined Gluon quantization (kernels/fp8_tma_quant.py): its configs (stages, warps, programs per SM)
    swept for act_quant_both, act_quant_t and the FP8 requantization, against the Triton kernels of the same call;
    each output compared bit for bit with the Triton kernel's."""
    from minids.kernels import fp8_tma_quant

    default_on, kfp8.TMA_QUANT = kfp8.TMA_QUANT, True  # on for this sweep whatever the default
    try:
        _sweep_tma_quant(rows, copy_gbs, fp8_tma_quant)
    finally:
        kfp8.TMA_QUANT = default_on


def _sweep_tma_quant(rows: list, copy_gbs: float, fp8_tma_quant) -> None:
    for M, K in [(8192, 7168), (4096, 32768)]:
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        xq, xs = kfp8.act_quant(x)
        if not _tma_path(x):
            print("tma_quant: the Gluon kernel cannot run here (needs sm_90 and Triton's 3.6-era Gluon)", flush=True)
            return
        cases = {name: (kernel, nbytes) for name, kernel, _, nbytes in _quant_cases(x, x, xq, xs)}
        for name in ("act_quant_both", "act_quant_t 128x1", "act_quant_t from fp8 (Wgrad requant)"):
            kernel, nbytes = cases[name]
            elsize = 1 if "fp8" in name else 2
            kfp8.TMA_QUANT = False
            try:
                want = tuple(t.clone() for t in kernel(False))
                gbs = nbytes / median_ms(lambda: kernel(False)) / 1e6
            finally:
                kfp8.TMA_QUANT = True
            rows.append({"kernel": name, "shape": f"{M}x{K}", "config": "triton", "GB/s": gbs,
                         "frac_copy": gbs / copy_gbs, "same_as_triton": True, "default": False})
            print(f"{name:40s} {M}x{K} triton {gbs:6.0f} GB/s ({gbs / copy_gbs:.0%} of copy)", flush=True)
            default = fp8_tma_quant.CONFIG[elsize]
            try:
                for cfg in TMA_QUANT_SWEEP:
                    fp8_tma_quant.CONFIG[elsize] = cfg
                    try:
                        same = _same_outputs(kernel(False), want)
                        gbs = nbytes / median_ms(lambda: kernel(False)) / 1e6
                    except Exception as e:  # noqa: BLE001 - a config that does not fit is a result too
                        print(f"{name:40s} {cfg}: {str(e).splitlines()[0][:100]}", flush=True)
                        continue
                    rows.append({"kernel": name, "shape": f"{M}x{K}", "config": "stages {} warps {} per-SM {} convert {:d}".format(*cfg),
                                 "GB/s": gbs, "frac_copy": gbs / copy_gbs, "same_as_triton": same,
                                 "default": cfg == default})
                    print(f"{name:40s} {M}x{K} {cfg} {gbs:6.0f} GB/s ({gbs / copy_gbs:.0%} of copy) same bits {same}"
                          f"{'  (default)' if cfg == default else ''}", flush=True)
            finally:
                fp8_tma_quant.CONFIG[elsize] = default


def bench_gemm(rows: list, bf16_peak: float, fp8_peak: float, quick: bool) -> None:
    ms_list = [128, 4096] if quick else [64, 128, 4096]
    shapes = SHAPES_NK[:2] + SHAPES_NK[3:4] if quick else SHAPES_NK
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M in ms_list:
        for N, K in shapes:
            g = torch.Generator(device="cuda").manual_seed(M + N + K)
            a_hp = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
            b_hp = torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
            a, a_s = kfp8.act_quant(a_hp)
            b, b_s = kfp8.weight_quant(b_hp)
            flop = 2 * M * N * K
            row = {"M": M, "N": N, "K": K}
            c = kfp8.fp8_gemm(a, a_s, b, b_s)  # autotunes this (M bucket, N, K)
            want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
            row["max_rel_err"] = ((c.float() - want).abs().max() / want.abs().max()).item()
            row["minids_triton"] = flop / median_ms(lambda: kfp8.fp8_gemm(a, a_s, b, b_s)) / 1e9
            row["triton_graph"] = flop / graph_ms(lambda: kfp8.fp8_gemm(a, a_s, b, b_s)) / 1e9
            # what ran: the Gluon kernel (kernels/fp8_ws.py), a named variant's fixed config, or (base) the plan's tile
            # with autotuned warps and stages
            variant, cfg, split, planned = kfp8._plan_for(M, N, K, kfp8.GEMM_VARIANT, sms)
            ws = kfp8._use_ws(a, b, 128, c, kfp8.GEMM_VARIANT)
            row["variant"], row["split_k"] = ("ws", 1) if ws else (variant, split)
            if ws:
                from minids.kernels import fp8_ws

                row["plan"] = f"128x{fp8_ws.pick_block_n(M, N, sms)} persistent"
            else:
                row["plan"] = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}/{split}"
            if ws:
                row["config"] = "kernels/fp8_ws.py"
                row["heuristic_graph"] = ""
            elif planned:
                best = getattr(kfp8._fp8_gemm_tuned, "best_config", None)
                row["config"] = str(best.all_kwargs() if best is not None else "")[:120]
                tuned, kfp8.AUTOTUNE = kfp8.AUTOTUNE, False
                try:  # the heuristic config alone (MINIDS_AUTOTUNE=0)
                    row["heuristic_graph"] = flop / graph_ms(lambda: kfp8.fp8_gemm(a, a_s, b, b_s)) / 1e9
                finally:
                    kfp8.AUTOTUNE = tuned
            else:  # a fixed config: no autotuning, so no separate heuristic column
                row["config"] = str(cfg)[:120]
                row["heuristic_graph"] = ""
            fn, label = blockwise_scaled_mm(a, a_s, b, b_s)
            row["scaled_mm_form"] = label[:160]
            row["torch_scaled_mm"] = flop / median_ms(fn) / 1e9 if fn is not None else float("nan")
            row["scaled_mm_graph"] = flop / graph_ms(fn) / 1e9 if fn is not None else float("nan")
            ab, bb = a_hp, b_hp
            row["bf16_cublas"] = flop / median_ms(lambda: ab @ bb.t()) / 1e9
            row["reference"] = flop / median_ms(lambda: ref.fp8_gemm(a, a_s, b, b_s), rep_ms=50) / 1e9
            off = OFFICIAL.get(M, {}).get((N, K))
            row["official_issue"] = off if off is not None else ""
            row["vs_official"] = row["minids_triton"] / off if off else ""
            row["vs_scaled_mm"] = row["minids_triton"] / row["torch_scaled_mm"]
            row["vs_bf16"] = row["minids_triton"] / row["bf16_cublas"]
            row["frac_fp8_peak"] = row["minids_triton"] / fp8_peak
            rows.append(row)
            heur = f"{row['heuristic_graph']:7.1f}" if row["heuristic_graph"] != "" else "      -"
            print(f"M={M:5d} N={N:6d} K={K:6d}  triton {row['minids_triton']:7.1f} (graph {row['triton_graph']:7.1f}, "
                  f"heuristic {heur})  scaled_mm {row['torch_scaled_mm']:7.1f} (graph "
                  f"{row['scaled_mm_graph']:7.1f})  bf16 {row['bf16_cublas']:7.1f}  ref {row['reference']:6.1f}  "
                  f"official {off or '-'}  err {row['max_rel_err']:.1e}  {row['variant']} {row['plan']}  {row['config']}",
                  flush=True)


def bench_plans(rows: list) -> None:
    """Small M: every (BLOCK_N, split) the heuristic weighs, with its default warps and stages, from CUDA graphs."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for M in (64, 128):
        for N, K in SHAPES_NK:
            g = torch.Generator(device="cuda").manual_seed(M + N + K)
            a, a_s = kfp8.act_quant(torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16))
            b, b_s = kfp8.weight_quant(torch.randn(N, K, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05)
            nk = math.ceil(K / 128)
            plan, plan_split = kfp8._gemm_plan(kfp8._m_bucket(M), N, nk, sms)
            res = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
            times = {}
            # tile heights: the plan's, and at M = 128 also one 128-row tile (8 warps) through pointers and through TMA
            tiles = [(plan["BLOCK_M"], plan.get("TMA", False))] + ([(128, False), (128, True)] if M == 128 else [])
            tiles = list(dict.fromkeys(tiles))
            for bm, tma in tiles:
                for bn in (128, 64):
                    for split in range(1, kfp8._MAX_SPLIT + 1):
                        per = math.ceil(nk / split)
                        if (split > 1 and per < kfp8._MIN_STEPS_PER_SPLIT) or math.ceil(nk / per) != split:
                            continue
                        cfg = {**plan, "BLOCK_N": bn}
                        if (bm, tma) != (plan["BLOCK_M"], plan.get("TMA", False)):
                            cfg.update(BLOCK_M=bm, num_warps=8 if bm == 128 else 4, num_stages=4 if tma else 3, TMA=tma)
                        times[f"{bm}{'t' if tma else ''}x{bn}/{split}"] = graph_ms(
                            lambda cfg=cfg, split=split: kfp8._gemm_run(a, a_s, b, b_s, res, 128, cfg, split,
                                                                       tuned=False))
            best = min(times, key=times.get)
            flop = 2 * M * N * K
            planned = f"{plan['BLOCK_M']}{'t' if plan.get('TMA') else ''}x{plan['BLOCK_N']}/{plan_split}"
            row = {"M": M, "N": N, "K": K, "plan": planned, "plan_TFLOPs": flop / times[planned] / 1e9,
                   "best": best, "best_TFLOPs": flop / times[best] / 1e9,
                   "all": {k: round(flop / t / 1e9, 1) for k, t in times.items()}}
            row["plan_vs_best"] = row["plan_TFLOPs"] / row["best_TFLOPs"]
            rows.append(row)
            print(f"M={M:4d} N={N:6d} K={K:6d}  plan BLOCK_MxBLOCK_N/split {row['plan']} {row['plan_TFLOPs']:6.1f} TFLOP/s, "
                  f"best {row['best']} {row['best_TFLOPs']:6.1f}  ({row['plan_vs_best']:.2f})  all {row['all']}",
                  flush=True)


def _linear_step(fn, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """A closure running one forward + backward of fn(x, w) with output gradient dy, the gradients reset first."""
    def run():
        x.grad = w.grad = None
        fn(x, w).backward(dy)
    return run


def bench_linear(rows: list, quick: bool) -> None:
    """Forward + backward of one linear layer (x (M, K) bf16 -> (M, N)) in bf16, fp8 real and fp8 sim."""
    M = 4096
    shapes = SHAPES_NK[:2] if quick else SHAPES_NK
    for N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        times = {
            "bf16": median_ms(_linear_step(F.linear, x, w, dy)),
            "fp8_real": median_ms(_linear_step(lambda a, b: ref.fp8_linear(a, b, real=True), x, w, dy)),
            "fp8_sim": median_ms(_linear_step(lambda a, b: ref.fp8_linear(a, b), x, w, dy)),
        }
        graphs = {}  # the same steps replayed from a CUDA graph: GPU time without this host's launch overhead
        for name, fn in (("bf16", F.linear), ("fp8_real", lambda a, b: ref.fp8_linear(a, b, real=True))):
            try:
                graphs[name] = graph_ms(_linear_step(fn, x, w, dy))
            except RuntimeError as e:  # a capture this torch refuses: recorded, not fatal
                graphs[name] = float("nan")
                print(f"graph capture of {name} failed: {str(e).splitlines()[0][:160]}", flush=True)
        if K <= 512:  # where the Gluon GEMM takes the linear's weight-form GEMMs (kfp8.fp8_gemm_if_ws): without it
            if_ws, kfp8.fp8_gemm_if_ws = kfp8.fp8_gemm_if_ws, lambda *a: None
            try:
                graphs["fp8_real_no_ws"] = graph_ms(_linear_step(lambda a, b: ref.fp8_linear(a, b, real=True), x, w,
                                                                 dy))
            finally:
                kfp8.fp8_gemm_if_ws = if_ws
            print(f"linear fwd+bwd M={M} N={N} K={K}: fp8 real graph without the Gluon GEMM "
                  f"{graphs['fp8_real_no_ws']:.3f} ms", flush=True)
        flop = 6 * M * N * K
        row = {"M": M, "N": N, "K": K, **{f"{k}_ms": v for k, v in times.items()},
               **{f"{k}_TFLOPs": flop / v / 1e9 for k, v in times.items()},
               **{f"{k}_graph_ms": v for k, v in graphs.items()},
               "real_speedup_vs_bf16": times["bf16"] / times["fp8_real"],
               "real_speedup_vs_bf16_graph": graphs["bf16"] / graphs["fp8_real"],
               "sim_overhead_vs_bf16": times["fp8_sim"] / times["bf16"]}
        rows.append(row)
        print(f"linear fwd+bwd M={M} N={N} K={K}: bf16 {times['bf16']:.3f} ms, fp8 real {times['fp8_real']:.3f} ms "
              f"({row['real_speedup_vs_bf16']:.2f}x; graphs {graphs['bf16']:.3f} / {graphs['fp8_real']:.3f} ms, "
              f"{row['real_speedup_vs_bf16_graph']:.2f}x), sim {times['fp8_sim']:.3f} ms "
              f"({row['sim_overhead_vs_bf16']:.2f}x bf16's time)", flush=True)


def bench_linear_kernels(rows: list, quick: bool) -> None:
    """Where the FP8 linear's forward + backward spends its GPU time: each kernel's summed CUDA time per step
    (torch.profiler), beside bf16 F.linear's kernels, one row per (shape, implementation, kernel name)."""
    M = 4096
    for N, K in SHAPES_NK[:2] if quick else SHAPES_NK:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for impl, fn in (("bf16", F.linear), ("fp8_real", lambda a, b: ref.fp8_linear(a, b, real=True))):
            per = kernel_ms(_linear_step(fn, x, w, dy), reps=10)  # its warm-up compiles and autotunes outside the profile
            total = sum(per.values())
            for name, ms in sorted(per.items(), key=lambda kv: -kv[1]):
                rows.append({"M": M, "N": N, "K": K, "impl": impl, "kernel": name[:90], "ms": ms,
                             "share": ms / total, "step_kernel_ms": total})
            top = ", ".join(f"{n[:40]} {ms * 1e3:.0f} us" for n, ms in sorted(per.items(), key=lambda kv: -kv[1])[:4])
            print(f"linear kernels N={N} K={K} {impl}: {total:.3f} ms of kernels per step; {top}", flush=True)


def bench_scales(rows: list) -> None:
    """The weight-form GEMM (the default variant) with act_quant's 1x128 scales row-major and M-major, two rounds each:
    which layout the Fprop / Dgrad GEMM reads faster (kfp8._scales_t explains the choice)."""
    for M, N, K in [(4096, 7168, 16384), (4096, 2112, 7168), (4096, 4096, 7168), (4096, 24576, 1536)]:
        a, a_s = kfp8.act_quant(torch.randn(M, K, device="cuda").bfloat16())
        b, b_s = kfp8.weight_quant(torch.randn(N, K, device="cuda").bfloat16())
        for layout, s in (("row-major", a_s.contiguous()), ("M-major", a_s.t().contiguous().t())):
            for rnd in range(2):
                ms = median_ms(lambda a=a, s=s, b=b, b_s=b_s: kfp8.fp8_gemm(a, s, b, b_s))
                rows.append({"M": M, "N": N, "K": K, "a_s": layout, "round": rnd, "TFLOPs": 2 * M * N * K / ms / 1e9})
                print(f"{M}x{N}x{K} a_s {layout:9s} round {rnd}: {rows[-1]['TFLOPs']:6.0f} TFLOP/s", flush=True)


def bench_linear_gemms(rows: list, quick: bool) -> None:
    """The FP8 linear's three GEMMs one by one at M = 4096 tokens (Fprop x W^T, Dgrad dy W, Wgrad dy^T x with 1x128
    scales on both operands along the tokens): minids' Triton GEMM (per call and from a CUDA graph), block-scaled
    torch._scaled_mm in the first scale layout this torch accepts (checked against the reference), and bf16 cuBLAS
    on the same dimensions."""
    M = 4096
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for N, K in SHAPES_NK[:2] if quick else SHAPES_NK:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        xq, xs = kfp8.act_quant(x)
        wq, ws, wqt = kfp8.weight_quant(w, transposed=True)
        dyq, dys, dyt_q, dyt_s = kfp8.act_quant_both(dy)
        xt_q, xt_s = kfp8.act_quant_t(xq, in_scale=xs)
        gemms = {
            "fprop": (xq, xs, wq, ws, x, w),
            "dgrad": (dyq, dys, wqt, ws.t().contiguous(), dy, w.t().contiguous()),
            "wgrad": (dyt_q, dyt_s, xt_q, xt_s, dy.t().contiguous(), x.t().contiguous()),
        }
        for name, (a, a_s, b, b_s, a16, b16) in gemms.items():
            m, n, k = a.shape[0], b.shape[0], a.shape[1]
            flop = 2 * m * n * k
            variant, cfg, split, _ = kfp8._plan_for(m, n, k, kfp8.GEMM_VARIANT, sms, 1 if name == "wgrad" else 128)
            row = {"N": N, "K": K, "gemm": name, "m": m, "n": n, "k": k,
                   "plan": f"{variant} {cfg['BLOCK_M']}x{cfg['BLOCK_N']}/{split}"}

            def ours(a=a, a_s=a_s, b=b, b_s=b_s):
                return kfp8.fp8_gemm(a, a_s, b, b_s)
            row["triton_TFLOPs"] = flop / median_ms(ours) / 1e9
            row["triton_graph_TFLOPs"] = flop / graph_ms(ours) / 1e9
            fn, label = blockwise_scaled_mm(a, a_s, b, b_s)
            row["scaled_mm_layout"] = label
            if fn is not None and not label.startswith("row-wise"):
                row["scaled_mm_TFLOPs"] = flop / median_ms(fn) / 1e9
            row["bf16_TFLOPs"] = flop / median_ms(lambda a16=a16, b16=b16: a16 @ b16.t()) / 1e9
            rows.append(row)
            print(f"linear gemm N={N} K={K} {name} ({m}x{n}x{k}, {row['plan']}): triton {row['triton_TFLOPs']:.0f} "
                  f"(graph {row['triton_graph_TFLOPs']:.0f}), scaled_mm {row.get('scaled_mm_TFLOPs', 0):.0f} "
                  f"[{label[:60]}], bf16 {row['bf16_TFLOPs']:.0f} TFLOP/s", flush=True)


def _host_us(fn, n: int = 300) -> float:
    """Host microseconds per fn() call: n calls back to back without a sync, on inputs small enough that the GPU
    keeps up (a few microseconds of kernel each), so the clock measures the Python and launch path alone."""
    import time

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return host / n * 1e6


def _without_reg_quant(fn):
    """fn() with the transposing quantizations on the Triton kernels (kfp8.REG_QUANT off)."""
    on, kfp8.REG_QUANT = kfp8.REG_QUANT, False
    try:
        return fn()
    finally:
        kfp8.REG_QUANT = on


def bench_host(rows: list, out: Path) -> None:
    """Host time per call of each wrapper and of the FP8 linear's forward + backward (small shapes: the host is the
    bottleneck), with torch's own calls beside them, and a cProfile of the linear step (top functions by own time)."""
    import cProfile
    import io
    import pstats

    M, N, K = 256, 512, 1024
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    xq, xs = kfp8.act_quant(x)
    wq, ws = kfp8.weight_quant(w)
    big_a = torch.randn(4096, K, device="cuda").to(torch.float8_e4m3fn)
    big_s = torch.rand(4096, K // 128, device="cuda")
    xl = x.clone().requires_grad_()
    wl = (w * 0.02).requires_grad_()
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    q_raw, s_raw = torch.empty_like(xq), torch.empty(M, K // 128, device="cuda")  # act_quant's outputs
    flags = kfp8._flags("e4m3", False, None)

    def linear(fn):
        return _linear_step(fn, xl, wl, dy)

    cases = {
        "act_quant": lambda: kfp8.act_quant(x),
        "act_quant_t": lambda: kfp8.act_quant_t(x),
        "act_quant_t from fp8": lambda: kfp8.act_quant_t(xq, in_scale=xs),
        "act_quant_both": lambda: kfp8.act_quant_both(x),
        "act_quant_t, Triton kernel": lambda: _without_reg_quant(lambda: kfp8.act_quant_t(x)),
        "act_quant_both, Triton kernel": lambda: _without_reg_quant(lambda: kfp8.act_quant_both(x)),
        "weight_quant (+W^T)": lambda: kfp8.weight_quant(w, transposed=True),
        "fp8_gemm M=256 (plan, split)": lambda: kfp8.fp8_gemm(xq, xs, wq, ws),
        "fp8_gemm M=4096 (fixed variant)": lambda: kfp8.fp8_gemm(big_a, big_s, wq, ws),
        "raw launch: _act_quant_kernel[grid](...)": lambda: kfp8._act_quant_kernel[(M // 16, K // 128)](
            x, q_raw, s_raw, M, K, K, K, K // 128, 1, **flags, BLOCK_M=16, BLOCK=128, num_warps=4),
        "fp8 linear fwd+bwd (real)": linear(lambda a, b: ref.fp8_linear(a, b, real=True)),
        "torch: x.abs().amax()": lambda: x.abs().amax(),
        "torch: torch._scaled_mm per-tensor": lambda: torch._scaled_mm(
            xq, wq.t(), scale_a=torch.ones((), device="cuda"), scale_b=torch.ones((), device="cuda"),
            out_dtype=torch.bfloat16),
        "torch: F.linear fwd+bwd (bf16)": linear(F.linear),
    }
    for form in ("weight", "act"):
        print(f"block-scaled cuBLAS for the FP8 linear, {form} form: {kfp8._cublas_device_ok(0, form)} "
              f"({kfp8.CUBLAS_PROBE.get((0, form, torch.bfloat16))})", flush=True)
    for name, fn in cases.items():
        us = _host_us(fn)
        rows.append({"call": name, "host_us": us})
        print(f"host {name:40s} {us:7.1f} us per call", flush=True)
    prof = cProfile.Profile()
    run = cases["fp8 linear fwd+bwd (real)"]
    prof.enable()
    for _ in range(200):
        run()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    (out / "fp8_host_profile.txt").write_text(buf.getvalue())
    print("\n".join(buf.getvalue().splitlines()[:40]), flush=True)


SECTIONS = ("quant", "tiles", "reg_quant", "tma_quant", "gemm", "plans", "scales", "linear", "linear_kernels",
            "linear_gemms", "host")  # --only, in order


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", default="quant,gemm,linear",
                   help="any of " + ",".join(SECTIONS))
    args = p.parse_args()
    only = args.only.split(",")
    unknown = set(only) - set(SECTIONS)
    if unknown:
        p.error(f"--only: unknown {sorted(unknown)}; any of {','.join(SECTIONS)}")
    meta = metadata()
    copy_gbs, bf16_peak, fp8_peak = copy_bandwidth_gbs(), matmul_tflops(), fp8_scaled_mm_tflops()
    meta.update({"copy_GB/s": copy_gbs, "bf16_matmul_TFLOPs": bf16_peak, "fp8_scaled_mm_8192_TFLOPs": fp8_peak})
    print(f"{meta['device']}: copy {copy_gbs:.0f} GB/s, bf16 matmul {bf16_peak:.0f} TFLOP/s, "
          f"fp8 per-tensor scaled_mm {fp8_peak:.0f} TFLOP/s", flush=True)
    suffix = "-quick" if args.quick else ""
    # --only name: (run it, filling rows; results file; columns; notes)
    sections = {
        "quant": (
            lambda rows_: bench_quant(rows_, copy_gbs, args.quick), "fp8_quant",
            ["kernel", "shape", "ms", "GB/s", "frac_copy", "per_call_GB/s", "path", "triton_GB/s", "exact_GB/s",
             "fast_differs", "ref_GB/s"],
            ("Effective GB/s = bytes read + bytes written (FP8 values and float32 scales) / median time of the call "
             "replayed from a CUDA graph (GPU time; per_call_GB/s: called from Python, host included; the reference "
             "per call). "
             "GB/s: the fast mode (exact=False, the default); path: the kernel that ran it (gluon-reg: "
             "kernels/fp8_reg_quant.py, gluon-tma: kernels/fp8_tma_quant.py, on sm_90); triton_GB/s: the Triton "
             "kernel of the same call (kfp8.REG_QUANT and TMA_QUANT off); exact_GB/s: exact=True (bit-exact, "
             "always the Triton kernel); "
             "fast_differs: fraction of FP8 values where the two differ (by one FP8 step).")),
        "tiles": (
            lambda rows_: bench_tiles(rows_, copy_gbs), "fp8_tiles",
            ["kernel", "features", "num_warps", "pack", "GB/s", "frac_copy", "same_as_default", "default"],
            ("Fast mode, 8192x7168 bf16 (weights 7168x7168): a program quantizes 128 tokens x `features`; "
             "pack: the transposed copy stored as 8-token words (kfp8._pack_words); "
             "same_as_default: outputs bit-identical to the default tile's.")),
        "reg_quant": (
            lambda rows_: bench_reg_quant(rows_, copy_gbs), "fp8_reg_quant",
            ["kernel", "shape", "path", "GB/s", "frac_copy", "same_as_triton"],
            ("Fast mode, bf16 x (the requantization reads act_quant's FP8 x and 1x128 scales): the Triton kernels, "
             "then the register-layout Gluon kernel of kernels/fp8_reg_quant.py (no shared-memory transpose) at the "
             "layout spec of each call (tokens, features a thread; lanes, warps along the tokens; warps); "
             "same_as_triton: outputs bit-identical. "
             "Effective GB/s as in fp8_quant.")),
        "tma_quant": (
            lambda rows_: bench_tma_quant(rows_, copy_gbs), "fp8_tma_quant",
            ["kernel", "shape", "config", "GB/s", "frac_copy", "same_as_triton", "default"],
            ("Fast mode, bf16 x (M x K as listed; the requantization reads act_quant's FP8 x and 1x128 scales): the "
             "Triton kernel, then the TMA-pipelined Gluon kernel of kernels/fp8_tma_quant.py per config (stages of "
             "x tiles in flight, warps, programs per SM, FP8 tiles converted to store-friendly layouts first); same_as_triton: outputs bit-identical to the Triton "
             "kernel's. Effective GB/s as in fp8_quant.")),
        "gemm": (
            lambda rows_: bench_gemm(rows_, bf16_peak, fp8_peak, args.quick), "fp8_gemm",
            ["M", "N", "K", "minids_triton", "triton_graph", "heuristic_graph", "torch_scaled_mm",
             "scaled_mm_graph", "bf16_cublas", "reference", "official_issue", "vs_official", "vs_scaled_mm",
             "vs_bf16", "variant", "plan", "max_rel_err"],
            ("TFLOP/s = 2MNK / median time. *_graph: replayed from a CUDA graph (no host launch overhead); "
             "heuristic: MINIDS_AUTOTUNE=0's config (base variant only: the others run a fixed config); "
             "variant: what fp8_gemm ran (kfp8._auto_variant, or ws: the Gluon kernel of kernels/fp8_ws.py); plan: BLOCK_MxBLOCK_N/split-K it ran. "
             "official_issue: the official DeepSeek-V3 fp8_gemm on this "
             "project's H200 as quoted in the issue (autotuned per M in a fresh process).")),
        "plans": (
            lambda rows_: bench_plans(rows_), "fp8_gemm_plans",
            ["M", "N", "K", "plan", "plan_TFLOPs", "best", "best_TFLOPs", "plan_vs_best", "all"],
            ("Small-M GEMM, BLOCK_MxBLOCK_N/split-K ('t': TMA loads): the heuristic's choice against every "
             "candidate it weighs (its tile height, default warps and stages; at M = 128 also 128-row tiles of "
             "8 warps, through pointers with 3 stages and through TMA with 4), TFLOP/s from CUDA-graph replays.")),
        "scales": (
            lambda rows_: bench_scales(rows_), "fp8_gemm_scales",
            ["M", "N", "K", "a_s", "round", "TFLOPs"],
            ("The weight-form FP8 GEMM (default variant) with a's 1x128 scales row-major or M-major (stored "
             "(K/128, M)), TFLOP/s = 2MNK / median time, two rounds each.")),
        "linear": (
            lambda rows_: bench_linear(rows_, args.quick), "fp8_linear",
            ["M", "N", "K", "bf16_ms", "fp8_real_ms", "fp8_sim_ms", "real_speedup_vs_bf16", "bf16_graph_ms",
             "fp8_real_graph_ms", "fp8_real_no_ws_graph_ms", "real_speedup_vs_bf16_graph", "sim_overhead_vs_bf16"],
            ("One linear layer, forward + backward (6MNK FLOP): bf16 F.linear vs FP8LinearFunction real "
             "(Triton kernels: quantize x, W (+W^T), dy (both tilings), x^T; three block-scaled GEMMs, on "
             "the Gluon GEMM at K <= 512 (kfp8.fp8_gemm_if_ws), else block-scaled cuBLAS where it runs) and sim "
             "(quantize-dequantize, float32 matmuls). *_ms: median wall time per step (host launch overhead "
             "included); *_graph_ms: the same step replayed from a CUDA graph; fp8_real_no_ws: the same without the "
             "Gluon GEMM (cuBLAS or Triton instead). Speedups are bf16 time / fp8 time.")),
        "linear_kernels": (
            lambda rows_: bench_linear_kernels(rows_, args.quick), "fp8_linear_kernels",
            ["M", "N", "K", "impl", "kernel", "ms", "share", "step_kernel_ms"],
            ("One linear layer's forward + backward: the summed CUDA time of each kernel per step "
             "(torch.profiler, 10 steps after 3 warm-up steps), bf16 F.linear and FP8LinearFunction real.")),
        "linear_gemms": (
            lambda rows_: bench_linear_gemms(rows_, args.quick), "fp8_linear_gemms",
            ["N", "K", "gemm", "m", "n", "k", "plan", "triton_TFLOPs", "triton_graph_TFLOPs", "scaled_mm_TFLOPs",
             "scaled_mm_layout", "bf16_TFLOPs"],
            ("The FP8 linear's three GEMMs at 4096 tokens (m x n x k of each), TFLOP/s = 2mnk / median time: "
             "minids' Triton GEMM (and replayed from a CUDA graph), block-scaled torch._scaled_mm where a "
             "layout works (checked against the reference), bf16 cuBLAS on the same dimensions.")),
        "host": (
            lambda rows_: bench_host(rows_, args.out), "fp8_host",
            ["call", "host_us"],
            ("Host microseconds per call (Python, autograd and the launch path), small shapes so that the GPU "
             "keeps up; cProfile of the FP8 linear step in fp8_host_profile.txt.")),
    }
    assert tuple(sections) == SECTIONS
    for key, (run, stem, columns, notes) in sections.items():
        if key in only:
            rows: list = []
            run(rows)
            write_results(args.out, f"{stem}{suffix}", meta, rows, columns, notes)

if __name__ == "__main__":
    main()
