"""Benchmark: MLA decoding over the latent cache (minids.kernels.mla_decode) against the torch forms, on a GPU.

    python3 bench/mla_decode.py --out bench/results            # full sweep (< 4 min on an H200)
    python3 bench/mla_decode.py --out /tmp/mla --quick         # a reduced sweep (< 1.5 min)
    python3 bench/mla_decode.py --heads 16 --stem mla_decode-h16   # the 16-head shapes only
    python3 bench/mla_decode.py --heads 16 --narrow2 --stem mla_decode-narrow2   # the two-warpgroup narrow kernel

Shapes: DeepSeek-V3's latent (C=512, R=64) with batch 32 and 128, 16 and 128 heads, mean cache length 1K,
4K and 16K, fixed or variable lengths (normal(mean, mean/2) clipped to [s_q, 2 * mean], as FlashMLA's
tests draw them), s_q 1 and 2 (MTP verification); small-v3's latent (C=256, R=32, 16 heads); and the paged
layout (64-token pages, shuffled) at the 4K V3 shapes. All bf16, causal.

Counting, as FlashMLA counts: bytes = the cache read once (sum of lengths * (C + R)) + queries + outputs;
FLOPs = 2 * s_q * sum(len) * H * ((C + R) + C). Both are divided by the median time and set against the
ceilings measured in the same process (a 2 GiB device copy, read + written; an 8192^3 bf16 matmul), and beside
the read floor of a memory-bound row's bytes (``_common.read_floor_ms``: the fastest streaming read of that many
bytes in one launch, timed the same way): read_frac_copy is the copy-rate fraction that the read itself reaches,
about the most a kernel moving those bytes in one launch could show, and of_read the kernel's time against it.
The kernel is timed as a CUDA graph of the launch (triton.testing.do_bench_cudagraph: the Python launch
overhead of a ~10 us kernel would otherwise be timed too); small inputs are rotated among copies that
together exceed the 50 MB L2. The peers (one line when one fails or is skipped) are timed with CUDA
events: ``mla_decode_ref`` (the float32 reference, same signature), and the model-level forms
``mla_attention_absorbed`` and ``mla_attention_naive`` (these include the W_UK / W_UV projections, V3's
Dn = Dv = 128, and the naive form expands every latent to per-head keys and values: skipped where that
would take more than 12 GB).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, graph_ms, matmul_tflops, median_ms, metadata, read_floor_ms, write_results
from minids.kernels import mla_decode as mla_mod
from minids.kernels.mla_decode import mla_decode

from minids.attention import mla_attention_absorbed, mla_attention_naive, mla_decode_ref

PAGE = 64
PEER_LIMIT = 12e9  # bytes of temporaries a peer may take before it is skipped


def work(tokens: int, B: int, s_q: int, H: int, C: int, R: int, elem: int = 2) -> tuple[int, int]:
    """(bytes, FLOPs) of one decode call as FlashMLA counts them: the cache read once plus queries and outputs;
    2 s_q sum(len) H (d_qk + d_v) with d_qk = C + R and d_v = C."""
    return (tokens * (C + R) + B * s_q * H * (2 * C + R)) * elem, 2 * s_q * tokens * H * (2 * C + R)


def lengths(B: int, mean: int, var: bool, s_q: int, gen: torch.Generator) -> torch.Tensor:
    if not var:
        return torch.full((B,), mean, dtype=torch.int32)
    x = torch.normal(float(mean), mean / 2, (B,), generator=gen)
    return x.clamp(s_q, 2 * mean).round().to(torch.int32)


def make_inputs(B, s_q, H, C, R, lens, paged, gen):
    """Random bf16 queries and caches; a list of copies to rotate through when one copy fits in L2."""
    T = -(-int(lens.max()) // PAGE) * PAGE
    one = B * T * (C + R) * 2
    copies = max(1, min(8, math.ceil(256e6 / one)))
    sets = []
    for _ in range(copies):
        q = torch.randn(B, s_q, H, C + R, device="cuda", dtype=torch.bfloat16)
        if paged:
            n_pages = B * (T // PAGE)
            kv = torch.randn(n_pages, PAGE, C + R, device="cuda", dtype=torch.bfloat16)
            table = torch.randperm(n_pages, device="cuda").view(B, T // PAGE).to(torch.int32)
        else:
            kv = torch.randn(B, T, C + R, device="cuda", dtype=torch.bfloat16)
            table = None
        sets.append((q, kv, table))
    return sets


def rotating(sets, call):
    state = {"i": 0}

    def fn():
        s = sets[state["i"] % len(sets)]
        state["i"] += 1
        return call(*s)

    return fn


def time_kernel(sets, seqlens, C, scale):
    fn = rotating(sets, lambda q, kv, table: mla_decode(q, kv, seqlens, C, scale, causal=True, block_table=table))
    for _ in range(len(sets) - 1):
        fn()  # compile and autotune every input set outside the graph (graph_ms runs the last)
    return graph_ms(fn)


def peer_times(sets, seqlens, B, s_q, H, C, R, scale, Dn, Dv) -> dict[str, float | str]:
    """Median ms of each peer, or a short reason it was not timed."""
    q, kv, _ = sets[0]
    T = kv.shape[1]
    res: dict[str, float | str] = {}
    t = torch.arange(T, device="cuda")
    limit = seqlens.long()[:, None] - (s_q - 1 - torch.arange(s_q, device="cuda"))[None, :]  # (B, s_q)
    mask = (t[None, None, :] < limit[:, :, None]).unsqueeze(1)  # (B, 1, s_q, T)
    q_nope = torch.randn(B, s_q, H, Dn, device="cuda", dtype=torch.bfloat16)
    q_pe = q[..., C:]
    c_kv, k_pe = kv[..., :C], kv[..., C:]
    wkv_b = torch.randn(H, Dn + Dv, C, device="cuda", dtype=torch.bfloat16) * C**-0.5
    fp32_scores = B * H * s_q * T * 4 * 3
    need = {
        "ref_fp32": B * T * (C + R) * 4 * 2 + fp32_scores,
        "absorbed": B * T * (C + R) * 4 + fp32_scores,
        "naive": B * T * H * (Dn + Dv) * 4 * 2 + fp32_scores,
    }
    calls = {
        "ref_fp32": lambda: mla_decode_ref(q, kv, seqlens, C, scale, causal=True),
        "absorbed": lambda: mla_attention_absorbed(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale),
        "naive": lambda: mla_attention_naive(q_nope, q_pe, c_kv, k_pe, wkv_b, mask, scale),
    }
    for name, call in calls.items():
        if need[name] > PEER_LIMIT:
            res[name] = f"skipped (~{need[name] / 1e9:.0f} GB of temporaries)"
            print(f"  {name}: skipped, it would take ~{need[name] / 1e9:.0f} GB of temporaries")
            continue
        try:
            res[name] = median_ms(call, warmup_ms=5, rep_ms=40)
        except Exception as e:  # noqa: BLE001 (a failing peer is one line; the sweep goes on)
            res[name] = f"failed: {type(e).__name__}"
            print(f"  {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        torch.cuda.empty_cache()
    return res


def _shape(cfg: str, C: int, R: int, B: int, H: int, mean: int, var: bool, s_q: int, paged: bool) -> dict:
    return {"cfg": cfg, "C": C, "R": R, "B": B, "H": H, "mean": mean, "var": var, "s_q": s_q, "paged": paged}


def shapes(quick: bool) -> list[dict]:
    out = []
    if quick:
        for H in (16, 128):
            for s_q in (1, 2):
                out.append(_shape("V3", 512, 64, 128, H, 4096, False, s_q, False))
        out.append(_shape("V3", 512, 64, 32, 16, 4096, True, 1, True))
        out.append(_shape("small", 256, 32, 128, 16, 4096, False, 1, False))
        return out
    for B in (32, 128):
        for H in (16, 128):
            for mean in (1024, 4096, 16384):
                for var in (False, True):
                    for s_q in (1, 2):
                        out.append(_shape("V3", 512, 64, B, H, mean, var, s_q, False))
                        if mean == 4096:
                            out.append(_shape("V3", 512, 64, B, H, mean, var, s_q, True))
    for B in (32, 128):
        for mean in (1024, 4096, 16384):
            for s_q in (1, 2):
                out.append(_shape("small", 256, 32, B, 16, mean, True, s_q, False))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--quick", action="store_true", help="a reduced sweep")
    ap.add_argument("--heads", type=int, default=None, help="only the shapes with this many heads")
    ap.add_argument("--stem", default="mla_decode", help="file name of the results (.md, .json)")
    ap.add_argument("--narrow2", action="store_true",
                    help="16 and 32 rows on the two-warpgroup narrow Gluon kernel (mla_decode_gluon.NARROW2_ROWS)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/mla_decode.py needs a CUDA GPU")
        return 1
    if args.narrow2:
        from minids.kernels import mla_decode_gluon

        mla_decode_gluon.NARROW2_ROWS = (16, 32)
    t0 = time.time()
    meta = metadata()
    meta["copy_GBps"] = copy_bw = copy_bandwidth_gbs()
    meta["matmul_TFLOPs"] = mm = matmul_tflops()
    meta["sms"] = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{meta['device']}: copy {copy_bw:.0f} GB/s, bf16 matmul {mm:.0f} TFLOP/s")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for sh in shapes(args.quick):
        if args.heads is not None and sh["H"] != args.heads:
            continue
        B, H, C, R, s_q = sh["B"], sh["H"], sh["C"], sh["R"], sh["s_q"]
        Dn = Dv = 128 if sh["cfg"] == "V3" else 64
        scale = (Dn + R) ** -0.5
        lens = lengths(B, sh["mean"], sh["var"], s_q, gen)
        seqlens = lens.cuda()
        tokens = int(lens.sum())
        label = (f"{sh['cfg']} B={B} H={H} len={sh['mean']}{'~' if sh['var'] else ''} s_q={s_q}"
                 f"{' paged' if sh['paged'] else ''}")
        row = {"shape": label, **sh, "tokens": tokens}
        try:
            sets = make_inputs(B, s_q, H, C, R, lens, sh["paged"], gen)
            ms = time_kernel(sets, seqlens, C, scale)
        except Exception as e:  # noqa: BLE001 (one line, and the sweep goes on)
            print(f"{label}: kernel failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
            row["kernel_ms"] = f"failed: {type(e).__name__}"
            rows.append(row)
            continue
        n_bytes, flops = work(tokens, B, s_q, H, C, R)
        row.update(kernel_ms=ms, GBps=n_bytes / ms / 1e6, TFLOPs=flops / ms / 1e9)
        row["frac_copy"] = row["GBps"] / copy_bw
        row["frac_matmul"] = row["TFLOPs"] / mm
        row["bound"] = "memory" if H * s_q <= 32 else "compute"
        launch = mla_mod.LAST_LAUNCH  # the timed call's tile config and program count
        cfg = launch["cfg"]
        if "gluon" in cfg:  # kernels/mla_decode_gluon.py: grid (row blocks, P) or (P,), P programs per row block
            row["programs"] = math.prod(launch["grid"])
            row["config"] = f"gluon {cfg['gluon']} splits={launch['grid'][-1]}"
        else:
            row["programs"] = launch["col_blocks"] * launch["programs"](cfg["OCC"])
            row["config"] = f"M{launch['block_m']} N{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
        if not sh["paged"]:
            for name, v in peer_times(sets, seqlens, B, s_q, H, C, R, scale, Dn, Dv).items():
                row[f"{name}_ms"] = v
                if isinstance(v, float):
                    row[f"speedup_vs_{name}"] = v / ms
        del sets
        torch.cuda.empty_cache()
        if row["bound"] == "memory":  # (a compute-bound row's ceiling is the matmul's)
            row["read_ms"], row["read_cfg"] = read_floor_ms(n_bytes)
            row["read_frac_copy"] = n_bytes / row["read_ms"] / 1e6 / copy_bw
            row["of_read"] = row["read_ms"] / ms
        rows.append(row)
        print(f"{label}: {ms * 1e3:.1f} us  {row['GBps']:.0f} GB/s ({row['frac_copy']:.0%} of copy)  "
              f"{row['TFLOPs']:.0f} TFLOP/s ({row['frac_matmul']:.0%} of matmul)  programs={row['programs']} "
              f"{row.get('config', '')}"
              + (f"  read floor {row['read_ms'] * 1e3:.1f} us ({row['read_frac_copy']:.0%} of copy)" if "read_ms" in row
                 else ""), flush=True)
    meta["wall_s"] = round(time.time() - t0, 1)
    columns = ["shape", "bound", "kernel_ms", "GBps", "frac_copy", "TFLOPs", "frac_matmul", "read_ms",
               "read_frac_copy", "of_read", "programs", "config", "ref_fp32_ms", "absorbed_ms", "naive_ms",
               "speedup_vs_absorbed"]
    notes = (
        "Targets (issue #10): memory-bound rows (H * s_q <= 32) at >= 80% of the copy rate; H=128 rows at >= 300 "
        "TFLOP/s. kernel_ms is a CUDA-graph replay of one call: on sm_90 with V3's latent the Gluon kernels "
        "(kernels/mla_decode_gluon.py; config 'gluon narrow' (16 or 32 rows) or 'gluon wide' (64-row blocks), splits "
        "= programs per row block; the 16-row kernel merges cut sequences itself, the others launch the combine "
        "kernel after), else the Triton kernel (config: rows per program M, tokens per tile N, warps, pipeline "
        "stages; one launch, combine fused). Peers are eager torch (float32 inside), timed with CUDA events. "
        "'~' marks variable lengths. read_ms (memory-bound rows): the read floor of the row's bytes (a streaming "
        "read of as many bytes in one launch, graph-timed, best of four block sizes); read_frac_copy: its own "
        "fraction of the copy rate (a kernel reading those bytes cannot exceed it by much); of_read: read_ms / "
        "kernel_ms."
    )
    table = write_results(args.out, args.stem, meta, rows, columns, notes)
    print(table)
    print(f"wall {meta['wall_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
