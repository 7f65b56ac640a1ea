"""Accounting: parameters (total, activated per token, MTP), KV-cache size and forward FLOPs per token.

Parameter counts come from building the model on the meta device (no memory), so they count
exactly what ``Transformer`` holds. Conventions (REFERENCE.md 1.4, 1.6):
- total: every parameter of the main model (embedding, untied head, layers, final norm), without
  the MTP modules and without the selection-bias buffers (V3's published totals exclude them);
- activated per token: total minus the routed experts a token does not use, (E - K) * 3 * D * I_e
  per MoE layer, reported both without and with the input embedding (a lookup, not a matmul);
  V3's "37B", V2's "21B" and V2-Lite's "2.4B" match "without", DeepSeekMoE's "2.8B" "with";
- MTP: the unique parameters of the MTP modules (enorm, hnorm, eh_proj, one decoder layer,
  shared_head.norm); embedding and head are shared with the main model.

KV cache per token (REFERENCE.md 2.5): MLA caches the normalised latent and the RoPE key,
L * (C + R) elements; the naive MLA form (and transformers) caches per-head K and V,
L * H * (Dn + R + Dv); MHA/GQA caches L * 2 * Hkv * Dh.

Forward FLOPs per token: 2 per multiply-add of every activated matrix (head included, input
embedding excluded) plus causal attention, 2 * H * (Dqk + Dv) * (S + 1) / 2 per layer at
sequence length S (each query attends to (S + 1) / 2 keys on average).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from minids.config import ModelConfig

__all__ = ["PUBLISHED", "Counts", "Published", "count", "flops_per_token", "kv_cache_elements_per_token"]


@dataclass(frozen=True)
class Published:
    """A reported figure (parameters), its printed precision and source tag (REFERENCE.md 1.3, A1.2)."""

    total: float | None = None
    activated: float | None = None
    activated_includes_embedding: bool = False
    mtp: float | None = None
    source: str = ""


B = 1e9
_V3 = Published(671 * B, 37 * B, False, 11.5 * B, "V3P abstract, 4.2; RW (MTP)")
_V2 = Published(236 * B, 21 * B, False, None, "V2P 3.1.2")
_V2L = Published(15.7 * B, 2.4 * B, False, None, "V2P App. B.1")
PUBLISHED: dict[str, Published] = {
    "deepseek-v3": _V3,
    "deepseek-v3.1": _V3,
    "deepseek-r1": Published(671 * B, 37 * B, False, None, "R1RM"),
    "deepseek-v2": _V2,
    "deepseek-v2.5": _V2,
    "deepseek-v2-chat-0628": _V2,
    "deepseek-coder-v2": Published(236 * B, 21 * B, False, None, "CoderP Table 2"),
    "deepseek-v2-lite": _V2L,
    "deepseek-coder-v2-lite": Published(16 * B, 2.4 * B, False, None, "CoderP Table 2"),
    "deepseek-moe-16b": Published(16.4 * B, 2.8 * B, True, None, "MoEP 5.1.2"),
    "deepseek-llm-7b": Published(7 * B, source="LLM-RM"),
    "deepseek-llm-67b": Published(67 * B, source="LLM-RM"),
    "deepseek-coder-1.3b": Published(1.3 * B, source="CODER-RM (model name)"),
    "deepseek-coder-6.7b": Published(6.7 * B, source="CODER-RM (model name)"),
    "deepseek-coder-33b": Published(33 * B, source="CODER-RM (model name)"),
    "deepseek-math-7b": Published(7 * B, source="MATH-RM"),
    "deepseek-prover-v1.5-7b": Published(7 * B, source="Prover-V1.5 README"),
}


@dataclass(frozen=True)
class Counts:
    total: int  # main model, no MTP, no selection-bias buffers
    embedding: int  # input embedding
    activated: int  # per token, without the input embedding
    activated_with_embedding: int
    mtp: int  # unique MTP parameters
    mtp_activated: int  # per token, the MTP module's own
    selection_bias: int  # e_score_correction_bias elements (fp32 buffers), main model

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inactive_expert_params(cfg: ModelConfig) -> int:
    """Routed-expert parameters one MoE layer holds but a token does not use: (E - K) * 3 * D * I_e."""
    return (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size


def count(cfg: ModelConfig | str) -> Counts:
    """Parameter counts of ``cfg``, from a model built on the meta device."""
    from minids.model import Transformer

    cfg = ModelConfig.load(cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    emb = model.model.embed_tokens.weight.numel()
    main = _numel(model.model) + (0 if cfg.tie_word_embeddings else model.lm_head.weight.numel())
    inactive = _inactive_expert_params(cfg) * cfg.num_moe_layers if cfg.is_moe else 0
    mtp = _numel(model.mtp)
    mtp_inactive = sum(_inactive_expert_params(cfg) for layer in model.mtp if layer.is_moe)
    bias = sum(b.numel() for n, b in model.model.named_buffers() if n.endswith("e_score_correction_bias"))
    return Counts(
        total=main,
        embedding=emb,
        activated=main - inactive - emb,
        activated_with_embedding=main - inactive,
        mtp=mtp,
        mtp_activated=mtp - mtp_inactive,
        selection_bias=bias,
    )


def kv_cache_elements_per_token(cfg: ModelConfig | str, form: str = "auto") -> int:
    """Cached elements per token over all layers (multiply by the element size for bytes).

    form: "auto" (latent for MLA, K/V for MHA), "latent" (MLA only), "naive" (per-head K and V).
    """
    cfg = ModelConfig.load(cfg)
    L = cfg.num_hidden_layers
    if form == "auto":
        form = "latent" if cfg.is_mla else "naive"
    if form == "latent":
        if not cfg.is_mla:
            raise ValueError("the latent cache exists only for MLA models (kv_lora_rank set)")
        return L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    if form != "naive":
        raise ValueError(f"form={form!r}: one of auto, latent, naive")
    if cfg.is_mla:
        return L * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return L * 2 * cfg.num_kv_heads * cfg.mha_head_dim


def flops_per_token(cfg: ModelConfig | str, seq_len: int, counts: Counts | None = None) -> float:
    """Forward FLOPs per token at sequence length ``seq_len`` (see the module docstring)."""
    cfg = ModelConfig.load(cfg)
    counts = counts or count(cfg)
    # matmul parameters: activated minus norms and the router-free parts that are not matmuls
    norms = cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)
    if cfg.is_mla:
        norms += cfg.num_hidden_layers * (cfg.kv_lora_rank + (cfg.q_lora_rank or 0))
    matmul = counts.activated - norms
    attn = cfg.num_hidden_layers * 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.value_head_dim) * (seq_len + 1) / 2
    return 2.0 * matmul + attn
