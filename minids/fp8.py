"""FP8 as DeepSeek-V3 trains with it: fine-grained scaling, the FP8 linear layer, and accumulation precision.

Formats. E4M3 (4 exponent bits, 3 mantissa bits, largest finite value 448) has more precision and
less range than E5M2 (5 and 2, up to 57344). Earlier FP8 recipes used E4M3 forward and E5M2 for
gradients; V3 uses E4M3 everywhere, because fine-grained scales leave each group only a narrow range
to cover (REFERENCE.md 5.1; V3P 3.3.2).

Scales (V3P 3.3.2, REFERENCE.md 5.1): one scale per small group, computed online from the group's
current max-abs (no history): amax / FP8_MAX maps the group's largest element onto the format's.
- activations: 1x128 tiles along the last (reduction) dim           ``act_quant``
- the transposed activations the weight-gradient GEMM reads:
  128x1 tiles along the token dim                                   ``act_quant_t``
- weights: 128x128 blocks, partial edge blocks                      ``weight_quant``
- optional power-of-two scales (UE8M0, DeepSeek-V3.1's ``scale_fmt``): rounded UP to 2^ceil(log2 s),
  computed exactly from the float's exponent bits (the official kernel's float32 ceil(log2 s) can land
  one power low when s is within an ulp above a power of two; the exact form never under-scales).
- ``weight_dequant`` is the official checkpoints' ``weight_scale_inv`` semantics (REFERENCE.md 5.2).

FP8 linear (``FP8LinearFunction``, V3P 3.3.1, Fig. 6): all three GEMMs of a linear layer run on FP8
operands with float32 accumulation: Fprop y = x W^T (x in 1x128 tiles, W in 128x128 blocks), Dgrad
dx = dy W (dy in 1x128 tiles along the output dim, W in the same blocks), Wgrad dW = dy^T x (both
re-quantized in 128x1 tiles along the token dim, from the FP8 x cached in forward). Master weights,
gradients and optimizer state stay in high precision. ``enable_fp8`` switches the layers the report
lists (every linear of attention and the FFN/experts) and leaves embedding, head, router and norms
alone. "sim" quantizes and dequantizes around float32 matmuls, so it runs on any device.

Accumulation (V3P 3.3.2, REFERENCE.md 5.1): Hopper's FP8 tensor cores keep only about 14 bits of the
running sum; V3 copies partial sums to float32 every N_C = 128 elements of K. ``matmul_limited_acc``
simulates that accumulator, with or without promotion (scripts/fp8_accumulation.py).

Shapes: M tokens, K reduction, N outputs, b block (128).
"""

from __future__ import annotations

import math
import os
import sys

import torch
from torch import nn

from minids._kernels import kernels_available

__all__ = [
    "E4M3_MAX", "E5M2_MAX", "FP8LinearFunction", "act_dequant", "act_quant", "act_quant_t", "enable_fp8",
    "fp8_gemm", "fp8_linear", "matmul_limited_acc", "weight_dequant", "weight_quant",
]

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E5M2_MAX = 57344.0  # torch.finfo(torch.float8_e5m2).max
_FORMATS = {"e4m3": (torch.float8_e4m3fn, E4M3_MAX), "e5m2": (torch.float8_e5m2, E5M2_MAX)}
_AMAX_FLOOR = 1e-4  # the official act_quant clamps amax to at least 1e-4 (REFERENCE.md 5.3)


def _fmt(fmt: str) -> tuple[torch.dtype, float]:
    if fmt not in _FORMATS:
        raise ValueError(f"fmt={fmt!r}: one of {', '.join(_FORMATS)}")
    return _FORMATS[fmt]


def _scale(amax: torch.Tensor, fmax: float, ue8m0: bool) -> torch.Tensor:
    """amax / fmax, optionally rounded up to a power of two (never under-scaled)."""
    s = (amax.double().clamp(min=_AMAX_FLOOR) / fmax).float()  # correctly rounded (CUDA's x / scalar is x * (1/scalar))
    if not ue8m0:
        return s
    m, e = torch.frexp(s)  # s = m * 2^e, 0.5 <= m < 1; s >= 1e-4 / 57344 is a normal float
    return torch.where(m == 0.5, s, torch.ldexp(torch.ones_like(s), e))  # the exact 2^ceil(log2 s)


