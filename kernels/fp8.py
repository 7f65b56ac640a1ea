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
- ``weight_quant`` writes the transposed copy in the same pass when asked (Dgrad reads W^T K-major);
- the transposing kernels' tiles depend on the mode (``_TILES``, chosen by the H200 tile sweep).

Two quantization modes, by the keyword ``exact`` of the four quantization functions:
- fast (``exact=False``): y = x * (1/s) in float32 (1/s once per group, exact for UE8M0), then the GPU's float32 ->
  FP8 conversion (round to nearest even, saturating; y is clamped to the format's max first). The scales are the
  reference's bit for bit (amax / FMAX from a float64 quotient, once per 128 elements; UE8M0 as exact powers of two).
  A value can differ from the reference only where x * (1/s) and the correctly rounded x / s straddle an FP8 rounding
  boundary, and then by one FP8 step: a few in 10^4 of the elements with bf16 inputs, none with UE8M0 scales.
  weight_quant rounds to the grid in float32 bits in both modes (see its wrapper); only its quotient is fast.
- exact (``exact=True``): bit-identical to the reference, at about half the speed (bench/results/kernels_notes.md).
  x / s is taken in float64 and rounded once to float32 (the correctly rounded quotient), then rounded to the FP8 grid
  with float32 bit arithmetic (round to nearest even), and only then converted. Why each step: the interpreter's
  float32 -> FP8 conversion drops the carry into the exponent (127.8 becomes 64 in E4M3); on the H200, Triton's
  ``div_rn`` differed from the correctly rounded quotient in about 1 of 2000 elements.
A call that leaves ``exact`` unset takes the module's ``EXACT_QUANT``: False (fast) unless the environment sets
MINIDS_FP8_EXACT=1. The FP8 linear (``fp8: real``) calls these kernels without the keyword: it trains on the fast
path, and MINIDS_FP8_EXACT=1 (or ``EXACT_QUANT = True``) makes its quantization bit-exact with the references in
``minids.fp8``, the oracle. Under the interpreter the fast mode rounds to the FP8 grid in software as well (its
conversion being wrong, above): there it tests everything of the GPU's fast mode but the hardware conversion.

The GEMM C = (A a_s)(B b_s)^T takes A (M, K) FP8 with 1x128 scales a_s (M, ceil(K/128)) and B (N, K) FP8
with either 128x128 block scales (weights: b_s (ceil(N/128), ceil(K/128))) or 1x128 scales (the Wgrad
form, both operands quantized along the token dim: b_s (N, ceil(K/128))). It accumulates one 128-wide K
step on the tensor cores, multiplies that partial product by a_s[m] * b_s[n] and adds it to a float32
accumulator (V3P 3.3.2's promotion every N_C = 128). Tails in M, N and K are masked, never wrapped.
Autotuning is keyed on (M bucket, N, K): the official kernel keys on (N, K) alone, so the first M it
sees picks the tiles for every other M. Small M (<= 256) takes the tile shape and split-K of ``_gemm_plan``
(M <= 64: 64-row tiles, 64 or 128 wide; 65..128: one 128-row tile; split so that the grid fills the SMs); split-K
partials are summed by a second kernel in a fixed order (deterministic). Variants of the kernel (TMA loads, 64 x 128
tiles, swapped operands at small M) are selectable by name (``GEMM_VARIANTS``); bench/sweep_fp8_gemm.py times them
against bf16 cuBLAS and block-scaled torch._scaled_mm. On an sm_90 GPU the weight form goes to the warp-specialized
Gluon kernel of ``kernels/fp8_ws.py`` where it wins (``_use_ws``: every M > 256, and M <= 256 where its 128 x 256
tiles fill half the SMs): it keeps the tensor cores busy during the promotion, which this kernel cannot.
"""

from __future__ import annotations

import functools
import math
import os

import torch
from minids.kernels import AUTOTUNE, HAVE_TRITON, INTERPRET, require_runs_here
from minids.kernels import sm_count as _sm_count

from minids.fp8 import _AMAX_FLOOR, _FORMATS, _dequant_check, _fmt, _gemm_check

_FP8_DTYPES = tuple(dtype for dtype, _ in _FORMATS.values())  # what the GEMM's operands may be

if HAVE_TRITON:
    from minids.kernels import grouped_order

__all__ = ["act_quant", "act_quant_both", "act_quant_t", "cublas_fp8_gemm", "fp8_gemm", "weight_dequant",
           "weight_quant"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

    AMAX_FLOOR = tl.constexpr(_AMAX_FLOOR)  # the reference's amax floor, as a constant the kernels can read


# The quantization mode of calls that do not pass ``exact`` (the FP8 linear's among them): fast unless asked.
EXACT_QUANT = os.environ.get("MINIDS_FP8_EXACT", "0") == "1"

# Tiles of the kernels that write a transposed copy, by mode (exact?): (features per program, num_warps); a program is
# always one quantization block (128) of tokens tall. They are memory-bound; the fast mode's were picked by the H200
# sweep of bench/fp8.py --only tiles (bench/results/fp8_tiles.md), the exact mode's float64 quotients need registers and
# keep the tiles measured in kernels_notes.md. weight_quant's fast mode went to 4 warps in the 2026-12-01 sweep
# (2853 GB/s against 2505 with 8, fp8_tiles-u8.md). Tried there and dropped, no faster: transposing the 8-bit codes
# instead of the float32 values (same GB/s to 1%); walking the 128-token block in steps twice (amax, then quantize
# from L2) to cut the 123-203 registers a thread that ncu showed (ncu_quant.txt): 1.2-1.9x slower at 32-token steps
# (fp8_tiles-steps.md), the loads of a step no longer overlapping; moving the tiles through TMA descriptors (fewer
# registers for addresses): 1.6-1.8x slower for three of the four kernels, within the run-to-run spread for the FP8
# requantization (fp8_tiles-tma.md).
_TILES = {
    # fast-mode tiles from the H200 sweep (bench/results/fp8_tiles.md): 128 tokens x 64 features, 4 warps, ran
    # act_quant_t at 2582 GB/s against 1072 for 128 x 128 with 8 warps, and the FP8 requantization at 1388 against 1281.
    # (features per program, num_warps, pack): pack stores the transposed copy as 8-byte words of 8 tokens (see
    # _pack_words) where the token count is a multiple of 8. Packed, fast mode (fp8_tiles-pack.md, ninth session, GB/s
    # against the byte-wise default of the same run): act_quant_t 128 features 3111 (64 features packed 2426,
    # byte-wise 2995), act_quant_both 2602 (2502), weight_quant 2875 (2587); the FP8 requantization 1725 (1724): its
    # FP8 loads put 4 rows in a thread, half a word, so it stays byte-wise. The exact mode's packing is untimed.
    "act_quant_t": {True: (64, 4, False), False: (128, 4, True)},
    "act_quant_t_fp8": {True: (64, 4, False), False: (64, 4, False)},  # FP8 input with in_scale (Wgrad requantization)
    "act_quant_both": {True: (128, 8, False), False: (128, 4, True)},  # features in whole blocks (1x128 groups of q)
    "weight_quant": {True: (128, 8, False), False: (128, 4, True)},  # whole 128x128 blocks
}


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
        """amax / FMAX (amax floored at 1e-4), optionally the exact power of two at or above it. The quotient is the
        correctly rounded float32 one, which for FMAX = 448 and 57344 (7 times a power of two) equals the
        reference's float64 quotient rounded to float32 for every float32 amax >= 1e-4 (all 1,185,827,049 of them
        checked, 2026-12-01: a quotient by 7 never lands on a float32 rounding tie, so the double rounding never
        differs). It is taken as q0 = a * r, r = 1/FMAX rounded, corrected once with two fmas: the residual
        a - q0 * FMAX is exact, and q0 + residual * r is the correctly rounded a / 7 * 2^-k for every float32
        mantissa (checked exhaustively in exact integer arithmetic, 2026-12-02; ``test_scale_of_every_mantissa``
        checks it again on the kernels' own arithmetic). div.rn costs a slow-path check and branch per quotient
        (48 a thread in act_quant_both's register-layout kernel): the two fmas took its sm_90 SASS from 2296 to
        1952 instructions a tile."""
        a = tl.maximum(amax, AMAX_FLOOR)
        R: tl.constexpr = 1.0 / FMAX  # rounded to float32 once (1/7's bits repeat 001: no double rounding)
        q0 = a * R
        s = tl.fma(tl.fma(-q0, FMAX, a), R, q0)
        if UE8M0:
            bits = s.to(tl.uint32, bitcast=True)
            up = (bits & 0x7FFFFF) != 0
            s = ((bits & 0x7F800000) + tl.where(up, 0x800000, 0)).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _scale_kernel(a_ptr, s_ptr, n, FMAX: tl.constexpr, UE8M0: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        s = _scale_of(tl.load(a_ptr + i, mask=i < n, other=1.0), FMAX, UE8M0)
        tl.store(s_ptr + i, s, mask=i < n)

    @triton.jit
    def _quantize(x, s, FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
                  EXACT: tl.constexpr, SOFT_CVT: tl.constexpr):
        """x / s for the FP8 store, in float32. s is broadcast against x (one value per quantization group), so its
        reciprocal is taken once per group. Exact: the correctly rounded quotient, rounded to the FP8 grid here.
        Fast: x * (1/s), 1/s within 2 ulp (correctly rounded with SOFT_CVT); the conversion at the store rounds and
        saturates (SOFT_CVT: clamped and rounded here, for the interpreter and the weight kernel)."""
        if EXACT:
            # float64 quotient rounded once to float32 (H200: div_rn differed from it in about 1 of 2000 quotients)
            y = (x.to(tl.float64) / s.to(tl.float64)).to(tl.float32)
        else:
            if UE8M0:  # s = 2^e: 1/s = 2^-e exactly, by exponent arithmetic (biased 254 - E)
                inv = (0x7F000000 - s.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
            elif SOFT_CVT:  # the interpreter, and the weight kernel: one reciprocal a block, nothing to save (and
                # div.full cost that kernel 9 registers a thread, 165 -> 174: 2 programs an SM instead of 3, offline
                # sm_90 compile)
                inv = tl.math.div_rn(1.0, s)
            else:  # div.full: within 2 ulp, no slow-path branch (the fast mode rounds x * (1/s) anyway)
                inv = 1.0 / s
            y = x * inv
        if EXACT or SOFT_CVT:
            y = tl.minimum(tl.maximum(y, -FMAX), FMAX)
            y = _round_to_grid(y, MBITS, EMIN)  # exactly representable: the FP8 conversion after it is exact
        # else the conversion at the store clamps (cvt.rn.satfinite on sm_90): |y| exceeds FMAX only by the
        # rounding of 1/s (relative 2^-23 or so), where round-to-nearest gives FMAX with or without a clamp
        return y

    @triton.jit
    def _token_order(BLOCK: tl.constexpr, PACK: tl.constexpr):
        """The tokens (0..BLOCK-1, within the block) that a transposing kernel's tile rows hold: in order, or with PACK
        row j * W + w holding token 8 w + j (W = BLOCK // 8 words). A thread of the load layout holds rows 16 (or 8)
        apart, so with PACK it holds the 8 tokens of each of its words and ``_pack_words`` needs no data movement
        between threads."""
        i = tl.arange(0, BLOCK)
        if PACK:
            return (i % (BLOCK // 8)) * 8 + i // (BLOCK // 8)
        return i

    @triton.jit
    def _pack_words(q, BLOCK: tl.constexpr, F: tl.constexpr):
        """q (BLOCK, F) FP8 codes in ``_token_order(BLOCK, True)`` -> (F, BLOCK // 8) int64 words, word [f, w] holding
        tokens 8 w .. 8 w + 7 of column f little-endian, i.e. the bytes of q^T's row f from token 8 w on. The
        transposed copy is then stored 8 bytes at a time instead of byte by byte."""
        W: tl.constexpr = BLOCK // 8
        t = tl.permute(tl.reshape(q.to(tl.uint8, bitcast=True).to(tl.uint64), (8, W, F)), (1, 2, 0))  # (W, F, 8 j)
        lo, hi = tl.split(tl.reshape(t, (W, F, 4, 2)))  # byte j = 2 p + (0, 1)
        t = lo | (hi << 8)
        lo, hi = tl.split(tl.reshape(t, (W, F, 2, 2)))
        t = lo | (hi << 16)
        lo, hi = tl.split(t)
        return tl.trans(lo | (hi << 32)).to(tl.int64, bitcast=True)

    @triton.jit
    def _store_words(qw_ptr, q, cols64, K, M, stride_qk, pid_m, BLOCK: tl.constexpr, F: tl.constexpr):
        """Store token block pid_m's FP8 codes q (BLOCK tokens in ``_token_order(BLOCK, True)``, then F features in
        any shape; cols64 their feature indices, same shape) transposed into q^T (K, M) through its int64 view, as
        ``_pack_words``' words (M a multiple of 8: whole words; stride_qk in bytes)."""
        W: tl.constexpr = BLOCK // 8
        words = _pack_words(tl.reshape(q, (BLOCK, F)), BLOCK, F)  # (F, W)
        cols = tl.reshape(cols64, (F,))
        wi = pid_m * W + tl.arange(0, W)
        mask = (cols < K)[:, None] & (wi * 8 < M)[None, :]
        tl.store(qw_ptr + cols[:, None] * (stride_qk // 8) + wi[None, :], words, mask=mask)

    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        EXACT: tl.constexpr, SOFT_CVT: tl.constexpr,
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
        q = _quantize(x, s[:, None], FMAX, MBITS, EMIN, UE8M0, EXACT, SOFT_CVT)
        tl.store(q_ptr + rows64[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows64 * stride_sm + pid_k * stride_sk, s, mask=rows < M)

    @triton.jit
    def _act_quant_t_kernel(
        x_ptr, xs_ptr, q_ptr, qw_ptr, s_ptr, M, K, stride_xm, stride_xsm, stride_xsk, stride_qk, stride_sk, stride_sb,
        HAS_IN_SCALE: tl.constexpr, IN_BLOCK: tl.constexpr,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        EXACT: tl.constexpr, SOFT_CVT: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, PACK: tl.constexpr,
    ):
        """x (M, K) -> q (K, M) in BLOCK x 1 tiles along M: one program reads (BLOCK tokens x BLOCK_K) and writes
        it transposed. With HAS_IN_SCALE, x is FP8 with 1 x IN_BLOCK scales xs and is dequantized on load. PACK: the
        transposed store goes through q's int64 view qw in 8-token words (``_pack_words``)."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK + _token_order(BLOCK, PACK)  # tokens
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_IN_SCALE:
            if IN_BLOCK % BLOCK_K == 0:  # the tile's columns share one input scale per row
                xs = tl.load(xs_ptr + rows64 * stride_xsm + ((pid_k * BLOCK_K) // IN_BLOCK) * stride_xsk, mask=rows < M,
                             other=0.0)
                x = x * xs[:, None]
            else:
                xs = tl.load(xs_ptr + rows64[:, None] * stride_xsm + (cols // IN_BLOCK)[None, :] * stride_xsk,
                             mask=mask, other=0.0)
                x = x * xs
        s = _scale_of(tl.max(tl.abs(x), axis=0), FMAX, UE8M0)  # (BLOCK_K,): one per column over BLOCK tokens
        q = _quantize(x, s[None, :], FMAX, MBITS, EMIN, UE8M0, EXACT, SOFT_CVT)
        cols64 = cols.to(tl.int64)
        if PACK:
            _store_words(qw_ptr, q.to(q_ptr.dtype.element_ty), cols64, K, M, stride_qk, pid_m, BLOCK, BLOCK_K)
        else:
            # transposed in registers (the compiler goes through shared memory), then stored along the tokens
            q_ptrs = q_ptr + cols64[:, None] * stride_qk + rows[None, :]  # (BLOCK_K, BLOCK)
            tl.store(q_ptrs, tl.trans(q).to(q_ptr.dtype.element_ty), mask=tl.trans(mask))
        tl.store(s_ptr + cols64 * stride_sk + pid_m * stride_sb, s, mask=cols < K)

    @triton.jit
    def _act_quant_both_kernel(
        x_ptr, q_ptr, s_ptr, qt_ptr, qtw_ptr, st_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk, stride_qtk,
        stride_stk, stride_stb,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        EXACT: tl.constexpr, SOFT_CVT: tl.constexpr,
        BLOCK: tl.constexpr, G: tl.constexpr, PACK: tl.constexpr,
    ):
        """One read of a (BLOCK tokens x G*BLOCK features) tile of x (M, K), held as (BLOCK, G, BLOCK); writes its
        1 x BLOCK quantization into q (M, K) and its BLOCK x 1 quantization, transposed, into qt (K, M) (PACK:
        through qt's int64 view qtw, as in ``_act_quant_t_kernel``)."""
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK + _token_order(BLOCK, PACK)
        groups = pid_k * G + tl.arange(0, G)  # BLOCK-wide feature groups
        cols = groups[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (G, BLOCK)
        mask = (rows < M)[:, None, None] & (cols < K)[None, :, :]
        rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None, None] * stride_xm + cols[None, :, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        s = _scale_of(tl.max(tl.abs(x), axis=2), FMAX, UE8M0)  # (BLOCK, G): along features
        q = _quantize(x, s[:, :, None], FMAX, MBITS, EMIN, UE8M0, EXACT, SOFT_CVT)
        tl.store(q_ptr + rows64[:, None, None] * stride_qm + cols[None, :, :], q.to(q_ptr.dtype.element_ty),
                 mask=mask)
        tl.store(s_ptr + rows64[:, None] * stride_sm + groups[None, :] * stride_sk, s,
                 mask=(rows < M)[:, None] & (groups * BLOCK < K)[None, :])
        st = _scale_of(tl.max(tl.abs(x), axis=0), FMAX, UE8M0)  # (G, BLOCK): along tokens
        qt = _quantize(x, st[None, :, :], FMAX, MBITS, EMIN, UE8M0, EXACT, SOFT_CVT)
        if PACK:
            _store_words(qtw_ptr, qt.to(qt_ptr.dtype.element_ty), cols64, K, M, stride_qtk, pid_m, BLOCK, G * BLOCK)
        else:
            # the transposed copy is permuted to (G, features, tokens) in registers first, so the store runs along its
            # last dim (tokens, contiguous in qt) like every other store; storing the (tokens, G, features) tile
            # through transposed pointers came out wrong on full tiles on the H200 (Triton 3.6)
            qt_ptrs = qt_ptr + cols64[:, :, None] * stride_qtk + rows[None, None, :]  # (G, BLOCK, BLOCK)
            tl.store(qt_ptrs, tl.permute(qt, (1, 2, 0)).to(qt_ptr.dtype.element_ty),
                     mask=tl.permute(mask, (1, 2, 0)))
        tl.store(st_ptr + cols64 * stride_stk + pid_m * stride_stb, st, mask=cols < K)

    @triton.jit
    def _weight_quant_kernel(
        w_ptr, q_ptr, qt_ptr, qtw_ptr, s_ptr, O, I, stride_wo, stride_qo, stride_qti, stride_so,
        WRITE_T: tl.constexpr,
        FMAX: tl.constexpr, MBITS: tl.constexpr, EMIN: tl.constexpr, UE8M0: tl.constexpr,
        EXACT: tl.constexpr, SOFT_CVT: tl.constexpr,
        BLOCK: tl.constexpr, G: tl.constexpr, PACK: tl.constexpr,
    ):
        """G (BLOCK x BLOCK) blocks of w (O, I) side by side, held as (BLOCK, G, BLOCK): their scales, their FP8
        values, and optionally the transposed copy (PACK, which the wrapper sets only with WRITE_T: through qt's int64
        view qtw, as in ``_act_quant_t_kernel``; rows play the tokens)."""
        pid_o, pid_i = tl.program_id(0), tl.program_id(1)
        rows = pid_o * BLOCK + _token_order(BLOCK, PACK)
        groups = pid_i * G + tl.arange(0, G)
        cols = groups[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]  # (G, BLOCK)
        mask = (rows < O)[:, None, None] & (cols < I)[None, :, :]
        rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
        w = tl.load(w_ptr + rows64[:, None, None] * stride_wo + cols[None, :, :], mask=mask, other=0.0)
        w = w.to(tl.float32)
        s = _scale_of(tl.max(tl.max(tl.abs(w), axis=2), axis=0), FMAX, UE8M0)  # (G,): one per block
        q = _quantize(w, s[None, :, None], FMAX, MBITS, EMIN, UE8M0, EXACT, SOFT_CVT)  # float32 until each store
        tl.store(q_ptr + rows64[:, None, None] * stride_qo + cols[None, :, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        if PACK:
            _store_words(qtw_ptr, q.to(qt_ptr.dtype.element_ty), cols64, I, O, stride_qti, pid_o, BLOCK, G * BLOCK)
        elif WRITE_T:  # the float32 values permuted to (G, features, rows), then converted, as in
            # _act_quant_both_kernel (permuting the FP8 tile instead gave a transposed copy unequal to q on full tiles,
            # H200, Triton 3.6)
            qt_ptrs = qt_ptr + cols64[:, :, None] * stride_qti + rows[None, None, :]  # (G, BLOCK, BLOCK)
            tl.store(qt_ptrs, tl.permute(q, (1, 2, 0)).to(qt_ptr.dtype.element_ty), mask=tl.permute(mask, (1, 2, 0)))
        tl.store(s_ptr + pid_o * stride_so + groups, s, mask=groups * BLOCK < I)

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
def _check_call(t: torch.Tensor, block: int, name: str) -> None:
    """One line where the wrapper ``name`` cannot run on ``t`` (no Triton, or a CPU tensor without the interpreter:
    ``minids.fp8.<name>`` is the reference to use) or ``block`` is not a power of two >= 16."""
    require_runs_here(t, f"minids.kernels.fp8.{name}", f"minids.fp8.{name}")
    _check_block(block)


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


def _scales_t(out, i: int, rows: int, nb: int, device) -> torch.Tensor:
    """The (rows, nb) float32 scales of a 128x1 quantization (act_quant_t, act_quant_both's second): ``out[i]`` if
    given (contiguous, or M-major itself: strides (1, rows)), else stored block-major (nb, rows) and returned as its
    transposed view ("M-major"). The Wgrad GEMM reads one K step's scales of all its tile's rows and columns at once
    (32 columns a thread), and in this layout they are adjacent: on the H200 (fp8_gemm_sweep-wgrad*.md, 4096 tokens)
    tma_s4 ran at 515-666 TFLOP/s with these against 337-383 with row-major scales, m64 at 750-829 against
    584-641. The 1x128 scales of act_quant stay row-major: the Fprop / Dgrad GEMM reads two rows a thread, and
    row-major keeps a row's successive K steps in one cache line (4096 x 7168 x 16384: 889-907 TFLOP/s against
    812-825 M-major, H200); block-scaled cuBLAS, which wants them M-major, gets a copy (``cublas_fp8_gemm``)."""
    t = None if out is None else out[i]
    if t is not None and t.stride() == (1, rows) and t.shape == (rows, nb) and t.dtype == torch.float32:
        return t
    if out is not None:
        return _buf(out, i, (rows, nb), torch.float32, device)
    return torch.empty_strided((rows, nb), (1, rows), dtype=torch.float32, device=device)


def _tokens_by_features(x: torch.Tensor, name: str) -> torch.Tensor:
    """x as a 2-D (tokens, features) tensor with unit stride along features, or a one-line error."""
    if x.dim() != 2:
        raise ValueError(f"{name} needs a 2-D (tokens, features) tensor, got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def scale_of(amax: torch.Tensor, fmax: float, ue8m0: bool = False) -> torch.Tensor:
    """The kernels' scale of each float32 amax (``_scale_of``): ``minids.fp8._scale``'s contract, bit for bit."""
    if fmax not in tuple(f for _, f in _FORMATS.values()):
        raise ValueError(f"scale_of: fmax={fmax} is no FP8 format's maximum ({[f for _, f in _FORMATS.values()]})")
    a = amax.float().contiguous()
    s = torch.empty_like(a)
    n, block = a.numel(), 1 << 16
    if n:
        _scale_kernel[(_cdiv(n, block),)](a, s, n, FMAX=fmax, UE8M0=ue8m0, BLOCK=block)
    return s


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the host's grids (``triton.cdiv`` called from Python goes through the JIT's call path: a few
    microseconds each, on every launch)."""
    return -(-a // b)


def _flags(fmt: str, ue8m0: bool, exact: bool | None) -> dict:
    """The kernels' format and mode constants (a fresh dict); ``exact=None`` takes the module's ``EXACT_QUANT``."""
    return dict(_format_flags(fmt, bool(ue8m0), EXACT_QUANT if exact is None else bool(exact), INTERPRET))


@functools.lru_cache(maxsize=64)
def _format_flags(fmt: str, ue8m0: bool, exact: bool, soft_cvt: bool) -> tuple:
    dtype, fmax = _fmt(fmt)
    info = torch.finfo(dtype)  # mantissa bits and the smallest normal exponent, for the grid rounding
    mbits, emin = round(-math.log2(info.eps)), round(math.log2(info.smallest_normal))
    return (("FMAX", fmax), ("MBITS", mbits), ("EMIN", emin), ("UE8M0", ue8m0), ("EXACT", exact),
            ("SOFT_CVT", soft_cvt))


def _blocks_per_program(name: str, flags: dict, block: int) -> tuple[int, int, bool]:
    """(block-wide feature groups per program, num_warps, pack) of a 3-D-tiled kernel, from ``_TILES``."""
    feats, warps, pack = _TILES[name][flags["EXACT"]]
    return max(1, feats // block), warps, pack


# True sends the transposing quantizations (act_quant_both, act_quant_t) to the TMA-pipelined Gluon kernel of
# kernels/fp8_tma_quant.py on sm_90 in the fast mode where it can take the call (``_tma_quant``). Off: on the H200 it
# ran slower than these Triton kernels (act_quant_both 2.1-2.2 against 2.6-2.8 TB/s; act_quant_t and the FP8
# requantization ahead on one shape, behind on the other: bench/results/fp8_tma_quant.md).
TMA_QUANT = False


def _tma_quant(x: torch.Tensor, block: int, flags: dict, outs, in_block: int = 128) -> bool:
    """Whether this call goes to ``fp8_tma_quant.quant_tiles`` (same result, bit for bit: the GPU tests check)."""
    if not TMA_QUANT or INTERPRET or flags["EXACT"] or in_block != 128 or not x.is_cuda:
        return False
    from minids.kernels import fp8_tma_quant

    return fp8_tma_quant.usable(x, block, flags["EXACT"], outs)


# True sends the fast transposing quantizations (act_quant_both, act_quant_t, the FP8 requantization) to the Gluon
# kernel of kernels/fp8_reg_quant.py on sm_90, whose register layout stores the transposed copy without a shared-memory
# layout conversion (``_reg_quant``; same bits as these Triton kernels). On the H200, 8192 x 7168, from CUDA graphs
# (bench/results/fp8_reg_quant.md): act_quant_both 3433 GB/s against the Triton kernel's 2716, act_quant_t 3863
# against 3648, the requantization 2964 against 2242.
REG_QUANT = True
# weight_quant's transposed form on the same kernel: off. Its GPU parity test passes (shapes (1, 4) to (4112, 528)),
# but with the float32-bits rounding that keeps it bit-identical to the Triton weight kernel it ran at 3152 GB/s
# against that kernel's 3077 at 8192 x 7168 and 3322 against 3347 at 4096 x 32768 (fp8_reg_quant.md): no gain.
REG_QUANT_WEIGHT = False


def _reg_quant(x: torch.Tensor, block: int, flags: dict, in_block: int = 128) -> bool:
    """Whether this call goes to ``fp8_reg_quant.quant_tiles`` (same result, bit for bit: the GPU tests check)."""
    if not REG_QUANT or INTERPRET or not x.is_cuda:
        return False
    from minids.kernels import fp8_reg_quant

    return fp8_reg_quant.usable(x, block, flags["EXACT"], in_block)


def _pack_view(t: torch.Tensor, pack: bool) -> tuple[torch.Tensor, bool]:
    """(the int64 view of a contiguous FP8 (rows, M) transposed output, True) for the packed stores
    (``_store_words``) where ``pack`` asks for them and t's rows are whole aligned 8-byte words (M a multiple of 8, t
    8-byte aligned, as any fresh tensor is); else (t, False): the kernel stores byte by byte."""
    if pack and t.shape[-1] % 8 == 0 and t.data_ptr() % 8 == 0:
        return t.view(torch.int64), True
    return t, False


def act_quant(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, out=None, exact: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block tiles along the last dim. x: (..., K) -> fp8 (..., K), scales (..., ceil(K/b)) float32.
    Same contract as ``minids.fp8.act_quant``; ``out``: optional preallocated (q (M, K), s (M, nb)), M = x's rows
    (every kernel here takes one). ``exact``: bit-exact (True) or fast (False) rounding, see the module docstring;
    None: ``EXACT_QUANT`` (the same for every quantization function here)."""
    _check_call(x, block, "act_quant")
    dtype = _fmt(fmt)[0]
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, nb = x2.shape[0], _cdiv(K, block)
    q = _buf(out, 0, (M, K), dtype, x.device)
    s = _buf(out, 1, (M, nb), torch.float32, x.device)  # row-major: see _scales_t
    if M and K:
        BLOCK_M = 16 if block <= 128 else 4
        grid = (_cdiv(M, BLOCK_M), nb)
        _act_quant_kernel[grid](
            x2, q, s, M, K, x2.stride(0), q.stride(0), *s.stride(), **_flags(fmt, ue8m0, exact),
            BLOCK_M=BLOCK_M, BLOCK=block, num_warps=4,
        )
    return q.view(*x.shape), s.view(*x.shape[:-1], nb)


def act_quant_t(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False,
    in_scale: torch.Tensor | None = None, in_block: int = 128, out=None, exact: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """block x 1 tiles along the token dim, written transposed. x: (M, K) -> fp8 x^T (K, M), scales (K, ceil(M/b)).
    Same contract as ``minids.fp8.act_quant_t``; with ``in_scale`` (M, ceil(K/in_block)), x is FP8 and is
    dequantized on load (``act_quant_t(act_dequant(x, in_scale))`` in one pass, for the cached activations).
    ``exact``: as ``act_quant``."""
    _check_call(x, block, "act_quant_t")
    dtype = _fmt(fmt)[0]
    x = _tokens_by_features(x, "act_quant_t")
    M, K = x.shape
    nb = _cdiv(M, block)
    q = _buf(out, 0, (K, M), dtype, x.device)
    s = _scales_t(out, 1, K, nb, x.device)
    if M and K:
        flags = _flags(fmt, ue8m0, exact)
        if in_scale is not None:
            _check_block(in_block)
            want = (M, _cdiv(K, in_block))
            if tuple(in_scale.shape) != want:
                raise ValueError(f"act_quant_t: in_scale has shape {tuple(in_scale.shape)}, expected {want} for x of "
                                 f"shape {(M, K)} in 1x{in_block} tiles")
            in_scale = in_scale.float()  # read through both strides (row-major from act_quant, or any other)
        if _reg_quant(x, block, flags, in_block):
            from minids.kernels import fp8_reg_quant

            fp8_reg_quant.quant_tiles(x, q, s, in_scale=in_scale, flags=flags)
            return q, s
        if _tma_quant(x, block, flags, (q,), in_block):
            from minids.kernels import fp8_tma_quant

            fp8_tma_quant.quant_tiles(x, q, s, in_scale=in_scale, flags=flags)
            return q, s
        BLOCK_K, warps, pack = _TILES["act_quant_t" if in_scale is None else "act_quant_t_fp8"][flags["EXACT"]]
        qw, pack = _pack_view(q, pack)
        grid = (nb, _cdiv(K, BLOCK_K))
        xs = in_scale if in_scale is not None else s
        _act_quant_t_kernel[grid](
            x, xs, q, qw, s, M, K, x.stride(0), *xs.stride(), q.stride(0), *s.stride(),
            HAS_IN_SCALE=in_scale is not None, IN_BLOCK=in_block, **flags,
            BLOCK=block, BLOCK_K=BLOCK_K, PACK=pack, num_warps=warps,
        )
    return q, s


def act_quant_both(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, out=None, exact: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act_quant(x)`` and ``act_quant_t(x)`` from one read of x (M, K): (q (M, K), s (M, ceil(K/b)),
    qt (K, M), st (K, ceil(M/b))). ``exact``: as ``act_quant``."""
    _check_call(x, block, "act_quant_both")
    dtype = _fmt(fmt)[0]
    x = _tokens_by_features(x, "act_quant_both")
    M, K = x.shape
    q = _buf(out, 0, (M, K), dtype, x.device)
    s = _buf(out, 1, (M, _cdiv(K, block)), torch.float32, x.device)  # row-major: see _scales_t
    qt = _buf(out, 2, (K, M), dtype, x.device)
    st = _scales_t(out, 3, K, _cdiv(M, block), x.device)
    if M and K:
        flags = _flags(fmt, ue8m0, exact)
        if _reg_quant(x, block, flags):
            from minids.kernels import fp8_reg_quant

            fp8_reg_quant.quant_tiles(x, qt, st, q, s, flags=flags)
            return q, s, qt, st
        if _tma_quant(x, block, flags, (q, qt)):
            from minids.kernels import fp8_tma_quant

            fp8_tma_quant.quant_tiles(x, qt, st, q, s, flags=flags)
            return q, s, qt, st
        G, warps, pack = _blocks_per_program("act_quant_both", flags, block)
        qtw, pack = _pack_view(qt, pack)
        grid = (_cdiv(M, block), _cdiv(K, G * block))
        _act_quant_both_kernel[grid](
            x, q, s, qt, qtw, st, M, K, x.stride(0), q.stride(0), *s.stride(), qt.stride(0), *st.stride(),
            **flags, BLOCK=block, G=G, PACK=pack, num_warps=warps,
        )
    return q, s, qt, st


def weight_quant(
    w: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, transposed: bool = False, out=None,
    exact: bool | None = None,
):
    """Block x block tiles. w: (O, I) -> (fp8 (O, I), scale_inv (ceil(O/b), ceil(I/b)) float32), as
    ``minids.fp8.weight_quant``; with ``transposed=True`` also the FP8 w^T (I, O) from the same pass, returned
    third (its block scales are scale_inv.t()). ``exact``: as ``act_quant``."""
    _check_call(w, block, "weight_quant")
    dtype = _fmt(fmt)[0]
    if w.dim() != 2:
        raise ValueError(f"weight_quant needs a 2-D weight, got shape {tuple(w.shape)}")
    if w.stride(-1) != 1:
        w = w.contiguous()
    O, I = w.shape
    bo, bi = _cdiv(O, block), _cdiv(I, block)
    q = _buf(out, 0, (O, I), dtype, w.device)
    s = _buf(out, 1, (bo, bi), torch.float32, w.device)
    qt = _buf(out, 2, (I, O), dtype, w.device) if transposed else q
    if O and I:
        flags = _flags(fmt, ue8m0, exact)
        # The fast weight path rounds to the FP8 grid in float32 bits before converting (as the interpreter does): on
        # the H200 its converted values differed from the reference in 19% of the elements (q and the transposed
        # copy together) where the grid-rounded exact path was bit-exact, so the hardware conversion is not trusted
        # in this kernel's layout. Cheap here: a few integer ops an element, no float64 quotient.
        flags["SOFT_CVT"] = True
        if transposed and REG_QUANT_WEIGHT and _reg_quant(w, block, flags):  # the transposed copy from registers
            from minids.kernels import fp8_reg_quant

            fp8_reg_quant.quant_tiles(w, qt, None, q, s, flags=flags, weight=True)  # the same arithmetic (SOFT_CVT)
            return q, s, qt
        G, warps, pack = _blocks_per_program("weight_quant", flags, block)
        qtw, pack = _pack_view(qt, pack and transposed)
        _weight_quant_kernel[(bo, _cdiv(bi, G))](
            w, q, qt, qtw, s, O, I, w.stride(0), q.stride(0), qt.stride(0), s.stride(0), WRITE_T=transposed,
            **flags, BLOCK=block, G=G, PACK=pack, num_warps=warps,
        )
    return (q, s, qt) if transposed else (q, s)


def weight_dequant(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16, out=None,
) -> torch.Tensor:
    """Block dequantization (the checkpoints' ``weight_scale_inv``), as ``minids.fp8.weight_dequant``."""
    _check_call(w, block, "weight_dequant")
    _dequant_check(w, scale_inv, block)
    O, I = w.shape
    if w.stride(-1) != 1:
        w = w.contiguous()
    scale_inv = scale_inv.float().contiguous()
    res = _buf(None if out is None else (out,), 0, (O, I), dtype, w.device)
    if O and I:
        grid = (_cdiv(O, block), _cdiv(I, block))
        _weight_dequant_kernel[grid](w, scale_inv, res, O, I, w.stride(0), scale_inv.stride(0), res.stride(0),
                                     BLOCK=block, num_warps=8)
    return res


# ----------------------------------------------------------------------------------------------- the GEMM
if HAVE_TRITON:

    @triton.jit
    def _k_block(src, ptrs, row0, k0, mask_r, offs_k, K, TMA: tl.constexpr, EVEN_K: tl.constexpr):
        """One (rows, BLOCK_K) FP8 tile at K offset k0: through a tensor descriptor (TMA: the copy engine, zeros past
        the edges; ptrs unused) or through ptrs (the rows' pointers at K = 0; masked rows and the K tail read as 0)."""
        if TMA:
            x = src.load([row0, k0])
        elif EVEN_K:
            x = tl.load(ptrs + k0, mask=mask_r[:, None], other=0.0)
        else:
            x = tl.load(ptrs + k0, mask=mask_r[:, None] & (k0 + offs_k < K)[None, :], other=0.0)
        return x

    @triton.jit
    def _promote(acc, a, b, a_s, b_s, SCALAR_B: tl.constexpr, SWAP_AB: tl.constexpr):
        """acc += (a . b^T) * a_s[m] * b_s[n] for one 128-K block: a fresh tensor-core product, scaled into the float32
        accumulator (V3P 3.3.2's promotion). a (BM, BK), b (BN, BK); a_s (BM,); b_s a scalar (SCALAR_B: the tile lies
        in one 128-wide weight block) or (BN,). SWAP_AB: acc is (BN, BM), C^T = B A^T, so that a small M is the tensor
        cores' N dimension (16..256 in Triton) instead of their M (64 per warpgroup)."""
        if SWAP_AB:
            p = tl.dot(b, tl.trans(a))
            if SCALAR_B:
                acc += p * (a_s * b_s)[None, :]
            else:
                acc += p * (b_s[:, None] * a_s[None, :])
        else:
            p = tl.dot(a, tl.trans(b))
            if SCALAR_B:
                acc += p * (a_s * b_s)[:, None]
            else:
                acc += p * (a_s[:, None] * b_s[None, :])
        return acc

    @triton.jit
    def _store_tile(c_ptr, acc, offs_m, offs_n, mask_m, N, stride_cm, SWAP_AB: tl.constexpr):
        """Write an accumulator tile ((BM, BN); (BN, BM) with SWAP_AB) into C (M, N), cast to C's dtype, tails masked."""
        if SWAP_AB:
            ptrs = c_ptr + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None]
            mask = mask_m[None, :] & (offs_n < N)[:, None]
        else:
            ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
            mask = mask_m[:, None] & (offs_n < N)[None, :]
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fp8_gemm_kernel(
        a_src, b_src, c_ptr, as_ptr, bs_ptr, M, N, K, M_BUCKET,
        stride_am, stride_bn, stride_cs, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
        B_GROUP: tl.constexpr, SPLIT_K, EVEN_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
        TMA: tl.constexpr = False, SWAP_AB: tl.constexpr = False,
    ):
        """C[s, m, n] = sum over this split's K steps of (A[m, k-step] . B[n, k-step]) * a_s[m, step] * b_s[n', step]
        with n' = n // B_GROUP (128: weight blocks; 1: per-row 1x128 scales). M_BUCKET only keys the autotuner;
        SPLIT_K is a run-time value (Triton still specializes 1), so the split-K plans share one compiled kernel.

        Each 128-K step's partial product comes out of the tensor cores on its own and is scaled into the float32
        accumulator (acc += dot(a, b) * scale). Accumulating into acc inside the tensor cores and rescaling acc
        instead (acc = dot(a, b, acc * prev_scale / scale)) saves a register tile but puts the whole running sum
        through the tensor cores' ~14-bit accumulation: measured on the H200, the error at K = 16384 grew from
        3.4e-3 to 1.3e-2 of max |C| (bench/results/kernels_notes.md), which is the promotion V3 exists to avoid.
        When a BLOCK_N tile lies inside one 128-wide weight block (B_GROUP >= BLOCK_N), b's scale is one scalar per
        step, and the per-element work is one multiply-add instead of an outer product and a multiply-add.

        Variants (constexpr knobs; bench/sweep_fp8_gemm.py times them): TMA loads A and B through tensor
        descriptors (a_src, b_src; else they are pointers); SWAP_AB computes C^T tiles.
        """
        pid, pid_k = tl.program_id(0), tl.program_id(1)
        c_ptr += pid_k * stride_cs
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        pid_m, pid_n = grouped_order(pid, num_m, num_n, GROUP_M)  # GROUP_M row tiles share each column tile in L2
        SCALAR_B: tl.constexpr = B_GROUP >= BLOCK_N  # the tile lies in one weight block: one b scale per K block
        m0, n0 = pid_m * BLOCK_M, pid_n * BLOCK_N
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < M, offs_n < N
        nk = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(nk, SPLIT_K)
        k_lo = pid_k * per_split
        k_hi = tl.minimum(nk, k_lo + per_split)

        if TMA:
            a_ptrs, b_ptrs = a_src, b_src  # not read: the descriptors carry the addresses
        else:
            a_ptrs = a_src + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]
            b_ptrs = b_src + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]
        as_ptrs = as_ptr + offs_m * stride_asm  # the scales' K-step strides: stride_ask / stride_bsk (1 row-major)
        if SCALAR_B:
            bs_ptrs = bs_ptr + (n0 // B_GROUP) * stride_bsn
        else:
            bs_ptrs = bs_ptr + (offs_n // B_GROUP) * stride_bsn
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(k_lo, k_hi):
            k0 = kb * BLOCK_K
            a = _k_block(a_src, a_ptrs, m0, k0, mask_m, offs_k, K, TMA, EVEN_K)
            b = _k_block(b_src, b_ptrs, n0, k0, mask_n, offs_k, K, TMA, EVEN_K)
            a_s = tl.load(as_ptrs + kb * stride_ask, mask=mask_m, other=1.0)  # masked rows: harmless (their a is 0)
            if SCALAR_B:
                b_s = tl.load(bs_ptrs + kb * stride_bsk)
            else:
                b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=mask_n, other=1.0)
            acc = _promote(acc, a, b, a_s, b_s, SCALAR_B, SWAP_AB)
        _store_tile(c_ptr, acc, offs_m, offs_n, mask_m, N, stride_cm, SWAP_AB)

    @triton.jit
    def _sum_splits_kernel(ws_ptr, c_ptr, MN, stride_split, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        """c = sum over the split-K partials ws (SPLIT_K, M*N) float32 (split i's at i * stride_split), cast to c's
        dtype: one pass."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < MN
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for i in tl.static_range(SPLIT_K):
            acc += tl.load(ws_ptr + i * stride_split + offs, mask=mask, other=0.0)
        tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)

    def _gemm_configs():
        cfg = []
        for bm, bn, w, s in [
            # large M. Shared memory per stage is (BM + BN) * 128 bytes; 96 KB or less lets two CTAs share an SM,
            # so one CTA's scaling arithmetic overlaps the other's tensor-core work.
            (128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 4, 4), (128, 256, 8, 3),
            # M <= 64: one 64-row tile (the wgmma minimum) in M, 64 or 128 wide in N, split K (_gemm_plan)
            (64, 128, 4, 4), (64, 128, 4, 3), (64, 128, 4, 5), (64, 64, 4, 4), (64, 64, 4, 6), (64, 64, 4, 3),
        ]:
            cfg.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8},
                                     num_warps=w, num_stages=s))
        return cfg

    def _prune(configs, named_args, **kwargs):
        """M <= 256: the split-K passed in was planned for one tile shape (``_gemm_plan``), so only its warps and
        stages are tuned. Larger M: tiles no taller than the M bucket, and from 1024 rows on 128 rows tall."""
        m = named_args["M_BUCKET"]
        if m <= 256:
            plan, _ = _gemm_plan(m, named_args["N"], _cdiv(named_args["K"], 128),
                                 _sm_count(named_args["a_src"].device.index))
            return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) ==
                    (plan["BLOCK_M"], plan["BLOCK_N"])]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m]
        if m >= 1024:
            kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 128]
        return kept

    _fp8_gemm_tuned = triton.autotune(
        configs=_gemm_configs(), key=["M_BUCKET", "N", "K", "B_GROUP", "SPLIT_K", "EVEN_K"],
        prune_configs_by={"early_config_prune": _prune},
    )(_fp8_gemm_kernel)



_LARGE_M = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
_INTERPRET_CFG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 128, "GROUP_M": 4}  # small tiles: fast to interpret
_MAX_SPLIT = 8
_MIN_STEPS_PER_SPLIT = 4  # 512 of K


# Variants of the GEMM, by name: overrides of the planned config (``_gemm_plan``) for M > 256 and for M <= 256 (None: the
# variant does not apply there and "base" runs). "base" is the planned config (autotuned warps and stages); the default
# "auto" picks per shape from bench/sweep_fp8_gemm.py's H200 numbers (``_auto_variant``; MINIDS_FP8_GEMM,
# ``GEMM_VARIANT`` or fp8_gemm's ``variant`` pick another). Kernel knobs: TMA, SWAP_AB (``_fp8_gemm_kernel``).
# Why: the promotion (acc += partial * scale, one FMA per accumulator element and 128-K step) cannot overlap the same
# warps' next tensor-core product (Triton waits for a dot whose result is used in the loop), so the tensor cores idle
# during it unless another CTA on the SM has its own product in flight. Registers decide how many CTAs share an SM;
# ptxas of Triton 3.6 for sm_90a (offline) gives: base 128 x 128, 8 warps: 190 registers (one CTA per SM); tma: 254;
# 64 x 128 with 4 warps: 168 with TMA (m64: three CTAs per SM, 74 KB of shared memory each). 64-row tiles read 1.5x
# the bytes from L2 per FLOP of 128 x 128. Small M: TMA and swapping A and B change how the weights stream.
# Measured and dropped (bench/results/fp8_gemm_sweep.md, never the fastest on any shape): 64-row tiles through pointer
# loads, a persistent grid of 64-row tiles, 128 x 256 tiles as two 128-wide accumulators (255 registers, spills),
# swapped operands with TMA, TMA with 3 stages at 128 x 128 ("tma"), 64-row TMA tiles with 4 stages ("m64_s4"); for the
# Wgrad form, b's 1x128 scales loaded through TMA into shared memory with the tiles (383-499 TFLOP/s against 515-666
# with plain loads of token-block-major scales, fp8_gemm_sweep-wgrad.md); the promotion one step late, after the next
# product is issued, to overlap it with the tensor cores inside one CTA ("LAG", two product tiles live): 8-16% slower
# with tma_s4 and slower with m64 on four of six shapes, never the fastest (fp8_gemm_sweep-lag.md, 8th session);
# Triton's automatic warp specialization of the K loop (tl.range(..., warp_specialize=True); compiled offline for sm_90
# with Triton 3.9 it applied only to the 64 x 128 tiles of 4 warps: a load partition, 12 warps in all), timed on the
# H200 with those tiles: 34-62% slower than m64 at M = 4096 and slower than base at every M <= 128
# (fp8_gemm_sweep-ws.md, 9th session).
GEMM_VARIANT = os.environ.get("MINIDS_FP8_GEMM", "auto")  # "auto": ``_auto_variant``
GEMM_VARIANTS: dict[str, tuple[dict | None, dict | None]] = {
    "base": ({}, {}),
    "tma_s4": ({"TMA": True, "num_stages": 4}, {"TMA": True, "num_stages": 6}),
    "m64": ({"BLOCK_M": 64, "num_warps": 4, "TMA": True, "num_stages": 3}, None),
    "swap": (None, {"SWAP_AB": True}),
}


WS_VARIANT = "ws"  # the Gluon kernel (kernels/fp8_ws.py): a variant name of its own, outside GEMM_VARIANTS' Triton configs


def _use_ws(a: torch.Tensor, b: torch.Tensor, b_group: int, c: torch.Tensor, variant: str) -> bool:
    """Whether fp8_gemm runs the warp-specialized Gluon kernel: asked for by name ("ws"), or by "auto" where it
    measured faster on the H200 (bench/results/fp8_gemm.md, tenth session, replayed from CUDA graphs: 821-1071
    TFLOP/s at M = 4096 on DeepGEMM's six shapes against this kernel's 589-854; at M = 128, 702 / 529 against 509 /
    405 where N = 24576 / 32768; slower where its 128 x 256 tiles leave most SMs idle, fp8_gemm_ws-sweep.md). It
    runs the weight form on sm_90 only, with TMA-aligned operands (``fp8_ws.usable``)."""
    if variant not in (WS_VARIANT, "auto"):
        return False
    from minids.kernels import fp8_ws

    if INTERPRET or not fp8_ws.usable(a, b, b_group, c):  # (Gluon has no interpreter)
        if variant == WS_VARIANT:
            raise ValueError("fp8_gemm variant 'ws' needs an sm_90 GPU, Triton with Gluon, 128x128 weight scales and "
                             "16-byte aligned rows of a, b and C; use variant='auto' elsewhere")
        return False
    if variant == WS_VARIANT:
        return True
    M, N = a.shape[0], b.shape[0]
    if _m_bucket(M) > 256:
        return True
    return M > 64 and _cdiv(M, 128) * _cdiv(N, 256) * 2 >= _sm_count(a.device.index)


def fp8_gemm_if_ws(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                   out_dtype: torch.dtype = torch.bfloat16, block: int = 128) -> torch.Tensor | None:
    """The FP8 linear's weight-form GEMM on the Gluon kernel where it beats block-scaled cuBLAS, else None (the
    caller goes on to cuBLAS): K <= 512 at M > 256 (H200, fp8_gemm_ws-sweep2.md, M = 4096, N = 32768, K = 512: 850
    TFLOP/s against block-scaled cuBLAS's 820; on DeepGEMM's other shapes cuBLAS ran 1-14% ahead)."""
    if not a.is_cuda or INTERPRET or a.shape[1] > 512 or a.shape[0] <= 256 or block != 128:
        return None
    M, N, _, b_group = _gemm_check(a, a_s, b, b_s, block)
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if not (a.dtype in _FP8_DTYPES and b.dtype in _FP8_DTYPES) or not _use_ws(a, b, b_group, c, "auto"):
        return None
    from minids.kernels import fp8_ws

    return fp8_ws.fp8_gemm_ws(a, a_s, b, b_s, out=c)


def _auto_variant(M: int, K: int, b_group: int = 128) -> str:
    """The default variant, from bench/sweep_fp8_gemm.py on an H200 (results in bench/results/fp8_gemm_sweep*.md):
    at M > 256, 64-row TMA tiles where K <= 2048 (their short K loops leave a 128 x 128 CTA's promotion exposed:
    849 / 625 / 877 TFLOP/s against base's 573 / 424 / 640 at K = 1536 / 512 / 2048), else 128 x 128 TMA tiles with
    four stages (964 at 4096 x 7168 x 16384, base 746); the Wgrad form (b_group 1: a (BLOCK_N,) vector of b scales
    per K step, a heavier promotion) takes the 64-row tiles at every K (750-829 TFLOP/s over 4096 tokens against
    515-666 for tma_s4, fp8_gemm_sweep-wgrad.md; measured at K = 4096 tokens only); at M <= 256 the planned config
    ("base"). The interpreter runs "base" (small tiles); the tests run every named variant there."""
    if INTERPRET or _m_bucket(M) <= 256:
        return "base"
    return "m64" if K <= 2048 or b_group == 1 else "tma_s4"


def _m_bucket(M: int) -> int:
    """Autotuning key for M: the next power of two (at least 16, at most 8192). 64 and 128 are separate buckets."""
    return min(8192, max(16, 1 << (M - 1).bit_length()))


@functools.lru_cache(maxsize=4096)
def _gemm_plan(m_bucket: int, N: int, nk: int, sms: int) -> tuple[dict, int]:
    """The heuristic's config and split-K for M (its bucket), N, nk = ceil(K/128) on ``sms`` SMs: (config, split).

    M > 256: 128 x 128 tiles fill the GPU without a split. M <= 64: tiles 64 rows tall (the wgmma minimum), 128 or
    64 wide; 65..128: one tile 128 rows tall (8 warps; B is read once instead of twice), 128 wide through TMA with 4
    stages or 64 wide through pointers with 3; 129..256: 128 x 128. Then the (BLOCK_N, split) of least estimated time
    in a crude model,
        waves x K steps per CTA x step cost (a 64 x 128 or 128 x 128 tile: 1; 64 x 64 or 128 x 64: 0.7)
        + for split > 1, the reduction pass (about 4 steps, plus one per MiB of float32 partials),
    with waves counted at two CTAs per SM (shared memory and registers let two of these configs share one; one for
    the 128-row tiles of M <= 128), every split at least 512 of K (4 steps), at most 8 splits and none empty. Grids
    come out at one to two waves of 132 SMs (the very wide N of 24576 or 32768: about three).
    bench/fp8.py --only plans times the alternatives: at M = 128 this model's picks ran within 5% of the best of all
    (64 and 128 rows, 64 and 128 wide, TMA or not, 1-8 splits) on DeepGEMM's six shapes, 1.01-1.16x the 64-row
    tiles planned before (374-618 TFLOP/s against 355-550, fp8_gemm_plans.md, ninth session).
    """
    if m_bucket > 256:
        return _LARGE_M, 1
    bm = 64 if m_bucket <= 64 else 128
    m_tiles = _cdiv(m_bucket, bm)
    per_sm = 1 if m_bucket == 128 else 2
    best = None
    for bn in (128, 64) if m_bucket <= 128 else (128,):
        tiles = m_tiles * _cdiv(N, bn)
        for split in range(1, _MAX_SPLIT + 1):
            per = _cdiv(nk, split)  # K steps per split, as the kernel divides them
            if split > 1 and per < _MIN_STEPS_PER_SPLIT:
                break
            if _cdiv(nk, per) != split:  # the last split would be empty
                continue
            waves = _cdiv(tiles * split, per_sm * sms)
            cost = waves * per * (1.0 if bn == 128 else 0.7)
            if split > 1:
                cost += 4 + split * m_bucket * N / 2**18
            if best is None or cost < best[0]:  # ties keep the first: 128 wide before 64, fewer splits first
                best = (cost, bn, split)
    _, bn, split = best
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4 if bm == 64 else 8,
           "num_stages": 4 if bm == 64 else 3}
    if m_bucket == 128:  # a fixed config (not autotuned: the tuner's configs have no TMA), as measured
        cfg.update(TMA=bn == 128, num_stages=4 if bn == 128 else 3)
    return cfg, split


def _variant_plan(variant: str, M: int, N: int, nk: int, sms: int) -> tuple[dict, int] | None:
    """(config, split) of a named variant for this shape: the plan's with the variant's overrides; None where the
    variant does not apply (its overrides for this M are None)."""
    cfg, split = _gemm_plan(_m_bucket(M), N, nk, sms)
    large, small = GEMM_VARIANTS[variant]
    over = large if _m_bucket(M) > 256 else small
    return None if over is None else ({**cfg, **over}, split)


_INTERPRET_SMS = 132  # the SM count the interpreter plans for (an H200's), so its plans are the GPU's


@functools.lru_cache(maxsize=4096)  # its arguments and the fixed tables decide it; the configs it returns are only read
def _plan_for(M: int, N: int, K: int, variant: str, sms: int, b_group: int = 128) -> tuple[str, dict, int, bool]:
    """What ``fp8_gemm`` runs (outside the interpreter's "base" shortcut): (variant, config, split, planned), variant
    "auto" resolved: a named variant's fixed config where it applies (planned False), else the plan's (planned True:
    the autotuner refines it unless MINIDS_AUTOTUNE=0)."""
    if variant == "auto":
        variant = _auto_variant(M, K, b_group)
    nk = _cdiv(K, 128)
    plan = None if variant == "base" else _variant_plan(variant, M, N, nk, sms)
    if plan is not None:
        return variant, *plan, False
    cfg, split = _gemm_plan(_m_bucket(M), N, nk, sms)
    # autotuned unless the plan names a knob the tuner's configs lack (TMA: the M bucket 128's fixed plan)
    return variant, cfg, split, "TMA" not in cfg


@functools.cache
def _tma_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def _tma_ok(*ts: torch.Tensor) -> bool:
    """Whether 2-D FP8 tensors can be read through TMA descriptors: 16-byte aligned base and row stride, on a GPU of
    compute capability 9 or later (or the interpreter)."""
    if any(t.data_ptr() % 16 or t.stride(0) % 16 for t in ts):
        return False
    return INTERPRET or _tma_device(ts[0].device.index if ts[0].device.index is not None else 0)


def _gemm_run(a, a_s, b, b_s, res: torch.Tensor, b_group: int, cfg: dict, split: int, tuned: bool) -> torch.Tensor:
    """Launch the GEMM into res (M, N) with one config (or the autotuner, which keeps cfg's tile shape for small M)
    and ``split`` K splits; split > 1 writes float32 partials that ``_sum_splits_kernel`` adds in a fixed order.
    cfg: the kernel's meta-parameters with num_warps and num_stages, optionally the variant knobs TMA and SWAP_AB
    (``GEMM_VARIANTS``); TMA falls back to pointer loads where ``_tma_ok`` says no."""
    M, K = a.shape
    N = b.shape[0]
    c = res[None] if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=a.device)
    rest = (c, a_s, b_s, M, N, K, _m_bucket(M), a.stride(0), b.stride(0), c.stride(0), c.stride(1), *a_s.stride(),
            *b_s.stride())
    consts = {"B_GROUP": b_group, "SPLIT_K": split, "EVEN_K": K % 128 == 0}
    if tuned:
        def grid(meta):
            return (_cdiv(M, meta["BLOCK_M"]) * _cdiv(N, meta["BLOCK_N"]), split)

        _fp8_gemm_tuned[grid](a, b, *rest, **consts)
    else:
        cfg = dict(cfg)
        a_src, b_src = a, b
        if cfg.get("TMA"):
            cfg["TMA"] = _tma_ok(a, b)
        if cfg.get("TMA"):
            from triton.tools.tensor_descriptor import TensorDescriptor

            a_src = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
            b_src = TensorDescriptor.from_tensor(b, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
        grid = (_cdiv(M, cfg["BLOCK_M"]) * _cdiv(N, cfg["BLOCK_N"]), split)
        _fp8_gemm_kernel[grid](a_src, b_src, *rest, **consts, **cfg)
    if split > 1:
        _sum_splits_kernel[(_cdiv(M * N, 1024),)](c, res, M * N, M * N, SPLIT_K=split, BLOCK=1024, num_warps=4)
    return res


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, block: int = 128, out: torch.Tensor | None = None,
    variant: str | None = None,
) -> torch.Tensor:
    """C (M, N) = (a a_s)(b b_s)^T with fp32 accumulation, as ``minids.fp8.fp8_gemm`` (same arguments; ``out``:
    an optional preallocated (M, N) output; ``variant``: a name in ``GEMM_VARIANTS``, default ``GEMM_VARIANT``).

    a: (M, K) FP8, a_s: (M, ceil(K/b)); b: (N, K) FP8 with b_s (ceil(N/b), ceil(K/b)) 128x128 block scales
    (weights) or (N, ceil(K/b)) 1x128 scales (Wgrad: both operands quantized along the token dim).
    """
    require_runs_here(a, "minids.kernels.fp8.fp8_gemm", "minids.fp8.fp8_gemm")
    M, N, K, b_group = _gemm_check(a, a_s, b, b_s, block)
    if not (a.dtype in _FP8_DTYPES and b.dtype in _FP8_DTYPES):
        raise ValueError(f"fp8_gemm (Triton) takes FP8 operands, got a {a.dtype} and b {b.dtype}: quantize them with "
                         "act_quant / weight_quant first")
    if block != 128:
        raise ValueError(f"block={block}: the Triton FP8 GEMM implements DeepSeek-V3's 128")
    variant = GEMM_VARIANT if variant is None else variant
    if variant not in ("auto", WS_VARIANT) and variant not in GEMM_VARIANTS:
        raise ValueError(f"unknown FP8 GEMM variant {variant!r}; one of {sorted([*GEMM_VARIANTS, WS_VARIANT])}")
    a = a if a.stride(-1) == 1 else a.contiguous()
    b = b if b.stride(-1) == 1 else b.contiguous()
    # any strides: the kernel takes both of each scale tensor (the 128x1 scales of act_quant_t / act_quant_both come
    # token-block-major, which the Wgrad GEMM wants; see _scales_t)
    a_s = a_s if a_s.dtype == torch.float32 else a_s.float()
    b_s = b_s if b_s.dtype == torch.float32 else b_s.float()
    nk = _cdiv(K, block)
    res = _buf(None if out is None else (out,), 0, (M, N), out_dtype, a.device)
    if M == 0 or N == 0 or K == 0:
        return res.zero_()
    if _use_ws(a, b, b_group, res, variant):
        from minids.kernels import fp8_ws

        return fp8_ws.fp8_gemm_ws(a, a_s, b, b_s, out=res)
    if INTERPRET and variant in ("base", "auto"):  # no autotuning in the interpreter: small tiles, and a split
        return _gemm_run(a, a_s, b, b_s, res, b_group, _INTERPRET_CFG, 2 if nk >= 2 else 1, tuned=False)
    _, cfg, split, planned = _plan_for(M, N, K, variant, _INTERPRET_SMS if INTERPRET else _sm_count(a.device.index),
                                       b_group)
    return _gemm_run(a, a_s, b, b_s, res, b_group, cfg, split, tuned=planned and AUTOTUNE and not INTERPRET)


# ----------------------------------------------------------------------------------------------- block-scaled cuBLAS
# Keys: the device index, the form ("weight": 128x128 block scales of b, Fprop and Dgrad; "act": 1x128 scales of b,
# Wgrad) and the output dtype.
CUBLAS_PROBE: dict[tuple, str] = {}  # key -> what the probe found (printed by bench/fp8.py)
_CUBLAS_DEVICE: dict[tuple, bool] = {}  # key -> whether block-wise _scaled_mm runs right there (the probe's answer)
_CUBLAS_CHECKED: dict = {}  # key + (M bucket, N, K) -> whether cuBLAS gave the Triton GEMM's product there
_CUBLAS_REFUSED: set = set()  # key + (M, N, K) that torch._scaled_mm refused with an error


def _m_major(s: torch.Tensor) -> torch.Tensor:
    """(rows, blocks) scales with strides (1, rows), as block-scaled cuBLAS reads activation scales (a copy if not)."""
    return s if s.stride() == (1, s.shape[0]) else s.t().contiguous().t()


def _scaled_mm_blockwise(a, a_s, b, b_s, out_dtype, form: str = "weight"):
    """torch._scaled_mm with DeepSeek's block-wise scales, in the one layout torch 2.11 takes: a_s M-major and, in the
    weight form, b_s the transposed view of a contiguous (ceil(N/128), K/128) tensor; in the act form (1x128 scales
    of b, the Wgrad GEMM) b_s M-major too, passed transposed."""
    if form == "act":
        return torch._scaled_mm(a, b.t(), scale_a=_m_major(a_s), scale_b=_m_major(b_s).t(), out_dtype=out_dtype)
    sb = b_s if b_s.is_contiguous() else b_s.contiguous()
    return torch._scaled_mm(a, b.t(), scale_a=_m_major(a_s), scale_b=sb.t(), out_dtype=out_dtype)


def _pad_k(a, a_s, b, b_s, form: str) -> tuple:
    """The operands zero-padded along K to a multiple of 512 (four 128-wide K blocks, see ``cublas_fp8_gemm``), their
    scales padded with ones (the padding contributes zero products); activation scales come back M-major."""
    K, nk = a.shape[1], a_s.shape[1]
    kp = _cdiv(K, 512) * 512

    def values(t):
        out = torch.empty(t.shape[0], kp, dtype=t.dtype, device=t.device)
        out[:, K:] = 0
        # copied as 8-byte words where the rows allow it: an FP8 slice copy runs element by element (50 us for 24 MB
        # on the H200, bench/results/fp8_linear_kernels-pad.md)
        w = next(n for n in (8, 4, 2, 1) if K % n == 0)
        words = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[w]
        out.view(torch.uint8)[:, :K].view(words).copy_(t.contiguous().view(torch.uint8).view(words))
        return out

    def scales(s, m_major: bool):  # (rows, kp/128) ones, M-major (stored (kp/128, rows)) or row-major; s written in
        rows, nkp = s.shape[0], kp // 128
        out = torch.ones(nkp, rows, device=s.device).t() if m_major else torch.ones(rows, nkp, device=s.device)
        out[:, :nk] = s
        return out

    return values(a), scales(a_s, True), values(b), scales(b_s, form == "act")


def _cublas_device_ok(index: int, form: str = "weight", out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether torch._scaled_mm takes DeepSeek's block-wise scales of ``form`` with ``out_dtype`` on CUDA device
    ``index`` with this torch: one product (256 x 384 x 512) through ``_scaled_mm_blockwise`` checked against the
    reference, once per key and process; what it found goes into ``CUBLAS_PROBE``."""
    key = (index, form, out_dtype)
    ok = _CUBLAS_DEVICE.get(key)
    if ok is not None:
        return ok
    from minids import fp8 as ref

    dev = torch.device("cuda", index)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.autocast("cuda", enabled=False):  # the reference's float32 matmuls, not autocast's bf16 ones
        if form == "act":  # as the Wgrad GEMM gets them: 128x1 quantizations along the 512 tokens, M-major scales
            a, a_s = act_quant_t(torch.randn(512, 256, device=dev, generator=g).bfloat16())
            b, b_s = act_quant_t(torch.randn(512, 384, device=dev, generator=g).bfloat16())
        else:
            a, a_s = act_quant(torch.randn(256, 512, device=dev, generator=g).bfloat16())
            b, b_s = weight_quant(torch.randn(384, 512, device=dev, generator=g).bfloat16())
        try:
            c = _scaled_mm_blockwise(a, a_s, b, b_s, out_dtype, form).float()
        except (RuntimeError, ValueError, TypeError) as e:  # no block-wise form in this torch / cuBLAS / GPU
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            CUBLAS_PROBE[key], ok = f"refused: {type(e).__name__}: {first}", False
        else:
            want = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
            err = ((c - want).abs().max() / want.abs().max()).item()
            CUBLAS_PROBE[key] = f"max error {err:.2e} of max |C| (bound 2^-7: a wrong layout gives errors near 1)"
            ok = err <= 2.0**-7
    _CUBLAS_DEVICE[key] = ok
    return ok


def cublas_fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, block: int = 128,
) -> torch.Tensor | None:
    """``fp8_gemm`` (same arguments, same result up to the order of float32 additions) on block-scaled cuBLAS through
    torch._scaled_mm, or None where that does not run or is not right. Both forms: 128x128 block scales of b (the
    weight form: the FP8 linear's Fprop and Dgrad) and 1x128 scales of b (the act form: its Wgrad); the FP8 linear
    takes it first for all three (``minids.fp8.LINEAR_GEMM``). Where it is right it ran Fprop and Dgrad at 1030-1205
    TFLOP/s where the Triton GEMM ran 601-907 (H200, bench/results/fp8_linear_gemms.md, timed there without the a_s
    copy below), and the Wgrad form at 880-942 against the Triton GEMM's 750-829 (fp8_gemm_sweep-wgrad.md).

    None without trying: no CUDA tensors, a form or output dtype this torch and GPU do not compute right (probed once
    per device, form and dtype), M = 0 or not a multiple of 4 (torch 2.11 refused M = 1 and 127 with
    CUBLAS_STATUS_NOT_SUPPORTED), N not a multiple of 16. A shape torch refused before stays refused. K not a multiple
    of 512 is zero-padded to one, both operands and their scales copied (``_pad_k``): torch 2.11 passes cuBLAS a
    block-scale tensor that cuBLAS requires padded to a multiple of four K blocks, and gave wrong products without an
    error otherwise (4e3 to 2e22 times max |C| off at 64 x 256 x 256, 300 x 512 x 384, 300 x 384 x 128, 256 x 256 x
    2112 on the H200; the cause reported in pytorch/pytorch PR 166752) or refused K = 2112.

    The first call of each (device, form, dtype, M bucket, N, K) also runs the Triton GEMM and compares (one extra
    GEMM and one synchronization); where they differ by more than 2^-7 of max |C| that call returns the Triton product
    and the shape stays on Triton (a first product of zeros decides nothing). Inside a CUDA-graph capture or
    torch.compile a device or shape not yet decided takes the Triton GEMM (None): deciding synchronizes. Scales of
    activations are read M-major: act_quant's row-major scales are copied (a (M, K/128) float32 copy; the Triton GEMM
    reads them faster row-major, see ``_scales_t``); act_quant_t's are M-major already."""
    if not a.is_cuda:
        return None
    M, K = a.shape
    N = b.shape[0]
    nk = _cdiv(K, 128)
    form = "act" if tuple(b_s.shape) == (N, nk) else "weight" if tuple(b_s.shape) == (_cdiv(N, 128), nk) else None
    if (form is None or block != 128 or M == 0 or M % 4 or N % 16
            or out_dtype not in (torch.bfloat16, torch.float32)
            or a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn):
        return None
    probe = (a.device.index or 0, form, out_dtype)
    key = probe + (_m_bucket(M), N, K)
    decided = probe in _CUBLAS_DEVICE and key in _CUBLAS_CHECKED
    if not decided and (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
        return None
    if not _cublas_device_ok(*probe) or _CUBLAS_CHECKED.get(key) is False or probe + (M, N, K) in _CUBLAS_REFUSED:
        return None
    try:
        c = _scaled_mm_blockwise(*(_pad_k(a, a_s, b, b_s, form) if K % 512 else (a, a_s, b, b_s)), out_dtype, form)
    except RuntimeError:
        _CUBLAS_REFUSED.add(probe + (M, N, K))
        return None
    if key not in _CUBLAS_CHECKED:
        want = fp8_gemm(a, a_s, b, b_s, out_dtype, block)
        top = want.float().abs().max()
        ok = ((c.float() - want.float()).abs().max() <= 2.0**-7 * top).item()
        if top.item() > 0:
            _CUBLAS_CHECKED[key] = ok
        if not ok:
            return want
    return c
