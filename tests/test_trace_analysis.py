"""bench/trace_mla_gluon.py's reading of a traced launch (the timelines the narrow Gluon MLA kernel records with
``trace=``), on a hand-made trace whose phases are known by construction: the GPU produces the real ones."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _trace_module():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        spec = importlib.util.spec_from_file_location("trace_mla_gluon", ROOT / "bench" / "trace_mla_gluon.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return mod


def _program(t0_ns: int, events: list[tuple[float, int]]) -> list[tuple[int, int, int]]:
    """(microseconds after t0, code) -> (globaltimer ns, clock64 at 2 GHz, code)."""
    return [(t0_ns + round(us * 1e3), round((t0_ns + us * 1e3) * 2), code) for us, code in events]


def test_phases_of_a_hand_made_trace():
    mod = _trace_module()
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
