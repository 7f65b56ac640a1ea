"""The Gluon MLA decode path (kernels/mla_decode_gluon.py) against the reference, and its combine kernel.

The combine kernel is plain Triton and runs here on the CPU under the interpreter. The Gluon kernels run on sm_90 GPUs
only (Gluon has no interpreter); there these tests send ``mla_decode`` to them (``GLUON_MLA``) through the same
checks as tests/test_kernels_mla.py: ragged lengths, both cache layouts and KVCache's split one, NaN-poisoned outputs
and NaN past every length, with and without splits, causal or not.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("splits,B,rows", [(1, 2, 16), (3, 2, 32), (4, 3, 64), (7, 1, 128)])
def test_combine_matches_torch(splits, B, rows):
    """The splits' partials merged in order: random partials, a split that saw nothing (-inf, zeros) for some rows,
    and rows no split saw (out 0, lse -inf)."""
    from minids.kernels.mla_decode_gluon import combine, combine_ref

    gen = torch.Generator().manual_seed(splits * 100 + rows)
    C, H = 512, 16
    o_part = torch.randn(splits, B, rows, C, generator=gen).to(device)
    l_part = (torch.randn(splits, B, rows, generator=gen) * 4).to(device)
    l_part[0, 0, :3] = float("-inf")  # split 0 saw nothing for these rows
    o_part[0, 0, :3] = 0.0
    l_part[:, -1, -2:] = float("-inf")  # no split saw these rows
    o_part[:, -1, -2:] = 0.0
    out = torch.full((B, rows // H, H, C), float("nan"), device=device)
    lse = torch.full((B, H, rows // H), float("nan"), device=device)
    combine(o_part, l_part, out, lse)
    want, want_lse = combine_ref(o_part, l_part, H)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(lse.isinf(), want_lse.isinf())
    fin = want_lse.isfinite()
    torch.testing.assert_close(lse[fin], want_lse[fin], rtol=1e-5, atol=1e-5)


def test_flag_on_leaves_other_calls_to_the_triton_kernel(monkeypatch):
    """GLUON_MLA takes only what the Gluon kernels can run: small-v3's latent (C=256, R=32) goes to the Triton kernel
    on every device (and here, without an sm_90 GPU, V3's too), with the reference's result."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    check([1, 63, 65], 2, H=16, C=256, R=32, layout="split", num_splits=2)
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
@pytest.mark.parametrize("H,s_q", [(16, 2), (128, 1)])
def test_gluon_empty_and_non_causal(H, s_q, monkeypatch):
    """Length 0 and a causal query with nothing before it (out 0, lse -inf); no causal mask."""
    from minids.kernels import mla_decode as mod

    monkeypatch.setattr(mod, "GLUON_MLA", True)
    for num_splits in (1, 3):
        check([0, 1, 129], s_q, H=H, C=512, R=64, layout="paged", num_splits=num_splits)
    check([3, 70, 300], s_q, H=H, C=512, R=64, layout="contiguous", causal=False, num_splits=2)
    assert "gluon" in mod.LAST_LAUNCH["cfg"]
