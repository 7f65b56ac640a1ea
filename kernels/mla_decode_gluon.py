"""MLA decoding on Hopper's warpgroup MMAs from shared memory (Gluon): the candidate fast path of ``mla_decode``
for V3's latent (C = 512, R = 64), 16-bit caches, sm_90. OFF (``kernels.mla_decode.GLUON_MLA``) until its GPU tests
and bench/probe_mla_gluon.py have run on the device: written and compiled offline (Triton 3.6's ptxas, sm_90), never
run yet. Same signature and result as ``kernels.mla_decode.mla_decode`` (and ``minids.mla_decode_ref``).

Why (bench/results/kernels_notes.md, fifteenth session): the Triton kernel holds the query tile as a dot operand in
registers (64 rows x 576: 144 registers a thread per warpgroup) beside the float32 accumulator, so at H=128 its sm_90
build spills 5.9 KB a thread and runs at 109-276 TFLOP/s against the >= 300 target; at H=16 it pads nothing but runs
one latency-bound warp a scheduler (0.16 issues a cycle, 29% of copy at B=32, 1K). Here the query and the cache tiles
stay in shared memory (TMA loads, 64-token tiles in 64-column boxes), where the MMAs read them.

Two kernels, by rows = s_q * H:
- rows a multiple of 64 (H=128, H=64): ``_wide_kernel``, 64 rows a program, warp-specialized: a producer warp
  streams the query (once) and the cache tiles through a ring of STAGES buffers; two consumer warpgroups each
  compute all 64 x 64 scores of a tile (nine K=64 MMAs: 8 latent boxes and the RoPE box), the online softmax, and
  P V for their own half of the 512 output columns (four 64-wide accumulators, P from registers). The scores are
  computed by both (1.5x the ideal tensor work) in exchange for no traffic between the warpgroups.
- rows 16 or 32 (H=16, s_q 1 or 2): ``_narrow_kernel``, transposed, one warpgroup: the tile's 64 tokens are the MMA's
  M and the rows its N (no padding to 64 rows): S^T = K Q^T, softmax along the tokens, O^T (512 x rows) += V^T P^T
  with P^T written to shared memory (the MMA's B operand) and V^T read transposed from the cache tile.

Work split: program (row block, sequence, split j) takes tiles [j per, (j + 1) per) of its sequence, per =
ceil(tiles / splits) from the sequence's own length (read in the kernel, so the launch depends on static sizes only
and a decoding step can be graph-captured); splits fills the SMs for small batches. With one split the programs write
the output and the log-sum-exp directly; otherwise float32 partials, merged in a fixed order by ``_combine_kernel``.
Paged caches: 64-token pages (one tile each), looked up per tile in the block table.
Preconditions (``usable``): q, cache and pe of one 16-bit dtype; C = 512, R = 64; the cache's rows 16-byte aligned
(TMA); the page size 64 when paged.
"""

from __future__ import annotations

import functools
import math

import torch
from minids.kernels import HAVE_TRITON, sm_count

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # written against Triton 3.6's Gluon (the device's); later releases renamed the TMA copies (tma.async_load)
    HAVE_GLUON = not hasattr(tma, "async_load")
except ImportError:  # no Triton, or one without Gluon
    HAVE_GLUON = False

if HAVE_TRITON:
    import triton
    import triton.language as tl

LATENT, ROPE = 512, 64  # the only (C, R) these kernels take: V3's

