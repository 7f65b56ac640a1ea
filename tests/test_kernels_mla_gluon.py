"""The Gluon MLA decode path (kernels/mla_decode_gluon.py) against the reference, and its combine kernel.

The combine kernel is plain Triton and runs here on the CPU under the interpreter. The Gluon kernels run on sm_90 GPUs
only (Gluon has no interpreter); there these tests send ``mla_decode`` to them (``GLUON_MLA``) through the same
checks as tests/test_kernels_mla.py: ragged lengths, both cache layouts and KVCache's split one, NaN-poisoned outputs
and NaN past every length, with and without splits, causal or not.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from minids.kernels import HAVE_TRITON
from test_kernels_mla import check

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")

device = "cuda" if torch.cuda.is_available() else "cpu"


def _gluon_here() -> bool:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return False
    from minids.kernels import mla_decode_gluon

    return mla_decode_gluon.HAVE_GLUON


@pytest.mark.parametrize("lens,P,rows", [([5, 300, 0, 64, 1000], 3, 16), ([4097, 1, 63], 7, 32),
                                         ([200, 200, 200, 200], 9, 64), ([1, 2000], 40, 128),
                                         ([1000, 980, 1024], 10, 16)])
@pytest.mark.parametrize("part_dtype", [torch.float32, torch.bfloat16])
def test_combine_matches_torch(lens, P, rows, part_dtype):
    """The pieces of every cut sequence (``pieces_ref`` with P programs: balanced slices for ragged lengths, equal
    pieces for equal tile counts, the last two cases) merged in program order: random partials, a piece that saw
    nothing (-inf, zeros) for some rows, rows no piece saw (out 0, lse -inf). Slots no piece wrote hold NaN (a read of
    one would show), and sequences computed whole are left as they were (NaN here). The partials in float32
    (``PART_BF16`` off) or bfloat16 (the kernels' default), added in float32."""
    from minids.kernels.mla_decode_gluon import combine, combine_ref, pieces_ref

    gen = torch.Generator().manual_seed(P * 100 + rows)
    C, H = 512, 16
    o_part = torch.randn(2 * P, rows, C, generator=gen).to(part_dtype)
    l_part = torch.randn(2 * P, rows, generator=gen) * 4
    work = pieces_ref(lens, P, 1)
    used = sorted(slot for pieces in work for *_, slot in pieces if slot is not None)
    assert used, "the case must cut a sequence"
    unused = [j for j in range(2 * P) if j not in used]
    o_part[unused] = float("nan")
    l_part[unused] = float("nan")
    l_part[used[0], :3] = float("-inf")  # that piece saw nothing for these rows
    o_part[used[0], :3] = 0.0
    b0 = next(b for pieces in work for b, *_, slot in pieces if slot == used[0])
    cut = [slot for pieces in work for b, *_, slot in pieces if b == b0 and slot is not None]
    l_part[cut, 3:5] = float("-inf")  # no piece of that sequence saw these rows
    o_part[cut, 3:5] = 0.0
    B = len(lens)
    out = torch.full((B, rows // H, H, C), float("nan"))
    lse = torch.full((B, H, rows // H), float("nan"))
    want, want_lse = out.clone(), lse.clone()
    combine_ref(o_part, l_part, lens, 1, want, want_lse)
    assert (want_lse == float("-inf")).any(), "the case must have rows no piece saw"
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out, lse = out.to(device), lse.to(device)
    combine(o_part.to(device), l_part.to(device), seqlens, max(lens), 1, out, lse)
    out, lse = out.cpu(), lse.cpu()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(lse.isnan(), want_lse.isnan())
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    assert torch.equal(lse == float("-inf"), want_lse == float("-inf"))  # rows no piece saw: -inf (FlashMLA: +inf)
    fin = want_lse.isfinite()
    torch.testing.assert_close(lse[fin], want_lse[fin], rtol=1e-5, atol=1e-5)


def test_flag_on_leaves_other_calls_to_the_triton_kernel(monkeypatch):
    """GLUON_MLA takes only what the Gluon kernels can run: 64 rows of small-v3's latent (C=256, R=32: the wide kernel
    takes V3's only) and the tiny configs' (C=64) go to the Triton kernel on every device (and here, without an sm_90
    GPU, V3's too), with the reference's result."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    check([1, 63, 65], 1, H=64, C=256, R=32, layout="split", num_splits=2)
    assert "gluon" not in mod.LAST_LAUNCH["cfg"]
    check([1, 63, 65], 2, H=8, C=64, R=16, layout="contiguous", num_splits=2)
    assert "gluon" not in mod.LAST_LAUNCH["cfg"]
    if not _gluon_here():
        check([1, 63, 65], 1, H=16, C=512, R=64, layout="paged", num_splits=2)
        assert "gluon" not in mod.LAST_LAUNCH["cfg"]


GPU = pytest.mark.skipif(not _gluon_here(), reason="the Gluon MLA kernels run on sm_90 GPUs only (Gluon has no "
                                                   "interpreter mode)")


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "split", "paged"])
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2), (8, 2), (64, 1), (128, 1), (128, 2)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_gluon_ragged_lengths(layout, H, s_q, num_splits, monkeypatch):
    """The issue's ragged lengths (1, 63, 64, 65, 4097), V3's latent, the narrow (16 or 32 rows) and wide (64-row
    blocks) kernels, direct writes (one split) and the combine."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    check([1, 63, 64, 65, 4097], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow" if s_q * H <= 32 else "wide"}


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2), (128, 1)])
@pytest.mark.parametrize("num_splits", [None, 2, 7])
def test_gluon_equal_tile_counts(layout, H, s_q, num_splits, monkeypatch):
    """Lengths of equal tile counts (65..128 tokens: two tiles each; 4097: 65) take the equal-pieces schedule
    (``slices_ref``): whole sequences (P < B), or each cut into equal pieces merged by the combine."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    check([100, 128, 65], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([4097, 4097], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow" if s_q * H <= 32 else "wide"}


@GPU
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2), (128, 1)])
def test_gluon_empty_and_non_causal(H, s_q, monkeypatch):
    """Length 0 and a causal query with nothing before it (out 0, lse -inf); no causal mask. The empty sequence
    starts a slice: at 16 rows the narrow kernel issues that slice's first tile before the length is back
    (``NARROW_PRE``), then waits for it and skips its ring slot. With 7 programs the empty sequence's slice ends
    within its overhead units (``SEQ_OVERHEAD``): that slice still writes it whole."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    for num_splits in (1, 3, 7):
        check([0, 1, 129], s_q, H=H, C=512, R=64, layout="paged", num_splits=num_splits)
    check([3, 70, 300], s_q, H=H, C=512, R=64, layout="contiguous", causal=False, num_splits=2)
    assert "gluon" in mod.LAST_LAUNCH["cfg"]


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "split", "paged"])
@pytest.mark.parametrize("s_q", [1, 2])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_gluon_small_latent(layout, s_q, num_splits, monkeypatch):
    """small-v3's latent (C=256, R=32) on the narrow kernel (4 latent boxes; the 64-column RoPE box zero-filled past
    32 by the TMA, in the query and the cache; ``NARROW_TILES``' tiles, 128 tokens at 16 rows: a second half past the
    length read as zeros): ragged lengths, equal tile counts, an empty sequence, the combine or the in-kernel merge."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    check([1, 63, 64, 65, 4097], s_q, H=16, C=256, R=32, layout=layout, num_splits=num_splits)
    check([100, 128, 65], s_q, H=16, C=256, R=32, layout=layout, num_splits=num_splits)
    check([0, 1, 129], s_q, H=16, C=256, R=32, layout=layout, num_splits=num_splits)
    check([3, 70, 300], s_q, H=16, C=256, R=32, layout=layout, causal=False, num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow"}


@pytest.mark.parametrize("lens,P", [([5, 300, 0, 64, 1000], 3), ([4097, 1, 63], 7), ([200] * 4, 9), ([200] * 4, 3),
                                    ([0, 0], 5), ([1, 2000], 40), ([1000, 980, 1024], 10), ([64] * 5, 132)])
def test_pieces_cover_every_tile_once(lens, P):
    """``pieces_ref`` (the Gluon kernels' schedule): every token of every sequence in exactly one piece, an empty
    sequence in one (whole) piece, a sequence in one piece written whole and in several through distinct slots in
    program order; ragged lengths take the Triton kernel's balanced slices (``schedule_ref``), equal tile counts
    equal pieces with no program holding two sequences' pieces."""
    from minids.kernels.mla_decode import MAX_PIECES, schedule_ref
    from minids.kernels.mla_decode_gluon import SEQ_OVERHEAD, pieces_ref

    work = pieces_ref(lens, P, 1)
    seen: dict[int, list] = {}
    for p, pieces in enumerate(work):
        for b, t0, t1, slot in pieces:
            seen.setdefault(b, []).append((t0, t1, slot, p))
    slots = [slot for ps in seen.values() for *_, slot, _ in ps if slot is not None]
    assert len(slots) == len(set(slots))
    for b, n in enumerate(lens):
        ps = seen[b]
        assert ps[0][0] == 0 and ps[-1][1] == n and all(x[1] == y[0] for x, y in itertools.pairwise(ps))
        assert [x[3] for x in ps] == sorted(x[3] for x in ps)
        assert (len(ps) == 1) == (ps[0][2] is None)
    tiles = [-(-n // 64) for n in lens]
    if min(tiles) != max(tiles):
        assert work == schedule_ref(lens, P, 1, max(2, MAX_PIECES), SEQ_OVERHEAD)[1]
    else:
        assert all(len({b for b, *_ in pieces}) <= 1 for pieces in work if len(pieces) and P >= len(lens))


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2)])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_gluon_two_warpgroup_narrow(layout, H, s_q, num_splits, monkeypatch):
    """The two-warpgroup narrow kernel (``NARROW2_ROWS``; off by default) through the same checks: ragged lengths,
    equal tile counts, an empty sequence, the combine."""
    from minids.kernels import mla_decode as mod
    from minids.kernels import mla_decode_gluon

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    monkeypatch.setattr(mla_decode_gluon, "NARROW2_ROWS", (16, 32))
    check([1, 63, 64, 65, 4097], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([100, 128, 65], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([0, 1, 129], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow"}


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("H,s_q", [(64, 1), (128, 2)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_gluon_wide_unsplit_scores(layout, H, s_q, num_splits, monkeypatch):
    """The wide kernel with both consumers scoring all of a tile's tokens (``WIDE_SPLIT`` off; the default splits
    them) through the same checks: ragged lengths, equal tile counts, an empty sequence, the combine."""
    from minids.kernels import mla_decode as mod
    from minids.kernels import mla_decode_gluon

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    monkeypatch.setattr(mla_decode_gluon, "WIDE_SPLIT", False)
    check([1, 63, 64, 65, 4097], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([100, 128, 65], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([0, 1, 129], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "wide"}


@GPU
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2), (128, 1)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_gluon_float32_partials(layout, H, s_q, num_splits, monkeypatch):
    """The partials of cut sequences in float32 (``PART_BF16`` off; the default stores them in bfloat16): the narrow
    kernel at 16 rows (its own merge) and 32 rows and the wide kernel (the combine kernel), through the same checks:
    ragged lengths, equal tile counts, an empty sequence."""
    from minids.kernels import mla_decode as mod
    from minids.kernels import mla_decode_gluon

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    monkeypatch.setattr(mla_decode_gluon, "PART_BF16", False)
    check([1, 63, 64, 65, 4097], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([100, 128, 65], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    check([0, 1, 129], s_q, H=H, C=512, R=64, layout=layout, num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow" if s_q * H <= 32 else "wide"}


def test_rows_view_only_for_rows_at_one_aligned_stride():
    """The Gluon kernels' TMA stores (``WIDE_TSTORE``, ``NARROW_TSTORE``) address out as (rows, C): a view of the
    caller's tensor, never a copy, and only where TMA can (one row stride, 16-byte aligned); otherwise None (the
    stores from registers)."""
    from minids.kernels.mla_decode_gluon import _rows_view

    dense = torch.zeros(2, 2, 64, 512, dtype=torch.bfloat16)
    v = _rows_view(dense, 256)
    assert v is not None and v.data_ptr() == dense.data_ptr() and v.stride() == (512, 1)
    padded = torch.zeros(2, 2, 64, 576, dtype=torch.bfloat16)[..., :512]
    assert _rows_view(padded, 256).stride() == (576, 1)
    assert _rows_view(torch.zeros(2, 64, 2, 512, dtype=torch.bfloat16).permute(0, 2, 1, 3), 256) is None
    assert _rows_view(torch.zeros(2, 1, 64, 516, dtype=torch.bfloat16)[..., :512], 128) is None  # 1032-byte rows
    assert _rows_view(torch.zeros(2 * 64 * 512 + 1, dtype=torch.bfloat16)[1:].view(2, 1, 64, 512), 128) is None


@GPU
@pytest.mark.parametrize("out_layout", ["padded", "heads_major"])
@pytest.mark.parametrize("H,s_q,C,R", [(16, 1, 512, 64), (16, 2, 512, 64), (16, 1, 256, 32), (16, 2, 256, 32),
                                       (64, 1, 512, 64), (128, 2, 512, 64)])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_gluon_strided_out(out_layout, H, s_q, C, R, num_splits, monkeypatch):
    """The Gluon kernels writing into a caller's strided out: rows at one stride wider than C (the TMA stores,
    ``WIDE_TSTORE`` and ``NARROW_TSTORE``, take that stride), or heads-major (B, H, s_q, C) seen as (B, s_q, H, C),
    whose rows are not at one stride when s_q = 2 (the stores from registers), through the same checks: ragged
    lengths, equal tile counts, an empty sequence, the merge or the combine. At 32 rows the narrow kernel's TMA stores
    are on for either latent (off at 16 rows, whose partials its own merge reads)."""
    from minids.kernels import mla_decode as mod
    from minids.kernels import mla_decode_gluon

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    assert mla_decode_gluon.WIDE_TSTORE and (512, 32) in mla_decode_gluon.NARROW_TSTORE
    if s_q * H == 32:  # the narrow kernel's TMA stores on for this latent too (small-v3's are off by default)
        monkeypatch.setattr(mla_decode_gluon, "NARROW_TSTORE", ((C, 32),))
    for lens in ([1, 63, 64, 65, 4097], [100, 128, 65], [0, 1, 129]):
        check(lens, s_q, H=H, C=C, R=R, layout="contiguous", num_splits=num_splits, out_layout=out_layout)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow" if s_q * H <= 32 else "wide"}


@GPU
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2), (64, 1), (64, 2)])
def test_gluon_traced_launch(H, s_q, monkeypatch):
    """A traced launch (``trace=``, bench/trace_mla_gluon.py) of the narrow (16, 32 rows) or the wide kernel (64-row
    blocks) gives the untraced launch's result bit for bit (a wrong trace buffer, or trace= for the two-warpgroup
    narrow kernel, is refused before any launch), and each program's timeline is well formed: start and schedule
    first, end last, both clocks non-decreasing; every 64-token tile in and done once over all programs of a row
    block; a piece stored for each piece of ``pieces_ref``; at 16 rows a merge for each cut sequence, elsewhere (the
    combine kernel's) none, each cut piece's arrival counted there and each merge's first partials in; the wide
    kernel's first consumer started once a program."""
    from minids.kernels import mla_decode_gluon as glu

    lens = [1, 63, 64, 65, 4097, 0]
    B, C, P = len(lens), 512, 3
    gen = torch.Generator().manual_seed(s_q)
    q = torch.randn(B, s_q, H, C + 64, generator=gen).to("cuda", torch.bfloat16)
    cache = torch.randn(B, 4160, C + 64, generator=gen).to("cuda", torch.bfloat16)
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    kv, pe = cache[..., :C], cache[..., C:]
    kind = glu.form(q, kv, pe, C, None)
    assert kind == ("narrow" if s_q * H <= 32 else "wide")
    blocks = s_q * H // 64 if kind == "wide" else 1
    results = []
    trace = torch.empty(blocks * P, glu.TRACE_LEN, 3, dtype=torch.int64, device="cuda")
    for tr in (None, trace):
        out = torch.full((B, s_q, H, C), float("nan"), dtype=torch.bfloat16, device="cuda")
        lse = torch.full((B, H, s_q), float("nan"), device="cuda")
        glu.mla_decode_gluon(q, kv, pe, seqlens, C**-0.5, True, None, out, lse, kind, num_splits=P, trace=tr)
        results.append((out, lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    with pytest.raises(ValueError, match="trace must be int64"):
        glu.mla_decode_gluon(q, kv, pe, seqlens, C**-0.5, True, None, *results[0], kind, num_splits=P,
                             trace=trace[:, :8])
    if kind == "narrow":
        monkeypatch.setattr(glu, "NARROW2_ROWS", (s_q * H,))
        with pytest.raises(ValueError, match="trace= is for the one-warpgroup narrow and the wide kernels"):
            glu.mla_decode_gluon(q, kv, pe, seqlens, C**-0.5, True, None, *results[0], kind, num_splits=P,
                                 trace=trace)
    events = [[e for e in prog if e[2] >= 0] for prog in trace.cpu().tolist()]
    codes = [[e[2] for e in prog] for prog in events]
    for prog, cs in zip(events, codes, strict=True):
        assert cs[:2] == [0, 1] and cs[-1] == 8 and cs.count(4) == cs.count(5)
        for a, b in itertools.pairwise(prog):
            assert b[0] >= a[0] and b[1] >= a[1]
    flat = [c for cs in codes for c in cs]
    assert flat.count(4) == blocks * sum(-(-n // 64) for n in lens)
    work = glu.pieces_ref(lens, P, 1)
    assert flat.count(6) == blocks * sum(len(pieces) for pieces in work)
    cut = {b for pieces in work for b, *_, slot in pieces if slot is not None}
    merged = kind == "narrow" and s_q * H in glu.MERGE_ROWS
    assert flat.count(7) == (len(cut) if merged else 0)
    # each cut piece's arrival counted (10), each merge's first partials in (11), the wide consumer's start (12)
    assert flat.count(10) == (sum(slot is not None for pieces in work for *_, slot in pieces) if merged else 0)
    assert flat.count(11) == flat.count(7)
    assert flat.count(12) == (blocks * P if kind == "wide" else 0)


@GPU
@pytest.mark.parametrize("H,s_q", [(16, 1), (16, 2), (128, 1)])
@pytest.mark.parametrize("num_splits", [None, 7])
def test_gluon_schedule_in_passes(H, s_q, num_splits, monkeypatch):
    """More sequences than the schedule reads at once (``MAX_BLOCK_B`` cut to 16: 40 ragged lengths and an empty one
    read in three passes, its two-pass form), through the same checks: the slices, the pieces and their merge or
    combine as with one read."""
    from minids.kernels import mla_decode as mod
    from minids.kernels import mla_decode_gluon as glu

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    monkeypatch.setattr(glu, "MAX_BLOCK_B", 16)
    lens = torch.randint(0, 700, (40,), generator=torch.Generator().manual_seed(H + s_q)).tolist() + [0]
    check(lens, s_q, H=H, C=512, R=64, layout="contiguous", num_splits=num_splits)
    assert mod.LAST_LAUNCH["cfg"] == {"gluon": "narrow" if s_q * H <= 32 else "wide"}
