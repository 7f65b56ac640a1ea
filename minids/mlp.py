"""The SwiGLU feed-forward network of every DeepSeek model (dense layers and shared experts).

out = down_proj(silu(gate_proj(x)) * up_proj(x)); names as in the checkpoints (official
inference code: w1 = gate_proj, w3 = up_proj, w2 = down_proj; REFERENCE.md 7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """x: (..., D) -> (..., D) through a hidden width I."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
