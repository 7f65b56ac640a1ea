"""Attention: Multi-head Latent Attention (DeepSeek-V2/V3) and plain MHA/GQA (dense models, MoE-16B).

MLA (V2P 2.1; V3P 2.1.1 eqs. 1-11; REFERENCE.md 2.1-2.2), training form:
  c_q  = RMSNorm(W_DQ h)                      q_a_proj, q_a_layernorm     (or none: q_proj)
  q    = W_UQ,QR c_q -> per head [q_nope; q_pe]     q_b_proj
  [c_kv; k_pe] = W_DKV,KR h                   kv_a_proj_with_mqa (k_pe from h, not from c_kv)
  c_kv = RMSNorm(c_kv)                        kv_a_layernorm
  [k_nope; v] = W_UK,UV c_kv per head          kv_b_proj
  k    = [k_nope; RoPE(k_pe)] with ONE k_pe shared by all heads
  o    = softmax(q k^T * softmax_scale) v,  u = W_O o          o_proj
softmax_scale = 1/sqrt(d_n + d_r), times YaRN's mscale^2 (ModelConfig.softmax_scale).
The absorbed decoding form over the latent cache belongs to the inference path.

Shapes: B batch, S length, D hidden, H heads, Hkv kv heads, C kv_lora_rank, Cq q_lora_rank,
Dn nope head dim, R rope head dim, Dv value head dim, Dh MHA head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minids._kernels import kernels_available, require_kernels
from minids.config import ModelConfig
from minids.norm import RMSNorm
from minids.rope import apply_rope

__all__ = [
    "MHA", "MLA", "attention", "attention_ref", "check_mla_decode_args", "masked_attention", "mla_attention_absorbed",
    "mla_attention_naive", "mla_decode_ref",
]


def _acc(*ts: torch.Tensor | None) -> torch.dtype:
    """The references' arithmetic: float32, or float64 when an input is float64 (an oracle asked for more digits)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be (batch, heads, length, width), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share batch and "
                         "heads, k and v their length, q and k their width")
    if q.shape[-2] > k.shape[-2]:
        raise ValueError(f"{name}: {q.shape[-2]} queries over {k.shape[-2]} keys; causal attention takes the last "
                         "queries of the keys' sequence (S <= T)")


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference causal attention with an explicit float32 softmax.

    q: (B, H, S, Dqk), k: (B, H, S, Dqk), v: (B, H, S, Dv) -> (B, H, S, Dv) in q.dtype.
    """
    _check_qkv(q, k, v, "attention_ref")
    S, T, acc = q.shape[-2], k.shape[-2], _acc(q, k, v)
    scores = torch.einsum("bhsd,bhtd->bhst", q.to(acc), k.to(acc)) * scale  # (B, H, S, T)
    causal = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhst,bhtd->bhsd", probs, v.to(acc)).to(q.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention through torch's fused SDPA; same signature and result as ``attention_ref``.

    On the CPU, SDPA's flash kernel needs equal q/k and v head widths (MLA has Dv < Dn + R) and its
    fallback materialises the whole score matrix: zero-padding v to the q/k width takes the flash path
    (about 1.5x faster forward + backward measured on tiny-v3 shapes) and the padding is sliced off.
    CUDA's kernels take unequal widths directly.
    """
    _check_qkv(q, k, v, "attention")
    if q.shape[-2] != k.shape[-2]:  # SDPA's causal mask is aligned top-left, the reference's bottom-right
        raise ValueError(f"attention: {q.shape[-2]} queries over {k.shape[-2]} keys; it takes equal lengths (use "
                         "attention_ref or masked_attention for new queries over a longer cache)")
    dv = v.shape[-1]
    if q.device.type == "cpu" and dv < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - dv))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :dv]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of new queries over a cache. q: (B, S, H, Dqk), k: (B, T, H, Dqk), v: (B, T, H, Dv),
    mask: (B, 1, S, T) bool -> (B, S, H, Dv); float32 softmax."""
    acc = _acc(q, k, v)
    scores = torch.einsum("bshd,bthd->bhst", q.to(acc), k.to(acc)) * scale  # (B, H, S, T)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhst,bthd->bshd", probs, v.to(acc)).to(q.dtype)  # (B, S, H, Dv)


def _check_mla(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, name: str) -> None:
    """The naive and absorbed forms' shapes (no values read)."""
    ok = q_nope.dim() == q_pe.dim() == 4 and c_kv.dim() == k_pe.dim() == wkv_b.dim() == 3 and mask.dim() == 4
    if ok:
        B, S, H, Dn = q_nope.shape
        T, C, R = c_kv.shape[1], c_kv.shape[2], q_pe.shape[-1]
        ok = (q_pe.shape[:3] == (B, S, H) and c_kv.shape[0] == B and k_pe.shape == (B, T, R)
              and wkv_b.shape[0] == H and wkv_b.shape[1] > Dn and wkv_b.shape[2] == C
              and mask.shape == (B, 1, S, T) and mask.dtype == torch.bool)
    if not ok:
        raise ValueError(
            f"{name}: expected q_nope (B, S, H, Dn), q_pe (B, S, H, R), c_kv (B, T, C), k_pe (B, T, R), wkv_b "
            f"(H, Dn + Dv, C), mask (B, 1, S, T) bool; got {tuple(q_nope.shape)}, {tuple(q_pe.shape)}, "
            f"{tuple(c_kv.shape)}, {tuple(k_pe.shape)}, {tuple(wkv_b.shape)}, {tuple(mask.shape)} {mask.dtype}")


