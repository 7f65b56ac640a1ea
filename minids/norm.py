"""RMSNorm (Zhang & Sennrich 2019), as used before every block, on the MLA latents and in MTP.

y = w * x / sqrt(mean(x^2) + eps), normalised in float32 and cast back before the weight
multiply, as transformers' DeepseekV3RMSNorm does (REFERENCE.md 7). eps = 1e-6 everywhere.

``add_rms_norm`` is the residual add before a norm and the norm in one call (what a pre-norm block does
between sublayers); ``minids.kernels.rmsnorm`` has Triton versions of both with the same signatures, which
``RMSNorm`` uses on CUDA when Triton is installed (``impl``: "auto", "torch" or "triton").
"""

from __future__ import annotations

import torch
from torch import nn

from minids._kernels import kernels_available, require_kernels

__all__ = ["RMSNorm", "add_rms_norm", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Reference RMSNorm over the last dim. x: (..., D), weight: (D,) -> (..., D) in x.dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference residual add + RMSNorm. x, residual: (..., D) -> (rms_norm(x + residual), x + residual)."""
    s = x + residual  # (..., D)
    return rms_norm(s, weight, eps), s


def _use_kernel(impl: str, x: torch.Tensor) -> bool:
    """Whether the Triton RMSNorm runs: forced by impl="triton", or impl="auto" on CUDA with Triton, not compiling.

    "auto" takes the kernel at every width: the eager alternative is the reference formula above, six or seven
    kernels (cast, square, mean, rsqrt, two products, cast) where the kernel is one launch and one pass."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"RMSNorm impl={impl!r}: one of auto, torch, triton")
    # under torch.compile the eager formula is traced and fused by the compiler instead
    if impl == "torch" or (impl == "auto" and (not x.is_cuda or torch.compiler.is_compiling())):
        return False
    if impl == "triton":
        require_kernels("RMSNorm impl='triton'")
    return kernels_available()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.impl = "auto"  # "auto" (Triton on CUDA where installed) | "torch" | "triton"; Transformer.set_norm_impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        if _use_kernel(self.impl, x):
            from minids.kernels.rmsnorm import rms_norm as rms_norm_triton

            return rms_norm_triton(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and this norm in one: x, residual (..., D) -> (normed, x + residual)."""
        if _use_kernel(self.impl, x) and x.shape == residual.shape:
            from minids.kernels.rmsnorm import add_rms_norm as add_rms_norm_triton

            return add_rms_norm_triton(x, residual, self.weight, self.eps)
        return add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
