"""FP8 (minids/fp8.py, REFERENCE.md 5): fine-grained quantization (1x128, 128x1, 128x128; UE8M0 scales),
its error per format, saturation and the amax floor, the checkpoint dequantization, the FP8 linear layer
(Fprop / Dgrad / Wgrad) against a reference written here from the V3 recipe, enable_fp8 on tiny-v3,
`fp8: sim` training, the limited-precision accumulator, and the scripts that compare sim, real and off.

Expected values come from the format definitions (E4M3: 3 mantissa bits, max 448; E5M2: 2 bits, max
57344), from hand computation, or from the straightforward tile quantizer below (torch ops only; it does
not call minids.fp8's quantizers).
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minids.config import ModelConfig
from minids.fp8 import (
    FP8Linear,
    act_dequant,
    act_quant,
    act_quant_t,
    enable_fp8,
    fp8_linear,
    matmul_limited_acc,
    weight_dequant,
    weight_quant,
)
from minids.model import Transformer
from minids.moe import DeepSeekMoE, moe_experts
from minids.train import TrainConfig, TrainError, train

FMT = {"e4m3": (torch.float8_e4m3fn, 448.0, 3), "e5m2": (torch.float8_e5m2, 57344.0, 2)}  # dtype, max, mantissa bits
FLOOR = 1e-4  # the official act_quant's amax clamp (REFERENCE.md 5.3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sqnr_db(x: torch.Tensor, xhat: torch.Tensor) -> float:
    x, xhat = x.double(), xhat.double()
    return 10 * math.log10((x**2).sum().item() / ((x - xhat) ** 2).sum().item())


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------ an independent reference quantizer
def ref_rows(x: torch.Tensor, block: int = 128, dtype=torch.float8_e4m3fn, fmax: float = 448.0) -> torch.Tensor:
    """Quantize-dequantize a 2-D x in 1 x block tiles along its last dim (partial tail tile zero-padded)."""
    M, K = x.shape
    nb = -(-K // block)
    t = F.pad(x.float(), (0, nb * block - K)).view(M, nb, block)  # (M, nb, b)
    s = t.abs().amax(dim=-1, keepdim=True).clamp(min=FLOOR) / fmax  # (M, nb, 1): online amax, no history
    q = (t / s).clamp(-fmax, fmax).to(dtype)
    return (q.float() * s).view(M, nb * block)[:, :K].contiguous()


def ref_blocks(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """Quantize-dequantize w in block x block blocks, one explicit block at a time (E4M3)."""
    out = torch.empty(w.shape, dtype=torch.float32)
    for i in range(0, w.shape[0], block):
        for j in range(0, w.shape[1], block):
            blk = w[i : i + block, j : j + block].float()
            s = blk.abs().max().clamp(min=FLOOR) / 448.0
            out[i : i + block, j : j + block] = (blk / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s
    return out


def ref_fp8_linear(x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """V3P 3.3 / Fig. 6: y = x W^T, dx = dy W, dW = dy^T x with every GEMM operand FP8 (E4M3), float32 GEMMs.

    x (..., K), w (N, K), dy (..., N) -> y, dx, dW.
    """
    K, N = x.shape[-1], w.shape[0]
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N).float()
    xd = ref_rows(x2)  # Fprop: x in 1x128 tiles along K; this FP8 x is what forward caches
    wd = ref_blocks(w)  # 128x128 weight blocks, used by Fprop and Dgrad
    y = xd @ wd.t()
    dx = ref_rows(dy2) @ wd  # Dgrad: dy in 1x128 tiles along N (its reduction dim)
    dyt = ref_rows(dy2.t().contiguous())  # Wgrad: dy^T (N, M) in 128x1 tiles along tokens
    xt = ref_rows(xd.t().contiguous())  # the cached FP8 x, dequantized, re-quantized 128x1 along tokens (K, M)
    dw = dyt @ xt.t()
    return y.view(*x.shape[:-1], N), dx.view(x.shape), dw


# ------------------------------------------------------------------ 1. error per format
@pytest.mark.parametrize("kind", ["act", "weight"])
def test_sqnr_per_format(kind):
    """Round-trip SQNR of Gaussian data from the mantissa bits.

    A format with m mantissa bits rounds each value to a step of 2^-m of its binade: uniform error over
    a binade [2^e, 2^(e+1)) gives SQNR = 10 log10(28 * 4^m) = 6.02 m + 14.5 dB; Gaussian tiles put more
    mass at the low end of each binade, slightly less. Lower bound asserted: 6.02 m + 10 dB. One mantissa
    bit is worth ~6 dB between E4M3 and E5M2 (both formats' ranges cover a tile after scaling).
    Measured (seed 0, 256 x 1024 N(0,1)): act_quant E4M3 31.8 dB, E5M2 25.8 dB; weight_quant E4M3 31.6 dB,
    E5M2 25.6 dB (theory for uniform-in-binade: 32.5 and 26.5).
    """
    x = torch.randn(256, 1024, generator=gen(0))
    got = {}
    for fmt, (_, _, m) in FMT.items():
        if kind == "act":
            q, s = act_quant(x, fmt=fmt)
            xhat = act_dequant(q, s)
        else:
            q, s = weight_quant(x, fmt=fmt)
            xhat = weight_dequant(q, s, dtype=torch.float32)
        got[fmt] = sqnr_db(x, xhat)
        assert got[fmt] >= 6.02 * m + 10, (fmt, got[fmt])
        assert got[fmt] <= 6.02 * m + 14.5 + 1, (fmt, got[fmt])  # not better than uniform-in-binade rounding
    assert 4.0 <= got["e4m3"] - got["e5m2"] <= 8.0, got


def test_sqnr_independent_of_tile_scale():
    """Per-tile scaling: tiles whose magnitudes differ by 2^40 keep the same SQNR each (no shared range)."""
    x = torch.randn(64, 512, generator=gen(1))
    x[:, 128:256] *= 2.0**20
    x[:, 256:384] *= 2.0**-20
    xhat = act_dequant(*act_quant(x))
    for t in range(4):
        sl = slice(128 * t, 128 * (t + 1))
        assert sqnr_db(x[:, sl], xhat[:, sl]) >= 6.02 * 3 + 10


# ------------------------------------------------------------------ 2. shapes and partial tiles
def test_scale_shapes_partial_tiles():
    x = torch.randn(3, 200, generator=gen(2))
    q, s = act_quant(x)
    assert q.shape == (3, 200) and q.dtype == torch.float8_e4m3fn and s.shape == (3, 2) and s.dtype == torch.float32

    xt = torch.randn(300, 64, generator=gen(3))
    q, s = act_quant_t(xt)
    assert q.shape == (64, 300) and s.shape == (64, 3)

    w = torch.randn(130, 257, generator=gen(4))
    q, s = weight_quant(w)
    assert q.shape == (130, 257) and s.shape == (2, 3)


def test_partial_tail_tile_own_scale():
    # act_quant: row of 200 = a full tile of large values and a 72-wide tail of small ones
    x = torch.randn(3, 200, generator=gen(5)) * 10
    x[:, 128:] = torch.rand(3, 72, generator=gen(6)) * 0.03 - 0.015
    x[1, 150] = -0.0375  # tail amax from a negative value
    q, s = act_quant(x)
    for r in range(3):
        assert s[r, 0] == x[r, :128].abs().max() / 448
        assert s[r, 1] == x[r, 128:].abs().max() / 448  # its own amax, not the row's (padding never raises it)
    assert s[1, 1] == torch.tensor(0.0375) / 448
    # the tail keeps full relative precision
    deq = act_dequant(q, s)
    assert sqnr_db(x[:, 128:], deq[:, 128:]) >= 6.02 * 3 + 10

    # act_quant_t: 300 tokens = tiles of 128, 128, 44 along tokens; the last one small
    xt = torch.randn(300, 64, generator=gen(7))
    xt[256:] *= 1e-3
    q, s = act_quant_t(xt)
    assert torch.equal(s[:, 2], xt[256:].abs().amax(0) / 448)
    assert torch.equal(s[:, 0], xt[:128].abs().amax(0) / 448)
    assert torch.equal(q.float(), (xt.t() / s.repeat_interleave(128, 1)[:, :300]).to(torch.float8_e4m3fn).float())

    # weight_quant: (130, 257) -> block (1, 2) holds the 2 x 1 corner only
    w = torch.randn(130, 257, generator=gen(8))
    w[128:, 256:] = torch.tensor([[0.002], [-0.005]])
    q, s = weight_quant(w)
    assert s[1, 2] == torch.tensor(0.005) / 448
    assert s[1, 0] == w[128:, :128].abs().max() / 448
    assert s[0, 2] == w[:128, 256:].abs().max() / 448
    assert q[129, 256].float() == -448
    assert q[128, 256].float() == (torch.tensor(0.002) / s[1, 2]).to(torch.float8_e4m3fn).float()


# ------------------------------------------------------------------ 3. saturation, finiteness, the amax floor
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_tile_max_maps_to_format_max(fmt):
    _, fmax, _ = FMT[fmt]
    x = torch.randn(16, 384, generator=gen(9)) * torch.logspace(-3, 6, 16)[:, None]  # rows 1e-3 .. 1e6: above the floor
    q, s = act_quant(x, fmt=fmt)
    qf = q.float().view(16, 3, 128)
    t = x.view(16, 3, 128)
    assert torch.equal(s, t.abs().amax(-1) / fmax)
    idx = t.abs().argmax(-1, keepdim=True)
    assert torch.equal(qf.gather(-1, idx), fmax * t.gather(-1, idx).sign())  # exactly +-fmax
    assert qf.abs().max() == fmax and torch.isfinite(qf).all()

    wq, ws = weight_quant(torch.randn(200, 300, generator=gen(10)) * 1e3, fmt=fmt)
    assert wq.float().abs().amax() == fmax and torch.isfinite(wq.float()).all() and torch.isfinite(ws).all()


def test_extreme_values_finite():
    x = torch.zeros(4, 256)
    x[0, :128] = torch.linspace(-1, 1, 128) * 3e38  # near float32's max: x/s must not overflow
    x[1, :128] = torch.linspace(-1, 1, 128) * 1e-30  # below the amax floor
    x[2, :] = 7.0  # constant tile
    q, s = act_quant(x)
    assert torch.isfinite(q.float()).all() and torch.isfinite(s).all()
    assert q[0, 0].float() == -448 and q[0, 127].float() == 448
    deq = act_dequant(q, s)
    assert torch.isfinite(deq).all()
    assert torch.equal(q[2].float(), torch.full((256,), 448.0)) and torch.equal(deq[2], torch.full((256,), 7.0))


def test_amax_floor_all_zero_tiles():
    floor_s = torch.tensor(FLOOR, dtype=torch.float32) / 448
    x = torch.zeros(2, 200)
    q, s = act_quant(x)
    assert torch.equal(s, torch.full((2, 2), floor_s.item()))
    assert torch.equal(q.float(), torch.zeros(2, 200)) and torch.equal(act_dequant(q, s), torch.zeros(2, 200))
    wq, ws = weight_quant(torch.zeros(130, 5))
    assert torch.equal(ws, torch.full((2, 1), floor_s.item()))
    assert torch.equal(weight_dequant(wq, ws, dtype=torch.float32), torch.zeros(130, 5))
    # a tile whose amax is below the floor is scaled by the floor: 1e-6 -> 1e-6 / (1e-4 / 448) = 4.48 -> 4.5 (E4M3)
    x = torch.zeros(1, 128)
    x[0, 3] = 1e-6
    q, s = act_quant(x)
    assert s[0, 0] == floor_s and q[0, 3].float() == 4.5
    _, s_u = act_quant(x, ue8m0=True)
    assert s_u[0, 0] == 2.0 ** math.ceil(math.log2(FLOOR / 448))  # 2^-22


# ------------------------------------------------------------------ 4. UE8M0 (power-of-two) scales
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_ue8m0_scales(fmt):
    _, fmax, _ = FMT[fmt]
    x = torch.randn(64, 640, generator=gen(11)) * torch.logspace(-3, 4, 64)[:, None]
    q, s = act_quant(x, fmt=fmt, ue8m0=True)
    amax = x.view(64, 5, 128).abs().amax(-1).double()
    s64 = s.double()
    assert torch.equal(torch.log2(s64), torch.log2(s64).round())  # integral exponent
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()
    assert (amax > FLOOR).all()
    assert (s64 >= amax / fmax).all() and (s64 < 2 * amax / fmax).all()  # never under-scaled, < one octave over
    qf = q.float()
    assert qf.abs().max() <= fmax and torch.isfinite(qf).all()
    # the round-trip is still a format-precision one
    assert sqnr_db(x, act_dequant(q, s)) >= 6.02 * FMT[fmt][2] + 10

    wq, ws = weight_quant(x, fmt=fmt, ue8m0=True)
    wamax = F.pad(x, (0, 0, 0, 64)).view(1, 128, 5, 128).abs().amax((1, 3)).double()
    assert (torch.frexp(ws)[0] == 0.5).all()
    assert (ws.double() >= wamax / fmax).all() and (ws.double() < 2 * wamax / fmax).all()
    assert wq.float().abs().max() <= fmax

    _, xt_s = act_quant_t(x, fmt=fmt, ue8m0=True)
    assert xt_s.shape == (640, 1) and (torch.frexp(xt_s)[0] == 0.5).all()


def test_ue8m0_hand_cases():
    x = torch.zeros(3, 128)
    x[0, 0] = 448.0  # amax/448 = 1 = 2^0 exactly: not rounded up to 2
    x[1, 5] = -56.0  # 2^-3
    x[2, 9] = 449.0  # just above 448 * 2^0 -> 2^1, and 449 / 2 = 224.5 -> 224 (E4M3 step 16 in [128, 256))
    q, s = act_quant(x, ue8m0=True)
    assert s.flatten().tolist() == [1.0, 0.125, 2.0]
    assert q[0, 0].float() == 448 and q[1, 5].float() == -448 and q[2, 9].float() == 224


def test_ue8m0_just_above_a_power_of_two_saturates_safely():
    """amax/448 one float32 ulp above 2^-9: float32 log2 rounds to -9 exactly, so the official kernel.py's and
    DeepGEMM's ceil(log2(s)) give 2^-9, one ulp short (the tile max then lands at 448 * (1 + 2^-23), which the
    clamp saturates); minids' exact power-of-two ceiling gives 2^-8. Either way: finite, error <= 2^-22."""
    a = torch.tensor(0.875) + 2.0**-23  # 0.875 = 448 * 2^-9
    x = torch.zeros(1, 128)
    x[0, 0] = a
    q, s = act_quant(x, ue8m0=True)
    assert s.item() in (2.0**-9, 2.0**-8)
    assert q.float().abs().max() <= 448 and torch.isfinite(q.float()).all()
    assert abs(act_dequant(q, s)[0, 0].item() - a.item()) <= 2.0**-22 * a.item()


