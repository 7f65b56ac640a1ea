"""The transposing activation quantizations (``act_quant_both``, ``act_quant_t``, and its FP8 requantization) as a
persistent Gluon kernel for Hopper (sm_90) whose tiles move through TMA: loads run ahead of the arithmetic, stores
drain behind it.

One program per SM walks (128 tokens x 128 features) tiles of x (M, K). For each it writes
- optionally q (M, K): the 1x128 quantization along the features, and its scales s (M, ceil(K/128)) row-major;
- qt (K, M): the 128x1 quantization along the tokens, transposed, and its scales st (K, ceil(M/128)) stored
  block-major (``st.stride() == (1, K)``, as ``kernels.fp8._scales_t`` makes them).
x is bf16, fp16 or float32, or FP8 with 1x128 scales (``in_scale``), dequantized on load (the Wgrad requantization of
a cached FP8 activation).

The arithmetic is the Triton kernels' (``kernels.fp8._scale_of`` and ``_quantize``, fast mode: the same jitted
functions), so the outputs are theirs bit for bit; the GPU tests check that. What differs is the data movement:
- x's tiles come in through TMA, STAGES - 1 tiles ahead of the one being quantized, into shared memory, so a
  program's loads need no registers and do not wait on its arithmetic (the Triton kernels hold a tile's addresses
  and values in registers, ~120-200 a thread, and one or two programs fit an SM; kernels_notes.md);
- q and the transposed qt are written into shared memory (qt through a transposed view of its buffer: the transpose
  is in the addresses of that store) and leave through TMA stores while the next tile is quantized; TMA clips the
  tiles at the M and K edges, and its loads fill out-of-range elements with zeros (amax unchanged).

Why this exists: the Triton ``act_quant_both`` ran at 2.58 TB/s effective on the H200 (61% of the copy rate), the FP8
requantization at 1.71, and dy's ``act_quant_both`` is 30% of the FP8 linear's kernel time at (N, K) = (32768, 512).
What it measured (bench/results/fp8_tma_quant.md, H200): slower than the Triton kernels for act_quant_both (2.1-2.2
TB/s in its best config) and, depending on the shape, ahead of or behind them for act_quant_t (3.6 against 3.4 TB/s at
4096 x 32768, 2.9 against 3.1 at 8192 x 7168) and the requantization; so it is off by default
(``kernels.fp8.TMA_QUANT``), kept tested, as the starting point of the next attempt.
"""

from __future__ import annotations

import functools

import torch
from minids.kernels.gluon_hopper import HAVE_GLUON, TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, tma

if HAVE_GLUON:
    from minids.kernels.fp8 import _quantize, _scale_of

BLOCK = 128  # tokens and features of a tile: one quantization block each way

