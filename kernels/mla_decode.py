"""MLA decoding over the compressed latent cache: a split-KV Triton kernel and its combine step.

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
  loaded once for all the heads of the program and used as both key and value. With many heads (V3's 128,
  or MTP's s_q = 2) this is tensor-core bound; BLOCK_M = 64 is the smallest Hopper warpgroup MMA.
- Split-KV. The cache of each sequence is cut into pieces of ``split_len`` tokens that run as separate
  programs; each writes a normalised partial output and its log-sum-exp, and the combine kernel merges
  them (out = sum_j exp(lse_j - lse) out_j). Small batches and few heads still fill the 132 SMs, and
  uneven lengths are spread over programs of equal size. With one split the first kernel writes the
  result directly and the combine is skipped (no fp32 round trip).
- Online softmax in base 2 (the scale is multiplied by log2 e once), with a guard for rows that have
  seen no token yet (their running max is -inf).
- Two cache layouts, one loop: contiguous (B, T, .) rows are addressed as page b, token t; paged caches
  look each token's page up in the block table, so any page size works. The latent and RoPE parts are
  two pointers with their own strides: ``KVCache``'s separate c_kv and k_pe tensors are read in place,
  and a single (.., C + R) cache is passed as two views of itself.
- The split count comes from the static shapes only (batch, heads, the cache's capacity), never from
  the lengths on the device, so a decoding step does not wait for the host (and can be graph-captured).

Preconditions: q, kv_cache, pe_cache of one floating dtype (bf16, fp16 or fp32; q is cast to the cache's
dtype), last dimension contiguous; cache_seqlens int32/int64 on the same device, each in [0, capacity];
block_table int32. fp32 runs its dots in IEEE fp32 (not tf32) so fp32 models decode exactly.

Shapes: B batch, s_q new tokens per sequence, H heads, C kv_lora_rank (head_dim_v), R rope dim,
T cache capacity, M = s_q * H rows, N tokens per tile.
"""

from __future__ import annotations

import functools
import math

import torch
from minids.kernels import HAVE_TRITON, INTERPRET

