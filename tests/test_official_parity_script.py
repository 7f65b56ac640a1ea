"""scripts/official_parity.py without the official code: its configurations, what it refuses, and its name map.

The comparison itself needs a checkout of the official DeepSeek-V3 inference code (docs/official_parity.md has its
result); these checks keep the script's minids side working: every configuration is a valid minids config that the
official ``ModelArgs`` can express, and the name map sends a random minids model's tensors onto exactly the
official ``Transformer``'s parameter names, written out here from the official ``inference/model.py`` at 9b4e978
(docs/REFERENCE.md, source INF): ``embed``, ``norm``, ``head``; per layer ``attn_norm``, ``ffn_norm``, ``attn.wq`` or
``attn.wq_a`` / ``q_norm`` / ``wq_b``, ``attn.wkv_a`` / ``kv_norm`` / ``wkv_b`` / ``wo``; a dense ``ffn.w1..w3``, or
``ffn.gate.weight`` (+ ``ffn.gate.bias`` at dim 7168 only), ``ffn.experts.E.w1..w3`` and ``ffn.shared_experts.w1..w3``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from minids.config import ModelConfig

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "official_parity.py"


@pytest.fixture(scope="module")
def op():
    """The script as a module. It puts the checkout's root first on sys.path (to run from a checkout); that is undone
    at once, or transformers, imported by later tests, would find kernels/ there for Hugging Face's package of that
    name (tests/conftest.py)."""
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("official_parity", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["official_parity"] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path[:] = path
    yield mod
    sys.modules.pop("official_parity", None)


def official_parameter_names(cfg: ModelConfig) -> set[str]:
    """The official Transformer's parameter names for a config (its module tree, written out by hand)."""
    names = {"embed.weight", "norm.weight", "head.weight"}
    attn = ["wq_a", "q_norm", "wq_b"] if cfg.q_lora_rank else ["wq"]
    attn += ["wkv_a", "kv_norm", "wkv_b", "wo"]
    for i in range(cfg.num_hidden_layers):
        pre = f"layers.{i}"
        names |= {f"{pre}.attn_norm.weight", f"{pre}.ffn_norm.weight"}
        names |= {f"{pre}.attn.{a}.weight" for a in attn}
        if i < cfg.first_k_dense_replace:
            names |= {f"{pre}.ffn.{w}.weight" for w in ("w1", "w2", "w3")}
            continue
        names.add(f"{pre}.ffn.gate.weight")
        if cfg.hidden_size == 7168:
            names.add(f"{pre}.ffn.gate.bias")
        names |= {f"{pre}.ffn.experts.{e}.{w}.weight" for e in range(cfg.n_routed_experts) for w in ("w1", "w2", "w3")}
        names |= {f"{pre}.ffn.shared_experts.{w}.weight" for w in ("w1", "w2", "w3")}
    return names


@pytest.mark.parametrize("name,count", [("v3", 139), ("v2-lite", 131), ("v2", 137), ("v3-small", 137)])
def test_configs_map_onto_every_official_parameter_once(op, name, count):
    """Each configuration is expressible (``official_args``) and its minids tensors land on the official names, each
    once, with the shapes the official modules give them (routed experts split one tensor per expert)."""
    cfg = ModelConfig.from_dict(op.CONFIGS[name])
    args = op.official_args(cfg, 2)
    assert args["dim"] == cfg.hidden_size and args["q_lora_rank"] == (cfg.q_lora_rank or 0)
    model = op.build_minids(cfg, 0)
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.state_dict().items() if n not in tensors)
    mapped = [pair for n, t in tensors.items() for pair in op.official_names(n, t)]
    names = [n for n, _ in mapped]
    assert len(names) == len(set(names)) == count
    assert set(names) == official_parameter_names(cfg)
    shapes = {n: tuple(t.shape) for n, t in mapped}
    C, H = cfg.hidden_size, cfg.num_attention_heads
    assert shapes["layers.1.ffn.experts.0.w1.weight"] == (cfg.moe_intermediate_size, C)
    assert shapes["layers.0.attn.wkv_a.weight"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim, C)
    assert shapes["layers.0.attn.wo.weight"] == (C, H * cfg.v_head_dim)


def test_what_the_official_code_cannot_express_is_refused(op):
    """MTP, and noaux_tc below dim 7168 (the official gate has no selection bias there), each get one line."""
    with pytest.raises(op.ParityError, match="MTP does not exist in the official code"):
        op.official_args(ModelConfig.from_dict({**op.CONFIGS["v3-small"], "num_nextn_predict_layers": 1}), 2)
    with pytest.raises(op.ParityError, match="noaux_tc at hidden_size 256"):
        op.official_args(ModelConfig.from_dict({**op.CONFIGS["v3-small"], "topk_method": "noaux_tc"}), 2)
    with pytest.raises(op.ParityError, match="no model.py there"):
        op.import_official(SCRIPT.parent)
