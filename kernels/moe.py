"""The routed experts of a MoE layer in Triton: grouped GEMMs that gather token rows on load, SwiGLU fused into the
gate/up GEMM, a deterministic weighted combine, and the backward pass, as one autograd function.

Mirrors ``minids.moe.moe_experts`` (same name, same signature; impl and fp8 must be left at their defaults here):

    y_t = sum_k weights[t, k] * W_down[e] (silu(W_gate[e] x_t) * (W_up[e] x_t)),   e = indices[t, k]

Shapes: N tokens, D hidden, I expert width, E experts, K experts per token, P = N * K (token, expert) pairs,
P_pad padded rows (``minids.moe.moe_align``), BM the row block (every expert's rows padded to a multiple of it).

Forward, three launches after the routing plumbing (``moe_align``: sort, pad, all on device, no host sync):
  1. gate/up GEMM: row block b of expert e gathers its tokens' rows of x on load (no permuted copy of x), runs
     x W_gate[e]^T and x W_up[e]^T into two float32 accumulators and writes h = silu(g) * u (the SwiGLU epilogue)
     and, for the backward, g and u: (P_pad, I) each.
  2. down GEMM: h W_down[e]^T, written unweighted to ys: (P, D) at each pair's own row t * K + k (token-major),
     so the combine reads K adjacent rows.
  3. combine: y_t = sum_k weights[t, k] * ys[t * K + k] in float32, one pass, no atomics, deterministic.
Backward (dy: (N, D)):
  d weights[t, k] = <dy_t, ys[t * K + k]>                      (why ys is kept unweighted)
  dh = (weights * dy[token]) W_down[e]  with the SwiGLU backward in the epilogue -> dg, du
  dxs = dg W_gate[e] + du W_up[e]       two products into one accumulator, to each pair's row; dx = sum_k dxs
  dW_down[e] = (weights * dy[token])^T h,  dW_gate[e] = dg^T x[token],  dW_up[e] = du^T x[token]
     (grouped "weight-gradient" GEMMs that reduce over each expert's rows; dW_gate and dW_up in one launch)
  By default (WGRAD below) x[token] and (weights * dy[token]) are first gathered once into padded-row order, two
  (P_pad, D) copies that the dh GEMM and the weight gradients read with plain strides; WGRAD without "sorted"
  gathers them on load in every GEMM instead (less memory, slower).
g and u are kept from the forward (2 * P_pad * I elements) instead of recomputing the gate/up GEMM: a third of the
forward FLOPs saved in the backward for memory the torch._grouped_mm pipeline's autograd keeps as well.

Rounding follows the reference where it is cheap: GEMM operands in the compute dtype with float32 accumulation,
ys rounded to the compute dtype before the weighted float32 combine, (weights * dy) rounded before its GEMMs.
SwiGLU is evaluated in float32 and rounded once (the reference rounds g, u, silu(g) and the product separately).

Backward variants, chosen at run time by the module knobs WGRAD, DGRAD, DX_LOOPS and BLOCK_M (bench/sweep_moe.py
times each; DGRAD None keeps the autotuned kernels; WGRAD's default is sorted + fused): the weight gradients through
``_wgrad_tiles_kernel`` with a fixed tile, optionally (sorted) from x and (weights * dy) gathered once into
padded-row order by ``_gather_rows_kernel`` (no pair -> token -> address chain in the K loop; the dh GEMM then reads
the same copy), (fuse) dW_gate and dW_up from one
launch sharing each x tile, (programs) a persistent grid walking the (expert, m, n) tiles, (flat) with Triton's
loop flattening so one tile's store overlaps the next tile's loads; DGRAD fixes the dh and dx launch configs;
BLOCK_M the row block.

Tiles (H200: 227 KB shared memory, 255 registers a thread): BM is 64 or 128 (``block_m_for``, the routing pad);
autotuning picks among a few (BN, BK, warps, stages) configurations per GEMM kernel (``_configs``), keyed on the
widths; the weight gradients take WGRAD's fixed tile. Shared memory
per pipeline stage is (BM + BN) * BK * 2 bytes per operand pair: the gate/up GEMM (two weight tiles) at BM = BN = 128
with 3 stages takes 144 KB, the dx GEMM (two operand pairs) 192 KB; the two float32 accumulators of the gate/up GEMM
hold 128 registers a thread at BM = BN = 128 with 8 warps.

Preconditions: x (N, D) float32 or bf16/fp16 (under autocast the GEMMs run in autocast's dtype, as the reference),
weights (N, K) float, indices (N, K) integer in [0, E), w_gate / w_up (E, I, D), w_down (E, D, I), all on one
device. Runs on CUDA with Triton, or under TRITON_INTERPRET=1 (small blocks, one configuration, no autotuning).
"""

