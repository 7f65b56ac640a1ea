"""Builds of the Gluon MLA decode path side by side in one process: this tree's kernels/mla_decode_gluon.py against
other revisions' copies of it (``--base``, e.g. ``git show REV:kernels/mla_decode_gluon.py > /tmp/base.py``), all
called through ``mla_decode`` (each swapped in for ``minids.kernels.mla_decode_gluon``), on the V3 shapes
furthest below the issue's targets: short caches at batch 32 and 128, fixed and ragged lengths, s_q 1 and 2, 16 and
128 heads; or (``--cases wide``) the 128-head shapes alone (1K, and 4K at s_q 1 and 2); or (``--cases small``)
small-v3's latent (C=256, R=32) at 16 heads, ragged; or (``--cases long``) V3's long caches (16K at batch 128 and 16
heads; 4K at batch 128 and 16K at batch 32, 128 heads, and 16K at batch 128 with s_q 1) and small-v3's ragged 16K at
batch 128.

    python3 bench/ab_mla_gluon.py --base /tmp/base.py [more.py ...] --out bench/results --stem mla_decode-ab-merge   # the H200

``--ragged`` keeps the chosen cases' variable-length shapes alone (where the schedule's balance shows).

Each (shape, build) is checked against the float32 reference (``mla_decode_ref``; max relative error of out over
rows, 0.02 allowed for bf16) and timed from a CUDA graph as bench/mla_decode.py times it, the builds taking turns
(``--reps`` rounds; the median of each build's rounds is reported). GB/s and TFLOP/s are counted as there.
"""

from __future__ import annotations

import argparse
import hashlib
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


def cases(which: str) -> list[tuple[str, int, int, int, bool, int, bool]]:
    """(config, B, H, mean length, ragged, s_q, paged)."""
    if which == "small":  # small-v3's latent: bench/mla_decode.py's shapes of it
        return [("small", B, 16, mean, True, s_q, False) for B in (32, 128) for mean in (1024, 4096, 16384)
                for s_q in (1, 2) if B * mean <= 128 * 4096]
    if which == "wide":  # the wide kernel (128 heads) alone: its short caches, and two 4K shapes
        return ([("V3", B, 128, 1024, var, s_q, False) for B in (32, 128) for var in (False, True) for s_q in (1, 2)]
                + [("V3", 32, 128, 4096, False, 1, False), ("V3", 128, 128, 4096, False, 2, False)])
    if which == "long":  # V3's long caches, where the tile loop's steady state decides (and small-v3's longest)
        return ([("V3", 128, 16, 16384, var, s_q, False) for var in (False, True) for s_q in (1, 2)]
                + [("V3", B, 128, mean, False, s_q, False) for B, mean in ((128, 4096), (32, 16384)) for s_q in (1, 2)]
                + [("V3", 128, 128, 16384, False, 1, False), ("small", 128, 16, 16384, True, 1, False)])
    out = [("V3", B, 16, mean, var, s_q, False) for B in (32, 128) for mean in (1024, 4096) for var in (False, True)
           for s_q in (1, 2)]
    out += [("V3", 32, 16, 4096, False, 1, True), ("V3", 32, 16, 16384, False, 2, False),
            ("V3", 32, 16, 16384, True, 2, False)]
    if which == "all":
        out += [("V3", B, 128, 1024, var, s_q, False) for B in (32, 128) for var in (False, True) for s_q in (1, 2)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", type=Path, nargs="+", required=True,
                    help="other revisions' kernels/mla_decode_gluon.py (each a build, named by its file's stem)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stem", default="mla_decode-ab")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", choices=("h16", "all", "small", "long", "wide"), default="all")
    ap.add_argument("--ragged", action="store_true", help="only the cases' ragged (variable-length) shapes")
    ap.add_argument("--only", nargs="+", default=None, help="only the cases' shapes named so (as the report names them)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("ab_mla_gluon: needs a CUDA GPU (sm_90, with Triton 3.6's Gluon); none here")
    stems = [f.stem for f in args.base]
    if "head" in stems or len(set(stems)) != len(stems):
        ap.error(f"--base files are named by their stems, which must differ from each other and from 'head' (this "
                 f"tree's build): got {stems}; rename the copies")
    builds = {"head": head, **{f.stem: load(f) for f in args.base}}
    copy_gbs = copy_bandwidth_gbs()
    scale = (128 + 64) ** -0.5
    rows = []
    for cfg, B, H, mean, var, s_q, paged in cases(args.cases):
        name = f"{cfg} B={B} H={H} len={mean}{'~' if var else ''} s_q={s_q}{' paged' if paged else ''}"
        if (args.ragged and not var) or (args.only and name not in args.only):
            continue
        C, R = (512, 64) if cfg == "V3" else (256, 32)
        gen = torch.Generator().manual_seed(B * 7 + mean + s_q)
        lens = lengths(B, mean, var, s_q, gen)
        seqlens = lens.cuda()
        sets = make_inputs(B, s_q, H, C, R, lens, paged, gen)
        q, kv, table = sets[0]
        ref_kv = kv if table is None else kv[table.long()].flatten(1, 2)
        want = mla_decode_ref(q, ref_kv, seqlens, C, scale, causal=True)[0].float()
        nbytes, flops = work(int(lens.sum()), B, s_q, H, C, R)
        times: dict[str, list[float]] = {k: [] for k in builds}
        errs = {}
        for rep in range(args.reps):
            for label, mod in builds.items():
                minids.kernels.mla_decode_gluon = mod
                if rep == 0:
                    got = mla_decode(q, kv, seqlens, C, scale, causal=True, block_table=table)[0].float()
                    errs[label] = ((got - want).abs().amax(-1) / want.abs().amax(-1).clamp_min(1e-6)).max().item()
                fn = rotating(sets, lambda q_, kv_, t_, n=seqlens, c=C: mla_decode(q_, kv_, n, c, scale,
                                                                                   causal=True, block_table=t_))
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
            print(f"{name:40s} {label:12s} {us:7.1f} us {gbs:6.0f} GB/s ({gbs / copy_gbs:.0%}) {tfl:5.0f} TFLOP/s "
                  f"err {errs[label]:.1e}{'' if errs[label] <= TOL else ' FAIL'}", flush=True)
        del sets
        torch.cuda.empty_cache()
    if args.out:
        sources = {"head": Path(head.__file__), **{f.stem: f for f in args.base}}
        digests = " ".join(f"{k}={hashlib.sha256(p.read_bytes()).hexdigest()[:12]}" for k, p in sources.items())
        write_results(args.out, args.stem, {**metadata(), "copy_GBps": copy_gbs, "base": [str(f) for f in args.base],
                                            "build_sha256": digests},
                      rows,
                      ["shape", "build", "us", "us_all", "GBps", "frac_copy", "TFLOPs", "err", "ok"],
                      "build head: this tree's kernels/mla_decode_gluon.py; the others: the --base copies (by "
                      "file stem), all through mla_decode; build_sha256: each build's source file, hashed; us: median "
                      "of the rounds (us_all), each a CUDA-graph replay, the builds alternating; bytes and FLOPs as "
                      "bench/mla_decode.py counts them; err: max relative error of out against the float32 reference "
                      "over rows.")


if __name__ == "__main__":
    main()