if HAVE_GLUON:
    TILE = gl.constexpr(BLOCK)  # the same, for the kernels

    @gluon.jit
    def _issue_load(x_desc, bufs, ready, j, pid, nprog, num_k, STAGES: gl.constexpr):
        """Start the TMA load of this program's j-th tile into buffer j % STAGES."""
        t = pid + j * nprog
        s = j % STAGES
        mbarrier.expect(ready.index(s), x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [(t // num_k) * TILE, (t % num_k) * TILE], ready.index(s),
                                        bufs.index(s))

    @gluon.jit
    def _quant_tiles_kernel(x_desc, q_desc, qt_desc, xs_ptr, s_ptr, st_ptr, M, K,
                            stride_xsm, stride_xsk, stride_sm, stride_sk, stride_stk, stride_stb,
                            FMAX: gl.constexpr, MBITS: gl.constexpr, EMIN: gl.constexpr, UE8M0: gl.constexpr,
                            IN_SCALE: gl.constexpr, WRITE_Q: gl.constexpr, STAGES: gl.constexpr,
                            LAYOUT: gl.constexpr, Q_LAYOUT: gl.constexpr, QT_LAYOUT: gl.constexpr):
        """Tiles pid, pid + P, ... (P programs) of x, in row-major tile order; see the module docstring."""
        num_k = gl.cdiv(K, TILE)
        tiles = gl.cdiv(M, TILE) * num_k
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        mine = (tiles - pid + nprog - 1) // nprog

        bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, TILE, TILE], x_desc.layout)
        qt_bufs = gl.allocate_shared_memory(qt_desc.dtype, [2, TILE, TILE], qt_desc.layout)
        if WRITE_Q:
            q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, TILE, TILE], q_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
        fence_async_shared()

        for j in gl.static_range(STAGES - 1):
            if j < mine:
                _issue_load(x_desc, bufs, ready, j, pid, nprog, num_k, STAGES)

        offs = gl.arange(0, TILE, layout=gl.SliceLayout(1, LAYOUT))  # tokens of a tile
        feats = gl.arange(0, TILE, layout=gl.SliceLayout(0, LAYOUT))
        for j in range(mine):
            # the buffer of tile j + STAGES - 1 was read as tile j - 1's, which every warp has finished (the barrier
            # the compiler puts between that read and this write)
            if j + STAGES - 1 < mine:
                _issue_load(x_desc, bufs, ready, j + STAGES - 1, pid, nprog, num_k, STAGES)
            t = pid + j * nprog
            tm = t // num_k
            tk = t % num_k
            rows = tm * TILE + offs
            cols = tk * TILE + feats
            s_ = j % STAGES
            mbarrier.wait(ready.index(s_), (j // STAGES) & 1)
            x = bufs.index(s_).load(LAYOUT).to(gl.float32)
            if IN_SCALE:
                xs = gl.load(xs_ptr + rows * stride_xsm + tk * stride_xsk, mask=rows < M, other=0.0)
                x = x * gl.expand_dims(xs, 1)
            ax = gl.abs(x)

            b = j % 2
            # the stores of tile j - 2 have read the staging buffers b (those of j - 1 may still be in flight)
            tma.store_wait(pendings=2 if WRITE_Q else 1)
            if WRITE_Q:
                sr = _scale_of(gl.max(ax, axis=1), FMAX, UE8M0)  # (TILE,): along the features
                q = _quantize(x, gl.expand_dims(sr, 1), FMAX, MBITS, EMIN, UE8M0, False, False)
                q_bufs.index(b).store(gl.convert_layout(q.to(q_desc.dtype), Q_LAYOUT))
                gl.store(s_ptr + rows * stride_sm + tk * stride_sk, sr, mask=rows < M)
            sc = _scale_of(gl.max(ax, axis=0), FMAX, UE8M0)  # (TILE,): along the tokens
            qt = _quantize(x, gl.expand_dims(sc, 0), FMAX, MBITS, EMIN, UE8M0, False, False)
            qt_bufs.index(b).permute((1, 0)).store(gl.convert_layout(qt.to(qt_desc.dtype), QT_LAYOUT))
            gl.store(st_ptr + cols * stride_stk + tm * stride_stb, sc, mask=cols < K)
            fence_async_shared()
            if WRITE_Q:
                tma.async_copy_shared_to_global(q_desc, [tm * TILE, tk * TILE], q_bufs.index(b))
            tma.async_copy_shared_to_global(qt_desc, [tk * TILE, tm * TILE], qt_bufs.index(b))
        tma.store_wait(pendings=0)


_GL_DTYPES = {}
if HAVE_GLUON:
    _GL_DTYPES = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5, torch.bfloat16: gl.bfloat16,
                  torch.float16: gl.float16, torch.float32: gl.float32}


@functools.cache
def _smem_layout(dtype: torch.dtype):
    """The NVMMA shared-memory layout of a 128 x 128 TMA tile of ``dtype`` (built once: host time)."""
    return gl.NVMMASharedLayout.get_default_for([BLOCK, BLOCK], _GL_DTYPES[dtype])


@functools.cache
def _register_layout(num_warps: int):
    """A 128 x 128 tile over num_warps warps, each thread holding (rows x 8) contiguous features: 16-byte reads of a
    bf16 tile, and its rows (tokens) of a feature contiguous for the transposed store."""
    wr = 4 if num_warps >= 8 else 2
    wc = num_warps // wr
    return gl.BlockedLayout(size_per_thread=[BLOCK // (4 * wr), BLOCK // (8 * wc)], threads_per_warp=[4, 8],
                            warps_per_cta=[wr, wc], order=[1, 0])


@functools.cache
def _store_layouts(num_warps: int, convert: bool):
    """The layouts the FP8 tiles are stored to shared memory from: with ``convert``, each warp writes whole 128-byte
    rows (16 bytes a thread; q: rows of tokens, qt: rows of features, i.e. 16 tokens of one feature a thread), free
    of bank conflicts in the 128-byte swizzle; else the arithmetic's own layout (8 bytes a thread, but the 8 rows a
    warp writes at once share a swizzle phase: 4- and 8-way conflicts)."""
    if not convert:
        return _register_layout(num_warps), _register_layout(num_warps)
    q = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8], warps_per_cta=[num_warps, 1], order=[1, 0])
    qt = gl.BlockedLayout(size_per_thread=[16, 1], threads_per_warp=[8, 4], warps_per_cta=[1, num_warps],
                          order=[0, 1])
    return q, qt


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# (stages, num_warps, programs per SM, convert before the shared-memory stores) by input width (bytes per element):
# picked by bench/fp8.py --only tma_quant on the H200 (bench/results/fp8_tma_quant.md)
CONFIG = {2: (3, 8, 1, True), 4: (2, 8, 1, True), 1: (3, 8, 1, True)}


