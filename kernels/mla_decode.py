"""MLA decoding over the compressed latent cache: one work-balanced Triton kernel with a fused combine.

Mirrors ``minids.attention.mla_decode_ref`` (same signature, same result up to the dtype's rounding). In
the absorbed form (REFERENCE.md 2.6) all H heads attend to ONE latent key per token, [c_kv; k_pe]
(C + R wide), and read the latent c_kv (C wide) as the value:

    s[h, t] = scale * (q[h, :C] . c_kv[t] + q[h, C:] . k_pe[t])        t < len (causal among the s_q new tokens)
    out[h]  = sum_t softmax_t(s[h, :]) c_kv[t],   lse[h] = log sum_t exp(s[h, t])

so a decoding step is a small batched matrix product whose "M" dimension is the (query token, head)
pair, and the cache is the only large operand.

The design, and what each part is for:
- Rows on M. A program takes BLOCK_M rows (query token i, head h) of one sequence and computes the
  scores of all of them against a BLOCK_N-token cache tile with one ``tl.dot`` (q[M, C] @ c_kv^T and
  q_pe[M, R] @ k_pe^T), then p[M, N] @ c_kv[N, C] into an fp32 (M, C) accumulator: each cache tile is
  loaded once for all the rows of the program and used as both key and value. All s_q * H rows of a
  sequence share a program up to 64 rows (H=16, s_q=2: 32 rows, both query tokens of each head), so
  the cache is read once; H=128 takes 128-row blocks (a Hopper warpgroup MMA of 64 rows per warpgroup)
  split by output column over V_SPLIT=2 programs: each computes all scores and half of the (128, C) result
  (the whole fp32 accumulator would not fit in registers); its second read of each tile comes from L2.
- Work-balanced, sync-free scheduling (FlashMLA's idea, with the metadata derived inside the kernel).
  Sequence b costs OVERHEAD + ceil(len_b / UNIT) units (UNIT = 64 tokens; the overhead unit stands for
  the query load and the output write). Laid end to end, the units of all sequences form one line of
  `total` units, and the P programs of a row block take consecutive slices of W units each, W = max(
  ceil(total / P), MIN_UNITS, ceil(max_b tiles_b / (MAX_PIECES - 1))): a slice may start inside one
  sequence and run on into the next ones, so ragged lengths cost no imbalance (every program gets the
  same work, to one unit). Every program reads the B lengths (from L2) and derives the same schedule:
  no host read of the lengths, no extra launch, and the grid depends on static sizes only (P = SMs x
  programs per SM of the tile config, one wave), so a decoding step can be graph-captured. MIN_UNITS
  keeps pieces from being so short that the query load and partial write dominate; MAX_PIECES bounds
  the pieces of one sequence (a long one among short ones), which bounds its combine. Programs whose
  slice starts past `total` exit at once.
- Pieces and the fused combine. A sequence whose tiles all fall in one slice is computed by one program,
  which writes out and lse directly. A sequence cut across programs p_first..p_last gets one piece per
  program; each writes its normalised fp32 partial output and log2-sum-exp to a slot (2 per program: a
  cut sequence is either the first or the last of a slice; slot 2p + 1 holds p's last, 2p its first),
  then counts itself in with an atomic (acq_rel at GPU scope after a CTA barrier: the CUTLASS split-K
  semaphore pattern). The program that arrives last for (sequence, row block) merges the pieces, always
  in piece order p_first..p_last, so the result is deterministic whatever the arrival order, and resets
  the counter to 0 for the next launch. Counters: one int32 per (sequence, row block), allocated once
  per device (``minids.kernels.arrival_counters``), zero between launches. This replaces a second (combine) launch, which costs
  a few microseconds of a ~10-40 us decoding step.
- Online softmax in base 2 (the scale is multiplied by log2 e once), with a guard for rows that have
  seen no token yet (their running max is -inf).
- Two cache layouts, one loop: contiguous (B, T, .) rows are addressed as page b, token t; paged caches
  look each tile's page up in the block table (one scalar per tile when the page holds whole tiles, as
  with 64-token pages; one entry per token otherwise). The lookup takes a software-pipeline stage of its
  own, so paged configs get more stages for the same tile buffers. The latent and RoPE parts are two
  pointers with their own strides: ``KVCache``'s separate c_kv and k_pe tensors are read in place, and a
  single (.., C + R) cache is passed as two views of itself. The per-token strides are compile-time
  constants (one compiled variant per layout), which saves address registers.
- Tiles (see _CONFIGS): memory-bound cases (s_q * H <= 32) use 16 or 32 rows per program with mma.sync
  (padding to a 64-row wgmma would multiply the tensor work by 2-4x) and deep cp.async pipelines, ~75-150
  KB of cache tiles in flight per SM; H=128 (compute-bound) uses 128-row wgmma blocks with 8 warps and
  V_SPLIT=2 (other row counts above 32: 64-row blocks). ``mla_decode(config=...)`` runs any of them.

Preconditions: q, kv_cache, pe_cache of one floating dtype (bf16, fp16 or fp32; q is cast to the cache's
dtype), last dimension contiguous; cache_seqlens int32/int64 on the same device, each in [0, capacity]
(values outside are clamped); block_table int32. fp32 runs its dots in IEEE fp32 (not tf32) so fp32
models decode exactly. Launches share the device's combine counters, so two launches must not run
concurrently on one device (on two streams, or graphs replayed on two streams).

Shapes: B batch, s_q new tokens per sequence, H heads, C kv_lora_rank (head_dim_v), R rope dim,
T cache capacity, M = s_q * H rows, N tokens per tile, P programs per row block.
"""

