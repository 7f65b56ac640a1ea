"""minids: a small, exact and fast PyTorch re-implementation of the DeepSeek model family."""

from minids.accounting import count, flops_per_token, kv_cache_elements_per_token
from minids.attention import (
    MHA, MLA, attention, attention_ref, mla_attention_absorbed, mla_attention_naive, mla_decode_ref,
)
from minids.config import ConfigError, ModelConfig, preset_names
from minids.model import ModelOutput, Transformer, lm_loss
from minids.moe import DeepSeekMoE, MoEAlignment, grouped_mm_available, moe_align, moe_experts, route
from minids.norm import RMSNorm, add_rms_norm, rms_norm
from minids.rope import RotaryEmbedding, apply_rope, rope_inv_freq, yarn_correction_range

__all__ = [
    "MHA", "MLA", "ConfigError", "DeepSeekMoE", "ModelConfig", "ModelOutput", "RMSNorm", "RotaryEmbedding",
    "Transformer", "apply_rope", "attention", "attention_ref", "count", "flops_per_token", "grouped_mm_available",
    "kv_cache_elements_per_token", "lm_loss", "moe_experts", "preset_names", "rms_norm", "rope_inv_freq", "route",
    "yarn_correction_range", "mla_attention_absorbed", "mla_attention_naive", "mla_decode_ref", "MoEAlignment",
    "moe_align", "add_rms_norm",
]
__version__ = "0.1.0"

from minids.checkpoint import CheckpointError, from_pretrained, save_pretrained  # noqa: E402

__all__ += ["CheckpointError", "from_pretrained", "save_pretrained"]
