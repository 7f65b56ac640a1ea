"""A DeepSeekMoE layer on the GPU: minids' Triton experts against the torch._grouped_mm pipeline and the per-expert
loop (both ``minids.moe.moe_experts``), forward and forward+backward, balanced and Zipf-like routing.

    python3 bench/moe.py --out bench/results          # all tiers (under 4 minutes on an H200)
    python3 bench/moe.py --out /tmp/r --quick         # the V2-Lite tier only
    python3 bench/moe.py --out /tmp/r --tiers v2-lite --profile   # + the CUDA time of each kernel of one fwd+bwd
    python3 bench/moe.py --out /tmp/r --quick --rounds 5          # each impl 5 times, taking turns: the median

What is timed: the routed experts for a given routing (weights, indices), plus the shared experts (a cuBLAS SwiGLU
MLP, the same kernels in every column; beside the routed kernels on a side stream for triton, after them for the
others), as the MoE layer computes them; the router's (N, E) GEMM and top-k are left out, so
that the routing can be drawn balanced or skewed. bf16 activations and weights, float32 routing weights.
forward+backward computes the gradients of x, the routing weights and every expert weight.

Useful work: 2 * 3 * D * I FLOPs per (token, routed expert) pair and 2 * 3 * D * I_shared per token forward, three
times that forward+backward; padding, gathers and recomputation are not counted. The bf16 ceiling is an 8192^3
torch.matmul measured in the same run. The GEMMs are compute bound and their weights are far larger than L2, so
inputs are not rotated. Each column runs in a try: a failing peer prints one line and the sweep goes on.

Routing: balanced draws K distinct experts uniformly per token; zipf draws them without replacement with
probability proportional to 1 / rank (Gumbel top-K), so the first experts take a large share of the tokens.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import matmul_tflops, median_ms, metadata, write_results

from minids.moe import moe_experts, shared_beside_routed

TIERS = {  # name: (tokens, hidden D, experts E, expert width I, top-K, shared experts)
    "small": (16384, 1024, 16, 512, 4, 0),
    "v2-lite": (8192, 2048, 64, 1408, 6, 2),
    "v3-4k": (4096, 7168, 256, 2048, 8, 1),
    "v3-16k": (16384, 7168, 256, 2048, 8, 1),
}
IMPLS = ["triton", "triton-serial", "grouped", "loop"]
NOTES = """Notes. triton (minids.kernels.moe): routing plumbing on device (sort, pad each expert to the row block, no host
sync); the gate/up GEMM gathers token rows of x on load (no permuted copy of x) and applies SwiGLU in its epilogue
(one write of h instead of g, u, silu(g) and the product); the down GEMM writes each pair's unweighted output to its
token-major row and one pass sums the K rows per token with the routing weights in float32 (deterministic, no
atomics, no scatter-add). The backward gathers x and (weights * dy) once into padded-row order, fuses the SwiGLU backward
into the dh GEMM's epilogue, runs the gate and up products of dx in one kernel, and reduces each expert's weight
gradients over its rows in fixed-tile GEMMs (dW_gate and dW_up from one launch sharing each x tile). grouped: sort + index_select + torch._grouped_mm x3 +
index_add (minids.moe.moe_experts impl="grouped"). loop: one GEMM triple per expert on contiguous slices.
Shared experts (V2-Lite 2, V3 1; none at the small tier): triton runs them on a side CUDA stream beside the routed
kernels, as DeepSeekMoE does on CUDA (minids.moe.shared_beside_routed; autograd overlaps the backward the same way);
triton-serial, grouped and loop run them after the routed experts on one stream."""


def draw_routing(N: int, E: int, K: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weights (N, K) float32 summing to 1 per token, indices (N, K) int64 of K distinct experts."""
    gumbel = -torch.log(-torch.log(torch.rand(N, E, device="cuda", generator=g).clamp_min(1e-20)))
    if kind == "zipf":
        gumbel = gumbel + (-torch.log(torch.arange(1, E + 1, device="cuda").float()))  # log p, p ~ 1 / rank
    indices = gumbel.topk(K, dim=-1).indices
    weights = torch.rand(N, K, device="cuda", generator=g).softmax(-1)
    return weights, indices


