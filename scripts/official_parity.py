"""minids against the official DeepSeek-V3 inference code (its ``inference/model.py``): logits and greedy tokens, CPU.

    python scripts/official_parity.py --official /path/to/DeepSeek-V3/inference
    python scripts/official_parity.py --official /path/to/DeepSeek-V3/inference --configs v3,v2-lite --out parity.md

``--official`` is the ``inference`` folder of a checkout of github.com/deepseek-ai/DeepSeek-V3 (its ``model.py``
and ``kernel.py``; importing ``kernel.py`` needs ``triton`` installed, no GPU). Nothing of it is copied here: it is
imported at run time. Its ``Transformer`` is built with world_size 1 (no torch.distributed), in bf16 (its ``Linear``
is bf16 and, as its generate.py does, torch's default dtype is set to bf16 while it is built and run, then restored).

For each configuration below, a minids model is initialised at random (seeded), its weights are copied by name into
the official model (every official parameter must be filled exactly once; the RoPE table ``freqs_cis`` and the
caches stay as the official code computes them), and a batch of random prompts is run through both:

- the official model, ``attn_impl`` "absorb" (its default) and "naive" (a module global, read when the model is built
  and when it runs): a prefill that returns the last position's logits, then decode steps of one token at
  ``start_pos`` (as its generate.py does). The official "absorb" model decodes greedily; its tokens are the stream
  that every other path is fed (teacher forcing), so all logits are compared on the same inputs;
- minids in bf16: the training forward without a cache (one forward over prompt + stream), and the decoding
  cache (``minids.cache.KVCache``: prefill, then one token a step) with ``mla_impl`` "absorbed" and "naive";
  ``minids.generate.generate`` decoding on its own (greedy), whose tokens should equal the official stream;
- minids in float32 (cache, absorbed), against the bf16 official model: how far the released code is from the
  unrounded model;
- then all of it again in float32: the official model cast to float32 after it is built (``.float()``, then loaded
  with the float32 weights) and run with float32 as the default dtype, against minids in float32. This is the
  official arithmetic without any bf16 rounding: it tells a difference of formula from one of rounding.

Per comparison: max |diff| / max |ref| of the prefill logits and of all decode steps' logits (ref: the official
"absorb" model; also against its "naive" twin), how many greedy choices (argmax per sequence and step) agree, and how
many (token, MoE layer) expert sets the two routers chose differently. Expected: about 1e-6 in float32 (the formulas
agree; only the order of float32 operations differs) and about 1e-2 in bf16 (both codes round activations to bf16,
in different places), except where a bf16 router decision flips (below).

Configurations (minids ``config.json`` fields; the official ``ModelArgs`` are derived field by field in
``official_args``, which refuses what the official code cannot express):

- ``v3``: V3-style at hidden_size 7168 (the official Gate creates its selection bias only when dim == 7168,
  REFERENCE.md 7 "hazards"; the other sizes are tiny): sigmoid scores, noaux_tc (bias, groups scored by their
  top-2 biased scores, n_group 4 / topk_group 2), routed_scaling_factor 2.5, normalised weights, 1 shared expert,
  1 dense layer, q_lora_rank > 0, YaRN with V3's values (factor 40, original length 4096, beta 32/1, mscale 1).
- ``v2-lite``: V2-Lite-style (config_16B): softmax scores, greedy top-k, no groups, unnormalised weights,
  q_lora_rank 0 (no query compression), 2 shared experts, YaRN with mscale 0.707.
- ``v2``: V2-style (config_236B): softmax, group-limited greedy (groups scored by their max), route scale 16,
  q_lora_rank > 0, YaRN off (the official code turns YaRN on only when max_seq_len > original_seq_len).
- ``v3-small``: V3-style at hidden_size 256: sigmoid, groups, scale 2.5, normalised weights, YaRN with a short
  original length. minids' ``topk_method`` is ``group_limited_greedy`` here, not ``noaux_tc``: at dim != 7168 the
  official Gate has no bias and then scores a group by its max expert, not by its top-2 sum, which is minids'
  group_limited_greedy with sigmoid scores (noaux_tc with a zero bias would pick other groups).

Where the official code treats a setting differently (REFERENCE.md 8), the configs keep both sides equal:
no MTP (absent from the official code, 8.12); ``norm_topk_prob`` true exactly for sigmoid (8.4: the official code
normalises sigmoid weights, never softmax ones); YaRN's ``mscale`` = ``mscale_all_dim`` (the official code never
scales cos/sin, 2.3) and max_seq_len above the original length whenever YaRN is on (8.8); interleaved RoPE pairs
(8.9); moe_layer_freq 1, untied head, eps 1e-6. What stays different is where each code rounds to bf16: the
official RMSNorm is ``F.rms_norm`` (8.18), minids normalises in float32 and casts before the weight; the official
MoE accumulates the routed outputs in bf16, minids in float32; and the official router computes its logits (and
its sigmoid) in bf16, minids in float32 (8.3). To make a misplaced weight visible, the RMSNorm weights are drawn
around 1 and the selection bias at random (not the ones and zeros of a fresh model).

Reading the bf16 result. The router's bf16 arithmetic is the one difference that is not bf16-sized in the logits:
a sigmoid score near 0.6 is a multiple of 2^-8 in bf16, so two experts (or two groups' best experts) often tie
exactly, and the official top-k then keeps one of the tied ones, not necessarily the one that minids' float32
scores rank higher; a softmax router sees its logits rounded to bf16. A token whose top-k decision lies within that
rounding of a tie may get another expert, which moves its hidden state by a routed expert's whole output (times 16
under V2's route scale), and the logits after it differ by far more than 1e-2 (the official code does the same to
itself between "absorb" and "naive"). Hence the last table, the routers alone on the official gates' own inputs,
with the decision margins of the tokens they route differently, and the "official experts" rows, which route minids
to the official choices: those rows show what the rest of the model agrees to. Greedy tokens can differ for the
same reason, or where the reference's own top two logits are within bf16 rounding of each other (the "gap" printed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minids.cache import KVCache
from minids.config import ConfigError, ModelConfig, yarn_mscale
from minids.generate import generate
from minids.model import Transformer
from minids.moe import gate_weights, route
from minids.norm import RMSNorm

_COMMON = {
    "model_type": "deepseek_v3",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 384,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 64,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "initializer_range": 0.02,
}

_YARN40 = {  # V3's YaRN (config.json): factor 40 over 4096 positions
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}

CONFIGS: dict[str, dict] = {
    "v3": {
        **_COMMON,
        "hidden_size": 7168,
        "intermediate_size": 256,
        "moe_intermediate_size": 32,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 64,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 8192,
        "rope_scaling": _YARN40,
    },
    "v2-lite": {
        **_COMMON,
        "model_type": "deepseek_v2",
        "q_lora_rank": None,
        "n_shared_experts": 2,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
        "max_position_embeddings": 8192,
        "rope_scaling": {**_YARN40, "mscale": 0.707, "mscale_all_dim": 0.707},
    },
    "v2": {
        **_COMMON,
        "model_type": "deepseek_v2",
        "q_lora_rank": 96,
        "n_shared_experts": 2,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "scoring_func": "softmax",
        "norm_topk_prob": False,
        "routed_scaling_factor": 16.0,
        "max_position_embeddings": 512,
        "rope_scaling": None,
    },
    "v3-small": {
        **_COMMON,
        "q_lora_rank": 96,
        "n_shared_experts": 1,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "max_position_embeddings": 128,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    },
}

OFFICIAL_BIAS_DIM = 7168  # the official Gate has a selection bias only at this width (REFERENCE.md 7, 8)


class ParityError(Exception):
    """A setup that cannot be compared (bad path, a config the official code cannot express, a name map gap)."""


# ----------------------------------------------------------------------------- the official code
def import_official(path: Path):
    """The official ``model`` module, imported from ``path`` (its folder goes first on sys.path: it imports
    ``kernel``)."""
    if not (path / "model.py").is_file():
        raise ParityError(
            f"--official {path}: no model.py there; pass the inference folder of a DeepSeek-V3 checkout "
            "(e.g. DeepSeek-V3/inference)"
        )
    if not (path / "kernel.py").is_file():
        raise ParityError(f"--official {path}: model.py but no kernel.py beside it (the official model imports it)")
    sys.path.insert(0, str(path))
    try:
        for name in ("model", "kernel"):  # not another folder's module of the same name
            if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "") or "").parent != path:
                raise ParityError(
                    f"a module named {name!r} from elsewhere is already imported; run this script "
                    "in a fresh interpreter"
                )
        om = importlib.import_module("model")
    except ImportError as e:
        raise ParityError(
            f"--official {path}: importing model.py failed: {e} (the official code needs torch and "
            "triton installed, even on the CPU)"
        ) from None
    finally:
        sys.path.remove(str(path))
    for attr in ("ModelArgs", "Transformer", "attn_impl", "Gate"):
        if not hasattr(om, attr):
            raise ParityError(f"--official {path}: model.py has no {attr}; not the DeepSeek-V3 inference code")
    return om


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """torch's default dtype set for the block (the official generate.py sets bf16), restored after."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def official_args(cfg: ModelConfig, batch: int) -> dict:
    """The official ``ModelArgs`` of a minids config, field by field; ParityError for what it cannot express."""

    def need(ok: bool, why: str) -> None:
        if not ok:
            raise ParityError(f"config not expressible in the official code: {why}")

    need(cfg.is_mla and cfg.is_moe, "the official model is MLA + DeepSeekMoE only")
    need(
        cfg.moe_layer_freq == 1,
        f"moe_layer_freq={cfg.moe_layer_freq}: the official layers are dense below "
        "n_dense_layers and MoE above (freq 1)",
    )
    need(
        cfg.num_nextn_predict_layers == 0, "MTP does not exist in the official code: num_nextn_predict_layers must be 0"
    )
    need(not cfg.tie_word_embeddings, "the official head is never tied to the embedding")
    need(cfg.rms_norm_eps == 1e-6, f"rms_norm_eps={cfg.rms_norm_eps}: the official RMSNorm uses 1e-6")
    need(cfg.rope_interleave, "the official RoPE rotates interleaved pairs (rope_interleave true)")
    need(cfg.n_shared_experts >= 1, "the official MoE always has shared experts (n_shared_experts >= 1)")
    has_bias = cfg.hidden_size == OFFICIAL_BIAS_DIM
    if cfg.topk_method == "noaux_tc":
        need(
            has_bias,
            f"noaux_tc at hidden_size {cfg.hidden_size}: the official Gate has a selection bias (and "
            f"scores groups by their top-2 sum) only at dim {OFFICIAL_BIAS_DIM}; without it, it scores a "
            "group by its max: use topk_method group_limited_greedy",
        )
    else:
        need(
            not has_bias,
            f"{cfg.topk_method} at hidden_size {OFFICIAL_BIAS_DIM}: the official Gate then has a "
            "selection bias and top-2 group scores; use noaux_tc",
        )
    need(
        cfg.topk_method != "greedy" or cfg.n_group == 1,
        "greedy routing with n_group > 1: the official Gate group-limits whenever n_expert_groups > 1",
    )
    need(
        cfg.norm_topk_prob == (cfg.scoring_func == "sigmoid"),
        f"norm_topk_prob={cfg.norm_topk_prob} with "
        f"{cfg.scoring_func}: the official Gate normalises sigmoid weights, never softmax ones (REFERENCE.md 8.4)",
    )
    args = {
        "max_batch_size": batch,
        "max_seq_len": cfg.max_position_embeddings,
        "dtype": "bf16",
        "vocab_size": cfg.vocab_size,
        "dim": cfg.hidden_size,
        "inter_dim": cfg.intermediate_size,
        "moe_inter_dim": cfg.moe_intermediate_size,
        "n_layers": cfg.num_hidden_layers,
        "n_dense_layers": cfg.first_k_dense_replace,
        "n_heads": cfg.num_attention_heads,
        "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts,
        "n_activated_experts": cfg.num_experts_per_tok,
        "n_expert_groups": cfg.n_group,
        "n_limited_groups": cfg.topk_group,
        "score_func": cfg.scoring_func,
        "route_scale": cfg.routed_scaling_factor,
        "q_lora_rank": cfg.q_lora_rank or 0,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_theta": cfg.rope_theta,
    }
    if cfg.rope_type == "yarn":
        rs = cfg.rope_scaling
        orig = rs["original_max_position_embeddings"]
        need(
            cfg.max_position_embeddings > orig,
            f"YaRN with max_position_embeddings {cfg.max_position_embeddings} "
            f"<= original {orig}: the official code applies YaRN only when max_seq_len > original_seq_len (8.8)",
        )
        m, m_all = rs.get("mscale", 1) or 0, rs.get("mscale_all_dim", 0) or 0
        need(
            yarn_mscale(rs["factor"], m) == yarn_mscale(rs["factor"], m_all),
            f"YaRN mscale {m} != mscale_all_dim {m_all}: minids would scale cos/sin, the official code never does",
        )
        args.update(
            original_seq_len=orig,
            rope_factor=rs["factor"],
            beta_fast=rs.get("beta_fast", 32),
            beta_slow=rs.get("beta_slow", 1),
            mscale=m_all,
        )
    else:
        need(cfg.rope_type == "default", f"rope type {cfg.rope_type}: the official code has only YaRN")
        args["original_seq_len"] = cfg.max_position_embeddings  # max_seq_len <= original_seq_len: YaRN off
    return args


