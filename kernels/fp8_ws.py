"""The block-scaled FP8 GEMM as a warp-specialized Gluon kernel for Hopper (sm_90): the product of one 128-K step
runs on the tensor cores while the same warps promote the previous step's product into the float32 accumulator.

C (M, N) = (a a_s)(b b_s)^T with a (M, K) FP8 and 1x128 scales a_s (M, ceil(K/128)), b (N, K) FP8 with 128x128
block scales b_s (ceil(N/128), ceil(K/128)): the Fprop / Dgrad form of ``kernels.fp8.fp8_gemm`` (same arguments,
same result up to the float32 summation order), whose Triton kernel is the reference here.

Why Gluon: in Triton's tile language a dot whose result is used inside the loop (acc += dot(a, b) * scale) is
waited for before the promotion, so within one warpgroup the tensor cores idle while it runs (kernels/fp8.py,
GEMM_VARIANTS' notes). Gluon exposes the asynchronous warpgroup MMA and its wait: each consumer issues step i's
product, waits for step i - 1's only (``warpgroup_mma_wait(num_outstanding=1)``), and promotes that while step i
runs (two product tiles and the accumulator live: 3 x 64 float32 registers a thread at 64 x 128 per warpgroup).

Layout of a program (one 128 x 128 output tile; DeepGEMM's structure for this recipe):
- a producer warp streams A (128 x 128) and B (128 x 128) K-tiles through TMA into STAGES shared-memory buffers;
  ``ready[s]`` flips when a buffer's bytes have landed, ``empty[s]`` when both consumers are done with it;
- two consumer warpgroups (the default partition and one worker) each own 64 rows of the tile: they read their
  half of the A buffer and all of B, and write their 64 x 128 half of C through TMA (which clips the M tail).
"""

from __future__ import annotations

import functools

import torch

try:
    import triton
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

    # Gluon is experimental and its API moves: this kernel is written against Triton 3.6's (measured there); later
    # releases renamed the TMA copies (tma.async_load / async_store), so there fp8_gemm keeps the Triton kernel
    HAVE_GLUON = not hasattr(tma, "async_load")
except ImportError:  # an older Triton, or none
    HAVE_GLUON = False

BLOCK = 128  # M and K of a program's tile (the K step is the recipe's 128); N is 128 or 256
HALF = 64  # rows per consumer warpgroup


