"""bench/_common.py's read floor kernel (the per-shape bandwidth ceiling bench/mla_decode.py reports): it must read
every byte it is given, or the ceiling it times is not the read of that many bytes. Runs under the Triton interpreter
on the CPU; the GPU times it."""

import importlib.util
import sys
from functools import reduce
from operator import xor
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def _common():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("_common", ROOT / "bench" / "_common.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


@pytest.mark.parametrize("n, block", [(5000, 2048), (4096, 4096), (1, 2048)])
def test_read_xor_reads_every_word(n, block):
    mod = _common()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int32, generator=torch.Generator().manual_seed(n))
    got = mod.read_xor(x.to(device), block, 4).cpu().tolist()
    words = x.tolist()
    want = [reduce(xor, words[i:i + block], 0) for i in range(0, n, block)]
    assert got == want
    # one word changed anywhere changes its block's result: nothing is skipped
    y = x.clone()
    y[n - 1] ^= 1 << 7
    assert mod.read_xor(y.to(device), block, 4).cpu().tolist()[-1] == want[-1] ^ (1 << 7)
