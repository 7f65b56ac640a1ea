"""ModelConfig: validation messages, loading, round trips and derived values (REFERENCE.md 1.1, 2.3).

Configs are built here as dicts (never read from configs/); expected numbers are the published ones.
"""

import copy
import json
import math
import re
import warnings

import pytest

import minids.config as config_module
from minids.config import ConfigError, ModelConfig


def tiny(**over):
    """A small V3-style config: MLA + DeepSeekMoE (sigmoid, noaux_tc, groups) + YaRN."""
    d = {
        "model_type": "deepseek_v3", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": 256, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }
    return {**d, **over}


def llama(**over):
    """A small Llama-style dense config (MHA/GQA + SwiGLU), as LlamaConfig writes it."""
    d = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
        "rope_theta": 10000.0, "rope_scaling": None, "torch_dtype": "bfloat16",
    }
    return {**d, **over}


# DeepSeek-V3 config.json values (REFERENCE.md 1.1, CFG-V3).
V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": V3_YARN, "rope_theta": 10000, "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid", "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 129280,
}


def raises(d, field, value, rule):
    """Building from ``d`` fails with a message naming ``field``, its ``value`` and the ``rule``."""
    with pytest.raises(ConfigError, match=re.escape(f"{field}={value!r}") + ".*" + re.escape(rule)):
        ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------- validation
BAD = [
    # (config, field, value, fragment of the rule)
    (tiny(num_experts_per_tok=9), "num_experts_per_tok", 9, "more experts per token than n_routed_experts=8"),
    (tiny(topk_group=5), "topk_group", 5, "more groups than n_group=4"),
    (tiny(n_group=3), "n_group", 3, "n_routed_experts % n_group == 0"),
    (tiny(topk_group=1, num_experts_per_tok=3), "num_experts_per_tok", 3, "kept groups hold only 2 experts"),
    (tiny(n_group=8, topk_group=8), "n_group", 8, "needs >= 2 experts per group, has 1"),
    (tiny(scoring_func="relu"), "scoring_func", "relu", "one of softmax, sigmoid"),
    (tiny(topk_method="top1"), "topk_method", "top1", "one of greedy, group_limited_greedy, noaux_tc"),
    (tiny(model_type="gpt2"), "model_type", "gpt2", "unknown model type"),
    (tiny(qk_rope_head_dim=7), "qk_rope_head_dim", 7, "must be even"),
    (tiny(attention_bias=True), "attention_bias", True, "supports only false"),
    (tiny(hidden_act="gelu"), "hidden_act", "gelu", "only 'silu'"),
    (tiny(hidden_size="7168"), "hidden_size", "7168", "must be an integer"),
    (tiny(moe_intermediate_size=1.5), "moe_intermediate_size", 1.5, "must be an integer"),
    (tiny(num_hidden_layers=True), "num_hidden_layers", True, "must be an integer"),
    (tiny(vocab_size=0), "vocab_size", 0, "must be >= 1"),
    (tiny(kv_lora_rank=0), "kv_lora_rank", 0, "must be >= 1"),
    (tiny(num_nextn_predict_layers=-1), "num_nextn_predict_layers", -1, "must be >= 0"),
    (tiny(first_k_dense_replace=4), "first_k_dense_replace", 4, "more dense layers than num_hidden_layers=3"),
    (tiny(moe_layer_freq=0), "moe_layer_freq", 0, "must be >= 1"),
    (tiny(intermediate_size=None), "intermediate_size", None, "must be an integer"),
    (tiny(routed_scaling_factor=0), "routed_scaling_factor", 0, "must be a positive number"),
    (tiny(rms_norm_eps=0), "rms_norm_eps", 0, "must be a positive number"),
    (tiny(rope_theta=-1.0), "rope_theta", -1.0, "must be a positive number"),
    (llama(hidden_size=66), "num_attention_heads", 4, "hidden_size=66 must be divisible by num_attention_heads"),
    (llama(hidden_size=60), "head_dim", None, "head dim 15 must be even"),
    (llama(num_key_value_heads=3), "num_key_value_heads", 3, "must divide num_attention_heads=4"),
    (llama(num_key_value_heads=0), "num_key_value_heads", 0, "must be >= 1"),
]
ROPE_BAD = [
    ({"type": "ntk", "factor": 2.0}, "unknown RoPE scaling type 'ntk'; one of default, linear, yarn"),
    ({"type": "linear", "factor": 0.5}, "'factor' must be a number >= 1"),
    ({"rope_type": "yarn", "factor": 4}, "yarn needs a positive integer 'original_max_position_embeddings'"),
    ({**tiny()["rope_scaling"], "beta_fast": 1}, "yarn needs beta_fast > beta_slow"),
    ("yarn", "must be an object or null"),
]