if HAVE_GLUON:

    @gluon.jit
    def _tile(t, num_m, num_n, n0, GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
        """(off_m, off_n) of tile t in grouped order: GROUP_M row tiles share each column tile while it is in L2."""
        per_group = GROUP_M * num_n
        first_m = (t // per_group) * GROUP_M
        group_m = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (t % per_group) % group_m
        pid_n = (t % per_group) // group_m
        return pid_m * BM, n0 + pid_n * BN

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_m, num_n, n0, k_steps,
                  STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        """One warp: every K tile of every tile of this program, in order, into buffer it % STAGES once both
        consumers have released it (the first pass waits on parity 1, which a fresh barrier reports complete). It
        runs ahead into the next tile while the consumers finish one."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        it = 0
        for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile(t, num_m, num_n, n0, GROUP_M, BM, BN)
            for i in range(k_steps):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [off_m, i * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [off_n, i * BK], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _after(t, x):
        """t, ordered after x is computed (an opaque copy that reads both): issuing the next product into t's
        registers must wait for the promotion that reads t; otherwise the compiler sinks the promotion below the
        next product's issue, and the two product tiles live at once do not fit in the registers (spills)."""
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r", [t, x], dtype=gl.float32, is_pure=False,
                                         pack=1)

    @gluon.jit
    def _consumer(a_bufs, b_bufs, ready, empty, c_desc, c_bufs, as_ptr, bs_ptr, M, N, num_m, num_n, n0, k_steps,
                  stride_asm, stride_ask, stride_bsn, stride_bsk,
                  PART: gl.constexpr, STAGES: gl.constexpr, NSUB: gl.constexpr, GROUP_M: gl.constexpr):
        """One warpgroup, rows [off_m + 64 PART, +64) of each of the program's 128 x (128 NSUB) tiles: acc_j +=
        (A_i B_ij^T) a_s[:, i] b_s[j, i] for every K step i and 128-wide column block j.
        NSUB = 1: step i's product is in flight while step i - 1's is promoted (two product tiles live).
        NSUB = 2: the two column blocks' products one after the other (a 64 x 256 accumulator and one product tile:
        192 registers), the other warpgroup's products covering the promotions.
        The tile's C goes out through TMA (clipped at the M and N edges) while the next tile runs; its staging
        buffer is reused once that store has read it."""
        HM: gl.constexpr = c_desc.block_type.shape[0]
        BN: gl.constexpr = c_desc.block_type.shape[1]
        BM: gl.constexpr = 2 * HM
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 32])
        rows0 = PART * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, layout))
        # product tiles are issued with use_acc=False into the registers of a finished one (p): passing a zero tile
        # instead keeps 64 registers of zeros live through the loop and copies them in every step
        p = gl.zeros([HM, BN], gl.float32, layout)
        it = 0
        for t in range(gl.program_id(0), num_m * num_n, gl.num_programs(0)):
            off_m, off_n = _tile(t, num_m, num_n, n0, GROUP_M, BM, BN * NSUB)
            rows = off_m + rows0
            row_ok = rows < M
            as_ptrs = as_ptr + rows * stride_asm
            bs_row = bs_ptr + (off_n // 128) * stride_bsn  # each 128-wide column block lies in one weight block
            acc0 = gl.zeros([HM, BN], gl.float32, layout)
            if NSUB == 1:
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                tok = warpgroup_mma(a_bufs.index(s).slice(PART * HM, HM), b_bufs.index(s).permute((1, 0)), p,
                                    use_acc=False, is_async=True)
                sa = gl.load(as_ptrs, mask=row_ok, other=1.0)
                sb = gl.load(bs_row)
                for i in range(1, k_steps):
                    s = (it + i) % STAGES
                    sa_next = gl.load(as_ptrs + i * stride_ask, mask=row_ok, other=1.0)
                    sb_next = gl.load(bs_row + i * stride_bsk)
                    mbarrier.wait(ready.index(s), ((it + i) // STAGES) & 1)
                    tok_next = warpgroup_mma(a_bufs.index(s).slice(PART * HM, HM), b_bufs.index(s).permute((1, 0)),
                                             p, use_acc=False, is_async=True)
                    prev = warpgroup_mma_wait(num_outstanding=1, deps=(tok,))
                    mbarrier.arrive(empty.index((it + i - 1) % STAGES))
                    acc0 += prev * gl.expand_dims(sa * sb, 1)
                    p = prev
                    tok = tok_next
                    sa = sa_next
                    sb = sb_next
                p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                mbarrier.arrive(empty.index((it + k_steps - 1) % STAGES))
                acc0 += p * gl.expand_dims(sa * sb, 1)
            else:
                acc1 = gl.zeros([HM, BN], gl.float32, layout)
                hi_ok = off_n + BN < N  # the second column block exists (else its scale is not read)
                sa = gl.load(as_ptrs, mask=row_ok, other=1.0)
                sb0 = gl.load(bs_row)
                sb1 = gl.load(bs_row + stride_bsn, mask=hi_ok, other=0.0)
                for i in range(k_steps):
                    s = (it + i) % STAGES
                    j = gl.minimum(i + 1, k_steps - 1)  # the next step's scales, loaded a step ahead
                    sa_next = gl.load(as_ptrs + j * stride_ask, mask=row_ok, other=1.0)
                    sb0_next = gl.load(bs_row + j * stride_bsk)
                    sb1_next = gl.load(bs_row + stride_bsn + j * stride_bsk, mask=hi_ok, other=0.0)
                    mbarrier.wait(ready.index(s), ((it + i) // STAGES) & 1)
                    a_half = a_bufs.index(s).slice(PART * HM, HM)
                    b_buf = b_bufs.index(s)
                    p = warpgroup_mma(a_half, b_buf.slice(0, BN).permute((1, 0)), p, use_acc=False, is_async=True)
                    p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
                    acc0 += p * gl.expand_dims(sa * sb0, 1)
                    p = warpgroup_mma(a_half, b_buf.slice(BN, BN).permute((1, 0)), _after(p, acc0), use_acc=False,
                                      is_async=True)
                    p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
                    mbarrier.arrive(empty.index(s))
                    acc1 += p * gl.expand_dims(sa * sb1, 1)
                    sa = sa_next
                    sb0 = sb0_next
                    sb1 = sb1_next
            it += k_steps

            tma.store_wait(pendings=0)  # the previous tile's C has left the staging buffers
            c0 = c_bufs.index(NSUB * PART)
            c0.store(acc0.to(c_desc.dtype))
            if NSUB == 2:
                c_bufs.index(2 * PART + 1).store(acc1.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m + PART * HM, off_n], c0)
            if NSUB == 2:  # noqa: SIM102 - a compile-time test, then a run-time one
                if off_n + BN < N:
                    tma.async_copy_shared_to_global(c_desc, [off_m + PART * HM, off_n + BN],
                                                    c_bufs.index(2 * PART + 1))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fp8_gemm_ws_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, n0, num_n,
                            stride_asm, stride_ask, stride_bsn, stride_bsk,
                            STAGES: gl.constexpr, GROUP_M: gl.constexpr):
        """Tiles of 128 rows x BN = b_desc's block rows (128 or 256) columns of C, over columns [n0, n0 + num_n BN)
        (a launch may cover part of N: see fp8_gemm_ws); program p takes tiles p, p + P, ... (persistent when the
        grid is smaller than the tile count)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        HM: gl.constexpr = c_desc.block_type.shape[0]
        NSUB: gl.constexpr = BN // c_desc.block_type.shape[1]  # 128-wide column blocks per tile (1 or 2)
        num_m = gl.cdiv(M, BM)
        k_steps = gl.cdiv(K, BK)

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2 * NSUB, HM, BN // NSUB], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, as_ptr, bs_ptr, M, N, num_m, num_n, n0,
                         k_steps, stride_asm, stride_ask, stride_bsn, stride_bsk, 0, STAGES, NSUB, GROUP_M)),
            (_consumer, (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, as_ptr, bs_ptr, M, N, num_m, num_n, n0,
                         k_steps, stride_asm, stride_ask, stride_bsn, stride_bsk, 1, STAGES, NSUB, GROUP_M)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_m, num_n, n0, k_steps, STAGES, GROUP_M)),
        ], [4, 1], [240, 24])


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _smem_layout(rows: int, cols: int, dtype: torch.dtype):
    """The NVMMA (swizzled) shared-memory layout of a (rows, cols) TMA block: built once per shape (host time)."""
    gl_dtype = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5, torch.bfloat16: gl.bfloat16,
                torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)


def fp8_gemm_ws(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None, *,
                block_n: int = 256, stages: int | None = None, group_m: int = 8,
                persistent: bool = True) -> torch.Tensor:
    """C = (a a_s)(b b_s)^T on an sm_90 GPU (see the module docstring); a_s (M, ceil(K/128)) with any strides, b_s
    (ceil(N/128), ceil(K/128)) 128x128 block scales. a and b K-contiguous FP8 with 16-byte aligned rows, C with
    16-byte aligned rows (TMA). ``usable`` says whether a call qualifies.

    block_n 256: 128 x 256 tiles (3 stages) over the columns up to the last multiple of 256, and where fewer than
    129 columns remain, a second launch of 128 x 128 tiles (4 stages) for them: a 256-wide tile mostly past N would
    cost a whole tile (N = 2112: 8 wide tiles + one 64-wide remainder). block_n 128: 128 x 128 tiles throughout.
    A float32 C takes 128-wide tiles: its staging buffers for 256 columns and three stages would not fit in shared
    memory (272 KB).
    persistent: one program per SM, looping over tiles (else one per tile)."""
    M, K = a.shape
    N = b.shape[0]
    c = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    a_s = a_s if a_s.dtype == torch.float32 else a_s.float()
    b_s = b_s if b_s.dtype == torch.float32 else b_s.float()
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK, BLOCK], _smem_layout(BLOCK, BLOCK, a.dtype))
    c_desc = TensorDescriptor.from_tensor(c, [HALF, BLOCK], _smem_layout(HALF, BLOCK, c.dtype))
    if c.element_size() == 4:
        block_n = 128
    sms = _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())
    num_m = triton.cdiv(M, BLOCK)
    wide = N - N % 256 if block_n == 256 and 0 < N % 256 <= 128 else N if block_n == 256 else 0
    for n0, n1, bn in ((0, wide, 256), (wide, N, 128)):
        if n1 <= n0:
            continue
        b_desc = TensorDescriptor.from_tensor(b, [bn, BLOCK], _smem_layout(bn, BLOCK, b.dtype))
        num_n = triton.cdiv(n1 - n0, bn)
        tiles = num_m * num_n
        grid = (min(tiles, sms) if persistent else tiles,)
        _fp8_gemm_ws_kernel[grid](a_desc, b_desc, c_desc, a_s, b_s, M, N, K, n0, num_n, *a_s.stride(), *b_s.stride(),
                                  STAGES=stages or (3 if bn == 256 else 4), GROUP_M=group_m, num_warps=4)
    return c


def usable(a: torch.Tensor, b: torch.Tensor, b_group: int, c: torch.Tensor) -> bool:
    """Whether fp8_gemm_ws can compute C (c, the output) = a b^T: Gluon present, an sm_90 GPU (the warpgroup MMA is
    Hopper's), 128x128 weight-block scales of b (b_group 128: the Fprop / Dgrad form), rows of a, b and c contiguous
    and 16-byte aligned (TMA)."""
    if not HAVE_GLUON or not a.is_cuda or b_group != 128 or c.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if torch.cuda.get_device_capability(a.device)[0] != 9:
        return False
    return all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
               for t in (a, b, c))
