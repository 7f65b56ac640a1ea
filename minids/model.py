"""The decoder-only Transformer: embedding, decoder layers, final norm, untied head, MTP, losses.

``Transformer(cfg)`` builds any config of the family; its parameter names are the Hugging Face
checkpoint keys (``model.embed_tokens.weight``, ``model.layers.N.self_attn.q_a_proj.weight``,
``lm_head.weight``), except that routed experts are stacked (``mlp.experts.gate_proj[e]`` is
``mlp.experts.e.gate_proj.weight``) and MTP layer k lives at ``mtp.{k-1}`` (``model.layers.{L+k-1}``
on disk).

    out = model(input_ids, labels=input_ids)
    out.logits (B, S, V); out.loss = LM loss + mtp_weight * MTP loss; out.aux: a dict with
    "lm_loss", "mtp_loss" (when the model has MTP and labels are given) and "expert_counts"
    (n_moe_layers, E) tokens routed to each expert in this forward.

Labels follow the Hugging Face convention: ``labels[:, t]`` is the token at position t (the model
shifts internally); -100 is ignored.

Shapes: B batch, S length, D hidden, V vocab, E routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from minids.balance import balance_losses
from minids.block import DecoderLayer
from minids.config import ModelConfig
from minids.moe import DeepSeekMoE, Experts, Router
from minids.mtp import MTPLayer
from minids.norm import RMSNorm
from minids.rope import RotaryEmbedding, rope_inv_freq

__all__ = ["ModelOutput", "Transformer", "lm_loss"]

IGNORE_INDEX = -100


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None  # (B, S, D) after the final norm (decoding with a cache: what MTP drafts from)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Mean cross-entropy of logits[:, t] against labels[:, t + shift], in float32; -100 ignored.

    logits: (B, S, V), labels: (B, S + shift - 1) or longer; both aligned at position 0.
    """
    S = logits.shape[1]
    targets = labels[:, shift : shift + S - 1]  # (B, S-1)
    return F.cross_entropy(
        logits[:, : targets.shape[1]].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX
    )


