"""The transposing activation quantizations (``act_quant_both``, ``act_quant_t``, and its FP8 requantization) as a Gluon
kernel whose register layout makes the transpose free: no tile crosses shared memory.

One program quantizes a (128 tokens x 128 features) tile of x (M, K). Each thread holds a few consecutive tokens x a
few consecutive features per repetition (``valid_spec``; e.g. 8 x 16, with lanes and warps split between the two dims),
so
- x is read as vectors of a thread's consecutive features;
- the 1x128 quantization along the features (q, s) is a max in the thread, a shuffle across its lanes and (if warps
  lie along the features) a small exchange across the warps, and q is written straight from registers;
- the 128x1 quantization along the tokens (qt, st) is the same along the other dim, and qt (K, M) is written a
  thread's tokens of a feature (8 tokens: 8 bytes) per store, also from registers: the layout that stores it differs
  from the arithmetic's only in the order of a thread's own registers, so the conversion moves nothing between
  threads.
The Triton kernels (``kernels.fp8``) cannot choose their layout: their transposed stores go through a shared-memory
layout conversion, which Nsight Compute showed with 5.6-6.8-way bank conflicts (bench/results/ncu_quant-2026-12-02.txt).

The arithmetic is the Triton kernels' (``kernels.fp8._scale_of`` and ``_quantize``, fast mode: the same jitted
functions), so the outputs are theirs bit for bit; the GPU tests check that.

What it measured (H200, torch 2.11, Triton 3.6): with all 32 lanes of a warp along the features (spec (8, 4, 1, 4, 4))
it was bit-exact and about half as fast as the Triton kernels (bench/results/fp8_reg_quant-lanes1.md): each qt store
of a warp wrote 8 bytes into 32 different rows. With 4 lanes along the tokens (8, 4, 4, 1, 4) act_quant_t and the
requantization overtook them, act_quant_both did not (fp8_reg_quant.log). Two sweeps of 59 layouts
(bench/sweep_reg_quant.py; fp8_reg_quant-sweep.md, and fp8_reg_quant-sweep2.md after the scale's division went)
chose ``SPECS``; two more, timed from CUDA graphs (fp8_reg_quant-sweep3.md, sweep4.md), moved the requantization
to (16, 4, 4, 2, 4) and capped act_quant_both at 168 registers. From CUDA graphs (fp8_reg_quant.md), 8192 x 7168 /
4096 x 32768, against the Triton kernels:
- act_quant_both 3433 / 3579 GB/s against 2716 / 2829;
- act_quant_t 3863 / 4130 against 3648 / 3896;
- the requantization 2964 / 3215 against 2242 / 2295 (2983-2994 / 3227 with ``ORDER``'s tile order:
  fp8_quant.md, fp8_reg_quant.md);
- weight_quant's transposed form (``weight=True``; off, ``kernels.fp8.REG_QUANT_WEIGHT``) 3152 / 3322 against
  3077 / 3347: with the float32-bits rounding it shares with the Triton weight kernel, no gain (3626 / 3710 with
  the hardware conversion it used before).
Tried for the requantization and dropped (kernels_notes.md): two or four tiles a program, each tile's loads issued
before the previous tile's arithmetic (no faster for any call, fp8_reg_quant-sweep4.md: 237-255 registers a thread
against 161); 64- and 32-feature tiles (sweep5); the last wave's tiles cut into 2-8 narrower programs (2928 against
2969 GB/s, fp8_reg_quant-tailsplit.md); x held as its FP8 bytes and dequantized twice, for 4 programs an SM at 128
registers or 8 warps (2976 against 2990 at best, fp8_reg_quant-recompute.md).
Called from Python the host costs about 8 us more a call than the Triton kernels' (fp8_host.md: act_quant_t 78.9
against 70.7 us).
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
                          IN_SCALE: gl.constexpr, WRITE_Q: gl.constexpr, WEIGHT: gl.constexpr,
                          SOFT_CVT: gl.constexpr, SPT_T: gl.constexpr, SPT_K: gl.constexpr, LANES_T: gl.constexpr,
                          WARPS_T: gl.constexpr, NUM_WARPS: gl.constexpr, GROUP_M: gl.constexpr,
                          GROUP_K: gl.constexpr):
        """One 128 x 128 tile of x: (program_id 0: token block, program_id 1: feature block), or with GROUP_K > 0 the
        tile program_id 0 of group (program_id 1, program_id 2) (``ORDER``); see the module docstring. The layout spec
        (``valid_spec``) comes as integers and the two layouts are built here, so a launch passes plain integers."""
        LAYOUT: gl.constexpr = gl.BlockedLayout([SPT_T, SPT_K], [LANES_T, 32 // LANES_T],
                                                [WARPS_T, NUM_WARPS // WARPS_T], [1, 0])
        T_LAYOUT: gl.constexpr = gl.BlockedLayout([SPT_T, SPT_K], [LANES_T, 32 // LANES_T],
                                                  [WARPS_T, NUM_WARPS // WARPS_T], [0, 1])
        if GROUP_K == 0:  # token blocks fastest: consecutive programs take the token blocks of one feature block
            pid_m = gl.program_id(0)
            pid_k = gl.program_id(1)
        else:  # consecutive programs take a GROUP_M x GROUP_K group of tiles, feature blocks fastest
            pid_m = gl.program_id(1) * GROUP_M + gl.program_id(0) // GROUP_K
            pid_k = gl.program_id(2) * GROUP_K + gl.program_id(0) % GROUP_K
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
        if WEIGHT:  # one 128 x 128 block scale: q and its transposed copy hold the same values
            sw = _scale_of(gl.max(gl.max(ax, axis=1), axis=0), FMAX, UE8M0)
            qt = _quantize(x, sw, FMAX, MBITS, EMIN, UE8M0, False, SOFT_CVT).to(qt_ptr.dtype.element_ty)
            gl.store(q_ptr + gl.expand_dims(rows.to(gl.int64) * stride_qm, 1) + gl.expand_dims(cols, 0), qt, mask=mask)
            gl.store(s_ptr + pid_m * stride_sm + pid_k * stride_sk, sw)
        else:
            if WRITE_Q:
                sr = _scale_of(gl.max(ax, axis=1), FMAX, UE8M0)  # (TILE,): along the features
                q = _quantize(x, gl.expand_dims(sr, 1), FMAX, MBITS, EMIN, UE8M0, False, SOFT_CVT)
                gl.store(q_ptr + gl.expand_dims(rows.to(gl.int64) * stride_qm, 1) + gl.expand_dims(cols, 0),
                         q.to(q_ptr.dtype.element_ty), mask=mask)
                gl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, sr, mask=rmask)
            sc = _scale_of(gl.max(ax, axis=0), FMAX, UE8M0)  # (TILE,): along the tokens
            qt = _quantize(x, gl.expand_dims(sc, 0), FMAX, MBITS, EMIN, UE8M0, False, SOFT_CVT)
            qt = qt.to(qt_ptr.dtype.element_ty)
        qt = gl.convert_layout(qt, T_LAYOUT)  # a thread's own registers reordered
        rows_t = pid_m * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(1, T_LAYOUT))
        cols_t = pid_k * TILE + gl.arange(0, TILE, layout=gl.SliceLayout(0, T_LAYOUT))
        mask_t = gl.expand_dims(rows_t < M, 1) & gl.expand_dims(cols_t < K, 0)
        gl.store(qt_ptr + gl.expand_dims(cols_t.to(gl.int64) * stride_qtk, 0) + gl.expand_dims(rows_t, 1), qt,
                 mask=mask_t)
        if not WEIGHT:
            gl.store(st_ptr + cols * stride_stk + pid_m * stride_stb, sc, mask=cmask)


def valid_spec(spec: tuple[int, ...]) -> bool:
    """Whether a layout spec = (tokens a thread, features a thread, lanes along the tokens, warps along the tokens,
    warps) covers at most a 128 x 128 tile each way (a larger one would compute its values twice). The rest of the 32
    lanes and of the warps lie along the features; the kernel's second layout (the transposed store's) lists a
    thread's registers tokens first, so its tokens of a feature are one store."""
    spt_t, spt_k, lanes_t, warps_t, num_warps = spec[:5]
    return (32 % lanes_t == 0 and num_warps % warps_t == 0 and spt_t * lanes_t * warps_t <= BLOCK
            and spt_k * (32 // lanes_t) * (num_warps // warps_t) <= BLOCK)


# the layout of each call: act_quant_both (bf16 x), act_quant_t (16- or 32-bit x), the FP8 requantization; the fastest
# bit-exact spec of each in bench/sweep_reg_quant.py's 105 at 8192 x 7168 on the H200, timed from CUDA graphs
# (fp8_reg_quant-sweep3.md, requantization; fp8_reg_quant-sweep4.md, the four best layouts of each call with and
# without a 168-register cap: act_quant_both 3495 GB/s capped against 3358 uncapped; the requantization 2993 at
# (16, 4, 4, 2, 4) against 2947 at the earlier (16, 8, 4, 2, 4)). An optional sixth entry caps a thread's registers.
SPECS = {"both": (8, 16, 8, 2, 4, 168), "t": (8, 16, 8, 2, 4), "requant": (16, 4, 4, 2, 4),
         "weight": (8, 16, 8, 2, 4)}  # weight_quant's transposed form: act_quant_both's layout, not swept


# the order of the tiles over the programs, by call: (GROUP_M, GROUP_K) groups of tiles, feature blocks fastest in a
# group, where they divide the grid; absent: the token blocks of a feature block first. Picked from 12 orders on the
# H200 at 8192 x 7168, 4096 x 32768 and 2048 x 7168 (bench/sweep_reg_quant.py --orders, fp8_reg_quant-order.md): the
# requantization 3017 GB/s at (1, 8) against 2991 in the default order at 8192 x 7168 (3242 / 3225 at 4096 x 32768,
# 2977 / 3006 at 2048 x 7168); act_quant_t 3903 / 3858, 4070 / 4052, 3582 / 3548 at (8, 4); act_quant_both 3486 /
# 3460, 3621 / 3598, 2988 / 2907 at (8, 4). A second sweep (fp8_reg_quant-order2.md) agreed within 1%: (1, 8) 2990
# against 2975 for the requantization. Small gains (0.3-0.9% to the requantization at the two large shapes).
ORDER: dict[str, tuple[int, int]] = {"requant": (1, 8), "t": (8, 4), "both": (8, 4)}


def usable(x: torch.Tensor, block: int, exact: bool, in_block: int = BLOCK) -> bool:
    """Whether ``quant_tiles`` can take this call: Gluon present, an sm_90 GPU, block 128 (and 1x128 input scales),
    the fast mode, a 2-D x with contiguous rows whose stride is a multiple of 4 elements. The GPU tests cover such
    rows (K from 4 to 1024, partial blocks included); the weight form once failed at I = 1 and 257 (cause not found; it
    passes since its rounding became the Triton weight kernel's), so other rows go to the Triton kernels (the
    models' widths are multiples of 128)."""
    if not HAVE_GLUON or exact or block != BLOCK or in_block != BLOCK or not x.is_cuda or x.dim() != 2:
        return False
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return _sm90(dev) and x.stride(-1) == 1 and x.stride(0) % 4 == 0


@functools.cache
def _sm90(device: int) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def quant_tiles(x, qt, st, q=None, s=None, in_scale=None, *, flags: dict, spec: tuple | None = None,
                weight: bool = False) -> None:
    """Fill qt (K, M) / st (K, ceil(M/128)) and, if given, q (M, K) / s (M, ceil(K/128)) from x (M, K) (FP8 x: with
    its 1x128 scales in_scale). weight: 128 x 128 block scales instead (``weight_quant``: x is the weight, q, s
    (ceil(M/128), ceil(K/128)) and the transposed copy qt; st unused). flags: the format constants of
    ``kernels.fp8._flags``; spec: the layout (``valid_spec``), by default ``SPECS``'s for the call."""
    M, K = x.shape
    call = "weight" if weight else "both" if q is not None else "requant" if in_scale is not None else "t"
    spec = spec or SPECS[call]
    extra = {"maxnreg": spec[5]} if len(spec) > 5 and spec[5] else {}  # a sixth entry caps a thread's registers
    st = qt if weight else st  # a placeholder pointer: the weight form stores no token scales
    xs = in_scale if in_scale is not None else st
    q_, s_ = (q, s) if q is not None else (qt, st)
    nm, nk = -(-M // BLOCK), -(-K // BLOCK)
    gm, gk = ORDER.get(call, (0, 0))
    if nm % max(gm, 1) or nk % max(gk, 1):  # groups that do not tile the grid: the default order (no program may
        gm = gk = 0  # lie past the edges: the scales' stores are masked along one dim only)
    _reg_quant_kernel[(nm, nk) if not gk else (gm * gk, -(-nm // gm), -(-nk // gk))](
        x, xs, q_, s_, qt, st, M, K, x.stride(0), *xs.stride(), q_.stride(0), *s_.stride(), qt.stride(0),
        *st.stride(),
        FMAX=flags["FMAX"], MBITS=flags["MBITS"], EMIN=flags["EMIN"], UE8M0=flags["UE8M0"],
        IN_SCALE=in_scale is not None, WRITE_Q=q is not None, WEIGHT=weight, SOFT_CVT=flags["SOFT_CVT"],
        SPT_T=spec[0], SPT_K=spec[1], LANES_T=spec[2], WARPS_T=spec[3], NUM_WARPS=spec[4], GROUP_M=gm,
        GROUP_K=gk, num_warps=spec[4],
        **extra,
    )