@pytest.mark.parametrize("d, field, value, rule", BAD, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_value_names_field_value_and_rule(d, field, value, rule):
    raises(d, field, value, rule)


@pytest.mark.parametrize("rs, rule", ROPE_BAD)
def test_bad_rope_scaling_names_value_and_rule(rs, rule):
    raises(tiny(rope_scaling=rs), "rope_scaling", rs, rule)


def test_rules_are_specific():
    """Each rule rejects only what it names: the same shapes pass where the rule does not apply."""
    ModelConfig.from_dict(tiny(n_group=8, topk_group=8, topk_method="group_limited_greedy"))  # 1 per group ok
    ModelConfig.from_dict(tiny(topk_group=1, num_experts_per_tok=3, topk_method="greedy"))  # greedy ignores groups
    ModelConfig.from_dict(tiny(first_k_dense_replace=0, intermediate_size=None))  # no dense layer: I unused
    ModelConfig.from_dict(llama(hidden_size=66, head_dim=16))  # head_dim given: no divisibility needed


# ----------------------------------------------------------------------------- loading
def test_load_from_dict_file_and_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny()))
    from_dict = ModelConfig.load(tiny())
    assert from_dict.n_routed_experts == 8 and from_dict.is_mla and from_dict.is_moe
    assert ModelConfig.load(tmp_path / "config.json") == from_dict
    assert ModelConfig.load(str(tmp_path)) == from_dict


def test_load_file_error_names_the_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(tiny(num_experts_per_tok=9)))
    with pytest.raises(ConfigError, match=re.escape(f"{p}: num_experts_per_tok=9")):
        ModelConfig.load(p)


def test_missing_preset_lists_presets(tmp_path, monkeypatch):
    for name in ("alpha", "beta"):
        (tmp_path / f"{name}.json").write_text("{}")
    monkeypatch.setattr(config_module, "_configs_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match=re.escape("no preset named 'gamma'") + ".*" + re.escape("alpha, beta")):
        ModelConfig.load("gamma")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: directory has no config.json")):
        ModelConfig.load(tmp_path)


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "hidden_size": 64,\n  "vocab_size": ,\n}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{p}: not valid JSON") + ".*" + re.escape("line 3")):
        ModelConfig.load(p)


def test_json_array_is_not_a_config(tmp_path):
    p = tmp_path / "list.json"
    p.write_text(json.dumps([tiny()]))
    with pytest.raises(ConfigError, match=re.escape(f"{p}: a config must be a JSON object, found list")):
        ModelConfig.load(p)


# ----------------------------------------------------------------------------- round trips
def test_v3_round_trip_keeps_keys_and_values():
    d = copy.deepcopy(V3)
    out = ModelConfig.from_dict(d).to_dict()
    assert d == V3  # the input is not modified
    assert out == V3  # a published file comes back exactly: no added or dropped keys


def test_llama_round_trip_adds_nothing():
    assert ModelConfig.from_dict(llama()).to_dict() == llama()


