"""Probe (issue 10): can a Gluon kernel with warpgroup MMAs from shared memory reach the H=128 target (>= 300 TFLOP/s)
that the Triton kernel of kernels/mla_decode.py misses (109-276)? An experiment, not a library path: it runs only
here, checks itself against ``minids.attention.mla_decode_ref`` and is timed beside ``mla_decode`` in the same run.

Why the Triton kernel stops short at H=128 (bench/results/kernels_notes.md, fifteenth session): its query tile (64 rows
x 576 per warpgroup) is a dot operand held in registers, 144 a thread, beside the 64 x 256 float32 accumulator (128), so
the sm_90 build spills (5.9 KB of stack a thread, offline compile with Triton 3.6). Gluon lets the query stay in shared
memory, where the warpgroup MMA reads it directly.

The design (no combine here: every program writes a float32 partial and its log2-sum-exp; the probe merges them in
torch, and times the kernel alone):
- a program: 64 rows (query token, head) of one sequence, over tokens [j * per, (j + 1) * per) of it (split j);
- a producer warp loads the query tile once (9 TMA boxes of 64 x 64) and streams 64-token cache tiles (9 boxes each)
  into a ring of STAGES buffers (``ready`` / ``empty`` barriers);
- two consumer warpgroups, independent of each other: each computes all 64 x 64 scores of a tile (S = Q K^T, nine
  K=64 MMAs, both operands in shared memory), the online softmax, and P V for its own 256 of the 512 output columns
  (four 64-wide accumulators, P from registers). The scores are computed twice (1.5x the tensor work of the ideal), in
  exchange for no traffic between the warpgroups.
For few rows (s_q * H = 16 or 32, the memory-bound cases, where a 64-row MMA would pad the rows 2-4x) the transposed
form ``_mla_probe_t_kernel``: the 64 tokens of a tile are the MMA's M and the rows its N (see its docstring).

Status: both kernels compile for sm_90 with Triton 3.6 (the device's release) on a machine without a GPU: the
warp-specialized one 168 registers a thread, no spills, 221 KB of shared memory; the transposed one at 16 rows 154
registers, no spills, 168 KB (at 32 rows 255 registers and 8 bytes of spill). Neither has run on a GPU yet: the
session that wrote them had no device time left. Their first run is this script.

    python3 bench/probe_mla_gluon.py            # an sm_90 GPU with Triton 3.6's Gluon
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
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

ROWS = gl.constexpr(64)  # rows a program (one warpgroup MMA's M)
BN = gl.constexpr(64)  # tokens a cache tile
CW = gl.constexpr(64)  # columns a TMA box / shared-memory chunk (128 bytes of bf16: one swizzle row)


@gluon.jit
def _producer(q_desc, kv_desc, q_smem, kv_smem, q_bar, ready, empty, q_row, kv_row, t0, n_tiles,
              NCH: gl.constexpr, STAGES: gl.constexpr):
    """One warp: the query tile, then every cache tile of the piece into buffer i % STAGES once both consumers have
    released it."""
    mbarrier.expect(q_bar, NCH * q_desc.block_type.nbytes)
    for c in gl.static_range(NCH):
        tma.async_copy_global_to_shared(q_desc, [q_row, c * CW], q_bar, q_smem.index(c))
    for i in range(n_tiles):
        s = i % STAGES
        mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)
        mbarrier.expect(ready.index(s), NCH * kv_desc.block_type.nbytes)
        for c in gl.static_range(NCH):
            tma.async_copy_global_to_shared(kv_desc, [kv_row + t0 + i * BN, c * CW], ready.index(s),
                                            kv_smem.index(s * NCH + c))


@gluon.jit
def _consumer(q_smem, kv_smem, q_bar, ready, empty, o_ptr, l_ptr, limit_base, t0, n_tiles, qk_scale, H,
              row0, PART: gl.constexpr, NCH: gl.constexpr, VCH: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup: scores and softmax of all 64 rows, output columns [PART * VCH * CW, +VCH * CW)."""
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma))
    cols = gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    limit = limit_base + (row0 + rows) // H  # (ROWS,): query i sees tokens t < len - s_q + 1 + i
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
        s = warpgroup_mma(q_smem.index(0), kv_smem.index(st * NCH).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        for c in gl.static_range(1, NCH):
            s = warpgroup_mma(q_smem.index(c), kv_smem.index(st * NCH + c).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        toks = t0 + i * BN + cols
        s = gl.where(gl.expand_dims(toks, 0) < gl.expand_dims(limit, 1), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, 1))
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        pa = gl.convert_layout(p.to(gl.bfloat16), p_layout)
        a2 = gl.expand_dims(alpha, 1)
        v0 = PART * VCH
        acc0 = warpgroup_mma(pa, kv_smem.index(st * NCH + v0), acc0 * a2, is_async=True)
        acc1 = warpgroup_mma(pa, kv_smem.index(st * NCH + v0 + 1), acc1 * a2, is_async=True)
        acc2 = warpgroup_mma(pa, kv_smem.index(st * NCH + v0 + 2), acc2 * a2, is_async=True)
        acc3 = warpgroup_mma(pa, kv_smem.index(st * NCH + v0 + 3), acc3 * a2, is_async=True)
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2, acc3))
        mbarrier.arrive(empty.index(st))
    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    inv = gl.expand_dims(1.0 / l_safe, 1)
    optr = o_ptr + gl.expand_dims(rows, 1) * (2 * VCH * CW) + PART * VCH * CW + gl.expand_dims(cols, 0)
    gl.store(optr, acc0 * inv)
    gl.store(optr + CW, acc1 * inv)
    gl.store(optr + 2 * CW, acc2 * inv)
    gl.store(optr + 3 * CW, acc3 * inv)
    if PART == 0:
        gl.store(l_ptr + rows, gl.where(empty_row, float("-inf"), m_i + gl.log2(l_safe)))