def test_bad_format():
    with pytest.raises(ValueError, match="e4m3"):
        act_quant(torch.zeros(2, 128), fmt="e3m4")


# ------------------------------------------------------------------ 5. checkpoint dequantization
@pytest.mark.parametrize("shape", [(130, 257), (256, 128), (5, 3)])
def test_weight_dequant_matches_block_loop(shape):
    O, I = shape
    w = (torch.randn(O, I, generator=gen(12)) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    bo, bi = -(-O // 128), -(-I // 128)
    s = torch.rand(bo, bi, generator=gen(13)) * 0.01 + 1e-4
    ref = torch.empty(O, I)
    for i in range(bo):  # REFERENCE.md 5.2: each 128x128 block times its scale_inv; partial blocks at the edges
        for j in range(bi):
            ref[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (
                w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float() * s[i, j]
            )
    assert torch.equal(weight_dequant(w, s, dtype=torch.float32), ref)
    out = weight_dequant(w, s)  # the default dtype is bf16, like the official kernel's output
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))


def test_weight_dequant_bad_scale_shape():
    w = torch.zeros(130, 257, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError) as e:
        weight_dequant(w, torch.ones(2, 2))
    msg = str(e.value)
    assert "(2, 2)" in msg and "(2, 3)" in msg and "(130, 257)" in msg
    with pytest.raises(ValueError, match=re.escape("(130, 257)")):
        weight_dequant(w, torch.ones(3, 2))


def test_weight_quant_dequant_roundtrip_checkpoint_example():
    """REFERENCE.md 5.2's example shape kv_a_proj_with_mqa [576, 7168] -> scale_inv [5, 56], cut to width 384."""
    w = torch.randn(576, 384, generator=gen(14)) * 0.02
    q, s = weight_quant(w)
    assert s.shape == (5, 3)
    assert torch.equal(weight_dequant(q, s, dtype=torch.float32), ref_blocks(w))


# ------------------------------------------------------------------ 6. the FP8 linear layer
@pytest.mark.parametrize("xshape", [(7, 200), (2, 5, 200)])
def test_fp8_linear_equals_reference_and_close_to_fp32(xshape):
    N, K = 130, 200
    x = torch.randn(*xshape, generator=gen(15))
    w = torch.randn(N, K, generator=gen(16)) * K**-0.5
    dy = torch.randn(*xshape[:-1], N, generator=gen(17))

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xa, wa)
    y.backward(dy)
    assert y.shape == (*xshape[:-1], N) and y.dtype == torch.float32
    assert xa.grad.shape == x.shape and wa.grad.shape == w.shape

    ry, rdx, rdw = ref_fp8_linear(x, w, dy)
    assert torch.equal(y, ry)
    assert torch.equal(xa.grad, rdx)
    assert torch.equal(wa.grad, rdw)

    # against float32: E4M3 has 3 mantissa bits, so each operand element carries a relative error up to
    # 2^-4 (RMS ~ 2.5% for Gaussian tiles, SQNR ~32 dB); a GEMM of two such operands stays under 8%.
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    y32 = F.linear(xb, wb)
    y32.backward(dy)
    errs = [rel_fro(y, y32), rel_fro(xa.grad, xb.grad), rel_fro(wa.grad, wb.grad)]
    assert all(0 < e < 0.08 for e in errs), errs


