"""One pre-norm decoder layer: x += attn(RMSNorm(x)); x += ffn(RMSNorm(x)) (REFERENCE.md 7).

The attention is MLA or MHA/GQA and the FFN dense SwiGLU or DeepSeekMoE, as the config says
for this layer index. Names follow the checkpoints: input_layernorm, self_attn,
post_attention_layernorm, mlp.

Shapes: B batch, S length, D hidden, E routed experts.
"""

from __future__ import annotations

import torch
from torch import nn

from minids.attention import MHA, MLA
from minids.config import ModelConfig
from minids.mlp import MLP
from minids.moe import DeepSeekMoE, Routing
from minids.norm import RMSNorm

__all__ = ["DecoderLayer"]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg) if cfg.is_mla else MHA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = DeepSeekMoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None
    ) -> tuple[torch.Tensor, Routing | None]:
        """x: (B, S, D) -> (B, S, D), and the router's decisions for a MoE layer (else None).

        cache: a ``minids.cache.KVCache`` to decode with (this layer's slot is its layer index).
        """
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, self.layer_idx)
        h, x = self.post_attention_layernorm.add_forward(a, x)  # x <- x + a, h = RMSNorm(x), fused where it runs
        if self.is_moe:
            y, routing = self.mlp(h)
            return x + y, routing
        return x + self.mlp(h), None
