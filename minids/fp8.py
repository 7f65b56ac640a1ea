"""FP8 block scaling of weights, as in DeepSeek-V3's checkpoints (REFERENCE.md 5.2).

Each FP8 (E4M3) weight W[out, in] carries a float32 ``weight_scale_inv`` of shape
[ceil(out/128), ceil(in/128)]: the real value of an element is its FP8 value times the scale of its
128x128 block; edge blocks are partial. The scale of a block is amax(|block|) / 448 (448 = the
largest finite E4M3 value), so the block's largest element maps to +-448.

Shapes: O out features, I in features, b block size (128).
"""

from __future__ import annotations

import math

import torch

__all__ = ["E4M3_MAX", "weight_dequant", "weight_quant"]

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def _block_view(shape: torch.Size, block: int) -> tuple[int, int]:
    return math.ceil(shape[0] / block), math.ceil(shape[1] / block)


def weight_dequant(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Reference block dequantization. w: (O, I) fp8, scale_inv: (ceil(O/b), ceil(I/b)) -> (O, I) in dtype."""
    if w.dim() != 2 or scale_inv.shape != _block_view(w.shape, block):
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected {_block_view(w.shape, block)} "
            f"for a weight of shape {tuple(w.shape)} with {block}x{block} blocks"
        )
    O, I = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]  # (O, I)
    return (w.float() * s).to(dtype)


def weight_quant(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block quantization to E4M3. w: (O, I) -> (fp8 (O, I), scale_inv (ceil(O/b), ceil(I/b)) fp32)."""
    O, I = w.shape
    bo, bi = _block_view(w.shape, block)
    padded = torch.zeros(bo * block, bi * block, dtype=torch.float32, device=w.device)
    padded[:O, :I] = w.float()  # zero padding never raises a block's amax
    blocks = padded.view(bo, block, bi, block)  # (bo, b, bi, b)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (bo, bi)
    scale_inv = amax / E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.view(bo * block, bi * block)[:O, :I].contiguous(), scale_inv
