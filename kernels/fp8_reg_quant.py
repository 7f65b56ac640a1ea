"""The transposing activation quantizations (``act_quant_both``, ``act_quant_t``, and its FP8 requantization) as a Gluon
kernel whose register layout makes the transpose free: no tile crosses shared memory.

One program quantizes a (128 tokens x 128 features) tile of x (M, K). Each thread holds 8 consecutive tokens x 4
consecutive features per repetition (``_layouts``: size_per_thread [8, 4], the 32 lanes of a warp along the
features, the warps along the tokens), so
- x is read 4 features a thread (a warp reads 256 contiguous bytes of a bf16 row);
- the 1x128 quantization along the features (q, s) is a 4-value max in the thread and a shuffle across its warp, and
  q is written 4 bytes a thread straight from registers;
- the 128x1 quantization along the tokens (qt, st) is a 32-value max in the thread and a small exchange across the
  warps, and qt (K, M) is written 8 tokens (8 bytes) a thread, also from registers: the layout that stores it differs
  from the arithmetic's only in the order of a thread's own registers, so the conversion moves nothing between
  threads.
The Triton kernels (``kernels.fp8``) cannot choose their layout: their transposed stores go through a shared-memory
layout conversion, which Nsight Compute showed with 5.6-6.8-way bank conflicts (bench/results/ncu_quant-2026-12-02.txt).

The arithmetic is the Triton kernels' (``kernels.fp8._scale_of`` and ``_quantize``, fast mode: the same jitted
functions), so the outputs are theirs bit for bit; the GPU tests check that. Off by default (``kernels.fp8.REG_QUANT``).

What it measured (H200, bench/results/fp8_reg_quant-lanes1.md): with all 32 lanes of a warp along the features
(LANES_T = 1) it was bit-exact (18 GPU tests) and about half as fast as the Triton kernels: act_quant_both 1426 against
2607 GB/s, act_quant_t 1497 against 3099, the requantization 1008 against 1737 (8192 x 7168). Each qt store of a warp
then writes 8 bytes into 32 different rows. LANES_T = 4 (4 lanes along the tokens: 32 contiguous bytes of a qt row, a
whole sector, per feature and store) compiles for sm_90 with the same premise (tests/test_kernels_aot.py) but has not
run on a GPU yet: ``bash bench/device_fp8.sh reg`` runs its tests and the comparison. If it loses as well, remove this
module.
"""

from __future__ import annotations

import functools

import torch

try:
    from minids.kernels.fp8 import _quantize, _scale_of
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = True  # register layouts, loads and stores only: no TMA or MMA API that moved between releases
except ImportError:  # no Triton, or one without Gluon
    HAVE_GLUON = False

BLOCK = 128  # tokens and features of a tile: one quantization block each way

if HAVE_GLUON:
    TILE = gl.constexpr(BLOCK)

    @gluon.jit
    def _reg_quant_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, qt_ptr, st_ptr, M, K,
                          stride_xm, stride_xsm, stride_xsk, stride_qm, stride_sm, stride_sk, stride_qtk,
                          stride_stk, stride_stb,
                          FMAX: gl.constexpr, MBITS: gl.constexpr, EMIN: gl.constexpr, UE8M0: gl.constexpr,
                          IN_SCALE: gl.constexpr, WRITE_Q: gl.constexpr,
                          LAYOUT: gl.constexpr, T_LAYOUT: gl.constexpr):
        """Tile (program_id 0: tokens, program_id 1: features) of x; see the module docstring."""
        pid_m = gl.program_id(0)
        pid_k = gl.program_id(1)
        rows = pid_m * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(1, LAYOUT))
        cols = pid_k * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(0, LAYOUT))
        rmask = rows < M
        cmask = cols < K
        mask = gl.expand_dims(rmask, 1) & gl.expand_dims(cmask, 0)
        x = gl.load(x_ptr + gl.expand_dims(rows.to(gl.int64) * stride_xm, 1) + gl.expand_dims(cols, 0), mask=mask,
                    other=0.0).to(gl.float32)
        if IN_SCALE:
            xs = gl.load(xs_ptr + rows * stride_xsm + pid_k * stride_xsk, mask=rmask, other=0.0)
            x = x * gl.expand_dims(xs, 1)
        ax = gl.abs(x)
        if WRITE_Q:
            sr = _scale_of(gl.max(ax, axis=1), FMAX, UE8M0)  # (TILE,): along the features
            q = _quantize(x, gl.expand_dims(sr, 1), FMAX, MBITS, EMIN, UE8M0, False, False)
            gl.store(q_ptr + gl.expand_dims(rows.to(gl.int64) * stride_qm, 1) + gl.expand_dims(cols, 0),
                     q.to(q_ptr.dtype.element_ty), mask=mask)
            gl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, sr, mask=rmask)
        sc = _scale_of(gl.max(ax, axis=0), FMAX, UE8M0)  # (TILE,): along the tokens
        qt = _quantize(x, gl.expand_dims(sc, 0), FMAX, MBITS, EMIN, UE8M0, False, False)
        qt = gl.convert_layout(qt.to(qt_ptr.dtype.element_ty), T_LAYOUT)  # a thread's own registers reordered
        rows_t = pid_m * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(1, T_LAYOUT))
        cols_t = pid_k * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(0, T_LAYOUT))
        mask_t = gl.expand_dims(rows_t < M, 1) & gl.expand_dims(cols_t < K, 0)
        gl.store(qt_ptr + gl.expand_dims(cols_t.to(gl.int64) * stride_qtk, 0) + gl.expand_dims(rows_t, 1), qt,
                 mask=mask_t)
        gl.store(st_ptr + cols * stride_stk + pid_m * stride_stb, sc, mask=cmask)