def _div(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x / s correctly rounded to float32 on every device: CUDA's float32 tensor division is not always the
    IEEE-rounded quotient, which the Triton kernels compute (div_rn); a float64 quotient rounded to float32 is
    (53 >= 2 * 24 + 2 bits: no double-rounding error)."""
    return (x.double() / s.double()).float()


def act_quant(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x block tiles along the last dim. x: (..., K) -> fp8 (..., K), scales (..., ceil(K/b)) float32.

    The last tile of a row may be partial (K not a multiple of b): it is scaled by its own amax.
    """
    dtype, fmax = _fmt(fmt)
    K = x.shape[-1]
    nb = math.ceil(K / block)
    xf = torch.nn.functional.pad(x.float(), (0, nb * block - K))  # zeros never raise an amax
    tiles = xf.unflatten(-1, (nb, block))  # (..., nb, b)
    s = _scale(tiles.abs().amax(dim=-1), fmax, ue8m0)  # (..., nb)
    q = _div(tiles, s.unsqueeze(-1)).clamp(-fmax, fmax).to(dtype)  # saturate at the format's max
    return q.flatten(-2)[..., :K], s


def act_dequant(q: torch.Tensor, s: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``act_quant``: q (..., K), s (..., ceil(K/b)) -> (..., K)."""
    K = q.shape[-1]
    if block < 1 or s.shape != q.shape[:-1] + (-(-K // block),):
        raise ValueError(f"act_dequant: scales {tuple(s.shape)} do not fit q {tuple(q.shape)} in blocks of {block} "
                         f"(expected {tuple(q.shape[:-1]) + (-(-K // max(block, 1)),)}): pass the block act_quant used")
    return (q.float() * s.repeat_interleave(block, dim=-1)[..., :K]).to(dtype)


def act_quant_t(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False,
    in_scale: torch.Tensor | None = None, in_block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """block x 1 tiles along the token dim, for the Wgrad GEMM. x: (M, K) -> fp8 x^T (K, M), scales (K, ceil(M/b)).

    The result is laid out transposed (K-major along tokens), as the GEMM that reduces over M reads it.
    With ``in_scale`` (M, ceil(K/in_block)), x is FP8 in 1 x in_block tiles and is dequantized first (the FP8
    activations cached by the forward, re-quantized along tokens).
    """
    if in_scale is not None:
        x = act_dequant(x, in_scale, in_block)
    return act_quant(x.t(), block, fmt, ue8m0)


def act_quant_both(
    x: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``act_quant(x)`` and ``act_quant_t(x)`` of a (M, K) tensor together: (q, s, qt, st). The backward of the
    FP8 linear needs both quantizations of dy (Dgrad along N, Wgrad along tokens); the kernel reads dy once."""
    return (*act_quant(x, block, fmt, ue8m0), *act_quant_t(x, block, fmt, ue8m0))


def weight_quant(
    w: torch.Tensor, block: int = 128, fmt: str = "e4m3", ue8m0: bool = False, transposed: bool = False,
):
    """Block x block tiles. w: (O, I) -> (fp8 (O, I), scale_inv (ceil(O/b), ceil(I/b)) float32), and with
    ``transposed=True`` also the FP8 w^T (I, O) third (Dgrad reads W^T with K contiguous; scales scale_inv.t())."""
    dtype, fmax = _fmt(fmt)
    O, I = w.shape
    bo, bi = math.ceil(O / block), math.ceil(I / block)
    padded = torch.nn.functional.pad(w.float(), (0, bi * block - I, 0, bo * block - O))  # zero padding
    blocks = padded.view(bo, block, bi, block)  # (bo, b, bi, b)
    s = _scale(blocks.abs().amax(dim=(1, 3)), fmax, ue8m0)  # (bo, bi)
    q = _div(blocks, s[:, None, :, None]).clamp(-fmax, fmax).to(dtype)
    q = q.view(bo * block, bi * block)[:O, :I].contiguous()
    return (q, s, q.t().contiguous()) if transposed else (q, s)


def _dequant_check(w: torch.Tensor, scale_inv: torch.Tensor, block: int) -> None:
    """One line for a weight that is not 2-D or a scale grid of the wrong shape (here and in minids.kernels.fp8)."""
    if w.dim() != 2:
        raise ValueError(f"weight_dequant needs a 2-D weight, got shape {tuple(w.shape)}")
    if scale_inv.shape != (math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block)):
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)}, expected "
            f"{(math.ceil(w.shape[0] / block), math.ceil(w.shape[1] / block))} for a weight of shape "
            f"{tuple(w.shape)} with {block}x{block} blocks"
        )


