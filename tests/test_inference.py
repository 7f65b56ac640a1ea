"""Inference: the static KV cache, absorbed vs naive MLA decoding (REFERENCE.md 2.2, 2.5, 2.6), cached decoding
against full forwards, ragged batches, cache size, generation and sampling, input errors and the CLI.

Expected values come from REFERENCE.md or are computed here independently (explicit per-head keys and
values, full no-cache forwards, explicit argmax loops, hand probabilities), never from the decoding code.
"""

import math
import re

import pytest
import torch

import minids
from minids.attention import mla_attention_absorbed, mla_attention_naive
from minids.cache import KVCache
from minids.cli import main as cli_main
from minids.config import ModelConfig
from minids.data import ByteTokenizer
from minids.generate import generate, sample_next, stream
from minids.model import Transformer

TOL32 = {"rtol": 1e-5, "atol": 1e-5}
V3_YARN = {"type": "yarn", "factor": 4, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}


def cfg_of(name: str, **over) -> ModelConfig:
    return ModelConfig.from_dict({**ModelConfig.load(name).to_dict(), **over})


# name -> config overrides. "v3-yarn" is tiny-v3 with YaRN RoPE (V3-style: q_lora, sigmoid router, mscale 1.0).
CONFIGS = {
    "tiny-v3": ("tiny-v3", {}),
    "tiny-v2": ("tiny-v2", {}),  # YaRN (mscale 0.707), no q latent, softmax router
    "v2-rope": ("tiny-v2", {"rope_scaling": None}),  # the same without YaRN
    "tiny-moe": ("tiny-moe", {}),  # MHA + MoE
    "tiny-dense": ("tiny-dense", {}),  # GQA (8 heads, 4 kv heads)
    "v3-yarn": ("tiny-v3", {"rope_scaling": V3_YARN}),
}


def make_model(key: str, layers: int = 2, init: float = 0.08, seed: int = 0, **over) -> Transformer:
    """A seeded model in eval mode. The init is wider than 0.02 so that attention is far from uniform and a
    wrong position, mask or cache entry moves the logits well beyond the tolerances."""
    base, extra = CONFIGS[key]
    cfg = cfg_of(base, num_hidden_layers=layers, initializer_range=init, **{**extra, **over})
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def rand_ids(cfg: ModelConfig, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, shape, generator=g)


@torch.no_grad()
def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(B, S) -> (B, S, V) from one forward without a cache."""
    return model(ids).logits


def rel_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    """Max abs difference within rtol of the reference's max magnitude."""
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-30), f"max abs diff {err:.3e} vs scale {scale:.3e}"


# ------------------------------------------------------------------------------------------ MLA kernels
def mla_inputs(B, S, T, H, Dn, R, Dv, C, seed, lengths):
    """Random MLA decode inputs with a causal mask over a cache where sequence b holds lengths[b] tokens
    before the S new ones (slots past lengths[b] + S are masked, like a static cache's tail)."""
    g = torch.Generator().manual_seed(seed)
    q_nope = torch.randn(B, S, H, Dn, generator=g)
    q_pe = torch.randn(B, S, H, R, generator=g)
    c_kv = torch.randn(B, T, C, generator=g)
    k_pe = torch.randn(B, T, R, generator=g)
    wkv_b = torch.randn(H, Dn + Dv, C, generator=g) / math.sqrt(C)
    lens = torch.tensor(lengths)
    qpos = lens[:, None] + torch.arange(S)[None]  # (B, S)
    t = torch.arange(T)
    mask = (t[None, None] <= qpos[:, :, None]) & (t[None, None] < (lens + S)[:, None, None])
    return q_nope, q_pe, c_kv, k_pe, wkv_b, mask.unsqueeze(1)  # mask (B, 1, S, T)


