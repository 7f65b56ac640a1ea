"""Rotary position embedding (RoPE) with linear scaling and YaRN, in both channel layouts.

Frequencies (REFERENCE.md 2.4): theta_i = base^(-2i/R), i = 0..R/2-1, R = rotated width.
- linear (DeepSeek-Coder): theta_i / factor.
- YaRN (V2, V3; Peng et al. 2023): with s = factor and L = original_max_position_embeddings,
  the correction dim for r rotations is R * ln(L / (2 pi r)) / (2 ln base);
  low = floor(dim(beta_fast)), high = ceil(dim(beta_slow)), clamped to [0, R-1];
  ramp_i = clamp((i - low) / (high - low), 0, 1);
  theta'_i = theta_i / s * ramp_i + theta_i * (1 - ramp_i).
  With V3's values (R 64, base 1e4, L 4096, s 40, beta 32/1): low = 10, high = 23.
  cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim) (1.0 for every
  released config); the attention-logit correction mscale(s, mscale_all_dim)^2 lives in
  ``ModelConfig.softmax_scale``.

Layouts: ``interleave=True`` rotates consecutive pairs (x_2i, x_2i+1), the order of the
published MLA checkpoints and of the official inference code; ``interleave=False`` rotates
(x_i, x_i+R/2), the Llama "rotate half" order of the dense models and DeepSeekMoE-16B.

Shapes: B batch, S length, H heads, R rotated width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minids.config import ModelConfig, yarn_mscale

__all__ = ["RotaryEmbedding", "apply_rope", "rope_inv_freq", "yarn_correction_range"]


def yarn_correction_range(dim: int, base: float, orig_len: int, beta_fast: float, beta_slow: float) -> tuple[int, int]:
    """(low, high) channel-pair indices of the YaRN ramp; (10, 23) for V3's 64-d rope."""

    def corr_dim(rotations: float) -> float:
        return dim * math.log(orig_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    return low, high


def rope_inv_freq(dim: int, base: float, scaling: dict | None = None) -> torch.Tensor:
    """Per-pair angular frequencies, (dim/2,) float32, after linear or YaRN scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "yarn":
        s = scaling["factor"]
        low, high = yarn_correction_range(
            dim, base, scaling["original_max_position_embeddings"],
            scaling.get("beta_fast", 32), scaling.get("beta_slow", 1),
        )
        if low == high:
            high += 0.001  # avoid a zero-width ramp (as the reference implementations do)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x: (B, S, H, R) by cos/sin: (B or 1, S, R/2). Computed in float32, returned in x.dtype."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape or cos.shape[1] != x.shape[1] \
            or 2 * cos.shape[-1] != x.shape[-1] or cos.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"apply_rope: x must be (B, S, H, R) and cos, sin (B or 1, S, R/2), got {tuple(x.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (B, S, 1, R/2)
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]  # (B, S, H, R/2) each: pairs (x_2i, x_2i+1)
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)  # (B, S, H, R)
    else:
        x1, x2 = xf.chunk(2, dim=-1)  # pairs (x_i, x_i+R/2)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, S, H, R)
    return out.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """positions (B or 1, S) -> cos, sin (B or 1, S, R/2) in float32, YaRN cos/sin scale applied."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dim = cfg.rope_dim
        self.interleave = cfg.rope_interleave
        self.register_buffer("inv_freq", rope_inv_freq(self.dim, cfg.rope_theta, cfg.rope_scaling), persistent=False)
        self.scale = 1.0
        if cfg.rope_type == "yarn":
            s = cfg.rope_scaling["factor"]
            self.scale = yarn_mscale(s, cfg.rope_scaling.get("mscale", 1) or 0) / yarn_mscale(
                s, cfg.rope_scaling.get("mscale_all_dim", 0) or 0
            )

    def _apply(self, fn, recurse=True):
        # keep the frequencies in float32 whatever dtype the model is cast to: rounded to bf16 (rel. error
        # 2^-9) and multiplied by a position in the thousands, an angle is off by whole radians
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            dev = self.inv_freq.device
            if inv_freq.is_meta or dev.type == "meta":
                self.inv_freq = torch.empty(inv_freq.shape, dtype=torch.float32, device=dev)
            else:
                self.inv_freq = inv_freq.to(device=dev, dtype=torch.float32)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float().unsqueeze(-1) * self.inv_freq  # (B, S, R/2)
        return angles.cos() * self.scale, angles.sin() * self.scale
