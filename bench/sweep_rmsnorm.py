"""Launch-configuration sweep of minids' Triton RMSNorm on the GPU: kernel time of each (rows per program, warps,
L2 eviction hint) forward and (tile, warps, programs per SM, prefetch, eviction hint) backward, beside
torch.compile of the eager reference, at 16384 rows of bf16 (bench/rmsnorm.py's shapes). What bench/rmsnorm.py's
``_fwd_config`` / ``_bwd_config`` choose is marked "*"; the fastest config per shape is printed last.

    python3 bench/sweep_rmsnorm.py --out /tmp/r
    python3 bench/sweep_rmsnorm.py --out /tmp/r --hidden 512 7168 --passes fwd compiled   # the forward only
    python3 bench/sweep_rmsnorm.py --out /tmp/r --hidden 1024 --passes fused compiled     # the fused add's forward
    python3 bench/sweep_rmsnorm.py --cpu-smoke               # forward variants under the interpreter: checks only

Kernel time is ``device_ms`` (torch.profiler, the sum of the kernels' durations, inputs rotated past L2); the
backward's time includes the (P, D) dweight partial sum, which is also reported alone (``sum_us``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when minids.kernels is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, device_ms, metadata, write_results
from minids.kernels import rmsnorm as K

from minids.norm import add_rms_norm, rms_norm

EPS = 1e-6


def fwd_configs(D: int, wide: bool, R: int, fused: bool = False) -> list[tuple[int, int, int, bool, bool, bool, bool]]:
    """(BLOCK_D, ROWS, warps, EVICT, LOOPED, EVEN, WIDE): whole-row tiles of 1K-16K elements and 4-64 elements a thread,
    each with and without EVICT and, where D is a power of two, mask-free (EVEN); then, for D >= 1024, the two-pass
    loop over 512-8192-wide chunks of one, two or four rows (4-32 elements a thread), also mask-free where they
    divide D. WIDE (int64 offsets) as the wrapper sets it for these sizes, and the default once more with int64."""
    bd = K.triton.next_power_of_2(D)
    out = []
    for tile in (1024, 2048, 4096, 8192, 16384):
        rows = tile // bd
        if rows < 1 or rows > 64:
            continue
        for warps in (1, 2, 4, 8, 16):
            if 4 <= tile // (32 * warps) <= 64:
                for ev in (False, True):
                    out.append((bd, rows, warps, ev, False, False, wide))
                    if bd == D:
                        out.append((bd, rows, warps, ev, False, True, wide))
    if D >= 1024:
        for chunk in (512, 1024, 2048, 4096, 8192):
            for rows in (1, 2, 4):
                for warps in (1, 2, 4, 8, 16):
                    if chunk <= bd and 4 <= rows * chunk // (32 * warps) <= 32:
                        out.append((chunk, rows, warps, False, True, False, wide))
                        if D % chunk == 0:
                            out.append((chunk, rows, warps, False, True, True, wide))
    if not wide:
        blk, rows, warps, ev, looped = K._fwd_config(D, fused)
        out.append((blk, rows, warps, ev, looped, K._fwd_even(D, R, blk, rows, looped), True))
    return out


def bwd_configs(D: int, base_per_sm: int) -> list[tuple[int, int, int, bool, bool]]:
    """(ROWS, warps, programs per SM, PREFETCH, EVICT)."""
    bd = K.triton.next_power_of_2(D)
    out = []
    for tile in (512, 1024, 2048, 4096, 8192):
        rows = tile // bd
        if rows < 1:
            continue
        for warps in (1, 2, 4, 8, 16):
            if not 8 <= tile // (32 * warps) <= 32:
                continue
            for per_sm in sorted({max(1, base_per_sm // 2), base_per_sm, 2 * base_per_sm, 16 // warps}):
                out.append((rows, warps, per_sm, True, False))
            out.append((rows, warps, base_per_sm, False, False))
            out.append((rows, warps, base_per_sm, True, True))
    return out


def sweep_hidden(D: int, R: int, copy: float, sms: int, g: torch.Generator, passes: list[str],
                 dev: str = "cuda") -> list[dict]:
    """Every forward and backward config at hidden D, then torch.compile's kernels (each of passes: fwd, bwd,
    compiled); prints a line per pass, returns rows. dev "cpu": the interpreter, forward only, no timing."""
    rows_out = []
    n_sets = max(2, -(-(256 << 20) // (R * D * 2))) if dev == "cuda" else 1
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    w = (1 + 0.1 * torch.randn(D, device=dev, generator=g)).to(dt)
    xs = [torch.randn(R, D, device=dev, generator=g, dtype=dt) for _ in range(n_sets)]
    dys = [torch.randn(R, D, device=dev, generator=g, dtype=dt) for _ in range(n_sets)]
    y, dx = torch.empty_like(xs[0]), torch.empty_like(xs[0])
    rstd = [torch.empty(R, device=dev, dtype=torch.float32) for _ in range(n_sets)]
    timed = device_ms if dev == "cuda" else (lambda fn: float("nan"))
    base = K._fwd_config(D)
    bd = K.triton.next_power_of_2(D)  # the whole row's tile (the backward's)
    unit = R * D * 2
    # forward, then the fused add's forward (residual: the dy tensors; s written to dx)
    for fused in [f for f, p in ((False, "fwd"), (True, "fused")) if p in passes]:
        sweep_forward(D, R, copy, w, xs, dys, y, dx, rstd, n_sets, fused, rows_out, timed)
    if dev != "cuda" or "bwd" not in passes:
        return rows_out + (compiled_row(D, unit, copy, w, xs, dys, n_sets, "fused" in passes)
                           if "compiled" in passes else [])
    # backward: the default plan's programs per SM, then variations around it
    x0 = xs[0].detach().requires_grad_()
    (dref,) = torch.autograd.grad(K.rms_norm(x0, w, EPS), x0, dys[0])  # also compiles the default plan
    brow, bwarps, bev = K._bwd_config(D)[1:]
    key = (0, D, torch.bfloat16, torch.bfloat16, torch.bfloat16, False, K._PREFETCH)
    base_per_sm = K._BWD_PLAN[key][0]
    for i in range(n_sets):  # rstd of every set
        K._rms_norm_fwd[(K.triton.cdiv(R, base[1]),)](
            xs[i], xs[i], w, y, xs[i], rstd[i], R, D, EPS, HAS_RES=False, ROWS=base[1], BLOCK_D=base[0],
            EVICT=base[3], LOOPED=base[4], num_warps=base[2])
    b_res = []
    for rows, warps, per_sm, pf, ev in bwd_configs(D, base_per_sm):
        n_prog = min(K.triton.cdiv(R, rows), per_sm * sms)
        part = torch.empty(n_prog, D, device="cuda", dtype=torch.float32)

        cyc = itertools.cycle(range(n_sets))

        def run(rows=rows, warps=warps, pf=pf, ev=ev, n_prog=n_prog, part=part, cyc=cyc):
            i = next(cyc)
            K._rms_norm_bwd[(n_prog,)](
                dys[i], xs[i], w, rstd[i], dys[i], dx, part, R, D,
                HAS_DS=False, ROWS=rows, BLOCK_D=bd, PREFETCH=pf, EVICT=ev, num_warps=warps)
            return K._sum_rows(part, torch.bfloat16)

        try:
            run()  # set 0
            err = (dx.float() - dref.float()).abs().max().item()
            ms = device_ms(run)
        except Exception as e:  # noqa: BLE001
            print(f"bwd D={D} {rows}r {warps}w {per_sm}/SM pf={pf}: failed {type(e).__name__}: {str(e)[:100]}")
            continue
        plan = (brow, bwarps, base_per_sm, K._BWD_PLAN[key][1], bev)
        mark = "*" if (rows, warps, per_sm, pf, ev) == plan else ""
        b_res.append((3 * unit / ms / 1e6 / copy, rows, warps, per_sm, pf, ev, mark, err, ms))
        rows_out.append({"pass": "bwd", "D": D, "rows_per_prog": rows, "warps": warps, "per_sm": per_sm,
                         "prefetch": pf, "evict": ev, "default": bool(mark), "kernel_ms": ms,
                         "of_copy": b_res[-1][0], "max_err": err})
    part = torch.randn(base_per_sm * sms, D, device="cuda")
    sum_us = device_ms(lambda: K._sum_rows(part, torch.bfloat16)) * 1e3
    torch_sum_us = device_ms(lambda: part.sum(0).to(torch.bfloat16)) * 1e3
    b_res.sort(reverse=True)
    line = " ".join(f"{r[1]}r{r[2]}w{r[3]}p{'' if r[4] else 'N'}{'E' if r[5] else ''}{r[6]}:{r[0]:.0%}"
                    for r in b_res[:5])
    dflt = [r for r in b_res if r[6]]
    print(f"D={D} bwd  default {dflt[0][0] if dflt else float('nan'):.0%} (sum {sum_us:.1f} us, torch's "
          f"{torch_sum_us:.1f}) | best {line}"
          f" | max err {max(r[7] for r in b_res):.1e}")
    return rows_out + (compiled_row(D, unit, copy, w, xs, dys, n_sets, "fused" in passes)
                       if "compiled" in passes else [])


def sweep_forward(D: int, R: int, copy: float, w, xs, dys, y, s_out, rstd, n_sets: int, fused: bool,
                  rows_out: list, timed) -> None:
    """Every forward config at hidden D (fused: with the residual add, the residual from dys, s into s_out), each
    checked against the reference and timed; appends a row each to rows_out and prints the best."""
    if fused:
        ref, s_ref = add_rms_norm(xs[0], dys[0], w, EPS)
    else:
        ref, s_ref = rms_norm(xs[0], w, EPS), xs[0]
    rstd_ref = torch.rsqrt(s_ref.float().pow(2).mean(-1) + EPS)  # (R,) float32
    base = K._fwd_config(D, fused)
    bd = K.triton.next_power_of_2(D)
    unit = R * D * 2 * (2 if fused else 1)  # read x (and the residual), write y (and s)
    tag = "fused" if fused else "fwd"
    f_res = []
    for blk, rows, warps, ev, looped, even, wide in fwd_configs(D, K._wide(R + 64, D, bd), R, fused):
        cyc = itertools.cycle(range(n_sets))
        even = even and R % rows == 0

        def run(blk=blk, rows=rows, warps=warps, ev=ev, looped=looped, even=even, wide=wide, cyc=cyc):
            i = next(cyc)
            K._rms_norm_fwd[(K.triton.cdiv(R, rows),)](
                xs[i], dys[i], w, y, s_out if fused else xs[i], rstd[i], R, D, EPS,
                HAS_RES=fused, ROWS=rows, BLOCK_D=blk, EVICT=ev, LOOPED=looped, EVEN=even, WIDE=wide,
                num_warps=warps)
        name = (f"{'L' + str(blk) + '/' if looped else ''}{rows}r{warps}w{'E' if ev else ''}{'M0' if even else ''}"
                f"{'i64' if wide else ''}")
        try:
            y.fill_(float("nan"))
            s_out.fill_(float("nan"))  # an element a variant leaves unwritten shows as NaN, not the last one's value
            rstd[0].fill_(float("nan"))
            run()  # set 0
            err = max((y.float() - ref.float()).abs().max().item(), (s_out.float() - s_ref.float()).abs().max().item()
                      if fused else 0.0,
                      ((rstd[0] - rstd_ref).abs() / rstd_ref).max().item())
            if not (y.isfinite().all() and rstd[0].isfinite().all() and (s_out.isfinite().all() or not fused)):
                err = float("inf")
            ms = timed(run)
        except Exception as e:  # noqa: BLE001  a failing variant is a row with infinite error
            print(f"{tag} D={D} {name}: failed {type(e).__name__}: {str(e)[:100]}")
            rows_out.append({"pass": tag, "D": D, "block_d": blk, "rows_per_prog": rows, "warps": warps,
                             "evict": ev, "looped": looped, "even": even, "wide": wide, "max_err": float("inf"),
                             "error": f"{type(e).__name__}: {str(e)[:200]}"})
            continue
        dflt = (blk, rows, warps, ev, looped) == base and even == K._fwd_even(D, R, blk, rows, looped)
        mark = "*" if dflt and wide == K._wide(R + 64, D, bd) else ""
        f_res.append((2 * unit / ms / 1e6 / copy, name, mark, err, ms))
        rows_out.append({"pass": tag, "D": D, "block_d": blk, "rows_per_prog": rows, "warps": warps, "evict": ev,
                         "looped": looped, "wide": wide, "even": even, "default": bool(mark), "kernel_ms": ms,
                         "of_copy": f_res[-1][0], "max_err": err})
    if f_res:
        f_res.sort(key=lambda r: r[0] if r[0] == r[0] else 0.0, reverse=True)  # nan (no timing) last
        line = " ".join(f"{r[1]}{r[2]}:{r[0]:.0%}" for r in f_res[:6])
        dflt = [r for r in f_res if r[2]]
        print(f"D={D} {tag}  default {dflt[0][0] if dflt else float('nan'):.0%} | best {line} | max err "
              f"{max(r[3] for r in f_res):.1e}")


def compiled_row(D: int, unit: int, copy: float, w, xs, dys, n_sets: int, fused: bool = False) -> list[dict]:
    """torch.compile of the eager reference on the same inputs: kernel time forward and backward (and, with fused,
    the forward of the residual add + RMSNorm, the residual from dys)."""
    wc = w.detach().clone().requires_grad_()
    comp = torch.compile(lambda x: rms_norm(x, wc, EPS), dynamic=False)
    cyc = itertools.cycle(range(n_sets))
    f_ms = device_ms(lambda: comp(xs[next(cyc)]))
    xg = [x.detach().requires_grad_() for x in xs[:2]]
    outs = [comp(x) for x in xg]
    cyc2 = itertools.cycle(range(2))

    def cb():
        i = next(cyc2)
        torch.autograd.grad(outs[i], (xg[i], wc), dys[i], retain_graph=True)

    b_ms = device_ms(cb)
    print(f"D={D} compiled fwd {2 * unit / f_ms / 1e6 / copy:.0%}  bwd {3 * unit / b_ms / 1e6 / copy:.0%}")
    row = {"pass": "compiled", "D": D, "fwd_of_copy": 2 * unit / f_ms / 1e6 / copy,
           "bwd_of_copy": 3 * unit / b_ms / 1e6 / copy, "fwd_ms": f_ms, "bwd_ms": b_ms}
    if fused:
        comp_add = torch.compile(lambda x, r: add_rms_norm(x, r, wc, EPS), dynamic=False)
        cyc3 = itertools.cycle(range(n_sets))

        def cf():
            i = next(cyc3)
            return comp_add(xs[i], dys[i])

        row["fused_fwd_ms"] = device_ms(cf)
        row["fused_fwd_of_copy"] = 4 * unit / row["fused_fwd_ms"] / 1e6 / copy
        print(f"D={D} compiled fused fwd {row['fused_fwd_of_copy']:.0%}")
    torch.cuda.empty_cache()
    return [row]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/sweep"))
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cpu-smoke", action="store_true", help="forward variants under TRITON_INTERPRET=1, untimed")
    ap.add_argument("--hidden", type=int, nargs="+", default=[512, 1024, 2048, 4096, 7168])
    ap.add_argument("--passes", nargs="+", default=["fwd", "bwd", "compiled"],
                    choices=["fwd", "fused", "bwd", "compiled"])
    args = ap.parse_args()
    if args.cpu_smoke:  # the forward variants under the interpreter, float32, checked, not timed
        g = torch.Generator().manual_seed(0)
        rows = [r for D in (64, 2048, 100) for r in sweep_hidden(D, 6, float("nan"), 1, g, ["fwd", "fused"], "cpu")]
        bad = [r for r in rows if not r["max_err"] < 1e-4]
        sys.exit(f"smoke: {len(bad)} of {len(rows)} forward variants off" if bad or not rows else 0)
    torch._dynamo.config.cache_size_limit = torch._dynamo.config.recompile_limit = 64
    meta = metadata()
    copy = copy_bandwidth_gbs()
    meta["copy_GBps"] = round(copy, 1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{meta['device']} triton {meta['triton']}: copy {copy:.0f} GB/s, {sms} SMs")
    R = args.rows
    rows_out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for D in args.hidden:
        rows_out += sweep_hidden(D, R, copy, sms, g, args.passes)
        torch.cuda.empty_cache()
    cols = ["pass", "D", "block_d", "rows_per_prog", "warps", "per_sm", "prefetch", "evict", "looped", "even", "wide",
            "default", "kernel_ms", "of_copy", "max_err", "fwd_of_copy", "bwd_of_copy", "fused_fwd_of_copy"]
    write_results(args.out, "sweep_rmsnorm", meta, rows_out, cols, "Launch-config sweep (bench/sweep_rmsnorm.py).")


if __name__ == "__main__":
    main()