@gluon.jit
def _mla_probe_kernel(q_desc, kv_desc, seqlens_ptr, o_part, l_part, T, H, S_Q, qk_scale, splits,
                      NCH: gl.constexpr, VCH: gl.constexpr, STAGES: gl.constexpr):
    """Program (row block, sequence b, split j): o_part (splits, B, rows, C) float32, l_part (splits, B, rows)."""
    rb = gl.program_id(0)
    b = gl.program_id(1)
    j = gl.program_id(2)
    B = gl.num_programs(1)
    n_rows = S_Q * H
    seqlen = gl.load(seqlens_ptr + b)
    n_all = gl.cdiv(seqlen, BN)
    per = gl.cdiv(n_all, splits)
    t0 = j * per * BN
    n_tiles = gl.maximum(gl.minimum(per, n_all - j * per), 0)
    row0 = rb * ROWS
    base = (j * B + b).to(gl.int64) * n_rows + row0
    o_ptr = o_part + base * (2 * VCH * CW)
    l_ptr = l_part + base

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [NCH, ROWS, CW], q_desc.layout)
    kv_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES * NCH, BN, CW], kv_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=2)
    fence_async_shared()
    limit_base = seqlen - S_Q + 1
    gl.warp_specialize([
        (_consumer, (q_smem, kv_smem, q_bar, ready, empty, o_ptr, l_ptr, limit_base, t0, n_tiles, qk_scale, H, row0,
                     0, NCH, VCH, STAGES)),
        (_consumer, (q_smem, kv_smem, q_bar, ready, empty, o_ptr, l_ptr, limit_base, t0, n_tiles, qk_scale, H, row0,
                     1, NCH, VCH, STAGES)),
        (_producer, (q_desc, kv_desc, q_smem, kv_smem, q_bar, ready, empty, b * S_Q * H + row0, b * T, t0, n_tiles,
                     NCH, STAGES)),
    ], [4, 1], [232, 24])


