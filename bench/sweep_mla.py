"""Variant sweep of minids' Triton MLA decode kernel on the GPU: fixed tile configs (``mla_decode(config=...)``)
timed on a representative subset of bench/mla_decode.py's shapes, each checked against the reference.

    python3 bench/sweep_mla.py --out /tmp/mla_sweep            # H200: < 150 s with compilation
    TRITON_INTERPRET=1 python3 bench/sweep_mla.py --cpu-smoke  # one tiny shape per variant, checks only

Variants (config keys: BLOCK_M rows per program, BLOCK_N tokens per tile, warps, stages, OCC programs per SM,
V_SPLIT column parts, MIN_UNITS smallest slice in 64-token units); "base" is the default path's config:
- rows <= 16: base (M16 N32 s3, 2 per SM), N64 tiles, the smallest slices (mu1), and 1, 2 or 4 programs per
  sequence (P1, P2, P4: num_splits = that times B) instead of filling the SMs;
- rows = 32 (s_q = 2, H = 16): base (M32 N64 s3), the old default N32 s5, two row blocks of 16 (M16x2: each
  tile read by two neighbouring programs, the second read from L2), one 64-row wgmma block (M64pad), 2 programs
  per sequence (P2);
- rows > 32 (H=128): base (M128 V_SPLIT=2: a warpgroup per 64 rows, half of the 512 output columns per
  program, all scores computed by both), the old default M64 (8 warps, whole accumulator), M128 V_SPLIT=2
  with N16 tiles, M64 V_SPLIT=2 with one warpgroup and 2 programs per SM.
"copy" (memory-bound shapes): a device copy moving the same bytes, the ceiling at that size.
Reported: us (CUDA-graph replay, bench/_common.graph_ms), the fraction of the copy rate (bytes = cache read
once + q + out) for memory-bound shapes or TFLOP/s (2 s_q sum(len) H (C + R + C)) for H=128, and err: the
max over rows of the relative error against ``mla_decode_ref`` on the first 8 sequences (0.02 allowed: bf16);
"FAIL" marks a larger error, "-" a variant that did not compile or run (one line printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--cpu-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # read when minids.kernels is imported

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOL = 2e-2


def _c(m, n, w, s, occ=1, v=1, mu=None, per_seq=None):
    """A config; mu: MIN_UNITS; per_seq: programs per sequence and row block (num_splits = per_seq * B, instead of
    the default schedule's SM-filling count: fewer, longer pieces and a cheaper combine for short caches)."""
    c = {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s, "OCC": occ, "V_SPLIT": v}
    c = c if mu is None else {**c, "MIN_UNITS": mu}
    return c if per_seq is None else {**c, "SPLITS_PER_SEQ": per_seq}


VARIANTS = {  # rows class -> {name: config}; variants_for adds "base", what the default path runs (MINIDS_AUTOTUNE=0)
    16: {"N64": _c(16, 64, 4, 3, 1), "mu1": _c(16, 32, 4, 3, 2, mu=1),
         "P1": _c(16, 32, 4, 3, 2, per_seq=1), "P2": _c(16, 32, 4, 3, 2, per_seq=2),
         "P4": _c(16, 32, 4, 3, 2, per_seq=4)},
    32: {"N32s5": _c(32, 32, 8, 5), "M16x2": _c(16, 32, 4, 3, 2), "M64pad": _c(64, 64, 8, 2),
         "P2": _c(32, 64, 8, 3, per_seq=2)},
    64: {"M64": _c(64, 64, 8, 2), "M128V2N16": _c(128, 16, 8, 4, v=2),
         "M64V2w4o2": _c(64, 32, 4, 2, 2, v=2)},
}

# (label, C, R, B, H, mean, var, s_q)
SHAPES = [
    ("V3 B32 H16 1K s1", 512, 64, 32, 16, 1024, False, 1),
    ("V3 B128 H16 1K s1", 512, 64, 128, 16, 1024, False, 1),
    ("small B32 H16 4K s1", 256, 32, 32, 16, 4096, False, 1),
    ("V3 B32 H16 4K s2", 512, 64, 32, 16, 4096, False, 2),
    ("V3 B128 H16 16K s2", 512, 64, 128, 16, 16384, False, 2),
    ("V3 B32 H128 4K s1", 512, 64, 32, 128, 4096, False, 1),
    ("V3 B128 H128 4K~ s1", 512, 64, 128, 128, 4096, True, 1),
    ("V3 B128 H128 16K s2", 512, 64, 128, 128, 16384, False, 2),
]


def variants_for(rows: int, C: int) -> dict:
    """{"base": the default path's config for s_q * H = rows and a latent of C columns (``pick_config``, so it
    cannot drift from it), then the rows class's variants}."""
    from minids.kernels.mla_decode import pick_config

    block_m, cfg = pick_config(rows, C=C)
    return {"base": {"BLOCK_M": block_m, **cfg}, **VARIANTS[16 if rows <= 16 else 32 if rows <= 32 else 64]}


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max over (sequence, query, head) rows of |got - want| / |want| (row norms)."""
    d = (got.float() - want.float()).flatten(0, 2).norm(dim=-1)
    return (d / want.float().flatten(0, 2).norm(dim=-1).clamp_min(1e-6)).max().item()


def run_shape(shape, names, dev, gen, timer, n_check):
    """Rows (one per variant) of one shape: err against the reference on n_check sequences, then the timing."""
    from minids.kernels.mla_decode import mla_decode
    from mla_decode import lengths, make_inputs, rotating, work  # bench/mla_decode.py

    from minids.attention import mla_decode_ref

    label, C, R, B, H, mean, var, s_q = shape
    lens = lengths(B, mean, var, s_q, gen)
    T = -(-max(64, int(lens.max())) // 64) * 64
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(B, s_q, H, C + R, device=dev, dtype=dt)
    kv = torch.randn(B, T, C + R, device=dev, dtype=dt)
    seqlens = lens.to(dev)
    scale = (128 + R) ** -0.5 if C == 512 else (64 + R) ** -0.5
    nc = min(B, n_check)
    want, _ = mla_decode_ref(q[:nc], kv[:nc], seqlens[:nc], C, scale)
    # timed inputs: copies rotated per call where one fits in L2 (as bench/mla_decode.py does)
    sets = [(q, kv)] + ([] if timer is None else [s[:2] for s in make_inputs(B, s_q, H, C, R, lens, False, gen)[1:]])
    tokens = int(lens.sum())
    n_bytes, flops = work(tokens, B, s_q, H, C, R, kv.element_size())
    out = []
    if timer is not None and s_q * H <= 32:  # a device copy moving the same bytes (read + written): this size's ceiling
        srcs = [kv_.view(-1)[: n_bytes // 4] for _, kv_ in sets]
        dst = torch.empty_like(srcs[0])
        ms = timer(rotating([(x,) for x in srcs], dst.copy_))
        out.append({"shape": label, "variant": "copy", "rows": s_q * H, "err": 0.0, "us": ms * 1e3,
                    "GBps": n_bytes / ms / 1e6, "TFLOPs": 0.0})
    for name, cfg in names.items():
        row = {"shape": label, "variant": name, "config": cfg, "rows": s_q * H}
        cfg = dict(cfg)
        per_seq = cfg.pop("SPLITS_PER_SEQ", None)
        try:
            got, _ = mla_decode(q[:nc], kv[:nc], seqlens[:nc], C, scale, config=cfg,
                                num_splits=None if per_seq is None else per_seq * nc)
            row["err"] = max_rel_err(got, want)
            if timer is not None:
                ns = None if per_seq is None else per_seq * B
                fn = rotating(sets, lambda q_, kv_, c=cfg, ns=ns: mla_decode(q_, kv_, seqlens, C, scale, config=c,
                                                                            num_splits=ns))
                for _ in range(len(sets)):
                    fn()
                ms = timer(fn)
                row.update(us=ms * 1e3, GBps=n_bytes / ms / 1e6, TFLOPs=flops / ms / 1e9)
        except Exception as e:  # noqa: BLE001 (a variant that fails is one line; the sweep goes on)
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
            print(f"  {label} {name}: {row['error']}", flush=True)
        out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/mla_sweep"))
    ap.add_argument("--cpu-smoke", action="store_true", help="one tiny shape per variant class, checks only")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    if args.cpu_smoke:
        bad = 0
        for H, s_q in ((16, 1), (16, 2), (64, 2)):
            shape = (f"tiny H{H} s{s_q}", 64, 16, 3, H, 100, True, s_q)
            for r in run_shape(shape, variants_for(s_q * H, shape[1]), "cpu", gen, None, 3):
                ok = "error" not in r and r["err"] < 1e-4
                bad += not ok
                print(f"{r['shape']:14s} {r['variant']:9s} err {r.get('err', float('nan')):.1e} {'' if ok else 'FAIL'}")
        return int(bad > 0)
    if not torch.cuda.is_available():
        print("bench/sweep_mla.py needs a CUDA GPU (or --cpu-smoke under TRITON_INTERPRET=1)")
        return 1
    from _common import copy_bandwidth_gbs, graph_ms, matmul_tflops, metadata, write_atomic, write_results

    t0 = time.time()
    meta = metadata()
    meta["copy_GBps"] = copy = round(copy_bandwidth_gbs(), 1)
    meta["matmul_TFLOPs"] = mm = round(matmul_tflops(), 1)
    rows = []
    for shape in SHAPES:
        rows += run_shape(shape, variants_for(shape[4] * shape[7], shape[1]), "cuda", gen, graph_ms, 8)
        torch.cuda.empty_cache()
    meta["wall_s"] = round(time.time() - t0, 1)
    print(f"{meta['device']} triton {meta['triton']} {meta['git_sha']}: copy {copy:.0f} GB/s, bf16 matmul {mm:.0f} "
          f"TFLOP/s; memory-bound: frac of copy (target 0.80), H=128: TFLOP/s (target 300); err max rel (tol {TOL})")
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for sh in shapes:
        cells = []
        for r in (r for r in rows if r["shape"] == sh):
            if "us" not in r:
                cells.append(f"{r['variant']} -")
                continue
            r["frac_copy"] = r["GBps"] / copy
            perf = f"{r['frac_copy']:.2f}" if r["rows"] <= 32 else f"{r['TFLOPs']:.0f}T"
            flag = "" if r["err"] < TOL else f" FAIL({r['err']:.0e})"
            cells.append(f"{r['variant']} {r['us']:.0f}us {perf}{flag}")
        print(f"{sh:20s} " + " | ".join(cells))
    worst = max((r.get("err", 0.0) for r in rows), default=0.0)
    print(f"max err {worst:.1e} {'OK' if worst < TOL else 'FAILURES ABOVE'}; wall {meta['wall_s']} s")
    write_results(args.out, "sweep_mla", meta, rows, ["shape", "variant", "us", "GBps", "TFLOPs", "err"],
                  "bench/sweep_mla.py: fixed configs of minids.kernels.mla_decode; see the script's docstring.")
    configs = {shape[0]: variants_for(shape[4] * shape[7], shape[1]) for shape in SHAPES}
    write_atomic(json.dumps(configs), args.out / "sweep_mla_configs.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
