"""The static KV cache for decoding: MLA's compressed latent, or MHA/GQA keys and values.

For an MLA layer the cache holds, per token, only the normalised KV latent c_kv (kv_lora_rank values)
and the RoPE'd shared key k_pe (qk_rope_head_dim values): (C + R) elements per token per layer, 576
for V2/V3 (REFERENCE.md 2.5), against H * (Dn + R + Dv) = 40,960 for the per-head keys and values
that transformers caches for V3. For MHA/GQA layers it holds RoPE'd keys and values per kv head.

The cache is allocated once for ``batch`` sequences of up to ``max_len`` tokens (static shapes), and
``lengths[b]`` counts the tokens of sequence b already in it; new tokens go to positions
lengths[b], lengths[b] + 1, ... Rolling back rejected tokens (speculative decoding) is lowering
``lengths``; entries past a sequence's length are masked and later overwritten. One extra slot at
index max_len takes the writes of padding tokens (ragged batches), so they never touch real entries.

Shapes: B batch, T max_len, S new tokens, C kv_lora_rank, R rope dim, Hkv kv heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from minids.config import ModelConfig

__all__ = ["KVCache", "LayerCache"]


@dataclass
class LayerCache:
    """One layer's storage: MLA (c_kv (B, T, C), k_pe (B, T, R)) or MHA (k, v: (B, T, Hkv, Dh))."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class KVCache:
    """Static per-layer cache of the main layers, or (``allocate(..., mtp=True)``) of the MTP layers."""

    layers: list[LayerCache]
    lengths: torch.Tensor  # (B,) int64 tokens stored per sequence; each forward advances it in place
    max_len: int
    # "absorbed" (attention in latent space, torch), "naive" (expand the latent each step), "triton" (the absorbed
    # form through minids.kernels.mla_decode), "auto" (triton for bf16/fp16 on CUDA with Triton, else absorbed)
    mla_impl: str = "auto"
    first_layer: int = 0  # layer index of layers[0] (the MTP layers get a cache of their own)
    new_lens: torch.Tensor | None = field(default=None, repr=False)  # (B,) valid new tokens of the current step
    _slots: torch.Tensor | None = field(default=None, repr=False)  # (B, S) where this step's tokens are written
    _rows: torch.Tensor | None = field(default=None, repr=False)  # (B, 1) the batch index of each slot
    _mask: torch.Tensor | None = field(default=None, repr=False)  # this step's attention mask, built on first use
    _seqlens: torch.Tensor | None = field(default=None, repr=False)  # this step's lengths + S, built on first use

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, batch: int, max_len: int, *, dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu", mla_impl: str = "auto", mtp: bool = False,
    ) -> KVCache:
        """The main model's layers, or with ``mtp=True`` the MTP layers' (layer indices L .. L+D-1)."""
        if max_len > cfg.max_position_embeddings:
            raise ValueError(f"cache of {max_len} tokens exceeds max_position_embeddings={cfg.max_position_embeddings}")
        if mla_impl not in ("auto", "absorbed", "naive", "triton"):
            raise ValueError(f"mla_impl={mla_impl!r}: one of auto, absorbed, naive, triton")
        n = cfg.num_nextn_predict_layers if mtp else cfg.num_hidden_layers
        if n == 0:
            raise ValueError("the config has no MTP layers (num_nextn_predict_layers=0)")
        T = max_len + 1  # + the padding slot
        layers = []
        for _ in range(n):
            if cfg.is_mla:
                a = torch.zeros(batch, T, cfg.kv_lora_rank, dtype=dtype, device=device)
                b = torch.zeros(batch, T, cfg.qk_rope_head_dim, dtype=dtype, device=device)
            else:
                shape = (batch, T, cfg.num_kv_heads, cfg.mha_head_dim)
                a = torch.zeros(shape, dtype=dtype, device=device)
                b = torch.zeros(shape, dtype=dtype, device=device)
            layers.append(LayerCache(a, b))
        first = cfg.num_hidden_layers if mtp else 0
        return cls(layers, torch.zeros(batch, dtype=torch.long, device=device), max_len, mla_impl, first)

    def bytes_per_token(self) -> int:
        """Cached bytes per token over all layers (REFERENCE.md 2.5's formula times the element size)."""
        return sum(t.a[0, 0].numel() * t.a.element_size() + t.b[0, 0].numel() * t.b.element_size() for t in self.layers)

    def positions(self, S: int) -> torch.Tensor:
        """(B, S) absolute positions of the next S tokens of every sequence."""
        return self.lengths[:, None] + torch.arange(S, device=self.lengths.device)[None, :]

    def begin(self, S: int, new_lens: torch.Tensor) -> torch.Tensor:
        """Start a forward of S new tokens per sequence, new_lens (B,) of them real -> their positions (B, S).

        Computes once per forward what every layer shares: the slots the tokens are written to (padding tokens go
        to the spare slot) and, when a layer first asks for them, the attention mask (torch attention) or the
        sequence lengths (the Triton MLA kernel). In a decode step of a small model these few index ops per layer are
        a visible share of the kernels.
        """
        B = self.lengths.shape[0]
        if new_lens.shape != (B,) or new_lens.is_floating_point() or new_lens.dtype == torch.bool:
            raise ValueError(f"lengths must be ({B},) integers, one per sequence of the cache, got "
                             f"{tuple(new_lens.shape)} {new_lens.dtype}")
        # (their values, 0 <= new_lens <= S and lengths + new_lens <= max_len, are the caller's: a step reads nothing
        # back from the device; minids.decode checks its prompts once, before the first step)
        self.new_lens = new_lens
        pos = self.positions(S)  # (B, S)
        real = torch.arange(S, device=pos.device)[None, :] < new_lens[:, None]
        self._slots = torch.where(real, pos, self.max_len)
        self._rows = torch.arange(pos.shape[0], device=pos.device)[:, None]
        self._mask = self._seqlens = None
        return pos

    @property
    def step_mask(self) -> torch.Tensor:
        """(B, 1, S, T+1) this step's mask (``mask``), shared by every layer; after ``begin``."""
        if self._mask is None:
            self._mask = self.mask(self._slots.shape[1])
        return self._mask

    @property
    def step_seqlens(self) -> torch.Tensor:
        """(B,) int32 lengths + S: the cache slots the step's last query may see (the Triton MLA kernel's seqlens, in
        the dtype it takes, so no layer casts them), shared by every layer; after ``begin``."""
        if self._seqlens is None:
            self._seqlens = (self.lengths + self._slots.shape[1]).to(torch.int32)
        return self._seqlens

    def mask(self, S: int) -> torch.Tensor:
        """(B, 1, S, T+1) True where query j of sequence b may attend to cache slot t (causal, valid)."""
        qpos = self.positions(S)  # (B, S)
        t = torch.arange(self.max_len + 1, device=self.lengths.device)
        valid = t[None, :] < (self.lengths + self.new_lens)[:, None]  # (B, T)
        return ((t[None, None, :] <= qpos[:, :, None]) & valid[:, None, :]).unsqueeze(1)  # (B, 1, S, T)

    def write(self, layer: int, a_new: torch.Tensor, b_new: torch.Tensor) -> LayerCache:
        """Store S new entries per sequence at positions lengths[b] + j (one batched index_put; after ``begin``)."""
        c = self.layers[layer - self.first_layer]
        B, S = a_new.shape[:2]
        if self._slots is None or self._slots.shape != (B, S):
            raise ValueError(f"cache.write of {S} tokens before cache.begin({S}, new_lens) for this step")
        c.a[self._rows, self._slots] = a_new.to(c.a.dtype)
        c.b[self._rows, self._slots] = b_new.to(c.b.dtype)
        return c