def explicit_mla(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale):
    """REFERENCE.md 2.1-2.2 written out in float64 per head: k_h = [W_UK_h c; k_pe], v_h = W_UV_h c."""
    B, S, H, Dn = q_nope.shape
    out = torch.zeros(B, S, H, wkv_b.shape[1] - Dn, dtype=torch.float64)
    for h in range(H):
        w_uk, w_uv = wkv_b[h, :Dn].double(), wkv_b[h, Dn:].double()  # (Dn, C), (Dv, C)
        k_nope = c_kv.double() @ w_uk.T  # (B, T, Dn)
        v = c_kv.double() @ w_uv.T  # (B, T, Dv)
        k = torch.cat([k_nope, k_pe.double()], -1)  # (B, T, Dn + R)
        q = torch.cat([q_nope[:, :, h], q_pe[:, :, h]], -1).double()  # (B, S, Dn + R)
        s = (q @ k.transpose(1, 2)) * scale  # (B, S, T)
        s = s.masked_fill(~mask[:, 0], float("-inf"))
        out[:, :, h] = s.softmax(-1) @ v
    return out


SHAPES = [  # B, S, T, H, Dn, R, Dv, C, lengths before the step
    (2, 1, 9, 4, 16, 8, 12, 32, [3, 8]),
    (2, 2, 9, 4, 16, 8, 12, 32, [0, 5]),
    (3, 5, 12, 2, 8, 4, 8, 24, [0, 2, 7]),
    (1, 7, 7, 8, 32, 16, 32, 64, [0]),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_absorbed_equals_naive_and_explicit_heads(shape):
    B, S, T, H, Dn, R, Dv, C, lengths = shape
    args = mla_inputs(B, S, T, H, Dn, R, Dv, C, seed=sum(shape[:-1]), lengths=lengths)
    assert (~args[-1]).any()  # some slots are masked
    scale = (Dn + R) ** -0.5 * 1.7
    naive = mla_attention_naive(*args, scale)
    absorbed = mla_attention_absorbed(*args, scale)
    assert naive.shape == absorbed.shape == (B, S, H, Dv)
    rel_close(absorbed, naive)
    ref = explicit_mla(*args, scale)
    rel_close(absorbed, ref)
    rel_close(naive, ref)
    # masked slots do not matter: garbage there changes nothing
    q_nope, q_pe, c_kv, k_pe, wkv_b, mask = args
    dead = ~mask[:, 0].any(1)  # (B, T) slots no query may see
    c2 = c_kv.masked_fill(dead[..., None], 1e4)
    k2 = k_pe.masked_fill(dead[..., None], -1e4)
    torch.testing.assert_close(mla_attention_absorbed(q_nope, q_pe, c2, k2, wkv_b, mask, scale), absorbed)


def test_absorbed_matches_kv_b_proj_of_an_mla_layer():
    """An MLA layer's own projections: keys/values built here with kv_b_proj (the Linear, per head slices of its
    [H * (Dn + Dv), C] weight) against the absorbed form fed the (H, Dn + Dv, C) view."""
    torch.manual_seed(0)
    cfg = cfg_of("tiny-v3", initializer_range=0.1)
    attn = minids.MLA(cfg).eval()
    H, Dn, Dv, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    B, T, S = 2, 10, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    with torch.no_grad():
        c_kv, k_pe = attn.project_kv_latent(x)  # (B, T, C), (B, T, R)
        q = attn.project_q(x[:, -S:])
        q_nope, q_pe = q.split([Dn, cfg.qk_rope_head_dim], -1)
        kv = attn.kv_b_proj(c_kv)  # (B, T, H * (Dn + Dv)) through the Linear itself
        W = attn.kv_b_proj.weight  # (H * (Dn + Dv), C)
        mask = torch.ones(B, 1, S, T, dtype=torch.bool).tril(T - S)
        mask[1, ..., :2] = False  # two dead slots in the second sequence
        scale = cfg.softmax_scale
        out = torch.zeros(B, S, H, Dv, dtype=torch.float64)
        for h in range(H):
            blk = W[h * (Dn + Dv):(h + 1) * (Dn + Dv)].double()
            k_nope = c_kv.double() @ blk[:Dn].T  # first Dn rows of the head block = W_UK
            v = c_kv.double() @ blk[Dn:].T  # remaining Dv rows = W_UV
            torch.testing.assert_close(k_nope.float(), kv[..., h * (Dn + Dv):h * (Dn + Dv) + Dn], **TOL32)
            k = torch.cat([k_nope, k_pe.double()], -1)
            qh = torch.cat([q_nope[:, :, h], q_pe[:, :, h]], -1).double()
            s = (qh @ k.transpose(1, 2) * scale).masked_fill(~mask[:, 0], float("-inf"))
            out[:, :, h] = s.softmax(-1) @ v
        wkv_b = W.view(H, Dn + Dv, C)
        rel_close(mla_attention_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale), out)
        rel_close(mla_attention_naive(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale), out)


