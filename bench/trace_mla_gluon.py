"""Where a narrow or wide Gluon MLA decode launch spends its time: each program's timeline from a traced launch
(``mla_decode_gluon(..., trace=)``: %globaltimer and %clock64 at the schedule, each piece's query and tiles, its
stores and the merge), summarised per shape beside the untraced launch's CUDA-graph time.

    python3 bench/trace_mla_gluon.py --out bench/results --stem mla_decode-trace   # the H200
    python3 bench/trace_mla_gluon.py --cases long --out bench/results --stem mla_decode-trace-long
    python3 bench/trace_mla_gluon.py --cases wide --out bench/results --stem mla_decode-trace-wide   # 128 heads

The wide kernel's events are its first consumer warpgroup's (a piece's "issued" is when that warpgroup starts it:
the producer warp's loads are not stamped); its programs are (row block, slice) pairs.

Per shape (the inputs rotated over copies as bench/mla_decode.py does, so the cache comes from memory): the graph
time of the default path; then --reps traced launches, each program's events read back. Reported (medians over the
launches; "med" / "max" over programs): span (first start to last end), the launch's start skew, schedule (start to
the schedule known), fork (the wide kernel: start to its first consumer's start), known (start to the first piece's
bounds known: its length read), issued (start to its loads issued), first tile (start to the first tile usable), a
tile's compute (tile in to its MMAs done), the wait for a tile after the previous one's MMAs (data not yet there),
the piece's stores, a cut piece's arrival counted (from its stores), the merge (from that count; files before the
twenty-ninth session's timed it from the stores) and its first partials' arrival, and for the program that ends last
its share of each. Times within a program come from %clock64 (cycles, converted at the
rate each launch measures against %globaltimer), across programs from %globaltimer.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import graph_ms, metadata, write_results
from minids.kernels import mla_decode_gluon as glu
from minids.kernels.mla_decode import mla_decode
from mla_decode import PAGE, lengths, make_inputs, rotating

CASES = [  # (config, B, mean length, ragged, s_q)
    ("V3", 32, 1024, False, 1), ("V3", 32, 1024, True, 1), ("V3", 32, 4096, False, 1), ("V3", 128, 1024, False, 1),
    ("V3", 128, 4096, False, 1), ("V3", 32, 1024, False, 2), ("V3", 128, 1024, True, 2), ("small", 32, 1024, True, 1),
]
WIDE = [  # (--cases wide) the wide kernel (128 heads: 64-row blocks) at short caches, where it misses 300 TFLOP/s
    ("V3", 32, 1024, False, 1), ("V3", 32, 1024, True, 1), ("V3", 128, 1024, False, 1), ("V3", 128, 1024, True, 1),
    ("V3", 32, 4096, False, 1),
]
LONG = [  # (--cases long) where a program's tile loop is its time: 16 against 32 rows, fixed and ragged lengths
    ("V3", 128, 4096, False, 1), ("V3", 128, 4096, False, 2), ("V3", 128, 4096, True, 2), ("V3", 32, 16384, False, 2),
    ("V3", 32, 16384, True, 2), ("small", 128, 4096, True, 2),
]


def program_stats(ev: list[tuple[int, int, int]], ghz: float) -> dict[str, float]:
    """One program's events (globaltimer ns, clock64, code) -> its phases in microseconds (clock64 deltas)."""
    t0c = ev[0][1]
    us = lambda c: (c - t0c) / ghz / 1e3
    out = {"sched": 0.0, "fork": float("nan"), "known": float("nan"), "issued": float("nan"),
           "first_tile": float("nan"), "compute": [], "wait": [], "stores": [], "count": [], "merge": [],
           "merge_in": [], "end": us(ev[-1][1]), "tiles": 0, "pieces": 0}
    last_done = stored = counted = None
    for i, (_, c, code) in enumerate(ev):
        if code == 1:
            out["sched"] = us(c)
        elif code == 12:
            out["fork"] = us(c)
        elif code == 9:
            if not out["pieces"]:
                out["known"] = us(c)
        elif code == 2:
            if not out["pieces"]:
                out["issued"] = us(c)
            out["pieces"] += 1
            last_done = None
        elif code == 4:
            out["tiles"] += 1
            if out["tiles"] == 1:
                out["first_tile"] = us(c)
            if last_done is not None:
                out["wait"].append((c - last_done) / ghz / 1e3)
        elif code == 5:
            out["compute"].append((c - ev[i - 1][1]) / ghz / 1e3)
            last_done = c
        elif code == 6:
            stored = c
            if last_done is not None:
                out["stores"].append((c - last_done) / ghz / 1e3)
        elif code == 10 and stored is not None:
            out["count"].append((c - stored) / ghz / 1e3)
            counted = c
        elif code == 11 and counted is not None:
            out["merge_in"].append((c - counted) / ghz / 1e3)
        elif code == 7:
            out["merge"].append((c - (counted if counted is not None else ev[i - 1][1])) / ghz / 1e3)
    return out