def build_official(om, args: dict, attn_impl: str):
    """An official Transformer (bf16) with attn_impl "naive" or "absorb" (a module global read at build and run)."""
    om.attn_impl = attn_impl
    with default_dtype(torch.bfloat16):
        return om.Transformer(om.ModelArgs(**args)).eval()


# ----------------------------------------------------------------------------- the name map
_ATTN = {
    "q_proj": "wq",
    "q_a_proj": "wq_a",
    "q_a_layernorm": "q_norm",
    "q_b_proj": "wq_b",
    "kv_a_proj_with_mqa": "wkv_a",
    "kv_a_layernorm": "kv_norm",
    "kv_b_proj": "wkv_b",
    "o_proj": "wo",
}
_FFN = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}


def official_names(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A minids tensor (parameter or persistent buffer) -> its official (name, tensor) pairs (routed experts: one
    per expert)."""
    if name in _TOP:
        return [(_TOP[name], t)]
    p = name.split(".")
    if len(p) >= 5 and p[:2] == ["model", "layers"]:
        n, rest = p[2], p[3:]
        pre = f"layers.{n}"
        if rest == ["input_layernorm", "weight"]:
            return [(f"{pre}.attn_norm.weight", t)]
        if rest == ["post_attention_layernorm", "weight"]:
            return [(f"{pre}.ffn_norm.weight", t)]
        if len(rest) == 3 and rest[0] == "self_attn" and rest[1] in _ATTN and rest[2] == "weight":
            return [(f"{pre}.attn.{_ATTN[rest[1]]}.weight", t)]
        if len(rest) == 3 and rest[0] == "mlp" and rest[1] in _FFN and rest[2] == "weight":  # a dense layer
            return [(f"{pre}.ffn.{_FFN[rest[1]]}.weight", t)]
        if rest == ["mlp", "gate", "weight"]:
            return [(f"{pre}.ffn.gate.weight", t)]
        if rest == ["mlp", "gate", "e_score_correction_bias"]:
            return [(f"{pre}.ffn.gate.bias", t)]
        if len(rest) == 3 and rest[:2] == ["mlp", "experts"] and rest[2] in _FFN:  # stacked (E, ., .)
            return [(f"{pre}.ffn.experts.{e}.{_FFN[rest[2]]}.weight", t[e]) for e in range(t.shape[0])]
        if len(rest) == 4 and rest[:2] == ["mlp", "shared_experts"] and rest[2] in _FFN and rest[3] == "weight":
            return [(f"{pre}.ffn.shared_experts.{_FFN[rest[2]]}.weight", t)]
    raise ParityError(f"minids tensor {name} {tuple(t.shape)} has no official counterpart in the name map")


@torch.no_grad()
def load_official(official: torch.nn.Module, model: torch.nn.Module) -> int:
    """Copy every minids weight into the official model by name; each official parameter filled exactly once.
    Returns the number of official parameters filled."""
    src = dict(model.named_parameters())
    src.update((n, b) for n, b in model.state_dict().items() if n not in src)  # persistent buffers: the bias
    dst = dict(official.named_parameters())
    filled: dict[str, str] = {}
    for name, t in src.items():
        for oname, ot in official_names(name, t):
            if oname not in dst:
                raise ParityError(f"{name} maps to {oname}, which the official model does not have")
            if oname in filled:
                raise ParityError(f"{oname} filled twice: from {filled[oname]} and {name}")
            if dst[oname].shape != ot.shape:
                raise ParityError(f"{name} -> {oname}: shape {tuple(ot.shape)} vs official {tuple(dst[oname].shape)}")
            dst[oname].copy_(ot)
            filled[oname] = name
    missing = sorted(set(dst) - set(filled))
    if missing:
        raise ParityError(
            f"{len(missing)} official parameters left unfilled: {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''}"
        )
    return len(filled)


# ----------------------------------------------------------------------------- models and runs
def build_minids(cfg: ModelConfig, seed: int) -> Transformer:
    """A float32 minids model with random weights; RMSNorm weights ~ 1 + N(0, 0.1^2), selection bias ~ N(0, 0.05^2)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, RMSNorm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
            b = getattr(m, "e_score_correction_bias", None)
            if isinstance(b, torch.Tensor):
                b.normal_(0.0, 0.05)
    return model


class RouterLog:
    """What each MoE layer's router chose at every call (forward hooks), as (B, P + steps, K) per layer.

    The calls are one forward of everything (minids without a cache) or a prefill of P tokens and one-token steps.
    With ``force`` (per layer, another model's (B, P + steps, K) choices) a minids router's choice is replaced by
    that one and its gate weights recomputed from its own float32 scores (``minids.moe.gate_weights``).
    """

    def __init__(
        self,
        gates: list[torch.nn.Module],
        shape: tuple[int, int, int],
        force: list | None = None,
        cfg: ModelConfig | None = None,
    ):
        self.B, self.P, self.steps = shape
        self.calls: list[list[torch.Tensor]] = [[] for _ in gates]
        self.inputs: list[list[torch.Tensor]] = [[] for _ in gates]
        self.force, self.cfg = force, cfg
        self.hooks = [g.register_forward_hook(lambda m, i, o, k=k: self.hook(k, i, o)) for k, g in enumerate(gates)]

    def _slice(self, choices: torch.Tensor, call: int, n: int) -> torch.Tensor:
        """The (n, K) rows of choices (B, P + steps, K) that call number ``call`` of n tokens routes."""
        if call == 0 and n == self.B * (self.P + self.steps):
            return choices.flatten(0, 1)
        if call == 0 and n == self.B * self.P:
            return choices[:, : self.P].flatten(0, 1)
        if 1 <= call <= self.steps and n == self.B:
            return choices[:, self.P + call - 1]
        raise ParityError(f"router call {call} of {n} tokens: neither a prefill, a step nor one whole forward")

    def hook(self, k: int, inputs: tuple, out: tuple):
        self.inputs[k].append(inputs[0].detach().clone())
        if self.force is None:
            self.calls[k].append(out[1].detach().clone())
            return None
        scores = out[2]  # a minids router: weights (N, K), indices (N, K), scores (N, E) float32
        idx = self._slice(self.force[k], len(self.calls[k]), scores.shape[0])
        self.calls[k].append(idx)
        return gate_weights(scores, idx, self.cfg.norm_topk_prob, self.cfg.routed_scaling_factor), idx, scores

    def choices(self) -> list[torch.Tensor]:
        """Per layer, the (B, P + steps, K) choices."""
        out = []
        for calls in self.calls:
            if len(calls) == 1:
                out.append(calls[0].view(self.B, self.P + self.steps, -1))
            else:
                out.append(
                    torch.cat([calls[0].view(self.B, self.P, -1)] + [c.view(self.B, 1, -1) for c in calls[1:]], dim=1)
                )
        return out

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def official_gates(official) -> list[torch.nn.Module]:
    return [layer.ffn.gate for layer in official.layers if hasattr(layer.ffn, "gate")]


def minids_gates(model) -> list[torch.nn.Module]:
    return [layer.mlp.gate for layer in model.model.layers if layer.is_moe]


def run_official(
    official, om, attn_impl: str, prompt: torch.Tensor, steps: int, stream: torch.Tensor | None, dtype: torch.dtype
):
    """Prefill + steps decode steps -> logits (steps + 1, B, V) float32 and the greedy tokens (B, steps + 1).
    stream (B, steps): the tokens to feed (teacher forcing), else its own greedy choices. dtype: torch's default
    dtype while it runs (bf16 as in its generate.py; float32 for a model cast to float32)."""
    om.attn_impl = attn_impl
    P = prompt.shape[1]
    out, toks = [], []
    with default_dtype(dtype):
        logits = official(prompt, 0)
        for k in range(steps + 1):
            out.append(logits.float())
            toks.append(logits.argmax(-1))
            if k == steps:
                break
            nxt = toks[-1] if stream is None else stream[:, k]
            logits = official(nxt[:, None], P + k)
    return torch.stack(out), torch.stack(toks, dim=1)


@torch.no_grad()
def run_minids_cache(model, prompt: torch.Tensor, stream: torch.Tensor, mla_impl: str) -> torch.Tensor:
    """minids' decoding cache: prefill, then the stream one token a step -> logits (steps + 1, B, V) float32."""
    B, P = prompt.shape
    dtype = next(model.parameters()).dtype
    cache = KVCache.allocate(model.cfg, B, P + stream.shape[1] + 1, dtype=dtype, mla_impl=mla_impl)
    out = [model(prompt, cache=cache).logits[:, -1].float()]
    for k in range(stream.shape[1]):
        out.append(model(stream[:, k : k + 1], cache=cache).logits[:, -1].float())
    return torch.stack(out)


@torch.no_grad()
def run_minids_full(model, prompt: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
    """minids' training forward (no cache) over prompt + stream -> logits at positions P-1 .. (steps + 1, B, V)."""
    P = prompt.shape[1]
    logits = model(torch.cat([prompt, stream], dim=1)).logits  # (B, P + steps, V)
    return logits[:, P - 1 :].float().transpose(0, 1)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    return ((a - ref).abs().max() / ref.abs().max()).item()


def argmax_gap(logits: torch.Tensor, ref: torch.Tensor) -> float | None:
    """Where the greedy choice differs from the reference's: the largest (ref logit of ref's choice - ref logit of
    this choice) / max |ref| of that step; None where all agree. logits, ref: (steps + 1, B, V)."""
    a, r = logits.argmax(-1), ref.argmax(-1)  # (steps + 1, B)
    if bool((a == r).all()):
        return None
    gap = (ref.gather(-1, r[..., None]) - ref.gather(-1, a[..., None]))[..., 0] / ref.abs().amax(-1)
    return gap[a != r].max().item()


def routing_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[int, int]:
    """(token, layer) expert sets that differ, of all compared; a, b: per layer (B, T, K)."""
    n = sum(int((x.sort(-1).values != y.sort(-1).values).any(-1).sum()) for x, y in zip(a, b))
    return n, sum(x.shape[0] * x.shape[1] for x in a)


def decision_margins(cfg: ModelConfig, router, x: torch.Tensor) -> torch.Tensor:
    """How close each token's routing decision is to a tie, in minids' float32 scores, relative to the scores:
    min(gap between the K-th and (K+1)-th selection score among the kept groups, gap between the last kept and the
    first dropped group score) / the K-th selection score. x: (N, D) -> (N,)."""
    with torch.no_grad():
        _, _, s = router(x)  # (N, E) float32
    b = router.e_score_correction_bias
    c = s if b is None else s + b
    N, E = c.shape
    margin = torch.full((N,), float("inf"))
    if cfg.topk_method != "greedy" and cfg.n_group > 1:
        grouped = c.view(N, cfg.n_group, -1)
        gs = grouped.topk(2, -1).values.sum(-1) if cfg.topk_method == "noaux_tc" else grouped.amax(-1)  # (N, G)
        top = gs.topk(cfg.topk_group + 1, -1).values if cfg.topk_group < cfg.n_group else None
        if top is not None:
            margin = top[:, -2] - top[:, -1]
        keep = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, gs.topk(cfg.topk_group, -1).indices, True)
        c = grouped.masked_fill(~keep[..., None], float("-inf")).view(N, E)
    top = c.topk(cfg.num_experts_per_tok + 1, -1).values
    return torch.minimum(margin, top[:, -2] - top[:, -1]) / top[:, -2].abs()


def run_paths(om, officials: dict, paths: list, prompt: torch.Tensor, steps: int, cfg: ModelConfig, dtype, forced):
    """The official "absorb" model decodes greedily (the reference); its "naive" twin and every minids path (model,
    kind, mla_impl or None for no cache) are fed its tokens. forced: also run the paths routed to the reference's
    experts. -> (rows without the config name, the reference's RouterLog)."""
    B, P = prompt.shape
    shape = (B, P, steps)

    def logged(gates, fn, force=None):
        log = RouterLog(gates, shape, force, cfg)
        try:
            return fn(), log
        finally:
            log.close()

    (ref, stream_full), ref_log = logged(
        official_gates(officials["absorb"]),
        partial(run_official, officials["absorb"], om, "absorb", prompt, steps, None, dtype),
    )
    stream = stream_full[:, :-1]  # (B, steps): the tokens fed after the prompt
    ref_choices = ref_log.choices()
    (naive, _), naive_log = logged(
        official_gates(officials["naive"]),
        partial(run_official, officials["naive"], om, "naive", prompt, steps, stream, dtype),
    )
    runs = {"official naive": (naive, naive_log.choices(), None)}
    for force in (None, ref_choices) if forced else (None,):  # minids' own routing, then the reference's experts
        for model, kind, impl in paths if force is None else [p for p in paths if p[2] != "naive"]:
            fn = (
                partial(run_minids_cache, model, prompt, stream, impl)
                if impl
                else partial(run_minids_full, model, prompt, stream)
            )
            logits, log = logged(minids_gates(model), fn, force)
            gen = None
            if impl and force is None and next(model.parameters()).dtype == dtype:  # decoding on its own: generate()
                new = torch.tensor(generate(model, prompt.tolist(), steps + 1, mla_impl=impl))
                gen = bool((new == stream_full).all())
            who = (
                f"minids {kind}, "
                + (f"cache {impl}" if impl else "no cache")
                + ("" if force is None else ", official experts")
            )
            runs[who] = (logits, log.choices(), gen)
    rows = []
    ref_arg = ref.argmax(-1)  # (steps + 1, B)
    for who, (lg, choices, gen_ok) in runs.items():
        rows.append(
            {
                "path": who,
                "prefill": rel(lg[0], ref[0]),
                "decode": rel(lg[1:], ref[1:]),
                "prefill_naive": rel(lg[0], naive[0]),
                "decode_naive": rel(lg[1:], naive[1:]),
                "argmax": int((lg.argmax(-1) == ref_arg).sum()),
                "n_argmax": ref_arg.numel(),
                "argmax_gap": argmax_gap(lg, ref),
                "routing": routing_diff(choices, ref_choices),
                "generate": gen_ok,
            }
        )
    return rows, ref_log


def compare_config(name: str, om, args, seed: int) -> tuple[list[dict], list[dict], dict]:
    """All comparisons of one configuration -> bf16 rows, float32 rows and static facts."""
    cfg = ModelConfig.from_dict(CONFIGS[name])
    oargs = official_args(cfg, args.batch)
    B, P, steps = args.batch, args.prompt_len, args.steps
    if P + steps + 1 > cfg.max_position_embeddings:
        raise ParityError(f"--prompt-len + --steps exceed {name}'s {cfg.max_position_embeddings} positions")
    m32 = build_minids(cfg, seed)
    m16 = copy.deepcopy(m32).to(torch.bfloat16)  # the selection bias and RoPE frequencies stay float32
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(seed + 1))

    # bf16: the official code as released
    officials = {impl: build_official(om, oargs, impl) for impl in ("absorb", "naive")}
    n_filled = [load_official(o, m16) for o in officials.values()][-1]
    paths = [(m16, "bf16", "absorbed"), (m16, "bf16", "naive"), (m16, "bf16", None), (m32, "float32", "absorbed")]
    rows16, ref_log = run_paths(om, officials, paths, prompt, steps, cfg, torch.bfloat16, forced=True)
    # float32: the same official code with its parameters cast to float32 (then loaded unrounded) and float32 as
    # torch's default dtype while it runs: the same arithmetic with no bf16 rounding anywhere
    off32 = {impl: build_official(om, oargs, impl).float() for impl in ("absorb", "naive")}
    for o in off32.values():
        load_official(o, m32)
    paths = [(m32, "float32", "absorbed"), (m32, "float32", "naive"), (m32, "float32", None)]
    rows32, _ = run_paths(om, off32, paths, prompt, steps, cfg, torch.float32, forced=False)
    for r in rows16 + rows32:
        r["config"] = name

    # the routers alone, on identical inputs: the official model's gate inputs into minids' bf16 routers
    same, same16, margins, flip_margins = 0, 0, [], []
    for k, gate in enumerate(minids_gates(m16)):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in ref_log.inputs[k]])  # (N, D) bf16, in call order
        want = torch.cat([c.reshape(-1, c.shape[-1]) for c in ref_log.calls[k]])
        with torch.no_grad():
            got = gate(x)[1]
        differ = (got.sort(-1).values != want.sort(-1).values).any(-1)
        same += int((~differ).sum())
        got16 = route(
            F.linear(x, gate.weight).float(),
            gate.e_score_correction_bias,
            top_k=cfg.num_experts_per_tok,
            scoring_func=cfg.scoring_func,
            topk_method=cfg.topk_method,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
        )[1]
        same16 += int((got16.sort(-1).values == want.sort(-1).values).all(-1).sum())
        mg = decision_margins(cfg, gate, x)
        margins.append(mg)
        flip_margins.append(mg[differ])
    margins, flip_margins = torch.cat(margins), torch.cat(flip_margins)
    o_attn = officials["absorb"].layers[0].attn
    T = P + steps + 1
    cos, sin = m32.rotary(torch.arange(T)[None])
    fc = officials["absorb"].freqs_cis[:T]
    facts = {
        "config": name,
        "dim": cfg.hidden_size,
        "official_params": n_filled,
        "scale_official": o_attn.softmax_scale,
        "scale_minids": cfg.softmax_scale,
        "rope": max((fc.real - cos[0]).abs().max().item(), (fc.imag - sin[0]).abs().max().item()),
        "yarn": cfg.rope_type == "yarn",
        "routing": f"{cfg.scoring_func}, {cfg.topk_method}",
        "router_same": same,
        "router_same16": same16,
        "router_n": margins.numel(),
        "flip_margin": flip_margins.max().item() if flip_margins.numel() else None,
        "median_margin": margins.median().item(),
    }
    return rows16, rows32, facts