def test_fp8_linear_wgrad_uses_the_cached_fp8_x():
    """Wgrad reads x through its FP8 forward cache: re-quantizing the raw x instead gives other bits."""
    x = torch.randn(7, 200, generator=gen(18))
    w = torch.randn(130, 200, generator=gen(19)) * 0.1
    dy = torch.randn(7, 130, generator=gen(20))
    wa = w.clone().requires_grad_()
    fp8_linear(x, wa).backward(dy)
    raw = ref_rows(dy.t().contiguous()) @ ref_rows(x.t().contiguous()).t()
    assert not torch.equal(wa.grad, raw)
    assert torch.equal(wa.grad, ref_fp8_linear(x, w, dy)[2])


def test_fp8_linear_block_dgrad_quantizes_dy_in_blocks():
    """dgrad_block (the report's negative result, V3P App. B.2): Dgrad's dy in 128x128 blocks, Fprop and Wgrad
    unchanged. One token with a huge gradient (a token-correlated outlier) then sets the scale of the 127 other
    tokens of its block, whose dx lose their precision; 1x128 tiles keep each token's own scale."""
    M, N, K = 300, 130, 200  # three token blocks, the last partial
    x = torch.randn(M, K, generator=gen(30))
    w = torch.randn(N, K, generator=gen(31)) * K**-0.5
    dy = torch.randn(M, N, generator=gen(32))
    dy[5] *= 1e6  # the block's scale becomes ~1e6 / 448 times the others' values: they round to zero
    grads = {}
    for blocks in (False, True):
        xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xa, wa, dgrad_block=blocks)
        y.backward(dy)
        grads[blocks] = (y.detach(), xa.grad, wa.grad)
    ry, rdx, rdw = ref_fp8_linear(x, w, dy)
    assert torch.equal(grads[True][0], ry) and torch.equal(grads[True][2], rdw)  # Fprop and Wgrad as before
    assert torch.equal(grads[False][1], rdx)
    assert torch.equal(grads[True][1], ref_blocks(dy) @ ref_blocks(w))  # Dgrad: both operands in blocks
    dx32 = dy @ w
    others = torch.ones(M, dtype=torch.bool)
    others[5] = False
    err_tiles = rel_fro(grads[False][1][others], dx32[others])
    err_blocks = rel_fro(grads[True][1][:128][others[:128]], dx32[:128][others[:128]])  # the outlier's block
    assert err_tiles < 0.08 and err_blocks > 0.9, (err_tiles, err_blocks)
    with pytest.raises(ValueError, match="simulated only"):
        fp8_linear(x, w, real=True, dgrad_block=True)