def analyse(trace: torch.Tensor) -> dict[str, float]:
    t = trace.cpu().tolist()
    progs = [[tuple(e) for e in p if e[2] >= 0] for p in t]
    progs = [p for p in progs if p]
    starts = [p[0][0] for p in progs]
    ends = [p[-1][0] for p in progs]
    t0 = min(starts)
    ghz = statistics.median((p[-1][1] - p[0][1]) / max(1, p[-1][0] - p[0][0]) for p in progs if p[-1][0] > p[0][0])
    stats = [program_stats(p, ghz) for p in progs]
    crit = stats[max(range(len(progs)), key=lambda i: ends[i])]
    med = lambda xs: statistics.median(xs) if xs else 0.0
    flat = lambda k: [x for s in stats for x in s[k]]
    return {
        "span_us": (max(ends) - t0) / 1e3, "start_skew_us": (max(starts) - t0) / 1e3, "clock_GHz": ghz,
        "sched_med": med([s["sched"] for s in stats]),
        "fork_med": med([s["fork"] for s in stats if s["fork"] == s["fork"]]),
        "known_med": med([s["known"] for s in stats if s["pieces"] and s["known"] == s["known"]]),
        "issued_med": med([s["issued"] for s in stats if s["pieces"]]),
        "first_tile_med": med([s["first_tile"] for s in stats if s["tiles"]]),
        "first_tile_max": max(s["first_tile"] for s in stats if s["tiles"]),
        "compute_med": med(flat("compute")), "wait_med": med(flat("wait")),
        "wait_sum_med": med([sum(s["wait"]) for s in stats]),
        "stores_med": med(flat("stores")), "count_med": med(flat("count")), "merge_in_med": med(flat("merge_in")),
        "merge_med": med(flat("merge")),
        "merge_max": max(flat("merge"), default=0.0), "end_med": med([s["end"] for s in stats]),
        "tiles_med": med([s["tiles"] for s in stats]), "pieces_med": med([s["pieces"] for s in stats]),
        "crit_start": (starts[max(range(len(progs)), key=lambda i: ends[i])] - t0) / 1e3,
        "crit_first_tile": crit["first_tile"], "crit_tiles": crit["tiles"], "crit_compute": sum(crit["compute"]),
        "crit_wait": sum(crit["wait"]), "crit_stores": sum(crit["stores"]), "crit_merge": sum(crit["merge"]),
        "crit_end": crit["end"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stem", default="mla_decode-trace")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--cases", choices=("short", "long", "wide"), default="short")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("trace_mla_gluon: needs a CUDA GPU (sm_90, with Triton 3.6's Gluon); none here")
    scale = (128 + 64) ** -0.5
    rows = []
    for cfg, B, mean, var, s_q in {"short": CASES, "long": LONG, "wide": WIDE}[args.cases]:
        C, R, H = (512, 64, 128 if args.cases == "wide" else 16) if cfg == "V3" else (256, 32, 16)
        gen = torch.Generator().manual_seed(B * 7 + mean + s_q)
        lens = lengths(B, mean, var, s_q, gen)
        seqlens = lens.cuda()
        sets = make_inputs(B, s_q, H, C, R, lens, False, gen)
        fn = rotating(sets, lambda q_, kv_, t_, n=seqlens, c=C: mla_decode(q_, kv_, n, c, scale, causal=True))
        for _ in range(len(sets)):
            fn()
        graph_us = graph_ms(fn) * 1e3
        q0, kv0, _ = sets[0]
        kind = glu.form(q0, kv0[..., :C], kv0[..., C:], C, None)
        want_kind = "wide" if args.cases == "wide" else "narrow"
        if kind != want_kind:
            raise SystemExit(f"trace_mla_gluon: {cfg} B={B} s_q={s_q} does not take the {want_kind} Gluon kernel "
                             f"here (form: {kind}); run it on an sm_90 GPU with Triton 3.6's Gluon")
        out = torch.empty(B, s_q, H, C, dtype=torch.bfloat16, device="cuda")
        lse = torch.empty(B, H, s_q, dtype=torch.float32, device="cuda")
        grid = glu.mla_decode_gluon(q0, kv0[..., :C], kv0[..., C:], seqlens, scale, True, None, out, lse, kind)
        trace = torch.empty(math.prod(grid), glu.TRACE_LEN, 3, dtype=torch.int64, device="cuda")
        reps = []
        for r in range(args.reps + 1):
            q, kv, _ = sets[r % len(sets)]
            glu.mla_decode_gluon(q, kv[..., :C], kv[..., C:], seqlens, scale, True, None, out, lse, kind,
                                 trace=trace)
            torch.cuda.synchronize()
            if r:  # the first compiles
                reps.append(analyse(trace))
        want = mla_decode(q, kv, seqlens, C, scale, causal=True)[0]
        err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
        row = {"shape": f"{cfg} B={B} H={H} len={mean}{'~' if var else ''} s_q={s_q}", "graph_us": graph_us,
               **{k: statistics.median(x[k] for x in reps) for k in reps[0]}, "err_vs_untraced": err}
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.out:
        cols = list(rows[0])
        write_results(args.out, args.stem, {**metadata(), "page": PAGE, "reps": args.reps}, rows, cols,
                      f"Traced {'wide' if args.cases == 'wide' else 'narrow'} Gluon launches "
                      "(bench/trace_mla_gluon.py): microseconds; graph_us the untraced "
                      "default path's CUDA-graph time; the rest medians over the traced launches (eager, not in a "
                      "graph) of: span (first program start to last end), start skew, per program (med / max over "
                      "programs) the schedule, the wide kernel's consumer past the fork, the first piece known (its "
                      "length read), its loads issued, the first tile usable, a tile's compute (in to MMAs done), "
                      "the wait for a tile after the previous one's MMAs, a piece's stores, the count of a cut "
                      "piece's arrival (stored to counted: the partial's stores drained and the counter's atomic), "
                      "the merge (counted to merged) and its first partials' arrival (counted to in), the program's "
                      "end; "
                      "crit_*: the program that ends last (its start offset and its sums). err_vs_untraced: max "
                      "difference of the traced output from the untraced one, relative to its max.")


if __name__ == "__main__":
    main()