@pytest.mark.parametrize("key", ["tiny-v3", "tiny-v2"])
def test_model_absorbed_equals_naive(key):
    model = make_model(key)
    ids = rand_ids(model.cfg, (2, 9), seed=3)
    outs = {}
    with torch.no_grad():
        for impl in ("absorbed", "naive"):
            cache = KVCache.allocate(model.cfg, 2, 12, mla_impl=impl)
            pre = model(ids[:, :6], cache=cache).logits
            steps = [model(ids[:, t:t + 1], cache=cache).logits for t in range(6, 9)]
            outs[impl] = torch.cat([pre, *steps], 1)
    rel_close(outs["absorbed"], outs["naive"])
    rel_close(outs["absorbed"], full_logits(model, ids))


# ------------------------------------------------------------------------------ cached decoding == full forward
@pytest.mark.parametrize("key", list(CONFIGS))
def test_decode_matches_full_forward(key):
    model = make_model(key)
    cfg = model.cfg
    B, S, k = 2, 13, 4
    ids = rand_ids(cfg, (B, S), seed=7)
    ref = full_logits(model, ids)
    with torch.no_grad():
        for chunk in (1, 3):
            cache = KVCache.allocate(cfg, B, S)
            parts = [model(ids[:, :k], cache=cache).logits]
            for t in range(k, S, chunk):
                out = model(ids[:, t:t + chunk], cache=cache)
                parts.append(out.logits)
                torch.testing.assert_close(model.lm_head(out.hidden), out.logits)
            assert cache.lengths.tolist() == [S] * B
            rel_close(torch.cat(parts, 1), ref)