def test_fp8_linear_module_and_bf16():
    lin = torch.nn.Linear(200, 130, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.05)
    x = torch.randn(7, 200, generator=gen(21))
    lin.__class__ = FP8Linear
    assert torch.equal(lin(x), ref_fp8_linear(x, lin.weight.detach(), torch.zeros(7, 130))[0])
    # bf16 input: output and dx in bf16, dW in the weight's dtype
    xb = x.bfloat16().requires_grad_()
    y = fp8_linear(xb, lin.weight)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and lin.weight.grad.dtype == torch.float32


def test_moe_experts_fp8_forward():
    """moe_experts(fp8=True): every expert GEMM in FP8 -- per token, sum_k w * FFN_e(x) with the reference
    FP8 linear (1x128 tiles are per token, so the expert grouping does not change the forward)."""
    E, D, I, T, k = 4, 200, 136, 9, 2
    g = gen(22)
    x = torch.randn(T, D, generator=g)
    wg, wu = torch.randn(E, I, D, generator=g) * 0.07, torch.randn(E, I, D, generator=g) * 0.07
    wd = torch.randn(E, D, I, generator=g) * 0.08
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts = torch.rand(T, k, generator=g)
    y, counts = moe_experts(x, wts, idx, wg, wu, wd, "loop", fp8=True)
    y32, _ = moe_experts(x, wts, idx, wg, wu, wd, "loop", fp8=False)

    def lin(a, b):
        return ref_fp8_linear(a, b, torch.zeros(a.shape[0], b.shape[0]))[0]

    ref = torch.zeros(T, D)
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            h = F.silu(lin(x[t : t + 1], wg[e])) * lin(x[t : t + 1], wu[e])
            ref[t] += wts[t, j] * lin(h, wd[e])[0]
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(y, y32) and rel_fro(y, y32) < 0.08
    assert counts.sum() == T * k


