"""How much a 14-bit FP8 tensor-core accumulator loses, and what V3's promotion every 128 elements buys.

    python scripts/fp8_accumulation.py            # about a minute on 2 CPU cores; writes docs/fp8/

For K = 256 ... 16384, random E4M3 operands (standard normal data quantized with 1x128 / 128x128
scales, then dequantized: what the tensor core multiplies) go through ``minids.fp8.matmul_limited_acc``:
the products of each 32-wide instruction summed, the running sum truncated to 14 mantissa bits
after every instruction (V3P 3.3.2's "about 14 bits"), without promotion and with promotion to full
precision every N_C = 128. Errors are against the exact (float64) product of the same operands:
    max relative error  = max |C - C_exact| / mean |C_exact|
    mean relative error = mean |C - C_exact| / mean |C_exact|
(normalised by the mean magnitude, so that near-zero outputs do not dominate). The report states a
maximum relative error of nearly 2% at K = 4096 without promotion.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minids.fp8 import act_dequant, act_quant, matmul_limited_acc, weight_dequant, weight_quant  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--ks", default="256,512,1024,2048,4096,8192,16384")
    ap.add_argument("--bits", type=int, default=14)
    ap.add_argument("--out", default="docs/fp8")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for K in map(int, args.ks.split(",")):
        a, s = act_quant(torch.randn(args.m, K))
        a = act_dequant(a, s)  # (M, K) the FP8 values the hardware multiplies
        bq, bs = weight_quant(torch.randn(args.n, K))
        b = weight_dequant(bq, bs, dtype=torch.float32).t()  # (K, N)
        exact = a.double() @ b.double()
        scale = exact.abs().mean()
        row = {"K": K}
        for name, kw in (("no promotion", {}), ("promotion N_C=128", {"promote_every": 128}),
                         ("per-product truncation", {"chunk": 1})):
            err = (matmul_limited_acc(a, b, args.bits, **kw) - exact).abs()
            row[name] = {"max": (err.max() / scale).item(), "mean": (err.mean() / scale).item()}
        rows.append(row)
        print(K, {k: f"{v['max']:.2e}/{v['mean']:.2e}" for k, v in row.items() if k != "K"}, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fp8_accumulation.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    names = [k for k in rows[0] if k != "K"]
    lines = [f"{args.m}x{args.n} outputs, E4M3 operands, {args.bits}-bit accumulator; error / mean |exact|, max and mean.", "",
             "| K | " + " | ".join(f"{n} (max)" + f" | {n} (mean)" for n in names) + " |",
             "|---|" + "---|" * (2 * len(names))]
    for r in rows:
        lines.append(f"| {r['K']} | " + " | ".join(f"{r[n]['max']:.2%} | {r[n]['mean']:.2%}" for n in names) + " |")
    (out / "fp8_accumulation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ks = [r["K"] for r in rows]
    for i, n in enumerate(names):
        ax.plot(ks, [r[n]["max"] for r in rows], marker="o", color=f"C{i}", label=f"{n}, max")
        ax.plot(ks, [r[n]["mean"] for r in rows], marker=".", ls="--", color=f"C{i}", label=f"{n}, mean")
    ax.axhline(0.02, color="gray", lw=0.8, ls=":")
    ax.annotate("V3 report: ~2% max at K=4096", (4096, 0.02), textcoords="offset points", xytext=(-60, 6), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (reduction length)")
    ax.set_ylabel("error / mean |exact|")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fp8_accumulation.png", dpi=110)
    print(f"wrote {out}/fp8_accumulation.md, .json, .png")


if __name__ == "__main__":
    main()