@functools.cache
def _layouts(num_warps: int, lanes_t: int):
    """(arithmetic layout, store layout of the transposed copy) of a 128 x 128 tile: 8 tokens x 4 features a thread,
    lanes_t lanes along the tokens and 32 / lanes_t along the features, the warps along the tokens (lanes_t = 1) or
    the features; the second lists a thread's registers tokens first, so its 8 tokens of a feature are one 8-byte
    store. lanes_t = 4: the 4 lanes of a feature write its 32 contiguous bytes, a whole sector of qt, and a warp's q
    store covers 32 contiguous bytes of a row; lanes_t = 1: every lane of a qt store writes another row."""
    wt = num_warps if lanes_t == 1 else 1
    kw = {"size_per_thread": [8, 4], "threads_per_warp": [lanes_t, 32 // lanes_t],
          "warps_per_cta": [wt, num_warps // wt]}
    return gl.BlockedLayout(order=[1, 0], **kw), gl.BlockedLayout(order=[0, 1], **kw)


WARPS, LANES_T = 4, 4  # lanes_t = 1 ran at 33-38% of the copy rate (bench/results/fp8_reg_quant-lanes1.md)


def usable(x: torch.Tensor, block: int, exact: bool, in_block: int = BLOCK) -> bool:
    """Whether ``quant_tiles`` can take this call: Gluon present, an sm_90 GPU, block 128 (and 1x128 input scales),
    the fast mode, a 2-D x with contiguous rows."""
    if not HAVE_GLUON or exact or block != BLOCK or in_block != BLOCK or not x.is_cuda or x.dim() != 2:
        return False
    return torch.cuda.get_device_capability(x.device)[0] == 9 and x.stride(-1) == 1


def quant_tiles(x, qt, st, q=None, s=None, in_scale=None, *, flags: dict, num_warps: int | None = None) -> None:
    """Fill qt (K, M) / st (K, ceil(M/128)) and, if given, q (M, K) / s (M, ceil(K/128)) from x (M, K) (FP8 x: with
    its 1x128 scales in_scale). flags: the format constants of ``kernels.fp8._flags`` (fast mode)."""
    M, K = x.shape
    layout, t_layout = _layouts(num_warps or WARPS, LANES_T)
    xs = in_scale if in_scale is not None else st
    q_, s_ = (q, s) if q is not None else (qt, st)
    _reg_quant_kernel[(-(-M // BLOCK), -(-K // BLOCK))](
        x, xs, q_, s_, qt, st, M, K, x.stride(0), *xs.stride(), q_.stride(0), *s_.stride(), qt.stride(0),
        *st.stride(),
        FMAX=flags["FMAX"], MBITS=flags["MBITS"], EMIN=flags["EMIN"], UE8M0=flags["UE8M0"],
        IN_SCALE=in_scale is not None, WRITE_Q=q is not None, LAYOUT=layout, T_LAYOUT=t_layout,
        num_warps=num_warps or WARPS,
    )
