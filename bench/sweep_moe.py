"""Sweep of the Triton MoE backward variants (minids.kernels.moe WGRAD / DGRAD / BLOCK_M knobs) on the GPU, balanced
routing, bf16: per tier, each weight-gradient variant, each dgrad config of the dh and dx GEMMs, and whole fwd+bwd
of the Triton path per variant beside the torch._grouped_mm pipeline (minids.moe.moe_experts impl="grouped").

    python3 bench/sweep_moe.py --out /tmp/r                 # small, v2-lite, v3-4k (fixed configs, ~2 minutes)
    python3 bench/sweep_moe.py --out /tmp/r --autotune      # the default rows autotuned, as bench/moe.py runs them
    python3 bench/sweep_moe.py --cpu-smoke                  # tiny shape under TRITON_INTERPRET=1: correctness only

Checks: each weight-gradient variant and each fwd+bwd (output and five gradients) against the grouped pipeline
(bf16 rounding of different intermediates: ~5e-3; tolerance 2e-2), each dgrad config against the default launch
(1e-2). The max relative error is printed; above the tolerance a cell says FAIL.
Timing: median_ms (CUDA events); wgrad rows include the gather copies the variant needs. Without --autotune every
kernel runs its first (or given) config, so the default rows are not bench/moe.py's autotuned ones.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--out", type=Path, default=Path("/tmp/sweep_moe"))
ap.add_argument("--tiers", nargs="+", default=["small", "v2-lite", "v3-4k"])
ap.add_argument("--autotune", action="store_true", help="autotune the default path (slow: many compiles)")
ap.add_argument("--cpu-smoke", action="store_true", help="one tiny shape under TRITON_INTERPRET=1, no timing")
args = ap.parse_args()
if args.cpu_smoke:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ["MINIDS_AUTOTUNE"] = "1" if args.autotune else "0"  # read when minids.kernels is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minids.kernels.moe as km
from _common import copy_bandwidth_gbs, matmul_tflops, median_ms, metadata, write_results

from minids.moe import moe_experts

TIERS = {  # name: (tokens, hidden D, experts E, expert width I, top-K); bench/moe.py's, routed experts only
    "small": (16384, 1024, 16, 512, 4),
    "v2-lite": (8192, 2048, 64, 1408, 6),
    "v3-4k": (4096, 7168, 256, 2048, 8),
    "smoke": (37, 40, 6, 24, 3),
}
# weight-gradient variants: name -> WGRAD; tile = (BMW, BNW, BK, warps, stages)
T128 = (128, 128, 64, 8, 3)
DEFAULTS = (km.WGRAD, km.DGRAD, km.BLOCK_M, km.DX_LOOPS, km.GATE_UP)  # the module's defaults, restored after each variant
# gate/up GEMM configs (BN, BK, warps, stages, GROUP_M)
GCFGS = {"g0": (64, 64, 4, 4, 8), "g1": (128, 64, 8, 3, 8), "g2": (128, 64, 8, 4, 8), "g3": (64, 64, 8, 4, 8),
         "g4": (128, 32, 8, 5, 8)}
WGRADS = {
    "default": km.WGRAD,
    "tiles-gather": {"tile": T128},
    "sorted": {"sorted": True, "tile": T128},
    "sorted-fused": {"sorted": True, "fuse": True, "tile": T128},
    "sorted-fused-64x128": {"sorted": True, "fuse": True, "tile": (64, 128, 64, 4, 3)},
    "sorted-128x256": {"sorted": True, "tile": (128, 256, 64, 8, 3)},
    "sorted-fused-pers": {"sorted": True, "fuse": True, "programs": 1, "flat": True, "tile": T128},
    "sorted-pers-64x128": {"sorted": True, "programs": 3, "flat": True, "tile": (64, 128, 64, 4, 3)},
}
# dgrad configs (BN, BK, warps, stages, GROUP_M) for both backward _grouped_kernel launches; c0 = the default's first
DCFGS = {"c0": (128, 64, 8, 3, 8), "c1": (128, 64, 8, 4, 8), "c2": (256, 64, 8, 2, 8), "c3": (128, 128, 8, 2, 8),
         "c4": (64, 64, 4, 3, 8), "c5": (128, 64, 4, 3, 8), "c6": (64, 128, 4, 3, 8), "c7": (128, 32, 8, 6, 8),
         "c8": (128, 128, 8, 3, 8), "c9": (256, 64, 8, 3, 8), "c10": (128, 64, 4, 4, 8), "c11": (256, 64, 8, 4, 8)}
if args.cpu_smoke:
    WGRADS = {k: {**v, "tile": (32, 32, 16, 1, 1), **({"programs": 2} if v.get("programs") else {})}
              for k, v in WGRADS.items()}  # DEFAULTS' tile is the interpreter's already
    DCFGS = {"c0": (32, 32, 1, 1, 8), "c1": (16, 16, 1, 1, 4)}
    GCFGS = {"g0": (32, 32, 1, 1, 8), "g1": (16, 16, 1, 1, 4)}
WTOL, FTOL = 1e-2, 2e-2  # max relative error of a dgrad launch vs the default's; of a result vs the reference


def attempt(cells: list, rows: list, tier: str, piece: str, name: str, knob_args: dict, check, fn,
            rep_ms: int = 100) -> tuple[float, float] | None:
    """(error, ms) of fn under the knobs knob_args (restored after), checked by check(); a failure is one cell and
    one row, and None."""
    try:
        knobs(**knob_args)
        err = check()
        ms = timed(fn, rep_ms)
    except Exception as e:  # noqa: BLE001  one failing variant is one line
        cells.append(f"{name} failed ({short(e)})")
        rows.append({"tier": tier, "piece": piece, "variant": name, "error": short(e)})
        return None
    finally:
        knobs()
    return err, ms


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def knobs(wgrad=DEFAULTS[0], dgrad=DEFAULTS[1], block_m=DEFAULTS[2], dx_loops=DEFAULTS[3], gate_up=DEFAULTS[4]) -> None:
    km.WGRAD, km.DGRAD, km.BLOCK_M, km.DX_LOOPS, km.GATE_UP = wgrad, dgrad, block_m, dx_loops, gate_up


def timed(fn, rep_ms: int = 100) -> float:
    return float("nan") if args.cpu_smoke else median_ms(fn, rep_ms=rep_ms)


def short(e: Exception) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:90]}"


def fmt_err(err: float, tol: float) -> str:
    return "" if err < tol else f" FAIL {err:.1e}"


def wrap(head: str, cells: list[str], per_line: int) -> list[str]:
    """cells joined per_line to a line, the first line headed."""
    return [(head if i == 0 else " " * len(head)) + " | ".join(cells[i:i + per_line])
            for i in range(0, len(cells), per_line)] or [head]


def pieces(tier: str, y: torch.Tensor, dy: torch.Tensor, ref_w: tuple, rows: list[dict]) -> tuple[list[str], dict, dict]:
    """The backward pieces from one Triton forward's saved tensors: each WGRADS variant (checked against ref_w, the
    reference's weight gradients: a copy of the default's would not fit beside them at V3) and each DCFGS config of
    the dh and dx GEMMs (checked against the default launch). Returns (lines, wgrad ms by variant, {piece: ms by
    config})."""
    N, D, E, I, K = TIERS[tier]
    x, route_w, wg, wu, wd, h, g, u, _ys, *al = y.grad_fn.saved_tensors
    al = km.MoEAlignment(*al)
    dy = dy.to(x.dtype)
    dg, du = torch.empty_like(g), torch.empty_like(u)
    km._gemm(dy, wd, dg, al, route_w, K, gather=True, epi=1, g=g, u=u, out2=du)
    dys = km._gather_rows(dy, al, route_w, K)
    need = (True, True, True)
    wflops = 3 * 2 * N * K * D * I  # the three weight gradients
    lines, wres, cells = [], {}, []
    for name, cfg in WGRADS.items():
        srt = bool(cfg.get("sorted"))

        def wgrad(srt=srt):
            return km._weight_grads(x, dy, km._gather_rows(dy, al, route_w, K) if srt else None, h, dg, du, al,
                                    route_w, K, E, need)

        res = attempt(cells, rows, tier, "wgrad", name, {"wgrad": cfg},
                      lambda w=wgrad: max(rel(a, b) for a, b in zip(w(), ref_w)), wgrad)
        if res is None:
            continue
        err, ms = res
        wres[name] = ms
        rows.append({"tier": tier, "piece": "wgrad", "variant": name, "wgrad": cfg, "ms": ms,
                     "TFLOPs": wflops / ms / 1e9, "err": err})
        cells.append(f"{name} {ms:.3f} ({wflops / ms / 1e9:.0f}T){fmt_err(err, FTOL)}")
    lines += wrap("  wgrad     ms ", cells, 4)

    used = int(al.expert_start[-1])  # padded rows in use: the row blocks past them are never written
    out_g, out_u, out_x = torch.empty_like(dg), torch.empty_like(du), torch.empty(N * K, D, device=x.device,
                                                                                   dtype=x.dtype)
    base_x = torch.empty_like(out_x)
    km._gemm(dg, wg, base_x, al, route_w, K, gather=False, epi=0, a2=du, b2=wu)
    def dx_launch(c, loops):  # dx with its two products in one K loop (1) or in two loops (2)
        knobs(dx_loops=loops)
        try:
            km._gemm(dg, wg, out_x, al, route_w, K, gather=False, epi=0, a2=du, b2=wu, cfg=c)
        finally:
            knobs()

    launches = {  # piece: (launch with a config, its outputs, the default's outputs)
        "dh": (lambda c: km._gemm(dy, wd, out_g, al, route_w, K, gather=True, epi=1, g=g, u=u, out2=out_u, cfg=c),
               (out_g[:used], out_u[:used]), (dg[:used], du[:used])),
        "dh-sorted": (lambda c: km._gemm(dys, wd, out_g, al, route_w, K, gather=False, epi=1, g=g, u=u, out2=out_u,
                                         cfg=c), (out_g[:used], out_u[:used]), (dg[:used], du[:used])),
        "dx": (lambda c: dx_launch(c, 1), (out_x,), (base_x,)),
        "dx-seq": (lambda c: dx_launch(c, 2), (out_x,), (base_x,)),
    }
    dres = {}
    fl = 2 * 2 * N * K * D * I
    for piece, (launch, outs, bases) in launches.items():
        dres[piece], cells = {}, []
        for cname, c in DCFGS.items():
            try:
                for o in outs:
                    o.fill_(float("nan"))
                launch(c)
                err = max(rel(o, b) for o, b in zip(outs, bases))
                ms = timed(lambda c=c, launch=launch: launch(c))
            except Exception as e:  # noqa: BLE001
                cells.append(f"{cname} failed ({type(e).__name__})")
                rows.append({"tier": tier, "piece": piece, "variant": cname, "error": short(e)})
                continue
            dres[piece][cname] = ms
            rows.append({"tier": tier, "piece": piece, "variant": cname, "cfg": c, "ms": ms,
                         "TFLOPs": fl / ms / 1e9, "err": err})
            cells.append(f"{cname} {ms:.3f} ({fl / ms / 1e9:.0f}T){fmt_err(err, WTOL)}")
        lines += wrap(f"  {piece:9s} ms ", cells, 5)
    return lines, wres, dres


def sweep_tier(tier: str, dev: str, dt: torch.dtype, g: torch.Generator) -> tuple[list[str], list[dict]]:
    """Every variant at one tier; returns (table lines, JSON rows)."""
    N, D, E, I, K = TIERS[tier]

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dt)

    x = rnd(N, D).requires_grad_()
    wg, wu = rnd(E, I, D, scale=D**-0.5).requires_grad_(), rnd(E, I, D, scale=D**-0.5).requires_grad_()
    wd = rnd(E, D, I, scale=I**-0.5).requires_grad_()
    indices = torch.rand(N, E, device=dev, generator=g).topk(K, dim=-1).indices  # balanced: K distinct uniform
    weights = torch.rand(N, K, device=dev, generator=g).softmax(-1).requires_grad_()
    dy = rnd(N, D)
    leaves = [x, weights, wg, wu, wd]
    flops = 3 * 6 * N * K * D * I  # fwd+bwd useful FLOPs of the routed experts

    def fwd_bwd(impl: str) -> tuple[torch.Tensor, ...]:
        y, _ = moe_experts(x, weights, indices, wg, wu, wd, impl=impl)
        return (y, *torch.autograd.grad(y, leaves, dy))

    rows = []
    ref = fwd_bwd("grouped" if dev == "cuda" else "loop")
    grouped_ms = timed(lambda: fwd_bwd("grouped")) if dev == "cuda" else float("nan")
    rows.append({"tier": tier, "piece": "fwd+bwd", "variant": "grouped", "ms": grouped_ms,
                 "TFLOPs": flops / grouped_ms / 1e9})
    # the forward (routing plumbing, gate/up, down, combine, keeping g and u for the backward) per gate/up variant
    fwd_ms, cells = {}, []
    def fwd():
        return moe_experts(x, weights, indices, wg, wu, wd, impl="triton")

    for name, c in GCFGS.items():
        got = attempt(cells, rows, tier, "fwd", name, {"gate_up": c}, lambda: rel(fwd()[0], ref[0]), fwd)
        if got is None:
            continue
        err, ms = got
        fwd_ms[name] = ms
        fl = 2 * 3 * N * K * D * I
        rows.append({"tier": tier, "piece": "fwd", "variant": name, "cfg": c, "ms": ms, "TFLOPs": fl / ms / 1e9,
                     "err": err})
        cells.append(f"{name} {ms:.3f} ({fl / ms / 1e9:.0f}T){fmt_err(err, FTOL)}")
    fwd_lines = wrap("  fwd       ms ", cells, 5)

    knobs()
    y = moe_experts(x, weights, indices, wg, wu, wd, impl="triton")[0]
    bm = km.BLOCK_M or km.block_m_for(N * K, E)
    head = f"{tier}: N={N} D={D} E={E} I={I} K={K} BM={bm} rows/expert={N * K / E:.0f}"
    lines = [f"{head}   grouped fwd+bwd {grouped_ms:.2f} ms ({flops / grouped_ms / 1e9:.0f} TFLOP/s)"]
    more, wres, dres = pieces(tier, y, dy, ref[3:6], rows)
    lines += fwd_lines + more
    del y
    torch.cuda.empty_cache() if dev == "cuda" else None

    # whole fwd+bwd per combination; "best" takes this tier's fastest measured pieces
    best_w = min((k for k in wres if k != "default"), key=wres.get, default="sorted-fused")
    dh_piece = "dh-sorted" if WGRADS[best_w].get("sorted") else "dh"
    best_d = {p: min(dres[k], key=dres[k].get) for p, k in (("dh", dh_piece),) if dres.get(k)}
    dx_loops = {"dx": 1, "dx-seq": 2}
    dx_best = min(((dres[k][c], k, c) for k in dx_loops for c in dres.get(k, {})), default=None)
    loops = DEFAULTS[3]
    if dx_best:
        best_d["dx"], loops = dx_best[2], dx_loops[dx_best[1]]
    dgrad = {p: DCFGS[c] for p, c in best_d.items()}
    best_f = min(fwd_ms, key=fwd_ms.get, default=None)
    combos = {  # name: (WGRAD, DGRAD, BLOCK_M, DX_LOOPS, GATE_UP)
        "default": DEFAULTS,
        f"w:{best_w}": (WGRADS[best_w], None, None, *DEFAULTS[3:]),
        f"w:{best_w}+d:{best_d.get('dh')}/{best_d.get('dx')}/loops{loops}": (WGRADS[best_w], dgrad, None, loops,
                                                                          DEFAULTS[4]),
        f"same+f:{best_f}": (WGRADS[best_w], dgrad, None, loops, GCFGS[best_f] if best_f else DEFAULTS[4]),
    }
    if bm != 128 and dev == "cuda":  # c0 fits BM = 128 (the best BM = 64 configs may not)
        combos["w:same+d:c0/c0+BM128"] = (WGRADS[best_w], {"dh": DCFGS["c0"], "dx": DCFGS["c0"]}, 128, *DEFAULTS[3:])
    if bm != 64 and dev == "cuda":
        combos["default+BM64"] = (*DEFAULTS[:2], 64, *DEFAULTS[3:])
    cells = []
    for name, (w, d, b, lp, gu) in combos.items():
        got = attempt(cells, rows, tier, "fwd+bwd", name, {"wgrad": w, "dgrad": d, "block_m": b, "dx_loops": lp,
                                                           "gate_up": gu},
                      lambda: max(rel(a, r) for a, r in zip(fwd_bwd("triton"), ref)), lambda: fwd_bwd("triton"), 300)
        if got is None:
            continue
        err, ms = got
        rows.append({"tier": tier, "piece": "fwd+bwd", "variant": name, "wgrad": w, "dgrad": d, "block_m": b, "dx_loops": lp,
                     "gate_up": gu,
                     "ms": ms, "TFLOPs": flops / ms / 1e9, "err": err, "speedup_vs_grouped": grouped_ms / ms})
        cells.append(f"{name} {ms:.2f} ({grouped_ms / ms:.2f}x){fmt_err(err, FTOL)}")
    lines += wrap("  fwd+bwd   ms ", cells, 2)
    errs = [r["err"] for r in rows if "err" in r]
    lines[-1] += f"   max err {max(errs, default=float('nan')):.1e}"
    return lines, rows


def main() -> None:
    if args.cpu_smoke:
        g = torch.Generator().manual_seed(0)
        lines, rows = sweep_tier("smoke", "cpu", torch.float32, g)
        print("\n".join(lines))
        bad = [r for r in rows if not r.get("err", 0) < (FTOL if r["piece"] in ("fwd+bwd", "wgrad") else WTOL) or "error" in r]
        sys.exit(f"smoke: {len(bad)} rows failed" if bad else 0)
    if not torch.cuda.is_available():
        sys.exit("bench/sweep_moe.py needs a CUDA GPU (or --cpu-smoke)")
    meta = metadata()
    tf, bw = matmul_tflops(), copy_bandwidth_gbs()
    meta.update(matmul_bf16_TFLOPs=round(tf, 1), copy_GBs=round(bw), autotune=args.autotune)
    print(f"{meta['device']} triton {meta['triton']}: bf16 matmul {tf:.0f} TFLOP/s, copy {bw / 1e3:.2f} TB/s; "
          f"ms per call (TFLOP/s of useful work); autotune={args.autotune}")
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for tier in args.tiers:
        try:
            lines, r = sweep_tier(tier, "cuda", torch.bfloat16, g)
        except Exception as e:  # noqa: BLE001
            lines, r = [f"{tier}: failed: {short(e)}"], []
        print("\n".join(lines), flush=True)
        rows += r
        torch.cuda.empty_cache()
    write_results(args.out, "sweep_moe", meta, rows, ["tier", "piece", "variant", "ms", "TFLOPs", "err"],
                  "Triton MoE backward variants (bench/sweep_moe.py).")
    print(f"rows: {args.out / 'sweep_moe.json'}")


if __name__ == "__main__":
    main()