if HAVE_TRITON:

    @triton.jit
    def _combine_kernel(O_PART, L_PART, O, LSE, splits, B, n_rows, H, stride_ob, stride_os, stride_oh, stride_lb,
                        stride_lh, stride_ls, C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
        """Row (program_id 1) of sequence b (program_id 0): out = sum_j w_j o_j / sum_j w_j, w_j = 2^(l_j - max l),
        over the splits j in order; lse = (max + log2 sum w) ln 2. O_PART (splits, B, n_rows, C) and L_PART (splits,
        B, n_rows) float32 (log2 units; -inf and a zero partial for a split that saw no token)."""
        b = tl.program_id(0)
        r = tl.program_id(1)
        js = tl.arange(0, BLOCK_S)
        ok = js < splits
        slot = (js * B + b).to(tl.int64) * n_rows + r
        lj = tl.load(L_PART + slot, mask=ok, other=float("-inf"))
        m = tl.max(lj, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        w = tl.exp2(lj - m_safe)
        den = tl.sum(w, 0)
        cols = tl.arange(0, BLOCK_C)
        o = tl.load(O_PART + slot[:, None] * C + cols[None, :], mask=ok[:, None] & (cols < C)[None, :], other=0.0)
        none = den == 0.0
        out = tl.sum(w[:, None] * o, 0) / tl.where(none, 1.0, den)
        qi = r // H
        h = r % H
        tl.store(O + b * stride_ob + qi * stride_os + h * stride_oh + cols, out.to(O.dtype.element_ty), mask=cols < C)
        lse = tl.where(none, float("-inf"), (m + tl.log2(tl.where(none, 1.0, den))) * 0.6931471805599453)
        tl.store(LSE + b * stride_lb + h * stride_lh + qi * stride_ls, lse)


def combine(o_part: torch.Tensor, l_part: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the splits' partials (o_part (splits, B, s_q * H, C), l_part (splits, B, s_q * H) in log2 units) into
    out (B, s_q, H, C) and lse (B, H, s_q) (natural log), in split order."""
    splits, B, n_rows, C = o_part.shape
    H = out.shape[2]
    _combine_kernel[(B, n_rows)](
        o_part, l_part, out, lse, splits, B, n_rows, H, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
        lse.stride(1), lse.stride(2), C=C, BLOCK_C=triton.next_power_of_2(C),
        BLOCK_S=max(2, triton.next_power_of_2(splits)))


def combine_ref(o_part: torch.Tensor, l_part: torch.Tensor, H: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine`` in torch (the tests' reference): (out (B, s_q, H, C) float32, lse (B, H, s_q))."""
    _, B, n_rows, C = o_part.shape
    m = l_part.amax(0)
    w = torch.exp2(l_part - torch.where(torch.isinf(m), torch.zeros_like(m), m))
    den = w.sum(0)
    out = (w.unsqueeze(-1) * o_part).sum(0) / torch.where(den == 0, torch.ones_like(den), den).unsqueeze(-1)
    lse = torch.where(den == 0, torch.full_like(den, float("-inf")), (m + torch.log2(den)) * math.log(2))
    return out.view(B, n_rows // H, H, C), lse.view(B, n_rows // H, H).transpose(1, 2)


if HAVE_GLUON:
    ROWS = gl.constexpr(64)  # rows a program of the wide kernel (one warpgroup MMA's M)
    BN = gl.constexpr(64)  # tokens a cache tile (and a page)
    CW = gl.constexpr(64)  # columns a TMA box / shared-memory chunk (128 bytes of 16-bit values: one swizzle row)
    NKV = gl.constexpr(LATENT // 64)  # latent boxes a tile (the value's columns); the RoPE box is chunk NKV

    @gluon.jit
    def _tile_row(tbl_ptr, kv_row, t, PAGED: gl.constexpr):
        """The cache row (of the 2-D (rows, C) view) where the 64-token tile starting at token t begins."""
        if PAGED:
            return gl.load(tbl_ptr + t // BN) * BN
        else:
            return kv_row + t

    @gluon.jit
    def _load_tile(kv_desc, pe_desc, row, bar, bufs, base: gl.constexpr):
        """The 9 boxes of one 64-token tile (8 latent, 1 RoPE) into bufs[base .. base + 8], arriving on bar."""
        mbarrier.expect(bar, NKV * kv_desc.block_type.nbytes + pe_desc.block_type.nbytes)
        for c in gl.static_range(NKV):
            tma.async_copy_global_to_shared(kv_desc, [row, c * CW], bar, bufs.index(base + c))
        tma.async_copy_global_to_shared(pe_desc, [row, 0], bar, bufs.index(base + NKV))

    @gluon.jit
    def _zero_tail(kv_smem, first: gl.constexpr, count: gl.constexpr, tok0, seqlen):
        """Zero the rows of tokens >= seqlen in buffers first .. first + count - 1 of a tile starting at token tok0:
        they are read as values (P V), where a masked token's P = 0 still meets whatever the cache holds there (NaN
        in the tests). Their scores need no care: they are masked before the softmax."""
        zl: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        keep = gl.expand_dims(tok0 + gl.arange(0, BN, layout=gl.SliceLayout(1, zl)) < seqlen, 1)
        for k in gl.static_range(count):
            buf = kv_smem.index(first + k)
            x = buf.load(zl)
            buf.store(gl.where(keep, x, gl.zeros_like(x)))

    @gluon.jit
    def _limits(limit_base, rows, H, CAUSAL: gl.constexpr):
        """Tokens each row (query token i = row // H) sees: t < limit_base + i when causal, else t < limit_base."""
        if CAUSAL:
            return limit_base + rows // H
        else:
            return limit_base + rows * 0

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
    def _store_rows(acc, inv, o_base, o_qi, o_h, col0, rows, cols, H):
        """acc * inv (ROWS x 64, rows r, columns col0 + c) to o_base + (r // H) o_qi + (r % H) o_h + col."""
        ptr = o_base + gl.expand_dims((rows // H) * o_qi + (rows % H) * o_h, 1) + col0 + gl.expand_dims(cols, 0)
        gl.store(ptr, (acc * inv).to(o_base.dtype.element_ty))

    @gluon.jit
    def _wide_producer(q_desc, kv_desc, pe_desc, q_smem, kv_smem, q_bar, ready, empty, q_row, kv_row, tbl_ptr, t0,
                       n_tiles, PAGED: gl.constexpr, STAGES: gl.constexpr):
        """One warp: the query tile, then every cache tile of the piece into buffer i % STAGES once both consumers
        have released it (a fresh barrier reports phase 1 complete, so the first pass does not wait)."""
        mbarrier.expect(q_bar, (NKV + 1) * q_desc.block_type.nbytes)
        for c in gl.static_range(NKV + 1):
            tma.async_copy_global_to_shared(q_desc, [q_row, c * CW], q_bar, q_smem.index(c))
        for i in range(n_tiles):
            s = i % STAGES
            mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
            _load_tile(kv_desc, pe_desc, _tile_row(tbl_ptr, kv_row, t0 + i * BN, PAGED), ready.index(s), kv_smem,
                       s * (NKV + 1))

    @gluon.jit
    def _wide_consumer(q_smem, kv_smem, q_bar, ready, empty, o_base, o_qi, o_h, l_base, l_qi, l_h, limit_base, t0,
                       n_tiles, seqlen, qk_scale, H, row0, LSE_SCALE: gl.constexpr, CAUSAL: gl.constexpr,
                       PART: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup: scores and softmax of the program's 64 rows, output columns [256 PART, +256)."""
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        NB: gl.constexpr = NKV + 1  # boxes a tile
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
        cols = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        limit = _limits(limit_base, rows, H, CAUSAL)  # (ROWS,)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, mma))
        acc0 = gl.zeros([ROWS, CW], gl.float32, mma)
        acc1 = gl.zeros([ROWS, CW], gl.float32, mma)
        acc2 = gl.zeros([ROWS, CW], gl.float32, mma)
        acc3 = gl.zeros([ROWS, CW], gl.float32, mma)
        s_zero = gl.zeros([ROWS, BN], gl.float32, mma)
        mbarrier.wait(q_bar, 0)
        for i in range(n_tiles):
            st = i % STAGES
            mbarrier.wait(ready.index(st), (i // STAGES) & 1)
            s = warpgroup_mma(q_smem.index(0), kv_smem.index(st * NB).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            for c in gl.static_range(1, NB):
                s = warpgroup_mma(q_smem.index(c), kv_smem.index(st * NB + c).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            toks = t0 + i * BN + cols
            s = gl.where(gl.expand_dims(toks, 0) < gl.expand_dims(limit, 1), s * qk_scale, float("-inf"))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 1)
            pa = gl.convert_layout(p.to(q_smem.dtype), p_layout)
            a2 = gl.expand_dims(alpha, 1)
            v0 = st * NB + PART * 4
            if t0 + i * BN + BN > seqlen:  # the last tile: its tokens past the length, zeroed in this half's values
                _zero_tail(kv_smem, v0, 4, t0 + i * BN, seqlen)  # (the other warpgroup may still be reading them
                fence_async_shared()  # as keys: harmless, those scores are masked)
                gl.thread_barrier()  # this warpgroup's 128 threads (a named barrier in a partition)
            acc0 = warpgroup_mma(pa, kv_smem.index(v0), acc0 * a2, is_async=True)
            acc1 = warpgroup_mma(pa, kv_smem.index(v0 + 1), acc1 * a2, is_async=True)
            acc2 = warpgroup_mma(pa, kv_smem.index(v0 + 2), acc2 * a2, is_async=True)
            acc3 = warpgroup_mma(pa, kv_smem.index(v0 + 3), acc3 * a2, is_async=True)
            acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2, acc3))
            mbarrier.arrive(empty.index(st))
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        inv = gl.expand_dims(1.0 / l_safe, 1)  # 0 for a row that saw nothing (acc = 0)
        c0 = PART * 4 * CW
        _store_rows(acc0, inv, o_base, o_qi, o_h, c0, rows, cols, H)
        _store_rows(acc1, inv, o_base, o_qi, o_h, c0 + CW, rows, cols, H)
        _store_rows(acc2, inv, o_base, o_qi, o_h, c0 + 2 * CW, rows, cols, H)
        _store_rows(acc3, inv, o_base, o_qi, o_h, c0 + 3 * CW, rows, cols, H)
        if PART == 0:
            lse = gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * LSE_SCALE)
            gl.store(l_base + (rows // H) * l_qi + (rows % H) * l_h, lse)

    @gluon.jit
    def _piece(seqlens_ptr, tbl_ptr, stride_tb, o_ptr, l_ptr, stride_ob, stride_os, stride_oh, stride_lb,
               stride_ls, stride_lh, capacity, H, S_Q, splits, B, b, j, CAUSAL: gl.constexpr, SPLIT: gl.constexpr,
               C: gl.constexpr):
        """(first token, tiles, limit base, length, table row, output base / strides, lse base / strides) of (b, j):
        its piece of the sequence and where its rows go (the output when SPLIT is off, else its partial slot)."""
        seqlen = gl.minimum(gl.maximum(gl.load(seqlens_ptr + b), 0), capacity)
        n_all = gl.cdiv(seqlen, BN)
        per = gl.cdiv(n_all, splits)
        t0 = j * per * BN
        n_tiles = gl.maximum(gl.minimum(per, n_all - j * per), 0)
        if CAUSAL:
            limit_base = seqlen - S_Q + 1  # query i sees t < len - s_q + 1 + i
        else:
            limit_base = seqlen
        b64 = b.to(gl.int64)
        if SPLIT:
            slot = (j * B + b).to(gl.int64) * (S_Q * H)
            o_base = o_ptr + slot * C
            o_qi = H * C
            o_h = C
            l_base = l_ptr + slot
            l_qi = H
            l_h = 1
        else:
            o_base = o_ptr + b64 * stride_ob
            o_qi = stride_os
            o_h = stride_oh
            l_base = l_ptr + b64 * stride_lb
            l_qi = stride_ls
            l_h = stride_lh
        return t0, n_tiles, limit_base, seqlen, tbl_ptr + b64 * stride_tb, o_base, o_qi, o_h, l_base, l_qi, l_h

    @gluon.jit
    def _wide_kernel(q_desc, kv_desc, pe_desc, seqlens_ptr, tbl_ptr, o_ptr, l_ptr, stride_tb, stride_ob, stride_os,
                     stride_oh, stride_lb, stride_ls, stride_lh, capacity, H, S_Q, qk_scale, splits,
                     CAUSAL: gl.constexpr, PAGED: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr):
        """Program (row block, sequence b, split j); see the module docstring."""
        rb = gl.program_id(0)
        b = gl.program_id(1)
        j = gl.program_id(2)
        B = gl.num_programs(1)
        t0, n_tiles, limit_base, seqlen, tbl, o_base, o_qi, o_h, l_base, l_qi, l_h = _piece(
            seqlens_ptr, tbl_ptr, stride_tb, o_ptr, l_ptr, stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
            stride_lh, capacity, H, S_Q, splits, B, b, j, CAUSAL, SPLIT, NKV * CW)
        row0 = rb * ROWS
        NB: gl.constexpr = NKV + 1
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [NB, ROWS, CW], q_desc.layout)
        kv_smem = gl.allocate_shared_memory(kv_desc.dtype, [STAGES * NB, BN, CW], kv_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for k in gl.static_range(STAGES):
            mbarrier.init(ready.index(k), count=1)
            mbarrier.init(empty.index(k), count=2)
        fence_async_shared()
        lse_scale: gl.constexpr = 1.0 if SPLIT else 0.6931471805599453
        gl.warp_specialize([
            (_wide_consumer, (q_smem, kv_smem, q_bar, ready, empty, o_base, o_qi, o_h, l_base, l_qi, l_h, limit_base,
                              t0, n_tiles, seqlen, qk_scale, H, row0, lse_scale, CAUSAL, 0, STAGES)),
            (_wide_consumer, (q_smem, kv_smem, q_bar, ready, empty, o_base, o_qi, o_h, l_base, l_qi, l_h, limit_base,
                              t0, n_tiles, seqlen, qk_scale, H, row0, lse_scale, CAUSAL, 1, STAGES)),
            (_wide_producer, (q_desc, kv_desc, pe_desc, q_smem, kv_smem, q_bar, ready, empty, b * S_Q * H + row0,
                              b * capacity, tbl, t0, n_tiles, PAGED, STAGES)),
        ], [4, 1], [232, 24])

    @gluon.jit
    def _narrow_kernel(q_desc, kv_desc, pe_desc, seqlens_ptr, tbl_ptr, o_ptr, l_ptr, stride_tb, stride_ob, stride_os,
                       stride_oh, stride_lb, stride_ls, stride_lh, capacity, H, S_Q, qk_scale, splits,
                       RN: gl.constexpr, CAUSAL: gl.constexpr, PAGED: gl.constexpr, SPLIT: gl.constexpr,
                       STAGES: gl.constexpr):
        """Program (sequence b, split j), all RN = s_q * H rows (16 or 32); see the module docstring. One warpgroup
        issues its own loads (no warp specialization): tile i + STAGES - 1 goes out once tile i - 1's MMAs are done."""
        b = gl.program_id(0)
        j = gl.program_id(1)
        B = gl.num_programs(0)
        t0, n_tiles, limit_base, seqlen, tbl, o_base, o_qi, o_h, l_base, l_qi, l_h = _piece(
            seqlens_ptr, tbl_ptr, stride_tb, o_ptr, l_ptr, stride_ob, stride_os, stride_oh, stride_lb, stride_ls,
            stride_lh, capacity, H, S_Q, splits, B, b, j, CAUSAL, SPLIT, NKV * CW)
        kv_row = b * capacity
        NB: gl.constexpr = NKV + 1
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RN, 16])
        p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, RN], gl.bfloat16)
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [NB, RN, CW], q_desc.layout)
        kv_smem = gl.allocate_shared_memory(kv_desc.dtype, [STAGES * NB, BN, CW], kv_desc.layout)
        p_smem = gl.allocate_shared_memory(kv_desc.dtype, [BN, RN], p_layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for k in gl.static_range(STAGES):
            mbarrier.init(ready.index(k), count=1)
        fence_async_shared()

        mbarrier.expect(q_bar, NB * q_desc.block_type.nbytes)
        for c in gl.static_range(NB):
            tma.async_copy_global_to_shared(q_desc, [b * RN, c * CW], q_bar, q_smem.index(c))
        for k in gl.static_range(STAGES - 1):  # the first tiles in flight
            if k < n_tiles:
                _load_tile(kv_desc, pe_desc, _tile_row(tbl, kv_row, t0 + k * BN, PAGED), ready.index(k), kv_smem,
                           k * NB)

        toks0 = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
        rows = gl.arange(0, RN, layout=gl.SliceLayout(0, mma))
        limit = _limits(limit_base, rows, H, CAUSAL)  # (RN,)
        m_i = gl.full([RN], float("-inf"), gl.float32, gl.SliceLayout(0, mma))
        l_i = gl.zeros([RN], gl.float32, gl.SliceLayout(0, mma))
        acc0 = gl.zeros([CW, RN], gl.float32, mma)
        acc1 = gl.zeros([CW, RN], gl.float32, mma)
        acc2 = gl.zeros([CW, RN], gl.float32, mma)
        acc3 = gl.zeros([CW, RN], gl.float32, mma)
        acc4 = gl.zeros([CW, RN], gl.float32, mma)
        acc5 = gl.zeros([CW, RN], gl.float32, mma)
        acc6 = gl.zeros([CW, RN], gl.float32, mma)
        acc7 = gl.zeros([CW, RN], gl.float32, mma)
        s_zero = gl.zeros([BN, RN], gl.float32, mma)
        mbarrier.wait(q_bar, 0)
        for i in range(n_tiles):
            nxt = i + STAGES - 1  # into the buffer tile i - 1 used: its MMAs are done (the barrier below)
            if nxt < n_tiles:
                sn = nxt % STAGES
                _load_tile(kv_desc, pe_desc, _tile_row(tbl, kv_row, t0 + nxt * BN, PAGED), ready.index(sn), kv_smem,
                           sn * NB)
            st = i % STAGES
            mbarrier.wait(ready.index(st), (i // STAGES) & 1)
            s = warpgroup_mma(kv_smem.index(st * NB), q_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                              is_async=True)
            for c in gl.static_range(1, NB):
                s = warpgroup_mma(kv_smem.index(st * NB + c), q_smem.index(c).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            toks = t0 + i * BN + toks0
            s = gl.where(gl.expand_dims(toks, 1) < gl.expand_dims(limit, 0), s * qk_scale, float("-inf"))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0)
            if t0 + i * BN + BN > seqlen:  # the last tile: its tokens past the length, zeroed in the values
                _zero_tail(kv_smem, st * NB, NKV, t0 + i * BN, seqlen)
            p_smem.store(p.to(kv_smem.dtype))
            fence_async_shared()
            gl.thread_barrier()  # P^T and the zeroed rows are in shared memory before the MMAs read them
            a2 = gl.expand_dims(alpha, 0)
            v = st * NB
            acc0 = warpgroup_mma(kv_smem.index(v).permute((1, 0)), p_smem, acc0 * a2, is_async=True)
            acc1 = warpgroup_mma(kv_smem.index(v + 1).permute((1, 0)), p_smem, acc1 * a2, is_async=True)
            acc2 = warpgroup_mma(kv_smem.index(v + 2).permute((1, 0)), p_smem, acc2 * a2, is_async=True)
            acc3 = warpgroup_mma(kv_smem.index(v + 3).permute((1, 0)), p_smem, acc3 * a2, is_async=True)
            acc4 = warpgroup_mma(kv_smem.index(v + 4).permute((1, 0)), p_smem, acc4 * a2, is_async=True)
            acc5 = warpgroup_mma(kv_smem.index(v + 5).permute((1, 0)), p_smem, acc5 * a2, is_async=True)
            acc6 = warpgroup_mma(kv_smem.index(v + 6).permute((1, 0)), p_smem, acc6 * a2, is_async=True)
            acc7 = warpgroup_mma(kv_smem.index(v + 7).permute((1, 0)), p_smem, acc7 * a2, is_async=True)
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = warpgroup_mma_wait(
                num_outstanding=0, deps=(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7))
            gl.thread_barrier()  # every warp is past this tile's MMAs before its buffer and P^T are rewritten
        empty_row = l_i == 0.0
        l_safe = gl.where(empty_row, 1.0, l_i)
        inv = gl.expand_dims(1.0 / l_safe, 0)
        cw = gl.arange(0, CW, layout=gl.SliceLayout(1, mma))
        optr = o_base + gl.expand_dims((rows // H) * o_qi + (rows % H) * o_h, 0) + gl.expand_dims(cw, 1)  # out^T
        dt = o_base.dtype.element_ty
        gl.store(optr, (acc0 * inv).to(dt))
        gl.store(optr + CW, (acc1 * inv).to(dt))
        gl.store(optr + 2 * CW, (acc2 * inv).to(dt))
        gl.store(optr + 3 * CW, (acc3 * inv).to(dt))
        gl.store(optr + 4 * CW, (acc4 * inv).to(dt))
        gl.store(optr + 5 * CW, (acc5 * inv).to(dt))
        gl.store(optr + 6 * CW, (acc6 * inv).to(dt))
        gl.store(optr + 7 * CW, (acc7 * inv).to(dt))
        lse_scale: gl.constexpr = 1.0 if SPLIT else 0.6931471805599453
        gl.store(l_base + (rows // H) * l_qi + (rows % H) * l_h,
                 gl.where(empty_row, float("-inf"), (m_i + gl.log2(l_safe)) * lse_scale))


STAGES = {"wide": 2, "narrow": 2}  # cache tiles in flight: 2 x 72 KB (with the 72 / 18-36 KB query: 221 / 168-189 KB)


@functools.cache
def _sm90(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] == 9


@functools.cache
def _layout(rows: int, cols: int, dtype: torch.dtype):
    """The NVMMA (swizzled) shared-memory layout of a (rows, cols) TMA box: built once (host time per call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def form(q: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, C: int, page: int | None) -> str | None:
    """"wide", "narrow" or None (the Triton kernel takes the call): Gluon present, an sm_90 GPU, q / kv / pe of one
    16-bit dtype, V3's latent (C = 512, R = 64), rows = s_q * H a multiple of 64 (wide) or 16 / 32 (narrow), rows of
    the cache 16-byte aligned (TMA), 64-token pages when paged."""
    if not HAVE_GLUON or not q.is_cuda or C != LATENT or pe.shape[-1] != ROPE:
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
    return "wide" if rows % 64 == 0 else "narrow" if rows in (16, 32) else None


def _desc(t2: torch.Tensor, rows: int, cols: int) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t2, [rows, cols], _layout(rows, cols, t2.dtype))


def mla_decode_gluon(q, kv, pe, seqlens, scale, causal, block_table, out, lse, kind, num_splits=None):
    """Fill out (B, s_q, H, 512) and lse (B, H, s_q) (see ``kernels.mla_decode.mla_decode``); kv (.., 512) and pe
    (.., 64) the latent and RoPE parts (views of one cache, or KVCache's two tensors), contiguous (B, T, .) or paged
    (pages, 64, .) with block_table; seqlens int32; kind: ``form``'s answer. num_splits: programs per sequence (and
    row block); None: enough to fill the SMs once (one, without a combine, for large batches)."""
    B, s_q, H, D = q.shape
    rows = s_q * H
    paged = block_table is not None
    capacity = block_table.shape[1] * 64 if paged else kv.shape[1]
    q2 = q.reshape(B * rows, D)
    if q2.stride(0) % 8 or q2.data_ptr() % 16:  # TMA: 16-byte aligned rows (a fresh copy is)
        q2 = q2.clone(memory_format=torch.contiguous_format)
    kv2, pe2 = (t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (t.stride(1), 1)) for t in (kv, pe))  # 2-D views
    per_seq = rows // 64 if kind == "wide" else 1  # programs a split of one sequence
    if num_splits is None:
        sms = sm_count(q.device.index if q.device.index is not None else torch.cuda.current_device())
        num_splits = max(1, min(sms // (B * per_seq), -(-capacity // 64)))
    split = num_splits > 1
    if split:
        o_dst = torch.empty(num_splits, B, rows, LATENT, dtype=torch.float32, device=q.device)
        l_dst = torch.empty(num_splits, B, rows, dtype=torch.float32, device=q.device)
    else:
        o_dst, l_dst = out, lse
    tbl = block_table if paged else seqlens
    args = (_desc(q2, 64 if kind == "wide" else rows, 64), _desc(kv2, 64, 64), _desc(pe2, 64, 64), seqlens, tbl,
            o_dst, l_dst, tbl.stride(0) if paged else 0, out.stride(0), out.stride(1), out.stride(2), lse.stride(0),
            lse.stride(2), lse.stride(1), capacity, H, s_q, scale * 1.4426950408889634, num_splits)
    if kind == "wide":
        _wide_kernel[(rows // 64, B, num_splits)](*args, CAUSAL=causal, PAGED=paged, SPLIT=split,
                                                  STAGES=STAGES["wide"], num_warps=4)
    else:
        _narrow_kernel[(B, num_splits)](*args, RN=rows, CAUSAL=causal, PAGED=paged, SPLIT=split,
                                        STAGES=STAGES["narrow"], num_warps=4)
    if split:
        combine(o_dst, l_dst, out, lse)
