"""Triton kernels for DeepSeek-V3's FP8 recipe: fine-grained quantization and the block-scaled FP8 GEMM.

Each public function has the signature and the result of its pure-PyTorch reference in ``minids.fp8``
(``act_quant``, ``act_quant_t``, ``weight_quant``, ``weight_dequant``, ``fp8_gemm``); the tests compare
them on fresh random inputs, on the CPU through Triton's interpreter and on an H200.

Quantization kernels are memory-bound: each reads its input once and writes one byte per element plus
one float32 scale per 128 elements. What they do to reach the copy rate:
- one program quantizes a (BLOCK_M x 128) tile, so a row's scale comes from one register reduction and
  loads stay 128 elements (256 B of bf16) wide per row;
- ``act_quant_t`` reads (128 tokens x BLOCK_K) tiles row-major and writes them transposed, so the
  transpose costs no extra pass; ``act_quant_both`` writes the 1x128 and the 128x1 quantizations of the
  same tensor from one read (the FP8 linear's backward needs both of dy);
- ``weight_quant`` writes the transposed copy in the same pass when asked (Dgrad reads W^T K-major).

The GEMM C = (A a_s)(B b_s)^T takes A (M, K) FP8 with 1x128 scales a_s (M, ceil(K/128)) and B (N, K) FP8
with either 128x128 block scales (weights: b_s (ceil(N/128), ceil(K/128))) or 1x128 scales (the Wgrad
form, both operands quantized along the token dim: b_s (N, ceil(K/128))). It accumulates one 128-wide K
step on the tensor cores, multiplies that partial product by a_s[m] * b_s[n] and adds it to a float32
accumulator (V3P 3.3.2's promotion every N_C = 128). Tails in M, N and K are masked, never wrapped.
Autotuning is keyed on (M bucket, N, K): the official kernel keys on (N, K) alone, so the first M it
sees picks the tiles for every other M. Small M uses narrow tiles and split-K so that all 132 SMs work.

Exact rounding: x / s is taken in float64 and rounded once to float32 (the correctly rounded quotient), then
rounded to the FP8 grid with float32 bit arithmetic (round to nearest even), and only then converted, so the
result is bit-identical to the reference on the GPU and in the interpreter. Why each step: the interpreter's
float32 -> FP8 conversion drops the carry into the exponent (127.8 becomes 64 in E4M3); on the H200, Triton's
``div_rn`` differed from the correctly rounded quotient in about 1 of 2000 elements. It costs speed (rates with
and without it: bench/results/kernels_notes.md).
"""

from __future__ import annotations

import math
import os

import torch
from minids.kernels import HAVE_TRITON, INTERPRET

from minids.fp8 import _gemm_check

