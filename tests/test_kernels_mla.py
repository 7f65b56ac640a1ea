"""MLA decode kernel (minids.kernels.mla_decode) against its reference (minids.attention.mla_decode_ref).

On the CPU the kernel runs under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) in
float32 with small shapes; on a GPU the same file runs the compiled, autotuned kernel in bf16.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from minids.kernels import COUNTER_BUFFERS, HAVE_TRITON
from minids.kernels.mla_decode import mla_decode, schedule_ref

import minids
from minids.attention import mla_attention_absorbed, mla_decode_ref

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")

device = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 under the interpreter (its bf16 arithmetic is not the GPU's); bf16, the kernel's real dtype, on CUDA
dtype = torch.bfloat16 if device == "cuda" else torch.float32
# Tolerances, as relative Frobenius error of out and absolute error of lse. fp32: only the summation order
# differs from the float32 reference (measured ~1e-7). bf16: the queries and cache are the same bf16 values
# in both, and scores accumulate in fp32, but the kernel rounds the probabilities to bf16 before p @ c_kv
# (relative 2^-9 each) and writes bf16 outputs: ~3e-3 expected, 1e-2 allowed (METHOD.md's bf16 band).
OUT_TOL = 1e-2 if dtype == torch.bfloat16 else 2e-5
LSE_TOL = 1e-2 if dtype == torch.bfloat16 else 2e-5
PAGE = 64


@pytest.fixture(autouse=True)
def _triton_kernel(monkeypatch):
    """This file tests the Triton kernel, which every call the Gluon kernels cannot take still runs (other GPUs,
    small-v3's latent): on an H200 the default would send V3's latent to them (tests/test_kernels_mla_gluon.py)."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", False)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def make_cache(lens: list[int], C: int, R: int, layout: str, gen: torch.Generator, page_size: int = PAGE):
    """A cache holding random latents for sequences of the given lengths, in one of three layouts.

    Every slot that no sequence owns (the contiguous tail, the unused pages) is NaN, so a kernel that reads
    past a length produces NaN; unused block-table entries are -1 (out of range) for the same reason.
    Returns (kv_cache, pe_cache or None, block_table or None, dense (B, T, C + R) copy for the reference).
    """
    B = len(lens)
    T = max(PAGE, -(-max(lens) // PAGE) * PAGE) + 3  # a capacity that is no multiple of the tile
    dense = torch.randn(B, T, C + R, generator=gen).to(dtype)
    for b, n in enumerate(lens):
        dense[b, n:] = float("nan")
    if layout == "contiguous":
        return dense.to(device), None, None, dense
    if layout == "split":  # KVCache's two tensors: c_kv (B, T, C) and k_pe (B, T, R)
        return dense[..., :C].contiguous().to(device), dense[..., C:].contiguous().to(device), None, dense
    # paged: pages of page_size (64) tokens, the sequences' pages shuffled in one pool with spare NaN pages
    max_pages = -(-T // page_size)
    need = [-(-n // page_size) for n in lens]
    n_pages = sum(need) + 3
    pool = torch.full((n_pages, page_size, C + R), float("nan"), dtype=dtype)
    order = torch.randperm(n_pages, generator=gen)
    table = torch.full((B, max_pages), -1, dtype=torch.int32)
    k = 0
    for b, n in enumerate(lens):
        for p in range(need[b]):
            page = int(order[k])
            k += 1
            table[b, p] = page
            rows = dense[b, p * page_size: min((p + 1) * page_size, n)]
            pool[page, : rows.shape[0]] = rows
    return pool.to(device), None, table.to(device), dense


def _poisoned_out(B, s_q, H, C, out_layout):
    """A NaN-filled (B, s_q, H, C) output: dense; "padded", its rows 64 columns apart in a wider buffer; or
    "heads_major", a (B, H, s_q, C) buffer seen through a permutation (its rows not at one stride when s_q > 1)."""
    if out_layout == "padded":
        return torch.full((B, s_q, H, C + 64), float("nan"), dtype=dtype, device=device)[..., :C]
    if out_layout == "heads_major":
        return torch.full((B, H, s_q, C), float("nan"), dtype=dtype, device=device).permute(0, 2, 1, 3)
    return torch.full((B, s_q, H, C), float("nan"), dtype=dtype, device=device)


def check(lens, s_q, H, C, R, layout, num_splits=None, causal=True, seed=0, page_size=PAGE, config=None,
          out_layout="dense"):
    gen = torch.Generator().manual_seed(seed)
    kv, pe, table, dense = make_cache(lens, C, R, layout, gen, page_size)
    B = len(lens)
    q = torch.randn(B, s_q, H, C + R, generator=gen).to(dtype).to(device)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    scale = (C + R) ** -0.5 * 1.7  # not 1/sqrt(d): the scale must be applied, not assumed
    want_o, want_lse = mla_decode_ref(q, dense.to(device), seqlens, C, scale, causal=causal)
    out = (_poisoned_out(B, s_q, H, C, out_layout),  # NaN-poisoned outputs
           torch.full((B, H, s_q), float("nan"), dtype=torch.float32, device=device))
    got_o, got_lse = mla_decode(
        q, kv, seqlens, C, scale, causal=causal, block_table=table, pe_cache=pe, num_splits=num_splits, out=out,
        config=config)
    assert got_o is out[0] and got_lse is out[1]
    assert not got_o.isnan().any() and not got_lse.isnan().any(), "unwritten or NaN-contaminated output"
    assert torch.equal(got_lse.isinf(), want_lse.isinf())  # the same queries see no token
    assert torch.equal(got_lse == float("-inf"), want_lse == float("-inf"))  # -inf there (FlashMLA: +inf)
    assert rel_err(got_o, want_o) < OUT_TOL
    fin = want_lse.isfinite()
    assert (got_lse[fin] - want_lse[fin]).abs().max().item() < LSE_TOL
    return got_o, got_lse


@pytest.mark.parametrize("layout", ["contiguous", "split", "paged"])
@pytest.mark.parametrize("s_q", [1, 2])
def test_ragged_lengths_all_layouts(layout, s_q):
    """The issue's ragged lengths (1, 63, 64, 65, 4097) with the tiny configs' widths (C=64, R=16), 8 heads,
    balanced over 5 programs (the long sequence is cut into pieces: the fused combine)."""
    check([1, 63, 64, 65, 4097], s_q, H=8, C=64, R=16, layout=layout, num_splits=5)


@pytest.mark.parametrize("num_splits", [1, 2, 64])
def test_split_counts(num_splits):
    """One program (every sequence whole, written directly), two, and more programs than tiles (most of them
    with nothing to do)."""
    check([5, 64, 130], 2, H=4, C=64, R=16, layout="contiguous", num_splits=num_splits)


@pytest.mark.parametrize("C,R,H,s_q", [(512, 64, 16, 1), (512, 64, 16, 2), (256, 32, 16, 2), (512, 64, 40, 2)])
def test_config_widths(C, R, H, s_q):
    """V3's latent (512 + 64) and small-v3's (256 + 32); 16 and 32 rows per program, and 80 rows (two row
    blocks of 64, the second partial); default split choice."""
    check([1, 65, 200], s_q, H=H, C=C, R=R, layout="paged" if s_q == 2 else "split")


def test_counters_reset_and_deterministic():
    """The fused combine leaves its arrival counters at zero (the next call reuses them), and two runs give
    bitwise the same result (the pieces are merged in a fixed order, whichever arrives last)."""
    lens = [3, 700, 129, 0, 257]
    a = check(lens, 2, H=8, C=64, R=16, layout="contiguous", num_splits=16, seed=3)
    assert all(int(c.abs().sum()) == 0 for bufs in COUNTER_BUFFERS.values() for c in bufs)
    b = check(lens, 2, H=8, C=64, R=16, layout="contiguous", num_splits=16, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_large_batch_and_piece_cap(monkeypatch):
    """More sequences than one block of lengths (the schedule's loops over the batch), and the cap on the
    pieces of one sequence (a long sequence among short ones)."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "MAX_BLOCK_B", 16)
    gen = torch.Generator().manual_seed(5)
    check(torch.randint(0, 150, (40,), generator=gen).tolist(), 1, H=4, C=32, R=16, layout="paged", num_splits=7)
    monkeypatch.setattr(mod, "MAX_PIECES", 3)
    check([1000, 5, 0, 70], 1, H=4, C=32, R=16, layout="contiguous", num_splits=12)
    _, work = schedule_ref([1000, 5, 0, 70], 12, min_units=1, max_pieces=3)
    assert sum(b == 0 for pieces in work for b, *_ in pieces) == 3  # not 12


def test_pages_smaller_than_a_tile():
    """Pages that hold less than a tile (a table entry per token) and pages of no power-of-two size."""
    check([1, 63, 64, 65, 300], 2, H=4, C=64, R=16, layout="paged", num_splits=3, page_size=8)
    check([5, 100, 250], 1, H=4, C=64, R=16, layout="paged", page_size=24)


def test_odd_widths_and_non_causal():
    """A latent width that is no power of two (masked columns), 3 heads (rows < 16), no causal mask."""
    check([3, 70], 2, H=3, C=48, R=8, layout="contiguous", causal=False, num_splits=2)


def test_empty_sequences():
    """Length 0 (and a causal query with nothing before it): out 0, lse -inf, with and without splits."""
    for num_splits in (1, 3):
        check([0, 1, 129], 2, H=4, C=64, R=16, layout="contiguous", num_splits=num_splits)
        check([0, 1, 129], 2, H=4, C=64, R=16, layout="paged", num_splits=num_splits)


def test_reference_matches_model_absorbed_form():
    """mla_decode_ref, fed W_UK-absorbed queries and followed by W_UV, is the model's absorbed attention
    (``mla_attention_absorbed``) under the cache's causal mask: the reference is tied to the model's math."""
    gen = torch.Generator().manual_seed(1)
    B, S, H, Dn, R, Dv, C, T = 2, 2, 3, 8, 4, 6, 16, 9
    q_nope, q_pe = torch.randn(B, S, H, Dn, generator=gen), torch.randn(B, S, H, R, generator=gen)
    c_kv, k_pe = torch.randn(B, T, C, generator=gen), torch.randn(B, T, R, generator=gen)
    wkv_b = torch.randn(H, Dn + Dv, C, generator=gen)
    lens = torch.tensor([4, 9])
    t = torch.arange(T)
    mask = (t[None, None, :] < (lens[:, None] - S + 1 + torch.arange(S)[None, :])[:, :, None]).unsqueeze(1)
    want = mla_attention_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, 0.3)  # (B, S, H, Dv)
    q = torch.cat([torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :Dn]), q_pe], dim=-1)
    o_lat, _ = mla_decode_ref(q, c_kv, lens, C, 0.3, pe_cache=k_pe)
    got = torch.einsum("bshc,hdc->bshd", o_lat, wkv_b[:, Dn:])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_schedule_balances_ragged_lengths():
    """The work-balanced schedule (the kernel's, in Python): every token of every sequence is computed by
    exactly one piece, no program gets more than W units, a cut sequence's pieces have distinct slots, and
    ragged lengths do not unbalance the programs (the longest slice is W, whatever the lengths)."""
    gen = torch.Generator().manual_seed(0)
    for lens, P in [([1024] * 32, 264), (torch.randint(0, 2049, (32,), generator=gen).tolist(), 264),
                    ([0, 5, 70000, 3, 0], 132), ([0, 0], 8), ([65, 1, 4097], 1)]:
        W, work = schedule_ref(lens, P)
        got = {b: [] for b in range(len(lens))}
        slots = set()
        for p, pieces in enumerate(work):
            units = sum(-(-(e - s) // 64) for _, s, e, _ in pieces)
            assert units <= W
            for b, s, e, slot in pieces:
                got[b].append((s, e))
                if slot is not None:
                    assert slot // 2 == p and slot not in slots
                    slots.add(slot)
        for b, n in enumerate(lens):  # the pieces tile [0, len) in order
            spans = sorted(got[b])
            assert spans[0][0] == 0 and spans[-1][1] == n and len(spans) <= 32
            assert all(x[1] == y[0] for x, y in itertools.pairwise(spans))
        tiles = [math.ceil(n / 64) for n in lens]
        assert W == max(math.ceil((sum(tiles) + len(lens)) / P), 4, math.ceil(max(tiles) / 31))


def test_bad_inputs_are_one_line_errors():
    q = torch.zeros(2, 1, 4, 80, device=device, dtype=dtype)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="kv_cache's last dimension"):
        mla_decode(q, torch.zeros(2, 8, 70, device=device, dtype=dtype), lens, 64, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        mla_decode(q, torch.zeros(3, 64, 80, device=device, dtype=dtype), lens, 64, 0.1,
                   block_table=torch.zeros(3, 1, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="cache_seqlens must hold integers"):
        mla_decode(q, torch.zeros(2, 8, 80, device=device, dtype=dtype), lens.float() + 0.7, 64, 0.1)


def test_greedy_decoding_kernel_equals_reference():
    """Greedy generation with the kernel path (KVCache.mla_impl="triton": prefill of a ragged batch, then
    one-token steps) gives the absorbed reference path's tokens, on tiny-v3 (8 heads, C=64, R=16)."""
    from minids.generate import generate

    torch.manual_seed(0)
    model = minids.Transformer("tiny-v3").to(device).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    want = generate(model, prompts, 4, mla_impl="absorbed")
    assert generate(model, prompts, 4, mla_impl="triton") == want


# Fixed configs (mla_decode(config=...)), the paths bench/sweep_mla.py compares: V_SPLIT=2 (two programs per row
# block, each writing half the output columns; 128-row blocks are H=128's default), 16-row blocks for 32 rows,
# and the smallest slices (MIN_UNITS=1).
_VARIANTS = {
    "v_split": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "OCC": 1, "V_SPLIT": 2},
    "m128_v_split": {"BLOCK_M": 128, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1, "OCC": 1, "V_SPLIT": 2},
    "two_row_blocks": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "OCC": 2},
    "min_units_1": {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "OCC": 1, "MIN_UNITS": 1},
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
@pytest.mark.parametrize("layout,s_q", [("contiguous", 1), ("paged", 2)])
def test_config_variants(variant, layout, s_q):
    """Each variant on ragged lengths with an empty sequence (cut into pieces by the default schedule: 8
    programs on the CPU), on fixed lengths, and with forced splits (the fused combine per column part)."""
    cfg = _VARIANTS[variant]
    H = 64 if cfg["BLOCK_M"] == 128 else 16  # 128 rows at s_q = 2 (64 at s_q = 1: one part-empty block)
    check([0, 1, 65, 300], s_q, H=H, C=64, R=16, layout=layout, config=cfg)
    check([128, 128], s_q, H=H, C=64, R=16, layout=layout, config=cfg, num_splits=3)


def test_v_split_only_for_wide_latents():
    """The default splits the output columns of 128-row blocks only for a wide latent (C >= 256): each half must
    stay >= 16 columns (tl.dot's minimum K on the GPU) and narrow ones gain nothing. A config asking for a split of
    a 16-column latent is one clear error."""
    from minids.kernels import mla_decode as mod

    check([5, 70], 1, H=128, C=64, R=16, layout="contiguous")
    assert mod.LAST_LAUNCH["block_m"] == 128 and mod.LAST_LAUNCH["cfg"]["V_SPLIT"] == 1
    check([5, 70], 1, H=128, C=256, R=16, layout="contiguous")
    assert mod.LAST_LAUNCH["cfg"]["V_SPLIT"] == 2
    with pytest.raises(ValueError, match="V_SPLIT"):
        check([5], 1, H=16, C=16, R=16, layout="contiguous", config={**_VARIANTS["v_split"]})


@pytest.mark.parametrize("config", [{}, {"BLOCK_M": 16}, {"BLOCK_M": 24, "BLOCK_N": 32, "OCC": 1, "num_warps": 4,
                                                           "num_stages": 1}])
def test_bad_config_is_one_line(config):
    with pytest.raises(ValueError, match="config=.*BLOCK_M a power of two"):
        check([5], 1, H=16, C=64, R=16, layout="contiguous", config=config)


def test_default_config_matches_pick_config():
    """pick_config is the default path's choice (sweeps read it as their base): V_SPLIT 2 only for a wide latent."""
    from minids.kernels.mla_decode import pick_config

    assert pick_config(128, C=64)[1]["V_SPLIT"] == 1 and pick_config(128, C=512)[1]["V_SPLIT"] == 2
    assert pick_config(16, C=512)[1]["V_SPLIT"] == 1


def test_v_split_deterministic_and_counters_reset():
    """The two column parts write disjoint columns and their own lse slots: bitwise repeatable, counters back to 0."""
    cfg = _VARIANTS["v_split"]
    a = check([3, 700, 0, 257], 2, H=8, C=48, R=8, layout="contiguous", num_splits=16, config=cfg)
    b = check([3, 700, 0, 257], 2, H=8, C=48, R=8, layout="contiguous", num_splits=16, config=cfg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(int(c.abs().sum()) == 0 for bufs in COUNTER_BUFFERS.values() for c in bufs)