def weight_dequant(
    w: torch.Tensor, scale_inv: torch.Tensor, block: int = 128, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Block dequantization (the checkpoints' ``weight_scale_inv``). w: (O, I) fp8 -> (O, I) in dtype."""
    _dequant_check(w, scale_inv, block)
    O, I = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:O].repeat_interleave(block, 1)[:, :I]  # (O, I)
    return (w.float() * s).to(dtype)


def _gemm_check(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor, block: int):
    """Validate ``fp8_gemm``'s operands; returns (M, N, K, b_group) with b_group = block (128x128 weight blocks)
    or 1 (1x128 scales per row of b)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"fp8_gemm needs a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    (M, K), N = a.shape, b.shape[0]
    nk = math.ceil(K / block)
    if a_s.shape != (M, nk):
        raise ValueError(f"a_s has shape {tuple(a_s.shape)}, expected {(M, nk)} (1x{block} scales of a {(M, K)})")
    if b_s.shape == (N, nk):
        b_group = 1
    elif b_s.shape == (math.ceil(N / block), nk):
        b_group = block
    else:
        raise ValueError(
            f"b_s has shape {tuple(b_s.shape)}: expected {(math.ceil(N / block), nk)} ({block}x{block} blocks) "
            f"or {(N, nk)} (1x{block} tiles) for b of shape {(N, K)}"
        )
    return M, N, K, b_group


def fp8_gemm(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16, block: int = 128,
) -> torch.Tensor:
    """The block-scaled FP8 GEMM C (M, N) = (a a_s)(b b_s)^T, accumulated in float32 one K block at a time with
    the scales applied to each block's partial product (V3P 3.3.2's promotion every N_C = 128 elements).

    a: (M, K) FP8 with 1 x b scales a_s (M, ceil(K/b)); b: (N, K) FP8 with either b x b block scales
    b_s (ceil(N/b), ceil(K/b)) (weights: Fprop, and Dgrad with b = W^T) or 1 x b scales (N, ceil(K/b)) (Wgrad,
    where both operands are activations quantized along the token dim). Reference for ``minids.kernels.fp8``.
    """
    M, N, K, b_group = _gemm_check(a, a_s, b, b_s, block)
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for i, k0 in enumerate(range(0, K, block)):
        part = a[:, k0:k0 + block].float() @ b[:, k0:k0 + block].float().t()  # (M, N), exact products of FP8 values
        sb = b_s[:, i].float()
        sb = sb if b_group == 1 else sb.repeat_interleave(block)[:N]
        acc += part * a_s[:, i, None].float() * sb[None, :]
    return acc.to(out_dtype)


def _ops(t: torch.Tensor, use_kernels: bool | None = None):
    """Where the FP8 work of ``real`` mode runs: ``minids.kernels.fp8`` (Triton) on CUDA, else this module's
    references (same functions, same signatures); ``use_kernels=True`` forces the kernels (the tests run them
    through Triton's interpreter on CPU tensors)."""
    if use_kernels if use_kernels is not None else (t.is_cuda and kernels_available()):
        from minids.kernels import fp8 as triton_fp8

        return triton_fp8
    return sys.modules[__name__]


# Where the FP8 linear's three GEMMs run on CUDA: "auto" takes the Gluon GEMM where it beats cuBLAS
# (``minids.kernels.fp8.fp8_gemm_if_ws``: the weight form at K <= 512 on sm_90), then block-scaled cuBLAS
# (torch._scaled_mm, ``minids.kernels.fp8.cublas_fp8_gemm``: Fprop and Dgrad with 128x128 weight blocks, Wgrad with
# 1x128 scales on both operands) where this torch, the GPU and the shape allow it, and the Triton GEMM elsewhere;
# "triton" takes minids' own GEMMs for all three (to measure or test them alone).
LINEAR_GEMM = os.environ.get("MINIDS_FP8_LINEAR_GEMM", "auto")


def _linear_gemm(ops, a, a_s, b, b_s, out_dtype, block):
    """fp8_gemm through ``ops``, on block-scaled cuBLAS first where ``LINEAR_GEMM`` is "auto" and ops are the
    kernels."""
    if LINEAR_GEMM == "auto" and ops is not sys.modules[__name__] and a.is_cuda:
        c = ops.fp8_gemm_if_ws(a, a_s, b, b_s, out_dtype, block)  # the Gluon kernel, where it beats cuBLAS
        if c is None:
            c = ops.cublas_fp8_gemm(a, a_s, b, b_s, out_dtype, block)
        if c is not None:
            return c
    elif LINEAR_GEMM not in ("auto", "triton"):
        raise ValueError(f"MINIDS_FP8_LINEAR_GEMM={LINEAR_GEMM!r}: one of auto, triton")
    return ops.fp8_gemm(a, a_s, b, b_s, out_dtype, block)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T with FP8 operands in all three GEMMs.

    real=False (``sim``): quantize, dequantize, float32 matmul: runs anywhere, exactly the recipe's values.
    real=True: the block-scaled FP8 GEMM ``fp8_gemm`` for Fprop, Dgrad and Wgrad (on CUDA the Triton kernels, or
    block-scaled cuBLAS where it runs, see ``LINEAR_GEMM``; the references elsewhere), quantizing
    W once per call into W and W^T and dy once into both tilings (Triton kernels on CUDA).
    Both give the same values up to the order of float32 additions.
    dgrad_block=True (simulation only): the Dgrad GEMM's activation gradient dy quantized in 128x128 blocks, like
    a weight, instead of 1x128 tiles: the variant the report found to diverge on a 16B MoE after ~300B tokens
    (V3P App. B.2, REFERENCE.md 5.1), for studying that negative result.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, block: int = 128, real: bool = False,
        use_kernels: bool | None = None, dgrad_block: bool = False,
    ) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (M, K)
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.block, ctx.shape, ctx.x_dtype, ctx.w_dtype, ctx.real = block, shape, x.dtype, weight.dtype, real
        ctx.use_kernels, ctx.dgrad_block = use_kernels, dgrad_block
        if real and dgrad_block:
            raise ValueError("fp8_linear: dgrad_block (128x128 blocks of the activation gradient) is simulated only; "
                             "use real=False")
        if real:
            ops = _ops(x2, use_kernels)
            xq, xs = ops.act_quant(x2, block)  # 1x128 tiles along K
            wq, ws, wqt = ops.weight_quant(weight, block, transposed=True)  # 128x128 blocks, W and W^T
            y = _linear_gemm(ops, xq, xs, wq, ws, out_dtype, block)  # (M, N)
            ctx.save_for_backward(xq, xs, wqt, ws)
            return y.view(*shape[:-1], weight.shape[0])
        xq, xs = act_quant(x2, block)  # 1x128 tiles along K
        wq, ws = weight_quant(weight, block)  # 128x128 blocks
        y = act_dequant(xq, xs, block) @ weight_dequant(wq, ws, block, torch.float32).t()  # (M, N), fp32 acc
        ctx.save_for_backward(xq, xs, wq, ws)  # activations cached in FP8, as V3 does
        return y.to(out_dtype).view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if ctx.real:
            return FP8LinearFunction._backward_real(ctx, dy)
        xq, xs, wq, ws = ctx.saved_tensors
        b = ctx.block
        dy2 = dy.reshape(-1, dy.shape[-1]).float()  # (M, N)
        w = weight_dequant(wq, ws, b, torch.float32)  # (N, K)
        if ctx.dgrad_block:  # the report's negative result: 128x128 blocks over tokens and N
            dyq, dys = weight_quant(dy2, b)
            dx = weight_dequant(dyq, dys, b, torch.float32) @ w  # (M, K)
        else:
            dyq, dys = act_quant(dy2, b)  # Dgrad: 1x128 tiles along N, the reduction dim here
            dx = act_dequant(dyq, dys, b) @ w  # (M, K)
        x = act_dequant(xq, xs, b)  # the cached FP8 activations, re-quantized along tokens for Wgrad
        dyt_q, dyt_s = act_quant_t(dy2, b)  # (N, M) in 128x1 tiles over M
        xt_q, xt_s = act_quant_t(x, b)  # (K, M)
        dw = act_dequant(dyt_q, dyt_s, b) @ act_dequant(xt_q, xt_s, b).t()  # (N, K)
        return dx.to(ctx.x_dtype).view(ctx.shape), dw, None, None, None, None

    @staticmethod
    def _backward_real(ctx, dy: torch.Tensor):
        xq, xs, wqt, ws = ctx.saved_tensors
        b = ctx.block
        dy2 = dy.reshape(-1, dy.shape[-1])  # (M, N)
        ops = _ops(dy2, ctx.use_kernels)
        dyq, dys, dyt_q, dyt_s = ops.act_quant_both(dy2, b)  # 1x128 along N (Dgrad), 128x1 along M (Wgrad)
        dx = _linear_gemm(ops, dyq, dys, wqt, ws.t(), ctx.x_dtype, b)  # (M, K) = dy W (W^T's block scales: a view)
        xt_q, xt_s = ops.act_quant_t(xq, b, in_scale=xs, in_block=b)  # cached FP8 x, re-quantized along M
        # (N, K) = dy^T x, 1x128 scales both sides, float32 accumulation written in the weight's dtype (one rounding,
        # as a float32 result then cast, without a float32 (N, K) buffer and a cast pass)
        dw = _linear_gemm(ops, dyt_q, dyt_s, xt_q, xt_s, ctx.w_dtype, b)
        return dx.view(ctx.shape), dw, None, None, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, block: int = 128, real: bool = False, use_kernels: bool | None = None,
    dgrad_block: bool = False,
) -> torch.Tensor:
    """F.linear(x, weight) through ``FP8LinearFunction`` (no bias: DeepSeek linears have none). real: FP8 GEMMs
    (Triton kernels where they run, unless ``use_kernels`` says otherwise) instead of the simulation.
    dgrad_block: the simulation with the activation gradient of Dgrad in 128x128 blocks (the report's negative
    result, see ``FP8LinearFunction``)."""
    return FP8LinearFunction.apply(x, weight, block, real, use_kernels, dgrad_block)


