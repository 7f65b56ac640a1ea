"""The Triton FP8 kernels (minids.kernels.fp8) against their references in minids.fp8, on fresh random inputs.

On a machine without CUDA they run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1) with float32 inputs and small shapes; with CUDA the same tests run compiled on the GPU
with bf16 inputs. Quantization must be bit-exact (same float32 operations, round-to-nearest-even into FP8).
Outputs are written into NaN-poisoned buffers so that an element a kernel forgets stays NaN.
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
    q, s = kfp8.act_quant(x, fmt=fmt, ue8m0=ue8m0, out=out)
    qr, sr = ref.act_quant(x, fmt=fmt, ue8m0=ue8m0)
    assert q.data_ptr() == out[0].data_ptr()
    assert torch.equal(s, sr)
    assert same_bits(q, qr)


def test_act_quant_leading_dims_and_saturation():
    x = rand(2, 3, 256, seed=1)
    x[0, 0, 5] = 1e30  # one huge element: its tile's scale follows it, the rest of the tile flushes toward 0
    q, s = kfp8.act_quant(x)
    qr, sr = ref.act_quant(x)
    assert q.shape == (2, 3, 256) and s.shape == (2, 3, 2)
    assert torch.equal(s, sr) and same_bits(q, qr)
    assert q.float().abs().max() == 448


# ------------------------------------------------------------------ 128 x 1 (transposed) and both at once
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("M,K", [(1, 64), (127, 200), (300, 128)])
def test_act_quant_t_bit_exact(M, K, fmt):
    x = rand(M, K, seed=M + K).t().contiguous().t()  # a non-contiguous view is fine too
    out = (poisoned((K, M), FP8[fmt]), poisoned((K, -(-M // 128)), torch.float32))
    q, s = kfp8.act_quant_t(x, fmt=fmt, out=out)
    qr, sr = ref.act_quant_t(x, fmt=fmt)
    assert torch.equal(s, sr) and same_bits(q, qr)


@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("M,K", [(7, 300), (257, 130)])
def test_act_quant_both_is_both(M, K, ue8m0):
    x = rand(M, K, seed=3 * M + K)
    out = (poisoned((M, K), torch.float8_e4m3fn), poisoned((M, -(-K // 128)), torch.float32),
           poisoned((K, M), torch.float8_e4m3fn), poisoned((K, -(-M // 128)), torch.float32))
    q, s, qt, st = kfp8.act_quant_both(x, ue8m0=ue8m0, out=out)
    qr, sr = ref.act_quant(x, ue8m0=ue8m0)
    qtr, str_ = ref.act_quant_t(x, ue8m0=ue8m0)
    assert torch.equal(s, sr) and same_bits(q, qr)
    assert torch.equal(st, str_) and same_bits(qt, qtr)


def test_act_quant_t_dequantizes_on_load():
    """The Wgrad path re-quantizes the FP8 activations cached by the forward without a dequantized copy."""
    x = rand(200, 300, seed=5)
    xq, xs = ref.act_quant(x)
    q, s = kfp8.act_quant_t(xq, in_scale=xs)
    qr, sr = ref.act_quant_t(xq, in_scale=xs)
    assert torch.equal(s, sr) and same_bits(q, qr)
    qr2, sr2 = ref.act_quant_t(ref.act_dequant(xq, xs))  # the reference's in_scale is exactly this
    assert torch.equal(sr, sr2) and same_bits(qr, qr2)


# ------------------------------------------------------------------ weights, 128 x 128
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("O,I", [(1, 1), (130, 257), (256, 128)])
def test_weight_quant_and_transpose_bit_exact(O, I, fmt, ue8m0):
    w = rand(O, I, seed=O * 3 + I)
    bo, bi = -(-O // 128), -(-I // 128)
    out = (poisoned((O, I), FP8[fmt]), poisoned((bo, bi), torch.float32), poisoned((I, O), FP8[fmt]))
    q, s, qt = kfp8.weight_quant(w, fmt=fmt, ue8m0=ue8m0, transposed=True, out=out)
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


# ------------------------------------------------------------------ the FP8 linear on the kernels
@pytest.mark.parametrize("M,K,N", [(50, 200, 150), (130, 256, 128)])
def test_fp8_linear_real_on_kernels_equals_simulation(M, K, N):
    """fp8 'real' (the three GEMMs on the Triton kernels) gives the simulation's values: same quantized operands,
    float32 accumulation; only the order of additions (and on the GPU the tensor cores' accumulator) differ."""
    x = rand(3, M, K, seed=M, spread=False).float().requires_grad_()
    w = (rand(N, K, seed=K, spread=False).float() * 0.05).requires_grad_()
    dy = rand(3, M, N, seed=N, spread=False).float()
    results = []
    for kw in ({}, {"real": True, "use_kernels": True}):
        x.grad = w.grad = None
        y = ref.fp8_linear(x, w, **kw)
        y.backward(dy)
        results.append((y.detach(), x.grad.clone(), w.grad.clone()))
    tol = 1e-5 if DEV == "cpu" else 2.0**-8
    for name, got, want in zip(("y", "dx", "dw"), results[1], results[0]):
        err = (got - want).abs().max() / want.abs().max()
        assert err <= tol, f"{name}: {err:.2e}"
