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
from minids.kernels import HAVE_TRITON
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

if HAVE_TRITON:
    import triton

BLOCK = 128  # M and K of a program's tile (the K step is the recipe's 128); N is 128 or 256
HALF = 64  # rows per consumer warpgroup


if HAVE_GLUON:

    @gluon.jit
    def _unit(u, num_m, num_n, n0, k_steps, split, GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
        """(off_m, off_n, first K step, end K step, split index) of work unit u: tile u // split in grouped order
        (GROUP_M row tiles share each column tile while it is in L2), K steps [sp * per, (sp + 1) * per) of it, sp =
        u % split (the splits of a tile run side by side and share its A tiles in L2)."""
        t = u // split
        sp = u % split
        per = gl.cdiv(k_steps, split)
        per_group = GROUP_M * num_n
        first_m = (t // per_group) * GROUP_M
        group_m = gl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (t % per_group) % group_m
        pid_n = (t % per_group) // group_m
        return pid_m * BM, n0 + pid_n * BN, sp * per, gl.minimum(sp * per + per, k_steps), sp

    @gluon.jit
    def _producer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_m, num_n, n0, k_steps, split,
                  STAGES: gl.constexpr, NSUB: gl.constexpr, GROUP_M: gl.constexpr):
        """One warp: every K tile of every tile of this program, in order, into buffer it % STAGES once both
        consumers have released it (the first pass waits on parity 1, which a fresh barrier reports complete). It
        runs ahead into the next tile while the consumers finish one."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        SUBN: gl.constexpr = b_desc.block_type.shape[0]
        BN: gl.constexpr = SUBN * NSUB
        it = 0
        for u in range(gl.program_id(0), num_m * num_n * split, gl.num_programs(0)):
            off_m, off_n, k0, k1, _ = _unit(u, num_m, num_n, n0, k_steps, split, GROUP_M, BM, BN)
            for i in range(k0, k1):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + NSUB * b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [off_m, i * BK], ready.index(s), a_bufs.index(s))
                for j in gl.static_range(NSUB):  # B in column blocks (shared-memory shapes are powers of two)
                    tma.async_copy_global_to_shared(b_desc, [off_n + j * SUBN, i * BK], ready.index(s),
                                                    b_bufs.index(s * NSUB + j))
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
                  split, m_pad, stride_asm, stride_ask, stride_bsn, stride_bsk,
                  PART: gl.constexpr, STAGES: gl.constexpr, NSUB: gl.constexpr, GROUP_M: gl.constexpr):
        """One warpgroup, rows [off_m + 64 PART, +64) of each of the program's 128 x (SUBN NSUB) tiles: acc_j +=
        (A_i B_ij^T) a_s[:, i] b_s[j, i] for every K step i of the unit and SUBN-wide column block j (SUBN = C's
        block width, 128 or 64; a column block lies in one 128-wide weight block either way, so one b scale each).
        NSUB = 1: step i's product is in flight while step i - 1's is promoted (two product tiles live).
        NSUB = 2 or 3: the column blocks' products one after the other (a 64 x 256 or 64 x 192 accumulator and one
        product tile), the other warpgroup's products covering the promotions.
        The tile's C goes out through TMA (clipped at the M and N edges) while the next tile runs; its staging
        buffer is reused once that store has read it. With split > 1, C is the float32 partials (split * m_pad, N):
        split sp's rows start at sp * m_pad."""
        HM: gl.constexpr = c_desc.block_type.shape[0]
        SUBN: gl.constexpr = c_desc.block_type.shape[1]
        BN: gl.constexpr = SUBN * NSUB
        BM: gl.constexpr = 2 * HM
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, SUBN, 32])
        rows0 = PART * HM + gl.arange(0, HM, layout=gl.SliceLayout(1, layout))
        # product tiles are issued with use_acc=False into the registers of a finished one (p): passing a zero tile
        # instead keeps 64 registers of zeros live through the loop and copies them in every step
        p = gl.zeros([HM, SUBN], gl.float32, layout)
        it = 0
        for u in range(gl.program_id(0), num_m * num_n * split, gl.num_programs(0)):
            off_m, off_n, k0, k1, sp = _unit(u, num_m, num_n, n0, k_steps, split, GROUP_M, BM, BN)
            rows = off_m + rows0
            row_ok = rows < M
            as_ptrs = as_ptr + rows * stride_asm
            bs0 = bs_ptr + (off_n // 128) * stride_bsn
            acc0 = gl.zeros([HM, SUBN], gl.float32, layout)
            if NSUB == 1:
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                tok = warpgroup_mma(a_bufs.index(s).slice(PART * HM, HM), b_bufs.index(s).permute((1, 0)), p,
                                    use_acc=False, is_async=True)
                sa = gl.load(as_ptrs + k0 * stride_ask, mask=row_ok, other=1.0)
                sb = gl.load(bs0 + k0 * stride_bsk)
                for i in range(k0 + 1, k1):
                    n = it + i - k0
                    s = n % STAGES
                    sa_next = gl.load(as_ptrs + i * stride_ask, mask=row_ok, other=1.0)
                    sb_next = gl.load(bs0 + i * stride_bsk)
                    mbarrier.wait(ready.index(s), (n // STAGES) & 1)
                    tok_next = warpgroup_mma(a_bufs.index(s).slice(PART * HM, HM), b_bufs.index(s).permute((1, 0)),
                                             p, use_acc=False, is_async=True)
                    prev = warpgroup_mma_wait(num_outstanding=1, deps=(tok,))
                    mbarrier.arrive(empty.index((n - 1) % STAGES))
                    acc0 += prev * gl.expand_dims(sa * sb, 1)
                    p = prev
                    tok = tok_next
                    sa = sa_next
                    sb = sb_next
                p = warpgroup_mma_wait(num_outstanding=0, deps=(tok,))
                mbarrier.arrive(empty.index((it + k1 - k0 - 1) % STAGES))
                acc0 += p * gl.expand_dims(sa * sb, 1)
            else:
                acc1 = gl.zeros([HM, SUBN], gl.float32, layout)
                bs1 = bs_ptr + ((off_n + SUBN) // 128) * stride_bsn
                ok1 = off_n + SUBN < N  # the second column block exists (else its scale is not read)
                sa = gl.load(as_ptrs + k0 * stride_ask, mask=row_ok, other=1.0)
                sb0 = gl.load(bs0 + k0 * stride_bsk)
                sb1 = gl.load(bs1 + k0 * stride_bsk, mask=ok1, other=0.0)
                if NSUB == 3:
                    acc2 = gl.zeros([HM, SUBN], gl.float32, layout)
                    bs2 = bs_ptr + ((off_n + 2 * SUBN) // 128) * stride_bsn
                    ok2 = off_n + 2 * SUBN < N
                    sb2 = gl.load(bs2 + k0 * stride_bsk, mask=ok2, other=0.0)
                for i in range(k0, k1):
                    n = it + i - k0
                    s = n % STAGES
                    j = gl.minimum(i + 1, k1 - 1)  # the next step's scales, loaded a step ahead
                    sa_next = gl.load(as_ptrs + j * stride_ask, mask=row_ok, other=1.0)
                    sb0_next = gl.load(bs0 + j * stride_bsk)
                    sb1_next = gl.load(bs1 + j * stride_bsk, mask=ok1, other=0.0)
                    if NSUB == 3:
                        sb2_next = gl.load(bs2 + j * stride_bsk, mask=ok2, other=0.0)
                    mbarrier.wait(ready.index(s), (n // STAGES) & 1)
                    a_half = a_bufs.index(s).slice(PART * HM, HM)
                    p = warpgroup_mma(a_half, b_bufs.index(s * NSUB).permute((1, 0)), p, use_acc=False,
                                      is_async=True)
                    p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
                    acc0 += p * gl.expand_dims(sa * sb0, 1)
                    p = warpgroup_mma(a_half, b_bufs.index(s * NSUB + 1).permute((1, 0)), _after(p, acc0),
                                      use_acc=False, is_async=True)
                    p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
                    if NSUB == 2:
                        mbarrier.arrive(empty.index(s))
                    acc1 += p * gl.expand_dims(sa * sb1, 1)
                    if NSUB == 3:
                        p = warpgroup_mma(a_half, b_bufs.index(s * NSUB + 2).permute((1, 0)), _after(p, acc1),
                                          use_acc=False, is_async=True)
                        p = warpgroup_mma_wait(num_outstanding=0, deps=(p,))
                        mbarrier.arrive(empty.index(s))
                        acc2 += p * gl.expand_dims(sa * sb2, 1)
                        sb2 = sb2_next
                    sa = sa_next
                    sb0 = sb0_next
                    sb1 = sb1_next
            it += k1 - k0

            row_c = sp * m_pad + off_m + PART * HM
            tma.store_wait(pendings=0)  # the previous tile's C has left the staging buffers
            c0 = c_bufs.index(NSUB * PART)
            c0.store(acc0.to(c_desc.dtype))
            if NSUB >= 2:
                c_bufs.index(NSUB * PART + 1).store(acc1.to(c_desc.dtype))
            if NSUB == 3:
                c_bufs.index(NSUB * PART + 2).store(acc2.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [row_c, off_n], c0)
            if NSUB >= 2:  # noqa: SIM102 - a compile-time test, then a run-time one
                if off_n + SUBN < N:
                    tma.async_copy_shared_to_global(c_desc, [row_c, off_n + SUBN], c_bufs.index(NSUB * PART + 1))
            if NSUB == 3:  # noqa: SIM102
                if off_n + 2 * SUBN < N:
                    tma.async_copy_shared_to_global(c_desc, [row_c, off_n + 2 * SUBN],
                                                    c_bufs.index(NSUB * PART + 2))
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fp8_gemm_ws_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K, n0, num_n, split, m_pad,
                            stride_asm, stride_ask, stride_bsn, stride_bsk,
                            STAGES: gl.constexpr, NSUB: gl.constexpr, GROUP_M: gl.constexpr):
        """Tiles of 128 rows x BN = NSUB column blocks of b_desc's block rows (128 or 64) columns of C, over columns
        [n0, n0 + num_n BN) (a launch may cover part of N: see fp8_gemm_ws), each in ``split`` K ranges; program p takes work units
        p, p + P, ... (persistent when the grid is smaller than the unit count)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        SUBN: gl.constexpr = b_desc.block_type.shape[0]
        HM: gl.constexpr = c_desc.block_type.shape[0]
        num_m = gl.cdiv(M, BM)
        k_steps = gl.cdiv(K, BK)

        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES * NSUB, SUBN, BK], b_desc.layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2 * NSUB, HM, SUBN], c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=2)
        fence_async_shared()

        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, as_ptr, bs_ptr, M, N, num_m, num_n, n0,
                         k_steps, split, m_pad, stride_asm, stride_ask, stride_bsn, stride_bsk, 0, STAGES, NSUB,
                         GROUP_M)),
            (_consumer, (a_bufs, b_bufs, ready, empty, c_desc, c_bufs, as_ptr, bs_ptr, M, N, num_m, num_n, n0,
                         k_steps, split, m_pad, stride_asm, stride_ask, stride_bsn, stride_bsk, 1, STAGES, NSUB,
                         GROUP_M)),
            (_producer, (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_m, num_n, n0, k_steps, split, STAGES,
                         NSUB, GROUP_M)),
        ], [4, 1], [240, 24])


# default stages by (tile width, C's element size): as many as shared memory holds (227 KB) with C's staging buffers
_STAGES = {(256, 2): 3, (192, 2): 4, (128, 2): 4, (192, 4): 3, (128, 4): 4}


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _smem_layout(rows: int, cols: int, dtype: torch.dtype):
    """The NVMMA (swizzled) shared-memory layout of a (rows, cols) TMA block: built once per shape (host time)."""
    gl_dtype = {torch.float8_e4m3fn: gl.float8e4nv, torch.float8_e5m2: gl.float8e5, torch.bfloat16: gl.bfloat16,
                torch.float16: gl.float16, torch.float32: gl.float32}[dtype]
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl_dtype)


def pick_block_n(M: int, N: int, sms: int) -> int:
    """256 or 192, the tile width of the call: whichever needs fewer waves of tiles times their width (the work of the
    busiest SM, in columns), 256 unless 192 saves more than 5% (a 256-wide tile runs ~7% more TFLOP/s when both fill
    the GPU). H200 (fp8_gemm_ws-sweep2.md): 192 at M = 4096, N = 2112 (11 tiles a row, one launch: 1007 TFLOP/s against
    879 for eight 256-wide tiles and a 64-wide remainder) and at M = 128, N = 24576 (128 tiles on 132 SMs: 816 against
    701 for 96); 256 elsewhere among DeepGEMM's shapes."""
    num_m = triton.cdiv(M, BLOCK)

    def cost(launches):
        return sum(triton.cdiv(num_m * triton.cdiv(cols, w), sms) * w for cols, w in launches if cols > 0)

    rem = N % 256
    wide = cost([(N - rem, 256), (rem, 128)]) if 0 < rem <= 128 else cost([(N, 256)])
    return 192 if cost([(N, 192)]) * 1.05 < wide else 256


def fp8_gemm_ws(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None, *,
                block_n: int | None = None, stages: int | None = None, group_m: int = 8,
                persistent: bool = True, split: int = 1) -> torch.Tensor:
    """C = (a a_s)(b b_s)^T on an sm_90 GPU (see the module docstring); a_s (M, ceil(K/128)) with any strides, b_s
    (ceil(N/128), ceil(K/128)) 128x128 block scales. a and b K-contiguous FP8 with 16-byte aligned rows, C with
    16-byte aligned rows (TMA). ``usable`` says whether a call qualifies.

    block_n None: ``pick_block_n``'s choice of 256 or 192. 256: 128 x 256 tiles (3 stages) over the columns up to
    the last multiple of 256, and where fewer than 129 columns remain, a second launch of 128 x 128 tiles (4 stages)
    for them: a 256-wide tile mostly past N would cost a whole tile (N = 2112: 8 wide tiles + one 64-wide
    remainder). block_n 192: 128 x 192 tiles in three 64-wide column blocks (4 stages; N = 24576 is 128 of them, one per SM at M = 128). block_n 128: 128 x 128 tiles
    throughout. A float32 C takes 128-wide tiles where 256 are asked: its staging buffers for 256 columns and three
    stages would not fit in shared memory (272 KB).
    split: each tile's K steps in ``split`` ranges run by different programs, their float32 partials summed in a
    fixed order by a second kernel (for small M, where the tiles alone leave SMs idle).
    persistent: one program per SM, looping over tiles (else one per tile)."""
    M, K = a.shape
    N = b.shape[0]
    c = out if out is not None else torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return c
    a_s = a_s if a_s.dtype == torch.float32 else a_s.float()
    b_s = b_s if b_s.dtype == torch.float32 else b_s.float()
    sms = _sm_count(a.device.index if a.device.index is not None else torch.cuda.current_device())
    block_n = block_n or pick_block_n(M, N, sms)
    k_steps = triton.cdiv(K, BLOCK)
    per = triton.cdiv(k_steps, max(1, min(split, k_steps)))
    split = triton.cdiv(k_steps, per)  # every split has at least one K step
    num_m = triton.cdiv(M, BLOCK)
    m_pad = num_m * BLOCK
    # split > 1: float32 partials (split, m_pad, N), each split's rows padded to whole tiles so TMA's row clipping
    # never runs into the next split
    dst = c if split == 1 else torch.empty(split * m_pad, N, dtype=torch.float32, device=a.device)
    if dst.element_size() == 4 and block_n == 256:
        block_n = 128
    sub = 64 if block_n == 192 else BLOCK
    a_desc = TensorDescriptor.from_tensor(a, [BLOCK, BLOCK], _smem_layout(BLOCK, BLOCK, a.dtype))
    c_desc = TensorDescriptor.from_tensor(dst, [HALF, sub], _smem_layout(HALF, sub, dst.dtype))
    wide = N - N % 256 if block_n == 256 and 0 < N % 256 <= 128 else N if block_n != 128 else 0
    for n0, n1, bn in ((0, wide, block_n), (wide, N, 128)):
        if n1 <= n0:
            continue
        bsub = sub if bn != 128 else BLOCK
        b_desc = TensorDescriptor.from_tensor(b, [bsub, BLOCK], _smem_layout(bsub, BLOCK, b.dtype))
        num_n = triton.cdiv(n1 - n0, bn)
        units = num_m * num_n * split
        grid = (min(units, sms) if persistent else units,)
        _fp8_gemm_ws_kernel[grid](a_desc, b_desc, c_desc, a_s, b_s, M, N, K, n0, num_n, split, m_pad, *a_s.stride(),
                                  *b_s.stride(), STAGES=stages or _STAGES[bn, dst.element_size()], NSUB=bn // bsub,
                                  GROUP_M=group_m, num_warps=4)
    if split > 1:
        from minids.kernels.fp8 import _sum_splits_kernel

        _sum_splits_kernel[(triton.cdiv(M * N, 1024),)](dst, c, M * N, m_pad * N, SPLIT_K=split, BLOCK=1024,
                                                        num_warps=4)
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