def mla_attention_naive(
    q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, wkv_b: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """MLA over the latent cache, naive form: expand every cached latent to per-head keys and values.

    q_nope: (B, S, H, Dn), q_pe: (B, S, H, R) (RoPE applied), c_kv: (B, T, C) normalised latents,
    k_pe: (B, T, R) RoPE'd shared keys, wkv_b: (H, Dn + Dv, C) = kv_b_proj.weight viewed per head,
    mask: (B, 1, S, T) -> (B, S, H, Dv).
    """
    _check_mla(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, "mla_attention_naive")
    Dn, acc = q_nope.shape[-1], _acc(q_nope, q_pe, c_kv, k_pe, wkv_b)
    kv = torch.einsum("btc,hdc->bthd", c_kv.to(acc), wkv_b.to(acc))  # (B, T, H, Dn + Dv)
    k_nope, v = kv[..., :Dn], kv[..., Dn:]
    scores = torch.einsum("bshd,bthd->bhst", q_nope.to(acc), k_nope)  # (B, H, S, T)
    scores = (scores + torch.einsum("bshr,btr->bhst", q_pe.to(acc), k_pe.to(acc))) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhst,bthd->bshd", probs, v).to(q_nope.dtype)  # (B, S, H, Dv)


def mla_attention_absorbed(
    q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, wkv_b: torch.Tensor,
    mask: torch.Tensor, scale: float,
) -> torch.Tensor:
    """MLA over the latent cache, absorbed form (REFERENCE.md 2.6; same signature as the naive form):
    W_UK is folded into the query, the weighted sum runs over the C-wide latents, and W_UV is applied
    to the result, so no per-head key or value is ever formed.
    """
    _check_mla(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, "mla_attention_absorbed")
    Dn, acc = q_nope.shape[-1], _acc(q_nope, q_pe, c_kv, k_pe, wkv_b)
    w_uk, w_uv = wkv_b[:, :Dn].to(acc), wkv_b[:, Dn:].to(acc)  # (H, Dn, C), (H, Dv, C)
    q_lat = torch.einsum("bshd,hdc->bshc", q_nope.to(acc), w_uk)  # (B, S, H, C)
    scores = torch.einsum("bshc,btc->bhst", q_lat, c_kv.to(acc))  # (B, H, S, T)
    scores = (scores + torch.einsum("bshr,btr->bhst", q_pe.to(acc), k_pe.to(acc))) * scale
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
    o_lat = torch.einsum("bhst,btc->bshc", probs, c_kv.to(acc))  # (B, S, H, C)
    return torch.einsum("bshc,hdc->bshd", o_lat, w_uv).to(q_nope.dtype)  # (B, S, H, Dv)


def check_mla_decode_args(
    q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor, head_dim_v: int,
    block_table: torch.Tensor | None = None, pe_cache: torch.Tensor | None = None,
) -> tuple[int, int, int, int, int]:
    """The shapes and dtypes that ``mla_decode_ref`` and the kernels (``minids.kernels.mla_decode``) take, one clear
    line for each violation; reads no values. Returns (B, s_q, H, C, R)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, s_q, heads, C + R), got shape {tuple(q.shape)}")
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int):
        raise ValueError(f"head_dim_v must be an int (C, the latent width), got {type(head_dim_v).__name__} (the "
                         "arguments are (q, kv_cache, cache_seqlens, head_dim_v, scale), block_table by keyword)")
    B, s_q, H, D = q.shape
    C = head_dim_v
    R = D - C
    if R < 0:
        raise ValueError(f"q's last dimension {D} is smaller than head_dim_v={C}")
    if kv_cache.dim() != 3:
        hint = ("; a FlashMLA k_cache (pages, page_size, 1, width): pass k_cache[:, :, 0]"
                if kv_cache.dim() == 4 and kv_cache.shape[2] == 1 else "")
        raise ValueError("kv_cache must be (batch, tokens, width) or (pages, page_size, width), got "
                         f"{tuple(kv_cache.shape)}{hint}")
    want = C if pe_cache is not None else C + R
    if kv_cache.shape[-1] != want:
        raise ValueError(f"kv_cache's last dimension is {kv_cache.shape[-1]}, expected {want} (C={C}, R={R}"
                         f"{', the RoPE part in pe_cache' if pe_cache is not None else ''})")
    if pe_cache is not None and (pe_cache.shape[:2] != kv_cache.shape[:2] or pe_cache.shape[-1] != R):
        raise ValueError(f"pe_cache must be {tuple(kv_cache.shape[:2]) + (R,)}, got {tuple(pe_cache.shape)}")
    if block_table is None and kv_cache.shape[0] != B:
        raise ValueError(f"a contiguous kv_cache needs one row per sequence: {kv_cache.shape[0]} rows, batch {B}")
    if block_table is not None and (block_table.dim() != 2 or block_table.shape[0] != B):
        raise ValueError(f"block_table must be (batch={B}, max_pages), got {tuple(block_table.shape)}")
    if block_table is not None and (block_table.is_floating_point() or block_table.dtype == torch.bool):
        raise ValueError(f"block_table must hold page indices (integers), got {block_table.dtype}")
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.shape != (B,):
        got = tuple(cache_seqlens.shape) if isinstance(cache_seqlens, torch.Tensor) else type(cache_seqlens).__name__
        raise ValueError(f"cache_seqlens must be a (batch={B},) tensor, got {got}")
    if cache_seqlens.is_floating_point() or cache_seqlens.is_complex() or cache_seqlens.dtype == torch.bool:
        raise ValueError(f"cache_seqlens must hold integers, got {cache_seqlens.dtype}")
    floats = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # (float64: the reference's only)
    if kv_cache.dtype not in floats:
        raise ValueError(f"the cache must be bf16, fp16, fp32 (or float64, the reference only), got {kv_cache.dtype}")
    if q.dtype not in floats:
        raise ValueError(f"q must be bf16, fp16, fp32 (or float64, the reference only), got {q.dtype}")
    if pe_cache is not None and pe_cache.dtype != kv_cache.dtype:
        raise ValueError(f"pe_cache ({pe_cache.dtype}) and kv_cache ({kv_cache.dtype}) must share a dtype")
    return B, s_q, H, C, R


def mla_decode_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, cache_seqlens: torch.Tensor, head_dim_v: int, scale: float, *,
    causal: bool = True, block_table: torch.Tensor | None = None, pe_cache: torch.Tensor | None = None,
    num_splits: int | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the latent cache in the absorbed form, in float32 (the spec of ``minids.kernels.mla_decode``).

    The semantics are FlashMLA's ``flash_mla_with_kvcache`` (lengths that include the new tokens, the
    bottom-right causal mask, natural-log lse (B, H, s_q), the value as the first C columns of the same cache
    rows), not its signature: the cache has no kv-head axis (FlashMLA's k_cache[:, :, 0]), the scale has no
    default, ``causal`` defaults to True (FlashMLA's to False), and a query that sees no token gets lse = -inf
    (FlashMLA writes +inf there; -inf is the log of the empty sum and the neutral element of a merge).
    Every head attends with the query q = [W_UK^T q_nope; q_pe] (C + R wide) to the single shared latent key
    [c_kv; k_pe] of each cached token, and the value is the latent c_kv itself (its first C = head_dim_v columns);
    W_UV is applied by the caller.

    q: (B, s_q, H, C + R) the absorbed queries of the s_q new tokens of each sequence.
    kv_cache: contiguous (B, T, C + R), or paged (num_pages, page_size, C + R) with ``block_table``;
        with ``pe_cache`` it holds only the latents, (B, T, C) or (num_pages, page_size, C), and
        pe_cache the RoPE'd keys, (B, T, R) or (num_pages, page_size, R) (the two tensors of ``KVCache``).
    cache_seqlens: (B,) int tokens of each sequence in the cache, the s_q new ones included.
    head_dim_v: C, the latent width (kv_lora_rank).
    scale: the softmax scale (``ModelConfig.softmax_scale``).
    causal: query i of s_q sees cache positions t < len - s_q + 1 + i (the new tokens are the last s_q
        entries); otherwise every query sees t < len.
    block_table: (B, max_pages) int32: page p of sequence b is kv_cache[block_table[b, p]]; entries past a
        sequence's last page are never read (they may hold anything).
    num_splits: a scheduling hint of the kernel (how many programs share the work); the result does
        not depend on it, and the reference ignores it.
    out: optional preallocated (out, lse) to write the result into (and return).
    Returns out (B, s_q, H, C) in q.dtype and lse (B, H, s_q) float32, the natural-log sum of exp of the
    scaled scores. A query that sees no token gets out = 0 and lse = -inf. Float64 inputs are computed in
    float64 (lse too), for oracles that want the digits; the kernels take 16- and 32-bit inputs only.
    """
    B, s_q, _, C, R = check_mla_decode_args(q, kv_cache, cache_seqlens, head_dim_v, block_table, pe_cache)
    D = C + R
    lens = cache_seqlens.long().to(q.device)
    capacity = block_table.shape[1] * kv_cache.shape[1] if block_table is not None else kv_cache.shape[1]
    checks = B > 0 and not (q.is_cuda and torch.cuda.is_current_stream_capturing())  # (the checks read values)
    if checks and not (0 <= int(lens.min()) and int(lens.max()) <= capacity):
        raise ValueError(f"cache_seqlens must lie in [0, {capacity}] (the cache's tokens per sequence"
                         f"{', max_pages x page_size' if block_table is not None else ''}), got "
                         f"{int(lens.min())}..{int(lens.max())}")
    if block_table is not None:
        page = kv_cache.shape[1]
        n_pages = block_table.shape[1]
        need = (lens + page - 1) // page  # (B,) pages each sequence uses
        used = torch.arange(n_pages, device=q.device)[None, :] < need[:, None]
        if checks and (bad := used & ((block_table < 0) | (block_table >= kv_cache.shape[0]))).any():
            b, p = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {p}] = {int(block_table[b, p])} is not a page of kv_cache (0.."
                             f"{kv_cache.shape[0] - 1}), and sequence {b} of {int(lens[b])} tokens uses it")
        idx = torch.where(used, block_table.long(), 0)  # (B, P): never index with an unused entry
        kv = kv_cache[idx].flatten(1, 2)  # (B, P * page, C + R) or (B, P * page, C)
        pe = pe_cache[idx].flatten(1, 2) if pe_cache is not None else None  # (B, P * page, R)
    else:
        kv, pe = kv_cache, pe_cache
    if pe is not None:
        kv = torch.cat([kv[..., :C], pe], dim=-1)  # (B, T, C + R)
    T = kv.shape[1]
    stored = torch.arange(T, device=q.device)[None, :] < lens[:, None]  # (B, T)
    acc = _acc(q, kv)
    kv = torch.where(stored[..., None], kv.to(acc), 0.0)  # slots past a length may hold anything, NaN included
    scores = torch.einsum("bshd,btd->bhst", q.to(acc), kv[..., :D]) * scale  # (B, H, s_q, T)
    limit = lens[:, None] - (s_q - 1 - torch.arange(s_q, device=q.device))[None, :] if causal \
        else lens[:, None].expand(B, s_q)  # (B, s_q): query i sees t < limit[b, i]
    visible = torch.arange(T, device=q.device)[None, None, :] < limit[:, :, None]  # (B, s_q, T)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, s_q); -inf where nothing is visible
    probs = torch.exp(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])  # (B, H, s_q, T); 0 where masked
    o = torch.einsum("bhst,btc->bshc", probs, kv[..., :C]).to(q.dtype)  # (B, s_q, H, C)
    if out is not None:
        out[0].copy_(o)
        out[1].copy_(lse)
        return out
    return o, lse


