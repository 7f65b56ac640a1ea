"""ModelConfig: one dataclass for every published DeepSeek language model.

The fields are the Hugging Face ``config.json`` keys of the published checkpoints
(DeepseekV3Config, DeepseekV2Config, the remote ``DeepseekConfig`` of DeepSeekMoE-16B and
``LlamaConfig`` for the dense models), so a published ``config.json`` loads unchanged and is
written back with the same keys. Values are validated at load: a bad value raises
``ConfigError`` naming the field, its value and the rule it breaks.

Which design a config describes follows from its fields alone (never from a size):
- attention: MLA when ``kv_lora_rank`` is set (and ``use_mla`` is not false), else MHA/GQA;
- FFN: DeepSeekMoE in layers ``i >= first_k_dense_replace`` with ``i % moe_layer_freq == 0``
  when ``n_routed_experts`` is set, else dense SwiGLU;
- routing: ``scoring_func`` (softmax | sigmoid) and ``topk_method`` (greedy |
  group_limited_greedy | noaux_tc); ``noaux_tc`` is the V3 router with a selection bias.

Both RoPE spellings are read: ``rope_theta`` + ``rope_scaling`` (the published files) and
``rope_parameters`` (transformers 5.x); the one read is the one written back.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minids.fileio import atomic_write_text

__all__ = ["ConfigError", "ModelConfig", "preset_names", "preset_path"]


class ConfigError(ValueError):
    """A model config that cannot describe a valid model; the message names field, value, rule."""


# Keys that published config.json files carry and that minids keeps (written back) but does not use.
_PASSTHROUGH_KEYS = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "quantization_config",
    "use_cache", "pretraining_tp", "attention_dropout", "ep_size", "_name_or_path", "pad_token_id",
    "mlp_bias", "output_router_logits", "router_aux_loss_coef", "num_experts", "is_decoder",
    "max_window_layers", "sliding_window", "use_sliding_window", "chat_template", "head_dim_override",
    "layer_types", "model_name", "output_attentions", "output_hidden_states", "return_dict",
    "scale_fmt", "_attn_implementation_autoset", "qk_head_dim",
}

_TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
_SCORING_FUNCS = ("softmax", "sigmoid")
_ROPE_TYPES = ("default", "linear", "yarn")
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek", "llama")


def _configs_dir() -> Path:
    """The preset folder: ``minids/configs`` in an installed wheel, ``configs/`` in a checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "configs"
    return installed if installed.is_dir() else here.parent / "configs"


def preset_names() -> list[str]:
    """Names of the bundled configs (``deepseek-v3``, ``tiny-v3``, ...)."""
    return sorted(p.stem for p in _configs_dir().glob("*.json"))


def preset_path(name: str) -> Path:
    """Path of the bundled config ``name``; ConfigError listing the presets if there is none."""
    p = _configs_dir() / f"{name}.json"
    if not p.is_file():
        raise ConfigError(
            f"no preset named {name!r} and no such file or directory; presets: {', '.join(preset_names())}"
        )
    return p