@gluon.jit
def _mla_probe_t_kernel(q_desc, kv_desc, seqlens_ptr, o_part, l_part, T, H, S_Q, qk_scale, splits,
                        RN: gl.constexpr, NCH: gl.constexpr, VCH: gl.constexpr, STAGES: gl.constexpr):
    """The transposed form for few rows (RN = s_q * H = 16 or 32): the tokens are the MMA's M, the rows its N, so no
    row is padded to the warpgroup MMA's 64. One warpgroup, no warp specialization: S^T (64 tokens x RN) = K Q^T,
    softmax along the tokens, O^T (C x RN) += V^T P^T with P^T through shared memory (the MMA's B operand), V^T read
    transposed from the cache tile. Program (sequence b, split j); o_part (splits, B, RN, C), l_part (splits, B, RN)."""
    b = gl.program_id(0)
    j = gl.program_id(1)
    B = gl.num_programs(0)
    seqlen = gl.load(seqlens_ptr + b)
    n_all = gl.cdiv(seqlen, BN)
    per = gl.cdiv(n_all, splits)
    t0 = j * per * BN
    n_tiles = gl.maximum(gl.minimum(per, n_all - j * per), 0)
    base = (j * B + b).to(gl.int64) * RN
    kv_row = b * T + t0

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, RN, 16])
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BN, RN], gl.bfloat16)
    q_smem = gl.allocate_shared_memory(gl.bfloat16, [NCH, RN, CW], q_desc.layout)
    kv_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES * NCH, BN, CW], kv_desc.layout)
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, RN], p_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for k in gl.static_range(STAGES):
        mbarrier.init(ready.index(k), count=1)
    fence_async_shared()

    mbarrier.expect(q_bar, NCH * q_desc.block_type.nbytes)
    for c in gl.static_range(NCH):
        tma.async_copy_global_to_shared(q_desc, [b * RN, c * CW], q_bar, q_smem.index(c))
    for i in gl.static_range(STAGES - 1):  # the first tiles in flight
        if i < n_tiles:
            mbarrier.expect(ready.index(i), NCH * kv_desc.block_type.nbytes)
            for c in gl.static_range(NCH):
                tma.async_copy_global_to_shared(kv_desc, [kv_row + i * BN, c * CW], ready.index(i),
                                                kv_smem.index(i * NCH + c))

    toks0 = gl.arange(0, BN, layout=gl.SliceLayout(1, mma))
    rows = gl.arange(0, RN, layout=gl.SliceLayout(0, mma))
    limit = seqlen - S_Q + 1 + rows // H  # (RN,)
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
        nxt = i + STAGES - 1  # refill the buffer that tile i - 1 used (its MMAs are done)
        if nxt < n_tiles:
            sn = nxt % STAGES
            mbarrier.expect(ready.index(sn), NCH * kv_desc.block_type.nbytes)
            for c in gl.static_range(NCH):
                tma.async_copy_global_to_shared(kv_desc, [kv_row + nxt * BN, c * CW], ready.index(sn),
                                                kv_smem.index(sn * NCH + c))
        st = i % STAGES
        mbarrier.wait(ready.index(st), (i // STAGES) & 1)
        s = warpgroup_mma(kv_smem.index(st * NCH), q_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        for c in gl.static_range(1, NCH):
            s = warpgroup_mma(kv_smem.index(st * NCH + c), q_smem.index(c).permute((1, 0)), s, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        toks = t0 + i * BN + toks0
        s = gl.where(gl.expand_dims(toks, 1) < gl.expand_dims(limit, 0), s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        p = gl.exp2(s - gl.expand_dims(m_safe, 0))
        l_i = l_i * alpha + gl.sum(p, axis=0)
        m_i = m_new
        p_smem.store(p.to(gl.bfloat16))
        fence_async_shared()
        gl.thread_barrier()
        a2 = gl.expand_dims(alpha, 0)
        kv0 = st * NCH
        acc0 = warpgroup_mma(kv_smem.index(kv0).permute((1, 0)), p_smem, acc0 * a2, is_async=True)
        acc1 = warpgroup_mma(kv_smem.index(kv0 + 1).permute((1, 0)), p_smem, acc1 * a2, is_async=True)
        acc2 = warpgroup_mma(kv_smem.index(kv0 + 2).permute((1, 0)), p_smem, acc2 * a2, is_async=True)
        acc3 = warpgroup_mma(kv_smem.index(kv0 + 3).permute((1, 0)), p_smem, acc3 * a2, is_async=True)
        acc4 = warpgroup_mma(kv_smem.index(kv0 + 4).permute((1, 0)), p_smem, acc4 * a2, is_async=True)
        acc5 = warpgroup_mma(kv_smem.index(kv0 + 5).permute((1, 0)), p_smem, acc5 * a2, is_async=True)
        acc6 = warpgroup_mma(kv_smem.index(kv0 + 6).permute((1, 0)), p_smem, acc6 * a2, is_async=True)
        acc7 = warpgroup_mma(kv_smem.index(kv0 + 7).permute((1, 0)), p_smem, acc7 * a2, is_async=True)
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = warpgroup_mma_wait(
            num_outstanding=0, deps=(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7))
        gl.thread_barrier()  # every warp is past this tile's MMAs before its buffer and p_smem are rewritten
    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    inv = gl.expand_dims(1.0 / l_safe, 0)
    cw = gl.arange(0, CW, layout=gl.SliceLayout(1, mma))
    optr = o_part + (base + gl.expand_dims(rows, 0)) * (VCH * CW) + gl.expand_dims(cw, 1)  # (CW, RN): out^T
    gl.store(optr, acc0 * inv)
    gl.store(optr + CW, acc1 * inv)
    gl.store(optr + 2 * CW, acc2 * inv)
    gl.store(optr + 3 * CW, acc3 * inv)
    gl.store(optr + 4 * CW, acc4 * inv)
    gl.store(optr + 5 * CW, acc5 * inv)
    gl.store(optr + 6 * CW, acc6 * inv)
    gl.store(optr + 7 * CW, acc7 * inv)
    gl.store(l_part + base + rows, gl.where(empty_row, float("-inf"), m_i + gl.log2(l_safe)))


def probe_decode_t(q, kv, seqlens, C, scale, splits, stages=2):
    """The transposed form (``_mla_probe_t_kernel``): s_q * H = 16 or 32, C = 512, contiguous bf16 cache."""
    B, s_q, H, D = q.shape
    T = kv.shape[1]
    rows = s_q * H
    assert rows in (16, 32) and D % 64 == 0 and C == 8 * 64 and kv.dtype == torch.bfloat16
    q_desc = TensorDescriptor.from_tensor(q.reshape(B * rows, D), [rows, 64],
                                          gl.NVMMASharedLayout.get_default_for([rows, 64], gl.bfloat16))
    kv_desc = TensorDescriptor.from_tensor(kv.reshape(B * T, D), [64, 64], _layout())
    o_part = torch.empty(splits, B, rows, C, dtype=torch.float32, device=q.device)
    l_part = torch.empty(splits, B, rows, dtype=torch.float32, device=q.device)
    _mla_probe_t_kernel[(B, splits)](
        q_desc, kv_desc, seqlens, o_part, l_part, T, H, s_q, scale * 1.4426950408889634, splits,
        RN=rows, NCH=D // 64, VCH=C // 64, STAGES=stages, num_warps=4)
    return o_part, l_part


def _layout():
    return gl.NVMMASharedLayout.get_default_for([64, 64], gl.bfloat16)


def probe_decode(q, kv, seqlens, C, scale, splits, stages=2):
    """(out (B, s_q, H, C) float32, lse (B, H, s_q)) for a contiguous bf16 cache kv (B, T, C + R); H * s_q a multiple
    of 64, C + R a multiple of 64, C = 8 * 64 (two consumers of four 64-wide chunks)."""
    B, s_q, H, D = q.shape
    T = kv.shape[1]
    assert (s_q * H) % 64 == 0 and D % 64 == 0 and C == 8 * 64 and kv.dtype == torch.bfloat16
    rows = s_q * H
    q2 = q.reshape(B * rows, D)
    kv2 = kv.reshape(B * T, D)
    q_desc = TensorDescriptor.from_tensor(q2, [64, 64], _layout())
    kv_desc = TensorDescriptor.from_tensor(kv2, [64, 64], _layout())
    o_part = torch.empty(splits, B, rows, C, dtype=torch.float32, device=q.device)
    l_part = torch.empty(splits, B, rows, dtype=torch.float32, device=q.device)
    _mla_probe_kernel[(rows // 64, B, splits)](
        q_desc, kv_desc, seqlens, o_part, l_part, T, H, s_q, scale * 1.4426950408889634, splits,
        NCH=D // 64, VCH=C // 64 // 2, STAGES=stages, num_warps=4)
    return o_part, l_part


def merge(o_part, l_part, B, s_q, H):
    """The splits' partials merged (torch): out (B, s_q, H, C) float32, lse (B, H, s_q) natural log."""
    m = l_part.amax(0)
    w = torch.exp2(l_part - torch.where(torch.isinf(m), 0.0, m))
    w = torch.nan_to_num(w)
    den = w.sum(0)
    out = (w.unsqueeze(-1) * o_part).sum(0) / den.clamp_min(1e-30).unsqueeze(-1)
    lse = (m + torch.log2(den)) * math.log(2)
    C = o_part.shape[-1]
    return out.view(B, s_q, H, C), lse.view(B, s_q, H).transpose(1, 2)


def main() -> None:
    if hasattr(tma, "async_load"):  # later releases renamed the TMA copies this file is written against
        sys.exit("probe_mla_gluon.py: written against Triton 3.6's Gluon API (tma.async_copy_global_to_shared)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import copy_bandwidth_gbs, graph_ms, matmul_tflops, metadata
    from minids.kernels.mla_decode import mla_decode

    from minids.attention import mla_decode_ref

    torch.manual_seed(0)
    C, R = 512, 64
    print(metadata(), flush=True)
    copy = copy_bandwidth_gbs()
    print(f"bf16 matmul {matmul_tflops():.0f} TFLOP/s, copy {copy:.0f} GB/s", flush=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = [  # (B, H, mean length, s_q, variable lengths): small checks first, then bench/mla_decode.py's shapes
        (2, 16, 200, 1, True), (4, 16, 1000, 2, True), (2, 64, 200, 1, True), (4, 128, 1000, 2, True),
        (32, 16, 1024, 1, False), (32, 16, 1024, 2, False), (32, 16, 4096, 1, False), (128, 16, 4096, 1, False),
        (128, 16, 4096, 2, False), (128, 16, 16384, 1, False),
        (32, 128, 1024, 1, False), (32, 128, 4096, 1, False), (128, 128, 1024, 1, False),
        (128, 128, 4096, 1, False), (32, 128, 4096, 2, False), (128, 128, 4096, 1, True), (32, 128, 16384, 1, False),
    ]
    for B, H, L, s_q, var in cases:
        T = -(-2 * L // 64) * 64 if var else L
        q = torch.randn(B, s_q, H, C + R, device="cuda", dtype=torch.bfloat16)
        kv = torch.randn(B, T, C + R, device="cuda", dtype=torch.bfloat16)
        if var:
            lens = torch.normal(float(L), L / 2, (B,)).clamp(s_q, 2 * L).round().to(torch.int32).cuda()
        else:
            lens = torch.full((B,), L, dtype=torch.int32, device="cuda")
        scale = (C + R) ** -0.5
        rows = s_q * H
        transposed = rows <= 32
        per_seq = 1 if transposed else rows // 64  # programs a split of a sequence
        splits = max(1, sms // (B * per_seq))  # one wave of programs where the batch is small
        run = probe_decode_t if transposed else probe_decode
        name = f"B={B} H={H} len={L}{'~' if var else ''} s_q={s_q} {'T' if transposed else 'W'} splits={splits}"
        try:
            o_part, l_part = run(q, kv, lens, C, scale, splits)
            out, lse = merge(o_part, l_part, B, s_q, H)
            if B * L * H <= 32 * 4096 * 128:
                want, want_lse = mla_decode_ref(q.float(), kv.float(), lens, C, scale, causal=True)
                err = ((out - want.float()).abs().amax() / want.float().abs().amax()).item()
                lerr = (lse - want_lse).abs().amax().item()
            else:
                err = lerr = float("nan")
            ms = graph_ms(lambda q=q, kv=kv, lens=lens, sp=splits, run=run, sc=scale: run(q, kv, lens, C, sc, sp))
            ms_tri = graph_ms(lambda q=q, kv=kv, lens=lens, sc=scale: mla_decode(q, kv, lens, C, sc, causal=True))
        except Exception as e:  # noqa: BLE001 - a probe: report and go on
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        tokens = int(lens.sum())
        flop = 2 * s_q * tokens * H * (2 * C + R)
        nbytes = (tokens * (C + R) + B * rows * (2 * C + R)) * 2
        print(f"{name}: rel err {err:.2e} lse err {lerr:.2e}; probe {ms * 1e3:7.1f} us {flop / ms / 1e9:5.0f} TFLOP/s "
              f"{nbytes / ms / 1e6 / copy:4.0%} of copy; mla_decode {ms_tri * 1e3:7.1f} us {flop / ms_tri / 1e9:5.0f} "
              f"TFLOP/s {nbytes / ms_tri / 1e6 / copy:4.0%} of copy", flush=True)


if __name__ == "__main__":
    main()
