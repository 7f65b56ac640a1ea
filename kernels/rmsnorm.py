"""RMSNorm in Triton, forward and backward, optionally fused with the residual add before it.

Mirrors ``minids.norm.rms_norm`` and ``minids.norm.add_rms_norm`` (same names, same signatures):

    rstd = 1 / sqrt(mean(x^2) + eps)            float32, per row
    n    = (x * rstd).to(x.dtype)               normalised, rounded to the input dtype as the reference does
    y    = weight * n                           in result_type(weight, x)
    add_rms_norm: s = x + residual (in x.dtype), returns (rms_norm(s), s)

Backward (xhat = x * rstd, dn = (dy * weight) rounded to x.dtype, as autograd of the reference rounds it):
    dx = rstd * (dn - xhat * mean(dn * xhat))    (+ the gradient of the returned residual s, when fused)
    dweight = sum over rows of dy * n

Layout and optimisations:
- Rows are independent: a program normalises a (ROWS, BLOCK_D) tile, several rows at once when D is small so every
  program moves a few KB (one row of D=1024 bf16 is only 2 KB, too little to hide memory latency alone).
- The forward keeps rstd (4 bytes a row) so the backward needs no second reduction over x for it.
- The backward runs a fixed number of persistent programs (a few per SM) that stride over row tiles and keep
  their dweight partial sums in registers; one (P, D) float32 buffer of partials, summed by torch afterwards,
  replaces a full (rows, D) product or atomics. P is set by the machine, not by the row count, so small hidden sizes
  pay no fixed per-row-block cost for dweight (the floor a compiled eager RMSNorm hits at D=1024).
- The fused residual add writes s = x + residual once and normalises it from registers: one read of x and
  residual, two writes, instead of the separate add (read 2, write 1) and norm (read 1, write 1).

Preconditions: x (..., D) floating point, weight (D,), residual (if any) the shape of x (dtypes promote as torch's
x + residual does: a bf16 sublayer output onto a float32 residual stream under autocast). Inputs are made
contiguous over rows (a copy only where they are not). Runs on CUDA with Triton, or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
from minids.kernels import HAVE_TRITON

__all__ = ["add_rms_norm", "rms_norm"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_fwd(
        X, R, W, Y, S, RSTD,
        n_rows, D, eps,
        HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """One (ROWS, BLOCK_D) tile of rows. X, R, Y, S: (n_rows, D) contiguous; W: (D,); RSTD: (n_rows,) fp32.

        S (the sum, in result_type(x, residual); S is X itself without a residual) sets the rounding dtype.
        """
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        rmask = rows < n_rows
        cmask = cols < D
        mask = rmask[:, None] & cmask[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]  # (ROWS, BLOCK_D); int64: rows * D can pass 2^31
        x = tl.load(X + offs, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(R + offs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)  # s = x + residual, rounded as torch
            tl.store(S + offs, x, mask=mask)
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / D + eps)  # (ROWS,)
        n = (xf * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32)  # rounded to x.dtype like the reference
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        tl.store(Y + offs, (n * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=rmask)

    @triton.jit
    def _rms_norm_bwd(
        DY, X, W, RSTD, DS, DX, DW_PART,
        n_rows, D,
        HAS_DS: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Persistent: program p takes row tiles p, p + P, ... and writes its dweight partial sum to DW_PART[p].

        DY, X, DS, DX: (n_rows, D) contiguous (X is s when the residual add was fused; DS the gradient of s);
        RSTD: (n_rows,) fp32; DW_PART: (P, D) fp32.
        """
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)  # (BLOCK_D,)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        for start in range(pid * ROWS, n_rows, n_prog * ROWS):
            rows = start + tl.arange(0, ROWS)
            rmask = rows < n_rows
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            xhat = x * rstd[:, None]
            dw += tl.sum(dy * xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
            dn = (dy * w[None, :]).to(X.dtype.element_ty).to(tl.float32)
            c = tl.sum(dn * xhat, axis=1) / D  # (ROWS,)
            dx = rstd[:, None] * (dn - xhat * c[:, None])
            if HAS_DS:
                dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=cmask)


def _tile(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps): a tile of about 8K elements, at most 16 of them per thread."""
    block_d = triton.next_power_of_2(D)
    rows = max(1, min(16, 8192 // block_d))
    warps = min(16, max(1, rows * block_d // 512))
    return block_d, rows, warps


def _n_programs(device: torch.device, n_tiles: int) -> int:
    """Persistent programs for the backward: 4 per SM on a GPU (4 under the interpreter), never more than tiles."""
    per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return max(1, min(n_tiles, per_device))


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if not x.is_floating_point():
        raise ValueError(f"rms_norm: x must be floating point, got {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight {tuple(weight.shape)} must be ({x.shape[-1]},) for x {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} must have the shape of x {tuple(x.shape)}")
    if x.device != weight.device:
        raise ValueError(f"rms_norm: x on {x.device}, weight on {weight.device}")


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        shape, D = x.shape, x.shape[-1]
        x2 = x.reshape(-1, D).contiguous()  # (R, D)
        r2 = residual.reshape(-1, D).contiguous() if residual is not None else None
        n_rows = x2.shape[0]
        s_dtype = torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype
        y = torch.empty(n_rows, D, device=x.device, dtype=torch.promote_types(weight.dtype, s_dtype))  # (R, D)
        s = torch.empty(n_rows, D, device=x.device, dtype=s_dtype) if residual is not None else x2  # (R, D)
        rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)  # (R,)
        block_d, rows, warps = _tile(D)
        if n_rows > 0:
            _rms_norm_fwd[(triton.cdiv(n_rows, rows),)](
                x2, r2 if r2 is not None else x2, weight, y, s, rstd, n_rows, D, eps,
                HAS_RES=residual is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
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
        block_d, rows, warps = _tile(D)
        n_prog = _n_programs(s.device, triton.cdiv(n_rows, rows))
        dw_part = torch.empty(n_prog, D, device=s.device, dtype=torch.float32)  # (P, D)
        if n_rows > 0:
            _rms_norm_bwd[(n_prog,)](
                dy2, s, weight, rstd, ds2 if ds2 is not None else dy2, dx, dw_part, n_rows, D,
                HAS_DS=ds2 is not None, ROWS=rows, BLOCK_D=block_d, num_warps=warps,
            )
        else:
            dw_part.zero_()
        dw = dw_part.sum(0).to(weight.dtype)  # (D,)
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
