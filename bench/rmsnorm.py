"""RMSNorm on the GPU: minids' Triton kernel against F.rms_norm, torch.compile of the eager reference and
liger-kernel's RMSNorm, forward, backward and forward+backward, plus the fused residual add + norm.

    python3 bench/rmsnorm.py --out bench/results            # full sweep (under 4 minutes on an H200)
    python3 bench/rmsnorm.py --out /tmp/r --quick           # hidden 1024 and 7168 only
    python3 bench/rmsnorm.py --out /tmp/r --hidden 512 7168 --rounds 5   # kernel time: median of 5, peers in turn

bf16 activations and weight, 16384 rows (the issue's shapes). Bytes counted as the fewest a pass must move:
forward reads x and writes y (2 * R * D * 2 bytes); backward reads x and dy and writes dx (3 * R * D * 2; rstd and
the weight are negligible); the fused add reads x and residual and writes y and s forward (4 * R * D * 2), and reads
s, dy, ds and writes one dx backward (4 * R * D * 2). Bandwidth is compared with a device-to-device copy measured in
the same run. Inputs rotate over enough sets (>= 256 MB) that the 50 MB L2 holds none of them between calls.
Each peer runs in a try: one that fails prints a line and the sweep goes on.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import copy_bandwidth_gbs, device_ms, matmul_tflops, median_ms, metadata, write_results
from minids.kernels.rmsnorm import add_rms_norm as add_rms_norm_triton
from minids.kernels.rmsnorm import rms_norm as rms_norm_triton

from minids.norm import add_rms_norm, rms_norm

EPS = 1e-6
NOTES = """Notes. minids: the forward normalises (rows x BLOCK_D) tiles of 2K-8K elements (several rows at small D,
mask-free where the tile divides the shapes); from D=2048 it reads each row twice (sum of squares, then y, the second
read served by L2), with D a compile-time constant as in torch.compile's kernels; it
stores rstd so the backward does not reduce x twice; the backward runs one wave of persistent programs (as many as
the compiled kernel's registers let each SM hold), small 4-warp tiles up to D=2048, each program loading its next
tile while it computes the current one and keeping dweight partials in registers, then one (P, D) float32 buffer
that one deterministic kernel sums (no atomics on data). The fused add writes s = x + residual and normalises it
from registers (one pass at every width). F.rms_norm
does not round the normalised value to bf16 before the weight multiply (minids and transformers do); the bytes
moved are the same. *_ms columns: do_bench wall time per call (host overhead included
where it exceeds the kernels); *_kernel_* columns: the summed GPU kernel time per call (torch.profiler), which is
what the bandwidth targets are about."""


def liger_norm(D: int) -> Callable | None:
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError as e:
        print(f"liger-kernel not available ({e}); its column is left out")
        return None
    try:
        m = LigerRMSNorm(D, eps=EPS, in_place=False)
    except TypeError:  # older releases have no in_place argument
        m = LigerRMSNorm(D, eps=EPS)
    return m.to("cuda", torch.bfloat16)


def peers(D: int, w: torch.Tensor) -> dict[str, tuple[Callable, tuple]]:
    """Plain RMSNorm implementations x -> y with the same weight values, each with the weight it differentiates."""
    fns: dict[str, tuple[Callable, tuple]] = {
        "minids": (lambda x: rms_norm_triton(x, w, EPS), (w,)),
        "F.rms_norm": (lambda x: F.rms_norm(x, (D,), w, EPS), (w,)),
        "compiled": (torch.compile(lambda x: rms_norm(x, w, EPS), dynamic=False), (w,)),
    }
    liger = liger_norm(D)
    if liger is not None:
        with torch.no_grad():
            liger.weight.copy_(w)
        fns["liger"] = (liger, (liger.weight,))
    return fns


def fused_peers(w: torch.Tensor) -> dict[str, Callable]:
    """Residual add + RMSNorm implementations (x, residual) -> (normed, x + residual)."""
    return {
        "minids": lambda x, r: add_rms_norm_triton(x, r, w, EPS),
        "compiled": torch.compile(lambda x, r: add_rms_norm(x, r, w, EPS), dynamic=False),
    }


def time_three(fn: Callable, sets: list[tuple], params: tuple) -> tuple[float, float, float]:
    """Median wall ms (do_bench) of forward, backward alone, and forward+backward of y = fn(*inputs), rotating over
    input sets.

    sets: ((inputs...), (output grads...)) pairs; params: the tensors besides the inputs that get gradients.
    """
    def fwd_out(s):
        out = fn(*s[0])
        return out if isinstance(out, tuple) else (out,)

    cyc = itertools.cycle(sets)
    f_ms = median_ms(lambda: fn(*next(cyc)[0]))  # grad mode on, as in training (one compiled graph per peer)
    graphs = [(fwd_out(s), s) for s in sets]
    cyc_b = itertools.cycle(graphs)

    def bwd():
        outs, s = next(cyc_b)
        torch.autograd.grad(outs, (*s[0], *params), s[1], retain_graph=True)

    b_ms = median_ms(bwd)
    del graphs

    def fwd_bwd():
        s = next(cyc)
        torch.autograd.grad(fwd_out(s), (*s[0], *params), s[1])

    fb_ms = median_ms(fwd_bwd)
    return f_ms, b_ms, fb_ms


def kernel_times(fn: Callable, sets: list[tuple], params: tuple) -> tuple[float, float]:
    """GPU kernel ms of the forward and of the backward alone (``device_ms``), rotating over input sets."""
    cyc = itertools.cycle(sets)
    graphs = itertools.cycle([((o if isinstance(o := fn(*s[0]), tuple) else (o,)), s) for s in sets])

    def bwd():
        outs, s = next(graphs)
        torch.autograd.grad(outs, (*s[0], *params), s[1], retain_graph=True)

    return device_ms(lambda: fn(*next(cyc)[0])), device_ms(bwd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--quick", action="store_true", help="hidden 1024 and 7168 only")
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--hidden", type=int, nargs="+", help="hidden sizes (default 512 1024 2048 4096 7168)")
    ap.add_argument("--rounds", type=int, default=1, help="kernel-time samples per peer, the peers taking turns; "
                    "the *_kernel_* columns report the median")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least 1")
    if not torch.cuda.is_available():
        sys.exit("bench/rmsnorm.py needs a CUDA GPU")
    torch._dynamo.config.cache_size_limit = 64
    meta = metadata()
    copy_gbs = copy_bandwidth_gbs()
    meta["copy_GBps"] = round(copy_gbs, 1)
    meta["matmul_bf16_TFLOPs"] = round(matmul_tflops(), 1)
    print(f"{meta['device']}: copy {copy_gbs:.0f} GB/s, bf16 matmul {meta['matmul_bf16_TFLOPs']} TFLOP/s")

    R = args.rows
    hidden = args.hidden or ([1024, 7168] if args.quick else [512, 1024, 2048, 4096, 7168])
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for D in hidden:
        n_sets = max(2, -(-(256 << 20) // (R * D * 2)))
        w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16).requires_grad_()

        def rnd(shape=(R, D)):
            return torch.randn(shape, device="cuda", generator=g, dtype=torch.bfloat16)

        plain = [((rnd().requires_grad_(),), (rnd(),)) for _ in range(n_sets)]
        fused = [((rnd().requires_grad_(), rnd().requires_grad_()), (rnd(), rnd())) for _ in range(n_sets)]
        cases = [("rms_norm", name, fn, params, plain, 2, 3) for name, (fn, params) in peers(D, w).items()]
        cases += [("add_rms_norm", name, fn, (w,), fused, 4, 4) for name, fn in fused_peers(w).items()]
        measured = {}
        for op, name, fn, params, sets, f_elems, b_elems in cases:
            try:
                measured[op, name] = (*time_three(fn, sets, params), [], [])
            except Exception as e:  # noqa: BLE001  a failing peer is one line, the sweep continues
                print(f"{op} D={D} {name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        for _ in range(args.rounds):  # kernel time, the peers taking turns so that drifts hit them alike
            for op, name, fn, params, sets, _f, _b in cases:
                if (op, name) in measured:
                    f_dev, b_dev = kernel_times(fn, sets, params)
                    measured[op, name][3].append(f_dev)
                    measured[op, name][4].append(b_dev)
        for op, name, fn, params, sets, f_elems, b_elems in cases:
            if (op, name) not in measured:
                continue
            f_ms, b_ms, fb_ms, f_devs, b_devs = measured[op, name]
            f_dev, b_dev = statistics.median(f_devs), statistics.median(b_devs)
            unit = R * D * 2
            f_gbs, b_gbs = f_elems * unit / f_ms / 1e6, b_elems * unit / b_ms / 1e6
            fb_gbs = (f_elems + b_elems) * unit / fb_ms / 1e6
            rows.append({
                "op": op, "rows": R, "D": D, "impl": name,
                "fwd_ms": f_ms, "fwd_TBps": f_gbs / 1e3, "fwd_of_copy": f_gbs / copy_gbs,
                "bwd_ms": b_ms, "bwd_TBps": b_gbs / 1e3, "bwd_of_copy": b_gbs / copy_gbs,
                "fwd_bwd_ms": fb_ms, "fwd_bwd_TBps": fb_gbs / 1e3,
                "fwd_kernel_ms": f_dev, "fwd_kernel_of_copy": f_elems * unit / f_dev / 1e6 / copy_gbs,
                "bwd_kernel_ms": b_dev, "bwd_kernel_of_copy": b_elems * unit / b_dev / 1e6 / copy_gbs,
                "fwd_kernel_ms_each_round": [round(t, 5) for t in f_devs],
                "bwd_kernel_ms_each_round": [round(t, 5) for t in b_devs],
            })
            print(f"{op:12s} D={D:5d} {name:10s} fwd {f_ms:.3f} ms {f_gbs / 1e3:.2f} TB/s ({f_gbs / copy_gbs:.0%})"
                  f"  bwd {b_ms:.3f} ms {b_gbs / 1e3:.2f} TB/s ({b_gbs / copy_gbs:.0%})  fwd+bwd {fb_gbs / 1e3:.2f} TB/s"
                  f"  kernels alone: fwd {rows[-1]['fwd_kernel_of_copy']:.0%} bwd {rows[-1]['bwd_kernel_of_copy']:.0%} of copy")
        del plain, fused
        torch.cuda.empty_cache()
    cols = ["op", "rows", "D", "impl", "fwd_ms", "fwd_TBps", "fwd_of_copy", "bwd_ms", "bwd_TBps", "bwd_of_copy",
            "fwd_bwd_ms", "fwd_bwd_TBps", "fwd_kernel_ms", "fwd_kernel_of_copy", "bwd_kernel_ms", "bwd_kernel_of_copy"]
    print(write_results(args.out, "rmsnorm", meta, rows, cols, NOTES))


if __name__ == "__main__":
    main()