from __future__ import annotations

import torch
from minids.kernels import AUTOTUNE, HAVE_TRITON, INTERPRET, arrival_counters, require_runs_here, sm_count

from minids.attention import check_mla_decode_args

__all__ = ["mla_decode", "pick_config", "schedule_ref"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

_LOG2E = 1.4426950408889634
UNIT = 64  # tokens per schedule unit; slices start at multiples of it, so BLOCK_N <= 64 tiles never straddle two
OVERHEAD = 1  # extra units charged per sequence (query load + output write)
MIN_UNITS = 4  # smallest slice (256 tokens) when the program count is automatic
MAX_PIECES = 32  # most programs one sequence is cut across (bounds the last arriver's combine)
MAX_BLOCK_B = 1024  # lengths read at once while the schedule is derived (a power of two; larger batches loop)


def balanced_slices(lens: list[int], programs: int, min_units: int = MIN_UNITS, max_pieces: int = MAX_PIECES,
                    overhead: int = OVERHEAD):
    """The kernel's W (units per slice) and each program's slice [u0, u1) of the units line (sequence b: overhead
    units, then one per UNIT tokens, laid end to end)."""
    n = [-(-max(0, x) // UNIT) for x in lens]
    total = sum(k + overhead for k in n)
    W = max(-(-total // programs), min_units, -(-max(n, default=0) // max(1, max_pieces - 1)))
    return W, [(p * W, min(p * W + W, total)) for p in range(programs)]


def slice_pieces(lens: list[int], slices: list[tuple[int, int]], overhead: int = OVERHEAD) -> list[list[tuple]]:
    """For each program's slice [u0, u1) of the units line (sequence b: overhead units, then its tiles), the
    (sequence, first token, end token, slot or None) pieces it computes; slot None: written as the result, else the
    partial slot 2 p + (the piece starts the sequence)."""
    n = [-(-max(0, x) // UNIT) for x in lens]
    work = []
    for p, (u0, u1) in enumerate(slices):
        pieces, S = [], 0
        for b, k in enumerate(n):
            first = S + overhead  # the unit of the sequence's first tile
            lo = max(u0, first) - first
            hi = max(min(u1, first + k) - first, lo)  # (a slice ending within the overhead units: none of its tiles)
            if u0 < u1 and (hi > lo or (k == 0 and u0 <= S < u1)):
                whole = lo == 0 and hi == k
                pieces.append((b, lo * UNIT, min(hi * UNIT, max(0, lens[b])), None if whole else 2 * p + (lo == 0)))
            S = first + k
        work.append(pieces)
    return work


def schedule_ref(lens: list[int], programs: int, min_units: int = MIN_UNITS, max_pieces: int = MAX_PIECES,
                 overhead: int = OVERHEAD):
    """The kernel's schedule in Python (documentation and tests): W units per slice, and for each program the
    (sequence, first token, end token, slot or None) pieces it computes; slot None: written as the result. overhead:
    the units charged per sequence (this kernel's OVERHEAD; the Gluon kernels' ``SEQ_OVERHEAD``)."""
    W, slices = balanced_slices(lens, programs, min_units, max_pieces, overhead)
    return W, slice_pieces(lens, slices, overhead)


if HAVE_TRITON:

    @triton.jit
    def _block_units(SEQLENS, i, B, capacity, BLOCK_B: tl.constexpr, UNIT: tl.constexpr, OVERHEAD: tl.constexpr):
        """Sequences i .. i + BLOCK_B: (valid, tiles of UNIT tokens, units = tiles + OVERHEAD, 0 where not valid),
        lengths clamped to [0, capacity]."""
        offs = i + tl.arange(0, BLOCK_B)
        ok = offs < B
        n = tl.cdiv(tl.minimum(tl.maximum(tl.load(SEQLENS + offs, mask=ok, other=0), 0), capacity), UNIT)
        return ok, n, tl.where(ok, n + OVERHEAD, 0)

    @triton.jit
    def _totals(SEQLENS, B, capacity, BLOCK_B: tl.constexpr, UNIT: tl.constexpr, OVERHEAD: tl.constexpr):
        """(total units of all sequences, most tiles of one sequence)."""
        total = 0
        n_max = 0
        for i in range(0, B, BLOCK_B):
            _, n, units = _block_units(SEQLENS, i, B, capacity, BLOCK_B, UNIT, OVERHEAD)
            total += tl.sum(units, 0)
            n_max = tl.maximum(n_max, tl.max(n, 0))
        return total, n_max

    @triton.jit
    def _locate(SEQLENS, B, capacity, u0, BLOCK_B: tl.constexpr, UNIT: tl.constexpr, OVERHEAD: tl.constexpr):
        """The first sequence whose units reach past unit u0, and the unit where it starts."""
        b = 0
        start = 0
        run = 0
        for i in range(0, B, BLOCK_B):
            ok, _, units = _block_units(SEQLENS, i, B, capacity, BLOCK_B, UNIT, OVERHEAD)
            ends = run + tl.cumsum(units, 0)
            before = ok & (ends <= u0)
            b += tl.sum(before.to(tl.int32), 0)
            start = tl.maximum(start, tl.max(tl.where(before, ends, 0), 0))
            run += tl.sum(units, 0)
        return b, start

    @triton.jit
    def _attend(
        q_v, q_o, q_r, v0, limit, kv_seq, pe_seq, tbl, KV, PE, t0, t1,
        stride_kvp, stride_kvt: tl.constexpr, stride_pep, stride_pet: tl.constexpr, qk_scale,
        C: tl.constexpr, R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, V_SPLIT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UNIT: tl.constexpr,
    ):
        """Online softmax of rows q over cache tokens [t0, t1) of one sequence -> (acc (M, BLOCK_V) fp32, m, l).

        q_v (M, BLOCK_V): the query's latent columns [v0, v0 + BLOCK_V), the program's output columns; with
        V_SPLIT = 2, q_o holds the other half (scores need all C columns; unused when V_SPLIT = 1)."""
        cols_v = v0 + tl.arange(0, BLOCK_V)
        cols_o = (BLOCK_V - v0) + tl.arange(0, BLOCK_V)  # the other half (V_SPLIT = 2: v0 is 0 or BLOCK_V)
        offs_r = tl.arange(0, BLOCK_R)
        v_ok = cols_v < C
        o_ok = cols_o < C
        r_ok = offs_r < R
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m)
        acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)  # running sum of p * c_kv[:, cols_v]
        tl.static_assert(UNIT % BLOCK_N == 0)  # tiles never straddle a piece's end (a multiple of UNIT or the length)
        limit = tl.minimum(limit, t1)  # (M,) tokens a row sees in this piece: t < limit
        for n0 in range(t0, t1, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)  # (N,)
            t_ok = toks < t1
            if PAGED:
                if PAGE % BLOCK_N == 0:  # the tile lies in one page: one table entry, 32-bit offsets within it
                    page = tl.load(tbl + n0 // PAGE).to(tl.int64)
                    in_page = (n0 % PAGE + tl.arange(0, BLOCK_N))
                    kv_ptr = KV + page * stride_kvp + in_page * stride_kvt
                    pe_ptr = PE + page * stride_pep + in_page * stride_pet
                else:  # a page per token
                    page = tl.load(tbl + toks // PAGE, mask=t_ok, other=0).to(tl.int64)
                    kv_ptr = KV + page * stride_kvp + (toks % PAGE) * stride_kvt
                    pe_ptr = PE + page * stride_pep + (toks % PAGE) * stride_pet
            else:  # 32-bit offsets from the sequence's base pointer (stride_kvt * capacity < 2**31)
                kv_ptr = kv_seq + toks * stride_kvt
                pe_ptr = pe_seq + toks * stride_pet
            kv = tl.load(kv_ptr[:, None] + cols_v[None, :], mask=t_ok[:, None] & v_ok[None, :], other=0.0)
            pe = tl.load(pe_ptr[:, None] + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)

            s = tl.dot(q_v, tl.trans(kv), input_precision=DOT_PRECISION)  # (M, N)
            if V_SPLIT == 2:  # the other half of the key (its second read of the tile comes from L2)
                kv_o = tl.load(kv_ptr[:, None] + cols_o[None, :], mask=t_ok[:, None] & o_ok[None, :], other=0.0)
                s = tl.dot(q_o, tl.trans(kv_o), s, input_precision=DOT_PRECISION)
            s = tl.dot(q_r, tl.trans(pe), s, input_precision=DOT_PRECISION)
            s = s * qk_scale
            s = tl.where(toks[None, :] < limit[:, None], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing: keep p = 0
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # (M, N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv.dtype), kv, acc, input_precision=DOT_PRECISION)  # (M, BLOCK_V): the value is c_kv
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _combine(
        O_PART, L_PART, o_ptr, l_ptr, rows, row_ok, offs_c, p_first, p_last, n_rows, v0, part,
        C: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_C: tl.constexpr, BLOCK_J: tl.constexpr,
        V_SPLIT: tl.constexpr,
    ):
        """out[:, v0 : v0 + BLOCK_V] = sum_j w_j o_j / sum_j w_j, w_j = 2^(lse_j - max lse), over the pieces of
        programs p_first..p_last (slot 2j, or 2j + 1 for the first), summed in that order; lse = max + log sum_j
        w_j (written by column part 0). Each column part reads its own lse slots (part), which it computed itself.

        Latency-bound (it runs at the end of the kernel): the pieces' lse come in one load (at most BLOCK_J
        pieces), the pieces themselves through a prefetching loop, CHUNK_C columns at a time (an fp32 (M, C)
        accumulator plus a loaded piece would not fit in registers at M=64)."""
        jj = tl.arange(0, BLOCK_J)
        slots = (2 * (p_first + jj) + (jj == 0).to(tl.int32)).to(tl.int64) * V_SPLIT + part
        lse = tl.load(L_PART + slots[:, None] * n_rows + rows[None, :], mask=(jj <= p_last - p_first)[:, None] & row_ok[None, :],
                      other=float("-inf"), cache_modifier=".cg")  # (J, M)
        m = tl.max(lse, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        for c0 in tl.static_range(0, BLOCK_V, CHUNK_C):
            cols = v0 + c0 + offs_c
            mask = row_ok[:, None] & (cols < C)[None, :]
            den = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, CHUNK_C], dtype=tl.float32)
            for j in tl.range(p_first, p_last + 1, num_stages=3):
                sj = (2 * j + (j == p_first).to(tl.int32)).to(tl.int64)
                lj = tl.load(L_PART + (sj * V_SPLIT + part) * n_rows + rows, mask=row_ok, other=float("-inf"), cache_modifier=".cg")
                w = tl.exp2(lj - m_safe)  # 0 for a piece in which the row saw nothing
                oj = tl.load(O_PART + (sj * n_rows + rows)[:, None] * C + cols[None, :], mask=mask, other=0.0,
                             cache_modifier=".cg")
                acc += w[:, None] * oj
                den += w
            none = den == 0.0
            out = acc / tl.where(none, 1.0, den)[:, None]
            tl.store(o_ptr[:, None] + cols[None, :], out.to(o_ptr.dtype.element_ty), mask=mask)
            if c0 == 0:
                lse_out = tl.where(none, float("-inf"), (m + tl.log2(tl.where(none, 1.0, den))) * 0.6931471805599453)
                tl.store(l_ptr, lse_out, mask=row_ok & (rows * 0 + part == 0))

    @triton.jit(do_not_specialize=["capacity", "H", "S_Q", "B", "min_units", "max_pieces", "size_class"])
    def _mla_decode_kernel(
        Q, KV, PE, SEQLENS, BLOCK_TABLE, O, LSE, O_PART, L_PART, COUNTS,
        stride_qb, stride_qs, stride_qh, stride_kvp, stride_pep, stride_btb,
        stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh,
        qk_scale, capacity, H, S_Q, B, min_units, max_pieces, size_class,
        STRIDE_KVT: tl.constexpr, STRIDE_PET: tl.constexpr,
        C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, ONE_B_BLOCK: tl.constexpr,
        PAGE: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UNIT: tl.constexpr, OVERHEAD: tl.constexpr, CHUNK_C: tl.constexpr, BLOCK_J: tl.constexpr, OCC: tl.constexpr,
        V_SPLIT: tl.constexpr,
    ):
        """Program (row block x column part, p): rows [BLOCK_M * row block, +BLOCK_M) of every sequence piece in
        slice p, output columns [v0, v0 + C / V_SPLIT) (column part = program_id(0) % V_SPLIT; every part
        computes the full scores, so V_SPLIT = 2 trades a second score GEMM for half the accumulator).

        O_PART (2 P, S_Q * H, C) fp32 and L_PART (2 P, V_SPLIT, S_Q * H) fp32 (log2 units) hold the pieces of
        cut sequences; COUNTS (B * row blocks * V_SPLIT,) int32, zero on entry and on exit. The cache's token
        strides are compile-time constants (one per layout: fewer address registers). OCC (programs per SM of
        the config) only sizes the grid; size_class is only an autotuning key.
        """
        pid0 = tl.program_id(0)
        pid_m = pid0 // V_SPLIT
        part = pid0 % V_SPLIT
        BLOCK_V: tl.constexpr = BLOCK_C // V_SPLIT
        v0 = part * BLOCK_V  # the program's first output column
        p = tl.program_id(1)
        P = tl.num_programs(1)
        n_rb = tl.num_programs(0)

        # --- the schedule: every program computes the same W and finds its slice [u0, u1)
        if ONE_B_BLOCK:  # all lengths in one load (one round trip to L2 before the first tile is requested)
            ok_b, n_b, units = _block_units(SEQLENS, 0, B, capacity, BLOCK_B, UNIT, OVERHEAD)
            total = tl.sum(units, 0)
            n_max = tl.max(n_b, 0)
        else:
            total, n_max = _totals(SEQLENS, B, capacity, BLOCK_B, UNIT, OVERHEAD)
        W = tl.maximum(tl.maximum(tl.cdiv(total, P), min_units), tl.cdiv(n_max, max_pieces - 1))
        u0 = p * W
        if u0 >= total:  # no work left for this program
            return
        u1 = tl.minimum(u0 + W, total)
        if ONE_B_BLOCK:  # the first sequence that reaches past u0, and the unit where it starts
            ends = tl.cumsum(units, 0)
            before = ok_b & (ends <= u0)
            b = tl.sum(before.to(tl.int32), 0)
            S = tl.max(tl.where(before, ends, 0), 0)
        else:
            b, S = _locate(SEQLENS, B, capacity, u0, BLOCK_B, UNIT, OVERHEAD)

        n_rows = S_Q * H
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) row = i * H + h
        row_ok = rows < n_rows
        qi = rows // H
        hh = rows % H
        rows_q = tl.minimum(rows, n_rows - 1)  # rows past s_q * H read the last row (no (M, C) load mask)
        offs_v = tl.arange(0, BLOCK_V)
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < R

        while (b < B) & (S < u1):  # the sequences that overlap [u0, u1)
            seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + b).to(tl.int32), 0), capacity)
            n = tl.cdiv(seqlen, UNIT)
            first = S + OVERHEAD  # the unit of the sequence's first tile
            lo = tl.maximum(u0, first) - first  # this slice's tiles of the sequence: [lo, hi)
            hi = tl.minimum(u1, first + n) - first
            # an empty sequence is written (out = 0, lse = -inf) by the program holding its overhead unit
            if (hi > lo) | ((n == 0) & (S >= u0)):
                b64 = b.to(tl.int64)
                # (M, C) index tensors are built from run-time zeros (b, n >= 0), one for the query load and one
                # for the stores: the compiler would otherwise build one before the loops and keep it in
                # registers throughout (64 a thread at M=16); the factor keeps the columns' alignment known
                cols = v0 + offs_v + tl.minimum(b, 0) * BLOCK_C
                q_ptr = Q + b64 * stride_qb + (rows_q // H) * stride_qs + (rows_q % H) * stride_qh  # (M,)
                if C == BLOCK_C:
                    q_v = tl.load(q_ptr[:, None] + cols[None, :])
                else:
                    q_v = tl.load(q_ptr[:, None] + cols[None, :], mask=(cols < C)[None, :], other=0.0)
                if V_SPLIT == 2:  # the other half of the latent, for the scores
                    cols_o = (BLOCK_V - v0) + offs_v + tl.minimum(b, 0) * BLOCK_C
                    q_o = tl.load(q_ptr[:, None] + cols_o[None, :], mask=(cols_o < C)[None, :], other=0.0)
                else:
                    q_o = q_v  # unused
                if R == BLOCK_R:
                    q_r = tl.load(q_ptr[:, None] + C + offs_r[None, :])
                else:
                    q_r = tl.load(q_ptr[:, None] + C + offs_r[None, :], mask=r_ok[None, :], other=0.0)
                if CAUSAL:
                    limit = seqlen - S_Q + 1 + qi  # (M,) query i sees t < len - s_q + 1 + i
                else:
                    limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
                kv_t = KV.dtype.element_ty
                acc, m_i, l_i = _attend(
                    q_v.to(kv_t), q_o.to(kv_t), q_r.to(kv_t), v0, limit,
                    KV + b64 * stride_kvp, PE + b64 * stride_pep, BLOCK_TABLE + b64 * stride_btb,
                    KV, PE, lo * UNIT, tl.minimum(hi * UNIT, seqlen),
                    stride_kvp, STRIDE_KVT, stride_pep, STRIDE_PET, qk_scale,
                    C, R, BLOCK_V, BLOCK_R, V_SPLIT, BLOCK_M, BLOCK_N, PAGE, PAGED, DOT_PRECISION, UNIT)

                cols = v0 + offs_v + tl.minimum(n, 0) * BLOCK_C
                mask = row_ok[:, None] & (cols < C)[None, :]
                empty = l_i == 0.0
                l_safe = tl.where(empty, 1.0, l_i)
                out = acc / l_safe[:, None]  # 0 for a row that saw nothing
                lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
                o_ptr = O + b64 * stride_ob + qi * stride_os + hh * stride_oh  # (M,)
                l_ptr = LSE + b64 * stride_lb + qi * stride_ls + hh * stride_lh
                if (lo == 0) & (hi == n):  # the whole sequence: write the result
                    tl.store(o_ptr[:, None] + cols[None, :], out.to(O.dtype.element_ty), mask=mask)
                    # column part 0 writes lse (a tensor mask: the interpreter rejects a scalar term)
                    tl.store(l_ptr, lse2 * 0.6931471805599453, mask=row_ok & (rows * 0 + part == 0))
                else:
                    # a piece: slot 2p + 1 if the sequence starts in this slice (its first piece), else 2p
                    slot = (2 * p + (lo == 0).to(tl.int32)).to(tl.int64)
                    tl.store(O_PART + (slot * n_rows + rows)[:, None] * C + cols[None, :], out, mask=mask)
                    tl.store(L_PART + (slot * V_SPLIT + part) * n_rows + rows, lse2, mask=row_ok)
                    tl.debug_barrier()  # every thread's piece is written before the arrival is counted
                    cnt_ptr = COUNTS + b * n_rb + pid0
                    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
                    p_first = first // W
                    p_last = (first + n - 1) // W
                    if arrived == p_last - p_first:  # the last piece in: merge them all
                        tl.debug_barrier()
                        _combine(O_PART, L_PART, o_ptr, l_ptr, rows, row_ok, tl.arange(0, CHUNK_C), p_first, p_last,
                                 n_rows, v0, part, C, BLOCK_V, BLOCK_M, CHUNK_C, BLOCK_J, V_SPLIT)
                        tl.store(cnt_ptr, 0)  # ready for the next launch
            S = first + n
            b += 1

    # Tile configs per BLOCK_M (C=512, R=64, bf16; resources from sm_90 builds of this kernel). OCC: programs
    # per SM, which sets the grid (SMs x OCC programs, one wave); every config is near 255 registers, so 4
    # warps fit twice per SM and 8 warps once. What a program keeps in flight while it computes a tile is its
    # other tile buffers (a 64-token tile is 74 KB; the query tile takes 18 / 37 / 72 KB at M = 16 / 32 / 64).
    #   M=16, 4 warps (mma.sync): N32 s3 91 KB x2 programs (2 buffers each); N64 s3 164 KB (2 buffers);
    #     N32 s5 163 KB (4 buffers of 37 KB); N64 s2 92 KB x2 (1 buffer: the next load waits for the compute).
    #   M=32, 8 warps (4 warps spill): N32 s5 182 KB (4 buffers); N64 s3 184 KB (2); N64 s2 128 KB (1).
    #   M=64, 8 warps (wgmma; the fp32 64 x 512 accumulator is 128 registers a thread, so one warpgroup could
    #     not hold it, and splitting the 512 output columns over two programs would compute the 576-deep
    #     scores twice: 1.5x the tensor work of a compute-bound case): N64 s2 216 KB (2 buffers), N32 s3
    #     180 KB (3), N32 s2 144 KB (2); each reloads 25-60 spilled registers (from L1) per tile.
    #   M=128 with V_SPLIT=2 (rows a multiple of 128, i.e. H=128): each warpgroup owns 64 rows and the program
    #     keeps 256 of the 512 output columns (fp32 128 x 256: 128 registers a thread), the 128-row query takes
    #     147 KB, N32 s2 221 KB. It computes the scores twice (1.5x the tensor work) and still beat M=64 by
    #     4-8% on the H200 (bench/sweep_mla.py: 182 / 223 / 252 against 175 / 210 / 235 TFLOP/s at B=32 4K,
    #     B=128 4K ragged, B=128 16K s_q=2); N16 s4 was slower, N32 s3 does not fit.
    #   Tried for M=16 and 32 and dropped (ninth session, bench/results/sweep_mla-swap.md): both products transposed
    #     (scores^T = kv q^T, acc^T += kv^T p^T: the tokens and latent columns as the tensor cores' M, the rows as
    #     their N, so no padding to wgmma's 64 rows). With N64 tiles 3 stages need 236-256 KB of shared memory
    #     (over the 227 KB limit); 2 stages, or N32, ran at 0.18-0.56 of copy against the default's 0.26-0.65,
    #     never faster.
    # M=32: N64 s3 first (the sweep: 0.44 / 0.67 of copy at B=32 4K / B=128 16K s_q=2 against N32 s5's 0.32 /
    # 0.40; the autotuner picked it in every bench row). The inner loops of M=16 and 32 do not spill (the spills are in the per-sequence epilogue). Paged caches:
    # the table lookup takes pipeline stages of its own, so the same buffers need more stages (_paged). The
    # first entry of each list is the default (MINIDS_AUTOTUNE=0).
    def _cfg(n, occ, warps, stages):
        return triton.Config({"BLOCK_N": n, "OCC": occ}, num_warps=warps, num_stages=stages)

    _CONFIGS = {
        16: [_cfg(32, 2, 4, 3), _cfg(64, 1, 4, 3), _cfg(32, 1, 4, 5), _cfg(64, 2, 4, 2)],
        32: [_cfg(64, 1, 8, 3), _cfg(32, 1, 8, 5), _cfg(64, 1, 8, 2)],
        64: [_cfg(64, 1, 8, 2), _cfg(32, 1, 8, 3), _cfg(32, 1, 8, 2)],
        128: [_cfg(32, 1, 8, 2)],
    }

    def _paged(configs, block_m):
        """The same tile buffers with the table lookup in the pipeline: s - 1 buffers take 2s - 1 stages on the
        mma.sync path (M <= 32); the wgmma path (s buffers, 2 at s = 2) needs s + 2 from s = 3 (sm_90 builds)."""
        if block_m >= 64:
            return [_cfg(c.kwargs["BLOCK_N"], c.kwargs["OCC"], c.num_warps, c.num_stages + 2 * (c.num_stages > 2))
                    for c in configs]
        return [_cfg(c.kwargs["BLOCK_N"], c.kwargs["OCC"], c.num_warps, 2 * c.num_stages - 1) for c in configs]

    def _configs(block_m: int, paged: bool) -> list:
        return _paged(_CONFIGS[block_m], block_m) if paged else _CONFIGS[block_m]

    # tuned per cache layout and size class (log2 of batch x capacity): the best tile depends on the work per
    # program, not only on the shapes
    _KEY = ["C", "R", "PAGED", "CAUSAL", "PAGE", "STRIDE_KVT", "size_class"]

    def _bench(fn, quantiles=None):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    _TUNED = {(m, paged): triton.autotune(configs=_configs(m, paged), key=_KEY, do_bench=_bench)(_mla_decode_kernel)
              for m in _CONFIGS for paged in (False, True)}


def pick_config(rows: int, paged: bool = False, C: int = 512) -> tuple[int, dict]:
    """(BLOCK_M, the default config's kwargs incl. num_warps / num_stages / V_SPLIT) for s_q * H = rows (16-bit
    caches) and a latent of C columns. V_SPLIT 2 (two programs per row block, each with half the output columns)
    for 128-row blocks of a wide latent only: a 128 x 512 fp32 accumulator would not fit one program, and the split
    pays for wide accumulators only (C = 512 measured)."""
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 128 if rows % 128 == 0 else 64
    c = _TUNED[(block_m, paged)].configs[0]
    v_split = 2 if block_m == 128 and max(16, triton.next_power_of_2(C)) >= 256 else 1
    return block_m, {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages, "V_SPLIT": v_split}


_CONFIG_KEYS = {"BLOCK_M", "BLOCK_N", "OCC", "num_warps", "num_stages"}  # a config= must name these


def _check_config(config: dict) -> None:
    missing = _CONFIG_KEYS - set(config)
    bm = config.get("BLOCK_M")
    if missing or not (isinstance(bm, int) and bm >= 16 and bm & (bm - 1) == 0):
        raise ValueError(f"mla_decode: config={config!r} needs {sorted(_CONFIG_KEYS)} (missing {sorted(missing)}) "
                         "with BLOCK_M a power of two >= 16; optional V_SPLIT (1 or 2) and MIN_UNITS")


def _check(q, kv_cache, cache_seqlens, head_dim_v, block_table, pe_cache):
    """The reference's shape and dtype checks (no values: a host read would break CUDA-graph capture), and the
    kernels' own: contiguous last dimensions, the cache's lengths on the queries' device."""
    B, s_q, H, C, R = check_mla_decode_args(q, kv_cache, cache_seqlens, head_dim_v, block_table, pe_cache)
    if torch.float64 in (q.dtype, kv_cache.dtype):
        raise ValueError(f"the kernels take bf16, fp16 or fp32 (q {q.dtype}, cache {kv_cache.dtype}); float64 is "
                         "minids.mla_decode_ref's")
    if cache_seqlens.device != q.device:  # a host copy per call would also break CUDA-graph capture
        raise ValueError(f"cache_seqlens is on {cache_seqlens.device}, q on {q.device}: keep them on one device")
    for name, t in (("q", q), ("kv_cache", kv_cache), ("pe_cache", pe_cache)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {t.stride()}")
    return B, s_q, H, C, R


# True sends the calls it can take (16-bit, sm_90, V3's latent at rows a multiple of 64 or 16 / 32, small-v3's at 16
# / 32: see ``mla_decode_gluon.form``) to the Gluon kernels of kernels/mla_decode_gluon.py: on the H200 1.02-2.2x the
# Triton kernel's speed on every V3 shape of bench/mla_decode.py (bench/results/mla_decode.md against
# mla_decode-triton.md, 2026-12-02), 0.93-1.33x on small-v3's (mla_decode-ab-small128.md, 2026-12-03); their GPU
# tests: tests/test_kernels_mla_gluon.py (bench/results/gpu_tests_mla_gluon*.log). False: the Triton kernel for every
# call.
GLUON_MLA = True

LAST_LAUNCH: dict = {}  # what the latest call ran, for benchmarks' reports: the Triton kernel's block_m, cfg, col_blocks,
# programs(OCC); the Gluon path's cfg {"gluon": form} and grid


def mla_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor, head_dim_v: int, scale: float, *,
    causal: bool = True, block_table: torch.Tensor | None = None, pe_cache: torch.Tensor | None = None,
    num_splits: int | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the latent cache (Triton); see ``minids.attention.mla_decode_ref`` for the
    arguments and the result: out (B, s_q, H, C) in q.dtype, lse (B, H, s_q) float32.

    num_splits: the number of programs (per block of BLOCK_M rows) the work is balanced over, with no floor
    on the slice size (tests use it to force many pieces, or 1 for none); None: SMs x programs per SM of
    the tile config. It changes the summation order, not the result beyond rounding.
    config: run this tile config instead of the default / autotuned one (sweeps and tests): BLOCK_M (rows
    per program, any power of two >= 16), BLOCK_N, OCC, num_warps, num_stages, and optionally V_SPLIT (1; 2:
    two programs per row block, each writing half of the C output columns) and MIN_UNITS (the smallest
    slice, in 64-token units; default MIN_UNITS).
    """
    require_runs_here(q, "minids.kernels.mla_decode", "minids.mla_decode_ref")
    B, s_q, H, C, R = _check(q, kv_cache, cache_seqlens, head_dim_v, block_table, pe_cache)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be at least 1, got {num_splits}")
    dev = q.device
    paged = block_table is not None
    page = kv_cache.shape[1] if paged else 1
    capacity = block_table.shape[1] * page if paged else kv_cache.shape[1]
    if pe_cache is None:
        kv, pe = kv_cache[..., :C], kv_cache[..., C:]  # two views of one cache: no copy
    else:
        kv, pe = kv_cache, pe_cache
    seqlens = cache_seqlens.to(device=dev, dtype=torch.int32)
    table = block_table.to(torch.int32) if paged else seqlens  # (unused pointer when contiguous)

    rows = s_q * H
    min_units = MIN_UNITS
    if config is not None:
        _check_config(config)
        cfg = {"V_SPLIT": 1, **config}
        block_m = cfg.pop("BLOCK_M")
        min_units = cfg.pop("MIN_UNITS", MIN_UNITS)
    else:
        block_m, cfg = pick_config(rows, paged, C)
        if INTERPRET:  # the interpreter runs one small tile (no tuning)
            cfg = {"BLOCK_N": 16, "OCC": 1, "num_warps": 4, "num_stages": 1, "V_SPLIT": cfg["V_SPLIT"]}
        elif kv.dtype == torch.float32:  # fp32 takes the FMA path with small tiles
            cfg = {"BLOCK_N": 32, "OCC": 1, "num_warps": 4 if block_m < 64 else 8, "num_stages": 1,
                   "V_SPLIT": cfg["V_SPLIT"]}
    row_blocks = triton.cdiv(rows, block_m)
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(16, triton.next_power_of_2(R))
    fixed = config is not None or INTERPRET or kv.dtype == torch.float32 or not AUTOTUNE
    v_split = cfg["V_SPLIT"]  # (the tuned configs of one BLOCK_M share it)
    if v_split not in (1, 2) or block_c // v_split < 16:
        raise ValueError(f"V_SPLIT must be 1, or 2 with a latent of at least 32 columns; got {v_split} for {C}")
    col_blocks = row_blocks * v_split  # programs per slice
    n_sm = (sm_count(dev.index if dev.index is not None else torch.cuda.current_device()) if q.is_cuda else 8)

    def programs(occ: int) -> int:  # programs per row block
        return num_splits if num_splits is not None else max(1, n_sm * occ // col_blocks)

    # the autotuner's own list: _configs would rebuild the paged configs on every call
    p_max = programs(cfg["OCC"] if fixed else max(c.kwargs["OCC"] for c in _TUNED[(block_m, paged)].configs))

    if out is None:
        out = torch.empty(B, s_q, H, C, dtype=q.dtype, device=dev)
        lse = torch.empty(B, H, s_q, dtype=torch.float32, device=dev)
    else:
        out, lse = out
        if out.shape != (B, s_q, H, C) or out.dtype != q.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be ({B}, {s_q}, {H}, {C}) {q.dtype} with a contiguous last dimension, "
                             f"got {tuple(out.shape)} {out.dtype}")
        if lse.shape != (B, H, s_q) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be ({B}, {H}, {s_q}) float32, got {tuple(lse.shape)} {lse.dtype}")
    if GLUON_MLA and config is None and not INTERPRET:
        from minids.kernels import mla_decode_gluon

        kind = mla_decode_gluon.form(q, kv, pe, C, page if paged else None)
        if kind is not None:
            grid = mla_decode_gluon.mla_decode_gluon(q.to(kv.dtype), kv, pe, seqlens, scale, causal,
                                                     table if paged else None, out, lse, kind, num_splits)
            LAST_LAUNCH.clear()
            LAST_LAUNCH.update(cfg={"gluon": kind}, grid=grid)
            return out, lse
    # the pieces; under the interpreter (the tests) they start as NaN, so a read of a slot that no program
    # wrote shows up in the output
    fill = torch.full if INTERPRET else torch.empty
    nan = (float("nan"),) if INTERPRET else ()
    o_part = fill((2 * p_max, rows, C), *nan, dtype=torch.float32, device=dev)
    l_part = fill((2 * p_max, v_split, rows), *nan, dtype=torch.float32, device=dev)
    counts = arrival_counters("mla_decode", dev, B * col_blocks)

    args = (
        q, kv, pe, seqlens, table, out, lse, o_part, l_part, counts,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), pe.stride(0), table.stride(0) if paged else 0,
        *out.stride()[:3], lse.stride(0), lse.stride(2), lse.stride(1),
        scale * _LOG2E, capacity, H, s_q, B, 1 if num_splits is not None else min_units, max(2, MAX_PIECES),
        max(1, B * capacity).bit_length(),
    )
    meta = {"STRIDE_KVT": kv.stride(1), "STRIDE_PET": pe.stride(1), "C": C, "R": R, "BLOCK_C": block_c,
            "BLOCK_R": block_r, "BLOCK_M": block_m, "BLOCK_B": min(MAX_BLOCK_B, max(16, triton.next_power_of_2(B))),
            "ONE_B_BLOCK": B <= MAX_BLOCK_B,
            "PAGE": page, "PAGED": paged, "CAUSAL": causal,
            "DOT_PRECISION": "ieee" if kv.dtype == torch.float32 else "tf32",
            "UNIT": UNIT, "OVERHEAD": OVERHEAD, "CHUNK_C": min(block_c // v_split, 16384 // block_m),
            "BLOCK_J": triton.next_power_of_2(max(2, MAX_PIECES))}
    if fixed:
        _mla_decode_kernel[(col_blocks, programs(cfg["OCC"]))](*args, **meta, **cfg)
    else:
        tuner = _TUNED[(block_m, paged)]
        tuner[lambda m: (col_blocks, programs(m["OCC"]))](*args, **meta, V_SPLIT=v_split)
        c = tuner.best_config
        cfg = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages, "V_SPLIT": v_split}
    LAST_LAUNCH.clear()
    LAST_LAUNCH.update(block_m=block_m, cfg=cfg, col_blocks=col_blocks, programs=programs)  # references only
    return out, lse