_LEGEND_LOGITS = (
    'Reference: the official model, attn_impl "absorb", decoding greedily; every other path is fed its tokens '
    "(prompt, then its greedy choices). rel = max |diff| / max |ref| of the logits (prefill: the last prompt "
    "position; decode: all steps), against the official absorb model, then the official naive one. argmax: greedy "
    "choices (sequence x position) equal to the reference's (gap: where one differs, the reference's own logit gap "
    "between the two tokens / max |ref|). routing: (token, MoE layer) expert sets unlike the reference's. generate: "
    'minids.generate.generate, decoding on its own, gives the reference\'s tokens. "official experts": minids routed '
    "to the experts the reference chose (gate weights from its own scores)."
)
_LEGEND_FLOAT32 = (
    "The same comparisons with the official model cast to float32 after it is built (its Linear weights are bf16 by "
    "construction; .float() on the module, then the float32 minids weights loaded) and run with float32 as torch's "
    "default dtype: the official arithmetic without bf16 rounding, against minids in float32. Reference: the "
    "official float32 absorb model, decoding greedily."
)
_HEAD_LOGITS = (
    "| config | path | prefill rel | decode rel | vs naive: prefill, decode | argmax | routing differs | generate |"
)
_LEGEND_STATIC = (
    "The routers alone: the bf16 official gates' inputs (absorb run) fed to minids' bf16 routers "
    "(Router, float32 logits), and to minids.moe.route on bf16 logits (the official router's precision up to its "
    "bf16 sigmoid). Decision margin: min(gap between the K-th and (K+1)-th selection score in the kept groups, gap "
    "between the last kept and the first dropped group score) / K-th score, in minids' float32 scores; bf16 spacing "
    "is 2^-8 = 3.9e-3 relative."
)
_HEAD_STATIC = (
    "| config | dim | routing | YaRN | softmax scale official / minids | RoPE max abs diff (cos, sin) | official "
    "params filled | router sets equal | with bf16 logits | largest margin of a differing set | median margin |"
)