class FP8Linear(nn.Linear):
    """An nn.Linear whose forward is ``fp8_linear``; same parameters and names (``enable_fp8`` swaps the class
    and sets ``fp8_mode``)."""

    fp8_mode = "sim"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, real=self.fp8_mode == "real", dgrad_block=self.fp8_mode == BLOCK_DGRAD)


# The fp8 mode of the report's negative result: the simulation with Dgrad's activation gradient in 128x128 blocks.
BLOCK_DGRAD = "sim-block-dgrad"
FP8_MODES = ("off", "sim", "real", BLOCK_DGRAD)


def enable_fp8(model: nn.Module, mode: str = "sim") -> int:
    """Route every linear of attention and of the dense/shared-expert FFNs through FP8 ("sim": simulated;
    "real": FP8 GEMMs, the Triton kernels and block-scaled cuBLAS on CUDA; "sim-block-dgrad": simulated, with the activation gradient of
    each Dgrad GEMM quantized in 128x128 blocks, the report's negative result), or back ("off"). Embedding,
    output head, router, norms and MTP's eh_proj stay in high precision (V3P 3.3.1; eh_proj is BF16 in the
    checkpoint, REFERENCE.md 5.2). Routed experts (stacked weights) take the FP8 path inside ``moe_experts``
    through their module's ``fp8`` flag. Returns the layers switched.
    """
    from minids.attention import MHA, MLA
    from minids.mlp import MLP
    from minids.moe import DeepSeekMoE

    if mode not in FP8_MODES:
        raise ValueError(f"fp8={mode!r}: one of {', '.join(FP8_MODES)}")
    n = 0
    for m in model.modules():
        if isinstance(m, (MLA, MHA, MLP)):
            for lin in m.children():
                if isinstance(lin, nn.Linear):
                    lin.__class__ = nn.Linear if mode == "off" else FP8Linear
                    if mode != "off":
                        lin.fp8_mode = mode
                    n += 1
        elif isinstance(m, DeepSeekMoE):
            m.fp8 = False if mode == "off" else mode
            n += 1
    return n


