"""RoPE and YaRN: frequencies, the ramp, both channel layouts, rotation properties (REFERENCE.md 2.3, 2.4, 7).

Expected numbers are the published ones (REFERENCE.md 7) or computed by hand here from the formulas of
REFERENCE.md 2.4 in float64.
"""

import math
import warnings

import pytest
import torch

from minids.config import ModelConfig, preset_names, yarn_mscale
from minids.rope import RotaryEmbedding, apply_rope, rope_inv_freq, yarn_correction_range

# DeepSeek-V3's rope: 64 rotated channels, base 1e4, original length 4096, s = 40, beta 32 / 1.
V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
           "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def base_freqs(dim: int, base: float) -> list[float]:
    """theta_i = base^(-2i/dim), i = 0..dim/2-1 (REFERENCE.md 2.4), in Python floats."""
    return [base ** (-2 * i / dim) for i in range(dim // 2)]


def angles(positions, freqs) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (1, S, R/2) for the given positions and per-pair frequencies, built by hand in float64."""
    a = torch.tensor([[p * f for f in freqs] for p in positions], dtype=torch.float64)  # (S, R/2)
    return a.cos().float().unsqueeze(0), a.sin().float().unsqueeze(0)


# ---------------------------------------------------------------------------------------------- YaRN ramp
def test_yarn_correction_range_v3():
    assert yarn_correction_range(64, 10000, 4096, 32, 1) == (10, 23)  # REFERENCE.md 2.4 / 7


def test_yarn_inv_freq_v3_ramp():
    got = rope_inv_freq(64, 10000.0, V3_YARN).double()
    theta = torch.tensor(base_freqs(64, 10000.0), dtype=torch.float64)
    assert got.shape == (32,)
    # indices 0..10 keep the base frequency, 23..31 are divided by s = 40
    torch.testing.assert_close(got[:11], theta[:11], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[23:], theta[23:] / 40, rtol=1e-6, atol=0)
    # one blended index by hand: ramp(15) = (15 - 10) / (23 - 10) = 5/13
    r = 5 / 13
    assert got[15].item() == pytest.approx(theta[15].item() / 40 * r + theta[15].item() * (1 - r), rel=1e-6)
    # the blend lies strictly between the two ends for 11..22, and is monotone in the ramp
    for i in range(11, 23):
        assert theta[i] / 40 < got[i] < theta[i]
        r = (i - 10) / 13
        assert got[i].item() == pytest.approx(theta[i].item() * (r / 40 + 1 - r), rel=1e-6)


def test_default_and_linear_frequencies():
    theta = torch.tensor(base_freqs(16, 10000.0), dtype=torch.float64)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0).double(), theta, rtol=1e-6, atol=0)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, None).double(), theta, rtol=1e-6, atol=0)
    lin = rope_inv_freq(16, 10000.0, {"type": "linear", "factor": 4.0}).double()
    torch.testing.assert_close(lin, theta / 4, rtol=1e-6, atol=0)
    lin = rope_inv_freq(16, 100000.0, {"rope_type": "linear", "factor": 2.0}).double()  # the rope_type spelling
    torch.testing.assert_close(lin, torch.tensor(base_freqs(16, 100000.0), dtype=torch.float64) / 2, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------- apply_rope
def half_from_interleaved(x: torch.Tensor) -> torch.Tensor:
    """Channel permutation interleaved -> half: pair (2i, 2i+1) becomes (i, i + R/2)."""
    R = x.shape[-1]
    perm = [2 * i for i in range(R // 2)] + [2 * i + 1 for i in range(R // 2)]
    return x[..., perm]


@pytest.mark.parametrize("R", [8, 16])
def test_interleaved_and_half_layouts_agree_after_permutation(R):
    g = torch.Generator().manual_seed(0)
    B, S, H = 2, 9, 3
    q = torch.randn(B, S, H, R, generator=g)
    k = torch.randn(B, S, H, R, generator=g)
    cos, sin = angles(range(S), base_freqs(R, 10000.0))
    qi, ki = apply_rope(q, cos, sin, interleave=True), apply_rope(k, cos, sin, interleave=True)
    qh = apply_rope(half_from_interleaved(q), cos, sin, interleave=False)
    kh = apply_rope(half_from_interleaved(k), cos, sin, interleave=False)
    # the same rotation: the rotated vectors are the same up to the channel permutation ...
    torch.testing.assert_close(qh, half_from_interleaved(qi), rtol=1e-6, atol=1e-6)
    # ... so every q.k dot product is the same (REFERENCE.md 2.4, 8.9)
    dots_i = torch.einsum("bshr,bthr->bhst", qi, ki)
    dots_h = torch.einsum("bshr,bthr->bhst", qh, kh)
    torch.testing.assert_close(dots_h, dots_i, rtol=1e-5, atol=1e-5)
    # and the two layouts really differ (otherwise this test would prove nothing)
    assert not torch.allclose(apply_rope(q, cos, sin, interleave=False), qi, atol=1e-3)


def test_interleaved_rotation_by_hand():
    # one pair (x0, x1) at angle a: (x0 cos a - x1 sin a, x0 sin a + x1 cos a); the other pair at angle 0 stays put
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    a = 0.3
    cos = torch.tensor([[[math.cos(a), 1.0]]])
    sin = torch.tensor([[[math.sin(a), 0.0]]])
    want = [1 * math.cos(a) - 2 * math.sin(a), 1 * math.sin(a) + 2 * math.cos(a), 3.0, 4.0]
    torch.testing.assert_close(apply_rope(x, cos, sin, True).flatten(), torch.tensor(want), rtol=1e-6, atol=1e-6)
    # half layout: pairs are (x0, x2) and (x1, x3)
    want = [1 * math.cos(a) - 3 * math.sin(a), 2.0, 1 * math.sin(a) + 3 * math.cos(a), 4.0]
    torch.testing.assert_close(apply_rope(x, cos, sin, False).flatten(), torch.tensor(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interleave", [True, False])
def test_rotation_preserves_norm_and_dtype(interleave):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 33, 4, 16, generator=g)
    cos, sin = angles(range(33), base_freqs(16, 10000.0))
    y = apply_rope(x, cos, sin, interleave)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)
    yb = apply_rope(x.bfloat16(), cos, sin, interleave)
    assert yb.dtype == torch.bfloat16


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("scaling", [None, V3_YARN, {"type": "linear", "factor": 4.0}])
def test_dot_product_depends_only_on_relative_position(interleave, scaling):
    g = torch.Generator().manual_seed(2)
    R = 64
    q = torch.randn(1, 1, 1, R, generator=g)
    k = torch.randn(1, 1, 1, R, generator=g)
    freqs = rope_inv_freq(R, 10000.0, scaling).double().tolist()

    def dot(m: int, n: int) -> float:
        cm, sm = angles([m], freqs)
        cn, sn = angles([n], freqs)
        return (apply_rope(q, cm, sm, interleave) * apply_rope(k, cn, sn, interleave)).sum().item()

    for delta in (0, 3, 17):
        ref = dot(delta, 0)
        for n in (1, 10, 250):
            assert dot(n + delta, n) == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert dot(5, 0) != pytest.approx(dot(0, 0), rel=1e-3)  # the rotation does something


# ---------------------------------------------------------------------------------------------- YaRN mscale
def test_yarn_mscale_values():
    # REFERENCE.md 2.3: m = 1.0 -> 1.368888 (V3), m = 0.707 -> 1.260804 (V2)
    assert yarn_mscale(40, 1.0) == pytest.approx(1.368888, abs=1e-6)
    assert yarn_mscale(40, 0.707) == pytest.approx(1.260804, abs=1e-6)
    assert yarn_mscale(40, 1.0) ** 2 == pytest.approx(1.873854, abs=1e-6)
    assert yarn_mscale(40, 0.707) ** 2 == pytest.approx(1.589626, abs=1e-6)
    assert yarn_mscale(1.0, 1.0) == 1.0


def test_rotary_scale_is_one_for_every_published_yarn_config():
    seen = 0
    for name in preset_names():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = ModelConfig.load(name)
        if cfg.rope_type != "yarn":
            continue
        seen += 1
        assert cfg.rope_scaling["mscale"] == cfg.rope_scaling["mscale_all_dim"], name
        rot = RotaryEmbedding(cfg)
        assert rot.scale == 1.0, name
        cos, sin = rot(torch.arange(4).unsqueeze(0))
        assert cos[0, 0].tolist() == [1.0] * (cfg.rope_dim // 2)  # position 0: cos = scale, sin = 0
        assert sin[0, 0].abs().max().item() == 0.0
    assert seen >= 5  # V2, V2-Lite, V2.5, V3, R1, ...


def test_rotary_scale_is_the_mscale_ratio_when_they_differ():
    d = {**ModelConfig.load("tiny-v2").to_dict(),
         "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 256, "beta_fast": 32,
                          "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}}
    rot = RotaryEmbedding(ModelConfig.from_dict(d))
    want = (0.1 * 1.0 * math.log(40) + 1) / (0.1 * 0.707 * math.log(40) + 1)  # 1.368888 / 1.260804
    assert rot.scale == pytest.approx(want, rel=1e-9)
    cos, _ = rot(torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, want), rtol=1e-6, atol=0)


def test_rotary_embedding_matches_hand_angles():
    cfg = ModelConfig.load("tiny-v3")  # MLA, R = 16, base 1e4, no scaling
    rot = RotaryEmbedding(cfg)
    assert rot.dim == 16 and rot.interleave is True
    pos = torch.arange(40).unsqueeze(0)
    cos, sin = rot(pos)
    assert cos.shape == (1, 40, 8) and cos.dtype == torch.float32
    want_cos, want_sin = angles(range(40), base_freqs(16, 10000.0))
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=2e-5)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=2e-5)


def test_v3_softmax_scale_with_yarn():
    # REFERENCE.md 2.3: 1/sqrt(192) = 0.0721688, times mscale^2 = 1.873854 -> 0.1352338
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = ModelConfig.load("deepseek-v3")
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_frequencies_stay_float32_when_the_model_is_cast(dtype):
    # a bf16 frequency (relative error 2^-9) times position ~1000 is off by a large fraction of a radian
    cfg = ModelConfig.load("tiny-v3")
    rot = RotaryEmbedding(cfg)
    want = rot.inv_freq.clone()
    rot.to(dtype)
    assert rot.inv_freq.dtype == torch.float32
    assert torch.equal(rot.inv_freq, want)
    cos, sin = rot(torch.arange(1000).unsqueeze(0))
    want_cos, want_sin = angles(range(1000), base_freqs(16, 10000.0))
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=2e-4)
    torch.testing.assert_close(sin, want_sin, rtol=0, atol=2e-4)
    rot.to("meta")
    assert rot.inv_freq.is_meta and rot.inv_freq.dtype == torch.float32