def logit_rows(rows: list[dict]) -> list[str]:
    md = [_HEAD_LOGITS, "|---|" + "---|" * 7]
    for r in rows:
        gen = "-" if r["generate"] is None else ("equal" if r["generate"] else "DIFFERENT")
        gap = "" if r["argmax_gap"] is None else f" (gap {r['argmax_gap']:.1e})"
        naive = "-" if r["path"] == "official naive" else f"{r['prefill_naive']:.2e}, {r['decode_naive']:.2e}"
        md.append(
            f"| {r['config']} | {r['path']} | {r['prefill']:.2e} | {r['decode']:.2e} | {naive} | "
            f"{r['argmax']} / {r['n_argmax']}{gap} | {r['routing'][0]} / {r['routing'][1]} | {gen} |"
        )
    return md


def table(rows16: list[dict], rows32: list[dict], facts: list[dict], head: str) -> str:
    md = [head, "", "### bf16 (the official code as released)", "", _LEGEND_LOGITS, "", *logit_rows(rows16)]
    md += ["", "### float32", "", _LEGEND_FLOAT32, "", *logit_rows(rows32)]
    md += ["", "### Static checks and the routers alone", "", _LEGEND_STATIC, "", _HEAD_STATIC, "|---|" + "---|" * 10]
    for f in facts:
        fm = "-" if f["flip_margin"] is None else f"{f['flip_margin']:.1e}"
        md.append(
            f"| {f['config']} | {f['dim']} | {f['routing']} | {'on' if f['yarn'] else 'off'} | "
            f"{f['scale_official']:.7f} / {f['scale_minids']:.7f} | {f['rope']:.1e} | {f['official_params']} | "
            f"{f['router_same']} / {f['router_n']} | {f['router_same16']} / {f['router_n']} | {fm} | "
            f"{f['median_margin']:.1e} |"
        )
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--official", required=True, help="the inference folder of a DeepSeek-V3 checkout (model.py)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8, help="decode steps after the prefill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        ap.error(f"--configs {args.configs}: unknown {', '.join(unknown) or '(none given)'}; of {', '.join(CONFIGS)}")
    if args.batch < 1 or args.prompt_len < 2 or args.steps < 1:
        ap.error("--batch >= 1, --prompt-len >= 2 and --steps >= 1")
    try:
        om = import_official(Path(args.official).resolve())
        rows16, rows32, facts = [], [], []
        for name in names:  # each config its own seed, whichever others run
            r16, r32, f = compare_config(name, om, args, args.seed + 10 * list(CONFIGS).index(name))
            rows16 += r16
            rows32 += r32
            facts.append(f)
    except (ParityError, ConfigError) as e:
        sys.exit(f"official_parity: {e}")
    head = (
        f"minids vs the official DeepSeek-V3 inference code ({args.official}), CPU, torch {torch.__version__}, "
        f"batch {args.batch}, prompt {args.prompt_len} random tokens, {args.steps} decode steps, "
        f"seed {args.seed}"
    )
    md = table(rows16, rows32, facts, head)
    print(md)
    if args.out:
        try:
            Path(args.out).write_text(md + "\n")
        except OSError as e:
            sys.exit(f"official_parity: --out {args.out}: cannot write ({e.strerror})")


if __name__ == "__main__":
    main()
