"""The aux-loss-free balancing comparison (Wang et al. 2024, arXiv 2408.15664; DeepSeek-V3 2.1.2), at toy scale.

    python scripts/balance_study.py                       # CPU defaults, about 15 minutes on 2 cores
    python scripts/balance_study.py --steps 2000 --batch-size 32 --seq-len 512 --layers 6   # on a GPU

Trains the same small MoE (sigmoid gate, top-K normalised, no group limiting, as in the paper's
main runs) with the same seed, data and token budget under four balancing schemes:
    (a) none:             no loss, bias frozen at 0
    (b) aux loss:         the classic batch-wise expert balance loss, alpha = 0.001 (the paper's baseline)
    (c) loss-free:        the bias update b_i += gamma * sign(mean load - load_i), gamma = 0.001
    (d) loss-free + seq:  (c) plus V3's complementary sequence-wise loss, alpha = 1e-4
    (e) loss-free, gamma = 0.01 (the paper's Fig. 4 tries 1e-4, 1e-3 and 1e-2; short runs may need the larger)
and writes, in --out: ``balance_study.md`` and ``.json`` (validation loss, perplexity, bits per byte,
MaxVio_global on the validation split at the end, MaxVio_batch averaged over training) and
``balance_study.png`` (MaxVio_batch over training; the final validation expert load per layer).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minids.train import TrainConfig, train  # noqa: E402

SCHEMES = {
    "none": {"bias_gamma": 0.0, "balance": {}},
    "aux loss (batch, 1e-3)": {"bias_gamma": 0.0, "balance": {"batch": 1e-3}},
    "loss-free (gamma 1e-3)": {"bias_gamma": 1e-3, "balance": {}},
    "loss-free + seq loss (1e-4)": {"bias_gamma": 1e-3, "balance": {"sequence": 1e-4}},
    # a sensitivity check beyond the four: the paper's Fig. 4 also tries u = 0.01
    "loss-free (gamma 1e-2)": {"bias_gamma": 1e-2, "balance": {}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=3, help="decoder layers (the first is dense)")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/balance_study")
    ap.add_argument("--runs", default="runs/balance_study")
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from --out's JSON")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((Path(args.out) / "balance_study.json").read_text())["results"]
        return plot(saved, Path(args.out) / "balance_study.png")
    overrides = {
        "num_hidden_layers": args.layers, "n_routed_experts": args.experts, "num_experts_per_tok": args.top_k,
        "n_group": 1, "topk_group": 1, "num_nextn_predict_layers": 0,
    }
    results = {}
    t0 = time.perf_counter()
    for name, scheme in SCHEMES.items():
        slug = name.split(" (")[0].replace(" + ", "_").replace(" ", "_").replace("-", "_")
        cfg = TrainConfig(
            model="tiny-v3", model_overrides=overrides, seq_len=args.seq_len, batch_size=args.batch_size,
            max_steps=args.steps, max_tokens=None, lr=args.lr, warmup_steps=max(1, args.steps // 10),
            eval_interval=max(1, args.steps // 5), eval_tokens=args.eval_tokens, ckpt_interval=10**9,
            keep_checkpoints=1, out_dir=f"{args.runs}/{slug}", seed=args.seed, sample_tokens=0, plots=False,
            bias_freeze_fraction=1.0, **scheme,
        )
        print(f"== {name}", flush=True)
        res = train(cfg)
        rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
        vio = [(r["step"], r["maxvio_batch"]) for r in rows if "maxvio_batch" in r]
        load = json.loads((Path(cfg.out_dir) / "expert_load.json").read_text())["load"]
        results[name] = {
            "val_loss": res["val_loss"], "val_ppl": math.exp(res["val_loss"]), "val_bpb": res["val_bpb"],
            "maxvio_global": res["maxvio_global"], "maxvio_batch_mean": sum(v for _, v in vio) / len(vio),
            "maxvio_batch": vio, "expert_load": load, "run": cfg.out_dir,
        }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "model_overrides": overrides, "minutes": (time.perf_counter() - t0) / 60,
            "tokens_per_run": args.steps * args.batch_size * args.seq_len}
    (out / "balance_study.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = [
        f"Model: tiny-v3 with {args.layers} layers (first dense), {args.experts} routed + 1 shared experts, "
        f"top-{args.top_k}, sigmoid gate; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens "
        f"({meta['tokens_per_run']:,} tokens per run) on the Python standard library, byte tokenizer, seed {args.seed}.",
        "",
        "| scheme | val loss | val ppl (byte) | val bits/byte | MaxVio_global | MaxVio_batch (mean over training) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_ppl']:.3f} | {r['val_bpb']:.4f} | "
                     f"{r['maxvio_global']:.3f} | {r['maxvio_batch_mean']:.3f} |")
    (out / "balance_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out / "balance_study.png")
    print(f"wrote {out}/balance_study.md, .json, .png in {meta['minutes']:.1f} min")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(results)
    fig = plt.figure(figsize=(3.6 * n, 7))
    ax = fig.add_subplot(2, 1, 1)
    for name, r in results.items():
        steps, vio = zip(*r["maxvio_batch"])
        w = max(1, len(vio) // 20)
        smooth = np.convolve(vio, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"MaxVio_batch (mean over layers, {w}-step average)")
    ax.set_yscale("log")
    ax.legend()
    for i, (name, r) in enumerate(results.items()):
        a = fig.add_subplot(2, n, n + i + 1)
        load = np.array(r["expert_load"], dtype=float)
        im = a.imshow(load / load.mean(axis=1, keepdims=True), cmap="coolwarm", vmin=0, vmax=2, aspect="auto")
        a.set_title(f"{name}\nMaxVio_global {r['maxvio_global']:.2f}", fontsize=9)
        a.set_xlabel("expert")
        a.set_ylabel("MoE layer")
        a.set_yticks(range(load.shape[0]))
    fig.colorbar(im, ax=fig.axes[1:], shrink=0.8, label="validation load / balanced load")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
