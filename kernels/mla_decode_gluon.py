"""MLA decoding on Hopper's warpgroup MMAs from shared memory (Gluon): the fast path of ``mla_decode`` for V3's latent
(C = 512, R = 64) and, at 16 or 32 rows, small-v3's (C = 256, R = 32), 16-bit caches, sm_90 (``kernels.mla_decode.GLUON_MLA``, on). Same signature and result as
``kernels.mla_decode.mla_decode`` (and ``minids.mla_decode_ref``); tests/test_kernels_mla_gluon.py runs it on the GPU.

Why (bench/results/kernels_notes.md, fifteenth and sixteenth sessions): the Triton kernel holds the query tile as a
dot operand in registers (64 rows x 576: 144 registers a thread per warpgroup) beside the float32 accumulator, so at
H=128 its sm_90 build spills 5.9 KB a thread and runs at 109-276 TFLOP/s against the >= 300 target; at H=16 it runs
one latency-bound warp a scheduler (0.16 issues a cycle, 29% of copy at B=32, 1K). Here the query and the cache tiles
stay in shared memory (TMA loads, 64-token tiles in 64-column boxes), where the MMAs read them. With V3's latent
the narrow kernel brings a tile's (and the query's) eight latent boxes in one 3-D copy (``TMA3_LATENTS``), as the
wide kernel's producer does (``WIDE_TMA3``).

Two kernels, by rows = s_q * H:
- rows a multiple of 64 (H=128, H=64): ``_ws_kernel`` (the wide kernel), 64 rows a program, warp-specialized: a
  producer warp streams each piece's query and the cache tiles through a ring of STAGES buffers; two consumer
  warpgroups each compute the 64 x 32 scores of their own half of a tile's tokens (nine K=64 MMAs: 8 latent boxes
  and the RoPE box), meet for the rows' maxima, write their half of P to shared memory, meet again, and compute
  P V over all 64 tokens for their own half of the 512 output columns (four 64-wide accumulators) (``WIDE_SPLIT``;
  before, each computed all 64 x 64 scores, 1.5x the ideal tensor work, with no traffic between the warpgroups:
  8-11% slower on long caches, bench/results/mla_decode-ab-long.md). A piece's output (or partial) leaves through
  its last tile's buffer by TMA (``WIDE_TSTORE``).
- rows 16 or 32 (H=16, s_q 1 or 2): ``_narrow_kernel``, transposed: the tile's 64 tokens are the MMA's M and the
  rows its N (no padding to 64 rows): S^T = K Q^T, softmax along the tokens, O^T (C x rows) += V^T P^T with P^T
  written to shared memory (the MMA's B operand) and V^T read transposed from the cache tile, on one warpgroup.
  C = 256 takes 4 latent boxes instead of 8, and a RoPE narrower than 64 columns (R = 32) is zero-filled past R by
  the TMA in both the query's box and the cache's. At V3's 32 rows a piece's output (or partial) leaves through the
  ring's shared memory by TMA (``NARROW_TSTORE``). Its
  two-warpgroup form (``_ws_kernel`` with TRANSPOSED: the wide kernel's warp specialization, each consumer with half
  of the output columns and the scores of its own boxes, the two shares added through shared memory) passes its GPU
  tests but is off (``NARROW2_ROWS``): on the H200 it wins only on ragged batches at 32 rows
  (bench/results/mla_decode-ab-merge2.md).

Work split (``slices_ref``, ``pieces_ref``): P programs per row block (one per SM) take consecutive slices of the
units line of all sequences (sequence b: SEQ_OVERHEAD units, then one a tile: 64 tokens, or 128 for the narrow
kernel with C = 256, ``NARROW_TILES``). Ragged tile counts take the Triton kernel's balanced slices
(``kernels.mla_decode.schedule_ref``, with these kernels' SEQ_OVERHEAD: every program the same work to a unit; a
slice may cut sequences and run on into the next ones); equal ones keep the fixed split (each sequence cut into P //
B equal pieces, or whole sequences when B > P), which measured faster there. Every program derives the schedule
from the lengths in the kernel (no host read, graph-capturable). A sequence in one piece is written to out / lse
directly; the pieces of a cut one go to partial slots (2 a program; bfloat16, ``PART_BF16``), merged in program
order: at 16 rows (``MERGE_ROWS``) by the program of the last piece to finish (a per-sequence arrival counter; the
partials brought into the free tile buffers by TMA, four a round trip), otherwise by ``_combine_kernel``, a second
launch whenever P > 1, programmatically dependent (``PDL``: it launches while the attention kernel runs and waits
for it before reading).
Paged caches: 64-token pages (one a 64-column TMA box's rows), looked up per box in the block table.
Preconditions (``form``): q, cache and pe of one 16-bit dtype; C = 512 and R = 64, or at 16 / 32 rows C = 256 and R
<= 32 (a multiple of 8); the cache's rows 16-byte aligned (TMA); the page size 64 when paged.
"""

from __future__ import annotations

import functools
import math