# ------------------------------------------------------------------ 7. enable_fp8 on tiny-v3
def tiny_v3(**over) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({**ModelConfig.load("tiny-v3").to_dict(), "num_hidden_layers": 2, **over})
    return Transformer(cfg).eval()


def test_enable_fp8_switches_the_right_modules():
    model = tiny_v3()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=gen(23))
    sd_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits0 = model(ids).logits

    n = enable_fp8(model, "sim")
    attn = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    ffn = ["gate_proj", "up_proj", "down_proj"]
    expected = (  # tiny-v3 cut to 2 layers: layer 0 dense, layer 1 MoE, one MTP layer (MoE)
        [f"model.layers.0.self_attn.{p}" for p in attn] + [f"model.layers.0.mlp.{p}" for p in ffn]
        + [f"model.layers.1.self_attn.{p}" for p in attn] + [f"model.layers.1.mlp.shared_experts.{p}" for p in ffn]
        + [f"mtp.0.self_attn.{p}" for p in attn] + [f"mtp.0.mlp.shared_experts.{p}" for p in ffn]
    )
    fp8_names = sorted(name for name, m in model.named_modules() if isinstance(m, FP8Linear))
    assert fp8_names == sorted(expected)
    plain = {name for name, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert plain == {"lm_head", "mtp.0.eh_proj"}
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    moes = {name: m.fp8 for name, m in model.named_modules() if isinstance(m, DeepSeekMoE)}
    assert moes == {"model.layers.1.mlp": "sim", "mtp.0.mlp": "sim"}
    assert n == len(expected) + 2  # 24 linears + 2 routed-expert modules
    for name, m in model.named_modules():  # router, norms, embedding: not FP8 (no FP8 class anywhere else)
        if name.endswith((".gate", "norm", "layernorm", "embed_tokens")):
            assert "FP8" not in type(m).__name__, name
    sd = model.state_dict()
    assert list(sd) == list(sd_before) and all(torch.equal(sd[k], sd_before[k]) for k in sd)

    with torch.no_grad():
        logits_sim = model(ids).logits
    assert not torch.equal(logits_sim, logits0)
    cos = F.cosine_similarity(logits_sim.flatten(), logits0.flatten(), dim=0).item()
    assert cos > 0.99, cos

    assert enable_fp8(model, "off") == n
    assert not any(isinstance(m, FP8Linear) for m in model.modules())
    assert not any(m.fp8 for m in model.modules() if isinstance(m, DeepSeekMoE))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits0)
    assert list(model.state_dict()) == list(sd_before)


def test_enable_fp8_bad_mode():
    model = tiny_v3(num_nextn_predict_layers=0)
    for mode in ("REAL", "on", "", None):
        with pytest.raises(ValueError, match="fp8"):
            enable_fp8(model, mode)
    assert not any(isinstance(m, FP8Linear) for m in model.modules())


