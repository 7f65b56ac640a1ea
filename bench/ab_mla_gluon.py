"""A/B of two builds of the Gluon MLA decode path in one process: this tree's kernels/mla_decode_gluon.py against
another revision's copy of it (``--base``, e.g. ``git show REV:kernels/mla_decode_gluon.py > /tmp/base.py``), both
called through ``mla_decode`` (the base swapped in for ``minids.kernels.mla_decode_gluon``), on the V3 shapes
furthest below the issue's targets: short caches at batch 32 and 128, fixed and ragged lengths, s_q 1 and 2, 16 and
128 heads.

    python3 bench/ab_mla_gluon.py --base /tmp/base.py --out bench/results --stem mla_decode-ab-merge   # the H200

Each (shape, build) is checked against the float32 reference (``mla_decode_ref``; max relative error of out over
rows, 0.02 allowed for bf16) and timed from a CUDA graph as bench/mla_decode.py times it, the two builds alternating
(``--reps`` rounds; the median of each build's rounds is reported). GB/s and TFLOP/s are counted as there.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
from pathlib import Path

import minids.kernels
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, graph_ms, metadata, write_results
from minids.kernels import mla_decode_gluon as head
from minids.kernels.mla_decode import mla_decode
from mla_decode import lengths, make_inputs, rotating, work

from minids.attention import mla_decode_ref

TOL = 2e-2


def load(path: Path):
    spec = importlib.util.spec_from_file_location("mla_decode_gluon_base", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cases(which: str) -> list[tuple[int, int, int, bool, int, bool]]:
    """(B, H, mean length, ragged, s_q, paged)."""
    out = [(B, 16, mean, var, s_q, False) for B in (32, 128) for mean in (1024, 4096) for var in (False, True)
           for s_q in (1, 2)]
    out += [(32, 16, 4096, False, 1, True), (32, 16, 16384, False, 2, False), (32, 16, 16384, True, 2, False)]
    if which == "all":
        out += [(B, 128, 1024, var, s_q, False) for B in (32, 128) for var in (False, True) for s_q in (1, 2)]
    return out


COMBINE_CASES = [  # (B, rows, programs P, mean length, ragged): the combine's own launches in the sweep's shapes
    (32, 128, 66, 1024, False), (32, 128, 66, 1024, True), (32, 32, 132, 1024, False), (32, 32, 132, 4096, True),
    (128, 32, 132, 1024, True), (128, 128, 66, 1024, False), (128, 128, 66, 1024, True)]
COMBINE_VARIANTS = [(512, 8, 1), (512, 4, 1), (256, 4, 1), (128, 4, 1), (128, 4, 2), (256, 8, 2)]


def time_combine(base, copy_gbs: float) -> list[dict]:
    """The combine kernel alone (random partials, every slot written), the base's against this tree's at each
    (columns a program, warps, pieces read at once) of COMBINE_VARIANTS."""
    rows = []
    C = 512
    for B, n_rows, P, mean, var in COMBINE_CASES:
        gen = torch.Generator().manual_seed(B + n_rows + P)
        lens = lengths(B, mean, var, 1, gen)
        seqlens = lens.cuda()
        o_part = torch.randn(2 * P, n_rows, C, device="cuda")
        l_part = torch.randn(2 * P, n_rows, device="cuda")
        H = 16 if n_rows == 32 else 128
        out = torch.empty(B, n_rows // H, H, C, device="cuda", dtype=torch.bfloat16)
        lse = torch.empty(B, H, n_rows // H, device="cuda")
        cap = int(lens.max())
        want = out.clone()
        base.combine(o_part, l_part, seqlens, cap, 4, want, lse)
        args = (o_part, l_part, seqlens, cap, 4, out, lse)
        variants = {"base": functools.partial(base.combine, *args)}
        for bc, w, npc in COMBINE_VARIANTS:
            variants[f"head {bc}/{w}w/{npc}"] = functools.partial(head.combine, *args, block_c=bc, warps=w,
                                                                  pieces=npc)
        name = f"combine B={B} rows={n_rows} P={P} len={mean}{'~' if var else ''}"
        for label, fn in variants.items():
            out.zero_()
            fn()
            err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
            us = graph_ms(fn) * 1e3
            rows.append({"shape": name, "build": label, "us": us, "us_all": "", "GBps": 0.0, "frac_copy": 0.0,
                         "TFLOPs": 0.0, "err": err, "ok": err <= TOL})
            print(f"{name:40s} {label:18s} {us:7.1f} us err {err:.1e}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, required=True, help="another revision's kernels/mla_decode_gluon.py")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stem", default="mla_decode-ab")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", choices=("h16", "all"), default="all")
    ap.add_argument("--combine", action="store_true", help="also time the combine kernel alone (COMBINE_VARIANTS)")
    args = ap.parse_args()
    builds = {"head": head, "base": load(args.base)}
    copy_gbs = copy_bandwidth_gbs()
    C, R = 512, 64
    scale = (128 + 64) ** -0.5
    rows = time_combine(builds["base"], copy_gbs) if args.combine else []
    for B, H, mean, var, s_q, paged in cases(args.cases):
        gen = torch.Generator().manual_seed(B * 7 + mean + s_q)
        lens = lengths(B, mean, var, s_q, gen)
        seqlens = lens.cuda()
        sets = make_inputs(B, s_q, H, C, R, lens, paged, gen)
        q, kv, table = sets[0]
        ref_kv = kv if table is None else kv[table.long()].flatten(1, 2)
        want = mla_decode_ref(q, ref_kv, seqlens, C, scale, causal=True)[0].float()
        nbytes, flops = work(int(lens.sum()), B, s_q, H, C, R)
        name = f"V3 B={B} H={H} len={mean}{'~' if var else ''} s_q={s_q}{' paged' if paged else ''}"
        times: dict[str, list[float]] = {k: [] for k in builds}
        errs = {}
        for rep in range(args.reps):
            for label, mod in builds.items():
                minids.kernels.mla_decode_gluon = mod
                if rep == 0:
                    got = mla_decode(q, kv, seqlens, C, scale, causal=True, block_table=table)[0].float()
                    errs[label] = ((got - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1e-6)).max().item()
                fn = rotating(sets, lambda q_, kv_, t_, n=seqlens: mla_decode(q_, kv_, n, C, scale, causal=True,
                                                                              block_table=t_))
                for _ in range(len(sets) - 1):
                    fn()
                times[label].append(graph_ms(fn) * 1e3)
        minids.kernels.mla_decode_gluon = head
        for label in builds:
            us = statistics.median(times[label])
            gbs, tfl = nbytes / us / 1e3, flops / us / 1e6
            rows.append({"shape": name, "build": label, "us": us, "us_all": " ".join(f"{t:.1f}" for t in times[label]),
                         "GBps": gbs, "frac_copy": gbs / copy_gbs, "TFLOPs": tfl, "err": errs[label],
                         "ok": errs[label] <= TOL})
            print(f"{name:40s} {label:5s} {us:7.1f} us {gbs:6.0f} GB/s ({gbs / copy_gbs:.0%}) {tfl:5.0f} TFLOP/s "
                  f"err {errs[label]:.1e}{'' if errs[label] <= TOL else ' FAIL'}", flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.out:
        write_results(args.out, args.stem, {**metadata(), "copy_GBps": copy_gbs, "base": str(args.base)}, rows,
                      ["shape", "build", "us", "us_all", "GBps", "frac_copy", "TFLOPs", "err", "ok"],
                      "build head: this tree's kernels/mla_decode_gluon.py; base: the --base copy, both through "
                      "mla_decode; us: median of the rounds (us_all), each a CUDA-graph replay, the builds "
                      "alternating; bytes and FLOPs as bench/mla_decode.py counts them; err: max relative error of out "
                      "against the float32 reference over rows.")


if __name__ == "__main__":
    main()
