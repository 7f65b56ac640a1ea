"""Attention: SDPA vs explicit-softmax reference, causality, MLA against a hand-written naive MLA
(REFERENCE.md 2.1-2.3), and GQA against explicitly expanded kv heads.

The references here are written from the equations in float64, from the layers' own weights.
"""

import math

import pytest
import torch

from minids.attention import MHA, MLA, attention, attention_ref
from minids.config import ModelConfig

TOL32 = dict(rtol=1e-5, atol=1e-5)  # fp32 vs fp32 / fp64: a few ulps of O(1) values


def small(name: str, **over) -> ModelConfig:
    return ModelConfig.from_dict({**ModelConfig.load(name).to_dict(), "num_hidden_layers": 2, **over})


def hand_cos_sin(S: int, R: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, S, R/2) for positions 0..S-1 with theta_i = base^(-2i/R), in float32."""
    theta = base ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)  # (R/2,)
    a = torch.arange(S, dtype=torch.float64)[:, None] * theta  # (S, R/2)
    return a.cos().float()[None], a.sin().float()[None]


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Give every parameter (norm weights included) random values, so a misplaced norm shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:  # RMSNorm weight: around 1, but not 1
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


# ---------------------------------------------------------------------------------------------- SDPA vs ref
@pytest.mark.parametrize("B,H,S,Dqk,Dv", [(2, 3, 16, 24, 16), (1, 2, 1, 8, 8), (2, 4, 37, 40, 24)])
def test_attention_matches_reference(B, H, S, Dqk, Dv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, S, Dqk, generator=g)
    k = torch.randn(B, H, S, Dqk, generator=g)
    v = torch.randn(B, H, S, Dv, generator=g)
    scale = Dqk**-0.5 * 1.3
    out, ref = attention(q, k, v, scale), attention_ref(q, k, v, scale)
    assert out.shape == ref.shape == (B, H, S, Dv)
    torch.testing.assert_close(out, ref, **TOL32)


def test_attention_ref_by_hand():
    # explicit float64 causal softmax, one head
    g = torch.Generator().manual_seed(1)
    S, D = 5, 6
    q, k, v = (torch.randn(1, 1, S, D, generator=g, dtype=torch.float64) for _ in range(3))
    want = torch.zeros(S, D, dtype=torch.float64)
    for s in range(S):
        logits = [(q[0, 0, s] @ k[0, 0, t]).item() * 0.5 for t in range(s + 1)]
        m = max(logits)
        w = [math.exp(x - m) for x in logits]
        for t in range(s + 1):
            want[s] += w[t] / sum(w) * v[0, 0, t]
    torch.testing.assert_close(attention_ref(q.float(), k.float(), v.float(), 0.5)[0, 0].double(), want, **TOL32)
    torch.testing.assert_close(attention(q, k, v, 0.5)[0, 0], want, rtol=1e-9, atol=1e-9)


def test_attention_is_causal():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    v = torch.randn(2, 2, 12, 4, generator=g)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 5
    v2[:, :, 7:] -= 3
    for fn in (attention, attention_ref):
        a, b = fn(q, k, v, 0.3), fn(q, k2, v2, 0.3)
        torch.testing.assert_close(a[:, :, :7], b[:, :, :7], rtol=0, atol=1e-6)
        assert not torch.allclose(a[:, :, 7:], b[:, :, 7:], atol=1e-3)


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v2", "tiny-moe", "tiny-dense"])
def test_layer_is_causal(name):
    torch.manual_seed(0)
    cfg = small(name)
    layer = (MLA if cfg.is_mla else MHA)(cfg)
    B, S, t0 = 2, 24, 13
    x = torch.randn(B, S, cfg.hidden_size)
    cos, sin = hand_cos_sin(S, cfg.rope_dim)
    x2 = x.clone()
    x2[:, t0:] = torch.randn(B, S - t0, cfg.hidden_size)
    with torch.no_grad():
        a, b = layer(x, cos, sin), layer(x2, cos, sin)
    torch.testing.assert_close(a[:, :t0], b[:, :t0], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t0:], b[:, t0:], atol=1e-4)


# ---------------------------------------------------------------------------------------------- MLA
def rms64(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w.double() * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rope_complex(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved RoPE as the official code writes it: pairs (x_2i, x_2i+1) are complex numbers.

    x: (B, S, ..., R) float64, cos/sin: (1, S, R/2)."""
    xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())  # (B, S, ..., R/2)
    rot = torch.complex(cos.double(), sin.double())  # (1, S, R/2)
    rot = rot.view(1, rot.shape[1], *([1] * (x.dim() - 3)), rot.shape[-1])
    return torch.view_as_real(xc * rot).flatten(-2)


