"""Every FP8 linear of a model, ``sim`` against ``real``, on the activations that the model really feeds it.

    python scripts/fp8_layer_check.py --model small-v3 --layers 2          # CPU: real runs the references
    python scripts/fp8_layer_check.py --model small-v3 --out bench/results  # a GPU: Triton kernels, cuBLAS, bf16
    python scripts/fp8_layer_check.py --checkpoint runs/x/checkpoints/step-0000200   # a trained model's activations

One forward of the model (``fp8: sim``, bf16 autocast on a GPU, float32 on a CPU) records the input and weight of
every FP8 GEMM call: attention and dense/shared-expert linears, and each routed expert's three GEMMs. Each recorded
call is then run again, as ``sim`` and as ``real``, forward and backward (the same random output gradient), and the
relative differences ||a - b|| / ||b|| of y, dx and dW are listed per layer. The two modes quantize the same
operands and accumulate in float32, so they differ only by the order of additions and, under autocast, by the
rounding of sim's dequantized operands to bf16 (2^-9 relative): a layer far above that is a bug, not noise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import minids.fp8 as mfp8  # noqa: E402
import minids.moe as mmoe  # noqa: E402
from minids.checkpoint import CheckpointError, from_pretrained  # noqa: E402
from minids.config import ModelConfig  # noqa: E402
from minids.model import Transformer  # noqa: E402


def record_calls(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> list[tuple]:
    """(name, x, weight) of every fp8_linear call in one forward (model already switched to fp8 sim)."""
    calls, names = [], {}
    for n, p in model.named_parameters():
        names[p] = n
    orig = mfp8.fp8_linear

    def rec(x, weight, *a, **kw):
        name = names.get(weight)
        if name is None:  # a routed expert: one slice of the stacked (E, ., .) weight
            name = f"{names.get(weight._base, '?')}[expert]" if weight._base is not None else "?"
        calls.append((name, x.detach().clone(), weight.detach().clone()))
        return orig(x, weight, *a, **kw)

    mfp8.fp8_linear, mmoe.fp8_linear = rec, rec
    try:
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            model(ids)
    finally:
        mfp8.fp8_linear, mmoe.fp8_linear = orig, orig
    return calls


def compare(x: torch.Tensor, w: torch.Tensor, autocast: bool, seed: int) -> dict[str, float]:
    """sim vs real of one call: relative differences of y, dx, dW (and the sizes)."""
    out = {}
    g = torch.Generator(device=x.device).manual_seed(seed)
    dy = None
    for real in (False, True):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = mfp8.fp8_linear(xi, wi, real=real)
        if dy is None:
            dy = torch.randn(y.shape, generator=g, device=y.device).to(y.dtype)
        y.backward(dy)
        out[real] = (y.detach().float(), xi.grad.float(), wi.grad.float())
    rel = {k: ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
           for k, a, b in zip(("y", "dx", "dw"), out[True], out[False])}
    return {**rel, "M": x.numel() // x.shape[-1], "K": x.shape[-1], "N": w.shape[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="small-v3")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--checkpoint", default=None, help="a saved model (HF layout) instead of a fresh --model")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--out", default=None, help="write fp8_layer_check.{json,md} here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda where there is one)")
    args = ap.parse_args()
    if args.device not in (None, "cpu", "cuda"):
        ap.error(f"--device {args.device}: cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; leave --device out or use cpu")
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    autocast = dev == "cuda"
    torch.manual_seed(0)
    if args.checkpoint:
        try:
            model = from_pretrained(args.checkpoint, dtype=torch.float32, device=dev).train()
        except CheckpointError as e:
            ap.error(f"--checkpoint: {e}")
        cfg, args.model = model.cfg, args.checkpoint
    else:
        cfg = ModelConfig.load(args.model)
        if args.layers:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), "num_hidden_layers": args.layers})
        model = Transformer(cfg).to(dev).train()
    mfp8.enable_fp8(model, "sim")
    ids = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device=dev)
    calls = record_calls(model, ids, autocast)
    rows = []
    for i, (name, x, w) in enumerate(calls):
        if x.numel() == 0:
            continue
        rows.append({"name": name, "x_dtype": str(x.dtype).removeprefix("torch."), **compare(x, w, autocast, i)})
    worst = {k: max(r[k] for r in rows) for k in ("y", "dx", "dw")}
    head = (f"{args.model}{f' ({args.layers} layers)' if args.layers else ''}, batch {args.batch_size} x "
            f"{args.seq_len}, {torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}, torch {torch.__version__}, "
            f"{'bf16 autocast' if autocast else 'float32'}: {len(rows)} FP8 GEMM calls, sim vs real, "
            f"||real - sim|| / ||sim||")
    per = {}  # one line per weight: a routed expert tensor's calls (one per expert) together, the worst of them
    for r in rows:
        p = per.setdefault(r["name"], {**r, "calls": 0, "M": 0})
        p.update({k: max(p[k], r[k]) for k in ("y", "dx", "dw")}, calls=p["calls"] + 1, M=p["M"] + r["M"])
    md = [head, "", "| weight | calls | x dtype | M (all calls) | K | N | y | dx | dW |", "|---|" + "---|" * 8]
    md += [f"| {r['name']} | {r['calls']} | {r['x_dtype']} | {r['M']} | {r['K']} | {r['N']} | {r['y']:.2e} | "
           f"{r['dx']:.2e} | {r['dw']:.2e} |" for r in per.values()]
    md += [f"| worst | | | | | {worst['y']:.2e} | {worst['dx']:.2e} | {worst['dw']:.2e} |"]
    print("\n".join(md))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "fp8_layer_check.md").write_text("\n".join(md) + "\n")
        record = {"head": head, "rows": rows, "worst": worst}
        (out / "fp8_layer_check.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