from __future__ import annotations

import torch
from minids.kernels import AUTOTUNE, HAVE_TRITON, INTERPRET, require_runs_here, sm_count

if HAVE_TRITON:
    from minids.kernels import grouped_order

from minids.moe import MoEAlignment, _compute_dtype, check_experts_args, moe_align

__all__ = ["block_m_for", "moe_experts"]

# Run-time variants of the backward (bench/sweep_moe.py times and checks each).
# WGRAD: the weight gradients' _wgrad_tiles_kernel launches, a dict:
#   sorted: gather x and (weights * dy) once into padded-row order (also the dh GEMM's operand) instead of on load;
#   fuse: dW_gate and dW_up in one launch sharing the x tile; programs: 0 one program per output tile, else a
#   persistent grid of that many programs per SM; flat: flatten the tile and row loops (Triton's loop fusion);
#   tile: (BMW, BNW, BK, warps, stages).
# Default sorted + fused: on the H200 (bench/sweep_moe.py, 2026-12-01, fixed configs) the three weight gradients took
# 0.49 / 2.23 / 14.3 ms at the small / V2-Lite / V3-4k tiers against 0.70 / 3.15 / 18.4 for an autotuned kernel
# gathering on load (since removed: a fixed-tile gathering launch is WGRAD without "sorted").
WGRAD: dict = {"sorted": True, "fuse": True,
                      "tile": (32, 32, 16, 1, 1) if INTERPRET else (128, 128, 64, 8, 3)}
# DGRAD: None (autotuned), or {"dh": cfg, "dx": cfg} with cfg = (BN, BK, warps, stages, GROUP_M) fixing the
# _grouped_kernel launch of dh = (weights * dy) W_down (SwiGLU backward epilogue) or of dxs = dg W_gate + du W_up.
DGRAD: dict | None = None
# DX_LOOPS: how the dx GEMM (dg W_gate + du W_up) runs its two products: 1 in one K loop (both operand pairs per
# pipeline stage), 2 in two loops one after the other (_grouped_kernel's TWO). Default 2: the best dx at V3-4k in
# bench/sweep_moe.py (6.1 ms against 6.8 in one loop; V2-Lite 1.11 against 1.25). One GEMM over the joined K (the
# second pair addressed by its offset from the first) measured no better (6.4 / 1.08 ms) and was dropped.
DX_LOOPS: int = 2
# GATE_UP: None (autotuned), or (BN, BK, warps, stages, GROUP_M) fixing the gate/up GEMM's launch. Gathering x on
# load costs nothing here: reading x from a copy sorted into padded-row order measured the same (2.00 against 2.01 ms
# for the V2-Lite forward, 9.9 against 9.6 at V3-4k; bench/sweep_moe.py 2026-12-01), so no copy is made.
GATE_UP: tuple | None = None
# BLOCK_M: None (block_m_for), or the row block every expert is padded to (64 or 128; 16 under the interpreter).
BLOCK_M: int | None = None

