"""The benchmarks' own tools, on the CPU: bench/trace_mla_gluon.py's reading of a traced launch (the timelines the
narrow Gluon MLA kernel records with ``trace=``), on a hand-made trace whose phases are known by construction (the GPU
produces the real ones); and bench/_common.py's read floor kernel (the per-shape bandwidth ceiling bench/mla_decode.py
reports), which must read every byte it is given, or the ceiling it times is not the read of that many bytes (under
the Triton interpreter here; the GPU times it); and the results' writer and provenance (whole files, changed files
named)."""

import importlib.util
import os
import subprocess
import sys
from functools import reduce
from operator import xor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_module(name: str):
    """bench/NAME.py, imported as the benchmarks import it (bench/ on the path)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


def _program(t0_ns: int, events: list[tuple[float, int]]) -> list[tuple[int, int, int]]:
    """(microseconds after t0, code) -> (globaltimer ns, clock64 at 2 GHz, code)."""
    return [(t0_ns + round(us * 1e3), round((t0_ns + us * 1e3) * 2), code) for us, code in events]


def test_phases_of_a_hand_made_trace():
    mod = _bench_module("trace_mla_gluon")
    # program 0: one piece, two tiles, merged; program 1 starts 0.5 us later: one piece, one tile, written whole
    p0 = _program(1_000_000, [(0, 0), (1, 1), (1.5, 9), (2.5, 2), (3, 3), (4, 4), (5.5, 5), (6, 4), (7, 5), (8, 6),
                              (11, 7), (11.5, 8)])
    p1 = _program(1_000_500, [(0, 0), (0.5, 1), (1, 9), (2, 2), (2.5, 3), (3, 4), (4, 5), (5, 6), (5.2, 8)])
    trace = torch.full((3, 256, 3), -1, dtype=torch.int64)  # a third program recorded nothing
    for i, prog in enumerate((p0, p1)):
        trace[i, : len(prog)] = torch.tensor(prog)
    got = mod.analyse(trace)
    assert got["clock_GHz"] == pytest.approx(2.0)
    assert got["span_us"] == pytest.approx(11.5)  # program 0's start to its end
    assert got["start_skew_us"] == pytest.approx(0.5)
    assert got["sched_med"] == pytest.approx(0.75)  # 1 and 0.5
    assert got["known_med"] == pytest.approx(1.25) and got["issued_med"] == pytest.approx(2.25)
    assert got["first_tile_med"] == pytest.approx(3.5) and got["first_tile_max"] == pytest.approx(4)
    assert got["compute_med"] == pytest.approx(1.0)  # 1.5, 1 and 1
    assert got["wait_med"] == pytest.approx(0.5)  # program 0's second tile came 0.5 us after its first was done
    assert got["stores_med"] == pytest.approx(1.0) and got["merge_med"] == pytest.approx(3.0)
    assert got["tiles_med"] == pytest.approx(1.5) and got["pieces_med"] == pytest.approx(1.0)
    assert got["crit_tiles"] == 2 and got["crit_compute"] == pytest.approx(2.5) and got["crit_merge"] == pytest.approx(3)
    assert got["crit_end"] == pytest.approx(11.5) and got["crit_start"] == pytest.approx(0)


@pytest.mark.parametrize("n, block", [(5000, 2048), (4096, 4096), (1, 2048)])
def test_read_xor_reads_every_word(n, block):
    pytest.importorskip("triton")
    mod = _bench_module("_common")
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


def test_tile_loop_of_a_hand_made_listing():
    """bench/aot_sm90.py's tile loop: of the loops holding HGMMAs, the innermost with the most (not the piece loop
    around it, not a loop without MMAs), its opcodes counted with predicated ones included."""
    mod = _bench_module("aot_sm90")

    def line(addr: int, text: str) -> str:
        return f"        /*{addr:04x}*/                   {text} ;                /* 0x000000000000000 */"

    body = ["IMAD R1, R2, R3, RZ", "BAR.SYNC.DEFER_BLOCKING 0x0", "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ",
            "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24", "@P0 BAR.SYNC.DEFER_BLOCKING 0x0",
            "SHFL.BFLY PT, R5, R6, 0x10, 0x1f", "@!P1 LDL R7, [R1+0x4]"]
    listing = [line(0x00, "S2R R0, SR_TID.X"), line(0x10, "IADD3 R1, R1, 0x1, RZ"),  # the piece loop starts
               line(0x20, "HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ")]  # (one MMA outside the tile loop)
    listing += [line(0x30 + 0x10 * i, t) for i, t in enumerate(body)]  # the tile loop: 0x30 .. 0xa0
    listing += [line(0xa0, "@P2 BRA 0x30"), line(0xb0, "FADD R3, R3, R4"), line(0xc0, "@P3 BRA 0x10"),
                line(0xd0, "MOV R2, R3"), line(0xe0, "@P4 BRA 0xd0"),  # a loop without MMAs
                line(0xf0, "EXIT"), line(0x100, "BRA 0x100")]
    got = mod.tile_loop("\n".join(listing))
    assert got["instructions"] == 8 and got["HGMMA"] == 2 and got["BAR"] == 2
    assert got["SHFL"] == 1 and got["LDL"] == 1 and got["BRA"] == 1 and "FADD" not in got
    assert mod.tile_loop("\n".join(listing[:1] + listing[-4:])) == {}  # the loop at 0xd0 only: no MMA in it


def test_results_replace_the_old_ones_whole(tmp_path, monkeypatch):
    """bench/_common.py's writer: a result written again replaces the old one; a write that fails before its rename
    leaves the old file as it was, and no temporary beside it."""
    mod = _bench_module("_common")
    mod.write_results(tmp_path, "r", {"run": 1}, [{"x": 1.0}], ["x"], "first")
    old = (tmp_path / "r.json").read_text(), (tmp_path / "r.md").read_text()
    mod.write_results(tmp_path, "r", {"run": 2}, [{"x": 2.0}], ["x"], "second")
    assert '"run": 2' in (tmp_path / "r.json").read_text() and "second" in (tmp_path / "r.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]

    def refuse(src, dst):
        raise OSError("disk full")

    mod.write_results(tmp_path, "r", {"run": 1}, [{"x": 1.0}], ["x"], "first")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        mod.write_results(tmp_path, "r", {"run": 3}, [{"x": 3.0}], ["x"], "third")
    assert ((tmp_path / "r.json").read_text(), (tmp_path / "r.md").read_text()) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.md"]


def test_git_changed_names_uncommitted_files(tmp_path):
    """The results' ``git_changed``: the tracked files that differ from HEAD, so that a result measured on a changed
    tree says so beside its git_sha."""
    mod = _bench_module("_common")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.py").write_text("1\n")
    (tmp_path / "b.py").write_text("1\n")
    subprocess.run([*git, "add", "a.py", "b.py"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "c"], cwd=tmp_path, check=True)
    assert mod.git_changed(tmp_path) == ""
    (tmp_path / "b.py").write_text("2\n")
    (tmp_path / "new.py").write_text("untracked\n")
    assert mod.git_changed(tmp_path) == "b.py"
    assert mod.git_changed(tmp_path.parent / "no-such-dir") is None