def usable(x: torch.Tensor, block: int, exact: bool, outs) -> bool:
    """Whether ``quant_tiles`` can take this call: Gluon present, an sm_90 GPU, block 128, the fast mode, and every
    tensor's rows 16-byte aligned (TMA): x's, and the FP8 outputs' (M and K multiples of 16)."""
    if not HAVE_GLUON or exact or block != BLOCK or not x.is_cuda or x.dim() != 2 or x.dtype not in _GL_DTYPES:
        return False
    if torch.cuda.get_device_capability(x.device)[0] != 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (x, *outs))


def quant_tiles(x, qt, st, q=None, s=None, in_scale=None, *, flags: dict, config: tuple | None = None) -> None:
    """Fill qt (K, M) / st (K, ceil(M/128)) and, if given, q (M, K) / s (M, ceil(K/128)) from x (M, K) (FP8 x:
    with its 1x128 scales in_scale). flags: the format constants of ``kernels.fp8._flags`` (fast mode). config:
    (stages, num_warps, programs per SM, convert), default ``CONFIG`` by x's element size."""
    M, K = x.shape
    stages, warps, per_sm, convert = config or CONFIG[x.element_size()]
    q_layout, qt_layout = _store_layouts(warps, convert)
    x_desc = TensorDescriptor.from_tensor(x, [BLOCK, BLOCK], _smem_layout(x.dtype))
    qt_desc = TensorDescriptor.from_tensor(qt, [BLOCK, BLOCK], _smem_layout(qt.dtype))
    q_desc = TensorDescriptor.from_tensor(q, [BLOCK, BLOCK], _smem_layout(q.dtype)) if q is not None else qt_desc
    xs = in_scale if in_scale is not None else st
    s_ = s if s is not None else st
    tiles = -(-M // BLOCK) * -(-K // BLOCK)
    grid = (min(tiles, per_sm * _sm_count(x.device.index if x.device.index is not None else
                                          torch.cuda.current_device())),)
    _quant_tiles_kernel[grid](
        x_desc, q_desc, qt_desc, xs, s_, st, M, K, *xs.stride(), *s_.stride(), *st.stride(),
        FMAX=flags["FMAX"], MBITS=flags["MBITS"], EMIN=flags["EMIN"], UE8M0=flags["UE8M0"],
        IN_SCALE=in_scale is not None, WRITE_Q=q is not None, STAGES=stages, LAYOUT=_register_layout(warps),
        Q_LAYOUT=q_layout, QT_LAYOUT=qt_layout, num_warps=warps,
    )