if HAVE_TRITON:
    import triton
    import triton.language as tl

    def _configs(gpu: list[tuple[int, int, int, int]], names: tuple[str, str]) -> list[triton.Config]:
        """Autotune configs from (block_a, block_b, warps, stages); under the interpreter one small config."""
        if INTERPRET:
            return [triton.Config({names[0]: 32, names[1]: 32}, num_warps=1, num_stages=1)]
        return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s)
                for a, b, w, s in (gpu if AUTOTUNE else gpu[:1])]

    @triton.autotune(
        # (128, 64, 8, 4): the fastest bf16 forward at V2-Lite and V3-4k in bench/sweep_moe.py (2.01 / 9.6 ms against
        # 2.20 / 10.7 for (64, 64, 4, 4)); not first, since without autotuning the first config must also fit float32
        # operands in shared memory (it needs 240 KB there)
        configs=_configs([(64, 64, 4, 4), (128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 8, 4)], ("BN", "BK")),
        key=["Ndim", "Kdim", "STORE_GU", "BM"],
    )
    @triton.jit
    def _gate_up_kernel(
        X, WG, WU, H, G, U, SORTED_PAIR, BLOCK_EXPERT,
        n_blocks, Ndim, Kdim, top_k,
        STORE_GU: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        GROUP_M: tl.constexpr = 8,
    ):
        """h = silu(x W_gate[e]^T) * (x W_up[e]^T) for one (BM, BN) tile of padded rows.

        X: (N, Kdim=D) gathered by token; WG, WU: (E, Ndim=I, D); H, G, U: (P_pad, I).
        """
        pid_m, pid_n = grouped_order(tl.program_id(0), n_blocks, tl.cdiv(Ndim, BN), GROUP_M)
        e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
        if e >= 0:
            rows = pid_m * BM + tl.arange(0, BM)  # (BM,) padded rows
            pair = tl.load(SORTED_PAIR + rows)
            valid = pair >= 0
            token = tl.where(valid, pair // top_k, 0).to(tl.int64)  # (BM,): gather on load, no permuted copy
            cols = pid_n * BN + tl.arange(0, BN)  # (BN,) over I
            cmask = cols < Ndim
            ks = tl.arange(0, BK)
            a_ptr = X + token[:, None] * Kdim + ks[None, :]  # (BM, BK)
            w_off = e * Ndim * Kdim + cols[None, :].to(tl.int64) * Kdim + ks[:, None]  # (BK, BN): W^T tile
            acc_g = tl.zeros((BM, BN), dtype=tl.float32)
            acc_u = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, Kdim, BK):
                kmask = k0 + ks < Kdim
                a = tl.load(a_ptr + k0, mask=valid[:, None] & kmask[None, :], other=0.0)
                bmask = kmask[:, None] & cmask[None, :]
                acc_g = tl.dot(a, tl.load(WG + w_off + k0, mask=bmask, other=0.0), acc_g, input_precision=PREC)
                acc_u = tl.dot(a, tl.load(WU + w_off + k0, mask=bmask, other=0.0), acc_u, input_precision=PREC)
            h = acc_g * tl.sigmoid(acc_g) * acc_u  # SwiGLU epilogue, float32, rounded once
            out = rows[:, None].to(tl.int64) * Ndim + cols[None, :]
            tl.store(H + out, h.to(H.dtype.element_ty), mask=cmask[None, :])
            if STORE_GU:
                tl.store(G + out, acc_g.to(G.dtype.element_ty), mask=cmask[None, :])
                tl.store(U + out, acc_u.to(U.dtype.element_ty), mask=cmask[None, :])

    @triton.autotune(  # H200 profile of V2-Lite fwd+bwd: these three launches are 38% of the kernel time
        # (128, 64, 4, 3): the fastest dh and dx at V3-4k in bench/sweep_moe.py (3.4 and 7.4 ms against 4.7 and 15.2
        # for the first config): weight-bound at 64 rows a block, the 4-warp tile keeps more loads in flight
        # (256, 64, 8, 4): the fastest dx (two loops) at every tier and dh at V3-4k in the 2026-12-01 sweep (1.13 ms
        # at V2-Lite against 1.28 for the best one-loop dx); it does not fit one loop's shared memory (skipped there)
        configs=_configs([(128, 64, 8, 3), (64, 64, 4, 4), (256, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                          (128, 64, 4, 3), (256, 64, 8, 4), (128, 64, 4, 4)], ("BN", "BK")),
        key=["Ndim", "Kdim", "A_GATHER", "TWO", "EPI", "BM"],
    )
    @triton.jit
    def _grouped_kernel(
        A, A2, B, B2, C, C2, G, U, SORTED_PAIR, BLOCK_EXPERT, ROUTE_W,
        n_blocks, Ndim, Kdim, top_k, stride_be, stride_bk, stride_bn,
        A_GATHER: tl.constexpr, TWO: tl.constexpr, EPI: tl.constexpr, PREC: tl.constexpr,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr = 8,
    ):
        """C = A B[e] (+ A2 B2[e]) for one (BM, BN) tile of padded rows of expert e.

        TWO 0: A B[e] only; 1: both products in each K step (one loop, both operand pairs in every pipeline stage);
        2: A2 B2[e] in a second loop after the first (half the shared memory per stage, so more stages or wider
        tiles fit; each loop drains its pipeline once). A2 has A's strides (and is never gathered), B2 has B's.

        A (and A2): (P_pad, Kdim) padded rows, or with A_GATHER (N, Kdim) rows gathered by token and scaled by the
        pair's routing weight (rounded to A's dtype: the reference's (weights * dy)); B[e] (Kdim, Ndim) read through
        strides, so W (E, out, in) serves as W^T without a copy.
        EPI 0: store C (P, Ndim) at each pair's row t * K + k; padded rows are skipped.
        EPI 1: SwiGLU backward with G, U (P_pad, Ndim): C <- dg = acc * u * silu'(g), C2 <- du = acc * silu(g).
        """
        pid_m, pid_n = grouped_order(tl.program_id(0), n_blocks, tl.cdiv(Ndim, BN), GROUP_M)
        e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
        if e >= 0:
            rows = pid_m * BM + tl.arange(0, BM)  # (BM,)
            pair = tl.load(SORTED_PAIR + rows)
            valid = pair >= 0
            if A_GATHER:
                a_rows = tl.where(valid, pair // top_k, 0).to(tl.int64)  # (BM,) tokens
                scale = tl.load(ROUTE_W + pair, mask=valid, other=0.0)  # (BM,) float32
            else:
                a_rows = rows.to(tl.int64)
            cols = pid_n * BN + tl.arange(0, BN)
            cmask = cols < Ndim
            ks = tl.arange(0, BK)
            a_off = a_rows[:, None] * Kdim + ks[None, :]  # (BM, BK)
            b_off = e * stride_be + ks[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, Kdim, BK):
                kmask = k0 + ks < Kdim
                amask = valid[:, None] & kmask[None, :]
                bmask = kmask[:, None] & cmask[None, :]
                a = tl.load(A + a_off + k0, mask=amask, other=0.0)
                if A_GATHER:
                    a = (a.to(tl.float32) * scale[:, None]).to(A.dtype.element_ty)
                acc = tl.dot(a, tl.load(B + b_off + k0 * stride_bk, mask=bmask, other=0.0), acc, input_precision=PREC)
                if TWO == 1:
                    a2 = tl.load(A2 + a_off + k0, mask=amask, other=0.0)
                    b2 = tl.load(B2 + b_off + k0 * stride_bk, mask=bmask, other=0.0)
                    acc = tl.dot(a2, b2, acc, input_precision=PREC)
            if TWO == 2:  # the second product in its own pipelined loop: half the shared memory per stage
                for k0 in range(0, Kdim, BK):
                    kmask = k0 + ks < Kdim
                    a2 = tl.load(A2 + a_off + k0, mask=valid[:, None] & kmask[None, :], other=0.0)
                    b2 = tl.load(B2 + b_off + k0 * stride_bk, mask=kmask[:, None] & cmask[None, :], other=0.0)
                    acc = tl.dot(a2, b2, acc, input_precision=PREC)
            if EPI == 0:
                out = pair[:, None].to(tl.int64) * Ndim + cols[None, :]  # (BM, BN): pair-major rows
                tl.store(C + out, acc.to(C.dtype.element_ty), mask=valid[:, None] & cmask[None, :])
            else:
                out = rows[:, None].to(tl.int64) * Ndim + cols[None, :]  # (BM, BN): padded rows
                g = tl.load(G + out, mask=cmask[None, :], other=0.0).to(tl.float32)
                u = tl.load(U + out, mask=cmask[None, :], other=0.0).to(tl.float32)
                sig = tl.sigmoid(g)
                dg = acc * u * sig * (1.0 + g * (1.0 - sig))  # d silu(g) / dg = sig * (1 + g (1 - sig))
                du = acc * g * sig
                tl.store(C + out, dg.to(C.dtype.element_ty), mask=cmask[None, :])
                tl.store(C2 + out, du.to(C2.dtype.element_ty), mask=cmask[None, :])

    @triton.jit
    def _wgrad_tiles_kernel(
        A, A2, B, DW, DW2, SORTED_PAIR, EXPERT_START, ROUTE_W,
        Mdim, Ndim, top_k, n_tiles,
        A_GATHER: tl.constexpr, B_GATHER: tl.constexpr, TWO: tl.constexpr, FLAT: tl.constexpr, PREC: tl.constexpr,
        BMW: tl.constexpr, BNW: tl.constexpr, BK: tl.constexpr,
    ):
        """DW[e] = A_e^T B_e: (Mdim, Ndim), reducing over expert e's padded rows [EXPERT_START[e], EXPERT_START[e+1])
        (an expert with no rows gets zeros), with an explicit config: programs walk the (expert, m, n) output tiles
        (tile = program id + i * programs), so a grid smaller than n_tiles makes them persistent; FLAT asks Triton to
        flatten the tile and row loops into one pipelined loop (the next tile's loads overlap this tile's store).
        TWO: DW2[e] = A2_e^T B_e in the same program from the same B tile (dW_gate and dW_up share x).
        A, A2: (rows, Mdim); B: (rows, Ndim); DW, DW2: (E, Mdim, Ndim). A *_GATHER operand is (N, dim) read at each
        pair's token, and a gathered A is scaled by the routing weight (the (weights * dy) of dW_down).
        """
        tiles_n = tl.cdiv(Ndim, BNW)
        per_e = tl.cdiv(Mdim, BMW) * tiles_n
        ks = tl.arange(0, BK)
        for tile in tl.range(tl.program_id(0), n_tiles, tl.num_programs(0), flatten=FLAT):
            e = tile // per_e
            ms = (tile % per_e) // tiles_n * BMW + tl.arange(0, BMW)
            ns = tile % tiles_n * BNW + tl.arange(0, BNW)
            mmask = ms < Mdim
            nmask = ns < Ndim
            start = tl.load(EXPERT_START + e)
            end = tl.load(EXPERT_START + e + 1)
            acc = tl.zeros((BMW, BNW), dtype=tl.float32)
            acc2 = tl.zeros((BMW, BNW), dtype=tl.float32)
            for r0 in range(start, end, BK):
                r = r0 + ks  # (BK,) padded rows
                if A_GATHER or B_GATHER:
                    pair = tl.load(SORTED_PAIR + r, mask=r < end, other=-1)
                    valid = pair >= 0
                    token = tl.where(valid, pair // top_k, 0).to(tl.int64)
                else:  # operands in padded-row order (zeros at padding): no index load ahead of the operand loads
                    pair = r
                    valid = r < end
                    token = r.to(tl.int64)
                a_rows = token if A_GATHER else r.to(tl.int64)
                b_rows = token if B_GATHER else r.to(tl.int64)
                amask = mmask[:, None] & valid[None, :]
                a = tl.load(A + a_rows[None, :] * Mdim + ms[:, None], mask=amask, other=0.0)  # (BMW, BK)
                if A_GATHER:
                    scale = tl.load(ROUTE_W + pair, mask=valid, other=0.0)
                    a = (a.to(tl.float32) * scale[None, :]).to(A.dtype.element_ty)
                b = tl.load(B + b_rows[:, None] * Ndim + ns[None, :], mask=valid[:, None] & nmask[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PREC)
                if TWO:
                    a2 = tl.load(A2 + a_rows[None, :] * Mdim + ms[:, None], mask=amask, other=0.0)
                    acc2 = tl.dot(a2, b, acc2, input_precision=PREC)
            out = e.to(tl.int64) * Mdim * Ndim + ms[:, None].to(tl.int64) * Ndim + ns[None, :]
            omask = mmask[:, None] & nmask[None, :]
            tl.store(DW + out, acc.to(DW.dtype.element_ty), mask=omask)
            if TWO:
                tl.store(DW2 + out, acc2.to(DW2.dtype.element_ty), mask=omask)

    @triton.jit
    def _gather_rows_kernel(SRC, DST, SORTED_PAIR, ROUTE_W, n_rows, Dcols, top_k,
                            SCALE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
        """DST[r] = SRC[pair // K] (SCALE: times ROUTE_W[pair], rounded to DST's dtype) at each padded row r whose
        pair is >= 0, zeros at padding rows. SRC: (N, D); DST: (P_pad, D)."""
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        ds = tl.program_id(1) * BD + tl.arange(0, BD)
        pair = tl.load(SORTED_PAIR + rows, mask=rows < n_rows, other=-1)
        valid = pair >= 0
        token = tl.where(valid, pair // top_k, 0).to(tl.int64)
        dmask = ds[None, :] < Dcols
        v = tl.load(SRC + token[:, None] * Dcols + ds[None, :], mask=valid[:, None] & dmask, other=0.0)
        if SCALE:
            v = v.to(tl.float32) * tl.load(ROUTE_W + pair, mask=valid, other=0.0)[:, None]
        tl.store(DST + rows[:, None].to(tl.int64) * Dcols + ds[None, :], v.to(DST.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & dmask)

    @triton.jit
    def _combine_kernel(YS, ROUTE_W, Y, N, D, top_k, HAS_W: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
        """Y[t] = sum_k (ROUTE_W[t, k] *) YS[t * K + k] in float32. YS: (N * K, D); Y: (N, D)."""
        ts = tl.program_id(0) * BT + tl.arange(0, BT)
        ds = tl.program_id(1) * BD + tl.arange(0, BD)
        tmask = ts < N
        mask = tmask[:, None] & (ds[None, :] < D)
        acc = tl.zeros((BT, BD), dtype=tl.float32)
        for k in range(top_k):
            p = ts.to(tl.int64) * top_k + k  # (BT,) pairs
            v = tl.load(YS + p[:, None] * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_W:
                v = v * tl.load(ROUTE_W + p, mask=tmask, other=0.0)[:, None]
            acc += v
        tl.store(Y + ts[:, None].to(tl.int64) * D + ds[None, :], acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _route_grad_kernel(DY, YS, DW, N, D, top_k, BT: tl.constexpr, BD: tl.constexpr):
        """DW[t, k] = <DY[t], YS[t * K + k]> in float32. DY: (N, D); YS: (N * K, D); DW: (N, K) float32."""
        ts = tl.program_id(0) * BT + tl.arange(0, BT)
        tmask = ts < N
        for k in range(top_k):
            p = ts.to(tl.int64) * top_k + k
            acc = tl.zeros((BT,), dtype=tl.float32)
            for d0 in range(0, D, BD):
                ds = d0 + tl.arange(0, BD)
                mask = tmask[:, None] & (ds[None, :] < D)
                dy = tl.load(DY + ts[:, None].to(tl.int64) * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
                ys = tl.load(YS + p[:, None] * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
                acc += tl.sum(dy * ys, axis=1)
            tl.store(DW + p, acc, mask=tmask)


def block_m_for(n_pairs: int, n_experts: int) -> int:
    """The row block BM (every expert padded to a multiple of it): 128 when experts average >= 256 rows, else 64.

    Under the interpreter 16 keeps the tiles small. Large blocks reuse each weight tile over more rows; small ones
    waste less padding when experts get few tokens.
    """
    if INTERPRET:
        return 16
    return 128 if n_pairs >= 256 * n_experts else 64


def _prec(dtype: torch.dtype) -> str:
    # float32 operands: full-precision products (the tests' dtype); bf16/fp16 ignore it
    return "ieee" if dtype == torch.float32 else "tf32"


def _launcher(autotuned, cfg: tuple | None):
    """(kernel, launch kwargs) for an autotuned GEMM kernel: itself when cfg is None, else its plain kernel with cfg
    = (BN, BK, warps, stages, GROUP_M) as given (the GATE_UP / DGRAD knobs)."""
    if cfg is None:
        return autotuned, {}
    bn, bk, warps, stages, group_m = cfg
    return autotuned.fn, {"BN": bn, "BK": bk, "GROUP_M": group_m, "num_warps": warps, "num_stages": stages}


def _check_knobs() -> None:
    """The module knobs (set by bench/sweep_moe.py and tests), checked once per call: one clear line for a bad one
    instead of a Triton error inside a launch (or, for DX_LOOPS, a silently dropped product)."""
    def tile(v) -> bool:
        return isinstance(v, tuple) and len(v) == 5 and all(isinstance(i, int) and i > 0 for i in v)

    bad = None
    if BLOCK_M not in (None, 16, 32, 64, 128):
        bad = f"BLOCK_M={BLOCK_M!r}: None (automatic) or a row block of 16, 32, 64 or 128"
    elif DX_LOOPS not in (1, 2):
        bad = f"DX_LOOPS={DX_LOOPS!r}: 1 (one K loop) or 2 (two loops)"
    elif GATE_UP is not None and not tile(GATE_UP):
        bad = f"GATE_UP={GATE_UP!r}: None (autotuned) or (BN, BK, warps, stages, GROUP_M)"
    elif DGRAD is not None and not (isinstance(DGRAD, dict) and set(DGRAD) <= {"dh", "dx"}
                                    and all(v is None or tile(v) for v in DGRAD.values())):
        bad = f"DGRAD={DGRAD!r}: None or {{'dh': cfg, 'dx': cfg}} with cfg (BN, BK, warps, stages, GROUP_M)"
    elif not (isinstance(WGRAD, dict) and tile(WGRAD.get("tile"))):
        bad = f"WGRAD={WGRAD!r}: a dict with 'tile': (BMW, BNW, BK, warps, stages)"
    if bad:
        raise ValueError(f"minids.kernels.moe.{bad}")


def _gemm(a, b, out, al: MoEAlignment, route_w, top_k, *, gather, epi, a2=None, b2=None, g=None, u=None, out2=None,
          cfg=None):
    """Launch _grouped_kernel: out = a @ b[e] (+ a2 @ b2[e]); b (E, Kdim, Ndim) given as a strided view.

    cfg: None (autotuned) or (BN, BK, warps, stages, GROUP_M) launched as given.
    """
    Kdim, Ndim = b.shape[1:]
    n_blocks = al.block_expert.shape[0]
    bm = al.sorted_pair.shape[0] // n_blocks
    kernel, meta = _launcher(_grouped_kernel, cfg)
    grid = lambda m: (n_blocks * triton.cdiv(Ndim, m["BN"]),)
    kernel[grid](
        a, a2 if a2 is not None else a, b, b2 if b2 is not None else b, out, out2 if out2 is not None else out,
        g if g is not None else out, u if u is not None else out, al.sorted_pair, al.block_expert, route_w,
        n_blocks, Ndim, Kdim, top_k, b.stride(0), b.stride(1), b.stride(2),
        A_GATHER=gather, TWO=0 if a2 is None else DX_LOOPS, EPI=epi, PREC=_prec(a.dtype), BM=bm, **meta,
    )


def _wgrad_tiles(a, b, al: MoEAlignment, route_w, top_k, n_experts, cfg: dict, *, a_gather, b_gather, a2=None):
    """Per expert, a_rows^T @ b_rows over its padded rows through _wgrad_tiles_kernel with the WGRAD config cfg:
    (E, Mdim, Ndim), and a2's too if given."""
    Mdim, Ndim = a.shape[1], b.shape[1]
    dw = torch.empty(n_experts, Mdim, Ndim, device=a.device, dtype=a.dtype)
    dw2 = torch.empty_like(dw) if a2 is not None else dw
    bmw, bnw, bk, warps, stages = cfg["tile"]
    n_tiles = n_experts * triton.cdiv(Mdim, bmw) * triton.cdiv(Ndim, bnw)
    programs = n_tiles
    if cfg.get("programs"):
        per_sm = cfg["programs"]
        programs = min(n_tiles, per_sm * (sm_count(a.device.index) if a.is_cuda else 1))
    if n_tiles > 0:
        _wgrad_tiles_kernel[(programs,)](
            a, a2 if a2 is not None else a, b, dw, dw2, al.sorted_pair, al.expert_start, route_w,
            Mdim, Ndim, top_k, n_tiles,
            A_GATHER=a_gather, B_GATHER=b_gather, TWO=a2 is not None, FLAT=bool(cfg.get("flat")),
            PREC=_prec(a.dtype), BMW=bmw, BNW=bnw, BK=bk, num_warps=warps, num_stages=stages,
        )
    return (dw, dw2) if a2 is not None else dw


def _gather_rows(src: torch.Tensor, al: MoEAlignment, route_w, top_k: int) -> torch.Tensor:
    """src: (N, D) -> (P_pad, D): each padded row's token row (times its routing weight if route_w is given, rounded
    to src's dtype as the gathering GEMMs round it), zeros at padding rows."""
    n_rows, D = al.sorted_pair.shape[0], src.shape[1]
    out = torch.empty(n_rows, D, device=src.device, dtype=src.dtype)
    br, bd = (16, 16) if INTERPRET else (16, 256)
    if n_rows > 0 and D > 0:
        _gather_rows_kernel[(triton.cdiv(n_rows, br), triton.cdiv(D, bd))](
            src, out, al.sorted_pair, route_w if route_w is not None else src, n_rows, D, top_k,
            SCALE=route_w is not None, BR=br, BD=bd, num_warps=4,
        )
    return out


def _combine(ys: torch.Tensor, route_w: torch.Tensor | None, N: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    D = ys.shape[1]
    y = torch.empty(N, D, device=ys.device, dtype=dtype)
    bt, bd = (16, 16) if INTERPRET else (4, 512)
    if N > 0:
        _combine_kernel[(triton.cdiv(N, bt), triton.cdiv(D, bd))](
            ys, route_w if route_w is not None else ys, y, N, D, top_k, HAS_W=route_w is not None, BT=bt, BD=bd,
            num_warps=4,
        )
    return y


class _MoEExpertsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, route_w, al, top_k, wg, wu, wd, out_dtype, need_grad):
        """x: (N, D) compute dtype; route_w: (P,) float32; wg, wu: (E, I, D); wd: (E, D, I) -> y (N, D) out_dtype.

        need_grad: keep g and u for the backward (False under no_grad: inference writes h only).
        """
        N, D = x.shape
        I = wg.shape[1]
        P_pad = al.sorted_pair.shape[0]
        n_blocks = al.block_expert.shape[0]
        h = torch.empty(P_pad, I, device=x.device, dtype=x.dtype)  # (P_pad, I)
        g = torch.empty_like(h) if need_grad else h
        u = torch.empty_like(h) if need_grad else h
        grid = lambda meta: (n_blocks * triton.cdiv(I, meta["BN"]),)
        kernel, meta = _launcher(_gate_up_kernel, GATE_UP)
        kernel[grid](
            x, wg, wu, h, g, u, al.sorted_pair, al.block_expert, n_blocks, I, D, top_k,
            STORE_GU=need_grad, PREC=_prec(x.dtype), BM=P_pad // n_blocks, **meta,
        )
        ys = torch.empty(N * top_k, D, device=x.device, dtype=x.dtype)  # (P, D), pair-major
        _gemm(h, wd.transpose(1, 2), ys, al, route_w, top_k, gather=False, epi=0)  # (E, I, D) view of W_down^T
        y = _combine(ys, route_w, N, top_k, out_dtype)  # (N, D): float32 sum, rounded once
        ctx.save_for_backward(x, route_w, wg, wu, wd, h, g, u, ys, *al)
        ctx.top_k = top_k
        return y

    @staticmethod
    def backward(ctx, dy):
        x, route_w, wg, wu, wd, h, g, u, ys, *al = ctx.saved_tensors
        al = MoEAlignment(*al)
        top_k = ctx.top_k
        N, D = x.shape
        E = wg.shape[0]
        dy = dy.contiguous()  # (N, D) out_dtype
        d_route = None
        if ctx.needs_input_grad[1]:
            d_route = torch.empty(N * top_k, device=x.device, dtype=torch.float32)  # (P,)
            bt, bd = (16, 16) if INTERPRET else (8, 256)
            if N > 0:
                _route_grad_kernel[(triton.cdiv(N, bt),)](dy, ys, d_route, N, D, top_k, BT=bt, BD=bd, num_warps=4)
        dy_c = dy.to(x.dtype)  # (N, D): the GEMM operand; scaled by the routing weight on load
        wcfg, dcfg = WGRAD, DGRAD or {}
        # WGRAD sorted: (weights * dy) gathered once into padded-row order (P_pad, D), the dh GEMM's and dW_down's A
        dys = _gather_rows(dy_c, al, route_w, top_k) if wcfg.get("sorted") else None
        dg, du = torch.empty_like(g), torch.empty_like(u)  # (P_pad, I)
        _gemm(dy_c if dys is None else dys, wd, dg, al, route_w, top_k, gather=dys is None, epi=1, g=g, u=u, out2=du,
              cfg=dcfg.get("dh"))  # W_down (E, D, I)
        dx = None
        if ctx.needs_input_grad[0]:
            dxs = torch.empty(N * top_k, D, device=x.device, dtype=x.dtype)  # (P, D)
            _gemm(dg, wg, dxs, al, route_w, top_k, gather=False, epi=0, a2=du, b2=wu, cfg=dcfg.get("dx"))  # (E, I, D)
            dx = _combine(dxs, None, N, top_k, x.dtype)  # (N, D)
        dwg, dwu, dwd = _weight_grads(x, dy_c, dys, h, dg, du, al, route_w, top_k, E, ctx.needs_input_grad[4:7])
        return dx, d_route, None, None, dwg, dwu, dwd, None, None


def _weight_grads(x, dy_c, dys, h, dg, du, al: MoEAlignment, route_w, top_k, E, needs):
    """(dW_gate, dW_up, dW_down), each None where needs says so: (E, I, D), (E, I, D), (E, D, I).

    x, dy_c: (N, D); dys: (P_pad, D) pre-gathered (weights * dy) or None; h, dg, du: (P_pad, I). WGRAD picks the path.
    """
    need_g, need_u, need_d = needs
    cfg = WGRAD
    srt = dys is not None
    xb = _gather_rows(x, al, None, top_k) if srt and (need_g or need_u) else x  # (P_pad, D) or (N, D)

    def run(a, b, a_gather, b_gather, a2=None):
        return _wgrad_tiles(a, b, al, route_w, top_k, E, cfg, a_gather=a_gather, b_gather=b_gather, a2=a2)

    dwg = dwu = dwd = None
    if need_g and need_u and cfg.get("fuse"):
        dwg, dwu = run(dg, xb, False, not srt, a2=du)
    else:
        dwg = run(dg, xb, False, not srt) if need_g else None
        dwu = run(du, xb, False, not srt) if need_u else None
    if need_d:
        dwd = run(dys, h, False, False) if srt else run(dy_c, h, True, False)
    return dwg, dwu, dwd


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    impl: str = "triton",
    fp8: bool | str = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton routed experts: sum_k weights[t, k] * FFN_{indices[t, k]}(x[t]), forward and backward.

    x: (N, D), weights: (N, K) float, indices: (N, K), w_gate / w_up: (E, I, D), w_down: (E, D, I).
    Returns (y (N, D) in x.dtype, tokens per expert (E,) int64), as ``minids.moe.moe_experts``.
    """
    if impl != "triton":
        raise ValueError(f"minids.kernels.moe.moe_experts: impl={impl!r}; only 'triton' (the reference has the rest)")
    if fp8:
        raise ValueError("minids.kernels.moe.moe_experts: no FP8 path; use minids.moe.moe_experts(..., fp8=...)")
    require_runs_here(x, "minids.kernels.moe.moe_experts", "minids.moe.moe_experts with impl 'grouped' or 'loop'")
    check_experts_args(x, weights, indices, w_gate, w_up, w_down)
    _check_knobs()
    E = w_gate.shape[0]
    N, K = indices.shape
    dt = _compute_dtype(x)
    al = moe_align(indices, E, BLOCK_M or block_m_for(N * K, E))
    xc = x.to(dt).contiguous()  # (N, D)
    wg, wu, wd = (w.to(dt).contiguous() for w in (w_gate, w_up, w_down))
    route_w = weights.float().reshape(-1).contiguous()  # (P,)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weights, w_gate, w_up, w_down))
    with torch.autocast(x.device.type, enabled=False):
        y = _MoEExpertsFn.apply(xc, route_w, al, K, wg, wu, wd, x.dtype, need_grad)
    return y, al.counts