def test_both_rope_spellings_load_alike_and_write_back_their_own():
    rp = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40, "original_max_position_embeddings": 4096,
          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    v5 = {k: v for k, v in V3.items() if k not in ("rope_theta", "rope_scaling")} | {"rope_parameters": rp}
    old, new = ModelConfig.from_dict(V3), ModelConfig.from_dict(v5)
    for c in (old, new):
        assert (c.rope_type, c.rope_theta, c.rope_scaling["factor"]) == ("yarn", 10000, 40)
        assert c.rope_scaling["original_max_position_embeddings"] == 4096
        assert c.rope_scaling["mscale_all_dim"] == 1.0
    assert new.softmax_scale == old.softmax_scale
    out_old, out_new = old.to_dict(), new.to_dict()
    assert out_old["rope_scaling"] == V3_YARN and out_old["rope_theta"] == 10000
    assert "rope_parameters" not in out_old
    assert out_new["rope_parameters"] == rp
    assert "rope_scaling" not in out_new and "rope_theta" not in out_new


def test_rope_parameters_default_means_no_scaling():
    d = {k: v for k, v in llama().items() if k not in ("rope_theta", "rope_scaling")}
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    c = ModelConfig.from_dict(d)
    assert c.rope_scaling is None and c.rope_type == "default" and c.rope_theta == 500000.0
    assert c.to_dict() == d


def test_save_writes_valid_json_atomically(tmp_path):
    c = ModelConfig.from_dict(V3)
    c.save(tmp_path / "ckpt")
    c.save(tmp_path / "other.json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ckpt", "config.json", "other.json"]
    for p in (tmp_path / "ckpt" / "config.json", tmp_path / "other.json"):
        assert json.loads(p.read_text()) == c.to_dict()
        assert ModelConfig.load(p) == c


# ----------------------------------------------------------------------------- derived values
def test_softmax_scale_matches_reference():
    """REFERENCE.md 2.3: 1/sqrt(192) times mscale(40, m)^2 under YaRN."""
    assert ModelConfig.from_dict(V3).softmax_scale == pytest.approx(0.1352338, rel=1e-6)
    v2_yarn = {**V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}
    assert ModelConfig.from_dict({**V3, "rope_scaling": v2_yarn}).softmax_scale == pytest.approx(0.1147214, rel=1e-6)
    no_yarn = ModelConfig.from_dict({**V3, "rope_scaling": None})
    assert no_yarn.softmax_scale == pytest.approx(0.0721688, rel=1e-6)
    assert no_yarn.softmax_scale == pytest.approx(1 / math.sqrt(192), rel=1e-12)


def test_q_lora_rank_zero_means_no_query_compression():
    """The official inference config of V2-Lite writes q_lora_rank 0 (REFERENCE.md 1.1)."""
    c = ModelConfig.from_dict(tiny(q_lora_rank=0))
    assert c.q_lora_rank is None and c.is_mla


@pytest.mark.parametrize("model_type, scoring, method", [("deepseek_v3", "sigmoid", "noaux_tc"),
                                                         ("deepseek_v2", "softmax", "greedy")])
def test_router_defaults_follow_model_type(model_type, scoring, method):
    d = tiny(model_type=model_type)
    del d["scoring_func"], d["topk_method"]
    c = ModelConfig.from_dict(d)
    assert (c.scoring_func, c.topk_method) == (scoring, method)