import torch
from minids.kernels import HAVE_TRITON, arrival_counters, sm_count
from minids.kernels.gluon_hopper import (
    HAVE_GLUON,
    TensorDescriptor,
    fence_async_shared,
    gl,
    gluon,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from minids.kernels.mla_decode import (
    MAX_BLOCK_B,
    MAX_PIECES,
    MIN_UNITS,
    UNIT,
    balanced_slices,
    slice_pieces,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl
    from minids.kernels.mla_decode import _block_units, _totals
    from triton.language.extra.cuda import gdc_wait

LATENT, ROPE = 512, 64  # V3's (C, R): the wide kernel's only one
NARROW_LATENTS = {512: 64, 256: 32}  # the narrow kernel's (C, largest R): V3's and small-v3's
TRACE_LEN = 256  # events a program of a traced launch records (``mla_decode_gluon(..., trace=)``)
# The units the Gluon kernels' schedule charges a sequence beside its tiles (the Triton kernel's OVERHEAD is 1): a
# piece's start and end (its query's load, its stores, the merge) cost these kernels about two tiles' time, so
# slices holding many short pieces take fewer tiles. On the H200 (bench/results/mla_decode-ab-pre-*.md, build ovh2,
# and -ab-overhead-*.md, against 1, 3 and 4 on the ragged shapes): 2 is 3.5% faster over them (geometric mean), at
# most 0.6% slower at one (small-v3 B=128 1K~ s_q=1); B=32 H=128 1K~ 43.6 -> 39.7 us, B=128 H=16 1K~ 50.7 -> 45.0;
# 3 is as fast on the whole but up to 6% slower at one shape; equal lengths keep the fixed split (unchanged).
SEQ_OVERHEAD = 2

if HAVE_TRITON:

    @triton.jit
    def _combine_kernel(SEQLENS, O_PART, L_PART, O, LSE, B, capacity, min_units, max_pieces, n_rows, H, stride_ob,
                        stride_os, stride_oh, stride_lb, stride_lh, stride_ls, P, C: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr, UNIT: tl.constexpr,
                        OVERHEAD: tl.constexpr, PDL: tl.constexpr = False):
        """Rows [BLOCK_R program_id 1, +BLOCK_R) of sequence b (program_id 0), if the schedule (``slices_ref`` with
        P programs) cut it: out = sum_j w_j o_j / sum_j w_j, w_j = 2^(l_j - max l), over its pieces j in
        program order; lse = (max + log2 sum w) ln 2. O_PART (2 P, n_rows, C) float32 or bfloat16 (added in
        float32) and L_PART (2 P, n_rows) float32 (log2 units; -inf and a zero partial for a piece that saw no token
        of a row). A sequence in one piece was written by the attention kernel: nothing to do. PDL (a programmatic
        dependent launch after the attention kernel): the schedule is derived while that kernel runs, and the
        partials read once it is done (griddepcontrol.wait)."""
        b = tl.program_id(0)
        r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < n_rows
        total, n_max = _totals(SEQLENS, B, capacity, BLOCK_B, UNIT, OVERHEAD)
        W = tl.maximum(tl.maximum(tl.cdiv(total, P), min_units), tl.cdiv(n_max, max_pieces - 1))
        before = 0  # units of the sequences before b
        for i in range(0, B, BLOCK_B):
            _, _, units = _block_units(SEQLENS, i, B, capacity, BLOCK_B, UNIT, OVERHEAD)
            before += tl.sum(tl.where(i + tl.arange(0, BLOCK_B) < b, units, 0), 0)
        k = tl.cdiv(tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), capacity), UNIT)
        first = before + OVERHEAD  # the unit of its first tile
        p0 = first // W
        p1 = (first + k - 1) // W
        if total == B * (n_max + OVERHEAD):  # uniform: equal pieces of P // B programs each (or whole sequences)
            s = tl.maximum(P // B, 1)
            per = tl.maximum(tl.cdiv(k, s), 1)
            p0 = b * s
            p1 = tl.where(P >= B, p0 + tl.cdiv(k, per) - 1, p0)
        if (k > 0) & (p1 > p0):
            if PDL:
                gdc_wait()
            m = tl.full([BLOCK_R], float("-inf"), tl.float32)
            for p in range(p0, p1 + 1):  # the first piece is program p0's last (slot 2 p0 + 1), the others first
                slot = 2 * p + (p == p0).to(tl.int32)
                m = tl.maximum(m, tl.load(L_PART + slot.to(tl.int64) * n_rows + r, mask=r_ok, other=float("-inf")))
            m_safe = tl.where(m == float("-inf"), 0.0, m)
            cols = tl.arange(0, BLOCK_C)
            den = tl.zeros([BLOCK_R], tl.float32)
            acc = tl.zeros([BLOCK_R, BLOCK_C], tl.float32)
            mask = r_ok[:, None] & (cols < C)[None, :]
            for p in range(p0, p1 + 1):
                slot = (2 * p + (p == p0).to(tl.int32)).to(tl.int64) * n_rows + r
                w = tl.exp2(tl.load(L_PART + slot, mask=r_ok, other=float("-inf")) - m_safe)
                den += w
                acc += w[:, None] * tl.load(O_PART + slot[:, None] * C + cols[None, :], mask=mask, other=0.0)
            none = den == 0.0
            out = acc / tl.where(none, 1.0, den)[:, None]
            qi = r // H
            h = r % H
            tl.store(O + b * stride_ob + (qi * stride_os + h * stride_oh)[:, None] + cols[None, :],
                     out.to(O.dtype.element_ty), mask=mask)
            lse = tl.where(none, float("-inf"), (m + tl.log2(tl.where(none, 1.0, den))) * 0.6931471805599453)
            tl.store(LSE + b * stride_lb + h * stride_lh + qi * stride_ls, lse, mask=r_ok)


def combine(o_part: torch.Tensor, l_part: torch.Tensor, seqlens: torch.Tensor, capacity: int, min_units: int,
            out: torch.Tensor, lse: torch.Tensor, unit: int = UNIT, pdl: bool = False) -> None:
    """Merge the pieces of every sequence the schedule of P = len(o_part) // 2 programs cut (o_part (2 P, s_q * H,
    C) float32 or bfloat16, l_part (2 P, s_q * H) float32, log2 units: the slots of ``pieces_ref``) into out (B, s_q,
    H, C) and lse (B, H, s_q) (natural log), in program order; the rows of uncut sequences are left as they are.
    unit: the schedule's tokens a tile (the attention kernel's). pdl: launched as a programmatic dependent of the
    kernel before it on the stream (a CUDA GPU of sm_90 or later): its schedule overlaps that kernel's end, its
    reads wait for it."""
    two_p, n_rows, C = o_part.shape
    B, H = out.shape[0], out.shape[2]
    block_r = 16
    _combine_kernel[(B, -(-n_rows // block_r))](
        seqlens, o_part, l_part, out, lse, B, capacity, min_units, max(2, MAX_PIECES), n_rows, H, out.stride(0),
        out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2), two_p // 2, C=C,
        BLOCK_C=triton.next_power_of_2(C), BLOCK_R=block_r,
        BLOCK_B=min(MAX_BLOCK_B, max(16, triton.next_power_of_2(B))), UNIT=unit, OVERHEAD=SEQ_OVERHEAD,
        **({"PDL": True, "launch_pdl": True} if pdl else {}))


def slices_ref(lens: list[int], P: int, min_units: int = MIN_UNITS) -> list[tuple[int, int]]:
    """Each program's slice [u0, u1) of the units line (sequence b: SEQ_OVERHEAD units, then one a 64-token tile;
    laid end to end). Ragged tile counts: ``kernels.mla_decode``'s balanced slices of W units (``schedule_ref``). Equal
    ones (k tiles each): with P >= B programs, each sequence cut into equal pieces of ceil(k / (P // B)) tiles, one a
    program (programs past B (P // B) idle); with fewer, ceil(B / P) whole sequences a program. Equal lengths thus
    keep the fixed split's pieces (no program straddles two sequences)."""
    n = [-(-max(0, x) // UNIT) for x in lens]
    B = len(n)
    OH = SEQ_OVERHEAD
    total = sum(k + OH for k in n)
    if B and min(n) == max(n):
        k = n[0]
        if P >= B:
            s = P // B
            per = max(-(-k // s), 1)
            out = []
            for p in range(P):
                b, j = min(p // s, B), p % s
                S = b * (k + OH)
                u0 = S if j == 0 else S + OH + j * per
                out.append((u0, max(u0, S + OH + min((j + 1) * per, k)) if b < B else u0))
            return out
        m = -(-B // P)
        return [(min(p * m, B) * (k + OH), min((min(p * m, B) + m) * (k + OH), total)) for p in range(P)]
    return balanced_slices(lens, P, min_units, max(2, MAX_PIECES), OH)[1]


def pieces_ref(lens: list[int], P: int, min_units: int = MIN_UNITS) -> list[list[tuple]]:
    """For each program the (sequence, first token, end token, slot or None) pieces of its slice (``slices_ref``);
    slot None: written as the result; else the partial slot 2 p + (the piece starts the sequence)."""
    return slice_pieces(lens, slices_ref(lens, P, min_units), SEQ_OVERHEAD)


def combine_ref(o_part: torch.Tensor, l_part: torch.Tensor, lens: list[int], min_units: int, out: torch.Tensor,
                lse: torch.Tensor) -> None:
    """``combine`` in torch (the tests' reference), in float32 (whatever the partials' dtype), from ``pieces_ref``."""
    P = o_part.shape[0] // 2
    H = out.shape[2]
    work = pieces_ref(lens, P, min_units)
    slots: dict[int, list[int]] = {}
    for pieces in work:
        for b, _, _, slot in pieces:
            if slot is not None:
                slots.setdefault(b, []).append(slot)
    for b, js in slots.items():
        lp, op = l_part[js], o_part[js].float()  # (pieces, rows), (pieces, rows, C)
        m = lp.amax(0)
        w = torch.exp2(lp - torch.where(torch.isinf(m), torch.zeros_like(m), m))
        den = w.sum(0)
        o = (w.unsqueeze(-1) * op).sum(0) / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)
        out[b] = o.view(-1, H, o.shape[-1]).to(out.dtype)
        ls = torch.where(den == 0, torch.full_like(den, float("-inf")), (m + torch.log2(den)) * math.log(2))
        lse[b] = ls.view(-1, H).transpose(0, 1)


if HAVE_GLUON:
    ROWS = gl.constexpr(64)  # rows a program of the wide kernel (one warpgroup MMA's M)
    BN = gl.constexpr(64)  # tokens a TMA box (and a page); the wide kernel's tile, the narrow kernel's TN = 64 or 128
    CW = gl.constexpr(64)  # columns a TMA box / shared-memory chunk (128 bytes of 16-bit values: one swizzle row)
    NKV = gl.constexpr(LATENT // 64)  # latent boxes a tile (the value's columns); the RoPE box is chunk NKV
    OVERHEAD_C = gl.constexpr(SEQ_OVERHEAD)  # the schedule's units charged per sequence
    FAR_PAGE = gl.constexpr(1 << 24)  # a page whose rows (2^30 on) lie past any cache's 2-D view: TMA zero fill
    TRACE_EVENTS = gl.constexpr(TRACE_LEN)
    MERGE_GROUP = gl.constexpr(4)  # partials the narrow kernel's merge brings into shared memory at once

    @gluon.jit
    def _stamp(trace_ptr, p, e, code: gl.constexpr):
        """Event e of program p (a traced launch): (%globaltimer ns, %clock64, code) at trace_ptr[p, e], e <
        TRACE_LEN; returns e + 1. Every thread reads its clocks and stores the same slot (one of them lands)."""
        t = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)
        c = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)
        if e < TRACE_EVENTS:
            ptr = trace_ptr + (p.to(gl.int64) * TRACE_EVENTS + e) * 3
            gl.store(ptr, t)
            gl.store(ptr + 1, c)
            gl.store(ptr + 2, t * 0 + code)
        return e + 1

    @gluon.jit
    def _tile_row(tbl_ptr, kv_row, t, PAGED: gl.constexpr):
        """The cache row (of the 2-D (rows, C) view) where the 64-token tile starting at token t begins."""
        if PAGED:
            return gl.load(tbl_ptr + t // BN) * BN
        else:
            return kv_row + t

    @gluon.jit
    def _load_tile(kv_desc, pe_desc, row, bar, lat, base, rope, NL: gl.constexpr):
        """The NL + 1 boxes of one 64-token tile, the latent's into lat[base .. base + NL - 1] and the RoPE's into
        rope, arriving on bar. A RoPE narrower than the box (R = 32) is zero-filled past R by the TMA (as is the
        query's)."""
        mbarrier.expect(bar, NL * kv_desc.block_type.nbytes + pe_desc.block_type.nbytes)
        for c in gl.static_range(NL):
            tma.async_copy_global_to_shared(kv_desc, [row, c * CW], bar, lat.index(base + c))
        tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, rope)

    @gluon.jit
    def _load_tiles(kv_desc, kv3_desc, pe_desc, tbl, kv_row, t, seqlen, bar, lat3, lat, rope, st,
                    STAGES: gl.constexpr, NL: gl.constexpr, TN: gl.constexpr, PAGED: gl.constexpr,
                    TMA3: gl.constexpr):
        """The TN-token tile starting at token t (of a sequence of seqlen tokens) into ring slot st: its latent boxes
        into lat[st NL .. st NL + NL - 1] (lat3: the same buffers, the 3-D copy's view) and its RoPE box into
        rope[st]. TMA3 (64-token tiles): two copies, the NL latent boxes in one 3-D box of kv3_desc ((box, token,
        column), the boxes 128 bytes apart), issued by the ring slot's predicated copy (a view's offset must be
        static). Otherwise a 2-D copy a box; with 128-token tiles each 64-token sub-tile's into rows 64 j .. 64 j +
        63. A sub-tile wholly past the length (its page may not exist) is read from a row past the cache's end: the
        TMA fills it with zeros, reading nothing, and counts its bytes on bar as for any box."""
        if TMA3:
            row = _tile_row(tbl, kv_row, t, PAGED)
            mbarrier.expect(bar, kv3_desc.block_type.nbytes + pe_desc.block_type.nbytes)
            for sb in gl.static_range(STAGES):
                tma.async_copy_global_to_shared(kv3_desc, [0, row, 0], bar, lat3.slice(sb * NL, NL), pred=st == sb)
            tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, rope.index(st))
        elif TN == BN:
            _load_tile(kv_desc, pe_desc, _tile_row(tbl, kv_row, t, PAGED), bar, lat, st * NL, rope.index(st), NL)
        else:
            base = st * NL
            mbarrier.expect(bar, (TN // BN) * (NL * kv_desc.block_type.nbytes + pe_desc.block_type.nbytes))
            for j in gl.static_range(TN // BN):
                tj = t + j * BN
                if PAGED:
                    row = gl.load(tbl + tj // BN, mask=tj < seqlen, other=FAR_PAGE) * BN
                else:
                    row = gl.where(tj < seqlen, kv_row + tj, FAR_PAGE * BN)
                for c in gl.static_range(NL):
                    tma.async_copy_global_to_shared(kv_desc, [row, c * CW], bar,
                                                    lat.index(base + c).slice(j * BN, BN))
                tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, rope.index(st).slice(j * BN, BN))

    @gluon.jit
    def _zero_tail(kv_smem, first: gl.constexpr, count: gl.constexpr, tok0, seqlen, TN: gl.constexpr = BN):
        """Zero the rows of tokens >= seqlen in buffers first .. first + count - 1 of a tile starting at token tok0:
        they are read as values (P V), where a masked token's P = 0 still meets whatever the cache holds there (NaN
        in the tests). Their scores need no care: they are masked before the softmax."""
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [gl.num_warps(), 1], [1, 0])
        keep = gl.expand_dims(tok0 + gl.arange(0, TN, layout=gl.SliceLayout(1, zl)) < seqlen, 1)
        for k in gl.static_range(count):
            buf = kv_smem.index(first + k)
            x = buf.load(zl)
            buf.store(gl.where(keep, x, gl.zeros_like(x)))

    @gluon.jit
    def _softmax_step(s, m_i, l_i, AXIS: gl.constexpr):
        """One tile of the online softmax in base 2 along AXIS (the tokens) of the masked scores s: (p, alpha, m,
        l). A row that has seen no token yet (max -inf) keeps p = 0 and l = 0."""
        m_new = gl.maximum(m_i, gl.max(s, axis=AXIS))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, AXIS))
        return p, alpha, m_new, l_i * alpha + gl.sum(p, axis=AXIS)

    @gluon.jit
    def _per_warp(x, W: gl.constexpr, SUM: gl.constexpr):
        """(W, RN): each warp's sum (SUM) or max over its tokens of x (TN tokens x RN rows in the MMA layout: 16 a warp
        in each 16 W-token block, the blocks in registers), with no traffic between warps."""
        x4 = gl.reshape(x, [x.shape[0] // (16 * W), W, 16, x.shape[1]])
        if SUM:
            return gl.sum(gl.sum(x4, axis=2), axis=0)
        else:
            return gl.max(gl.max(x4, axis=2), axis=0)

    @gluon.jit
    def _softmax_t(s, m_i, l_w, mx_smem, W: gl.constexpr):
        """``_softmax_step`` along axis 0 of the transposed scores s (TN tokens x RN rows in the MMA layout: the
        tokens spread over the W warps), with one CTA barrier instead of the reductions' five: each warp's row maxima
        go to mx_smem (W, RN), and every thread reads all W back; the row sums stay per warp (l_w (W, RN), each
        warp's over its own tokens), added once a piece (``_warp_sums``)."""
        mx_smem.store(_per_warp(s, W, False))
        gl.thread_barrier()
        m_new = gl.maximum(m_i, gl.max(mx_smem.load(s.type.layout), axis=0))  # (W rows: lanes of each warp)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, 0))
        pw = _per_warp(p, W, True)
        a_w = gl.convert_layout(alpha, gl.SliceLayout(0, pw.type.layout), assert_trivial=True)
        return p, alpha, m_new, l_w * gl.expand_dims(a_w, 0) + pw

    @gluon.jit
    def _warp_sums(l_w, layout: gl.constexpr):
        """The row sums from ``_softmax_t``'s per-warp ones, in layout."""
        return gl.convert_layout(gl.sum(l_w, axis=0), layout)

    @gluon.jit
    def _store_rows(acc, inv, o_base, o_qi, o_h, col0, rows, cols, H):
        """acc * inv (ROWS x 64, rows r, columns col0 + c) to o_base + (r // H) o_qi + (r % H) o_h + col."""
        ptr = o_base + gl.expand_dims((rows // H) * o_qi + (rows % H) * o_h, 1) + col0 + gl.expand_dims(cols, 0)
        gl.store(ptr, (acc * inv).to(o_base.dtype.element_ty))

    @gluon.jit
    def _row_limit(seqlen, rows, H, S_Q, CAUSAL: gl.constexpr):
        """Tokens each row (query token i = row // H) sees: t < len - s_q + 1 + i when causal, else t < len."""
        if CAUSAL:
            return seqlen - S_Q + 1 + rows // H
        else:
            return seqlen + rows * 0

    @gluon.jit
    def _scores(q_lat, q_rope, kv_lat, kv_rope, base, s_zero):
        """S = Q K^T of the tile in latent boxes base .. base + NKV - 1 and the RoPE box kv_rope, waited for."""
        s = warpgroup_mma(q_lat.index(0), kv_lat.index(base).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        for c in gl.static_range(1, NKV):
            s = warpgroup_mma(q_lat.index(c), kv_lat.index(base + c).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma(q_rope, kv_rope.permute((1, 0)), s, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(s,))

    @gluon.jit
    def _scores_t(kv_lat, q_lat, base, kv_rope, q_rope, s_zero, C0: gl.constexpr, C1: gl.constexpr,
                  ROPE: gl.constexpr):
        """S^T = K Q^T (the narrow kernels' transposed scores) over the latent boxes C0 .. C1 - 1 (kv_lat[base + c]
        against q_lat[c]), then the RoPE boxes kv_rope and q_rope if ROPE, waited for: the whole tile (0, NL, True),
        or a consumer's share in ``_ws_kernel``'s narrow form (its own output columns' boxes; consumer 0 also the
        RoPE box)."""
        s = _scores_t_issue(kv_lat, q_lat, base, kv_rope, q_rope, s_zero, C0, C1, ROPE)
        return warpgroup_mma_wait(num_outstanding=0, deps=(s,))

    @gluon.jit
    def _scores_t_issue(kv_lat, q_lat, base, kv_rope, q_rope, s_zero, C0: gl.constexpr, C1: gl.constexpr,
                        ROPE: gl.constexpr):
        """``_scores_t``'s MMAs, issued and not waited for."""
        s = warpgroup_mma(kv_lat.index(base + C0), q_lat.index(C0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        for c in gl.static_range(C0 + 1, C1):
            s = warpgroup_mma(kv_lat.index(base + c), q_lat.index(c).permute((1, 0)), s, is_async=True)
        if ROPE:
            s = warpgroup_mma(kv_rope, q_rope.permute((1, 0)), s, is_async=True)
        return s

    @gluon.jit
    def _scores_half(q_lat, q_rope, kv_lat, kv_rope, base, t0: gl.constexpr, s_zero):
        """S = Q K^T over the tile's tokens t0 .. t0 + 31 (rows t0 .. of its latent boxes base .. base + NKV - 1 and
        of its RoPE box kv_rope), waited for: a consumer's half of the wide kernel's scores (``SPLIT``)."""
        s = warpgroup_mma(q_lat.index(0), kv_lat.index(base).slice(t0, BN // 2).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
        for c in gl.static_range(1, NKV):
            s = warpgroup_mma(q_lat.index(c), kv_lat.index(base + c).slice(t0, BN // 2).permute((1, 0)), s,
                              is_async=True)
        s = warpgroup_mma(q_rope, kv_rope.slice(t0, BN // 2).permute((1, 0)), s, is_async=True)
        return warpgroup_mma_wait(num_outstanding=0, deps=(s,))

    @gluon.jit
    def _pv_halves(p_smem, kv_smem, v, acc):
        """acc + P V over a tile's 64 tokens for the 64 value columns of box v: P's two token halves (each consumer's,
        p_smem[0] and [1]) against the box's rows 0 .. 31 and 32 .. 63, issued (not waited for)."""
        acc = warpgroup_mma(p_smem.index(0), kv_smem.index(v).slice(0, BN // 2), acc, is_async=True)
        return warpgroup_mma(p_smem.index(1), kv_smem.index(v).slice(BN // 2, BN // 2), acc, is_async=True)

    @gluon.jit
    def _exchange(x, xs_smem, mine, theirs, bar, phase):
        """Write this consumer's row vector x to xs_smem[mine], meet the other consumer at bar (count 2, this phase),
        and return the other's, xs_smem[theirs]."""
        xs_smem.index(mine).store(x)
        gl.thread_barrier()  # this warpgroup's part is in shared memory before it arrives
        mbarrier.arrive(bar)
        mbarrier.wait(bar, phase)
        return xs_smem.index(theirs).load(x.type.layout)

    @gluon.jit
    def _store4(ptr, acc0, acc1, acc2, acc3, inv):
        """acc_j * inv to ptr + j * CW (j = 0 .. 3: four 64-column chunks of O^T), in ptr's element type."""
        dt = ptr.dtype.element_ty
        gl.store(ptr, (acc0 * inv).to(dt))
        gl.store(ptr + CW, (acc1 * inv).to(dt))
        gl.store(ptr + 2 * CW, (acc2 * inv).to(dt))
        gl.store(ptr + 3 * CW, (acc3 * inv).to(dt))

    @gluon.jit
    def _add(x, y):
        return x + y

    @gluon.jit
    def _slice(seqlens_ptr, B, capacity, P, p, min_units, max_pieces, BLOCK_B: gl.constexpr, TN: gl.constexpr = BN):
        """Program p's slice [u0, u1) of the units line (``slices_ref``), the first sequence b whose units reach past
        u0, the unit S where b starts, the balanced slices' width W and whether the tile counts are equal. Run by
        the kernel's 4 warps; one read of the lengths when B <= BLOCK_B (a round trip to L2 before the first load is
        issued), else two passes."""
        lay: gl.constexpr = gl.BlockedLayout([max(BLOCK_B // 32, 1)], [32], [gl.num_warps()], [0])  # (warps alike)
        if B <= BLOCK_B:
            offs = gl.arange(0, BLOCK_B, layout=lay)
            ok = offs < B
            n = gl.cdiv(gl.minimum(gl.maximum(gl.load(seqlens_ptr + offs, mask=ok, other=0), 0), capacity), TN)
            units = gl.where(ok, n + OVERHEAD_C, 0)
            total = gl.sum(units, 0)
            n_max = gl.max(n, 0)
            W = gl.maximum(gl.maximum(gl.cdiv(total, P), min_units), gl.cdiv(n_max, max_pieces - 1))
            u0 = p * W
            ends = gl.associative_scan(units, 0, _add)
            before = ok & (ends <= u0)
            b = gl.sum(before.to(gl.int32), 0)
            S = gl.max(gl.where(before, ends, 0), 0)
        else:
            total = 0
            n_max = 0
            for i in range(0, B, BLOCK_B):
                offs = i + gl.arange(0, BLOCK_B, layout=lay)
                ok = offs < B
                n = gl.cdiv(gl.minimum(gl.maximum(gl.load(seqlens_ptr + offs, mask=ok, other=0), 0), capacity), TN)
                total += gl.sum(gl.where(ok, n + OVERHEAD_C, 0), 0)
                n_max = gl.maximum(n_max, gl.max(n, 0))
            W = gl.maximum(gl.maximum(gl.cdiv(total, P), min_units), gl.cdiv(n_max, max_pieces - 1))
            u0 = p * W
            b = 0
            S = 0
            run = 0
            for i in range(0, B, BLOCK_B):
                offs = i + gl.arange(0, BLOCK_B, layout=lay)
                ok = offs < B
                n = gl.cdiv(gl.minimum(gl.maximum(gl.load(seqlens_ptr + offs, mask=ok, other=0), 0), capacity), TN)
                units = gl.where(ok, n + OVERHEAD_C, 0)
                ends = run + gl.associative_scan(units, 0, _add)
                before = ok & (ends <= u0)
                b += gl.sum(before.to(gl.int32), 0)
                S = gl.maximum(S, gl.max(gl.where(before, ends, 0), 0))
                run += gl.sum(units, 0)
        u1 = gl.minimum(u0 + W, total)
        k = n_max  # uniform (every sequence k tiles): whole sequences, or each cut into equal pieces (``slices_ref``)
        if total == B * (k + OVERHEAD_C):  # (the last result below: whether it is)
            if P >= B:
                s = P // B
                per = gl.maximum(gl.cdiv(k, s), 1)
                j = p % s
                b = gl.minimum(p // s, B)
                S = b * (k + OVERHEAD_C)
                u0 = gl.where(j == 0, S, S + OVERHEAD_C + j * per)
                u1 = gl.where(b < B, gl.maximum(u0, S + OVERHEAD_C + gl.minimum((j + 1) * per, k)), u0)
            else:
                m = gl.cdiv(B, P)
                b = gl.minimum(p * m, B)
                S = b * (k + OVERHEAD_C)
                u0 = S
                u1 = gl.minimum(S + m * (k + OVERHEAD_C), total)
        return u0, u1, b, S, W, total == B * (k + OVERHEAD_C)

    @gluon.jit
    def _piece_of(length, S, u0, u1, capacity, TN: gl.constexpr = BN):
        """A sequence of the given length starting at unit S, within the slice [u0, u1): (length clamped, its tiles
        k, the slice's tiles of it [lo, hi), whether the slice holds a piece of it, whether that piece is the whole
        sequence). hi is at least lo: a slice that ends within the sequence's overhead units holds none of its tiles
        (and the whole of an empty one that starts in it)."""
        seqlen = gl.minimum(gl.maximum(length, 0), capacity)
        k = gl.cdiv(seqlen, TN)
        first = S + OVERHEAD_C
        lo = gl.maximum(u0, first) - first
        hi = gl.maximum(gl.minimum(u1, first + k) - first, lo)
        has = (hi > lo) | ((k == 0) & (u0 <= S))
        return seqlen, k, lo, hi, has, (lo == 0) & (hi == k)

    @gluon.jit
    def _cut(b, S, k, W, uniform, P, B):
        """The programs p0 .. p1 holding the pieces of sequence b (starting at unit S, k tiles): ``slices_ref``'s."""
        first = S + OVERHEAD_C
        s = gl.maximum(P // B, 1)
        per = gl.maximum(gl.cdiv(k, s), 1)
        p0 = gl.where(uniform, b * s, first // W)
        p1 = gl.where(uniform, gl.where(P >= B, b * s + gl.cdiv(k, per) - 1, b * s), (first + k - 1) // W)
        return p0, p1

    @gluon.jit
    def _launch_dependents():
        """griddepcontrol.launch_dependents: the combine kernel (a programmatic dependent launch) may start once every
        program has passed this; it waits for this kernel's end before it reads (``combine``'s pdl)."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; mov.u32 $0, 0;", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _fence_global_async():
        """fence.proxy.async.global: this thread's generic-proxy view of global memory (its own stores, and the other
        programs' partials acquired through the arrival counter) ordered before its async-proxy (TMA) reads."""
        gl.inline_asm_elementwise("fence.proxy.async.global; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False,
                                  pack=1)

    @gluon.jit
    def _piece_lse(lp_ptr, q, p0, p1, rows, RN: gl.constexpr):
        """The log2 lse of program q's partial slot of the sequence (programs p0 .. p1; -inf past p1)."""
        slot = 2 * q + (q == p0).to(gl.int32)
        return gl.load(lp_ptr + slot.to(gl.int64) * RN + rows, mask=(rows < RN) & (q <= p1), other=float("-inf"))

    @gluon.jit
    def _piece_add(stage, j: gl.constexpr, lq, m_safe, den, acc0, acc1, lay: gl.constexpr, NBOX: gl.constexpr):
        """den + w, acc + w o_j for the group's piece j in stage (boxes j NBOX ..), w = 2^(lq - m_safe)."""
        w = gl.exp2(lq - m_safe)
        acc0 += gl.expand_dims(w, 1) * stage.index(j * NBOX).load(lay).to(gl.float32)
        if NBOX == 2:
            acc1 += gl.expand_dims(w, 1) * stage.index(j * NBOX + 1).load(lay).to(gl.float32)
        return den + w, acc0, acc1

    @gluon.jit
    def _merge(op_desc, lp_ptr, o_ptr, l_ptr, stage, bar, phase, b, p0, p1, H, stride_ob, stride_os, stride_oh,
               stride_lb, stride_ls, stride_lh, RN: gl.constexpr, NL: gl.constexpr, trace_ptr, p, e,
               TRACE: gl.constexpr):
        """The last piece's program merges sequence b's pieces (programs p0 .. p1, in that order) from their partial
        slots (float32 or bfloat16, added in float32), as ``_combine_kernel`` does: out = sum_j w_j o_j / sum_j w_j,
        w_j = 2^(l_j - max l). Four pieces at a time come into stage (the cache tiles' shared memory, free by now) by
        TMA, on bar at once, with their lse: one round trip to L2 a group (the eighteenth session's merge, a piece a
        round trip through registers, took 4.7 us at B=32 1K: bench/results/mla_decode-trace.md); a group's slots past
        p1 are read from rows past the partials' end (zero-filled, weight 0, not added). A running max across groups.
        TRACE: event 11 once the first group has landed. Returns bar's phase after, and the events so far."""
        gl.static_assert(MERGE_GROUP == 4)  # (the group's four lse below)
        BOXC: gl.constexpr = op_desc.block_type.shape[1]
        NBOX: gl.constexpr = NL * CW // BOXC
        lay: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [gl.num_warps(), 1], [1, 0])  # (row, column)
        rows = gl.arange(0, RN, layout=gl.SliceLayout(1, lay))
        cols = gl.expand_dims(gl.arange(0, BOXC, layout=gl.SliceLayout(0, lay)), 0)
        end_row = op_desc.shape[0]
        m = gl.full([RN], float("-inf"), gl.float32, gl.SliceLayout(1, lay))
        den = gl.zeros([RN], gl.float32, gl.SliceLayout(1, lay))
        acc0 = gl.zeros([RN, BOXC], gl.float32, lay)
        acc1 = gl.zeros([RN, BOXC], gl.float32, lay)  # (NBOX == 2)
        _fence_global_async()
        for g0 in range(p0, p1 + 1, MERGE_GROUP):
            mbarrier.expect(bar, MERGE_GROUP * NBOX * op_desc.block_type.nbytes)
            for j in gl.static_range(MERGE_GROUP):
                q = g0 + j
                row = gl.where(q <= p1, (2 * q + (q == p0).to(gl.int32)) * RN, end_row)
                for c in gl.static_range(NBOX):
                    tma.async_copy_global_to_shared(op_desc, [row, c * BOXC], bar, stage.index(j * NBOX + c))
            lq0 = _piece_lse(lp_ptr, g0, p0, p1, rows, RN)
            lq1 = _piece_lse(lp_ptr, g0 + 1, p0, p1, rows, RN)
            lq2 = _piece_lse(lp_ptr, g0 + 2, p0, p1, rows, RN)
            lq3 = _piece_lse(lp_ptr, g0 + 3, p0, p1, rows, RN)
            m_new = gl.maximum(m, gl.maximum(gl.maximum(lq0, lq1), gl.maximum(lq2, lq3)))
            m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m - m_safe)
            den = den * alpha
            acc0 = acc0 * gl.expand_dims(alpha, 1)
            acc1 = acc1 * gl.expand_dims(alpha, 1)
            mbarrier.wait(bar, phase & 1)
            phase += 1
            if TRACE:
                if g0 == p0:
                    e = _stamp(trace_ptr, p, e, 11)
            den, acc0, acc1 = _piece_add(stage, 0, lq0, m_safe, den, acc0, acc1, lay, NBOX)
            if g0 + 1 <= p1:
                den, acc0, acc1 = _piece_add(stage, 1, lq1, m_safe, den, acc0, acc1, lay, NBOX)
            if g0 + 2 <= p1:
                den, acc0, acc1 = _piece_add(stage, 2, lq2, m_safe, den, acc0, acc1, lay, NBOX)
            if g0 + 3 <= p1:
                den, acc0, acc1 = _piece_add(stage, 3, lq3, m_safe, den, acc0, acc1, lay, NBOX)
            m = m_new
            gl.thread_barrier()  # every warp has read the group before the next one (or a tile) lands on it
        none = den == 0.0
        inv = gl.expand_dims(1.0 / gl.where(none, 1.0, den), 1)
        optr = (o_ptr + b.to(gl.int64) * stride_ob + gl.expand_dims((rows // H) * stride_os + (rows % H) * stride_oh, 1)
                + cols)
        gl.store(optr, (acc0 * inv).to(o_ptr.dtype.element_ty))
        if NBOX == 2:
            gl.store(optr + BOXC, (acc1 * inv).to(o_ptr.dtype.element_ty))
        gl.store(l_ptr + b.to(gl.int64) * stride_lb + (rows // H) * stride_ls + (rows % H) * stride_lh,
                 gl.where(none, float("-inf"), (m + gl.log2(gl.where(none, 1.0, den))) * 0.6931471805599453))
        fence_async_shared()  # the generic reads of stage before the async proxy's next writes
        return phase, e

    @gluon.jit
    def _query(q_desc, q3_desc, q_lat3, q_lat, q_rope, q_bar, qrow, NL: gl.constexpr, TMA3: gl.constexpr):
        """A piece's query tile (rows qrow ..) into q_lat3 (TMA3: its NL latent boxes in one 3-D copy) or q_lat (a
        copy a box), and its RoPE box into q_rope, arriving on q_bar."""
        if TMA3:
            mbarrier.expect(q_bar, q3_desc.block_type.nbytes + q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q3_desc, [0, qrow, 0], q_bar, q_lat3)
        else:
            mbarrier.expect(q_bar, (NL + 1) * q_desc.block_type.nbytes)
            for c in gl.static_range(NL):
                tma.async_copy_global_to_shared(q_desc, [qrow, c * CW], q_bar, q_lat.index(c))
        tma.async_copy_global_to_shared(q_desc, [qrow, NL * CW], q_bar, q_rope)

    @gluon.jit
    def _wide_tile(kv_desc, kv3_desc, pe_desc, kv_lat3, kv_lat, kv_rope, bar, row, st, STAGES: gl.constexpr,
                   TMA3: gl.constexpr):
        """The 64-token tile at cache row row into ring slot st, arriving on bar: TMA3, its latent boxes in one 3-D
        copy (the slot's predicated copy: a view's offset must be static), else a copy a box; then its RoPE box."""
        if TMA3:
            mbarrier.expect(bar, kv3_desc.block_type.nbytes + pe_desc.block_type.nbytes)
            for sb in gl.static_range(STAGES):
                tma.async_copy_global_to_shared(kv3_desc, [0, row, 0], bar, kv_lat3.slice(sb * NKV, NKV),
                                                pred=st == sb)
            tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, kv_rope.index(st))
        else:
            _load_tile(kv_desc, pe_desc, row, bar, kv_lat, st * NKV, kv_rope.index(st), NKV)

    @gluon.jit
    def _wide_producer(q_desc, kv_desc, pe_desc, q_lat, q_rope, kv_lat, kv_rope, q_bar, q_free, ready, empty,
                       seqlens_ptr, tbl_ptr, stride_tb, capacity, B, n_rows, row0, u0, u1, b, S, PAGED: gl.constexpr,
                       STAGES: gl.constexpr, q3_desc, kv3_desc, TMA3: gl.constexpr, PRE: gl.constexpr = False,
                       length0=0, pre_q=0, pre_t=0):
        """One warp: for each piece of the slice, the query tile (once both consumers are done with the previous
        one), then its cache tiles through the ring (buffer g % STAGES of the slice's g-th tile, once both
        consumers have released it; a fresh barrier reports phase 1 complete, so the first pass does not wait):
        latent boxes into q_lat / kv_lat[NKV st ..], RoPE boxes into q_rope / kv_rope[st]. TMA3 (``WIDE_TMA3``):
        q_lat and kv_lat are allocated in the 3-D copies' layout, a query's and each tile's latent boxes brought in
        one copy of q3_desc / kv3_desc. PRE (``WIDE_PREFORK``): the first sequence's length is length0, and its
        piece's query (pre_q 1) and first pre_t tiles were issued before the fork (``_ws_kernel``)."""
        if TMA3:  # (each partition takes its own 2-D view: views passed into partitions do not lower)
            q_lat3 = q_lat
            kv_lat3 = kv_lat
            q_lat = q_lat3._reinterpret(q_desc.dtype, [NKV, q_desc.block_type.shape[0], CW], q_desc.layout)
            kv_lat = kv_lat3._reinterpret(kv_desc.dtype, [STAGES * NKV, BN, CW], kv_desc.layout)
        else:
            q_lat3 = q_lat
            kv_lat3 = kv_lat
        pc = 0
        if PRE:
            g = pre_t
            length = length0
        else:
            g = 0
            length = gl.load(seqlens_ptr + b, mask=b < B, other=0)
        while (b < B) & (S < u1):
            nxt_length = gl.load(seqlens_ptr + b + 1, mask=b + 1 < B, other=0)  # in flight during this piece
            _, k, lo, hi, has, _ = _piece_of(length, S, u0, u1, capacity)
            if has:
                i0 = 0
                if PRE:
                    pre = (pc == 0) & (pre_q != 0)  # (the first piece's query and first tiles went before the fork)
                    i0 = gl.where(pre, pre_t, 0)
                    if not pre:
                        mbarrier.wait(q_free, (pc & 1) ^ 1)
                        _query(q_desc, q3_desc, q_lat3, q_lat, q_rope, q_bar, b * n_rows + row0, NKV, TMA3)
                else:
                    mbarrier.wait(q_free, (pc & 1) ^ 1)
                    _query(q_desc, q3_desc, q_lat3, q_lat, q_rope, q_bar, b * n_rows + row0, NKV, TMA3)
                tbl = tbl_ptr + b.to(gl.int64) * stride_tb
                for i in range(i0, hi - lo):
                    st = g % STAGES
                    mbarrier.wait(empty.index(st), ((g // STAGES) & 1) ^ 1)
                    row = _tile_row(tbl, b * capacity, (lo + i) * BN, PAGED)
                    _wide_tile(kv_desc, kv3_desc, pe_desc, kv_lat3, kv_lat, kv_rope, ready.index(st), row, st, STAGES,
                               TMA3)
                    g += 1
                pc += 1
            S = S + OVERHEAD_C + k
            b += 1
            length = nxt_length

    @gluon.jit
    def _masked(s, toks, limit, qk_scale, AX: gl.constexpr):
        """The scaled scores of the tokens each row sees (``_row_limit``), -inf elsewhere; the tokens along AX."""
        if AX == 0:
            keep = gl.expand_dims(toks, 1) < gl.expand_dims(limit, 0)
        else:
            keep = gl.expand_dims(toks, 0) < gl.expand_dims(limit, 1)
        return gl.where(keep, s * qk_scale, float("-inf"))

    @gluon.jit
    def _store_out(base, stride_qi, stride_h, c0, rows, cols, H, acc0, acc1, acc2, acc3, inv,
                   TRANSPOSED: gl.constexpr):
        """Four 64-column chunks of a warpgroup's output (columns c0 ..) to base + (r // H) stride_qi + (r % H)
        stride_h + column, from O (rows x columns) or O^T (TRANSPOSED: columns x rows)."""
        if TRANSPOSED:
            ptr = (base + gl.expand_dims((rows // H) * stride_qi + (rows % H) * stride_h, 0) + c0
                   + gl.expand_dims(cols, 1))
            _store4(ptr, acc0, acc1, acc2, acc3, inv)
        else:
            _store_rows(acc0, inv, base, stride_qi, stride_h, c0, rows, cols, H)
            _store_rows(acc1, inv, base, stride_qi, stride_h, c0 + CW, rows, cols, H)
            _store_rows(acc2, inv, base, stride_qi, stride_h, c0 + 2 * CW, rows, cols, H)
            _store_rows(acc3, inv, base, stride_qi, stride_h, c0 + 3 * CW, rows, cols, H)

    @gluon.jit
    def _tma_store4(desc, kv_lat, v0, row, c0, acc0, acc1, acc2, acc3, inv):
        """acc_j * inv (j = 0 .. 3: 64 x 64 chunks of a wide consumer's output) into boxes v0 + j of kv_lat (viewed in
        desc's element type), then TMA copies to desc at (row, c0 + 64 j), issued, not waited for (``_release``).
        Every thread's writes are fenced (generic to async proxy) and met before the copies go."""
        dt: gl.constexpr = desc.dtype
        stg = kv_lat._reinterpret(dt, kv_lat.shape, desc.layout)
        stg.index(v0).store((acc0 * inv).to(dt))
        stg.index(v0 + 1).store((acc1 * inv).to(dt))
        stg.index(v0 + 2).store((acc2 * inv).to(dt))
        stg.index(v0 + 3).store((acc3 * inv).to(dt))
        fence_async_shared()
        gl.thread_barrier()  # this warpgroup's writes are all in shared memory (a named barrier in a partition)
        tma.async_copy_shared_to_global(desc, [row, c0], stg.index(v0))
        tma.async_copy_shared_to_global(desc, [row, c0 + CW], stg.index(v0 + 1))
        tma.async_copy_shared_to_global(desc, [row, c0 + 2 * CW], stg.index(v0 + 2))
        tma.async_copy_shared_to_global(desc, [row, c0 + 3 * CW], stg.index(v0 + 3))

    @gluon.jit
    def _release(empty, slot):
        """The TMA stores out of ring buffer slot read (``_tma_store4``), then the buffer released to the producer."""
        tma.store_wait(pendings=0)
        gl.thread_barrier()  # (the copies were issued by one thread: every thread past its wait before the release)
        mbarrier.arrive(empty.index(slot))

    @gluon.jit
    def _consumer(q_lat, q_rope, kv_lat, kv_rope, p_smem, sx_smem, sx_bar, q_bar, q_free, ready, empty, seqlens_ptr,
                  o_ptr, l_ptr, op_ptr, lp_ptr, stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh,
                  capacity, B, H, S_Q, n_rows, qk_scale, row0, p, u0, u1, b, S, RN: gl.constexpr, CAUSAL: gl.constexpr,
                  PART: gl.constexpr, STAGES: gl.constexpr, TRANSPOSED: gl.constexpr, SPLIT: gl.constexpr,
                  TRACE: gl.constexpr, trace_ptr, pt, e, EARLY_Q_FREE: gl.constexpr, TMA3: gl.constexpr, o_desc,
                  p_desc, TSTORE: gl.constexpr):
        """One consumer warpgroup of the warp-specialized kernels: for each piece of the slice, the scores and softmax
        of RN rows (from row0) and P V for output columns [256 PART, +256) (four 64-column accumulators); the output
        (a whole sequence) or the piece's partial slot (``combine``). Wide kernel: RN = 64 rows as the MMA's M, P from
        registers. TRANSPOSED (``_ws_kernel``'s narrow form): the narrow kernel's S^T = K Q^T and O^T += V^T P^T
        with the rows as N, P^T through this warpgroup's own buffer p_smem.index(PART). SPLIT (the wide kernel): each
        consumer the scores of its own half of a tile's tokens (32 of 64: no score computed twice), the two meeting
        twice a tile through sx_smem / sx_bar: for the rows' maxima (then each has the tile's), and for P (each
        writes its tokens' half to p_smem.index(PART), then both multiply the whole P by their columns' values); the
        row sums are each consumer's tokens', added at the piece's end. TSTORE (``WIDE_TSTORE``, the wide kernel
        with SPLIT): a piece's last tile keeps its buffer past P V; the consumer writes its output (or partial) into
        its own four latent boxes of it, which TMA copies to o_desc (or p_desc) in whole 128-byte rows; the buffer is
        released, once they are read, at the next piece's first scores (or the slice's end). TRACE: consumer 0
        records the timeline of program pt from event e on (``_ws_kernel``)."""
        STAMP: gl.constexpr = gl.constexpr(TRACE) and gl.constexpr(PART) == 0
        gl.static_assert(SPLIT or not TSTORE)  # (see WIDE_TSTORE)
        if TMA3:  # (the 3-D copies' allocations: the MMAs' 2-D view of the same bytes, in the layout the host gives
            # q_desc and kv_desc, ``_layout``)
            q_lat = q_lat._reinterpret(q_lat.dtype, [NKV, RN, CW],
                                       gl.NVMMASharedLayout.get_default_for([RN, CW], q_lat.dtype))
            kv_lat = kv_lat._reinterpret(kv_lat.dtype, [STAGES * NKV, BN, CW],
                                         gl.NVMMASharedLayout.get_default_for([BN, CW], kv_lat.dtype))
        if TRANSPOSED:
            AX: gl.constexpr = 0  # the tokens' axis of the scores
            mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, RN, 16])
            rows = row0 + gl.arange(0, RN, layout=gl.SliceLayout(0, mma))
            toks = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
            cols = gl.arange(0, CW, layout=gl.SliceLayout(1, mma))  # the output chunk's columns
            s_zero = gl.zeros([BN, RN], gl.float32, mma)
            pbuf = p_smem.index(PART)
        else:
            AX: gl.constexpr = 1
            mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                          instr_shape=[16, BN, 16])
            p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
            rows = row0 + gl.arange(0, RN, layout=gl.SliceLayout(1, mma))
            toks = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
            cols = toks  # (CW = BN)
            s_zero = gl.zeros([RN, BN], gl.float32, mma)
            if SPLIT:  # this consumer's half of the scores: (rows, 32 tokens)
                sm: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BN // 2, 16])
                rows_h = row0 + gl.arange(0, RN, layout=gl.SliceLayout(1, sm))
                toks_h = PART * (BN // 2) + gl.arange(0, BN // 2, layout=gl.SliceLayout(0, sm))
                s_zero_h = gl.zeros([RN, BN // 2], gl.float32, sm)
        c0 = PART * 4 * CW
        g = 0
        pc = 0
        held = 0  # (TSTORE) 1 while a piece's last buffer is held for its stores, released at the next tile's scores
        if TSTORE:
            gl.static_assert(STAGES >= 2)  # (the next piece's first tile comes into another buffer)
        if STAMP:
            e = _stamp(trace_ptr, pt, e, 12)
        length = gl.load(seqlens_ptr + b, mask=b < B, other=0)
        while (b < B) & (S < u1):
            nxt_length = gl.load(seqlens_ptr + b + 1, mask=b + 1 < B, other=0)  # in flight during this piece
            seqlen, k, lo, hi, has, whole = _piece_of(length, S, u0, u1, capacity)
            if has:
                if STAMP:
                    e = _stamp(trace_ptr, pt, e, 9)
                    e = _stamp(trace_ptr, pt, e, 2)
                if SPLIT:
                    limit = _row_limit(seqlen, rows_h, H, S_Q, CAUSAL)
                    m_i = gl.full([RN], float("-inf"), gl.float32, gl.SliceLayout(1, sm))
                    l_i = gl.zeros([RN], gl.float32, gl.SliceLayout(1, sm))
                else:
                    limit = _row_limit(seqlen, rows, H, S_Q, CAUSAL)
                    m_i = gl.full([RN], float("-inf"), gl.float32, gl.SliceLayout(AX, mma))
                    l_i = gl.zeros([RN], gl.float32, gl.SliceLayout(AX, mma))
                if TRANSPOSED:
                    acc0 = gl.zeros([CW, RN], gl.float32, mma)
                    acc1 = gl.zeros([CW, RN], gl.float32, mma)
                    acc2 = gl.zeros([CW, RN], gl.float32, mma)
                    acc3 = gl.zeros([CW, RN], gl.float32, mma)
                else:
                    acc0 = gl.zeros([RN, CW], gl.float32, mma)
                    acc1 = gl.zeros([RN, CW], gl.float32, mma)
                    acc2 = gl.zeros([RN, CW], gl.float32, mma)
                    acc3 = gl.zeros([RN, CW], gl.float32, mma)
                mbarrier.wait(q_bar, pc & 1)
                if STAMP:
                    e = _stamp(trace_ptr, pt, e, 3)
                for i in range(hi - lo):
                    st = g % STAGES
                    mbarrier.wait(ready.index(st), (g // STAGES) & 1)
                    if STAMP:
                        e = _stamp(trace_ptr, pt, e, 4)
                    if TRANSPOSED:  # this consumer's share of the scores, the other's through sx_smem (by tile parity)
                        s = _scores_t(kv_lat, q_lat, st * NKV, kv_rope.index(st), q_rope, s_zero, PART * 4,
                                      PART * 4 + 4, PART == 0)  # (consumer 0 the RoPE box too)
                        sx_smem.index((g % 2) * 2 + PART).store(s)
                        gl.thread_barrier()  # this warpgroup's share is all in shared memory
                        mbarrier.arrive(sx_bar.index(g % 2))
                        mbarrier.wait(sx_bar.index(g % 2), (g // 2) & 1)
                        s = s + sx_smem.index((g % 2) * 2 + 1 - PART).load(mma)
                    elif SPLIT:  # this consumer's tokens' scores; the tile's row maxima through sx_smem[0 .. 1]
                        s = _scores_half(q_lat, q_rope, kv_lat, kv_rope.index(st), st * NKV, PART * (BN // 2),
                                         s_zero_h)
                    else:
                        s = _scores(q_lat, q_rope, kv_lat, kv_rope.index(st), st * NKV, s_zero)
                    if TSTORE:  # noqa: SIM102 (a constexpr branch: the other builds never see the runtime test)
                        if held != 0:  # the last piece's stores have had its end, this query and these scores
                            _release(empty, (g - 1) % STAGES)
                            held = 0
                    if EARLY_Q_FREE:  # noqa: SIM102 (a constexpr branch: the other builds never see the test)
                        if i == hi - lo - 1:  # the piece's last reader of the query is done: the producer brings
                            mbarrier.arrive(q_free)  # the next piece's during this tile's softmax, P V and stores
                    tok0 = (lo + i) * BN
                    if SPLIT:
                        s = _masked(s, tok0 + toks_h, limit, qk_scale, 1)
                        mx = gl.max(s, axis=1)
                        mx = gl.maximum(mx, _exchange(mx, sx_smem, PART, 1 - PART, sx_bar.index(0), g & 1))
                        m_new = gl.maximum(m_i, mx)
                        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
                        alpha = gl.exp2(m_i - m_safe)
                        p_ = gl.exp2(s - gl.expand_dims(m_safe, 1))
                        l_i = l_i * alpha + gl.sum(p_, axis=1)  # (this consumer's tokens')
                        m_i = m_new
                        a2 = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, mma)), 1)
                    else:
                        s = _masked(s, tok0 + toks, limit, qk_scale, AX)
                        p_, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, AX)
                        a2 = gl.expand_dims(alpha, AX)
                    v0 = st * NKV + PART * 4
                    tail = tok0 + BN > seqlen  # the last tile: its tokens past the length, zeroed in this half's
                    if TRANSPOSED:  # values (only this warpgroup reads these boxes)
                        if tail:
                            _zero_tail(kv_lat, v0, 4, tok0, seqlen)
                        pbuf.store(p_.to(kv_lat.dtype))
                        fence_async_shared()
                        gl.thread_barrier()  # this warpgroup's 128 threads (a named barrier in a partition)
                        acc0 = warpgroup_mma(kv_lat.index(v0).permute((1, 0)), pbuf, acc0 * a2, is_async=True)
                        acc1 = warpgroup_mma(kv_lat.index(v0 + 1).permute((1, 0)), pbuf, acc1 * a2, is_async=True)
                        acc2 = warpgroup_mma(kv_lat.index(v0 + 2).permute((1, 0)), pbuf, acc2 * a2, is_async=True)
                        acc3 = warpgroup_mma(kv_lat.index(v0 + 3).permute((1, 0)), pbuf, acc3 * a2, is_async=True)
                    elif SPLIT:  # P's two halves through p_smem, then P V over all 64 tokens for this half's columns
                        if tail:
                            _zero_tail(kv_lat, v0, 4, tok0, seqlen)
                        p_smem.index(PART).store(p_.to(q_lat.dtype))
                        fence_async_shared()
                        gl.thread_barrier()
                        mbarrier.arrive(sx_bar.index(1))
                        mbarrier.wait(sx_bar.index(1), g & 1)
                        acc0 = _pv_halves(p_smem, kv_lat, v0, acc0 * a2)
                        acc1 = _pv_halves(p_smem, kv_lat, v0 + 1, acc1 * a2)
                        acc2 = _pv_halves(p_smem, kv_lat, v0 + 2, acc2 * a2)
                        acc3 = _pv_halves(p_smem, kv_lat, v0 + 3, acc3 * a2)
                    else:
                        pa = gl.convert_layout(p_.to(q_lat.dtype), p_layout)
                        if tail:
                            _zero_tail(kv_lat, v0, 4, tok0, seqlen)
                            fence_async_shared()
                            gl.thread_barrier()
                        acc0 = warpgroup_mma(pa, kv_lat.index(v0), acc0 * a2, is_async=True)
                        acc1 = warpgroup_mma(pa, kv_lat.index(v0 + 1), acc1 * a2, is_async=True)
                        acc2 = warpgroup_mma(pa, kv_lat.index(v0 + 2), acc2 * a2, is_async=True)
                        acc3 = warpgroup_mma(pa, kv_lat.index(v0 + 3), acc3 * a2, is_async=True)
                    acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2, acc3))
                    if TRANSPOSED:
                        gl.thread_barrier()  # every warp is past this tile's MMAs before P^T is rewritten
                    if TSTORE:  # (a piece's last tile: its buffer held for the stores below, ``_release``)
                        if i < hi - lo - 1:
                            mbarrier.arrive(empty.index(st))
                    else:
                        mbarrier.arrive(empty.index(st))
                    if STAMP:
                        e = _stamp(trace_ptr, pt, e, 5)
                    g += 1
                if EARLY_Q_FREE:
                    if hi == lo:  # (a piece of no tiles: nothing read the query)
                        mbarrier.arrive(q_free)
                else:
                    mbarrier.arrive(q_free)  # every MMA reading this query tile is done
                if SPLIT:  # the row sums: both consumers' tokens (sx_smem[2 ..], by the piece's parity)
                    mine = 2 + (pc % 2) * 2 + PART
                    l_i = l_i + _exchange(l_i, sx_smem, mine, mine + 1 - 2 * PART, sx_bar.index(2), pc & 1)
                    m_i = gl.convert_layout(m_i, gl.SliceLayout(1, mma))
                    l_i = gl.convert_layout(l_i, gl.SliceLayout(1, mma))
                empty_row = l_i == 0.0
                l_safe = gl.where(empty_row, 1.0, l_i)
                inv = gl.expand_dims(1.0 / l_safe, AX)  # 0 for a row that saw nothing (acc = 0)
                staged = False
                if TSTORE:  # noqa: SIM102 (a constexpr branch: the other builds never see the runtime test)
                    if hi > lo:  # through the last tile's buffer: this consumer's own boxes, free after its P V
                        v0 = ((g - 1) % STAGES) * NKV + PART * 4
                        if whole:
                            _tma_store4(o_desc, kv_lat, v0, b * n_rows + row0, c0, acc0, acc1, acc2, acc3, inv)
                        else:
                            _tma_store4(p_desc, kv_lat, v0, (2 * p + (lo == 0).to(gl.int32)) * n_rows + row0, c0,
                                        acc0, acc1, acc2, acc3, inv)
                        held = 1
                        staged = True
                if whole:  # the result: out and the natural-log lse
                    if not staged:
                        _store_out(o_ptr + b.to(gl.int64) * stride_ob, stride_os, stride_oh, c0, rows, cols, H, acc0,
                                   acc1, acc2, acc3, inv, TRANSPOSED)
                    if PART == 0:
                        lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453)
                        gl.store(l_ptr + b.to(gl.int64) * stride_lb + (rows // H) * stride_ls + (rows % H) * stride_lh,
                                 lse)
                else:  # a piece: partial in slot 2 p + (it starts the sequence), log2 lse
                    slot = (2 * p + (lo == 0).to(gl.int32)).to(gl.int64) * n_rows
                    if not staged:
                        _store_out(op_ptr + slot * (NKV * CW), H * NKV * CW, NKV * CW, c0, rows, cols, H, acc0, acc1,
                                   acc2, acc3, inv, TRANSPOSED)
                    if PART == 0:
                        gl.store(lp_ptr + slot + rows, gl.where(empty_row, float("-inf"), m_i + gl.log2(l_safe)))
                if STAMP:
                    e = _stamp(trace_ptr, pt, e, 6)
                pc += 1
            S = S + OVERHEAD_C + k
            b += 1
            length = nxt_length
        if TSTORE:  # noqa: SIM102
            if held != 0:  # (the slice's last stores: read before the program ends)
                _release(empty, (g - 1) % STAGES)
        if STAMP:
            e = _stamp(trace_ptr, pt, e, 8)

    @gluon.jit
    def _ws_kernel(q_desc, kv_desc, pe_desc, seqlens_ptr, tbl_ptr, o_ptr, l_ptr, op_ptr, lp_ptr, cnt_ptr, stride_tb,
                   stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, capacity, B, H, S_Q, qk_scale,
                   min_units, max_pieces, q3_desc, kv3_desc, CAUSAL: gl.constexpr, PAGED: gl.constexpr,
                   STAGES: gl.constexpr, BLOCK_B: gl.constexpr, RN: gl.constexpr, TRANSPOSED: gl.constexpr,
                   SPLIT: gl.constexpr = False, TRACE: gl.constexpr = False, trace_ptr=None,
                   EARLY_Q_FREE: gl.constexpr = False, TMA3: gl.constexpr = False, o_desc=None, p_desc=None,
                   TSTORE: gl.constexpr = False, PRE: gl.constexpr = False):
        """The warp-specialized kernels, program (row block, p): rows [RN row block, +RN) of every piece in slice p.
        A producer warp (``_wide_producer``) and two consumer warpgroups (``_consumer``), each with half of the
        output columns. The wide kernel: RN = 64 rows as the MMA's M. TRANSPOSED: the narrow kernel's
        math with RN = 16 or 32 rows as N (one row block), each consumer with the scores of its own boxes (the two
        shares added through sx_smem) and half the accumulator registers a thread of the one-warpgroup narrow kernel
        holds (its 32-row build spills 192 B a thread); off unless ``NARROW2_ROWS`` lists the row count. See the
        module docstring. TRACE: the timeline of program rb P + p (its consumer 0's events from the schedule on) at
        trace_ptr, as the narrow kernel records it (``TRACE_CODES``; code 2: consumer 0 starts the piece, the
        producer warp's loads not stamped)."""
        _launch_dependents()
        rb = gl.program_id(0)
        p = gl.program_id(1)
        P = gl.num_programs(1)
        pt = rb * P + p
        e = 0
        if TRACE:
            e = _stamp(trace_ptr, pt, e, 0)
        u0, u1, b, S, _, _ = _slice(seqlens_ptr, B, capacity, P, p, min_units, max_pieces, BLOCK_B)
        if TRACE:
            e = _stamp(trace_ptr, pt, e, 1)
        row0 = rb * RN
        n_rows = S_Q * H
        if TMA3:  # the 3-D copies' layout for the latent boxes (each partition takes its 2-D view)
            q_lat = gl.allocate_shared_memory(q_desc.dtype, [NKV, RN, CW], q3_desc.layout)
            kv_lat = gl.allocate_shared_memory(kv_desc.dtype, [STAGES * NKV, BN, CW], kv3_desc.layout)
        else:
            q_lat = gl.allocate_shared_memory(q_desc.dtype, [NKV, RN, CW], q_desc.layout)
            kv_lat = gl.allocate_shared_memory(kv_desc.dtype, [STAGES * NKV, BN, CW], kv_desc.layout)
        q_rope = gl.allocate_shared_memory(q_desc.dtype, [RN, CW], q_desc.layout)
        kv_rope = gl.allocate_shared_memory(kv_desc.dtype, [STAGES, BN, CW], kv_desc.layout)
        if TRANSPOSED:  # each consumer's P^T; the score shares exchanged (two tiles' worth)
            p_smem = gl.allocate_shared_memory(kv_desc.dtype, [2, BN, RN],
                                               gl.NVMMASharedLayout.get_default_for([BN, RN], gl.bfloat16))
            sx_smem = gl.allocate_shared_memory(gl.float32, [4, BN, RN],
                                                gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        elif SPLIT:  # P's two token halves; the row maxima (2) and, by piece parity, the row sums (4) exchanged
            p_smem = gl.allocate_shared_memory(kv_desc.dtype, [2, RN, BN // 2],
                                               gl.NVMMASharedLayout.get_default_for([RN, BN // 2], gl.bfloat16))
            sx_smem = gl.allocate_shared_memory(gl.float32, [8, RN],
                                                gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
        else:
            p_smem = q_rope  # (unused)
            sx_smem = q_rope
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        sx_bar = gl.allocate_shared_memory(gl.int64, [3, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(q_free, count=2)
        for sb in gl.static_range(3):
            mbarrier.init(sx_bar.index(sb), count=2)
        for sb in gl.static_range(STAGES):
            mbarrier.init(ready.index(sb), count=1)
            mbarrier.init(empty.index(sb), count=2)
        fence_async_shared()
        length0 = 0
        pre_q = 0
        pre_t = 0
        if PRE:  # the first piece's query and first tile issued here, ahead of the fork (``WIDE_PREFORK``)
            length0 = gl.load(seqlens_ptr + b, mask=b < B, other=0)
            _, _, lo0, hi0, has0, _ = _piece_of(length0, S, u0, u1, capacity)
            if (b < B) & (S < u1) & has0:
                _query(q_desc, q3_desc, q_lat, q_lat, q_rope, q_bar, b * n_rows + row0, NKV, TMA3)
                pre_q = 1
                if hi0 > lo0:
                    row = _tile_row(tbl_ptr + b.to(gl.int64) * stride_tb, b * capacity, lo0 * BN, PAGED)
                    _wide_tile(kv_desc, kv3_desc, pe_desc, kv_lat, kv_lat, kv_rope, ready.index(0), row, b * 0,
                               STAGES, TMA3)
                    pre_t = 1
        gl.warp_specialize([
            (_consumer, (q_lat, q_rope, kv_lat, kv_rope, p_smem, sx_smem, sx_bar, q_bar, q_free, ready, empty,
                         seqlens_ptr, o_ptr, l_ptr, op_ptr, lp_ptr, stride_ob, stride_os, stride_oh, stride_lb,
                         stride_ls, stride_lh, capacity, B, H, S_Q, n_rows, qk_scale, row0, p, u0, u1, b, S, RN,
                         CAUSAL, 0, STAGES, TRANSPOSED, SPLIT, TRACE, trace_ptr, pt, e, EARLY_Q_FREE, TMA3,
                         o_desc, p_desc, TSTORE)),
            (_consumer, (q_lat, q_rope, kv_lat, kv_rope, p_smem, sx_smem, sx_bar, q_bar, q_free, ready, empty,
                         seqlens_ptr, o_ptr, l_ptr, op_ptr, lp_ptr, stride_ob, stride_os, stride_oh, stride_lb,
                         stride_ls, stride_lh, capacity, B, H, S_Q, n_rows, qk_scale, row0, p, u0, u1, b, S, RN,
                         CAUSAL, 1, STAGES, TRANSPOSED, SPLIT, TRACE, trace_ptr, pt, e, EARLY_Q_FREE, TMA3,
                         o_desc, p_desc, TSTORE)),
            (_wide_producer, (q_desc, kv_desc, pe_desc, q_lat, q_rope, kv_lat, kv_rope, q_bar, q_free, ready, empty,
                              seqlens_ptr, tbl_ptr, stride_tb, capacity, B, n_rows, row0, u0, u1, b, S, PAGED, STAGES,
                              q3_desc, kv3_desc, TMA3, PRE, length0, pre_q, pre_t)),
        ], [4, 1], [232, 24])

    @gluon.jit
    def _stage_t4(stg, j0: gl.constexpr, acc0, acc1, acc2, acc3, inv):
        """acc_j * inv (j = 0 .. 3: 64-column chunks of the narrow kernel's O^T, columns x rows) into boxes j0 + j of
        stg as (rows, columns), in stg's element type."""
        dt: gl.constexpr = stg.dtype
        stg.index(j0).permute((1, 0)).store((acc0 * inv).to(dt))
        stg.index(j0 + 1).permute((1, 0)).store((acc1 * inv).to(dt))
        stg.index(j0 + 2).permute((1, 0)).store((acc2 * inv).to(dt))
        stg.index(j0 + 3).permute((1, 0)).store((acc3 * inv).to(dt))

    @gluon.jit
    def _tma_out(desc, stg, row, NL: gl.constexpr):
        """Boxes 0 .. NL - 1 of stg (every thread's writes fenced and met first) by TMA to desc at (row, 64 j), waited
        for until read (the ring may take loads after). Not for partials merged in the kernel: those would have to be
        waited for until written before their arrival is counted."""
        fence_async_shared()
        gl.thread_barrier()  # every thread's part of the boxes is in shared memory
        for j in gl.static_range(NL):
            tma.async_copy_shared_to_global(desc, [row, j * CW], stg.index(j))
        tma.store_wait(pendings=0)
        gl.thread_barrier()  # (the copies were issued by one thread: every thread past its wait)

    @gluon.jit
    def _narrow_kernel(q_desc, kv_desc, pe_desc, seqlens_ptr, tbl_ptr, o_ptr, l_ptr, op_ptr, lp_ptr, cnt_ptr, stride_tb,
                       stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, capacity, B, H, S_Q, qk_scale,
                       min_units, max_pieces, op_desc, q3_desc, kv3_desc, RN: gl.constexpr, CAUSAL: gl.constexpr,
                       PAGED: gl.constexpr, STAGES: gl.constexpr, BLOCK_B: gl.constexpr, MERGE: gl.constexpr,
                       NL: gl.constexpr, TN: gl.constexpr, TMA3: gl.constexpr, ONE_WAIT: gl.constexpr = False,
                       TRACE: gl.constexpr = False, trace_ptr=None, o_desc=None, p_desc=None,
                       TSTORE: gl.constexpr = False, PRE: gl.constexpr = False):
        """Program p: all RN = s_q * H rows (16 or 32) of every piece in slice p; see the module docstring. NL: the
        latent's 64-column boxes (8 for C = 512, 4 for 256); TN: tokens a tile (64, or 128: two 64-token boxes in
        each buffer, the MMAs' M and K). No warp specialization: the program issues its own loads, a piece's first
        STAGES - 1 tiles with its query, then its tile i + STAGES - 1 once tile i - 1's MMAs are done (issuing STAGES
        with the query measured no faster: bench/results/mla_decode-ab-merge3.md, head against ab_pro1). op_desc: the
        float32 partials (2 P RN, C) for the merge (MERGE). TMA3 (64-token tiles, ``TMA3_LATENTS``): the query's and
        each tile's latent boxes in one copy of q3_desc / kv3_desc ((box, row, column) views, ``_desc3``), else one
        copy a box. ONE_WAIT (``ONE_WAIT_ROWS``): tile i + 1's score MMAs go out behind tile i's P V ones, the P V
        waited for first, then the freed buffer's next tile (i + STAGES) issued, then the scores waited for; a piece's
        first STAGES tiles go with its query. TSTORE (``NARROW_TSTORE``, not with MERGE): a piece's output (or
        partial) goes through the ring's shared memory, free at its end, by TMA to o_desc (or p_desc). TRACE: record
        the program's timeline (``TRACE_CODES``) at trace_ptr."""
        gl.static_assert(not (TSTORE and MERGE))  # (``_tma_out``)
        p = gl.program_id(0)
        P = gl.num_programs(0)
        e = 0  # (the traced events so far)
        if TRACE:
            e = _stamp(trace_ptr, p, e, 0)
        if not MERGE:
            _launch_dependents()
        u0, u1, b, S, W, uniform = _slice(seqlens_ptr, B, capacity, P, p, min_units, max_pieces, BLOCK_B, TN)
        if TRACE:
            e = _stamp(trace_ptr, p, e, 1)
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RN, 16])
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TN, RN], gl.bfloat16)
        # the latent boxes (the 3-D copies' rank-3 view, and the MMAs' 2-D one of the same bytes) apart from the RoPE's
        q_lat3 = gl.allocate_shared_memory(q_desc.dtype, [NL, RN, CW], q3_desc.layout)
        q_lat = q_lat3._reinterpret(q_desc.dtype, [NL, RN, CW], q_desc.layout)
        q_rope = gl.allocate_shared_memory(q_desc.dtype, [RN, CW], q_desc.layout)
        kv_lat3 = gl.allocate_shared_memory(kv_desc.dtype, [STAGES * NL, TN, CW], kv3_desc.layout)
        kv_lat = kv_lat3._reinterpret(kv_desc.dtype, [STAGES * NL, TN, CW], kv_desc.layout)
        kv_rope = gl.allocate_shared_memory(kv_desc.dtype, [STAGES, TN, CW], kv_desc.layout)
        p_smem = gl.allocate_shared_memory(kv_desc.dtype, [TN, RN], p_layout)
        mx_smem = gl.allocate_shared_memory(gl.float32, [4, RN],  # each warp's row maxima (``_softmax_t``)
                                            gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        m_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        mbarrier.init(m_bar, count=1)
        for sb in gl.static_range(STAGES):
            mbarrier.init(ready.index(sb), count=1)
        fence_async_shared()
        BOXC: gl.constexpr = op_desc.block_type.shape[1]
        if MERGE:  # the merge's MERGE_GROUP partials in the cache tiles' shared memory
            PT: gl.constexpr = op_desc.block_type.element_ty  # the partials' dtype (``PART_BF16``)
            gl.static_assert(MERGE_GROUP * RN * NL * CW * PT.primitive_bitwidth // 8 <= STAGES * NL * TN * CW * 2)
            stage = kv_lat3._reinterpret(PT, [MERGE_GROUP * (NL * CW // BOXC), RN, BOXC], op_desc.layout)
        else:
            stage = kv_lat
        mph = 0  # m_bar's phase

        toks0 = gl.arange(0, TN, layout=gl.SliceLayout(1, mma))
        rows = gl.arange(0, RN, layout=gl.SliceLayout(0, mma))
        cw = gl.arange(0, CW, layout=gl.SliceLayout(1, mma))
        s_zero = gl.zeros([TN, RN], gl.float32, mma)
        g = 0  # the slice's tiles so far (ring position)
        pc = 0
        length = gl.load(seqlens_ptr + b, mask=b < B, other=0)
        spec = 0
        if PRE:  # the first piece's query and first tile, issued before its length is back (``NARROW_PRE``)
            first0 = S + OVERHEAD_C
            if (b < B) & (u0 < u1) & (u1 > first0) & ((u0 == S) | (u0 >= first0)):  # then b's piece is the
                # slice's first and (but for an empty b, starting the slice) holds the tile lo0
                lo0 = gl.maximum(u0, first0) - first0
                _query(q_desc, q3_desc, q_lat3, q_lat, q_rope, q_bar, b * RN, NL, TMA3)
                _load_tiles(kv_desc, kv3_desc, pe_desc, tbl_ptr + b.to(gl.int64) * stride_tb, b * capacity, lo0 * TN,
                            capacity, ready.index(0), kv_lat3, kv_lat, kv_rope, b * 0, STAGES, NL, TN, PAGED, TMA3)
                spec = 1
        while (b < B) & (S < u1):
            nxt_length = gl.load(seqlens_ptr + b + 1, mask=b + 1 < B, other=0)  # in flight during this piece
            seqlen, k, lo, hi, has, whole = _piece_of(length, S, u0, u1, capacity, TN)
            if has:
                n_tiles = hi - lo
                tbl = tbl_ptr + b.to(gl.int64) * stride_tb
                kv_row = b * capacity
                if TRACE:
                    e = _stamp(trace_ptr, p, e, 9)
                j0 = 0  # (the first tiles already in flight)
                if PRE:
                    pre = (pc == 0) & (spec != 0)  # the slice's first piece: its query and first tile went out above
                    j0 = pre.to(gl.int32)
                    if not pre:  # (the previous piece's MMAs are done)
                        _query(q_desc, q3_desc, q_lat3, q_lat, q_rope, q_bar, b * RN, NL, TMA3)
                    elif n_tiles == 0:  # (an empty sequence: the tile went out for nothing, its ring slot skipped)
                        mbarrier.wait(ready.index(0), 0)
                        g += 1
                else:
                    _query(q_desc, q3_desc, q_lat3, q_lat, q_rope, q_bar, b * RN, NL, TMA3)
                for j in gl.static_range(STAGES - 1 + ONE_WAIT):  # the first tiles in flight
                    if (j < n_tiles) & (j >= j0):
                        sj = (g + j) % STAGES
                        _load_tiles(kv_desc, kv3_desc, pe_desc, tbl, kv_row, (lo + j) * TN, seqlen, ready.index(sj),
                                    kv_lat3, kv_lat, kv_rope, sj, STAGES, NL, TN, PAGED, TMA3)
                if TRACE:
                    e = _stamp(trace_ptr, p, e, 2)
                limit = _row_limit(seqlen, rows, H, S_Q, CAUSAL)
                m_i = gl.full([RN], float("-inf"), gl.float32, gl.SliceLayout(0, mma))
                l_w = _per_warp(s_zero, 4, True)  # the row sums, per warp (``_softmax_t``)
                acc0 = gl.zeros([CW, RN], gl.float32, mma)
                acc1 = gl.zeros([CW, RN], gl.float32, mma)
                acc2 = gl.zeros([CW, RN], gl.float32, mma)
                acc3 = gl.zeros([CW, RN], gl.float32, mma)
                if NL == 8:
                    acc4 = gl.zeros([CW, RN], gl.float32, mma)
                    acc5 = gl.zeros([CW, RN], gl.float32, mma)
                    acc6 = gl.zeros([CW, RN], gl.float32, mma)
                    acc7 = gl.zeros([CW, RN], gl.float32, mma)
                mbarrier.wait(q_bar, pc & 1)
                if TRACE:
                    e = _stamp(trace_ptr, p, e, 3)
                s = s_zero  # (ONE_WAIT) tile i's scores, issued before tile i - 1's P V was waited for
                if ONE_WAIT:  # noqa: SIM102 (a constexpr branch: the other builds never see the runtime test)
                    if n_tiles > 0:
                        mbarrier.wait(ready.index(g % STAGES), (g // STAGES) & 1)
                        if TRACE:
                            e = _stamp(trace_ptr, p, e, 4)
                        s = _scores_t(kv_lat, q_lat, (g % STAGES) * NL, kv_rope.index(g % STAGES), q_rope, s_zero, 0,
                                      NL, True)
                for i in range(n_tiles):
                    st = g % STAGES
                    if not ONE_WAIT:
                        nxt = i + STAGES - 1  # into the buffer tile i - 1 used: its MMAs are done (the barrier below)
                        if nxt < n_tiles:
                            sn = (g + STAGES - 1) % STAGES
                            _load_tiles(kv_desc, kv3_desc, pe_desc, tbl, kv_row, (lo + nxt) * TN, seqlen,
                                        ready.index(sn), kv_lat3, kv_lat, kv_rope, sn, STAGES, NL, TN, PAGED, TMA3)
                        mbarrier.wait(ready.index(st), (g // STAGES) & 1)
                        if TRACE:
                            e = _stamp(trace_ptr, p, e, 4)
                        s = _scores_t(kv_lat, q_lat, st * NL, kv_rope.index(st), q_rope, s_zero, 0, NL, True)
                    tok0 = (lo + i) * TN
                    s = gl.where(gl.expand_dims(tok0 + toks0, 1) < gl.expand_dims(limit, 0), s * qk_scale,
                                 float("-inf"))
                    p_, alpha, m_i, l_w = _softmax_t(s, m_i, l_w, mx_smem, 4)
                    if tok0 + TN > seqlen:  # the last tile: its tokens past the length, zeroed in the values
                        _zero_tail(kv_lat, st * NL, NL, tok0, seqlen, TN)
                    p_smem.store(p_.to(kv_lat.dtype))
                    fence_async_shared()
                    gl.thread_barrier()  # P^T and the zeroed rows are in shared memory before the MMAs read them
                    a2 = gl.expand_dims(alpha, 0)
                    v = st * NL
                    acc0 = warpgroup_mma(kv_lat.index(v).permute((1, 0)), p_smem, acc0 * a2, is_async=True)
                    acc1 = warpgroup_mma(kv_lat.index(v + 1).permute((1, 0)), p_smem, acc1 * a2, is_async=True)
                    acc2 = warpgroup_mma(kv_lat.index(v + 2).permute((1, 0)), p_smem, acc2 * a2, is_async=True)
                    acc3 = warpgroup_mma(kv_lat.index(v + 3).permute((1, 0)), p_smem, acc3 * a2, is_async=True)
                    if NL == 8:
                        acc4 = warpgroup_mma(kv_lat.index(v + 4).permute((1, 0)), p_smem, acc4 * a2, is_async=True)
                        acc5 = warpgroup_mma(kv_lat.index(v + 5).permute((1, 0)), p_smem, acc5 * a2, is_async=True)
                        acc6 = warpgroup_mma(kv_lat.index(v + 6).permute((1, 0)), p_smem, acc6 * a2, is_async=True)
                        acc7 = warpgroup_mma(kv_lat.index(v + 7).permute((1, 0)), p_smem, acc7 * a2, is_async=True)
                    if ONE_WAIT:  # the next tile's scores issued behind these MMAs (after a piece's last tile, its
                        # own again, discarded: a wait inside a branch cannot yield the accumulators)
                        more = i + 1 < n_tiles
                        s1 = st + more.to(gl.int32) * ((g + 1) % STAGES - st)
                        if more:
                            mbarrier.wait(ready.index(s1), ((g + 1) // STAGES) & 1)
                            if TRACE:
                                e = _stamp(trace_ptr, p, e, 4)
                        s = _scores_t_issue(kv_lat, q_lat, s1 * NL, kv_rope.index(s1), q_rope, s_zero, 0, NL, True)
                    # this tile's P V (ONE_WAIT: the older group, the scores may still run)
                    if NL == 8:
                        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = warpgroup_mma_wait(
                            num_outstanding=ONE_WAIT, deps=(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7))
                    else:
                        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=ONE_WAIT,
                                                                    deps=(acc0, acc1, acc2, acc3))
                    gl.thread_barrier()  # every warp is past this tile's P V before its buffer and P^T are rewritten
                    if ONE_WAIT:  # the freed buffer's next tile, then the scores' wait
                        if i + STAGES < n_tiles:
                            _load_tiles(kv_desc, kv3_desc, pe_desc, tbl, kv_row, (lo + i + STAGES) * TN, seqlen,
                                        ready.index(st), kv_lat3, kv_lat, kv_rope, st, STAGES, NL, TN, PAGED, TMA3)
                        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
                    if TRACE:
                        e = _stamp(trace_ptr, p, e, 5)
                    g += 1
                l_i = _warp_sums(l_w, gl.SliceLayout(0, mma))
                empty_row = l_i == 0.0
                l_safe = gl.where(empty_row, 1.0, l_i)
                inv = gl.expand_dims(1.0 / l_safe, 0)
                if whole:  # the result: out^T and the natural-log lse
                    if TSTORE:  # through the ring (free: no load in flight, every MMA waited for) by TMA
                        stg = kv_lat3._reinterpret(o_desc.dtype, [NL, RN, CW], o_desc.layout)
                        _stage_t4(stg, 0, acc0, acc1, acc2, acc3, inv)
                        if NL == 8:
                            _stage_t4(stg, 4, acc4, acc5, acc6, acc7, inv)
                        _tma_out(o_desc, stg, b * RN, NL)
                    else:
                        optr_o = (o_ptr + b.to(gl.int64) * stride_ob
                                  + gl.expand_dims((rows // H) * stride_os + (rows % H) * stride_oh, 0)
                                  + gl.expand_dims(cw, 1))
                        _store4(optr_o, acc0, acc1, acc2, acc3, inv)
                        if NL == 8:
                            _store4(optr_o + 4 * CW, acc4, acc5, acc6, acc7, inv)
                    gl.store(l_ptr + b.to(gl.int64) * stride_lb + (rows // H) * stride_ls + (rows % H) * stride_lh,
                             gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * 0.6931471805599453))
                    if TRACE:
                        e = _stamp(trace_ptr, p, e, 6)
                else:  # a piece: partial in slot 2 p + (it starts the sequence), log2 lse
                    slot = (2 * p + (lo == 0).to(gl.int32)).to(gl.int64) * RN
                    if TSTORE:
                        stg = kv_lat3._reinterpret(p_desc.dtype, [NL, RN, CW], p_desc.layout)
                        _stage_t4(stg, 0, acc0, acc1, acc2, acc3, inv)
                        if NL == 8:
                            _stage_t4(stg, 4, acc4, acc5, acc6, acc7, inv)
                        _tma_out(p_desc, stg, (2 * p + (lo == 0).to(gl.int32)) * RN, NL)
                    else:
                        optr_p = (op_ptr + slot * (NL * CW) + gl.expand_dims(rows * (NL * CW), 0)
                                  + gl.expand_dims(cw, 1))
                        _store4(optr_p, acc0, acc1, acc2, acc3, inv)
                        if NL == 8:
                            _store4(optr_p + 4 * CW, acc4, acc5, acc6, acc7, inv)
                    gl.store(lp_ptr + slot + rows, gl.where(empty_row, float("-inf"), m_i + gl.log2(l_safe)))
                    if TRACE:
                        e = _stamp(trace_ptr, p, e, 6)
                    if MERGE:  # count in (after every thread's stores: a CTA barrier, then one thread's acq_rel
                        # atomic at GPU scope, its result shared by a reduction; a plain scalar atomic here runs on
                        # every thread); the last of the sequence's pieces merges them and resets its counter
                        gl.thread_barrier()
                        p0, p1 = _cut(b, S, k, W, uniform, P, B)
                        lane = gl.arange(0, 32 * gl.num_warps(), layout=gl.BlockedLayout([1], [32], [gl.num_warps()],
                                                                                          [0]))
                        got = gl.atomic_add(cnt_ptr + b + lane * 0, lane * 0 + 1, mask=lane == 0, sem="acq_rel",
                                            scope="gpu")
                        arrived = gl.max(gl.where(lane == 0, got, -1), 0)
                        if TRACE:
                            e = _stamp(trace_ptr, p, e, 10)
                        if arrived == p1 - p0:
                            mph, e = _merge(op_desc, lp_ptr, o_ptr, l_ptr, stage, m_bar, mph, b, p0, p1, H,
                                            stride_ob, stride_os, stride_oh, stride_lb, stride_ls, stride_lh, RN, NL,
                                            trace_ptr, p, e, TRACE)
                            gl.store(cnt_ptr + b, 0)
                            if TRACE:
                                e = _stamp(trace_ptr, p, e, 7)
                pc += 1
            S = S + OVERHEAD_C + k
            b += 1
            length = nxt_length
        if TRACE:
            e = _stamp(trace_ptr, p, e, 8)


# Row counts whose narrow kernel merges the pieces of a cut sequence itself (the last piece's program; no combine
# launch). On the H200 (bench/results/mla_decode.md and kernels_notes.md, sixteenth session): 16 rows (H=16, s_q=1)
# gained 2-4% (B=128, 1K: 42.7 against 45.0 us); 32 rows lost 8-27% (B=128, 4K, s_q=2: 179.9 against 163.1 us), so
# they keep the combine kernel.
MERGE_ROWS = (16,)
# The combine kernel as a programmatic dependent launch (``combine``'s pdl): its launch and schedule overlap the
# attention kernel, which lets it launch from its first instruction (``_launch_dependents``).
PDL = True
# Row counts that take ``_ws_kernel`` with TRANSPOSED (two consumer warpgroups) instead of the one-warpgroup narrow
# kernel. Empty. Each consumer computes the scores of its own output columns' boxes (and consumer 0 the RoPE box's),
# the two shares added through shared memory: no duplicated MMAs and no spills (Triton 3.6, sm_90: 168 registers, 0
# B of stack at 16 and 32 rows, against the one-warpgroup kernel's 255 and 192 B at 32). On the H200
# (mla_decode-ab-merge2.md, build ab_split) it is faster on ragged batches at 32 rows (B=128, 1K~, s_q=2: 69.8
# against 85.3 us; B=32 4K~ s_q=2: 68.0 against 72.0) and slower everywhere else (B=32, 16K, s_q=2: 194.1 against
# 166.2; at 16 rows B=32 1K 24.3 against 19.4): both warpgroups share the SM's tensor cores and meet every tile, so
# nothing overlaps the softmax. The first form (every consumer all the scores) was slower still (mla_decode-
# narrow2.md). tests/test_kernels_mla_gluon.py routes it explicitly (its 12 GPU tests pass), bench/mla_decode.py
# --narrow2 times it.
NARROW2_ROWS: tuple[int, ...] = ()
# The warp-specialized kernels' consumers release the query buffer once a piece's last score MMAs are done (rather
# than after its last P V), so the producer brings the next piece's query, then its tiles, a tile's softmax and P V
# earlier. On the H200 (bench/results/mla_decode-ab-qfree.md, against the release after P V) 0-2.3% faster at H=128
# (B=128 4K s_q=2 716.9 -> 700.5 us, B=128 1K~ 125.0 -> 123.6), B=32 1K unchanged (40.7 / 40.8).
EARLY_Q_FREE = True
# The wide kernel's producer brings a query's and each tile's eight latent boxes in one 3-D copy each (``_desc3``, as
# the narrow kernel's ``TMA3_LATENTS``) instead of a copy a box: 2 copies a tile, not 9. On the H200
# (bench/results/mla_decode-ab-widetma3.md, against a copy a box) 0-3.7% faster at H=128 (B=128 4K s_q=2 708.3 ->
# 682.0 us, B=32 1K 40.9 -> 40.1), B=128 1K s_q=2 within 0.4% (200.3 / 201.2).
WIDE_TMA3 = True
# The wide kernel's consumers each score half of a tile's tokens (``_consumer``'s SPLIT) rather than all of them, at
# the price of two meetings a tile. On the H200 (bench/results/mla_decode-ab-split.md, -ab-long.md: against the
# kernel where both score all 64 tokens) 8-11% faster from 4K on (B=128 4K s_q=2 763.1 -> 691.2 us, 383 -> 423
# TFLOP/s; B=32 16K s_q=2 735.0 -> 661.4 us), 1-5% at B=128 1K, and 1.5-4.6% slower at B=32 1K (40.0 -> 40.6 us;
# ragged 51.8 -> 54.2), where each program has few tiles to amortize the meetings over.
WIDE_SPLIT = True
# The partials of cut sequences (each piece's normalized output, rounded as the result itself is) stored in bfloat16
# rather than float32: half the bytes written at a piece's end and read back by the combine kernel or the narrow
# kernel's own merge (MERGE_ROWS). Their log-sum-exps stay float32, and both merges add in float32; FlashMLA keeps
# float32 partials. On the H200 (bench/results/mla_decode-ab-partbf16-*.md, -ab-mergebf16-*.md, against float32): 32
# rows 2-9% faster on short and ragged caches (B=32 1K s_q=2 26.3 -> 24.2 us, 4K~ 62.7 -> 58.8), 16 rows 1-3.5% (B=32
# 4K~ 54.9 -> 53.1), H=128 0-1.6% at 1K, long caches within +-1% (-ab-partbf16-long3.md); the largest output error
# against the float32 reference over the shapes timed is 7.8e-3 either way.
PART_BF16 = True
# The wide kernel's consumers write a piece's output (or bfloat16 partial) through shared memory and TMA (``TSTORE``:
# the last tile's buffer, held past its P V) instead of from the accumulators' registers, where each store
# instruction writes 16 bytes to each of 8 rows. Needs the partials in bfloat16, out's rows at one stride, and the
# split scores (``WIDE_SPLIT``: after the consumers' meeting for P, neither reads the other's boxes of the tile;
# without it, one's score MMAs may still read the boxes the other overwrites). On the H200
# (bench/results/mla_decode-ab-widetstore.md, against the stores from registers) 3-14% faster at every 128-head
# shape: B=32 1K 40.5 -> 34.8 us (225 -> 262 TFLOP/s), B=128 1K~ 121.3 -> 108.8 (276 -> 307), B=128 4K s_q=2 687.7
# -> 666.1. The buffer's release waits for the next piece's first scores, the stores draining meanwhile: 0-2% more at
# 8 of 10 shapes, 0.9% less at B=32 4K (mla_decode-ab-release.md).
WIDE_TSTORE = True
# The (latent, rows) whose narrow kernel writes a piece's output (or bfloat16 partial) through its ring's shared
# memory (free at a piece's end) and TMA (``TSTORE``) rather than from O^T's registers, where a thread's neighbouring
# values are neighbouring rows, C apart in memory: 2-byte stores. On the H200
# (bench/results/mla_decode-ab-narrowtstore-*.md, against the stores from registers): V3 at 32 rows 1-11% faster (B=128
# 1K~ s_q=2 77.6 -> 69.2 us, 4K~ 173.1 -> 164.4, 82% of copy; B=128 1K 50.8 -> 48.0); 16 rows (its partials, merged in
# the kernel, waited for until written before their arrival was counted) 0.3-1.4% slower (B=32 4K 44.8 -> 45.3);
# small-v3 within -1.4% to +0.3%. Not with MERGE_ROWS (see ``_tma_out``).
NARROW_TSTORE = ((512, 32),)
# The wide kernel's first piece: its query and first tile issued by the kernel's warps before the fork into the
# producer and consumers (bench/results/mla_decode-trace-wide-tstore.md: 1.7 us from the schedule to the consumers'
# first length read), the first length read there too. On the H200 (mla_decode-ab-prefork.md, -ab-s28-*.md, against
# the producer's own first loads) 0-2.3% faster at 8 of 10 128-head shapes (B=32 1K 35.2 -> 34.4 us, B=32 4K 95.4 ->
# 94.4), at most 0.6% slower at the others. Traced (mla_decode-trace-wide-s28.md), the consumers now reach their first
# piece 4.6-5.8 us in (2.5-2.8 before), the first tile usable at 6.4-6.5 us (6.0-7.5); handing them the length read
# before the fork changed neither (-s28b.md, -ab-s28-qlen.md). The second tile held back until the first has landed
# (build ``alone``) gained nothing.
WIDE_PREFORK = True
# Row counts whose narrow kernel issues its first piece's query and first tile once the schedule is known, before the
# piece's length is back (bench/results/mla_decode-trace-len.md: 1.6 us from the schedule to the loads issued). When
# the slice reaches into its first sequence b's tiles, b's piece is the slice's first and holds tile lo0, unless b is
# empty and the slice starts at b: then the tile is waited for and its ring slot skipped. On the H200
# (mla_decode-ab-pre-{h16,small}.md, head against base) 16 rows within 1%: faster at B=32 on fixed lengths (4K 44.8
# -> 44.6 us, paged 45.5 -> 45.1) and B=128 1K (41.8 -> 41.5), slower on B=128's ragged ones (1K~ 50.2 -> 50.7); at 32
# rows its build's tile loop grew (1557 -> 1581 instructions, sm_90) and long or B=128 caches lost up to 3% (small-v3
# B=128 4K~ 89.9 -> 92.7), so 32 rows keep their own first loads.
NARROW_PRE = (16,)
STAGES = {"wide": 2, "narrow": 2}  # _ws_kernel's cache tiles in flight: 2 x 72 KB (with the 72 / 18-36 KB query)
# The narrow kernel's (tokens a tile: the schedule's unit, tiles in flight) by (latent, rows). C = 512: 64-token tiles
# of 72 KB, two in flight (with the 18-36 KB query: 168-189 KB of shared memory). C = 256, 16 rows: a 128-token tile
# moves the bytes of a 64-token one of C = 512, so each tile's fixed chain (score MMAs, the softmax's reductions, the
# barriers) is spread over as many bytes; two of 80 KB in flight. C = 256, 32 rows: 64-token tiles, four in flight
# (the 128-token build spills 96 B a thread there; on the H200, bench/results/mla_decode-ab-small128.md, 64-token
# tiles were 7-11% faster on short ragged caches and tied on long ones).
NARROW_TILES = {(512, 16): (64, 2), (512, 32): (64, 2), (256, 16): (128, 2), (256, 32): (64, 4)}
# Latents whose narrow kernel (with 64-token tiles) brings the query's and each tile's latent boxes in one 3-D copy
# (``_desc3``: box j at column 64 j, 128 bytes apart) instead of one 2-D copy a box: the copies are issued by one
# thread while the warpgroup waits, ~60 ns each (bench/results/mla_decode-trace.md: 27 took 1.6 us). On the H200
# (bench/results/mla_decode-ab-tma3.md, -ab-split.md, -ab-long.md, against the 2-D copies): V3 at 16 rows 0.4-6.9%
# faster (B=32 1K 19.2 -> 18.3 us), at 32 rows -1.6% to +7.8% (B=128 16K s_q=2 640.9 -> 594.7); small-v3 (four
# boxes, four ring slots at 32 rows: four predicated copies) 0.3-2% slower, so it keeps the 2-D copies.
TMA3_LATENTS = (512,)

# Row counts whose narrow kernel issues the next tile's score MMAs behind this tile's P V ones (``ONE_WAIT``): the
# tensor cores go from one to the other without a wait between, at the price of nine discarded MMAs a piece (after
# its last tile). On the H200 (bench/results/mla_decode-ab-onewait32-*.md, against the two waits) 32 rows are 2-13%
# faster on short and ragged caches (B=32 4K~ s_q=2 72.6 -> 62.8 us) and 1-3% slower on long fixed ones (B=128 4K
# 150.3 -> 154.4). A first form that waited for both together lost 3-14% at 16 rows (-ab-onewait-*.md): the next
# tile's load went out only once that tile had arrived, so 16 rows keep the two waits.
ONE_WAIT_ROWS = (32,)

# A traced launch's event codes (``mla_decode_gluon(..., trace=)``): each program's (%globaltimer ns, %clock64, code)
# in the order they happen; a piece is codes 9, 2-6 (its tiles 4 and 5 each), then at 16 rows (the narrow kernel's
# merge) a cut one's arrival counted 10, and for the last to arrive its merge: the first partials in 11, merged 7.
# The wide kernel's are its first consumer warpgroup's: 12 when it starts (past the fork), 2 when it starts a piece.
TRACE_CODES = {0: "start", 1: "scheduled", 9: "piece known", 2: "piece issued", 3: "query in", 4: "tile in",
               5: "tile done", 6: "piece stored", 10: "arrival counted", 11: "partials in", 7: "merged", 8: "end",
               12: "consumer in"}


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.cache
def _layout(rows: int, cols: int, dtype: torch.dtype):
    """The NVMMA (swizzled) shared-memory layout of a (rows, cols) TMA box: built once (host time per call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def form(q: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, C: int, page: int | None) -> str | None:
    """"wide", "narrow" or None (the Triton kernel takes the call): Gluon present, an sm_90 GPU, q / kv / pe of one
    16-bit dtype, rows = s_q * H a multiple of 64 with V3's latent (C = 512, R = 64: wide) or 16 / 32 with C = 512 or
    256 and R a multiple of 8 from 8 up to 64 or 32 (narrow), rows of the cache 16-byte aligned (TMA) and fewer than
    2^30 of them (``FAR_PAGE``'s rows lie past the end), 64-token pages when paged."""
    R = pe.shape[-1]
    if not HAVE_GLUON or not q.is_cuda or C not in NARROW_LATENTS or not 8 <= R <= NARROW_LATENTS[C] or R % 8:
        return None
    if kv.shape[0] * kv.shape[1] >= 1 << 30:
        return None
    if q.dtype not in (torch.bfloat16, torch.float16) or kv.dtype != q.dtype or pe.dtype != q.dtype:
        return None
    if page is not None and page != 64:
        return None
    for t in (kv, pe):  # TMA: 16-byte aligned rows, and a 2-D (tokens, width) view of the whole cache
        if t.stride(-1) != 1 or t.stride(1) % 8 or t.data_ptr() % 16 or t.stride(0) != t.shape[1] * t.stride(1):
            return None
    if not _sm90(q.device.index if q.device.index is not None else torch.cuda.current_device()):
        return None
    rows = q.shape[1] * q.shape[2]
    if rows % 64 == 0:
        return "wide" if (C, R) == (LATENT, ROPE) else None
    return "narrow" if rows in (16, 32) else None


def _desc(t2: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t2, [rows, cols], _layout(rows, cols, t2.dtype))


@functools.cache
def _layout3(boxes: int, rows: int, dtype: torch.dtype):
    dt = gl.bfloat16 if dtype == torch.bfloat16 else gl.float16
    return gl.NVMMASharedLayout.get_default_for([boxes, rows, 64], dt)


def _desc3(t2: torch.Tensor, boxes: int, rows: int) -> TensorDescriptor:
    """The first 64 * boxes columns of the 2-D t2 (n, >= 64 boxes) as (box, row, column), box j at column 64 j (its
    stride 128 bytes, the rows' stride t2's), in blocks of (boxes, rows, 64): the narrow kernel's one copy of a row
    block's latent boxes, the same bytes in shared memory as boxes 2-D copies of (rows, 64)."""
    return TensorDescriptor(t2, [boxes, t2.shape[0], 64], [64, t2.stride(0), 1], [boxes, rows, 64],
                            _layout3(boxes, rows, t2.dtype))


@functools.cache
def _flat(bits: int):
    return gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=bits, rank=2)


def _part_desc(o_part: torch.Tensor) -> TensorDescriptor:
    """The partials (2 P, rows, C), float32 or bfloat16, as (2 P rows, C), in boxes of (rows, min(C, 256))
    unswizzled (the narrow kernel's merge)."""
    two_p, rows, C = o_part.shape
    return TensorDescriptor.from_tensor(o_part.view(two_p * rows, C), [rows, min(C, 256)],
                                        _flat(8 * o_part.element_size()))


def _rows_view(t: torch.Tensor, n: int) -> torch.Tensor | None:
    """t (.., C) of a 16-bit dtype as (n, C) without a copy, if TMA can address its rows (16-byte aligned), else
    None."""
    try:
        t2 = t.view(n, t.shape[-1])
    except RuntimeError:  # its rows are not at one stride
        return None
    return t2 if t2.stride(0) % 8 == 0 and t2.data_ptr() % 16 == 0 else None


def _tma_stores(out: torch.Tensor, o_part: torch.Tensor, box_rows: int) -> dict:
    """The kernels' TMA-store arguments (``TSTORE``): out (B, s_q, H, C) and the partials (2 P, rows, C) as (rows, C)
    descriptors in (box_rows, 64) boxes; none where out's rows cannot be addressed so (the stores from registers)."""
    two_p, rows, C = o_part.shape
    out2 = _rows_view(out, out.shape[0] * rows)
    if out2 is None:
        return {}
    return {"o_desc": _desc(out2, box_rows, 64), "p_desc": _desc(o_part.view(two_p * rows, C), box_rows, 64),
            "TSTORE": True}


def mla_decode_gluon(q, kv, pe, seqlens, scale, causal, block_table, out, lse, kind, num_splits=None, trace=None):
    """Fill out (B, s_q, H, C) and lse (B, H, s_q) (see ``kernels.mla_decode.mla_decode``); kv (.., C) and pe (.., R)
    the latent and RoPE parts (views of one cache, or KVCache's two tensors), contiguous (B, T, .) or paged
    (pages, 64, .) with block_table; seqlens int32; kind: ``form``'s answer. num_splits: programs P per row block
    the work is balanced over, with no floor on a slice (``MIN_UNITS`` 1); None: one per SM (per row block).
    trace: for the one-warpgroup narrow and the wide kernels, an int64 (programs, TRACE_LEN, 3) tensor (programs:
    the grid's, row block major) filled with each program's timeline (``TRACE_CODES``; bench/trace_mla_gluon.py),
    code -1 past a program's last event. Returns the grid (for benchmarks' reports)."""
    B, s_q, H, D = q.shape
    C = kv.shape[-1]
    rows = s_q * H
    paged = block_table is not None
    capacity = block_table.shape[1] * 64 if paged else kv.shape[1]
    q2 = q.reshape(B * rows, D)
    if q2.stride(0) % 8 or q2.data_ptr() % 16:  # TMA: 16-byte aligned rows (a fresh copy is)
        q2 = q2.clone(memory_format=torch.contiguous_format)
    kv2, pe2 = (t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (t.stride(1), 1)) for t in (kv, pe))  # 2-D views
    row_blocks = rows // 64 if kind == "wide" else 1
    if num_splits is None:
        P = max(1, sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
                // row_blocks)
        min_units = MIN_UNITS
    else:
        P, min_units = num_splits, 1
    two = kind == "narrow" and rows in NARROW2_ROWS and C == LATENT  # (its kernel takes V3's latent only)
    merge = kind == "narrow" and rows in MERGE_ROWS and not two
    o_part = torch.empty(2 * P, rows, C, dtype=torch.bfloat16 if PART_BF16 else torch.float32, device=q.device)
    l_part = torch.empty(2 * P, rows, dtype=torch.float32, device=q.device)
    tbl = block_table if paged else seqlens
    counts = arrival_counters("mla_decode_gluon", q.device, B)  # the narrow kernel's merge (zero between launches)
    args = (_desc(q2, 64 if kind == "wide" else rows, 64), _desc(kv2, 64, 64), _desc(pe2, 64, 64), seqlens, tbl,
            out, lse, o_part, l_part, counts, tbl.stride(0) if paged else 0, out.stride(0), out.stride(1),
            out.stride(2), lse.stride(0), lse.stride(2), lse.stride(1), capacity, B, H, s_q,
            scale * 1.4426950408889634, min_units, max(2, MAX_PIECES))
    block_b = min(MAX_BLOCK_B, max(16, triton.next_power_of_2(B)))
    grid = (row_blocks, P) if kind == "wide" else (1, P) if two else (P,)
    unit, stages = NARROW_TILES[C, rows] if kind == "narrow" and not two else (UNIT, STAGES[kind])
    if trace is not None and two:
        raise ValueError(f"mla_decode_gluon: trace= is for the one-warpgroup narrow and the wide kernels, this call "
                         f"takes the two-warpgroup narrow one ({rows} rows); drop trace=")
    traced = {}
    if trace is not None:
        n_prog = math.prod(grid)
        if tuple(trace.shape) != (n_prog, TRACE_LEN, 3) or trace.dtype != torch.int64:
            raise ValueError(f"mla_decode_gluon: trace must be int64 of shape ({n_prog}, {TRACE_LEN}, 3), got "
                             f"{trace.dtype} {tuple(trace.shape)}")
        trace.fill_(-1)
        traced = {"TRACE": True, "trace_ptr": trace}
    if kind == "wide" or two:
        rn = 64 if kind == "wide" else rows
        stores = _tma_stores(out, o_part, 64) if kind == "wide" and WIDE_TSTORE and WIDE_SPLIT and PART_BF16 else {}
        _ws_kernel[grid](*args, _desc3(q2, C // 64, rn), _desc3(kv2, C // 64, 64), CAUSAL=causal, PAGED=paged,
                         STAGES=stages, BLOCK_B=block_b, RN=rn, TRANSPOSED=two, SPLIT=kind == "wide" and WIDE_SPLIT,
                         EARLY_Q_FREE=EARLY_Q_FREE, TMA3=kind == "wide" and WIDE_TMA3, num_warps=4,
                         PRE=kind == "wide" and WIDE_PREFORK, **stores, **traced)
    else:
        stores = _tma_stores(out, o_part, rows) if (C, rows) in NARROW_TSTORE and PART_BF16 and not merge else {}
        _narrow_kernel[grid](*args, _part_desc(o_part), _desc3(q2, C // 64, rows), _desc3(kv2, C // 64, 64), RN=rows,
                             CAUSAL=causal, PAGED=paged, STAGES=stages, BLOCK_B=block_b, MERGE=merge, NL=C // 64,
                             TN=unit, TMA3=C in TMA3_LATENTS and unit == 64, ONE_WAIT=rows in ONE_WAIT_ROWS,
                             PRE=rows in NARROW_PRE, num_warps=4, **stores, **traced)
    if not merge and P > 1:  # (one program computes every sequence whole)
        combine(o_part, l_part, seqlens, capacity, min_units, out, lse, unit, pdl=PDL)
    return grid