__all__ = ["act_quant", "act_quant_both", "act_quant_t", "fp8_gemm", "weight_dequant", "weight_quant"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

_FMT = {"e4m3": (torch.float8_e4m3fn, 448.0, 3, -6), "e5m2": (torch.float8_e5m2, 57344.0, 2, -14)}
# dtype, largest finite value, mantissa bits, smallest normal exponent
_AMAX_FLOOR = 1e-4  # as minids.fp8 (the official act_quant's clamp)


def _fmt(fmt: str):
    if fmt not in _FMT:
        raise ValueError(f"fmt={fmt!r}: one of {', '.join(_FMT)}")
    return _FMT[fmt]


if HAVE_TRITON:

    @triton.jit
    def _round_to_grid(y, MBITS: tl.constexpr, EMIN: tl.constexpr):
        """Round float32 y (already within the format's range) to the FP8 grid, nearest even, in float32."""
        bits = y.to(tl.uint32, bitcast=True)
        shift: tl.constexpr = 23 - MBITS
        half: tl.constexpr = (1 << (shift - 1)) - 1
        keep: tl.constexpr = 0xFFFFFFFF - ((1 << shift) - 1)
        bits = (bits + half + ((bits >> shift) & 1)) & keep  # a carry moves into the exponent, as it should
        normal = bits.to(tl.float32, bitcast=True)
        magic: tl.constexpr = 1.5 * 2.0 ** (23 + EMIN - MBITS)  # adding it rounds to the subnormal step
        sub = (tl.abs(y) + magic) - magic
        sign = y.to(tl.uint32, bitcast=True) & 0x80000000  # keeps the sign of values that round to zero (-0.0)
        sub = (sub.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(y) < 2.0**EMIN, sub, normal)

    @triton.jit
    def _scale_of(amax, FMAX: tl.constexpr, UE8M0: tl.constexpr):
        """amax / FMAX (amax floored at 1e-4), optionally the exact power of two at or above it. The quotient is
        taken in float64 and rounded once to float32: the correctly rounded float32 quotient on every device (one
        division per 128 elements; the reference computes it the same way)."""
        s = (tl.maximum(amax, 1e-4).to(tl.float64) / FMAX).to(tl.float32)
        if UE8M0:
            bits = s.to(tl.uint32, bitcast=True)
            up = (bits & 0x7FFFFF) != 0
            s = ((bits & 0x7F800000) + tl.where(up, 0x800000, 0)).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _quantize(x, s, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr):
        # x / s correctly rounded: float64 quotient rounded once to float32 (H200: div_rn differed from it in
        # about 1 of 2000 quotients)
        y = (x.to(tl.float64) / s.to(tl.float64)).to(tl.float32)
        y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
        return _round_to_grid(y, MBITS, EMIN)  # exactly representable: the FP8 conversion after it is exact

    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """q[m, k] = x[m, k] / s[m, k // BLOCK]; one program: BLOCK_M rows x one BLOCK-wide tile."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_of(tl.max(tl.abs(x), axis=1), FMAX, UE8M0)  # (BLOCK_M,)
        q = _quantize(x, s[:, None], FMAX, MBITS, EMIN)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows64 * stride_sm + pid_k, s, mask=rows < M)

    @triton.jit
    def _act_quant_t_kernel(
        x_ptr, xs_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xsm, stride_qk, stride_sk,
        HAS_IN_SCALE: tl.constexpr, IN_BLOCK: tl.constexpr,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """x (M, K) -> q (K, M) in BLOCK x 1 tiles along M: one program reads (BLOCK tokens x BLOCK_K) and writes
        it transposed. With HAS_IN_SCALE, x is FP8 with 1 x IN_BLOCK scales xs and is dequantized on load."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)  # tokens
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_IN_SCALE:
            xs = tl.load(xs_ptr + rows64[:, None] * stride_xsm + (cols // IN_BLOCK)[None, :], mask=mask, other=0.0)
            x = x * xs
        s = _scale_of(tl.max(tl.abs(x), axis=0), FMAX, UE8M0)  # (BLOCK_K,): one per column over BLOCK tokens
        q = _quantize(x, s[None, :], FMAX, MBITS, EMIN)
        cols64 = cols.to(tl.int64)
        q_ptrs = q_ptr + cols64[None, :] * stride_qk + rows[:, None]
        tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + cols64 * stride_sk + pid_m, s, mask=cols < K)

    @triton.jit
    def _act_quant_both_kernel(
        x_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_qtk, stride_stk,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One read of a (BLOCK x BLOCK) tile of x (M, K); writes its 1 x BLOCK quantization into q (M, K) and its
        BLOCK x 1 quantization, transposed, into qt (K, M)."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK + tl.arange(0, BLOCK)
        cols = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        ax = tl.abs(x)
        s = _scale_of(tl.max(ax, axis=1), FMAX, UE8M0)
        q = _quantize(x, s[:, None], FMAX, MBITS, EMIN)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows64 * stride_sm + pid_k, s, mask=rows < M)
        st = _scale_of(tl.max(ax, axis=0), FMAX, UE8M0)
        qt = _quantize(x, st[None, :], FMAX, MBITS, EMIN)
        tl.store(qt_ptr + cols64[None, :] * stride_qtk + rows[:, None], qt.to(qt_ptr.dtype.element_ty), mask=mask)
        tl.store(st_ptr + cols64 * stride_stk + pid_m, st, mask=cols < K)

    @triton.jit
    def _weight_quant_kernel(
        w_ptr, q_ptr, qt_ptr, s_ptr, O, I, stride_wo, stride_qo, stride_qti, stride_so,
        WRITE_T: tl.constexpr,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One (BLOCK x BLOCK) block of w (O, I): its scale, its FP8 values, and optionally the transposed copy."""
        pid_o, pid_i = tl.program_id(0), tl.program_id(1)
        rows = pid_o * BLOCK + tl.arange(0, BLOCK)
        cols = pid_i * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < O)[:, None] & (cols < I)[None, :]
        rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
        w = tl.load(w_ptr + rows64[:, None] * stride_wo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_of(tl.max(tl.max(tl.abs(w), axis=1), axis=0), FMAX, UE8M0)
        q = _quantize(w, s, FMAX, MBITS, EMIN).to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + rows64[:, None] * stride_qo + cols[None, :], q, mask=mask)
        if WRITE_T:
            tl.store(qt_ptr + cols64[None, :] * stride_qti + rows[:, None], q, mask=mask)
        tl.store(s_ptr + pid_o * stride_so + pid_i, s)

    @triton.jit
    def _weight_dequant_kernel(
        q_ptr, s_ptr, w_ptr, O, I, stride_qo, stride_so, stride_wo, BLOCK: tl.constexpr,
    ):
        pid_o, pid_i = tl.program_id(0), tl.program_id(1)
        rows = pid_o * BLOCK + tl.arange(0, BLOCK)
        cols = pid_i * BLOCK + tl.arange(0, BLOCK)
        mask = (rows < O)[:, None] & (cols < I)[None, :]
        rows64 = rows.to(tl.int64)
        q = tl.load(q_ptr + rows64[:, None] * stride_qo + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = tl.load(s_ptr + pid_o * stride_so + pid_i)
        tl.store(w_ptr + rows64[:, None] * stride_wo + cols[None, :], (q * s).to(w_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- wrappers
def _check_block(block: int) -> None:
    if block != 128 and not (block >= 16 and block & (block - 1) == 0):
        raise ValueError(f"block={block}: the kernels take a power of two >= 16 (DeepSeek-V3 uses 128)")


def _buf(out, i: int, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Output i: from ``out`` (a tuple of preallocated tensors, checked) or a new empty tensor."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    t = out[i]
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"out[{i}]: expected a contiguous {dtype} tensor of shape {tuple(shape)}, got {t.dtype} "
                         f"{tuple(t.shape)}")
    return t


def _tokens_by_features(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as a 2-D (tokens, features) tensor with unit stride along features, or a one-line error."""
    if x.dim() != 2:
        raise ValueError(f"{name} needs a 2-D (tokens, features) tensor, got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def _flags(fmt: str, ue8m0: bool) -> dict:
    _, fmax, mbits, emin = _fmt(fmt)
    return {"FMAX": fmax, "MBITS": mbits, "EMIN": emin, "UE8M0": bool(ue8m0)}


def act_quant(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, out=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block tiles along the last dim. x: (..., K) -> fp8 (..., K), scales (..., ceil(K/b)) float32.
    Same contract as ``minids.fp8.act_quant``; ``out``: optional preallocated (q (M, K), s (M, nb)), M = x's rows
    (every kernel here takes one)."""
    _check_block(block)
    dtype = _fmt(fmt)[0]
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, nb = x2.shape[0], math.ceil(K / block)
    q = _buf(out, 0, (M, K), dtype, x.device)
    s = _buf(out, 1, (M, nb), torch.float32, x.device)
    if M and K:
        BLOCK_M = 16 if block <= 128 else 4
        grid = (triton.cdiv(M, BLOCK_M), nb)
        _act_quant_kernel[grid](
            x2, q, s, M, K, x2.stride(0), q.stride(0), s.stride(0), **_flags(fmt, ue8m0),
            BLOCK_M=BLOCK_M, BLOCK=block, num_warps=4,
        )
    return q.view(*x.shape), s.view(*x.shape[:-1], nb)


def act_quant_t(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False,
    in_scale: torch.Tensor | None = None, in_block: int = 128, out=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """block x 1 tiles along the token dim, written transposed. x: (M, K) -> fp8 x^T (K, M), scales (K, ceil(M/b)).
    Same contract as ``minids.fp8.act_quant_t``; with ``in_scale`` (M, ceil(K/in_block)), x is FP8 and is
    dequantized on load (``act_quant_t(act_dequant(x, in_scale))`` in one pass, for the cached activations)."""
    _check_block(block)
    dtype = _fmt(fmt)[0]
    x = _tokens_by_features(x, "act_quant_t")
    M, K = x.shape
    nb = math.ceil(M / block)
    q = _buf(out, 0, (K, M), dtype, x.device)
    s = _buf(out, 1, (K, nb), torch.float32, x.device)
    if M and K:
        BLOCK_K = 64
        grid = (nb, triton.cdiv(K, BLOCK_K))
        xs = in_scale if in_scale is not None else s
        _act_quant_t_kernel[grid](
            x, xs, q, s, M, K, x.stride(0), xs.stride(0), q.stride(0), s.stride(0),
            HAS_IN_SCALE=in_scale is not None, IN_BLOCK=in_block, **_flags(fmt, ue8m0),
            BLOCK=block, BLOCK_K=BLOCK_K, num_warps=4,
        )
    return q, s


def act_quant_both(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, out=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act_quant(x)`` and ``act_quant_t(x)`` from one read of x (M, K): (q (M, K), s (M, ceil(K/b)),
    qt (K, M), st (K, ceil(M/b)))."""
    _check_block(block)
    dtype = _fmt(fmt)[0]
    x = _tokens_by_features(x, "act_quant_both")
    M, K = x.shape
    q = _buf(out, 0, (M, K), dtype, x.device)
    s = _buf(out, 1, (M, math.ceil(K / block)), torch.float32, x.device)
    qt = _buf(out, 2, (K, M), dtype, x.device)
    st = _buf(out, 3, (K, math.ceil(M / block)), torch.float32, x.device)
    if M and K:
        grid = (triton.cdiv(M, block), triton.cdiv(K, block))
        _act_quant_both_kernel[grid](
            x, q, s, qt, st, M, K, x.stride(0), q.stride(0), s.stride(0), qt.stride(0), st.stride(0),
            **_flags(fmt, ue8m0), BLOCK=block, num_warps=8,
        )
    return q, s, qt, st


def weight_quant(
    w: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, transposed: bool = False, out=None,
):
    """Block x block tiles. w: (O, I) -> (fp8 (O, I), scale_inv (ceil(O/b), ceil(I/b)) float32), as
    ``minids.fp8.weight_quant``; with ``transposed=True`` also the FP8 w^T (I, O) from the same pass, returned
    third (its block scales are scale_inv.t())."""
    _check_block(block)
    dtype = _fmt(fmt)[0]
    if w.dim() != 2:
        raise ValueError(f"weight_quant needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.stride(-1) != 1:
        w = w.contiguous()
    O, I = w.shape
    bo, bi = math.ceil(O / block), math.ceil(I / block)
    q = _buf(out, 0, (O, I), dtype, w.device)
    s = _buf(out, 1, (bo, bi), torch.float32, w.device)
    qt = _buf(out, 2, (I, O), dtype, w.device) if transposed else q
    if O and I:
        _weight_quant_kernel[(bo, bi)](
            w, q, qt, s, O, I, w.stride(0), q.stride(0), qt.stride(0), s.stride(0), WRITE_T=transposed,
            **_flags(fmt, ue8m0), BLOCK=block, num_warps=8,
        )
    return (q, s, qt) if transposed else (q, s)


def weight_dequant(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16, out=None,
) -> torch.Tensor:
    """Block dequantization (the checkpoints' ``weight_scale_inv``), as ``minids.fp8.weight_dequant``."""
    _check_block(block)
    if w.dim() != 2:
        raise ValueError(f"weight_dequant needs a 2-D weight, got shape {tuple(w.shape)}")
    O, I = w.shape
    if scale_inv.shape != (math.ceil(O / block), math.ceil(I / block)):
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {(math.ceil(O / block), math.ceil(I / block))}"
            f" for a weight of shape {tuple(w.shape)} with {block}x{block} blocks"
        )
    if w.stride(-1) != 1:
        w = w.contiguous()
    scale_inv = scale_inv.float().contiguous()
    res = _buf(None if out is None else (out,), 0, (O, I), dtype, w.device)
    if O and I:
        grid = (math.ceil(O / block), math.ceil(I / block))
        _weight_dequant_kernel[grid](w, scale_inv, res, O, I, w.stride(0), scale_inv.stride(0), res.stride(0),
                                     BLOCK=block, num_warps=8)
    return res


# ----------------------------------------------------------------------------------------------- the GEMM
if HAVE_TRITON:

    @triton.jit
    def _fp8_gemm_kernel(
        a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K, M_BUCKET,
        stride_am, stride_bn, stride_cs, stride_cm, stride_asm, stride_bsn,
        B_GROUP: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """C[s, m, n] = sum over this split's K steps of (A[m, k-step] . B[n, k-step]) * a_s[m, step] * b_s[n', step]
        with n' = n // B_GROUP (128: weight blocks; 1: per-row 1x128 scales). M_BUCKET only keys the autotuner.

        Each 128-K step's partial product comes out of the tensor cores on its own and is scaled into the float32
        accumulator (acc += dot(a, b) * scale). Accumulating into acc inside the tensor cores and rescaling acc
        instead (acc = dot(a, b, acc * prev_scale / scale)) saves a register tile but puts the whole running sum
        through the tensor cores' ~14-bit accumulation: measured on the H200, the error at K = 16384 grew from
        3.4e-3 to 1.3e-2 of max |C| (bench/results/kernels_notes.md), which is the promotion V3 exists to avoid.
        When a BLOCK_N tile lies inside one 128-wide weight block (B_GROUP >= BLOCK_N), b's scale is one scalar per
        step, and the per-element work is one multiply-add instead of an outer product and a multiply-add.
        """
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        # grouped order: GROUP_M row-tiles share each column tile while it is in L2
        width = GROUP_M * num_n
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        nk = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(nk, SPLIT_K)
        k_lo = pid_k * per_split
        k_hi = tl.minimum(nk, k_lo + per_split)

        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + (k_lo * BLOCK_K + offs_k)[None, :]
        b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + (k_lo * BLOCK_K + offs_k)[None, :]
        as_ptrs = as_ptr + offs_m * stride_asm + k_lo
        SCALAR_B: tl.constexpr = B_GROUP >= BLOCK_N
        if SCALAR_B:
            bs_ptrs = bs_ptr + ((pid_n * BLOCK_N) // B_GROUP) * stride_bsn + k_lo
        else:
            bs_ptrs = bs_ptr + (offs_n // B_GROUP) * stride_bsn + k_lo
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_lo, k_hi):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[:, None], other=0.0)
            else:
                mask_k = kb * BLOCK_K + offs_k < K
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            a_s = tl.load(as_ptrs, mask=mask_m, other=1.0)  # masked rows: a harmless scale (their a is 0)
            if SCALAR_B:
                b_s = tl.load(bs_ptrs)
            else:
                b_s = tl.load(bs_ptrs, mask=mask_n, other=1.0)
            if SCALAR_B:
                acc += tl.dot(a, tl.trans(b)) * (a_s * b_s)[:, None]  # promote every 128 K (V3P 3.3.2)
            else:
                acc += tl.dot(a, tl.trans(b)) * (a_s[:, None] * b_s[None, :])
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
            as_ptrs += 1
            bs_ptrs += 1
        c_ptrs = c_ptr + pid_k * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _sum_splits_kernel(ws_ptr, c_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """c = sum over the split-K partials ws (SPLIT_K, M*N) float32, cast to c's dtype: one pass."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + i * MN + offs, mask=mask, other=0.0)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    def _gemm_configs():
        cfg = []
        for bm, bn, w, s in [
            # large M. Shared memory per stage is (BM + BN) * 128 bytes; 96 KB or less lets two CTAs share an SM,
            # so one CTA's scaling arithmetic overlaps the other's tensor-core work.
            (128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4), (128, 256, 8, 3),
            # M <= 128: one 64-row tile in M, narrow in N, split K
            (64, 64, 4, 4), (64, 128, 4, 4), (64, 128, 4, 3), (64, 64, 4, 6),
        ]:
            cfg.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8},
                                     num_warps=w, num_stages=s))
        return cfg

    def _prune(configs, named_args, **kwargs):
        """Keep tiles no taller than the M bucket (a 256-row tile for 64 tokens is wasted work)."""
        m = named_args["M_BUCKET"]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, m)]
        if m >= 1024:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 128]
        return kept

    _fp8_gemm_tuned = triton.autotune(
        configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "B_GROUP", "SPLIT_K", "EVEN_K"],
        prune_configs_by={"early_config_prune": _prune},
    )(_fp8_gemm_kernel)


AUTOTUNE = os.environ.get("MINIDS_AUTOTUNE", "1") != "0"  # 0: one heuristic config per shape (fast test runs)


def _heuristic_config(M: int) -> dict:
    if M <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4,
                "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8,
            "num_stages": 3}


def _m_bucket(M: int) -> int:
    """Autotuning key for M: the next power of two (at least 16, at most 8192)."""
    return min(8192, max(16, 1 << (M - 1).bit_length()))


def _split_k(M: int, N: int, nk: int, sms: int = 132) -> int:
    """Split the K loop when the output has too few tiles to fill the GPU (small M): aim for about one wave of
    (64 x 128) tiles, keeping at least 4 K steps (512 of K) per split."""
    if M > 256:
        return 1
    tiles = math.ceil(M / 64) * math.ceil(N / 128)
    return max(1, min(sms // tiles, nk // 4, 8))


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, block: int = 128, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """C (M, N) = (a a_s)(b b_s)^T with fp32 accumulation, as ``minids.fp8.fp8_gemm`` (same arguments; ``out``:
    an optional preallocated (M, N) output).

    a: (M, K) FP8, a_s: (M, ceil(K/b)); b: (N, K) FP8 with b_s (ceil(N/b), ceil(K/b)) 128x128 block scales
    (weights) or (N, ceil(K/b)) 1x128 scales (Wgrad: both operands quantized along the token dim).
    """
    M, N, K, b_group = _gemm_check(a, a_s, b, b_s, block)
    if block != 128:
        raise ValueError(f"block={block}: the Triton FP8 GEMM implements DeepSeek-V3's 128")
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    a_s, b_s = a_s.float().contiguous(), b_s.float().contiguous()
    nk = math.ceil(K / block)
    res = _buf(None if out is None else (out,), 0, (M, N), out_dtype, a.device)
    if M == 0 or N == 0 or K == 0:
        return res.zero_()
    even_k = K % block == 0
    if INTERPRET:  # no autotuning in the interpreter: one small config, and a split to exercise that path
        split = 2 if nk >= 2 else 1
        c = res[None] if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=a.device)
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32), split)
        grid = (triton.cdiv(M, 32) * triton.cdiv(N, 32), split)
        _fp8_gemm_kernel[grid](
            a, b, c, a_s, b_s, M, N, K, _m_bucket(M), a.stride(0), b.stride(0), c.stride(0), c.stride(1),
            a_s.stride(0), b_s.stride(0), B_GROUP=b_group, SPLIT_K=split, EVEN_K=even_k,
            BLOCK_M=32, BLOCK_N=32, BLOCK_K=block, GROUP_M=4,
        )
    else:
        split = _split_k(M, N, nk, torch.cuda.get_device_properties(a.device).multi_processor_count)
        c = res[None] if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=a.device)

        args = (a, b, c, a_s, b_s, M, N, K, _m_bucket(M), a.stride(0), b.stride(0), c.stride(0), c.stride(1),
                a_s.stride(0), b_s.stride(0))
        if AUTOTUNE:
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split)

            _fp8_gemm_tuned[grid](*args, B_GROUP=b_group, SPLIT_K=split, EVEN_K=even_k)
        else:
            cfg = _heuristic_config(M)
            grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]), split)
            _fp8_gemm_kernel[grid](*args, B_GROUP=b_group, SPLIT_K=split, EVEN_K=even_k, **cfg)
    if split > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](c, res, M * N, SPLIT_K=split, BLOCK=1024, num_warps=4)
    return res