__all__ = ["mla_decode", "pick_num_splits"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

_LOG2E = 1.4426950408889634
_SPLIT_ALIGN = 64  # split lengths are multiples of every BLOCK_N, so tiles never straddle two splits


def pick_num_splits(batch: int, row_blocks: int, rows: int, capacity: int, C: int, R: int, elem: int, n_sm: int) -> int:
    """How many pieces to cut each sequence's cache into, from static sizes only.

    1. Fill the GPU in whole waves: with base = batch * row_blocks programs per split, take the smallest
       split count whose wave efficiency (programs / (waves * n_sm)) is within 85% of the best
       (flash-attention's rule); a base of 0.8 waves or more needs no split.
    2. More, shorter pieces balance uneven lengths; allow up to 4x more while the fp32 partial results
       (written once and read once by the combine) stay under 5% of the cache bytes.
    Each piece keeps at least 128 tokens, and there are at most 64.
    """
    max_splits = max(1, min(64, capacity // 128))
    base = batch * row_blocks
    if base >= 0.8 * n_sm or max_splits == 1:
        s = 1
    else:
        effs = []
        for s in range(1, max_splits + 1):
            waves = base * s / n_sm
            effs.append(waves / math.ceil(waves))
        s = next(i + 1 for i, e in enumerate(effs) if e >= 0.85 * max(effs))
    partial_bytes = rows * C * 4 * 2  # one split's fp32 partial output of one sequence, written and read
    budget = int(0.05 * capacity * (C + R) * elem / partial_bytes)
    k = max(1, min(4, budget // s))
    return max(1, min(max_splits, s * k))


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["H", "S_Q"])
    def _mla_decode_split(
        Q, KV, PE, SEQLENS, BLOCK_TABLE, O, LSE,
        stride_qb, stride_qs, stride_qh,
        stride_kvp, stride_kvt, stride_pep, stride_pet,
        stride_btb,
        stride_ob, stride_os, stride_oh, stride_on,
        stride_lb, stride_ls, stride_lh, stride_ln,
        qk_scale, split_len, capacity, H, S_Q,
        C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr,
        CAUSAL: tl.constexpr, FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """One program: BLOCK_M rows (query token, head) of sequence b over cache tokens of one split.

        Grid (row blocks, splits, B): the row blocks of one (split, sequence) are launched next to each
        other, so the cache tiles they all read are served from L2 after the first. FINAL: one split,
        write out (in its dtype) and lse; otherwise the normalised fp32 partial and its lse.
        """
        pid_m = tl.program_id(0)
        split = tl.program_id(1)
        b = tl.program_id(2)
        seqlen = tl.minimum(tl.load(SEQLENS + b).to(tl.int32), capacity)  # never read past the cache
        start = split * split_len
        end = tl.minimum(start + split_len, seqlen)
        if not FINAL:  # noqa: SIM102 (FINAL is a compile-time constant, start >= end a run-time value)
            if start >= end:  # past this sequence's length: nothing to do, and the combine will not read it
                return
        # (FINAL: an empty sequence runs no iteration and writes out = 0, lse = -inf below)

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (M,) row = i * H + h
        row_ok = rows < S_Q * H
        qi = rows // H
        hh = rows % H
        offs_c = tl.arange(0, BLOCK_C)
        offs_r = tl.arange(0, BLOCK_R)
        c_ok = offs_c < C
        r_ok = offs_r < R
        b64 = b.to(tl.int64)

        q_ptr = Q + b64 * stride_qb + qi * stride_qs + hh * stride_qh  # (M,) pointers to each row
        q_c = tl.load(q_ptr[:, None] + offs_c[None, :], mask=row_ok[:, None] & c_ok[None, :], other=0.0)
        q_r = tl.load(q_ptr[:, None] + C + offs_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        q_c = q_c.to(KV.dtype.element_ty)  # (M, C)
        q_r = q_r.to(KV.dtype.element_ty)  # (M, R)

        if CAUSAL:
            limit = seqlen - S_Q + 1 + qi  # (M,) query i sees t < len - s_q + 1 + i
        else:
            limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
        kv_seq = KV + b64 * stride_kvp  # contiguous cache: sequence b's rows (stride_kvt * capacity < 2**31)
        pe_seq = PE + b64 * stride_pep
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of 2^(s - m)
        acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)  # running sum of p * c_kv

        for n0 in range(start, end, BLOCK_N):
            toks = n0 + tl.arange(0, BLOCK_N)  # (N,)
            t_ok = toks < end
            if PAGED:
                page = tl.load(BLOCK_TABLE + b64 * stride_btb + toks // PAGE, mask=t_ok, other=0).to(tl.int64)
                kv_ptr = KV + page * stride_kvp + (toks % PAGE) * stride_kvt  # (N,) row pointers
                pe_ptr = PE + page * stride_pep + (toks % PAGE) * stride_pet
            else:  # 32-bit offsets from the sequence's base pointer: fewer registers than 64-bit row offsets
                kv_ptr = kv_seq + toks * stride_kvt
                pe_ptr = pe_seq + toks * stride_pet
            kv = tl.load(kv_ptr[:, None] + offs_c[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            pe = tl.load(pe_ptr[:, None] + offs_r[None, :], mask=t_ok[:, None] & r_ok[None, :], other=0.0)

            s = tl.dot(q_c, tl.trans(kv), input_precision=DOT_PRECISION)  # (M, N)
            s = tl.dot(q_r, tl.trans(pe), s, input_precision=DOT_PRECISION)
            s = s * qk_scale
            s = tl.where(toks[None, :] < limit[:, None], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing: keep p = 0
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])  # (M, N)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv.dtype), kv, acc, input_precision=DOT_PRECISION)  # (M, C): the value is c_kv
            m_i = m_new

        empty = l_i == 0.0
        l_safe = tl.where(empty, 1.0, l_i)
        out = acc / l_safe[:, None]  # 0 for a row that saw nothing
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # natural log
        o_ptr = O + b64 * stride_ob + qi * stride_os + hh * stride_oh + split * stride_on  # (M,)
        tl.store(o_ptr[:, None] + offs_c[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])
        l_ptr = LSE + b64 * stride_lb + qi * stride_ls + hh * stride_lh + split * stride_ln
        tl.store(l_ptr, lse, mask=row_ok)

    @triton.jit
    def _mla_decode_combine(
        OP, LP, SEQLENS, O, LSE,
        stride_pb, stride_ps, stride_ph, stride_pn,
        stride_lpb, stride_lps, stride_lph, stride_lpn,
        stride_ob, stride_os, stride_oh,
        stride_lb, stride_ls, stride_lh,
        split_len, capacity, H,
        C: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (row, sequence): out = sum_j w_j out_j / sum_j w_j with w_j = exp(lse_j - max lse),
        over the splits that ran (those starting before the sequence's length), and lse = max + log sum_j w_j."""
        row = tl.program_id(0)
        b = tl.program_id(1)
        qi = row // H
        hh = row % H
        b64 = b.to(tl.int64)
        seqlen = tl.minimum(tl.load(SEQLENS + b).to(tl.int32), capacity)
        n_splits = tl.cdiv(seqlen, split_len)
        offs_s = tl.arange(0, BLOCK_S)
        lp = LP + b64 * stride_lpb + qi * stride_lps + hh * stride_lph
        lse_j = tl.load(lp + offs_s * stride_lpn, mask=offs_s < n_splits, other=float("-inf"))  # (S,)
        m = tl.max(lse_j, 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(tl.exp(lse_j - m_safe), 0)
        offs_c = tl.arange(0, BLOCK_C)
        c_ok = offs_c < C
        op = OP + b64 * stride_pb + qi * stride_ps + hh * stride_ph
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for j in range(n_splits):
            w = tl.exp(tl.load(lp + j * stride_lpn) - m_safe)
            acc += w * tl.load(op + j * stride_pn + offs_c, mask=c_ok, other=0.0)
        empty = denom == 0.0
        out = acc / tl.where(empty, 1.0, denom)
        o_ptr = O + b64 * stride_ob + qi * stride_os + hh * stride_oh
        tl.store(o_ptr + offs_c, out.to(O.dtype.element_ty), mask=c_ok)
        tl.store(LSE + b64 * stride_lb + qi * stride_ls + hh * stride_lh, tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, denom))))

    # Tile shapes (BLOCK_N tokens, warps, pipeline stages) per BLOCK_M, two candidates each so tuning takes
    # seconds per shape. Resource use of the candidates, compiled for sm_90 (C=512, R=64, bf16):
    #   M=16, 4 warps: 32 x 3 stages 91 KB shared, 187 registers; 64 x 2 stages 92 KB, 186: two programs per SM.
    #   M=32, 8 warps (4 warps spill): 32 x 3 110 KB, 211 registers; 64 x 2 112 KB, 242.
    #   M=64, 8 warps (an fp32 64 x 512 accumulator is 128 registers a thread): 32 x 2 144 KB, 64 x 2 216 KB
    #   of the 227 KB (the query tile alone is 72 KB); both spill ~140-320 bytes a thread, which the
    #   autotuner weighs. The MMA is Hopper's warpgroup MMA (M=64), the loads are cp.async pipelined.
    _CONFIGS = {
        16: [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
             triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)],
        32: [triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
             triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2)],
        64: [triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=2),
             triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2)],
    }
    _KEY = ["C", "R", "PAGED", "FINAL", "CAUSAL"]

    def _bench(fn, quantiles=None):
        return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)

    _TUNED = {m: triton.autotune(configs=c, key=_KEY, do_bench=_bench)(_mla_decode_split) for m, c in _CONFIGS.items()}


def _check(q, kv_cache, cache_seqlens, head_dim_v, block_table, pe_cache):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, s_q, heads, C + R), got shape {tuple(q.shape)}")
    B, s_q, H, D = q.shape
    C = head_dim_v
    R = D - C
    if R < 0:
        raise ValueError(f"q's last dimension {D} is smaller than head_dim_v={C}")
    if kv_cache.dim() != 3:
        raise ValueError(f"kv_cache must be (batch, tokens, width) or (pages, page_size, width), got {tuple(kv_cache.shape)}")
    want = C if pe_cache is not None else C + R
    if kv_cache.shape[-1] != want:
        raise ValueError(f"kv_cache's last dimension is {kv_cache.shape[-1]}, expected {want} (C={C}, R={R}"
                         f"{', the RoPE part in pe_cache' if pe_cache is not None else ''})")
    if pe_cache is not None and (pe_cache.shape[:2] != kv_cache.shape[:2] or pe_cache.shape[-1] != R):
        raise ValueError(f"pe_cache must be {tuple(kv_cache.shape[:2]) + (R,)}, got {tuple(pe_cache.shape)}")
    if block_table is None and kv_cache.shape[0] != B:
        raise ValueError(f"a contiguous kv_cache needs one row per sequence: {kv_cache.shape[0]} rows, batch {B}")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != B):
        raise ValueError(f"block_table must be (batch={B}, max_pages), got {tuple(block_table.shape)}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be (batch={B},), got {tuple(cache_seqlens.shape)}")
    if kv_cache.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"the cache must be bf16, fp16 or fp32, got {kv_cache.dtype}")
    for name, t in (("q", q), ("kv_cache", kv_cache), ("pe_cache", pe_cache)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {t.stride()}")
    if pe_cache is not None and pe_cache.dtype != kv_cache.dtype:
        raise ValueError(f"pe_cache ({pe_cache.dtype}) and kv_cache ({kv_cache.dtype}) must share a dtype")
    return B, s_q, H, C, R


def mla_decode(
    q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor, head_dim_v: int, scale: float, *,
    causal: bool = True, block_table: torch.Tensor | None = None, pe_cache: torch.Tensor | None = None,
    num_splits: int | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the latent cache (Triton); see ``minids.attention.mla_decode_ref`` for the
    arguments and the result: out (B, s_q, H, C) in q.dtype, lse (B, H, s_q) float32.

    num_splits: cut each sequence's cache into this many pieces (the capacity T, or max_pages * page_size,
    divided evenly, rounded up to 64 tokens); None picks it from the static shapes (``pick_num_splits``).
    """
    if not HAVE_TRITON:
        raise RuntimeError("minids.kernels.mla_decode needs Triton: pip install triton, or use minids.mla_decode_ref")
    B, s_q, H, C, R = _check(q, kv_cache, cache_seqlens, head_dim_v, block_table, pe_cache)
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
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    row_blocks = triton.cdiv(rows, block_m)
    block_c = max(16, triton.next_power_of_2(C))
    block_r = max(16, triton.next_power_of_2(R))
    if num_splits is None:
        n_sm = _num_sms(dev.index if dev.index is not None else torch.cuda.current_device()) if q.is_cuda else 8
        num_splits = pick_num_splits(B, row_blocks, rows, capacity, C, R, kv.element_size(), n_sm)
    split_len = triton.cdiv(triton.cdiv(max(capacity, 1), max(1, num_splits)), _SPLIT_ALIGN) * _SPLIT_ALIGN
    n_split = max(1, triton.cdiv(capacity, split_len))
    final = n_split == 1

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
    # the split results; under the interpreter (the tests) they start as NaN, so a read of a piece that no
    # program wrote shows up in the output
    scratch = torch.full if INTERPRET else torch.empty
    if final:
        o_buf, l_buf = out, lse
        o_strides = (*out.stride()[:3], 0)
        l_strides = (lse.stride(0), lse.stride(2), lse.stride(1), 0)
    else:
        fill = (float("nan"),) if INTERPRET else ()
        o_buf = scratch((B, s_q, H, n_split, C), *fill, dtype=torch.float32, device=dev)
        l_buf = scratch((B, s_q, H, n_split), *fill, dtype=torch.float32, device=dev)
        o_strides = o_buf.stride()[:4]
        l_strides = l_buf.stride()
    args = (
        q, kv, pe, seqlens, table, o_buf, l_buf,
        q.stride(0), q.stride(1), q.stride(2),
        kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1),
        table.stride(0) if paged else 0,
        *o_strides, *l_strides,
        scale * _LOG2E, split_len, capacity, H, s_q,
    )
    meta = {"C": C, "R": R, "BLOCK_C": block_c, "BLOCK_R": block_r, "BLOCK_M": block_m, "PAGE": page,
            "PAGED": paged, "CAUSAL": causal, "FINAL": final,
            "DOT_PRECISION": "ieee" if kv.dtype == torch.float32 else "tf32"}
    grid = (row_blocks, n_split, B)
    if INTERPRET or kv.dtype == torch.float32:
        # the interpreter runs one fixed tile (no tuning); fp32 takes the FMA path with small tiles
        _mla_decode_split[grid](*args, **meta, BLOCK_N=16 if INTERPRET else 32, num_warps=4, num_stages=1)
    else:
        _TUNED[block_m][grid](*args, **meta)

    if not final:
        _mla_decode_combine[(rows, B)](
            o_buf, l_buf, seqlens, out, lse,
            *o_buf.stride()[:4], *l_buf.stride(),
            *out.stride()[:3], lse.stride(0), lse.stride(2), lse.stride(1),
            split_len, capacity, H,
            C=C, BLOCK_C=block_c, BLOCK_S=max(2, triton.next_power_of_2(n_split)), num_warps=4,
        )
    return out, lse