def bench_tier(tier: str, ceiling: float, g: torch.Generator, rounds: int = 1) -> list[dict]:
    """Every impl, both routings, forward and forward+backward, at one tier; returns the table rows (the median of
    rounds measurements, the impls taking turns)."""
    N, D, E, I, K, n_shared = TIERS[tier]
    Is = n_shared * I
    dt = torch.bfloat16

    def param(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", dtype=dt, generator=g) / math.sqrt(fan_in)).requires_grad_()

    x = torch.randn(N, D, device="cuda", dtype=dt, generator=g).requires_grad_()
    wg, wu, wd = param(E, I, D, fan_in=D), param(E, I, D, fan_in=D), param(E, D, I, fan_in=I)
    shared = [param(Is, D, fan_in=D), param(Is, D, fan_in=D), param(D, Is, fan_in=Is)] if Is else []
    dy = torch.randn(N, D, device="cuda", dtype=dt, generator=g)
    flops_fwd = 6 * N * K * D * I + 6 * N * D * Is
    rows = []
    for kind in ("balanced", "zipf"):
        weights, indices = draw_routing(N, E, K, kind, g)
        weights.requires_grad_()
        top_share = torch.bincount(indices.flatten(), minlength=E).max().item() / (N * K)

        def layer(impl: str, weights: torch.Tensor = weights, indices: torch.Tensor = indices) -> torch.Tensor:
            def routed() -> torch.Tensor:
                return moe_experts(x, weights, indices, wg, wu, wd, impl=impl.removesuffix("-serial"))[0]

            if not shared:
                return routed()
            sg, su, sd = shared
            # the shared experts beside the routed ones on a side stream (DeepSeekMoE's way) for minids' layer;
            # one after the other for "triton-serial" and the torch peers
            y, ys = shared_beside_routed(x, routed, lambda h: F.linear(F.silu(F.linear(h, sg)) * F.linear(h, su), sd),
                                         overlap=impl == "triton")
            return y + ys

        params = [x, weights, wg, wu, wd, *shared]
        # without shared experts triton-serial is the same run as triton
        impls = [i for i in IMPLS if shared or i != "triton-serial"]
        ref, errs, times = None, {}, {impl: ([], []) for impl in impls}
        for rnd in range(rounds):  # the impls take turns each round, so slow drifts (clocks, heat) hit them alike
            for impl in impls:
                if impl in errs and errs[impl] is None:
                    continue  # failed in an earlier round
                try:
                    with torch.no_grad():
                        if rnd == 0:
                            y = layer(impl)  # also compiles and autotunes the forward kernels
                            if ref is None:
                                ref = y.float()
                            errs[impl] = ((y.float() - ref).norm() / ref.norm()).item()
                        times[impl][0].append(median_ms(lambda impl=impl: layer(impl)))
                    if rnd == 0:  # autotune the backward kernels outside the timer: do_bench sizes its repetitions
                        torch.autograd.grad(layer(impl), params, dy)  # from its first calls
                    times[impl][1].append(median_ms(lambda impl=impl, params=params: torch.autograd.grad(
                        layer(impl), params, dy)))
                except Exception as e:  # noqa: BLE001  a failing peer is one line, the sweep goes on
                    print(f"{tier} {kind} {impl}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    errs[impl] = None
        for impl in impls:
            if errs.get(impl) is None:
                continue
            err = errs[impl]
            f_ms, fb_ms = (statistics.median(t) for t in times[impl])
            f_tf, fb_tf = flops_fwd / f_ms / 1e9, 3 * flops_fwd / fb_ms / 1e9
            rows.append({
                "tier": tier, "routing": kind, "top_expert_share": round(top_share, 3), "impl": impl,
                "N": N, "D": D, "E": E, "I": I, "K": K, "shared": n_shared,
                "fwd_ms": f_ms, "fwd_TFLOPs": f_tf, "fwd_of_ceiling": f_tf / ceiling,
                "fwd_bwd_ms": fb_ms, "fwd_bwd_TFLOPs": fb_tf, "fwd_bwd_of_ceiling": fb_tf / ceiling,
                "rel_err_vs_triton": err, "rounds": len(times[impl][1]),
                "fwd_bwd_ms_each_round": [round(t, 3) for t in times[impl][1]],
            })
            print(f"{tier:8s} {kind:8s} {impl:13s} fwd {f_ms:8.3f} ms {f_tf:6.1f} TFLOP/s ({f_tf / ceiling:.0%})"
                  f"   fwd+bwd {fb_ms:8.3f} ms {fb_tf:6.1f} TFLOP/s ({fb_tf / ceiling:.0%})   err {err:.1e}"
                  + (f"   rounds {' '.join(f'{t:.2f}' for t in times[impl][1])}" if rounds > 1 else ""))
        base = {r["impl"]: r for r in rows if r["routing"] == kind}
        for name in ("triton", "triton-serial"):
            if name in base and "grouped" in base:
                t, gr = base[name], base["grouped"]
                t["fwd_speedup_vs_grouped"] = gr["fwd_ms"] / t["fwd_ms"]
                t["fwd_bwd_speedup_vs_grouped"] = gr["fwd_bwd_ms"] / t["fwd_bwd_ms"]
    return rows


def profile_tier(tier: str, g: torch.Generator) -> list[dict]:
    """CUDA time per kernel of one Triton forward+backward at a tier (balanced routing), largest first."""
    from torch.profiler import ProfilerActivity, profile

    N, D, E, I, K, _ = TIERS[tier]
    dt = torch.bfloat16
    x = torch.randn(N, D, device="cuda", dtype=dt, generator=g).requires_grad_()
    ws = [(torch.randn(*sh, device="cuda", dtype=dt, generator=g) / math.sqrt(sh[-1])).requires_grad_()
          for sh in ((E, I, D), (E, I, D), (E, D, I))]
    weights, indices = draw_routing(N, E, K, "balanced", g)
    weights.requires_grad_()
    dy = torch.randn(N, D, device="cuda", dtype=dt, generator=g)

    def step() -> None:
        y, _ = moe_experts(x, weights, indices, *ws, impl="triton")
        torch.autograd.grad(y, [x, weights, *ws], dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", 0) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            rows.append({"tier": tier, "kernel": ev.key[:90], "calls_per_step": ev.count / 5, "ms_per_step": us / 5e3})
    rows.sort(key=lambda r: -r["ms_per_step"])
    total = sum(r["ms_per_step"] for r in rows)
    print(f"profile {tier}: {total:.3f} ms of kernels per forward+backward (routed experts only)")
    for r in rows[:15]:
        print(f"  {r['ms_per_step']:8.3f} ms  {r['calls_per_step']:4.1f}x  {r['kernel']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--quick", action="store_true", help="the V2-Lite tier only")
    ap.add_argument("--tiers", nargs="+", choices=list(TIERS), help="the tiers to run (default all)")
    ap.add_argument("--profile", action="store_true", help="also time each kernel of the Triton path per tier")
    ap.add_argument("--rounds", type=int, default=1, help="measure each impl this many times, taking turns; report "
                    "the median")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least 1")
    if not torch.cuda.is_available():
        sys.exit("bench/moe.py needs a CUDA GPU")
    meta = metadata()
    ceiling = matmul_tflops()
    meta["matmul_bf16_TFLOPs"] = round(ceiling, 1)
    print(f"{meta['device']}: bf16 matmul {ceiling:.0f} TFLOP/s")
    tiers = args.tiers or (["v2-lite"] if args.quick else list(TIERS))
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for tier in tiers:
        rows += bench_tier(tier, ceiling, g, args.rounds)
        torch.cuda.empty_cache()
    cols = ["tier", "routing", "top_expert_share", "impl", "fwd_ms", "fwd_TFLOPs", "fwd_of_ceiling", "fwd_bwd_ms",
            "fwd_bwd_TFLOPs", "fwd_bwd_of_ceiling", "fwd_speedup_vs_grouped", "fwd_bwd_speedup_vs_grouped",
            "rel_err_vs_triton", "rounds"]
    print(write_results(args.out, "moe", meta, rows, cols, NOTES))
    if args.profile:
        prof = [r for tier in tiers for r in profile_tier(tier, g)]
        write_results(args.out, "moe_profile", meta, prof, ["tier", "kernel", "calls_per_step", "ms_per_step"],
                      "CUDA time per kernel of one Triton forward+backward of the routed experts (torch.profiler).")


if __name__ == "__main__":
    main()