def test_unknown_keys_kept_and_only_unrecognised_ones_warned():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pass-through keys of published files: no warning
        c = ModelConfig.from_dict(tiny(architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16"))
    assert c.extra == {"architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "bfloat16"}
    with pytest.warns(UserWarning, match=re.escape("'n_routed_expert'")):
        c = ModelConfig.from_dict(tiny(n_routed_expert=16))
    assert c.extra == {"n_routed_expert": 16} and c.n_routed_experts == 8
    assert c.to_dict()["n_routed_expert"] == 16


def test_yarn_parameters_must_be_numbers():
    d = {**ModelConfig.load("tiny-v2").to_dict()}
    d["rope_scaling"] = {**d["rope_scaling"], "beta_fast": None}
    with pytest.raises(ConfigError, match=r"rope_scaling=.*yarn's 'beta_fast' must be a number, got None"):
        ModelConfig.from_dict(d)


# The published router, RoPE, context and token fields of each preset, typed from docs/REFERENCE.md 1.1 (V3, V2,
# V2-Lite, DeepSeekMoE-16B), REFERENCE-2.md A1.1 (dense), A2.1 (VL2) and A3.1 (V2-derived releases). Parameter
# counts cannot see any of these; a wrong scaling factor, top-k method or YaRN mscale changes every output.
def _yarn(mscale: float) -> dict:
    return {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": mscale, "mscale_all_dim": mscale}


_V3 = dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
           routed_scaling_factor=2.5, rope_theta=10000, rope_scaling=_yarn(1.0), max_position_embeddings=163840,
           num_nextn_predict_layers=1, tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
_V2 = dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=8, topk_group=3, norm_topk_prob=False,
           routed_scaling_factor=16.0, rope_theta=10000, rope_scaling=_yarn(0.707), max_position_embeddings=163840,
           tie_word_embeddings=False, rms_norm_eps=1e-6, bos_token_id=100000, eos_token_id=100001,
           aux_loss_alpha=0.001, seq_aux=True)
_V2_LITE = dict(_V2, topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)
_LIN4 = {"type": "linear", "factor": 4.0}
PUBLISHED_FIELDS = {
    "deepseek-v3": _V3, "deepseek-r1": _V3, "deepseek-v3.1": _V3,
    "deepseek-v2": _V2, "deepseek-v2.5": _V2, "deepseek-v2-chat-0628": _V2, "deepseek-coder-v2": _V2,
    "deepseek-v2-lite": _V2_LITE, "deepseek-coder-v2-lite": _V2_LITE,
    "deepseek-moe-16b": dict(scoring_func="softmax", norm_topk_prob=False, rope_theta=10000, rope_scaling=None,
                             max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=100000,
                             eos_token_id=100001, aux_loss_alpha=0.001),
    "deepseek-vl2": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=1, topk_group=1, norm_topk_prob=True,
                         routed_scaling_factor=2.0, rope_theta=10000, rope_scaling=None, max_position_embeddings=4096,
                         bos_token_id=0, eos_token_id=1, is_mla=True, rope_interleave=True),
    "deepseek-vl2-small": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                               norm_topk_prob=False, routed_scaling_factor=1.0, rope_scaling=None,
                               max_position_embeddings=4096, is_mla=True, rope_interleave=True),
    "deepseek-vl2-tiny": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                              norm_topk_prob=False, routed_scaling_factor=1.0, rope_scaling=None,
                              max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, is_mla=False,
                              rope_interleave=False),
    "deepseek-llm-7b": dict(rope_theta=10000, rope_scaling=None, max_position_embeddings=4096),
    "deepseek-llm-67b": dict(rope_theta=10000, rope_scaling=None, max_position_embeddings=4096),
    "deepseek-coder-1.3b": dict(rope_theta=100000, rope_scaling=_LIN4, max_position_embeddings=16384,
                                bos_token_id=32013),
    "deepseek-coder-6.7b": dict(rope_theta=100000, rope_scaling=_LIN4, max_position_embeddings=16384,
                                bos_token_id=32013),
    "deepseek-coder-33b": dict(rope_theta=100000, rope_scaling=_LIN4, max_position_embeddings=16384,
                               bos_token_id=32013),
    "deepseek-math-7b": dict(rope_theta=10000, rope_scaling=None, max_position_embeddings=4096,
                             bos_token_id=100000, eos_token_id=100001),
    "deepseek-prover-v1.5-7b": dict(rope_theta=10000, rope_scaling=None, max_position_embeddings=4096,
                                    bos_token_id=100000, eos_token_id=100001),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_FIELDS))
def test_published_router_rope_and_token_fields(name):
    cfg = ModelConfig.load(name)
    got = {k: getattr(cfg, k) for k in PUBLISHED_FIELDS[name]}
    assert got == PUBLISHED_FIELDS[name]
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "yarn":  # REFERENCE.md 2.3: the CALC scales
        want = {1.0: 0.1352338, 0.707: 0.1147214}[cfg.rope_scaling["mscale"]]
        assert cfg.softmax_scale == pytest.approx(want, abs=1e-7)


def test_every_published_preset_has_its_fields_pinned():
    tiny = {"tiny-dense", "tiny-moe", "tiny-v2", "tiny-v3", "small-v3"}  # minids' own, not published
    assert set(config_module.preset_names()) - tiny == set(PUBLISHED_FIELDS)