def _mla_kernel_wanted(impl: str, t: torch.Tensor) -> bool:
    """Whether the cache's mla_impl sends decoding to ``minids.kernels.mla_decode``: "triton" always (an error
    where it cannot run), "auto" for bf16/fp16 caches on CUDA when Triton is installed (the kernel's fp32 mode
    is for exactness, not speed); the CPU keeps the torch path."""
    if impl == "auto":
        return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16) and kernels_available()
    if impl != "triton":
        return False
    require_kernels("mla_impl='triton'")
    from minids.kernels import runs_here

    if not runs_here(t):
        raise ValueError("mla_impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); "
                         "use mla_impl='absorbed' or 'auto'")
    return True


class MLA(nn.Module):
    """Multi-head Latent Attention, naive (training) form. x: (B, S, D) -> (B, S, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H = cfg.hidden_size, cfg.num_attention_heads
        self.n_heads, self.dn, self.dr, self.dv = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.softmax_scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        qk = self.dn + self.dr
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, cfg.kv_lora_rank + self.dr, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, H * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(H * self.dv, D, bias=False)

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, S, D) -> q: (B, S, H, Dn + R), before RoPE."""
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.unflatten(-1, (self.n_heads, self.dn + self.dr))  # (B, S, H, Dn + R)

    def project_kv_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, S, D) -> normalised latent c_kv (B, S, C) and the pre-RoPE shared key k_pe (B, S, R)."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.dr], dim=-1)  # (B,S,C), (B,S,R)
        return self.kv_a_layernorm(c_kv), k_pe

    def _decode_kernel(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, wkv_b: torch.Tensor,
        seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """The absorbed form through the Triton kernel, reading the cache's c_kv (B, T, C) and k_pe (B, T, R) in place.

        seqlens (B,) = cache lengths + S: query j of sequence b sees slots t < lengths[b] + j + 1, which is
        ``KVCache.mask`` for every real token (padding tokens' outputs are discarded by the caller).
        -> (B, S, H, Dv).
        """
        from minids.kernels.mla_decode import mla_decode

        w_uk, w_uv = wkv_b[:, : self.dn], wkv_b[:, self.dn :]  # (H, Dn, C), (H, Dv, C)
        q_lat = torch.einsum("bshd,hdc->bshc", q_nope, w_uk.to(q_nope.dtype))  # (B, S, H, C)
        q = torch.cat([q_lat, q_pe], dim=-1).to(c_kv.dtype)  # (B, S, H, C + R)
        o_lat, _ = mla_decode(q, c_kv, seqlens, self.kv_lora_rank, self.softmax_scale, causal=True, pe_cache=k_pe)
        return torch.einsum("bshc,hdc->bshd", o_lat, w_uv.to(o_lat.dtype)).to(q_nope.dtype)  # (B, S, H, Dv)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D). With a ``KVCache``: decode over the cached latents (absorbed, naive or the
        Triton kernel, by ``cache.mla_impl``)."""
        B, S, _ = x.shape
        q = self.project_q(x)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)  # (B, S, H, Dn), (B, S, H, R)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        c_kv, k_pe = self.project_kv_latent(x)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, self.interleave)  # (B, S, 1, R)
        if cache is not None:
            c = cache.write(layer, c_kv, k_pe.squeeze(2))  # the cache keeps only c_kv and the RoPE'd k_pe
            wkv_b = self.kv_b_proj.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)  # (H, Dn+Dv, C)
            if _mla_kernel_wanted(cache.mla_impl, c.a):
                o = self._decode_kernel(q_nope, q_pe, c.a, c.b, wkv_b, cache.step_seqlens)  # (B, S, H, Dv)
            else:
                fn = mla_attention_naive if cache.mla_impl == "naive" else mla_attention_absorbed
                o = fn(q_nope, q_pe, c.a, c.b, wkv_b, cache.step_mask, self.softmax_scale)  # (B, S, H, Dv)
            return self.o_proj(o.reshape(B, S, self.n_heads * self.dv))
        kv = self.kv_b_proj(c_kv).unflatten(-1, (self.n_heads, self.dn + self.dv))  # (B, S, H, Dn + Dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, S, H, Dn), (B, S, H, Dv)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, S, Dn + R)
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)  # (B, H, S, Dn + R)
        o = attention(q, k, v.transpose(1, 2), self.softmax_scale)  # (B, H, S, Dv)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.dv))  # (B, S, D)


class MHA(nn.Module):
    """Multi-head (or grouped-query) attention of the dense models and DeepSeekMoE-16B. (B, S, D) -> (B, S, D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D = cfg.hidden_size
        self.n_heads, self.n_kv, self.dh = cfg.num_attention_heads, cfg.num_kv_heads, cfg.mha_head_dim
        self.softmax_scale = cfg.softmax_scale
        self.interleave = cfg.rope_interleave
        self.q_proj = nn.Linear(D, self.n_heads * self.dh, bias=False)
        self.k_proj = nn.Linear(D, self.n_kv * self.dh, bias=False)
        self.v_proj = nn.Linear(D, self.n_kv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dh, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        """x: (B, S, D) -> (B, S, D). With a ``KVCache``: attend over the cached keys and values."""
        B, S, _ = x.shape
        q = apply_rope(self.q_proj(x).unflatten(-1, (self.n_heads, self.dh)), cos, sin, self.interleave)  # (B,S,H,Dh)
        k = apply_rope(self.k_proj(x).unflatten(-1, (self.n_kv, self.dh)), cos, sin, self.interleave)  # (B,S,Hkv,Dh)
        v = self.v_proj(x).unflatten(-1, (self.n_kv, self.dh))  # (B, S, Hkv, Dh)
        rep = self.n_heads // self.n_kv
        if cache is not None:
            c = cache.write(layer, k, v)
            k_all = c.a.repeat_interleave(rep, dim=2)  # (B, T, H, Dh)
            v_all = c.b.repeat_interleave(rep, dim=2)
            o = masked_attention(q, k_all, v_all, cache.step_mask, self.softmax_scale)  # (B, S, H, Dh)
            return self.o_proj(o.reshape(B, S, self.n_heads * self.dh))
        k = k.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, H, S, Dh): query head h reads kv head h // rep
        v = v.repeat_interleave(rep, dim=2).transpose(1, 2)  # (B, H, S, Dh)
        o = attention(q.transpose(1, 2), k, v, self.softmax_scale)  # (B, H, S, Dh)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.dh))  # (B, S, D)
