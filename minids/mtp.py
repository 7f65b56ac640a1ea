"""Multi-Token Prediction (DeepSeek-V3 2.2, eqs. 21-25; REFERENCE.md 4 and 8.11).

Module k (k = 1..D) predicts token t_{i+k+1} at position i from the previous depth's hidden
state h^{k-1}_i and the embedding of token t_{i+k}:
    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)])
    h^k  = TRM_k(h')                      (one decoder layer, causal over the whole sequence)
    P^k  = OutHead(shared_head.norm(h^k))
Emb and OutHead are the main model's (shared, not copied). h^0 is the main model's output
after its final norm.

Choices where the sources differ (REFERENCE.md 8.11): the embedding half comes FIRST in the
concatenation (the order of the checkpoint's ``eh_proj`` as read by vLLM; the paper writes the
hidden state first), and the checkpoint's extra ``shared_head.norm`` is applied before the head.
Using h^0 after the final norm also follows vLLM. The loss is L_MTP = (lambda / D) sum_k L^k (V3P eq. 25) with
L^k the mean cross-entropy over the T - k positions that have a target. V3P eq. 24 divides that sum by T
instead, which makes L^k smaller by (T - k) / T: 0.02% at V3's T = 4096, 0.4% at ``minids train``'s default
256; minids keeps the mean, which ignored (-100) labels leave well defined.

Shapes: B batch, S length, D hidden.
"""

from __future__ import annotations

import torch
from torch import nn

from minids.block import DecoderLayer
from minids.config import ModelConfig
from minids.moe import Routing
from minids.norm import RMSNorm

__all__ = ["MTPLayer"]


class SharedHead(nn.Module):
    """Holds only the extra norm; the head weight itself is the main model's lm_head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MTPLayer(DecoderLayer):
    """Checkpoint layer ``num_hidden_layers + k - 1``: a decoder layer plus enorm, hnorm, eh_proj, shared_head."""

    def __init__(self, cfg: ModelConfig, depth: int):
        super().__init__(cfg, cfg.num_hidden_layers + depth - 1)
        self.depth = depth
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(  # type: ignore[override]
        self, h_prev: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None
    ) -> tuple[torch.Tensor, torch.Tensor, Routing | None]:
        """h_prev, emb: (B, S', D) -> h^k (B, S', D), shared_head.norm(h^k) for the head, and the Routing.

        The head's norm is applied here, inside the layer, so that a sharded (FSDP) layer has its
        weights gathered when the norm runs.
        """
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))  # (B, S', D)
        h, routing = super().forward(x, cos, sin, cache)
        return h, self.shared_head.norm(h), routing
