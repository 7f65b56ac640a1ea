"""RMSNorm in Triton, forward and backward, optionally fused with the residual add before it.

Mirrors ``minids.norm.rms_norm`` and ``minids.norm.add_rms_norm`` (same names, same signatures):

    rstd = 1 / sqrt(mean(x^2) + eps)            float32, per row
    n    = (x * rstd).to(x.dtype)               normalised, rounded to the input dtype as the reference does
    y    = weight * n                           in result_type(weight, x)
    add_rms_norm: s = x + residual (in x.dtype), returns (rms_norm(s), s)

Backward (xhat = x * rstd, dn = (dy * weight) rounded to x.dtype, as autograd of the reference rounds it):
    dx = rstd * (dn - xhat * mean(dn * xhat))    (+ the gradient of the returned residual s, when fused)
    dweight = sum over rows of dy * n

Layout and optimisations (both passes only stream memory; the aim is enough bytes in flight per SM, ~32-64 KB on
an H100/H200, with 128-bit accesses and no register spills):
- Rows are independent: a forward program normalises one (ROWS, BLOCK_D) tile of at least 2K elements (4 KB of
  bf16), several rows at once when D is small (one row of D=1024 bf16 is only 2 KB, too little to hide memory
  latency), with 2-16 warps: small programs, many per SM. Above D = 1024 it reads each row twice, once to sum the
  squares and once (from L2) to write y, so no program holds a whole row in registers. D is a compile-time
  constant, as in torch.compile's kernels. ``_fwd_config`` has the numbers.
- The forward keeps rstd (4 bytes a row) so the backward needs no second reduction over x for it.
- The backward runs one wave of persistent programs (as many as fit on the GPU at once, from the compiled kernel's
  register count) that stride over row tiles. Each keeps its dweight partial sums in fp32 registers, one per tile
  slot, so the loop has no cross-row reduction, and writes one row of a (P, D) float32 buffer: no (rows, D) product
  and no atomics on data. P is set by the machine, not by the row count, so small hidden sizes pay no fixed
  per-row-block cost for dweight. Tiles are small (2-4 warp programs up to D=2048) so registers pack into many
  programs per SM, and a program loads its next tile before working on the current one (PREFETCH): two tiles in
  flight per program for the price of their raw (bf16) registers. ``_bwd_config`` has the numbers.
- The (P, D) partials are summed by a second small kernel in a fixed order, split over P and D so that it takes
  microseconds (``_dw_sum_kernel``; torch's column sum took as long as the backward itself at D=512).
- The fused residual add writes s = x + residual once and normalises it from registers: one read of x and
  residual, two writes, instead of the separate add (read 2, write 1) and norm (read 1, write 1).

Preconditions: x (..., D) floating point, weight (D,), residual (if any) the shape of x (dtypes promote as torch's
x + residual does: a bf16 sublayer output onto a float32 residual stream under autocast). Inputs are made
contiguous over rows (a copy only where they are not). Runs on CUDA with Triton, or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import functools

import torch
from minids.kernels import HAVE_TRITON, arrival_counters, require_runs_here, sm_count

__all__ = ["add_rms_norm", "rms_norm"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _offsets(rows, cols, D, WIDE: tl.constexpr):
        """(ROWS, BLOCK_D) element offsets rows * D + cols; int64 only where WIDE (they can pass 2^31): the int32
        address arithmetic is lighter, as torch.compile's kernels use where the sizes allow."""
        r = rows[:, None]
        if WIDE:  # a constexpr branch: r is one type or the other, never both (two returns would be)
            r = r.to(tl.int64)
        return r * D + cols[None, :]

    @triton.jit
    def _load_rows(P, rows, cols, cmask, n_rows, D, EVICT: tl.constexpr):
        """The (ROWS, BLOCK_D) tile of rows `rows` of the (n_rows, D) matrix at P, in its own dtype (0 outside);
        EVICT: read once, marked evict_first in L2. int64 offsets (the backward's loads)."""
        mask = (rows < n_rows)[:, None] & cmask[None, :]
        ptrs = P + _offsets(rows, cols, D, True)
        if EVICT:
            return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def _rms_norm_fwd(
        X, R, W, Y, S, RSTD,
        n_rows, D: tl.constexpr, eps,
        HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, EVICT: tl.constexpr = False,
        LOOPED: tl.constexpr = False, EVEN: tl.constexpr = False, WIDE: tl.constexpr = True,
    ):
        """One (ROWS, BLOCK_D) tile of rows. X, R, Y, S: (n_rows, D) contiguous; W: (D,); RSTD: (n_rows,) fp32.

        S (the sum, in result_type(x, residual); S is X itself without a residual) sets the rounding dtype.
        EVICT: stream x and residual through L2 with evict_first, so the weight (read by every program) stays.
        LOOPED: BLOCK_D is a chunk, not the whole row: a first loop over the row's chunks sums the squares (x kept in
        L2 with evict_last, s stored there when fused), a second reads them back (evict_first) and writes y; fewer
        registers a program, so more programs per SM, for a second read that L2 serves.
        EVEN: ROWS divides n_rows and D == BLOCK_D (LOOPED: BLOCK_D divides D), so x, the weight and y need no masks
        (and the weight, read by every program, is marked evict_last), as torch.compile's kernel at D = 512.
        WIDE: int64 offsets (needed once the padded rows times D can pass 2^31).
        D is a compile-time constant (one compile per hidden size, as torch.compile specialises its kernels): the
        column masks, the loop bounds and the division by D fold into constants.
        """
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        rmask = rows < n_rows
        if not LOOPED:
            cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            offs = _offsets(rows, cols, D, WIDE)  # (ROWS, BLOCK_D)
            mask, cmask, zero = None, None, None  # EVEN: no load or store needs a mask
            if not EVEN:
                cmask, zero = cols < D, 0.0
                mask = rmask[:, None] & cmask[None, :]
            ev: tl.constexpr = "evict_first" if EVICT else ""
            x = tl.load(X + offs, mask=mask, other=zero, eviction_policy=ev)
            if HAS_RES:
                r = tl.load(R + offs, mask=mask, other=zero, eviction_policy=ev)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)  # s = x + residual, as torch
                tl.store(S + offs, x, mask=mask)
            xf = x.to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)  # (ROWS,)
            n = (xf * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)  # rounded to x.dtype like the reference
            w_ev: tl.constexpr = "evict_last" if EVEN else ""
            w = tl.load(W + cols, mask=cmask, other=zero, eviction_policy=w_ev).to(tl.float32)
            tl.store(Y + offs, (n * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        else:
            base = _offsets(rows, tl.zeros([1], dtype=tl.int32), D, WIDE)  # (ROWS, 1)
            # EVEN: BLOCK_D divides D and ROWS divides n_rows, so no load or store needs a mask
            acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
            for c0 in range(0, D, BLOCK_D):  # pass 1: sum of squares (and s = x + residual, stored)
                cols = c0 + tl.arange(0, BLOCK_D)
                m1, z1 = None, None  # per pass and iteration: a mask set before the loop would be loop-carried
                if not EVEN:
                    m1, z1 = rmask[:, None] & (cols < D)[None, :], 0.0
                offs = base + cols[None, :]
                x = tl.load(X + offs, mask=m1, other=z1, eviction_policy="evict_last")
                if HAS_RES:
                    r = tl.load(R + offs, mask=m1, other=z1, eviction_policy="evict_first")
                    x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
                    tl.store(S + offs, x, mask=m1)
                xf = x.to(tl.float32)
                acc += xf * xf
            rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / D + eps)  # (ROWS,)
            if HAS_RES:
                tl.debug_barrier()  # s is read back below, possibly by other threads of the CTA than stored it
            for c0 in range(0, D, BLOCK_D):  # pass 2: read x (or s) again from L2, write y
                cols = c0 + tl.arange(0, BLOCK_D)
                m2, c2, z2 = None, None, None
                if not EVEN:
                    c2, z2 = cols < D, 0.0
                    m2 = rmask[:, None] & c2[None, :]
                offs = base + cols[None, :]
                if HAS_RES:
                    xf = tl.load(S + offs, mask=m2, other=z2, eviction_policy="evict_first").to(tl.float32)
                else:
                    xf = tl.load(X + offs, mask=m2, other=z2, eviction_policy="evict_first").to(tl.float32)
                n = (xf * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)
                w = tl.load(W + cols, mask=c2, other=z2, eviction_policy="evict_last").to(tl.float32)
                tl.store(Y + offs, (n * w[None, :]).to(Y.dtype.element_ty), mask=m2)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd(
        DY, X, W, RSTD, DS, DX, DW_PART,
        n_rows, D,
        HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PREFETCH: tl.constexpr,
        EVICT: tl.constexpr = False,
    ):
        """Persistent: program p takes row tiles p, p + P, ... and writes its dweight partial sum to DW_PART[p].

        DY, X, DS, DX: (n_rows, D) contiguous (X is s when the residual add was fused; DS the gradient of s);
        RSTD: (n_rows,) fp32; DW_PART: (P, D) fp32. PREFETCH: tile i + 1 is loaded in iteration i, its loads
        overlapping tile i's math, reductions and dx store (ptxas issues them once tile i's raw registers are free).
        """
        pid = tl.program_id(0)
        step = tl.num_programs(0) * ROWS  # rows from one of this program's tiles to the next
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_D,)
        # one partial sum per tile slot: adding a (ROWS, BLOCK_D) tile is elementwise, so the loop never reduces
        # across rows (across warps when D is small); the ROWS slots are summed once at the end
        dw = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
        if PREFETCH:  # this program's first tile
            rows = pid * ROWS + tl.arange(0, ROWS)
            x_next = _load_rows(X, rows, cols, cmask, n_rows, D, EVICT)
            dy_next = _load_rows(DY, rows, cols, cmask, n_rows, D, EVICT)
            rstd_next = tl.load(RSTD + rows, mask=rows < n_rows, other=0.0)
            if HAS_DS:
                ds_next = _load_rows(DS, rows, cols, cmask, n_rows, D, EVICT)
        for start in range(pid * ROWS, n_rows, step):
            rows = start + tl.arange(0, ROWS)
            rmask = rows < n_rows
            if PREFETCH:  # take the tile loaded last iteration, start loading the next (masked past the end)
                x, dy, rstd = x_next, dy_next, rstd_next
                x_next = _load_rows(X, rows + step, cols, cmask, n_rows, D, EVICT)
                dy_next = _load_rows(DY, rows + step, cols, cmask, n_rows, D, EVICT)
                rstd_next = tl.load(RSTD + rows + step, mask=rows + step < n_rows, other=0.0)
                if HAS_DS:
                    ds = ds_next
                    ds_next = _load_rows(DS, rows + step, cols, cmask, n_rows, D, EVICT)
            else:
                x = _load_rows(X, rows, cols, cmask, n_rows, D, EVICT)
                dy = _load_rows(DY, rows, cols, cmask, n_rows, D, EVICT)
                rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
                if HAS_DS:
                    ds = _load_rows(DS, rows, cols, cmask, n_rows, D, EVICT)
            xf = x.to(tl.float32)
            dyf = dy.to(tl.float32)
            xhat = xf * rstd[:, None]
            dw += dyf * xhat.to(X.dtype.element_ty).to(tl.float32)
            dn = (dyf * w[None, :]).to(X.dtype.element_ty).to(tl.float32)
            c = tl.sum(dn * xhat, axis=1) / D  # (ROWS,)
            dx = rstd[:, None] * (dn - xhat * c[:, None])
            if HAS_DS:
                dx += ds.to(tl.float32)
            offs = _offsets(rows, cols, D, True)  # int64: the backward was measured so
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, tl.sum(dw, axis=0), mask=cmask)

    @triton.jit
    def _dw_sum_kernel(PART, STAGE, COUNT, DW, P, D, SPLIT, PB: tl.constexpr, BD: tl.constexpr,
                       SPLIT_P2: tl.constexpr):
        """DW[c] = sum over p of PART[p, c], deterministic, in one launch of a (D / BD, SPLIT) grid.

        PART: (P, D) fp32 dweight partials; STAGE: (SPLIT, D) fp32; COUNT: (D / BD,) int32 zeros; DW: (D,).
        Program (c, s) sums rows [s * PB, (s + 1) * PB) of column strip c in one tile load and writes STAGE[s];
        the last of a strip's SPLIT programs to arrive (an acq_rel atomic after a CTA barrier, as in the MLA
        combine) sums the SPLIT stage rows in order, writes DW in its dtype and resets the strip's counter to 0.
        Why not torch's sum(0): a column reduction of a (1320, 512) buffer took 10 us on an H200, as long as the
        whole backward pass of 16384 rows of D=512 (each of its threads walks the P rows one by one).
        """
        c = tl.program_id(0)
        s = tl.program_id(1)
        cols = c * BD + tl.arange(0, BD)
        cmask = cols < D
        rows = s * PB + tl.arange(0, PB)
        t = tl.load(PART + rows[:, None].to(tl.int64) * D + cols[None, :], mask=(rows < P)[:, None] & cmask[None, :],
                    other=0.0)
        tl.store(STAGE + s * D + cols, tl.sum(t, axis=0), mask=cmask)
        tl.debug_barrier()  # every thread's stage value is written before the arrival is counted
        arrived = tl.atomic_add(COUNT + c, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            ss = tl.arange(0, SPLIT_P2)
            st = tl.load(STAGE + ss[:, None] * D + cols[None, :], mask=(ss < SPLIT)[:, None] & cmask[None, :],
                         other=0.0)
            tl.store(DW + cols, tl.sum(st, axis=0).to(DW.dtype.element_ty), mask=cmask)
            tl.store(COUNT + c, 0)  # zero again for the next launch


# Launch configuration. Both passes stream memory, so a config is judged by bytes in flight per SM (Hopper needs
# ~32-64 KB per SM to cover HBM3e latency at full bandwidth), by 128-bit accesses (8 bf16 / 4 fp32 contiguous per
# thread: BLOCK_D is a power of two and Triton vectorises along it when D % 8 == 0) and by registers (64K per SM).
# Register counts quoted below are ptxas's for sm_90a (Triton 3.9, bf16), compiled without a GPU.
_PREFETCH = True  # backward loads tile i + 1 while it computes tile i (unless that spills; tests also run it off)


def _wide(padded_rows: int, D: int, block_d: int) -> bool:
    """Whether a kernel over padded_rows rows of D elements (columns reaching block_d) needs int64 offsets."""
    return padded_rows * D + max(D, block_d) >= 2**31


def _fwd_even(D: int, n_rows: int, block_d: int, rows: int, looped: bool) -> bool:
    """Whether the forward runs mask-free (EVEN): row tiles divide n_rows, and the tile (LOOPED: the chunk) fits D."""
    return n_rows % rows == 0 and (D % block_d == 0 if looped else D == block_d)


@functools.cache
def _fwd_config(D: int, fused: bool = False) -> tuple[int, int, int, bool, bool]:
    """(BLOCK_D, ROWS, num_warps, EVICT, LOOPED) of the forward: a non-persistent grid of (ROWS, BLOCK_D) tiles.

    Up to D = 1024, whole rows in tiles of 2048 elements (16-32 a thread), x read with evict_first (EVICT). Above
    D = 1024, the two-pass LOOPED form (x read in chunks of up to 4096 to sum the squares, kept in L2 with
    evict_last, read again to write y), 16 elements a thread (8 at 7168), 8-16 warps. Mask-free (EVEN) where the
    tile or chunk divides the shapes. Widths between the measured ones (1536, 5120) take the rule, unmeasured.
    Kernel time as a fraction of the copy rate, 16384 rows of bf16 on an H200 (``bench/sweep_rmsnorm.py``,
    results/sweep_rmsnorm_fwd.md; torch.compile of the eager reference in the same run, and the whole-row one-pass
    tiles that were the default before D became a compile-time constant):

        D     BLOCK_D  ROWS  warps  LOOPED  EVEN  of copy  compiled  one-pass before
        512     512      4     2      no     yes    91%      92%      91%
        1024   1024      2     4      no     yes    94%      91%      93%
        2048   2048      2     8      yes    yes    95%      76%      93%
        4096   4096      2    16      yes    yes    98%      81%      96%
        7168   4096      1    16      yes    no    100%      98%      97%

    The fused add (``fused``) keeps the one-pass tiles at every width (its LOOPED form, which stores s and reads it
    back, was not measured): 32 elements a thread up to BLOCK_D = 512, 16 up to 4096, 32 at 8192 (8 warps); at
    D = 1024 two rows in four warps without EVICT (``--passes fused``, three sweeps: 93% of copy, the best or within
    0.2% of it, compiled 93-94%; two warps with EVICT, the first choice, 90%).
    """
    block_d = triton.next_power_of_2(D)
    if block_d <= 1024:
        rows = 2048 // block_d
        if fused and block_d == 1024:  # x and the residual not marked evict_first
            return block_d, rows, 4, False, False
        return block_d, rows, max(1, rows * block_d // 1024) if fused or block_d < 1024 else 4, True, False
    if fused:
        return block_d, 1, min(8, block_d // 512) if block_d <= 8192 else 16, False, False
    chunk = min(block_d, 4096)
    return chunk, 2 if D <= 4096 else 1, 8 if D <= 2048 else 16, False, True


@functools.cache
def _bwd_config(D: int) -> tuple[int, int, int, bool]:
    """(BLOCK_D, ROWS, num_warps, EVICT) of the persistent backward: tiles of one row, two up to BLOCK_D = 1024,
    16 elements a thread (2 to 16 warps); EVICT at BLOCK_D <= 512.

    Small programs pack the register file better than big ones (one wave holds as many as fit, ``_bwd_plan``),
    and with PREFETCH each also has its next tile in flight while it computes the current one. Measured on an H200
    (sweep as in ``_fwd_config``, the dweight sum included; before this sweep, torch's sum and 4-warp tiles):

        D     BLOCK_D  ROWS  warps  programs/SM  of copy
        512     512      2     2       10         73%  (41%)
        1024   1024      2     4        5         80%  (61%)
        2048   2048      1     4        5         87%  (76%)
        4096   4096      1     8        2         91%  (88%)
        7168   8192      1    16        1         88%  (87%)
    """
    block_d = triton.next_power_of_2(D)
    rows = 2 if block_d <= 1024 else 1
    return block_d, rows, min(16, max(1, rows * block_d // 512)), block_d <= 512


_BWD_PLAN: dict[tuple, tuple[int, bool]] = {}  # kernel specialisation -> (programs per SM, PREFETCH)


def _bwd_plan(device: torch.device, key: tuple, warmup_args: tuple, meta: dict) -> tuple[int, bool]:
    """(programs resident per SM, PREFETCH) for the backward on `device`, from the compiled kernel's registers,
    spills and shared memory (the recipe of Triton's fused-softmax tutorial); compiled here once, then cached.

    The persistent grid is programs-per-SM times the SM count: one wave, every program resident, none waiting on
    another's exit. PREFETCH is dropped if the kernel with it spills registers (a 16-warp program may use 128).
    If the query fails (a Triton whose API differs), a generous guess: over-subscribing costs only extra rows of
    dweight partials, under-subscribing would leave SMs with too little in flight.
    """
    if key in _BWD_PLAN:
        return _BWD_PLAN[key]
    warps = meta["num_warps"]
    props = torch.cuda.get_device_properties(device)
    regs_sm = getattr(props, "regs_per_multiprocessor", 65536)
    warps_sm = getattr(props, "max_threads_per_multi_processor", 2048) // 32
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    try:
        for prefetch in ([True, False] if _PREFETCH else [False]):
            with torch.cuda.device(device):
                kernel = _rms_norm_bwd.warmup(*warmup_args, grid=(1,), **{**meta, "PREFETCH": prefetch})
                kernel._init_handles()
            if not (prefetch and kernel.n_spills > 0):
                break
        regs_warp = -(-kernel.n_regs * 32 // 256) * 256  # registers are allocated per warp, 256 at a time
        by_regs = regs_sm // regs_warp // warps
        by_smem = smem_sm // (kernel.metadata.shared + 1024)  # the runtime reserves 1 KB per program
        plan = (max(1, min(by_regs, warps_sm // warps, by_smem, 32)), prefetch)  # 32: most programs an SM holds
    except Exception:  # noqa: BLE001  a Triton without warmup / n_regs / n_spills: guess half the thread limit
        plan = (max(2, warps_sm // warps // 2), _PREFETCH)
    _BWD_PLAN[key] = plan
    return plan


_DW_BD, _DW_TILE = 64, 8192  # the dweight sum's column strip and tile (PB = 128 rows of partials a program)


def _sum_rows(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(P, D) float32 partials -> (D,) in dtype: their column sums, in a fixed order (``_dw_sum_kernel``).

    Its arrival counters are the device's (``minids.kernels.arrival_counters``): two of these sums must not run at
    the same time on two streams of one device."""
    P, D = part.shape
    if D == 0:
        return part.sum(0).to(dtype)
    bd = min(_DW_BD, triton.next_power_of_2(D))
    pb = _DW_TILE // bd
    n_strips, split = triton.cdiv(D, bd), triton.cdiv(P, pb)
    counts = arrival_counters("rmsnorm", part.device, n_strips)
    stage = torch.empty(split, D, device=part.device, dtype=torch.float32)  # (SPLIT, D)
    dw = torch.empty(D, device=part.device, dtype=dtype)
    _dw_sum_kernel[(n_strips, split)](part, stage, counts, dw, P, D, split, PB=pb, BD=bd,
                                      SPLIT_P2=triton.next_power_of_2(split), num_warps=8)
    return dw


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be floating point, got {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be ({x.shape[-1]},) for x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device}, weight on {weight.device}")
    require_runs_here(x, "rms_norm (Triton)", "minids.rms_norm")


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape, D = x.shape, x.shape[-1]
        weight = weight.contiguous()  # the kernels read it with unit stride
        x2 = x.reshape(-1, D).contiguous()  # (R, D)
        r2 = residual.reshape(-1, D).contiguous() if residual is not None else None
        n_rows = x2.shape[0]
        s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        y = torch.empty(n_rows, D, device=x.device, dtype=torch.promote_types(weight.dtype, s_dtype))  # (R, D)
        s = torch.empty(n_rows, D, device=x.device, dtype=s_dtype) if residual is not None else x2  # (R, D)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)  # (R,)
        block_d, rows, warps, evict, looped = _fwd_config(D, residual is not None)
        even = _fwd_even(D, n_rows, block_d, rows, looped)
        if n_rows > 0:
            _rms_norm_fwd[(triton.cdiv(n_rows, rows),)](
                x2, r2 if r2 is not None else x2, weight, y, s, rstd, n_rows, D, eps,
                HAS_RES=residual is not None, ROWS=rows, BLOCK_D=block_d, EVICT=evict, LOOPED=looped, EVEN=even,
                WIDE=_wide(triton.cdiv(n_rows, rows) * rows, D, block_d), num_warps=warps,
            )
        ctx.save_for_backward(s, weight, rstd)
        ctx.has_res = residual is not None
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.shape = shape
        if residual is None:
            return y.view(shape)
        return y.view(shape), s.view(shape)

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, rstd = ctx.saved_tensors
        n_rows, D = s.shape
        dy2 = dy.reshape(-1, D).contiguous()  # (R, D)
        ds2 = ds.reshape(-1, D).to(s.dtype).contiguous() if ctx.has_res and ds is not None else None
        dx = torch.empty_like(s)  # (R, D)
        block_d, rows, warps, evict = _bwd_config(D)
        n_tiles = triton.cdiv(n_rows, rows)
        meta = {"HAS_DS": ds2 is not None, "ROWS": rows, "BLOCK_D": block_d, "EVICT": evict, "num_warps": warps}
        args = (dy2, s, weight, rstd, ds2 if ds2 is not None else dy2, dx)
        if n_rows == 0:
            dw_part = torch.zeros(1, D, device=s.device, dtype=torch.float32)
        else:
            if s.is_cuda:  # one wave of persistent programs: as many as are resident at once on every SM
                key = (s.device.index, D, dy2.dtype, s.dtype, weight.dtype, ds2 is not None, _PREFETCH)
                per_sm, prefetch = _bwd_plan(s.device, key, (*args, rstd, n_rows, D), meta)  # rstd: any fp32 buffer
                n_prog = min(n_tiles, per_sm * sm_count(s.device.index))
            else:  # interpreter: a few programs, so that each runs the grid-stride loop more than once
                n_prog, prefetch = min(n_tiles, 4), _PREFETCH
            dw_part = torch.empty(n_prog, D, device=s.device, dtype=torch.float32)  # (P, D)
            _rms_norm_bwd[(n_prog,)](*args, dw_part, n_rows, D, PREFETCH=prefetch, **meta)
        dw = _sum_rows(dw_part, weight.dtype)  # (D,)
        dx = dx.view(ctx.shape)
        if ctx.has_res:  # s = x + residual: both get ds, each in its own dtype (a copy only where they differ)
            return dx.to(ctx.dtypes[0]), dx.to(ctx.dtypes[1]), dw, None
        return dx, None, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm over the last dim. x: (..., D), weight: (D,) -> (..., D) in result_type(weight, x)."""
    _check(x, weight, None)
    return _RMSNormFn.apply(x, None, weight, float(eps))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused residual add + RMSNorm. x, residual: (..., D) -> (rms_norm(x + residual), x + residual)."""
    _check(x, weight, residual)
    return _RMSNormFn.apply(x, residual, weight, float(eps))
