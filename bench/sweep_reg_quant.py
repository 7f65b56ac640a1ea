"""Sweep of the register layout of the transposing Gluon quantization (kernels/fp8_reg_quant.py) on an sm_90 GPU:
act_quant_t (bf16 x), act_quant_both and the FP8 requantization at 8192 x 7168 for every layout spec of a grid
(tokens / features a thread, lanes and warps along the tokens, warps), each checked bit for bit against the Triton
kernels and timed beside them in the same run; the best spec of each call again at 4096 x 32768.

    python3 bench/sweep_reg_quant.py --out bench/results      # the H200: a few minutes
    python3 bench/sweep_reg_quant.py --calls requant --base "16,4,4,2,4;16,8,4,2,4"   # given layouts
    python3 bench/sweep_reg_quant.py --orders "0,0;1,8;8,4"      # tile orders (fp8_reg_quant.ORDER), three shapes
    python3 bench/sweep_reg_quant.py --specs "16,4,4,2,4;16,4,4,2,4,128"   # exactly these layouts, three shapes

Every kernel is timed from a CUDA graph (a per-call time is mostly the host's: bench/results/fp8_host.md).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fp8 as bench_fp8
from _common import copy_bandwidth_gbs, graph_ms, metadata, write_results
from minids.kernels import fp8 as kfp8
from minids.kernels import fp8_reg_quant as rq

CALLS = {"t": "act_quant_t 128x1", "both": "act_quant_both", "requant": "act_quant_t from fp8 (Wgrad requant)"}


def grid() -> list[tuple]:
    specs = []
    for spt_t, spt_k, lanes_t, nw in itertools.product((4, 8, 16, 32), (4, 8, 16), (2, 4, 8), (2, 4, 8)):
        for warps_t in sorted({1, nw // 2, nw}):
            spec = (spt_t, spt_k, lanes_t, warps_t, nw)
            # whole tile covered by at most 16 repetitions, and at least 4 tokens (bytes) per qt store
            reps = 128 * 128 // (spt_t * spt_k * 32 * nw)
            if rq.valid_spec(spec) and reps <= 16:
                specs.append(spec)
    return specs


def _cases(shapes, calls: str):
    """(M, K, call, kernel (taking exact=), bytes moved, the Triton kernels' outputs) for each shape and call; the
    Gluon kernel is left on (``kfp8.REG_QUANT``)."""
    for M, K in shapes:
        x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
        xq, xs = kfp8.act_quant(x)
        cases = {name: (kern, nb) for name, kern, _, nb in bench_fp8._quant_cases(x, x[:128, :128], xq, xs)}
        for call in calls.split(","):
            kernel, nbytes = cases[CALLS[call]]
            kfp8.REG_QUANT = False
            want = tuple(t.clone() for t in kernel(False))
            kfp8.REG_QUANT = True
            yield M, K, call, kernel, nbytes, want


NOTES = {
    "orders": "order (GROUP_M, GROUP_K) of kernels/fp8_reg_quant.py: consecutive programs take GROUP_M token blocks x "
              "GROUP_K feature blocks, feature blocks fastest; (0, 0): the token blocks of a feature block first.",
    "specs": "spec = (tokens a thread, features a thread, lanes along the tokens, warps along the tokens, warps[, "
             "register cap (0: none)]) of kernels/fp8_reg_quant.py; tile orders as fp8_reg_quant.ORDER.",
}


def sweep_variants(args, kind: str) -> None:
    """Each call with each of the given tile orders (kind "orders", ``ORDER``; at its layout) or layouts ("specs",
    ``SPECS``), checked bit for bit against the Triton kernels, at three shapes."""
    copy_gbs = copy_bandwidth_gbs()
    table = rq.ORDER if kind == "orders" else rq.SPECS
    variants = [tuple(int(v) for v in o.split(",")) for o in getattr(args, kind).split(";")]
    rows = []
    kfp8.TMA_QUANT = False
    print(f"{len(variants)} {kind}; copy {copy_gbs:.0f} GB/s", flush=True)
    for M, K, call, kernel, nbytes, want in _cases(((8192, 7168), (4096, 32768), (2048, 7168)), args.calls):
        saved = table.get(call)
        for v in variants:
            label = f"{rq.SPECS[call]} order {v}" if kind == "orders" else str(v)
            if kind == "orders" and v[0] and (-(-M // 128) % v[0] or -(-K // 128) % v[1]):
                print(f"{call:8s} {M}x{K} {label}: does not divide the grid (the default order runs)")
                continue
            table[call] = v
            same = bench_fp8._same_outputs(kernel(False), want)
            gbs = nbytes / graph_ms(lambda k=kernel: k(False)) / 1e6
            rows.append({"call": call, "shape": f"{M}x{K}", "spec": label, "GB/s": gbs,
                         "frac_copy": gbs / copy_gbs, "same_as_triton": same})
            print(f"{call:8s} {M}x{K} {label} {gbs:6.0f} GB/s ({gbs / copy_gbs:.1%}) same {same}", flush=True)
        if saved is None:
            table.pop(call, None)
        else:
            table[call] = saved
    if args.out:
        write_results(Path(args.out), args.stem, {**metadata(), "copy_GB/s": copy_gbs}, rows,
                      ["call", "shape", "spec", "GB/s", "frac_copy", "same_as_triton"],
                      NOTES[kind] + " GB/s as bench/fp8.py's quant section, from CUDA graphs.")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--stem", default="fp8_reg_quant-sweep")
    p.add_argument("--calls", default="t,both,requant")
    p.add_argument("--base", default=None,
                   help="instead of the grid: these layouts (e.g. '16,4,4,2,4;8,16,8,2,4'), each with and without "
                        "a 168-register cap")
    p.add_argument("--orders", default=None,
                   help="instead: each call at its layout with these tile orders (fp8_reg_quant.ORDER; "
                        "'0,0;8,8': GROUP_M,GROUP_K), at 8192 x 7168, 4096 x 32768 and 2048 x 7168")
    p.add_argument("--specs", default=None,
                   help="instead: exactly these layouts (';'-separated, each with an optional register cap), at the "
                        "three shapes of --orders")
    args = p.parse_args()
    if args.specs or args.orders:
        return sweep_variants(args, "specs" if args.specs else "orders")
    copy_gbs = copy_bandwidth_gbs()
    rows, best = [], {}
    reg, tma = kfp8.REG_QUANT, kfp8.TMA_QUANT
    kfp8.TMA_QUANT = False
    if args.base:
        specs = [tuple(int(v) for v in b.split(",")) + cap for b in args.base.split(";") for cap in ((), (168,))]
    else:
        specs = grid()
    print(f"{len(specs)} layout specs; copy {copy_gbs:.0f} GB/s", flush=True)
    try:
        for M, K, call, kernel, nbytes, want in _cases(((8192, 7168), (4096, 32768)), args.calls):
            kfp8.REG_QUANT = False
            tri = nbytes / graph_ms(lambda k=kernel: k(False)) / 1e6
            rows.append({"call": call, "shape": f"{M}x{K}", "spec": "triton", "GB/s": tri,
                         "frac_copy": tri / copy_gbs, "same_as_triton": True})
            print(f"{call:8s} {M}x{K} triton {tri:6.0f} GB/s", flush=True)
            kfp8.REG_QUANT = True
            def measure(spec, call=call, kernel=kernel, nbytes=nbytes, want=want, M=M, K=K):
                rq.SPECS[call] = spec
                t0 = time.time()
                try:
                    same = bench_fp8._same_outputs(kernel(False), want)
                    gbs = nbytes / graph_ms(lambda k=kernel: k(False)) / 1e6
                except Exception as e:  # noqa: BLE001  a layout the compiler refuses
                    print(f"{call:8s} {M}x{K} {spec} failed: {str(e).splitlines()[0][:160]}", flush=True)
                    return
                if M == 8192 and same:
                    best.setdefault(call, []).append((spec, gbs))
                rows.append({"call": call, "shape": f"{M}x{K}", "spec": str(spec), "GB/s": gbs,
                             "frac_copy": gbs / copy_gbs, "same_as_triton": same})
                print(f"{call:8s} {M}x{K} {spec} {gbs:6.0f} GB/s ({gbs / copy_gbs:.0%}) same {same} "
                      f"[{time.time() - t0:.1f} s]", flush=True)

            if M == 8192:  # every layout, then (the grid) the best four again with capped registers (more
                for spec in specs:  # programs an SM)
                    measure(spec)
                for spec, _ in sorted(best[call], key=lambda r: -r[1])[:4] if not args.base else ():
                    for cap in (168, 128):
                        measure(spec + (cap,))
            else:
                for spec, _ in sorted(best[call], key=lambda r: -r[1])[:4]:
                    measure(spec)
            rq.SPECS[call] = max(best[call], key=lambda r: r[1])[0]
    finally:
        kfp8.REG_QUANT, kfp8.TMA_QUANT = reg, tma
    for call in best:
        top = sorted(best[call], key=lambda r: -r[1])[:5]
        print(f"best {call}: " + ", ".join(f"{s} {g:.0f}" for s, g in top), flush=True)
    if args.out:
        meta = {**metadata(), "copy_GB/s": copy_gbs}
        cols = ["call", "shape", "spec", "GB/s", "frac_copy", "same_as_triton"]
        write_results(Path(args.out), args.stem, meta, rows, cols,
                      "spec = (tokens a thread, features a thread, lanes along the tokens, warps along the tokens, "
                           "warps) of kernels/fp8_reg_quant.py's layout; GB/s: bytes read + written / median time "
                           "(as bench/fp8.py's quant section), replayed from a CUDA graph; same_as_triton: outputs bit-identical to the Triton "
                           "kernels'.")


if __name__ == "__main__":
    main()