def test_decode_detects_wrong_position():
    """Sensitivity of the check above: feeding a token at the wrong position moves the logits far beyond 1e-5."""
    model = make_model("v3-yarn")
    ids = rand_ids(model.cfg, (1, 8), seed=1)
    ref = full_logits(model, ids)
    with torch.no_grad():
        cache = KVCache.allocate(model.cfg, 1, 9)
        model(ids[:, :7], cache=cache)
        cache.lengths += 1  # skip a slot: the last token lands at position 8 instead of 7
        bad = model(ids[:, 7:], cache=cache).logits
    assert (bad - ref[:, 7:]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ ragged batches
@pytest.mark.parametrize("key", ["tiny-v3", "tiny-dense"])
def test_ragged_batch_equals_each_prompt_alone(key):
    model = make_model(key)
    cfg = model.cfg
    prompts = [rand_ids(cfg, (n,), seed=10 + n).tolist() for n in (7, 3, 5)]
    P, n_new = 7, 4
    ids = torch.zeros(3, P, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    lens = torch.tensor([len(p) for p in prompts])
    with torch.no_grad():
        cache = KVCache.allocate(cfg, 3, P + n_new)
        logits = model(ids, cache=cache, lengths=lens).logits
        assert cache.lengths.tolist() == lens.tolist()
        seqs = [list(p) for p in prompts]
        for b, p in enumerate(prompts):
            rel_close(logits[b, :len(p)], full_logits(model, torch.tensor([p]))[0])
        last = logits[torch.arange(3), lens - 1]
        for _ in range(n_new):
            nxt = last.argmax(-1)
            for b in range(3):
                seqs[b].append(int(nxt[b]))
                # the batch's cached logits for sequence b equal a full forward of sequence b alone
                rel_close(last[b], full_logits(model, torch.tensor([seqs[b][:-1]]))[0, -1])
            last = model(nxt[:, None], cache=cache).logits[:, -1]
    # generate's greedy batch equals each prompt generated alone
    batched = generate(model, prompts, 5)
    assert batched == [generate(model, [p], 5)[0] for p in prompts]


def test_padding_slot_never_corrupts_real_entries():
    """A prompt that exactly fills max_len beside a shorter one; then a chunk whose padding would fall past
    max_len. Real entries equal those of each sequence decoded alone; padding lands only in slot max_len."""
    model = make_model("tiny-v3")
    cfg = model.cfg
    T = 6
    a = rand_ids(cfg, (T,), seed=1).tolist()
    b = rand_ids(cfg, (4,), seed=2).tolist()
    with torch.no_grad():
        # prefill: a fills all T slots, b has 2 real tokens and 4 padding tokens
        cache = KVCache.allocate(cfg, 2, T)
        ids = torch.tensor([a, b[:2] + [0] * 4])
        out = model(ids, cache=cache, lengths=torch.tensor([T, 2])).logits
        rel_close(out[0], full_logits(model, torch.tensor([a]))[0])
        rel_close(out[1, :2], full_logits(model, torch.tensor([b[:2]]))[0])
        solo = KVCache.allocate(cfg, 1, T)
        model(torch.tensor([a]), cache=solo)
        for layer, ref in zip(cache.layers, solo.layers):
            torch.testing.assert_close(layer.a[0, :T], ref.a[0, :T], **TOL32)
            torch.testing.assert_close(layer.b[0, :T], ref.b[0, :T], **TOL32)
            assert (layer.a[1, 2:T] == 0).all() and (layer.b[1, 2:T] == 0).all()  # padding wrote nothing there
            assert (layer.a[1, T] != 0).any()  # ... but went to the spare slot

    with torch.no_grad():
        # a at 5 of 6: one real token (fills slot 5) + 2 padding tokens that would land at 6, 7; b: 3 real tokens
        cache = KVCache.allocate(cfg, 2, T)
        model(torch.tensor([a[:5], b[:1] + [0] * 4]), cache=cache, lengths=torch.tensor([5, 1]))
        step = model(torch.tensor([[a[5], 0, 0], b[1:4]]), cache=cache, lengths=torch.tensor([1, 3])).logits
        assert cache.lengths.tolist() == [6, 4]
        rel_close(step[0, :1], full_logits(model, torch.tensor([a]))[0, 5:])
        rel_close(step[1], full_logits(model, torch.tensor([b]))[0, 1:])
        for layer, ref in zip(cache.layers, solo.layers):
            torch.testing.assert_close(layer.a[0, :T], ref.a[0, :T], **TOL32)


# ------------------------------------------------------------------------------------------ cache size
@pytest.mark.parametrize("key,dtype", [("tiny-v3", torch.float32), ("tiny-v2", torch.bfloat16),
                                       ("tiny-moe", torch.float32), ("tiny-dense", torch.bfloat16)])
def test_cache_bytes_per_token(key, dtype):
    base, extra = CONFIGS[key]
    for mtp in (0, 1):
        cfg = cfg_of(base, num_nextn_predict_layers=mtp, **extra)
        cache = KVCache.allocate(cfg, 2, 5, dtype=dtype)
        es = torch.tensor([], dtype=dtype).element_size()
        L = cfg.num_hidden_layers
        if cfg.is_mla:
            per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # REFERENCE.md 2.5: (d_c + d_h^R) per layer
            assert per_layer == 64 + 16
        else:
            per_layer = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)  # K and V
            assert per_layer == 2 * {"tiny-moe": 8, "tiny-dense": 4}[key] * 32
        # the main cache holds the main layers only: REFERENCE.md 2.5's l = num_hidden_layers
        assert len(cache.layers) == L
        assert cache.bytes_per_token() == L * per_layer * es
        assert cache.bytes_per_token() == minids.kv_cache_elements_per_token(cfg) * es
        # the tensors really are that size: batch x (max_len + 1 padding slot) x per-token entries
        assert sum(t.a.numel() + t.b.numel() for t in cache.layers) == 2 * 6 * L * per_layer
        if mtp:  # the MTP layers get a cache of their own, of the same per-layer size
            m = KVCache.allocate(cfg, 2, 5, dtype=dtype, mtp=True)
            assert len(m.layers) == mtp and m.bytes_per_token() == mtp * per_layer * es
        else:
            with pytest.raises(ValueError, match="no MTP layers"):
                KVCache.allocate(cfg, 2, 5, dtype=dtype, mtp=True)


def test_cache_size_v3_shape_bf16():
    """REFERENCE.md 2.5: V3 caches 512 + 64 = 576 elements per token per layer, 61 x 576 = 35,136 per token
    (70,272 B in bf16)."""
    cfg = ModelConfig.load("deepseek-v3")  # 61 layers + 1 MTP layer (not in the main cache)
    cache = KVCache.allocate(cfg, 1, 1, dtype=torch.bfloat16)
    assert len(cache.layers) == 61
    for layer in cache.layers:
        assert layer.a.shape == (1, 2, 512) and layer.b.shape == (1, 2, 64) and layer.a.dtype == torch.bfloat16
        assert layer.a[0, 0].numel() + layer.b[0, 0].numel() == 576
        assert layer.a[0, 0].numel() * 2 + layer.b[0, 0].numel() * 2 == 1152
    assert cache.bytes_per_token() == 61 * 1152 == 70_272
    assert minids.kv_cache_elements_per_token(cfg) == 35_136


# ------------------------------------------------------------------------------------------ generation
@torch.no_grad()
def argmax_loop(model, prompt: list[int], n: int, stop: int | None = None) -> list[int]:
    """Greedy continuation by full no-cache forwards, one per token."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        t = int(full_logits(model, torch.tensor([seq]))[0, -1].argmax())
        out.append(t)
        seq.append(t)
        if t == stop:
            break
    return out


@pytest.mark.parametrize("key", ["tiny-v3", "tiny-dense"])
def test_greedy_generate_equals_argmax_loop(key):
    model = make_model(key)
    prompts = [rand_ids(model.cfg, (n,), seed=20 + n).tolist() for n in (5, 2)]
    got = generate(model, prompts, 7)
    assert got == [argmax_loop(model, p, 7) for p in prompts]
    assert all(len(g) == 7 for g in got)
    assert generate(model, prompts, 1) == [g[:1] for g in got]
    assert generate(model, prompts, 7, mla_impl="naive") == got
    # the model is left in the mode it was in
    model.train()
    generate(model, prompts[:1], 1)
    assert model.training


def test_stop_tokens_end_one_sequence_others_continue():
    model = make_model("tiny-v3")
    prompts = [rand_ids(model.cfg, (n,), seed=30 + n).tolist() for n in (4, 6)]
    n = 8
    free = [argmax_loop(model, p, n) for p in prompts]
    # a stop token that sequence 0 produces (not first) and sequence 1 never does
    cands = [t for t in free[0][1:] if t not in free[1]]
    assert cands, f"no usable stop token in {free}"
    stop = cands[0]
    first = free[0].index(stop)
    out = generate(model, prompts, n, stop_tokens=[stop])
    assert out[0] == free[0][:first + 1]  # includes the stop token, nothing after
    assert out[1] == free[1]  # the other sequence runs to max_new_tokens
    # stream: finished flags, and the loop ends once every sequence stopped
    steps = list(stream(model, prompts[:1], n, stop_tokens=[stop]))
    assert len(steps) == first + 1
    assert [int(t[0]) for t, _ in steps] == free[0][:first + 1]
    assert not any(bool(d[0]) for _, d in steps)
    steps = list(stream(model, prompts, n, stop_tokens=[stop]))
    assert len(steps) == n
    assert [bool(d[0]) for _, d in steps] == [False] * (first + 1) + [True] * (n - first - 1)
    assert not any(bool(d[1]) for _, d in steps)


def test_sampling_reproducible_with_seeded_generator():
    model = make_model("tiny-v3")
    prompts = [[1, 2, 3], [4, 5]]
    runs = [generate(model, prompts, 6, temperature=1.0, top_k=50, top_p=0.9,
                     generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    assert all(len(r) == 6 for r in runs[0])


def test_sample_next_top_k_1_is_greedy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 50, generator=g)
    for temp in (0.5, 1.0, 3.0):
        got = sample_next(logits, temperature=temp, top_k=1, generator=g)
        assert torch.equal(got, logits.argmax(-1))
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))


def draws(logits: torch.Tensor, n: int, seed: int, **kw) -> torch.Tensor:
    """Empirical distribution of n draws of sample_next from one row of logits."""
    g = torch.Generator().manual_seed(seed)
    toks = sample_next(logits[None].expand(n, -1), generator=g, **kw)
    return torch.bincount(toks, minlength=logits.shape[-1]).double() / n


def test_top_p_keeps_smallest_prefix_reaching_p():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log()
    # 0.5 < 0.7 <= 0.5 + 0.3: tokens 0 and 1, renormalised to 0.625 / 0.375
    f = draws(logits, 20_000, seed=1, temperature=1.0, top_p=0.7)
    assert f[2] == 0 and f[3] == 0
    assert (f[:2] - torch.tensor([0.625, 0.375], dtype=torch.float64)).abs().max() < 0.02
    f = draws(logits, 5_000, seed=2, temperature=1.0, top_p=0.45)  # token 0 alone reaches 0.45
    assert f[0] == 1
    f = draws(logits, 20_000, seed=3, temperature=1.0, top_p=0.9)  # 0.8 < 0.9 <= 0.95: tokens 0, 1, 2
    assert f[3] == 0
    assert (f[:3] - p[:3].double() / 0.95).abs().max() < 0.02
    # order of the vocabulary does not matter
    perm = torch.tensor([2, 0, 3, 1])
    f = draws(logits[perm], 20_000, seed=4, temperature=1.0, top_p=0.7)
    assert f[0] == 0 and f[2] == 0
    assert abs(f[1] - 0.625) < 0.02 and abs(f[3] - 0.375) < 0.02


def test_sampling_distribution_matches_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g) * 1.5
    for temp in (1.0, 0.5):
        want = torch.exp(logits.double() / temp)
        want = want / want.sum()
        f = draws(logits, 20_000, seed=int(10 * temp), temperature=temp)
        assert (f - want).abs().max() < 0.02, (f, want)
    # top_k=3 renormalises over the three largest logits
    top = logits.topk(3).indices
    want = torch.zeros(8, dtype=torch.float64)
    want[top] = torch.exp(logits[top].double())
    want /= want.sum()
    f = draws(logits, 20_000, seed=7, temperature=1.0, top_k=3)
    assert f[want == 0].sum() == 0
    assert (f - want).abs().max() < 0.02


# ------------------------------------------------------------------------------------------ errors
def test_input_errors():
    model = make_model("tiny-v3", max_position_embeddings=16)
    V = model.cfg.vocab_size
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [], 2)
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {V}\).*\[{V}\]"):
        generate(model, [[1, V]], 2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[-1, 3]], 2)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        generate(model, [[1] * 10], 7)
    assert len(generate(model, [[1] * 10], 6)[0]) == 6  # exactly 16 positions is fine
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=16"):
        KVCache.allocate(model.cfg, 1, 17)
    KVCache.allocate(model.cfg, 1, 16)
    with pytest.raises(ValueError, match="mla_impl"):
        KVCache.allocate(model.cfg, 1, 4, mla_impl="fast")
    cache = KVCache.allocate(model.cfg, 1, 4)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="labels and cache"):
        model(ids, labels=ids, cache=cache)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_generate_preset(capsys):
    assert cli_main(["generate", "tiny-v3", "--prompt", "def ", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ")
    assert cli_main(["generate", "tiny-v3", "--prompt", "def ", "--prompt", "x = ", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[0\] def ", out, re.MULTILINE) and re.search(r"^\[1\] x = ", out, re.MULTILINE)


def test_cli_bad_device_is_one_line(capsys):
    assert cli_main(["generate", "tiny-v3", "--prompt", "def ", "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "minids generate: --device gpu: not a device name; use cpu, cuda or cuda:N"


def test_cli_generate_checkpoint(tmp_path, capsys):
    model = make_model("tiny-v3", init=0.02)
    d = tmp_path / "ckpt"
    minids.save_pretrained(model, d)
    ByteTokenizer().save(d)
    tok = ByteTokenizer()
    prompt = "def f(x):"
    # expected text: the explicit argmax loop, stopping at (and hiding) the end-of-document token
    toks = argmax_loop(model, tok.encode(prompt), 6, stop=tok.eos_id)
    expected = prompt + tok.decode([t for t in toks if t != tok.eos_id])
    assert cli_main(["generate", str(d), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    cap = capsys.readouterr()
    assert "random weights" not in cap.err
    assert cap.out == expected + "\n"
    # a missing checkpoint/preset is a one-line error, not a traceback
    assert cli_main(["generate", str(tmp_path / "nope"), "--prompt", "a"]) == 2