def test_block_dgrad_mode_reaches_every_fp8_gemm():
    """fp8 "sim-block-dgrad" changes the Dgrad GEMMs only: in the routed experts (per-expert loop) the output and
    the down projection's weight gradient (Wgrad, whose dy is the same) equal "sim"'s, while x's and the gate
    projection's gradients (behind the down projection's Dgrad) differ; enable_fp8 sets the mode on every
    FP8 linear and MoE layer, and an FP8Linear in that mode is fp8_linear(..., dgrad_block=True)."""
    E, D, I, T, k = 4, 200, 136, 9, 2
    g = gen(40)
    x = torch.randn(T, D, generator=g)
    ws = [torch.randn(E, I, D, generator=g) * 0.07, torch.randn(E, I, D, generator=g) * 0.07,
          torch.randn(E, D, I, generator=g) * 0.08]
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    wts, dy = torch.rand(T, k, generator=g), torch.randn(T, D, generator=g)
    out = {}
    for mode in ("sim", "sim-block-dgrad"):
        xa, wa = x.clone().requires_grad_(), [w.clone().requires_grad_() for w in ws]
        y, _ = moe_experts(xa, wts, idx, *wa, "loop", fp8=mode)
        y.backward(dy)
        out[mode] = (y.detach(), xa.grad, wa[0].grad, wa[2].grad)
    (y0, dx0, dg0, dd0), (y1, dx1, dg1, dd1) = out["sim"], out["sim-block-dgrad"]
    assert torch.equal(y0, y1) and torch.equal(dd0, dd1)
    assert not torch.equal(dx0, dx1) and not torch.equal(dg0, dg1)

    model = tiny_v3()
    enable_fp8(model, "sim-block-dgrad")
    lins = [m for m in model.modules() if isinstance(m, FP8Linear)]
    assert lins and all(m.fp8_mode == "sim-block-dgrad" for m in lins)
    assert all(m.fp8 == "sim-block-dgrad" for m in model.modules() if isinstance(m, DeepSeekMoE))
    lin = lins[0]
    xin = torch.randn(5, lin.in_features, generator=g, requires_grad=True)
    dout = torch.randn(5, lin.out_features, generator=g)
    lin(xin).backward(dout)
    xr = xin.detach().clone().requires_grad_()
    fp8_linear(xr, lin.weight.detach(), dgrad_block=True).backward(dout)
    assert torch.equal(xin.grad, xr.grad)


def test_enable_fp8_training_gradients_flow():
    model = tiny_v3().train()
    enable_fp8(model, "sim")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=gen(24))
    out = model(ids, labels=ids)
    out.loss.backward()
    assert math.isfinite(out.loss.item())
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n in ("model.layers.0.self_attn.q_a_proj.weight", "model.layers.1.mlp.experts.gate_proj",
              "model.layers.1.mlp.shared_experts.down_proj.weight", "mtp.0.eh_proj.weight", "lm_head.weight"):
        assert grads[n] is not None and torch.isfinite(grads[n]).all() and grads[n].abs().sum() > 0, n


# ------------------------------------------------------------------ 8. fp8: sim training
WORDS = ["alpha", "beta", "gamma", "delta", "value", "count", "total", "item", "node", "result", "index", "buffer",
         "stream", "token", "layer", "weight", "bias", "expert", "router", "batch", "window", "offset", "length",
         "parse", "render", "update", "merge", "split", "shard", "cache", "query"]


def write_corpus(root: Path) -> Path:
    rng = random.Random(0)
    root.mkdir(parents=True)
    for f in range(4):
        lines = []
        for _ in range(12):
            a, b, c = rng.sample(WORDS, 3)
            lines += [f"def {a}_{b}({c}, n={rng.randint(1, 99)}):",
                      f"    {a} = [{c} * i + {rng.randint(0, 999)} for i in range(n)]",
                      f"    return {{'{b}': sum({a}), '{rng.choice(WORDS)}': {rng.randint(0, 100)}}}", ""]
        (root / f"mod_{f}.py").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("mode", ["sim", "real", "sim-block-dgrad"])
def test_fp8_training(tmp_path, mode):
    """real: the FP8 GEMMs (on this CPU the Triton kernels under the interpreter, or the references);
    sim-block-dgrad: the report's negative result (Dgrad's activation gradients in 128x128 blocks), which trains
    at this scale (the report saw divergence after ~300B tokens)."""
    data = write_corpus(tmp_path / "corpus")
    assert 4_000 < sum(p.stat().st_size for p in data.iterdir()) < 20_000
    out = tmp_path / "run"
    cfg = TrainConfig(model="tiny-v3", model_overrides={"num_hidden_layers": 2}, data=str(data), fp8=mode,
                      seq_len=32, batch_size=4, max_steps=8, max_tokens=None, lr=3e-3, warmup_steps=2,
                      eval_interval=4, eval_tokens=256, sample_tokens=0, plots=False, out_dir=str(out))
    cfg.validate()
    res = train(cfg)
    assert res["step"] == 8
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in recs if "loss" in r]
    vals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses + list(vals.values()))
    assert losses[-1] < losses[0], losses
    assert set(vals) == {4, 8} and vals[8] < vals[4], vals
    assert json.loads((out / "train_config.json").read_text())["fp8"] == mode


def test_fp8_bad_mode_rejected():
    with pytest.raises(TrainError, match="fp8"):
        TrainConfig(fp8="fp8").validate()
    with pytest.raises(TrainError, match="fp8"):
        TrainConfig.load(None, {"fp8": "e4m3", "max_steps": 1})