def naive_mla(layer: MLA, cfg: ModelConfig, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """REFERENCE.md 2.1/2.2 in float64, one head at a time, from the layer's weights."""
    H, dn, dr, dv, C = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    eps = cfg.rms_norm_eps
    h = x.double()
    B, S, _ = h.shape
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    if cfg.q_lora_rank is None:
        q = h @ W["q_proj.weight"].T
    else:
        c_q = rms64(h @ W["q_a_proj.weight"].T, W["q_a_layernorm.weight"], eps)  # norm on the query latent
        q = c_q @ W["q_b_proj.weight"].T
    q = q.view(B, S, H, dn + dr)  # per head: first dn = q^C, last dr = q^R
    kv_a = h @ W["kv_a_proj_with_mqa.weight"].T  # (B, S, C + dr)
    c_kv = rms64(kv_a[..., :C], W["kv_a_layernorm.weight"], eps)  # norm only on the latent
    k_r = rope_complex(kv_a[..., C:], cos, sin)  # (B, S, dr): from h, before any norm; one per token
    kv = (c_kv @ W["kv_b_proj.weight"].T).view(B, S, H, dn + dv)
    scale = cfg.softmax_scale
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    outs = []
    for i in range(H):
        q_c, q_r = q[:, :, i, :dn], rope_complex(q[:, :, i, dn:], cos, sin)  # (B, S, dn), (B, S, dr)
        k_c, v = kv[:, :, i, :dn], kv[:, :, i, dn:]
        logits = (q_c @ k_c.transpose(1, 2) + q_r @ k_r.transpose(1, 2)) * scale  # (B, S, S)
        p = logits.masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append(p @ v)  # (B, S, dv)
    return torch.cat(outs, dim=-1) @ W["o_proj.weight"].T  # u = W^O [o_1; ...; o_H]


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v2"])
def test_mla_matches_naive_reference(name):
    cfg = small(name)
    assert (cfg.q_lora_rank is None) == (name == "tiny-v2")  # with and without the query latent
    layer = MLA(cfg)
    randomize_(layer, seed=3)
    g = torch.Generator().manual_seed(4)
    B, S = 2, 20
    x = torch.randn(B, S, cfg.hidden_size, generator=g)
    cos, sin = hand_cos_sin(S, cfg.qk_rope_head_dim)
    with torch.no_grad():
        out = layer(x, cos, sin)
    ref = naive_mla(layer, cfg, x, cos, sin)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_mla_softmax_scale_is_the_config_one():
    # tiny-v2: d_qk = 32 + 16 = 48, YaRN s = 4, mscale_all_dim 0.707 -> 48^-0.5 * (0.0707 ln 4 + 1)^2
    cfg = small("tiny-v2")
    want = 48**-0.5 * (0.1 * 0.707 * math.log(4.0) + 1) ** 2
    assert MLA(cfg).softmax_scale == pytest.approx(want, rel=1e-12)
    assert MLA(small("tiny-v3")).softmax_scale == pytest.approx(48**-0.5, rel=1e-12)


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_shape_and_dtype(name, dtype):
    torch.manual_seed(0)
    cfg = small(name)
    layer = MLA(cfg).to(dtype)
    B, S = 2, 16
    x = torch.randn(B, S, cfg.hidden_size, dtype=dtype)
    cos, sin = hand_cos_sin(S, cfg.qk_rope_head_dim)
    out = layer(x, cos, sin)
    assert out.shape == (B, S, cfg.hidden_size) and out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in layer.parameters())
    if dtype == torch.bfloat16:  # bf16 follows the fp32 result to bf16 precision
        ref = MLA(cfg)
        ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        with torch.no_grad():
            want = ref(x.float(), cos, sin)
        err = (out.detach().float() - want).norm() / want.norm()
        assert err < 3e-2


# ---------------------------------------------------------------------------------------------- MHA / GQA
def rotate_half64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama rotate-half RoPE in float64. x: (B, S, R); cos/sin: (1, S, R/2)."""
    c, s = torch.cat([cos, cos], -1).double(), torch.cat([sin, sin], -1).double()
    x1, x2 = x.chunk(2, -1)
    return x * c + torch.cat([-x2, x1], -1) * s


@pytest.mark.parametrize("n_kv", [4, 2, 1, 8])
def test_gqa_matches_explicit_kv_expansion(n_kv):
    cfg = small("tiny-dense", num_key_value_heads=n_kv)
    H, Dh = cfg.num_attention_heads, cfg.mha_head_dim
    layer = MHA(cfg)
    assert layer.k_proj.weight.shape == (n_kv * Dh, cfg.hidden_size)
    randomize_(layer, seed=5)
    g = torch.Generator().manual_seed(6)
    B, S = 2, 18
    x = torch.randn(B, S, cfg.hidden_size, generator=g)
    cos, sin = hand_cos_sin(S, Dh)
    with torch.no_grad():
        out = layer(x, cos, sin)
    W = {n: p.detach().double() for n, p in layer.named_parameters()}
    h = x.double()
    q = (h @ W["q_proj.weight"].T).view(B, S, H, Dh)
    k = (h @ W["k_proj.weight"].T).view(B, S, n_kv, Dh)
    v = (h @ W["v_proj.weight"].T).view(B, S, n_kv, Dh)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    outs = []
    group = H // n_kv
    for i in range(H):
        j = i // group  # query heads [j*group, (j+1)*group) share kv head j
        qi, kj = rotate_half64(q[:, :, i], cos, sin), rotate_half64(k[:, :, j], cos, sin)
        p = (qi @ kj.transpose(1, 2) / math.sqrt(Dh)).masked_fill(~causal, float("-inf")).softmax(-1)
        outs.append(p @ v[:, :, j])
    ref = torch.cat(outs, -1) @ W["o_proj.weight"].T
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
