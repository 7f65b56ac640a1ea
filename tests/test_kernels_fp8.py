"""The Triton FP8 kernels (minids.kernels.fp8) against their references in minids.fp8, on fresh random inputs.

On a machine without CUDA they run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) with float32 inputs and small shapes; with CUDA the same tests run compiled on the GPU
with bf16 inputs. Quantization with ``exact=True`` must be bit-exact (same float32 operations, round-to-nearest-even
into FP8); the fast mode (``exact=False``, the default) must give the reference's scales bit for bit and values within
one FP8 step, nearly all identical. Outputs are written into NaN-poisoned buffers so that an element a kernel forgets
stays NaN.
"""

from __future__ import annotations

import pytest
import torch
from minids.kernels import HAVE_TRITON

import minids.fp8 as ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed (pip install triton)")

if HAVE_TRITON:
    import minids.kernels.fp8 as kfp8

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32  # the interpreter computes in numpy: float32 inputs
FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def rand(*shape, seed: int, spread: bool = True) -> torch.Tensor:
    """Normal values; with ``spread``, rows scaled over 1e-6 .. 1e3 so tiles meet the amax floor, subnormals and
    the format's maximum."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    if spread and x.dim() >= 2:
        x = x * torch.logspace(-6, 3, x.shape[-2])[:, None]
    return x.to(DEV, DT)


def poisoned(shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=DEV)
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        t.view(torch.uint8).fill_(0x7F)  # NaN in both formats
    else:
        t.fill_(float("nan"))
    return t


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


# ------------------------------------------------------------------ activation quantization, 1 x 128
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("M,K", [(1, 128), (7, 300), (127, 256), (4097, 130)])
def test_act_quant_bit_exact(M, K, fmt, ue8m0):
    x = rand(M, K, seed=M * 7 + K)
    nb = -(-K // 128)
    out = (poisoned((M, K), FP8[fmt]), poisoned((M, nb), torch.float32))
    q, s = kfp8.act_quant(x, fmt=fmt, ue8m0=ue8m0, out=out, exact=True)
    qr, sr = ref.act_quant(x, fmt=fmt, ue8m0=ue8m0)
    assert q.data_ptr() == out[0].data_ptr()
    assert torch.equal(s, sr)
    assert same_bits(q, qr)


def test_act_quant_leading_dims_and_saturation():
    x = rand(2, 3, 256, seed=1)
    x[0, 0, 5] = 1e30  # one huge element: its tile's scale follows it, the rest of the tile flushes toward 0
    q, s = kfp8.act_quant(x, exact=True)
    qr, sr = ref.act_quant(x)
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    assert torch.equal(s, sr) and same_bits(q, qr)
    assert q.float().abs().max() == 448


# ------------------------------------------------------------------ 128 x 1 (transposed) and both at once
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("M,K", [(1, 64), (127, 200), (300, 128), (256, 256)])
def test_act_quant_t_bit_exact(M, K, fmt):
    x = rand(M, K, seed=M + K).t().contiguous().t()  # a non-contiguous view is fine too
    out = (poisoned((K, M), FP8[fmt]), poisoned((K, -(-M // 128)), torch.float32))
    q, s = kfp8.act_quant_t(x, fmt=fmt, out=out, exact=True)
    qr, sr = ref.act_quant_t(x, fmt=fmt)
    assert torch.equal(s, sr) and same_bits(q, qr)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("M,K", [(7, 300), (257, 130), (256, 256)])
def test_act_quant_both_is_both(M, K, ue8m0):
    x = rand(M, K, seed=3 * M + K)
    out = (poisoned((M, K), torch.float8_e4m3fn), poisoned((M, -(-K // 128)), torch.float32),
           poisoned((K, M), torch.float8_e4m3fn), poisoned((K, -(-M // 128)), torch.float32))
    q, s, qt, st = kfp8.act_quant_both(x, ue8m0=ue8m0, out=out, exact=True)
    qr, sr = ref.act_quant(x, ue8m0=ue8m0)
    qtr, str_ = ref.act_quant_t(x, ue8m0=ue8m0)
    assert torch.equal(s, sr) and same_bits(q, qr)
    assert torch.equal(st, str_) and same_bits(qt, qtr)


def test_act_quant_t_dequantizes_on_load():
    """The Wgrad path re-quantizes the FP8 activations cached by the forward without a dequantized copy."""
    x = rand(200, 300, seed=5)
    xq, xs = ref.act_quant(x)
    q, s = kfp8.act_quant_t(xq, in_scale=xs, exact=True)
    qr, sr = ref.act_quant_t(xq, in_scale=xs)
    assert torch.equal(s, sr) and same_bits(q, qr)
    qr2, sr2 = ref.act_quant_t(ref.act_dequant(xq, xs))  # the reference's in_scale is exactly this
    assert torch.equal(sr, sr2) and same_bits(qr, qr2)
    with pytest.raises(ValueError, match=r"in_scale has shape \(200, 2\), expected \(200, 3\)"):
        kfp8.act_quant_t(xq, in_scale=xs[:, :2])


# ------------------------------------------------------------------ weights, 128 x 128
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("O,I", [(1, 1), (130, 257), (256, 128)])
def test_weight_quant_and_transpose_bit_exact(O, I, fmt, ue8m0):
    w = rand(O, I, seed=O * 3 + I)
    bo, bi = -(-O // 128), -(-I // 128)
    out = (poisoned((O, I), FP8[fmt]), poisoned((bo, bi), torch.float32), poisoned((I, O), FP8[fmt]))
    q, s, qt = kfp8.weight_quant(w, fmt=fmt, ue8m0=ue8m0, transposed=True, out=out, exact=True)
    qr, sr, qtr = ref.weight_quant(w, fmt=fmt, ue8m0=ue8m0, transposed=True)
    assert torch.equal(s, sr) and same_bits(q, qr) and same_bits(qt, qtr)
    assert same_bits(qtr, qr.t().contiguous())


@pytest.mark.parametrize("O,I", [(5, 3), (130, 257)])
def test_weight_dequant_matches(O, I):
    q, s = ref.weight_quant(rand(O, I, seed=9))
    for dtype in (torch.float32, torch.bfloat16):
        got = kfp8.weight_dequant(q, s, dtype=dtype, out=poisoned((O, I), dtype))
        want = ref.weight_dequant(q, s, dtype=dtype)
        if dtype == torch.bfloat16 and DEV == "cpu":
            # Triton's interpreter truncates float32 -> bf16 (the GPU rounds to nearest even): one bf16 ulp
            torch.testing.assert_close(got, want, rtol=2.0**-7, atol=0)
        else:
            assert torch.equal(got, want)
    with pytest.raises(ValueError, match="scale_inv has shape"):
        kfp8.weight_dequant(q, s[:, :1] if s.shape[1] > 1 else s[:0], dtype=torch.float32)


# ------------------------------------------------------------------ the fast mode (exact=False)
# x * (1/s) in float32 and the native FP8 conversion (the interpreter rounds in software, its conversion being wrong):
# the scales are the reference's, a value can land one FP8 step away where x * (1/s) and the correctly rounded x / s
# straddle a rounding boundary. bf16-valued inputs meet such ties (about 5e-4 of the elements); float32 ones hardly.
MBITS_EMIN = {"e4m3": (3, -6), "e5m2": (2, -14)}


def fp8_step(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """The FP8 grid's spacing at magnitude v (float32): 2^(floor(log2 v) - mantissa bits), the subnormal step below
    the smallest normal."""
    mbits, emin = MBITS_EMIN[fmt]
    _, e = torch.frexp(v.abs().clamp(min=2.0**emin))  # v = m 2^e, 0.5 <= m < 1
    return torch.ldexp(torch.ones_like(v), e - 1 - mbits)


def assert_within_one_step(q: torch.Tensor, qr: torch.Tensor, fmt: str, exact_if: bool = False):
    """q (fast) against qr (reference), same scales: every value written, at most one FP8 step apart (the step of the
    smaller magnitude), at most 1% differing; bit-exact when ``exact_if`` (UE8M0 scales: 1/s is exact)."""
    assert q.shape == qr.shape
    a, b = q.float(), qr.float()
    assert not a.isnan().any()
    if exact_if:
        assert same_bits(q, qr)
        return
    step = fp8_step(torch.minimum(a.abs(), b.abs()), fmt)
    assert ((a - b).abs() <= step).all(), f"max |diff| / step {((a - b).abs() / step).max():.2f}"
    assert (a != b).float().mean() <= 0.01


def rand_bf16(*shape, seed: int) -> torch.Tensor:
    return rand(*shape, seed=seed).to(torch.bfloat16).to(DT)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_scale_of_every_mantissa(fmt):
    """The kernels' scale (amax / FMAX by one multiply and two fmas, not a division) equals the reference's float64
    quotient rounded to float32 for every float32 mantissa (all 2^23 in [1, 2)), in binades from the amax floor to
    2^100, and below the floor; UE8M0 rounds it up to the same power of two."""
    _, fmax = ref._FORMATS[fmt]
    ones = (torch.arange(1 << 23, dtype=torch.int32) | 0x3F800000).view(torch.float32)  # every mantissa in [1, 2)
    for e in (-13, 0, 100):
        a = torch.ldexp(ones, torch.tensor(e))
        got = kfp8.scale_of(a.to(DEV), fmax).cpu()
        assert torch.equal(got, ref._scale(a, fmax, False)), f"2^{e}: {(got != ref._scale(a, fmax, False)).sum()}"
    a = torch.cat([ones[::4099] * 2.0**-15, torch.tensor([0.0, 1e-4, 3e-38, 2.0**-149])])  # under the floor, edges
    for ue8m0 in (False, True):
        assert torch.equal(kfp8.scale_of(a.to(DEV), fmax, ue8m0).cpu(), ref._scale(a, fmax, ue8m0))
    with pytest.raises(ValueError, match="fmax=100"):
        kfp8.scale_of(a, 100.0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("M,K", [(1, 128), (7, 300), (127, 256), (4097, 130)])
def test_act_quant_fast(M, K, fmt, ue8m0):
    x = rand_bf16(M, K, seed=M * 5 + K)
    out = (poisoned((M, K), FP8[fmt]), poisoned((M, -(-K // 128)), torch.float32))
    q, s = kfp8.act_quant(x, fmt=fmt, ue8m0=ue8m0, out=out, exact=False)
    qr, sr = ref.act_quant(x, fmt=fmt, ue8m0=ue8m0)
    assert torch.equal(s, sr)
    assert_within_one_step(q, qr, fmt, exact_if=ue8m0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("M,K", [(1, 64), (127, 200), (300, 128), (129, 520), (256, 256)])
def test_act_quant_t_fast(M, K, fmt):
    x = rand_bf16(M, K, seed=2 * M + K).t().contiguous().t()
    out = (poisoned((K, M), FP8[fmt]), poisoned((K, -(-M // 128)), torch.float32))
    q, s = kfp8.act_quant_t(x, fmt=fmt, out=out, exact=False)
    qr, sr = ref.act_quant_t(x, fmt=fmt)
    assert torch.equal(s, sr)
    assert_within_one_step(q, qr, fmt)


def test_act_quant_t_fast_dequantizes_on_load():
    x = rand(200, 300, seed=6)
    for in_block in (128, 32):  # one input scale per row of a tile, and several
        xq, xs = ref.act_quant(x, in_block)
        q, s = kfp8.act_quant_t(xq, in_scale=xs, in_block=in_block, exact=False)
        qr, sr = ref.act_quant_t(xq, in_scale=xs, in_block=in_block)
        assert torch.equal(s, sr)
        assert_within_one_step(q, qr, "e4m3")
        assert same_bits(kfp8.act_quant_t(xq, in_scale=xs, in_block=in_block, exact=True)[0], qr)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("M,K", [(7, 300), (257, 130), (130, 520), (256, 256)])
def test_act_quant_both_fast(M, K, ue8m0):
    x = rand_bf16(M, K, seed=3 * M + K + 1)
    out = (poisoned((M, K), torch.float8_e4m3fn), poisoned((M, -(-K // 128)), torch.float32),
           poisoned((K, M), torch.float8_e4m3fn), poisoned((K, -(-M // 128)), torch.float32))
    q, s, qt, st = kfp8.act_quant_both(x, ue8m0=ue8m0, out=out, exact=False)
    qr, sr = ref.act_quant(x, ue8m0=ue8m0)
    qtr, str_ = ref.act_quant_t(x, ue8m0=ue8m0)
    assert torch.equal(s, sr) and torch.equal(st, str_)
    assert_within_one_step(q, qr, "e4m3", exact_if=ue8m0)
    assert_within_one_step(qt, qtr, "e4m3", exact_if=ue8m0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("O,I", [(1, 1), (130, 257), (256, 128), (200, 520)])
def test_weight_quant_fast(O, I, fmt, ue8m0):
    w = rand_bf16(O, I, seed=O * 5 + I)
    bo, bi = -(-O // 128), -(-I // 128)
    out = (poisoned((O, I), FP8[fmt]), poisoned((bo, bi), torch.float32), poisoned((I, O), FP8[fmt]))
    q, s, qt = kfp8.weight_quant(w, fmt=fmt, ue8m0=ue8m0, transposed=True, out=out, exact=False)
    qr, sr = ref.weight_quant(w, fmt=fmt, ue8m0=ue8m0)
    assert torch.equal(s, sr)
    assert_within_one_step(q, qr, fmt, exact_if=ue8m0)
    assert same_bits(qt, q.t().contiguous())
    q2, s2 = kfp8.weight_quant(w, fmt=fmt, ue8m0=ue8m0, exact=False)  # without the transposed copy
    assert torch.equal(s2, sr) and same_bits(q2, q)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_wide_tiles(exact, monkeypatch):
    """Tiles of 256 features per program (bench/fp8.py --only tiles tries them; act_quant_both and weight_quant then
    hold two 128-wide groups as a 3-D tile), with tails in both dims."""
    for key in ("act_quant_t", "act_quant_t_fp8", "act_quant_both", "weight_quant"):
        monkeypatch.setitem(kfp8._TILES, key, {True: (256, 8, False), False: (256, 8, False)})
    x = rand_bf16(130, 520, seed=13)

    def check(q, qr):
        if exact:
            assert same_bits(q, qr)
        else:
            assert_within_one_step(q, qr, "e4m3")

    qr, sr = ref.act_quant(x)
    qtr, str_ = ref.act_quant_t(x)
    q, s, qt, st = kfp8.act_quant_both(x, exact=exact)
    assert torch.equal(s, sr) and torch.equal(st, str_)
    check(q, qr)
    check(qt, qtr)
    q, s = kfp8.act_quant_t(x, exact=exact)
    assert torch.equal(s, str_)
    check(q, qtr)
    xq, xs = ref.act_quant(x)
    q, s = kfp8.act_quant_t(xq, in_scale=xs, exact=exact)
    qr2, sr2 = ref.act_quant_t(xq, in_scale=xs)
    assert torch.equal(s, sr2)
    check(q, qr2)
    wr, wsr = ref.weight_quant(x)
    w, ws, wt = kfp8.weight_quant(x, transposed=True, exact=exact)
    assert torch.equal(ws, wsr) and same_bits(wt, w.t().contiguous())
    check(w, wr)


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("feats", [64, 128, 256])
def test_packed_transposes_equal_the_plain_ones(feats, exact, monkeypatch):
    """The transposed copies stored as 8-token words (``_pack_words``: the tile's rows loaded in a permuted token
    order, packed into int64 words) are bit for bit the byte-wise transposes' (and the references' in exact mode), for
    the four transposing kernels, with tails in both dims: 136 tokens (a partial word-aligned block), 200 features.
    Token counts not a multiple of 8 (130) take the byte-wise store."""
    def outputs(pack: bool, x, xq, xs):
        for key in ("act_quant_t", "act_quant_t_fp8", "act_quant_both", "weight_quant"):
            warps = kfp8._TILES[key][exact][1]
            monkeypatch.setitem(kfp8._TILES, key, {exact: (feats, warps, pack), not exact: (feats, warps, pack)})
        return (*kfp8.act_quant_t(x, exact=exact), *kfp8.act_quant_t(xq, in_scale=xs, exact=exact),
                *kfp8.act_quant_both(x, exact=exact), *kfp8.weight_quant(x, transposed=True, exact=exact))

    for M in (136, 130):
        x = rand_bf16(M, 200, seed=M)
        xq, xs = ref.act_quant(x)
        got, want = outputs(True, x, xq, xs), outputs(False, x, xq, xs)
        assert all(same_bits(g, w) if g.dtype in FP8.values() else torch.equal(g, w) for g, w in zip(got, want))
        if exact:
            assert same_bits(got[0], ref.act_quant_t(x)[0]) and same_bits(got[2], ref.act_quant_t(xq, in_scale=xs)[0])
            assert same_bits(got[6], ref.act_quant_t(x)[0])
        assert same_bits(got[10], got[8].t().contiguous())  # weight_quant's transposed copy is its q transposed
    # an output that does not start on an 8-byte boundary (a slice of a larger buffer) takes the byte-wise store
    x = rand_bf16(136, 200, seed=7)
    q_off = torch.empty(200 * 136 + 1, dtype=FP8["e4m3"], device=DEV)[1:].view(200, 136)
    q, _ = kfp8.act_quant_t(x, exact=exact, out=(q_off, torch.empty(200, 2, device=DEV)))
    assert q.data_ptr() == q_off.data_ptr() and same_bits(q, outputs(True, x, *ref.act_quant(x))[0])


@pytest.mark.parametrize("fmax", [448.0, 57344.0], ids=["e4m3", "e5m2"])
def test_float32_scale_division_equals_the_float64_one(fmax):
    """The kernels divide amax by FMAX in float32 (div.rn), the reference in float64 rounded to float32: the same
    value for every float32 amax >= 1e-4 (checked exhaustively once, see ``_scale_of``); here 2^22 of them drawn
    uniformly over the bit patterns, plus the floor, the largest finite value, and the formats' own values."""
    lo = torch.tensor(1e-4).view(torch.int32).item()
    hi = torch.tensor(torch.finfo(torch.float32).max).view(torch.int32).item()
    bits = torch.randint(lo, hi + 1, (1 << 22,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    a = torch.cat([bits.to(torch.int32).view(torch.float32), torch.tensor([1e-4, torch.finfo(torch.float32).max]),
                   torch.arange(1, 2**14, dtype=torch.float32)])
    f32 = a / torch.tensor(fmax)
    f64 = (a.double() / fmax).float()
    assert torch.equal(f32.view(torch.int32), f64.view(torch.int32))


def test_exact_default_follows_module_setting(monkeypatch):
    """exact=None takes kfp8.EXACT_QUANT (fast unless MINIDS_FP8_EXACT=1); the two modes do differ on bf16 inputs."""
    x = rand_bf16(512, 256, seed=11)
    qr, _ = ref.act_quant(x)
    fast, _ = kfp8.act_quant(x, exact=False)
    assert not same_bits(fast, qr)  # some ties, else this test proves nothing
    for setting, want in ((True, qr), (False, fast)):
        monkeypatch.setattr(kfp8, "EXACT_QUANT", setting)
        assert same_bits(kfp8.act_quant(x)[0], want)
        assert same_bits(kfp8.act_quant_both(x)[0], want)


# ------------------------------------------------------------------ the block-scaled GEMM
# The interpreter multiplies exact FP8 products in float32, so only the order of float32 additions differs from
# the reference (relative 1e-5). On the GPU the output is bf16 (rounding: up to 2^-9 of the largest |C|) and
# Hopper's FP8 tensor cores keep ~14 bits inside each 128-long K block (V3P 3.3.2; measured here 0.06% at
# K = 128 in scripts/fp8_accumulation.py): 2^-8 in all. The H200 run gave 2.0e-3 .. 3.0e-3.
TOL = 1e-5 if DEV == "cpu" else 2.0**-8


def gemm_operands(M: int, N: int, K: int, b_rows: bool, seed: int):
    a, a_s = ref.act_quant(rand(M, K, seed=seed, spread=False))
    b_hp = rand(N, K, seed=seed + 1, spread=False) * 0.05
    b, b_s = ref.act_quant(b_hp) if b_rows else ref.weight_quant(b_hp)
    return a, a_s, b, b_s


@pytest.mark.parametrize("b_rows", [False, True], ids=["weight-128x128", "wgrad-1x128"])
@pytest.mark.parametrize("M,N,K", [(1, 200, 128), (7, 64, 300), (127, 130, 256), (4097, 32, 128), (64, 256, 1024)])
def test_fp8_gemm_matches_reference(M, N, K, b_rows):
    a, a_s, b, b_s = gemm_operands(M, N, K, b_rows, seed=M + N + K)
    out_dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    c = kfp8.fp8_gemm(a, a_s, b, b_s, out_dtype, out=poisoned((M, N), out_dtype))
    cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert c.shape == (M, N) and not c.isnan().any()  # M tails masked, every element written
    err = (c.float() - cr).abs().max() / cr.abs().max()
    assert err <= TOL, f"max error {err:.2e} of max |C|"


def _ws_here() -> bool:
    if DEV != "cuda" or not HAVE_TRITON or torch.cuda.get_device_capability()[0] != 9:
        return False
    from minids.kernels import fp8_ws

    return fp8_ws.HAVE_GLUON


WS_SKIP = "the warp-specialized Gluon GEMM runs on sm_90 GPUs only (Gluon has no interpreter mode)"


@pytest.mark.skipif(not _ws_here(), reason=WS_SKIP)
@pytest.mark.parametrize("block_n,persistent,split", [(256, True, 1), (256, False, 1), (128, True, 1), (192, True, 1),
                                                      (128, True, 2), (192, True, 3), (256, False, 4)])
@pytest.mark.parametrize("M,N,K", [(1, 256, 128), (7, 2112, 384), (127, 136, 256), (129, 640, 1024),
                                   (4097, 384, 512), (300, 2112, 7168)])
def test_ws_gemm_matches_reference(M, N, K, block_n, persistent, split):
    """kernels/fp8_ws.py against the reference: M tails (TMA clips them), N = 2112 (eight 256-wide tiles and a
    64-wide remainder launch; eleven 192-wide tiles), N = 384 (a 128-wide remainder), 136 (one partial tile), K
    tails of 128; split K ranges (K = 128: one step, so one range; K = 384 in 4: three ranges of one step)."""
    from minids.kernels import fp8_ws

    a, a_s, b, b_s = gemm_operands(M, N, K, False, seed=M + N + K + block_n)
    c = fp8_ws.fp8_gemm_ws(a, a_s, b, b_s, out=poisoned((M, N), torch.bfloat16), block_n=block_n,
                           persistent=persistent, split=split)
    cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert not c.isnan().any()  # every element written, none past the edges read as garbage
    err = (c.float() - cr).abs().max() / cr.abs().max()
    assert err <= TOL, f"max error {err:.2e} of max |C|"


@pytest.mark.skipif(not _ws_here(), reason=WS_SKIP)
def test_ws_gemm_float32_output_and_per_k_scales():
    """Two K blocks and two 128-column weight blocks with very different scales, float32 C: each product is scaled
    by its own a_s[m, k] * b_s[n // 128, k]."""
    from minids.kernels import fp8_ws

    M, N, K = 130, 256, 256
    a = torch.ones(M, K, device=DEV).to(torch.float8_e4m3fn)
    b = torch.ones(N, K, device=DEV).to(torch.float8_e4m3fn)
    a_s = torch.tensor([[1.0, 1000.0]], device=DEV).expand(M, 2).contiguous()
    b_s = torch.tensor([[2.0, 0.5], [4.0, 0.25]], device=DEV)
    c = fp8_ws.fp8_gemm_ws(a, a_s, b, b_s, torch.float32)
    want = torch.empty(M, N, device=DEV)
    want[:, :128] = 128 * 2.0 + 128 * 1000.0 * 0.5
    want[:, 128:] = 128 * 4.0 + 128 * 1000.0 * 0.25
    assert torch.equal(c, want)


@pytest.mark.skipif(not _ws_here(), reason=WS_SKIP)
def test_fp8_gemm_routes_to_ws_where_it_wins():
    """fp8_gemm's "auto" takes the Gluon kernel at M > 256 and where its 128 x 256 tiles fill half the SMs, the
    Triton kernel elsewhere (M <= 64, few tiles, the Wgrad form); variant="ws" where it cannot run is an error."""
    def route(M, N, b_rows=False, variant="auto"):
        a, _, b, _ = gemm_operands(M, N, 256, b_rows, seed=3)
        return kfp8._use_ws(a, b, 1 if b_rows else 128, torch.empty(M, N, device=DEV, dtype=torch.bfloat16),
                            variant)

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert route(4096, 2112) and route(257, 256)
    assert route(128, 256 * sms) and not route(128, 2112) and not route(64, 256 * sms)
    assert not route(4096, 2112, b_rows=True)
    with pytest.raises(ValueError, match="sm_90"):
        route(4096, 2112, b_rows=True, variant="ws")


@pytest.mark.skipif(not _ws_here(), reason=WS_SKIP)
def test_fp8_linear_takes_ws_where_it_beats_cublas():
    """fp8_gemm_if_ws (the FP8 linear's first choice): the Gluon kernel's result at K <= 512 and M > 256, None
    (cuBLAS next) at larger K, at M <= 256, and for the Wgrad form."""
    a, a_s, b, b_s = gemm_operands(512, 384, 512, False, seed=5)
    c = kfp8.fp8_gemm_if_ws(a, a_s, b, b_s)
    assert c is not None and torch.equal(c, kfp8.fp8_gemm(a, a_s, b, b_s, variant="ws"))
    assert kfp8.fp8_gemm_if_ws(*gemm_operands(512, 384, 640, False, seed=5)) is None
    assert kfp8.fp8_gemm_if_ws(*gemm_operands(256, 384, 512, False, seed=5)) is None
    assert kfp8.fp8_gemm_if_ws(*gemm_operands(512, 384, 512, True, seed=5)) is None


def _tma_quant_here() -> bool:
    if DEV != "cuda" or not HAVE_TRITON or torch.cuda.get_device_capability()[0] != 9:
        return False
    from minids.kernels import fp8_tma_quant

    return fp8_tma_quant.HAVE_GLUON


TMA_QUANT_SKIP = "the TMA-pipelined Gluon quantization runs on sm_90 GPUs only (Gluon has no interpreter mode)"


def _gluon_matches_triton(module, flag: str, M: int, K: int, fmt: str, ue8m0: bool, monkeypatch) -> None:
    """act_quant_both, act_quant_t from bf16 and float32, and the FP8 requantization, each run with ``kfp8.<flag>``
    off (the Triton kernels) and on (the Gluon kernel of ``module``) into NaN-poisoned outputs: bit-identical, nothing
    left unwritten, and every call with the flag on went to ``module.quant_tiles``."""
    x = rand_bf16(M, K, seed=M + K + ue8m0)
    xq, xs = ref.act_quant(x, fmt=fmt)
    nbm, nbk = -(-M // 128), -(-K // 128)

    def outs():
        return (poisoned((M, K), FP8[fmt]), poisoned((M, nbk), torch.float32), poisoned((K, M), FP8[fmt]),
                poisoned((K, nbm), torch.float32))

    for other in ("REG_QUANT", "TMA_QUANT"):  # the Triton kernels unless ``flag`` sends the call to ``module``
        monkeypatch.setattr(kfp8, other, False)
    calls = []
    real = module.quant_tiles
    monkeypatch.setattr(module, "quant_tiles", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    kw = {"fmt": fmt, "ue8m0": ue8m0, "exact": False}
    for fn in (lambda: kfp8.act_quant_both(x, out=outs(), **kw),
               lambda: kfp8.act_quant_t(x, out=outs()[2:], **kw),
               lambda: kfp8.act_quant_t(x.float(), out=outs()[2:], **kw),
               lambda: kfp8.act_quant_t(xq, in_scale=xs, out=outs()[2:], **kw)):
        monkeypatch.setattr(kfp8, flag, False)
        want = fn()
        monkeypatch.setattr(kfp8, flag, True)
        got = fn()
        for w, g in zip(want, got):
            assert not g.float().isnan().any()
            assert (same_bits(g, w) if g.dtype in FP8.values() else torch.equal(g, w))
    assert len(calls) == 4  # each call above ran the Gluon kernel once


@pytest.mark.skipif(not _tma_quant_here(), reason=TMA_QUANT_SKIP)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("M,K", [(16, 128), (128, 128), (144, 208), (4112, 528), (256, 1024)])
def test_tma_quant_equals_the_triton_kernels(M, K, fmt, ue8m0, monkeypatch):
    """kernels/fp8_tma_quant.py gives the Triton kernels' outputs bit for bit (same arithmetic: the fast mode's
    _scale_of and _quantize): partial tiles in both dims (M = 144, 4112; K = 208, 528: TMA's zero fill and clipped
    stores)."""
    from minids.kernels import fp8_tma_quant

    _gluon_matches_triton(fp8_tma_quant, "TMA_QUANT", M, K, fmt, ue8m0, monkeypatch)


def _reg_quant_here() -> bool:
    if DEV != "cuda" or not HAVE_TRITON or torch.cuda.get_device_capability()[0] != 9:
        return False
    from minids.kernels import fp8_reg_quant

    return fp8_reg_quant.HAVE_GLUON


@pytest.mark.skipif(not _reg_quant_here(), reason="the register-layout Gluon quantization runs on sm_90 GPUs only "
                    "(Gluon has no interpreter mode)")
@pytest.mark.parametrize("fmt,ue8m0", [("e4m3", False), ("e5m2", False), ("e4m3", True)])
@pytest.mark.parametrize("M,K", [(7, 300), (128, 128), (144, 208), (4112, 528), (256, 1024), (130, 1000),
                                 (1000, 1000), (2048, 1024)])
def test_reg_quant_equals_the_triton_kernels(M, K, fmt, ue8m0, monkeypatch):
    """kernels/fp8_reg_quant.py gives the Triton kernels' outputs bit for bit (same arithmetic): partial tiles in both
    dims, rows that are not whole 8-byte words (M = 7, 130); the grouped tile orders (``ORDER``: 8 x 8 and 16 x 8
    tiles, partial ones at 1000) and the default order where the groups do not divide the grid."""
    from minids.kernels import fp8_reg_quant

    _gluon_matches_triton(fp8_reg_quant, "REG_QUANT", M, K, fmt, ue8m0, monkeypatch)


@pytest.mark.skipif(not _reg_quant_here(), reason="the register-layout Gluon quantization runs on sm_90 GPUs only "
                    "(Gluon has no interpreter mode)")
@pytest.mark.parametrize("fmt,ue8m0", [("e4m3", False), ("e5m2", False), ("e4m3", True)])
@pytest.mark.parametrize("O,I", [(1, 4), (130, 260), (256, 128), (4112, 528), (200, 520)])
def test_reg_quant_weight_equals_the_triton_kernel(O, I, fmt, ue8m0, monkeypatch):
    """weight_quant's transposed form on kernels/fp8_reg_quant.py gives the Triton kernel's q, scales and transposed
    copy bit for bit (the same arithmetic: the grid rounding in float32 bits), partial blocks included, into
    NaN-poisoned outputs. (On the H200 this failed at (1, 1) and (130, 257), rows the kernel no longer takes;
    the form stays off by default, kfp8.REG_QUANT_WEIGHT, until this passes there.)"""
    from minids.kernels import fp8_reg_quant

    w = rand_bf16(O, I, seed=O + 3 * I + ue8m0)
    bo, bi = -(-O // 128), -(-I // 128)
    calls = []
    real = fp8_reg_quant.quant_tiles
    monkeypatch.setattr(fp8_reg_quant, "quant_tiles", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    got = {}
    monkeypatch.setattr(kfp8, "REG_QUANT_WEIGHT", True)
    for on in (False, True):
        monkeypatch.setattr(kfp8, "REG_QUANT", on)
        out = (poisoned((O, I), FP8[fmt]), poisoned((bo, bi), torch.float32), poisoned((I, O), FP8[fmt]))
        got[on] = kfp8.weight_quant(w, fmt=fmt, ue8m0=ue8m0, transposed=True, out=out, exact=False)
    for want, g in zip(got[False], got[True]):
        assert not g.float().isnan().any()
        assert same_bits(g, want) if g.dtype in FP8.values() else torch.equal(g, want)
    assert same_bits(got[True][2], got[True][0].t().contiguous())
    assert len(calls) == 1


@pytest.mark.skipif(not _tma_quant_here(), reason=TMA_QUANT_SKIP)
def test_tma_quant_takes_only_calls_it_can(monkeypatch):
    """The Triton kernels keep the exact mode, unaligned rows (TMA: 16-byte rows of x and of both FP8 outputs),
    input scales in blocks other than 128, and other block sizes; every config of the sweep gives the same bits."""
    from minids.kernels import fp8_tma_quant

    monkeypatch.setattr(kfp8, "TMA_QUANT", True)  # off by default (slower than Triton on the H200: fp8_tma_quant.md)
    fast, exact = kfp8._flags("e4m3", False, False), kfp8._flags("e4m3", False, True)
    x = rand_bf16(256, 256, seed=1)
    qt = torch.empty(256, 256, dtype=torch.float8_e4m3fn, device=DEV)
    assert kfp8._tma_quant(x, 128, fast, (qt,)) and not kfp8._tma_quant(x, 128, exact, (qt,))
    assert not kfp8._tma_quant(x, 64, fast, (qt,)) and not kfp8._tma_quant(x, 128, fast, (qt,), in_block=32)
    x2 = rand_bf16(136, 256, seed=2)  # 136 tokens: qt's rows are 136 bytes
    assert not kfp8._tma_quant(x2, 128, fast, (torch.empty(256, 136, dtype=torch.float8_e4m3fn, device=DEV),))
    want = kfp8.act_quant_both(x, exact=False)
    for cfg in [(2, 4, 1, False), (4, 8, 1, True), (2, 8, 2, True)]:
        monkeypatch.setitem(fp8_tma_quant.CONFIG, 2, cfg)
        got = kfp8.act_quant_both(x, exact=False)
        assert all(same_bits(g, w) if g.dtype in FP8.values() else torch.equal(g, w) for g, w in zip(got, want))


def test_fp8_gemm_ws_variant_off_gpu_is_a_clear_error():
    if _ws_here():
        pytest.skip("this GPU runs the Gluon kernel")
    a, a_s, b, b_s = gemm_operands(8, 64, 256, False, seed=1)
    with pytest.raises(ValueError, match="variant 'ws' needs an sm_90 GPU"):
        kfp8.fp8_gemm(a, a_s, b, b_s, torch.float32, variant="ws")


def test_fp8_gemm_scales_are_applied_per_k_block():
    """Two K blocks with very different scales: a kernel that applied one scale per row (or per tile) would be
    off by the ratio; the result must equal the sum of the two separately scaled partial products."""
    M, N, K = 16, 32, 256
    a = torch.ones(M, K, device=DEV).to(torch.float8_e4m3fn)
    b = torch.ones(N, K, device=DEV).to(torch.float8_e4m3fn)
    a_s = torch.tensor([[1.0, 1000.0]], device=DEV).expand(M, 2).contiguous()
    b_s = torch.tensor([[2.0, 0.5]], device=DEV)  # one 128 x 128 block row
    c = kfp8.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert torch.equal(c, torch.full((M, N), 128 * 1.0 * 2.0 + 128 * 1000.0 * 0.5, device=DEV))


def test_fp8_gemm_bad_scales():
    a, a_s, b, b_s = gemm_operands(8, 64, 256, False, seed=1)
    with pytest.raises(ValueError, match="b_s has shape"):
        kfp8.fp8_gemm(a, a_s, b, b_s[:, :1])
    with pytest.raises(ValueError, match="a_s has shape"):
        kfp8.fp8_gemm(a, a_s[:4], b, b_s)


# ------------------------------------------------------------------ small M: the heuristic's tiles and split-K
DEEPGEMM_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def test_m_buckets_separate_64_and_128():
    assert [kfp8._m_bucket(m) for m in (1, 16, 17, 64, 65, 128, 129, 4096, 10**5)] == \
        [16, 16, 32, 64, 128, 128, 256, 4096, 8192]


@pytest.mark.parametrize("M", [1, 64, 100, 128, 200, 4096])
def test_gemm_plan(M):
    """M <= 64: 64-row tiles; 65..128: one 128-row tile, a fixed config (TMA for 128-wide tiles); a split keeps >= 512
    of K per CTA, none empty, and never grows the grid past two waves of 132 SMs (one for the 128-row tiles of M <=
    128); the autotuned plans' tile shape, warps and stages are among the autotuner's configs."""
    tuned = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kfp8._gemm_configs()}
    for N, K in DEEPGEMM_NK:
        nk = -(-K // 128)
        cfg, split = kfp8._gemm_plan(kfp8._m_bucket(M), N, nk, 132)
        fixed = 64 < M <= 128
        assert ("TMA" in cfg) == fixed
        if fixed:
            assert (cfg["BLOCK_M"], cfg["num_warps"]) == (128, 8)
            assert cfg["TMA"] == (cfg["BLOCK_N"] == 128) and cfg["num_stages"] == (4 if cfg["TMA"] else 3)
        else:
            assert (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["num_warps"], cfg["num_stages"]) in tuned
            assert cfg["BLOCK_M"] == (64 if M <= 64 else 128)
        assert 1 <= split <= 8
        if split > 1:
            per = -(-nk // split)
            assert per >= 4 and -(-nk // per) == split
            assert -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"]) * split <= (1 if fixed else 2) * 132
        if M > 256:
            assert split == 1


def test_gemm_plan_at_m128_picks_what_ran_fastest():
    """At M = 128 the plan picks, on DeepGEMM's shapes, the configs that ran within 5% of the fastest of all tried on
    the H200 (bench/results/fp8_gemm_plans.md, ninth session: 64/128 rows, 64/128 wide, TMA or not, 1-8 splits)."""
    measured = {(2112, 7168): (64, 4), (24576, 1536): (128, 1), (32768, 512): (128, 1), (7168, 16384): (128, 2),
                (4096, 7168): (128, 4), (7168, 2048): (64, 1)}  # (BLOCK_N, split)
    for (N, K), want in measured.items():
        cfg, split = kfp8._gemm_plan(128, N, -(-K // 128), 132)
        assert (cfg["BLOCK_N"], split) == want, (N, K)


def test_autotuner_keeps_the_planned_tile_for_small_m(monkeypatch):
    # the prune hook gets the kernel's arguments by name (a GPU-only path, the tests run without autotuning): they are
    # built here from the kernel's own argument names, so a renamed argument fails on the CPU too
    monkeypatch.setattr(kfp8, "_sm_count", lambda index: 132)
    names = kfp8._fp8_gemm_kernel.arg_names

    def prune(m, N, K):
        named = dict.fromkeys(names, 0)  # reading any other key raises KeyError
        named[names[0]] = torch.empty(0)  # the A operand
        named.update({k: v for k, v in {"M_BUCKET": m, "N": N, "K": K}.items() if k in named})
        return kfp8._prune(kfp8._gemm_configs(), named)

    for m in (64, 128, 256):
        for N, K in DEEPGEMM_NK:
            cfg, _ = kfp8._gemm_plan(m, N, -(-K // 128), 132)
            kept = prune(m, N, K)
            assert kept and {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == \
                {(cfg["BLOCK_M"], cfg["BLOCK_N"])}
    kept = prune(4096, 4096, 4096)
    assert kept and all(c.kwargs["BLOCK_M"] >= 128 for c in kept)


@pytest.mark.parametrize("b_rows", [False, True], ids=["weight-128x128", "wgrad-1x128"])
@pytest.mark.parametrize("BLOCK_N", [64, 128])
@pytest.mark.parametrize("rows,K", [(64, 1000), (128, 1000), (128, 1024)])
def test_fp8_gemm_small_m_tiles_and_splits(rows, K, BLOCK_N, b_rows):
    """The small-M configs (64-row tiles; one 128-row tile of 8 warps as planned for M in 65..128, through TMA where
    128 wide: K = 1024 gives the 16-byte-aligned rows TMA needs, K = 1000 takes the pointer fallback) with split-K, M
    and K tails included (K = 1000: 8 steps split 3, 3, 2)."""
    M, N = 100, 200
    a, a_s, b, b_s = gemm_operands(M, N, K, b_rows, seed=N + BLOCK_N)
    cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    out_dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    cfg = {"BLOCK_M": 64, "BLOCK_N": BLOCK_N, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
    if rows == 128:
        cfg.update(BLOCK_M=128, num_warps=8, TMA=BLOCK_N == 128, num_stages=4 if BLOCK_N == 128 else 3)
    for split in (1, 3):
        c = kfp8._gemm_run(a, a_s.float().contiguous(), b, b_s.float().contiguous(), poisoned((M, N), out_dtype),
                           1 if b_rows else 128, cfg, split, tuned=False)
        assert not c.isnan().any()
        err = (c.float() - cr).abs().max() / cr.abs().max()
        assert err <= TOL, f"split {split}: max error {err:.2e} of max |C|"


# ------------------------------------------------------------------ the FP8 linear on the kernels
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("M,K,N", [(50, 200, 150), (130, 256, 128)])
def test_fp8_linear_real_on_kernels_equals_simulation(M, K, N, exact, monkeypatch):
    """fp8 'real' (the three GEMMs on the Triton kernels) gives the simulation's values: same quantized operands,
    float32 accumulation; only the order of additions (and on the GPU the tensor cores' accumulator) differ. The FP8
    linear quantizes in the kernels' default mode (EXACT_QUANT); the fast mode's one-step differences in rare elements
    leave the GPU's tolerance."""
    monkeypatch.setattr(kfp8, "EXACT_QUANT", exact)
    x = rand(3, M, K, seed=M, spread=False).float().requires_grad_()
    w = (rand(N, K, seed=K, spread=False).float() * 0.05).requires_grad_()
    dy = rand(3, M, N, seed=N, spread=False).float()
    results = []
    for kw in ({}, {"real": True, "use_kernels": True}):
        x.grad = w.grad = None
        y = ref.fp8_linear(x, w, **kw)
        y.backward(dy)
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    # exact: float32 addition order (and on the GPU the tensor cores' accumulation); fast: also the rare elements one
    # FP8 step off (a step is 2^-4..2^-3 of the element), measured up to 1.2e-2 of max |y| on the H200
    tol = (1e-5 if DEV == "cpu" else 2.0**-8) if exact else 2.0**-5
    for name, got, want in zip(("y", "dx", "dw"), results[1], results[0]):
        err = (got - want).abs().max() / want.abs().max()
        assert err <= tol, f"{name}: {err:.2e}"


def cublas_or_skip(form: str = "weight", out_dtype: torch.dtype = torch.bfloat16):
    if not kfp8._cublas_device_ok(torch.cuda.current_device(), form, out_dtype):
        pytest.skip(f"this torch / GPU has no block-wise torch._scaled_mm of the {form} form with {out_dtype} output "
                    f"(the FP8 linear then runs the Triton GEMM): "
                    f"{kfp8.CUBLAS_PROBE[(torch.cuda.current_device(), form, out_dtype)]}")


def cublas_key(form: str, out_dtype: torch.dtype, M: int, N: int, K: int) -> tuple:
    return (torch.cuda.current_device(), form, out_dtype, kfp8._m_bucket(M), N, K)


# (M, N, K) and whether cuBLAS takes the shape: M a multiple of 4 (torch 2.11 refused M = 1 and 127); K = 256 and
# 2112 are zero-padded to a multiple of 512 (unpadded, torch 2.11 computed wrong products at K = 256, 384, 128, 2112
# on the H200)
CUBLAS_SHAPES = [(1, 256, 512, False), (127, 2112, 512, False), (64, 256, 256, True), (300, 384, 1024, True),
                 (512, 2112, 7168, True), (256, 7168, 2048, True), (512, 7168, 2112, True)]


def cublas_operands(M: int, N: int, K: int, form: str, seed: int):
    """The weight form as Fprop gets it (act_quant's row-major scales, 128x128 blocks of b); the act form as Wgrad gets
    it (both operands quantized along their K by act_quant_t, M-major scales)."""
    if form == "weight":
        a, a_s = kfp8.act_quant(rand(M, K, seed=seed, spread=False).bfloat16())
        b, b_s = kfp8.weight_quant((rand(N, K, seed=seed + 1, spread=False) * 0.05).bfloat16())
    else:
        a, a_s = kfp8.act_quant_t(rand(K, M, seed=seed, spread=False).bfloat16())
        b, b_s = kfp8.act_quant_t((rand(K, N, seed=seed + 1, spread=False) * 0.05).bfloat16())
    return a, a_s, b, b_s


@pytest.mark.parametrize("K", [256, 2112, 520, 1030])
@pytest.mark.parametrize("form", ["weight", "act"])
def test_cublas_padding_keeps_the_product(form, K):
    """The zero padding along K that cuBLAS gets (``_pad_k``: K to a multiple of 512, scales padded with ones, activation
    scales M-major) leaves the block-scaled product as it was: the reference gives the same result on both."""
    M, N = 64, 160
    g = torch.Generator().manual_seed(K)
    x, y = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    if form == "weight":
        (a, a_s), (b, b_s) = ref.act_quant(x), ref.weight_quant(y)
    else:
        (a, a_s), (b, b_s) = ref.act_quant_t(x.t().contiguous()), ref.act_quant_t(y.t().contiguous())
    ap, aps, bp, bps = kfp8._pad_k(a, a_s, b, b_s, form)
    assert ap.shape[1] % 512 == 0 and aps.stride() == (1, M) and same_bits(ap[:, :K], a) and not ap[:, K:].float().any()
    assert torch.equal(ref.fp8_gemm(ap, aps, bp, bps, torch.float32), ref.fp8_gemm(a, a_s, b, b_s, torch.float32))


@pytest.mark.skipif(DEV != "cuda", reason="block-scaled cuBLAS (torch._scaled_mm) runs on CUDA only")
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("form", ["weight", "act"])
@pytest.mark.parametrize("M,N,K,runs", CUBLAS_SHAPES)
def test_cublas_fp8_gemm_matches_reference(M, N, K, runs, form, out_dtype, monkeypatch):
    """Both forms of the GEMM on block-scaled cuBLAS give the reference's result (fresh inputs, M tails, a partial
    128-row weight block at N = 2112) on the shapes they take, for the first M of a bucket (checked against the Triton
    GEMM) and another one; they decline, with None, the shapes they cannot take."""
    cublas_or_skip(form, out_dtype)
    monkeypatch.setattr(kfp8, "_CUBLAS_CHECKED", {})
    for m in (M, M - 4 if M > 4 else M):  # the first call decides the (M bucket, N, K); the second runs on it
        a, a_s, b, b_s = cublas_operands(m, N, K, form, seed=m + N + K)
        c = kfp8.cublas_fp8_gemm(a, a_s, b, b_s, out_dtype)
        assert (c is not None) == runs
        if runs:
            cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
            assert c.shape == (m, N) and c.dtype == out_dtype
            assert (c.float() - cr).abs().max() / cr.abs().max() <= TOL
    if runs:
        assert kfp8._CUBLAS_CHECKED[cublas_key(form, out_dtype, M, N, K)] is True
    a2, a2_s, b2, b2_s = cublas_operands(M, N, K + 16, form, seed=1)  # K not a multiple of 128: padded as well
    c2 = kfp8.cublas_fp8_gemm(a2, a2_s, b2, b2_s, out_dtype)
    assert (c2 is not None) == runs
    if runs:
        cr = ref.fp8_gemm(a2, a2_s, b2, b2_s, torch.float32)
        assert (c2.float() - cr).abs().max() / cr.abs().max() <= TOL
    assert kfp8.cublas_fp8_gemm(a[:0], a_s[:0], b, b_s, out_dtype) is None  # no rows
    assert kfp8.cublas_fp8_gemm(a, a_s, b, b_s, torch.float16) is None  # an output dtype it does not take


@pytest.mark.skipif(DEV != "cuda", reason="block-scaled cuBLAS (torch._scaled_mm) runs on CUDA only")
def test_cublas_fp8_gemm_zero_first_product_decides_nothing(monkeypatch):
    """A first product of zeros (it would match any product) does not settle the shape: the next call checks again."""
    cublas_or_skip()
    monkeypatch.setattr(kfp8, "_CUBLAS_CHECKED", {})
    M, N, K = 256, 384, 1024
    a, a_s, b, b_s = gemm_operands(M, N, K, False, seed=3)
    zero = torch.zeros_like(a)
    c = kfp8.cublas_fp8_gemm(zero, a_s, b, b_s)
    assert c is not None and not c.any() and not kfp8._CUBLAS_CHECKED
    kfp8.cublas_fp8_gemm(a, a_s, b, b_s)
    assert kfp8._CUBLAS_CHECKED == {cublas_key("weight", torch.bfloat16, M, N, K): True}


@pytest.mark.skipif(DEV != "cuda", reason="block-scaled cuBLAS (torch._scaled_mm) runs on CUDA only")
def test_fp8_linear_real_same_on_cublas_and_triton(monkeypatch):
    """fp8 'real' with its GEMMs on block-scaled cuBLAS where it runs (LINEAR_GEMM "auto") gives the all-Triton values
    and gradients up to the order of float32 additions. The second layer: 254 tokens (not a multiple of 4) keep its
    Fprop and Dgrad on the Triton GEMM; its Wgrad runs on cuBLAS with the 254 tokens (its K) zero-padded to 512."""
    cublas_or_skip()
    cublas_or_skip("act")
    ran, ws = [], []
    cublas, if_ws = kfp8.cublas_fp8_gemm, kfp8.fp8_gemm_if_ws
    monkeypatch.setattr(kfp8, "cublas_fp8_gemm", lambda *a: ran.append(cublas(*a)) or ran[-1])
    monkeypatch.setattr(kfp8, "fp8_gemm_if_ws", lambda *a: ws.append(if_ws(*a)) or ws[-1])
    for M, K, N in [(512, 1024, 512), (254, 2112, 256)]:
        x = rand(M, K, seed=M, spread=False).bfloat16().requires_grad_()
        w = (rand(N, K, seed=K, spread=False) * 0.05).bfloat16().requires_grad_()
        dy = rand(M, N, seed=N, spread=False).bfloat16()
        results = []
        for mode in ("triton", "auto"):
            monkeypatch.setattr(ref, "LINEAR_GEMM", mode)
            x.grad = w.grad = None
            y = ref.fp8_linear(x, w, real=True)
            y.backward(dy)
            results.append((y.detach().float(), x.grad.float(), w.grad.float()))
        for name, got, want in zip(("y", "dx", "dw"), results[1], results[0]):
            assert (got - want).abs().max() / want.abs().max() <= TOL, name
    # Fprop, Dgrad, Wgrad per layer: the first layer's Dgrad (K = 512 at 512 tokens) on the Gluon kernel
    assert [c is not None for c in ws] == [False, _ws_here(), False, False, False, False]
    want = [True, True, True, False, False, True]
    if _ws_here():
        del want[1]  # that Dgrad never asked cuBLAS
    assert [c is not None for c in ran] == want


def test_wgrad_form_takes_64_row_tiles_on_the_gpu(monkeypatch):
    """The default variant rule outside the interpreter: the Wgrad form (1x128 scales of b) takes the 64-row tiles at
    every K above 256 rows, the weight form only where K <= 2048 (bench/results/fp8_gemm_sweep*.md)."""
    monkeypatch.setattr(kfp8, "INTERPRET", False)
    assert kfp8._auto_variant(4096, 4096, 1) == "m64" and kfp8._auto_variant(4096, 16384, 1) == "m64"
    assert kfp8._auto_variant(4096, 4096, 128) == "tma_s4" and kfp8._auto_variant(4096, 2048, 128) == "m64"
    assert kfp8._auto_variant(128, 4096, 1) == "base"


def test_fp8_linear_real_bf16_weight_gradient_is_the_rounded_float32_one():
    """With bf16 master weights the Wgrad GEMM writes bf16 directly: the same float32 accumulation rounded once, so
    on the GPU exactly the float32 weight's gradient (same kernel, same operands) cast to bf16."""
    M, K, N = 130, 256, 128
    x = rand(M, K, seed=3, spread=False).float()
    w = rand(N, K, seed=4, spread=False).float() * 0.05
    dy = rand(M, N, seed=5, spread=False).float()
    grads = []
    for wdt in (torch.float32, torch.bfloat16):
        wl = w.bfloat16().to(wdt).requires_grad_()  # the same bf16-representable values in both dtypes
        ref.fp8_linear(x, wl, real=True, use_kernels=True).backward(dy)
        grads.append(wl.grad)
    assert grads[1].dtype == torch.bfloat16
    if DEV == "cuda":  # the GPU rounds float32 to bf16 to nearest, as torch's cast
        assert torch.equal(grads[1], grads[0].to(torch.bfloat16))
    else:  # the interpreter's bf16 stores truncate: one bf16 step (2^-7 relative) at most
        assert ((grads[1].float() - grads[0]).abs() <= grads[0].abs() * 2.0**-7).all()


# ------------------------------------------------------------------ the GEMM's variants (kfp8.GEMM_VARIANTS)
def token_block_major(s: torch.Tensor) -> torch.Tensor:
    """The same (rows, K/128) scales stored (K/128, rows): the layout act_quant_t writes (kfp8._scales_t)."""
    return s.float().t().contiguous().t()


@pytest.mark.parametrize("b_rows", [False, True], ids=["weight-128x128", "wgrad-1x128"])
@pytest.mark.parametrize("knobs", [
    {"TMA": True},
    {"SWAP_AB": True},
    {"SWAP_AB": True, "TMA": True},
], ids=lambda k: "-".join(f"{n}={v}" for n, v in k.items()))
def test_fp8_gemm_variant_knobs(knobs, b_rows):
    """Each knob of the kernel on small tiles (16-row M tiles, 64-wide N tiles): odd M, N not a multiple of the tile,
    K a multiple of 128 and K with a 16-wide tail (TMA zero-fills it), with and without split-K."""
    out_dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2, "num_warps": 4, "num_stages": 3, **knobs}
    for M, N, K, split in [(37, 200, 384, 1), (37, 200, 272, 2)]:
        a, a_s, b, b_s = gemm_operands(M, N, K, b_rows, seed=M + N + K)
        cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
        b_s = token_block_major(b_s) if b_rows else b_s.float().contiguous()  # b's 1x128 scales as act_quant_t writes
        c = kfp8._gemm_run(a, a_s.float().contiguous(), b, b_s, poisoned((M, N), out_dtype),
                           1 if b_rows else 128, cfg, split, tuned=False)
        assert not c.isnan().any()
        err = (c.float() - cr).abs().max() / cr.abs().max()
        assert err <= TOL, f"K={K} split {split}: max error {err:.2e} of max |C|"


@pytest.mark.parametrize("layout", ["row-major", "token-block-major"])
@pytest.mark.parametrize("b_rows", [False, True], ids=["weight-128x128", "wgrad-1x128"])
def test_fp8_gemm_reads_scales_of_any_layout(layout, b_rows, monkeypatch):
    """fp8_gemm reads a_s and b_s through both their strides: the transposed layouts (the 128x1 scales of
    act_quant_t, the W^T block scales as a view) give the reference's result without a copy (the launch gets the
    caller's scale tensors), at a small M and a large one (the variants' own tiles)."""
    seen = []
    gemm_run = kfp8._gemm_run
    monkeypatch.setattr(kfp8, "_gemm_run", lambda a, a_s, b, b_s, *rest, **kw: (
        seen.append((a_s.data_ptr(), b_s.data_ptr())) or gemm_run(a, a_s, b, b_s, *rest, **kw)))
    for M, N, K in [(70, 200, 384), (300, 136, 256)]:
        a, a_s, b, b_s = gemm_operands(M, N, K, b_rows, seed=11 + M)
        cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
        a_s, b_s = a_s.float(), b_s.float()
        if layout == "token-block-major":
            a_s, b_s = token_block_major(a_s), token_block_major(b_s)
            assert a_s.stride(0) == 1 and b_s.stride(0) == 1
        out_dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
        for variant in ("base", "tma_s4", "m64"):
            seen.clear()
            c = kfp8.fp8_gemm(a, a_s, b, b_s, out_dtype, out=poisoned((M, N), out_dtype), variant=variant)
            err = (c.float() - cr).abs().max() / cr.abs().max()
            assert not c.isnan().any() and err <= TOL, f"{variant}: max error {err:.2e} of max |C|"
            assert seen == [(a_s.data_ptr(), b_s.data_ptr())], f"{variant}: the scales were copied"


def test_activation_scales_layouts():
    """act_quant (and act_quant_both's first) write the 1x128 scales row-major, what the Fprop / Dgrad GEMM reads
    fastest; act_quant_t (and act_quant_both's second) write the 128x1 scales stored (blocks, rows), what the Wgrad
    GEMM reads fastest; with out= they go where the caller says (contiguous). Values as the references'."""
    x = rand(300, 136, seed=5)
    q, s = kfp8.act_quant(x)
    _, st = kfp8.act_quant_t(x)
    _, s2, _, st2 = kfp8.act_quant_both(x)
    _, s_ref = ref.act_quant(x)
    _, st_ref = ref.act_quant_t(x)
    for got, want in ((s, s_ref), (s2, s_ref)):
        assert got.is_contiguous() and torch.equal(got, want)
    for got, want in ((st, st_ref), (st2, st_ref)):
        assert got.shape == want.shape and got.stride() == (1, want.shape[0]) and torch.equal(got, want)
    _, s3 = kfp8.act_quant(x.view(3, 100, 136))  # leading dims
    assert s3.shape == (3, 100, 2) and torch.equal(s3.reshape(300, 2), s_ref)
    _, xt_s = kfp8.act_quant_t(q, in_scale=token_block_major(s))  # an M-major in_scale read through its strides
    assert torch.equal(xt_s, ref.act_quant_t(q, in_scale=s_ref)[1])
    for s_buf in (torch.empty(136, 3, device=DEV), torch.empty(3, 136, device=DEV).t()):  # row-major or M-major
        out = (torch.empty(136, 300, dtype=torch.float8_e4m3fn, device=DEV), s_buf)
        _, s_out = kfp8.act_quant_t(x, out=out)
        assert s_out.data_ptr() == s_buf.data_ptr() and torch.equal(s_out, st_ref)


@pytest.mark.parametrize("variant", sorted(kfp8.GEMM_VARIANTS) if HAVE_TRITON else [])
def test_fp8_gemm_named_variants(variant):
    """fp8_gemm(variant=...) with each named variant's own tiles, at a small M (the M <= 256 overrides) and a large one."""
    out_dtype = torch.float32 if DEV == "cpu" else torch.bfloat16
    for M, N, K in [(65, 200, 256), (300, 136, 384)]:
        a, a_s, b, b_s = gemm_operands(M, N, K, False, seed=M + N)
        cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
        c = kfp8.fp8_gemm(a, a_s, b, b_s, out_dtype, out=poisoned((M, N), out_dtype), variant=variant)
        assert not c.isnan().any()
        err = (c.float() - cr).abs().max() / cr.abs().max()
        assert err <= TOL, f"M={M}: max error {err:.2e} of max |C|"
    with pytest.raises(ValueError, match="unknown FP8 GEMM variant"):
        kfp8.fp8_gemm(a, a_s, b, b_s, variant="nope")



@pytest.mark.skipif(DEV != "cpu", reason="the interpreter's own path")
def test_variant_outside_its_range_runs_without_autotuning_in_the_interpreter(monkeypatch):
    # a variant that does not apply at this M falls back to the plan; with autotuning on (MINIDS_AUTOTUNE unset) the
    # interpreter must still not reach the autotuner, whose prune hook asks CUDA for the SM count
    monkeypatch.setattr(kfp8, "AUTOTUNE", True)
    a, a_s, b, b_s = gemm_operands(65, 200, 256, False, seed=3)
    c = kfp8.fp8_gemm(a, a_s, b, b_s, torch.float32, variant="m64")
    cr = ref.fp8_gemm(a, a_s, b, b_s, torch.float32)
    assert (c - cr).abs().max() / cr.abs().max() <= TOL