# ------------------------------------------------------------------ 9. limited-precision accumulation
def test_limited_acc_full_precision_equals_matmul():
    g = gen(25)
    a = torch.randn(16, 1000, generator=g, dtype=torch.float64)
    b = torch.randn(1000, 16, generator=g, dtype=torch.float64)
    for pe in (None, 128):
        got = matmul_limited_acc(a, b, acc_bits=53, promote_every=pe)
        torch.testing.assert_close(got, a @ b, rtol=1e-13, atol=1e-12)  # only the summation order differs
    # small integers: every float64 sum is exact, whatever the order -> bit-equal
    ai = torch.randint(-8, 9, (16, 1000), generator=g).double()
    bi = torch.randint(-8, 9, (1000, 16), generator=g).double()
    assert torch.equal(matmul_limited_acc(ai, bi, acc_bits=53), ai @ bi)
    assert torch.equal(matmul_limited_acc(ai.float(), bi.float(), acc_bits=53), ai @ bi)  # float64 result


def test_limited_acc_error_grows_with_k_and_promotion_fixes_it():
    """14-bit accumulator (V3P 3.3.2): truncation toward zero of a running sum of size ~sqrt(k) costs a
    relative 2^-14 .. 2^-13 per chunk, so the relative error of the result grows ~linearly in K (measured:
    8e-4 at K = 1024, 3.4e-3 at K = 4096, chunk 32); promoting to full precision every N_C = 128 bounds it
    (~1.2e-4 at either K)."""
    g = gen(26)
    err = {}
    for K in (1024, 4096):
        a = torch.randn(16, K, generator=g, dtype=torch.float64)
        b = torch.randn(K, 16, generator=g, dtype=torch.float64)
        exact = a @ b
        err[K] = rel_fro(matmul_limited_acc(a, b, acc_bits=14), exact)
        err[K, 128] = rel_fro(matmul_limited_acc(a, b, acc_bits=14, promote_every=128), exact)
    assert 2.0**-16 < err[1024] < err[4096] and err[4096] > 2.5 * err[1024], err
    assert err[4096, 128] < err[4096] / 10 and err[4096, 128] < err[1024], err
    assert err[1024, 128] < err[1024] and err[4096, 128] < 2 * err[1024, 128], err


def test_limited_acc_gives_the_reports_error_at_k_4096():
    """REFERENCE.md 5.1 (V3P 3.3.2): a random K = 4096 GEMM of FP8 operands through the ~14-bit accumulator shows
    about 2% max relative error; promotion to float32 every 128 elements removes it. Measured as
    scripts/fp8_accumulation.py does (max |C - exact| / mean |exact|, 32 x 32 outputs of E4M3 operands with 1 x 128 and
    128 x 128 scales): 1.4-1.8% over seeds; 13 bits would double it, 15 halve it."""
    g = gen(0)
    a, s = act_quant(torch.randn(32, 4096, generator=g))
    a = act_dequant(a, s)
    bq, bs = weight_quant(torch.randn(32, 4096, generator=g))
    b = weight_dequant(bq, bs, dtype=torch.float32).t()
    exact = a.double() @ b.double()
    err = (matmul_limited_acc(a, b, 14) - exact).abs().max() / exact.abs().mean()
    promoted = (matmul_limited_acc(a, b, 14, promote_every=128) - exact).abs().max() / exact.abs().mean()
    assert 0.01 < err < 0.025, err
    assert promoted < err / 10, (promoted, err)


def test_limited_acc_hand_cases():
    one = torch.tensor([[1.0]], dtype=torch.float64)
    # 1 + 1/32 = 1.00001b: 4 kept mantissa bits hold 1.000b -> truncated to 1 (toward zero, both signs)
    a = torch.tensor([[1.0, 1 / 32]], dtype=torch.float64)
    b = torch.ones(2, 1, dtype=torch.float64)
    for chunk in (1, 32):
        assert matmul_limited_acc(a, b, acc_bits=4, chunk=chunk).item() == 1.0
        assert matmul_limited_acc(-a, b, acc_bits=4, chunk=chunk).item() == -1.0
    # 1 + 1/8 = 1.001b fits in 4 bits
    assert matmul_limited_acc(torch.tensor([[1.0, 0.125]], dtype=torch.float64), b, acc_bits=4).item() == 1.125
    # 1.9375 = 1.1111b fits 5 bits; with 4 it truncates to 1.875, never rounds up to 2
    c = torch.tensor([[1.9375]], dtype=torch.float64)
    assert matmul_limited_acc(c, one, acc_bits=4).item() == 1.875
    assert matmul_limited_acc(c, one, acc_bits=5).item() == 1.9375
    # 1 + 2^-20: lost in 14 bits, kept in 21
    a = torch.tensor([[1.0, 2.0**-20]], dtype=torch.float64)
    assert matmul_limited_acc(a, b, acc_bits=14, chunk=1).item() == 1.0
    assert matmul_limited_acc(a, b, acc_bits=21, chunk=1).item() == 1 + 2.0**-20
    # promotion after every product rescues the small addend: out = 1, then acc = 1/32 exactly
    a = torch.tensor([[1.0, 1 / 32]], dtype=torch.float64)
    assert matmul_limited_acc(a, b, acc_bits=4, chunk=1, promote_every=1).item() == 1.03125
    # 8 x 1/32 after a 1: each step 1 + 1/32 -> 1 in 4 bits, so the 1/4 is lost entirely
    a = torch.tensor([[1.0] + [1 / 32] * 8], dtype=torch.float64)
    b9 = torch.ones(9, 1, dtype=torch.float64)
    assert matmul_limited_acc(a, b9, acc_bits=4, chunk=1).item() == 1.0
    assert matmul_limited_acc(a, b9, acc_bits=4, chunk=1, promote_every=1).item() == 1.25