class DecoderStack(nn.Module):
    """``model.*`` in the checkpoints: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig | str | dict):
        super().__init__()
        cfg = ModelConfig.load(cfg) if not isinstance(cfg, ModelConfig) else cfg
        self.cfg = cfg
        self.model = DecoderStack(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.mtp = nn.ModuleList(MTPLayer(cfg, k) for k in range(1, cfg.num_nextn_predict_layers + 1))
        self.rotary = RotaryEmbedding(cfg)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for every matrix, ones for norms, zeros for selection biases.

        Also recomputes the RoPE frequencies, so a model built on the meta device and moved with
        ``to_empty`` is complete after this call.
        """
        std = self.cfg.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Experts):
                for p in m.parameters():
                    nn.init.normal_(p, 0.0, std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
                if m.e_score_correction_bias is not None:
                    m.e_score_correction_bias.zero_()
        self.reset_buffers()

    def tie_weights(self) -> None:
        """Share the input embedding with the head when the config ties them (again after ``to_empty``)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (RoPE frequencies, zeroed load counts), e.g. after ``to_empty``."""
        r = self.rotary
        r.inv_freq = rope_inv_freq(r.dim, self.cfg.rope_theta, self.cfg.rope_scaling).to(r.inv_freq.device)
        for m in self.modules():
            if isinstance(m, Router) and m.load_counts is not None:
                m.load_counts.zero_()

    @torch.no_grad()
    def mtp_logits(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, cache, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Depth-1 MTP drafting over its own cache (``KVCache.allocate(..., mtp=True)``).

        hidden: (B, S, D) the main model's final hidden states at positions cache.lengths[b] + j, and
        next_ids: (B, S) the token that follows each of those positions -> logits (B, S, V) for the token
        after that (V3P eq. 21-23 at inference).
        """
        if not len(self.mtp):
            raise ValueError("this model has no MTP module (num_nextn_predict_layers=0): it cannot draft tokens")
        B, S = next_ids.shape
        positions = cache.begin(S, lengths if lengths is not None else torch.full((B,), S, device=next_ids.device))
        cos, sin = self.rotary(positions)
        _, h_normed, _ = self.mtp[0](hidden, self.model.embed_tokens(next_ids), cos, sin, cache)
        cache.lengths.add_(cache.new_lens)  # in place: a decoder keeps it as static state
        return self.lm_head(h_normed)  # (B, S, V)

    def set_moe_impl(self, impl: str) -> None:
        """Route every MoE layer through "grouped" (torch._grouped_mm), "loop", "triton" (minids.kernels) or "auto"."""
        if impl not in ("auto", "grouped", "loop", "triton"):
            raise ValueError(f"moe impl {impl!r}: one of auto, grouped, loop, triton")
        for m in self.modules():
            if isinstance(m, DeepSeekMoE):
                m.impl = impl

    def set_norm_impl(self, impl: str) -> None:
        """Run every RMSNorm as "torch" (the reference), "triton" (minids.kernels.rmsnorm) or "auto" (Triton on CUDA)."""
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(f"norm impl {impl!r}: one of auto, torch, triton")
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.impl = impl

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        mtp_weight: float = 0.3,
        balance: dict[str, float] | None = None,
        cache=None,
        lengths: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids, labels: (B, S) -> logits, loss, aux.

        mtp_weight: lambda of V3P eq. 25 (0.3, then 0.1, in V3's training).
        balance: {loss name: alpha} of ``minids.balance`` losses to add to the loss, e.g.
            {"sequence": 1e-4} (V3) or {"expert": 0.003, "device": 0.05, "comm": 0.02} (V2).
        cache: a ``minids.cache.KVCache``: the S tokens continue each sequence at cache.lengths[b]
            (prefill or decode); lengths (B,) says how many of them are real in a right-padded batch
            (default all S); the cache's lengths advance by that much. Returns logits and ``hidden``.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        B, S = input_ids.shape
        if S > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {S} exceeds max_position_embeddings={self.cfg.max_position_embeddings}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels must be (batch, length) like input_ids {tuple(input_ids.shape)}, unshifted (the "
                             f"loss shifts them, as transformers does), got {tuple(labels.shape)}")
        if labels is not None and S < 2:
            raise ValueError(f"a loss needs at least 2 tokens a sequence (the next-token target), got length {S}")
        if cache is None and input_ids.device.type == "cpu" and input_ids.numel() and not (
                0 <= int(input_ids.min()) and int(input_ids.max()) < self.cfg.vocab_size):  # (no host read on CUDA,
            # nor in decoding, whose prompts minids.decode.check_prompts checks once)
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.cfg.vocab_size}), got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        if cache is not None:
            if labels is not None:
                raise ValueError("labels and cache together: train without a cache, decode with one")
            positions = cache.begin(S, lengths if lengths is not None else torch.full((B,), S, device=input_ids.device))
        else:
            positions = torch.arange(S, device=input_ids.device).unsqueeze(0)  # (1, S)
        cos, sin = self.rotary(positions)  # (1 or B, S, R/2)
        h = self.model.embed_tokens(input_ids)  # (B, S, D)
        routing = []
        for layer in self.model.layers:
            h, r = layer(h, cos, sin, cache)
            if r is not None:
                routing.append(r)
        h = self.model.norm(h)
        logits = self.lm_head(h)  # (B, S, V)
        if cache is not None:
            cache.lengths.add_(cache.new_lens)  # in place: a decoder keeps it as static state
            return ModelOutput(logits=logits, aux={"expert_counts": torch.stack([r.counts for r in routing])}
                               if routing else {}, hidden=h)
        aux: dict[str, torch.Tensor] = {}
        loss = None
        if labels is not None:
            loss = aux["lm_loss"] = lm_loss(logits, labels)
            if len(self.mtp) and S > len(self.mtp) + 1:
                mtp_losses = []
                for k, layer in enumerate(self.mtp, start=1):
                    n = S - k  # positions i = 0..S-k-1 see tokens t_{i+k}
                    emb = self.model.embed_tokens(input_ids[:, k:])  # (B, S-k, D)
                    h, h_normed, r = layer(h[:, :n], emb, cos[:, :n], sin[:, :n])  # (B, S-k, D) each
                    if r is not None:
                        routing.append(r)
                    logits_k = self.lm_head(h_normed)  # (B, S-k, V)
                    mtp_losses.append(lm_loss(logits_k, labels, shift=k + 1))
                aux["mtp_loss"] = torch.stack(mtp_losses).mean()
                loss = loss + mtp_weight * aux["mtp_loss"]
            if balance and routing:
                terms = balance_losses(routing, balance, self.cfg.n_group, self.cfg.topk_group)
                for name, v in terms.items():
                    aux[f"balance_{name}"] = v
                    loss = loss + v
        if routing:
            aux["expert_counts"] = torch.stack([r.counts for r in routing])  # (n_moe_layers [+ MTP], E)
        return ModelOutput(logits=logits, loss=loss, aux=aux)