def _truncate(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Keep the top ``bits`` bits of each value's mantissa (the rest is shifted out during alignment)."""
    m, e = torch.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    return torch.ldexp(torch.trunc(m * 2.0**bits) / 2.0**bits, e)


def matmul_limited_acc(
    a: torch.Tensor, b: torch.Tensor, acc_bits: int = 14, promote_every: int | None = None, chunk: int = 32
) -> torch.Tensor:
    """A (M, K) @ B (K, N) through a limited-precision accumulator.

    Model: each tensor-core instruction sums ``chunk`` products along K (Hopper's FP8 WGMMA takes
    K = 32 per instruction) and adds them into a running sum that keeps only ``acc_bits`` mantissa
    bits (the low bits are shifted out when the addends are aligned: truncation). With
    ``promote_every`` (V3's N_C = 128) the running sum is added into a full-precision accumulator and
    restarted every that many elements of K. ``chunk=1`` truncates after every single product (a
    pessimistic bound). Inputs are summed exactly within a chunk (float64); reference speed.
    """
    if promote_every and promote_every % chunk:
        raise ValueError(f"promote_every={promote_every} must be a multiple of chunk={chunk}")
    a, b = a.double(), b.double()
    M, K = a.shape
    out = torch.zeros(M, b.shape[1], dtype=torch.float64, device=a.device)
    acc = torch.zeros_like(out)
    for k in range(0, K, chunk):
        acc = _truncate(acc + a[:, k : k + chunk] @ b[k : k + chunk], acc_bits)
        if promote_every and (k + chunk) % promote_every == 0:
            out += acc
            acc = torch.zeros_like(acc)
    return out + acc