def test_limited_acc_bad_promotion():
    a, b = torch.randn(2, 256), torch.randn(256, 2)
    with pytest.raises(ValueError, match="promote_every"):
        matmul_limited_acc(a, b, promote_every=100)
    with pytest.raises(ValueError, match="chunk"):
        matmul_limited_acc(a, b, promote_every=48, chunk=32)
    matmul_limited_acc(a, b, promote_every=128)  # a multiple of the chunk: fine


def test_fp8_linear_gemm_choice_is_checked(monkeypatch):
    """MINIDS_FP8_LINEAR_GEMM takes "auto" or "triton"; anything else is one clear error when a real FP8 linear runs."""
    import minids.fp8 as fp8_module

    monkeypatch.setattr(fp8_module, "LINEAR_GEMM", "cublas-only")
    x, w = torch.randn(4, 256), torch.randn(128, 256)
    with pytest.raises(ValueError, match="MINIDS_FP8_LINEAR_GEMM='cublas-only': one of auto, triton"):
        fp8_linear(x, w, real=True)
    monkeypatch.setattr(fp8_module, "LINEAR_GEMM", "triton")
    assert fp8_linear(x, w, real=True).shape == (4, 128)


# ------------------------------------------------------------------ 11. the comparison scripts
SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def run_script(name: str, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=600,
                          check=False)


def test_fp8_layer_check_sim_equals_real_per_gemm(tmp_path):
    """scripts/fp8_layer_check.py records every FP8 GEMM of a forward (5 attention linears, the shared expert's 3,
    3 per routed expert that received tokens) and finds sim and real equal up to float32 addition order on the CPU."""
    done = run_script("fp8_layer_check.py", "--model", "tiny-v3", "--layers", "2", "--batch-size", "1",
                      "--seq-len", "32", "--device", "cpu", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    rec = json.loads((tmp_path / "fp8_layer_check.json").read_text())
    names = [r["name"] for r in rec["rows"]]
    # layer 0 is dense (first_k_dense_replace = 1): 5 attention + 3 MLP; layer 1 and the MTP layer are MoE
    assert names.count("model.layers.0.mlp.gate_proj.weight") == 1
    assert sum(n.startswith("model.layers.0.self_attn.") for n in names) == 5
    experts = [n for n in names if n.startswith("model.layers.1.mlp.experts.")]
    assert experts and len(experts) % 3 == 0 and len(experts) <= 3 * ModelConfig.load("tiny-v3").n_routed_experts
    assert sum(r["M"] for r in rec["rows"] if r["name"] == "model.layers.1.mlp.experts.gate_proj[expert]") == 32 * 4
    assert max(rec["worst"].values()) < 1e-5, rec["worst"]  # the 1x128 / 128x128 quantization itself: ~3e-7 here


def test_fp8_vs_bf16_report_noise_floor_and_unfinished_runs(tmp_path):
    """The report of scripts/fp8_vs_bf16.py over real runs: with --noise-floor the baseline's second run is its
    first one again on the CPU (deterministic training: 0.000%; a GPU's runs differ); a run that stopped before
    off's last evaluation is refused with one line instead of being compared at another step."""
    data = write_corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    for mode in ("off", "sim", "off-again"):
        cfg = TrainConfig(model="tiny-v3", model_overrides={"num_hidden_layers": 1}, data=str(data),
                          fp8="off" if mode == "off-again" else mode, seq_len=32, batch_size=2, max_steps=4,
                          max_tokens=None, lr=3e-3, warmup_steps=1, eval_interval=2, eval_tokens=128, sample_tokens=0,
                          plots=False, out_dir=str(runs / mode))
        train(cfg)
    args = ("--runs", str(runs), "--out", str(tmp_path / "out"), "--report-only", "--noise-floor", "--real", "no")
    done = run_script("fp8_vs_bf16.py", *args)
    assert done.returncode == 0, done.stderr
    rep = json.loads((tmp_path / "out" / "fp8_vs_bf16.json").read_text())
    on_cpu = not torch.cuda.is_available()  # train() runs on the GPU where there is one
    assert set(rep["noise_floor"]) == {"mean_second_half", "last", "val_rel"}
    if on_cpu:
        assert rep["noise_floor"] == {"mean_second_half": 0.0, "last": 0.0, "val_rel": 0.0}
    assert set(rep["modes"]) == {"sim", "off-again"} and rep["modes"]["sim"]["mean_second_half"] > 0
    md = (tmp_path / "out" / "fp8_vs_bf16.md").read_text()
    assert "| | sim | off, again (noise floor) |" in md and ("(a deterministic device)" in md or not on_cpu)
    metrics = runs / "sim" / "metrics.jsonl"
    metrics.write_text("".join(x for x in metrics.read_text().splitlines(keepends=True)
                               if json.loads(x).get("step") != 4))  # as if stopped after step 3
    done = run_script("fp8_vs_bf16.py", *args)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == ("fp8_vs_bf16: off was last evaluated at step 4 but sim (last "
                                                     "evaluated at step 2): rerun those so every mode reaches the same "
                                                     "step")