@dataclass
class ModelConfig:
    """A DeepSeek-family model, in Hugging Face ``config.json`` terms (see module docstring).

    Shapes: d = hidden_size, H = num_attention_heads, r_q = q_lora_rank, r_kv = kv_lora_rank,
    d_n / d_r / d_v = qk_nope / qk_rope / v head dims, I = intermediate_size,
    I_e = moe_intermediate_size, N_r / N_s = routed / shared experts, K = num_experts_per_tok.
    """

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    # RoPE
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool | None = None
    # MLA
    use_mla: bool | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # DeepSeekMoE
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str | None = None
    scoring_func: str | None = None
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float | None = None
    seq_aux: bool | None = None
    # Multi-Token Prediction
    num_nextn_predict_layers: int = 0
    # keys kept for write-back only (architectures, torch_dtype, quantization_config, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    # which RoPE spelling the source used: "rope_scaling" or "rope_parameters"
    rope_spelling: str = "rope_scaling"
    # fields the source file did not have, with the value they took: not written back unless changed
    # (None for a config built in code)
    absent_defaults: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._normalise()
        self.validate()

    # ----------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, source: str | Path | dict | ModelConfig) -> ModelConfig:
        """A preset name (``"deepseek-v3"``), a JSON file, a directory with ``config.json``, or a dict."""
        if isinstance(source, ModelConfig):
            return dataclasses.replace(source, extra=dict(source.extra))
        if isinstance(source, dict):
            return cls.from_dict(source)
        if not isinstance(source, (str, Path)):
            raise ConfigError(f"ModelConfig.load takes a preset name, path or dict, got {type(source).__name__}")
        p = Path(source)
        if p.is_dir():
            p = p / "config.json"
            if not p.is_file():
                cks = sorted((Path(source) / "checkpoints").glob("step-*"))
                if cks:
                    raise ConfigError(f"{source}: a training run, not a checkpoint; pass one of its checkpoints, "
                                      f"e.g. {cks[-1]}")
                raise ConfigError(f"{source}: directory has no config.json; pass the file or a preset name")
        elif not p.is_file():
            p = preset_path(str(source))
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: not a JSON config (binary data); pass a checkpoint directory, its config.json or "
                              "a preset name") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config must be a JSON object, found {type(data).__name__}")
        try:
            return cls.from_dict(data, source=str(p))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None

    @classmethod
    def field_names(cls) -> set[str]:
        """The config.json keys minids reads."""
        return {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_spelling", "absent_defaults"}

    @classmethod
    def near_field(cls, key: str) -> str | None:
        """The field a misspelt key most likely meant, if one is close enough."""
        near = difflib.get_close_matches(key, cls.field_names(), n=1, cutoff=0.8)
        return near[0] if near else None

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str | None = None) -> ModelConfig:
        """Build from a Hugging Face style dict; unknown keys are kept in ``extra`` (and warned about, naming
        ``source``, the file they came from, if given)."""
        data = dict(data)
        known = cls.field_names()
        kwargs: dict[str, Any] = {}
        extra = data.pop("extra", None) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"extra={extra!r}: must be an object of pass-through keys")
        extra = dict(extra)
        rope_spelling = "rope_scaling"
        if "rope_parameters" in data:
            rope_spelling = "rope_parameters"
            rp = data.pop("rope_parameters")
            if rp is not None:
                if not isinstance(rp, dict):
                    raise ConfigError(f"rope_parameters={rp!r}: must be an object")
                rp = dict(rp)
                if "rope_theta" in rp:
                    data.setdefault("rope_theta", rp.pop("rope_theta"))
                kind = rp.get("rope_type", rp.get("type", "default"))
                data.setdefault("rope_scaling", None if kind == "default" else rp)
        model_type = data.get("model_type", "deepseek_v3")
        for k, v in data.items():
            if k in known:
                kwargs[k] = v
            else:
                if k not in _PASSTHROUGH_KEYS and not k.startswith("_"):
                    near = cls.near_field(k)
                    if near and near not in data:  # a misspelt field would leave the real one at its default
                        raise ConfigError(f"{k}={v!r}: not a config field; did you mean {near}?")
                extra[k] = v
                if k not in _PASSTHROUGH_KEYS and not k.startswith("_"):
                    where = f"{source}: " if source else ""
                    warnings.warn(f"{where}config key {k!r} is not used by minids (kept and written back as is)",
                                  stacklevel=3)
        kwargs.setdefault("model_type", model_type)
        cfg = cls(**kwargs, extra=extra, rope_spelling=rope_spelling)
        cfg.absent_defaults = {k: copy.deepcopy(getattr(cfg, k)) for k in known - set(data)}
        return cfg

    # ----------------------------------------------------------------------------- saving
    def to_dict(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict (same keys and RoPE spelling as the source)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "rope_spelling", "absent_defaults", "rope_interleave", "use_mla"):
                continue
            v = copy.deepcopy(getattr(self, f.name))
            if self.absent_defaults is not None:  # loaded: the source's keys, plus what changed since
                if f.name not in self.absent_defaults or v != self.absent_defaults[f.name]:
                    out[f.name] = v
                continue
            if v is None and f.name in ("head_dim", "aux_loss_alpha", "seq_aux"):
                continue
            if not self.is_moe and f.name in _MOE_FIELDS:
                continue
            if not self.is_mla and f.name in _MLA_FIELDS:
                continue
            out[f.name] = v
        for name, default in (("use_mla", None), ("rope_interleave", self._mla_pairs())):
            v = getattr(self, name)
            if self.absent_defaults is not None:
                if name not in self.absent_defaults or v != self.absent_defaults[name]:
                    out[name] = v
            elif v != default or (name == "rope_interleave" and self.model_type == "deepseek_v3"):
                out[name] = v
        if self.absent_defaults is None and self.model_type != "deepseek_v3" and not self.num_nextn_predict_layers:
            out.pop("num_nextn_predict_layers")
        if self.rope_spelling == "rope_parameters":
            rp = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling:
                rp = {**self.rope_scaling, "rope_theta": self.rope_theta}
            out.pop("rope_theta", None)
            out.pop("rope_scaling", None)
            out["rope_parameters"] = rp
        for k, v in self.extra.items():
            out.setdefault(k, v)
        return out

    def save(self, path: str | Path) -> None:
        """Write ``config.json`` (a directory) or the given file, atomically."""
        p = Path(path)
        if p.suffix != ".json":
            p.mkdir(parents=True, exist_ok=True)
            p = p / "config.json"
        atomic_write_text(json.dumps(self.to_dict(), indent=2) + "\n", p)

    # ----------------------------------------------------------------------------- derived
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None and self.use_mla is not False

    def _mla_pairs(self) -> bool:
        """The default ``rope_interleave``: the published MLA checkpoints store RoPE channels as interleaved pairs
        (docs/REFERENCE.md 2.4); Llama-style dense models, DeepSeekMoE-16B and the V2 family's ``use_mla: false``
        models (VL2-Tiny: an "mha_*" attention class, Llama's, REFERENCE-2.md A2.3) rotate halves."""
        return self.model_type in ("deepseek_v3", "deepseek_v2") and self.is_mla

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def mha_head_dim(self) -> int:
        """Head width of the MHA/GQA attention (``head_dim`` or hidden_size / heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Width of one query/key head: d_n + d_r for MLA (192 in V2/V3), the head dim for MHA."""
        if self.is_mla:
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.mha_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.is_mla else self.mha_head_dim

    @property
    def rope_dim(self) -> int:
        """How many channels of each query/key head are rotated."""
        return self.qk_rope_head_dim if self.is_mla else self.mha_head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def uses_selection_bias(self) -> bool:
        """The V3 router (``noaux_tc``): a per-expert bias that only changes which experts are chosen."""
        return self.is_moe and self.topk_method == "noaux_tc"

    @property
    def shared_intermediate_size(self) -> int:
        """The shared experts are one SwiGLU MLP of width N_s * I_e."""
        return (self.n_shared_experts or 0) * (self.moe_intermediate_size or 0)

    def is_moe_layer(self, i: int) -> bool:
        return self.is_moe and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_qk), times mscale(s, mscale_all_dim)^2 under YaRN (REFERENCE.md 2.3)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_type == "yarn":
            m_all = self.rope_scaling.get("mscale_all_dim", 0) or 0
            if m_all:
                m = yarn_mscale(self.rope_scaling["factor"], m_all)
                scale *= m * m
        return scale

    # ----------------------------------------------------------------------------- checks
    def _normalise(self) -> None:
        mt = self.model_type
        if self.q_lora_rank == 0:  # the official inference configs write 0 for "no query compression"
            self.q_lora_rank = None
        if self.is_moe:
            if self.scoring_func is None:  # transformers' DeepseekV3Config has no key: always sigmoid
                self.scoring_func = "sigmoid" if mt == "deepseek_v3" else "softmax"
            if self.topk_method is None:
                self.topk_method = "noaux_tc" if mt == "deepseek_v3" else "greedy"
            if self.n_group is None:
                self.n_group = 1
            if self.topk_group is None:
                self.topk_group = 1 if self.n_group == 1 else self.n_group
            if self.n_shared_experts is None:
                self.n_shared_experts = 0
        if self.rope_interleave is None:
            self.rope_interleave = self._mla_pairs()
        if isinstance(self.rope_scaling, dict):  # anything else is rejected by _validate_rope
            self.rope_scaling = dict(self.rope_scaling)

    def validate(self) -> None:
        """Raise ConfigError on the first violated rule."""

        def bad(name: str, rule: str) -> None:
            raise ConfigError(f"{name}={getattr(self, name)!r}: {rule}")

        def need_int(name: str, lo: int = 1, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
            if v < lo:
                bad(name, f"must be >= {lo}")

        for f in dataclasses.fields(self):  # the types the annotations promise, for what JSON may hold instead
            v, typ = getattr(self, f.name), str(f.type)
            if v is None and typ.endswith("| None"):
                continue
            if typ.startswith("bool") and not isinstance(v, bool):
                bad(f.name, "must be true or false" + (" (or null)" if typ.endswith("| None") else ""))
            if typ.startswith("float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                bad(f.name, "must be a number" + (" (or null)" if typ.endswith("| None") else ""))
            if typ.startswith("str") and not isinstance(v, str):
                bad(f.name, "must be a string" + (" (or null)" if typ.endswith("| None") else ""))
        for n in ("bos_token_id", "eos_token_id"):
            v = getattr(self, n)
            ids = v if isinstance(v, list) else [v]
            if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                bad(n, "must be a token id (a non-negative integer)" + (", or a list of them" if n[0] == "e" else ""))
        if self.model_type not in _MODEL_TYPES:
            bad("model_type", f"unknown model type; minids reads {', '.join(_MODEL_TYPES)}")
        for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            need_int(n)
        need_int("num_key_value_heads", allow_none=True)
        need_int("head_dim", allow_none=True)
        if self.hidden_act != "silu":
            bad("hidden_act", "minids implements the SwiGLU FFN of every DeepSeek model: only 'silu'")
        if self.attention_bias:
            bad("attention_bias", "no published DeepSeek model has projection biases; minids supports only false")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            bad("rms_norm_eps", "must be a positive number")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0):
            bad("rope_theta", "must be a positive number")
        need_int("num_nextn_predict_layers", lo=0)
        self._validate_attention(bad, need_int)
        self._validate_ffn(bad, need_int)
        self._validate_rope(bad)

    def _validate_attention(self, bad, need_int) -> None:
        if self.is_mla:
            need_int("kv_lora_rank")
            need_int("q_lora_rank", allow_none=True)
            need_int("qk_nope_head_dim", lo=0)
            need_int("qk_rope_head_dim")
            need_int("v_head_dim")
            if self.qk_rope_head_dim % 2:
                bad("qk_rope_head_dim", "RoPE rotates pairs of channels: must be even")
        else:
            if self.head_dim is None and self.hidden_size % self.num_attention_heads:
                bad(
                    "num_attention_heads",
                    f"hidden_size={self.hidden_size} must be divisible by num_attention_heads (or set head_dim)",
                )
            if self.mha_head_dim % 2:
                bad("head_dim", f"RoPE rotates pairs of channels: head dim {self.mha_head_dim} must be even "
                                f"(unset head_dim means hidden_size / num_attention_heads)")
            if self.num_attention_heads % self.num_kv_heads:
                bad(
                    "num_key_value_heads",
                    f"must divide num_attention_heads={self.num_attention_heads} (GQA groups of equal size)",
                )

    def _validate_ffn(self, bad, need_int) -> None:
        need_int("first_k_dense_replace", lo=0)
        need_int("moe_layer_freq")
        has_dense = not self.is_moe or any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers))
        if has_dense:
            need_int("intermediate_size")
        if self.n_routed_experts is None:
            return
        need_int("n_routed_experts")
        need_int("num_experts_per_tok")
        need_int("moe_intermediate_size")
        need_int("n_shared_experts", lo=0)
        need_int("n_group")
        need_int("topk_group")
        E, K, G = self.n_routed_experts, self.num_experts_per_tok, self.n_group
        if K > E:
            bad("num_experts_per_tok", f"cannot pick more experts per token than n_routed_experts={E}")
        if self.scoring_func not in _SCORING_FUNCS:
            bad("scoring_func", f"unknown scoring function; one of {', '.join(_SCORING_FUNCS)}")
        if self.topk_method not in _TOPK_METHODS:
            bad("topk_method", f"unknown routing method; one of {', '.join(_TOPK_METHODS)}")
        if E % G:
            bad("n_group", f"n_routed_experts={E} must split into n_group equal groups (n_routed_experts % n_group == 0)")
        if self.topk_group > G:
            bad("topk_group", f"cannot keep more groups than n_group={G} (topk_group <= n_group)")
        if self.topk_method != "greedy" and K > self.topk_group * (E // G):
            bad(
                "num_experts_per_tok",
                f"the {self.topk_group} kept groups hold only {self.topk_group * (E // G)} experts "
                "(num_experts_per_tok <= topk_group * n_routed_experts / n_group)",
            )
        if self.topk_method == "noaux_tc" and G > 1 and E // G < 2:
            bad("n_group", f"noaux_tc scores a group by its top-2 experts: needs >= 2 experts per group, has {E // G}")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            bad("routed_scaling_factor", "must be a positive number")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"more dense layers than num_hidden_layers={self.num_hidden_layers}")

    def _validate_rope(self, bad) -> None:
        rs = self.rope_scaling
        if rs is None:
            return
        if not isinstance(rs, dict):
            bad("rope_scaling", "must be an object or null")
        kind = self.rope_type
        if kind not in _ROPE_TYPES:
            bad("rope_scaling", f"unknown RoPE scaling type {kind!r}; one of {', '.join(_ROPE_TYPES)}")
        if kind == "default":
            return
        f = rs.get("factor")
        if not (isinstance(f, (int, float)) and f >= 1):
            bad("rope_scaling", "'factor' must be a number >= 1")
        if kind == "yarn":
            orig = rs.get("original_max_position_embeddings")
            if not (isinstance(orig, int) and orig > 0):
                bad("rope_scaling", "yarn needs a positive integer 'original_max_position_embeddings'")
            for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
                v = rs.get(key, 0)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    bad("rope_scaling", f"yarn's {key!r} must be a number, got {v!r}")
            if rs.get("beta_fast", 32) <= rs.get("beta_slow", 1):
                bad("rope_scaling", "yarn needs beta_fast > beta_slow")


_MOE_FIELDS = {
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
    "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group", "topk_method", "scoring_func",
    "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha", "seq_aux",
}
_MLA_FIELDS = {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (V3P 4.3; V2P 3.1.4), 1 for s <= 1."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0
