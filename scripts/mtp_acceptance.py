"""How often a trained model's MTP module drafts the right token: the acceptance rate of speculation.

    python scripts/mtp_acceptance.py runs/mtp3m/checkpoints/step-0000732     # writes docs/mtp_acceptance.*

Prompts are windows of the validation split of the run's corpus (the same split the trainer held out).
For each, ``speculative_generate`` decodes greedily and with sampling at temperature 1; the acceptance
rate is accepted drafts / drafted tokens and tokens per step counts the tokens each verification
forward adds (1 + acceptance in expectation). The V3 report gives 85-90% acceptance for the second
token and about 1.8x tokens per second (V3P 5.4.3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minids.checkpoint import from_pretrained  # noqa: E402
from minids.data import TokenData, load_documents, load_saved_tokenizer, split_documents  # noqa: E402
from minids.generate import speculative_generate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--val-fraction", type=float, default=0.02, help="the training run's val_fraction")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    ck = Path(args.checkpoint)
    model = from_pretrained(ck)
    tok = load_saved_tokenizer(ck) or load_saved_tokenizer(ck.parent.parent)
    docs, desc = load_documents(None)
    _, val = split_documents(docs, args.val_fraction)
    data = TokenData.build(val[:1], val, tok)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data.val) - args.prompt_len, (args.prompts,), generator=g)
    prompts = [data.val[s : s + args.prompt_len].tolist() for s in starts]
    res = {}
    for name, kw in (("greedy", {}), ("sampling, T=1", {"temperature": 1.0, "generator": torch.Generator().manual_seed(1)})):
        out, stats = speculative_generate(model, prompts, args.new_tokens, **kw)
        res[name] = stats
        print(name, stats, flush=True)
    record = {"checkpoint": str(ck), "data": desc, "args": vars(args), "results": res}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mtp_acceptance.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [f"{args.prompts} validation prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens each; "
             f"checkpoint `{ck}`.", "", "| decoding | drafts | accepted | acceptance | tokens per verification step |",
             "|---|---|---|---|---|"]
    for name, st in res.items():
        lines.append(f"| {name} | {st['drafted']} | {st['accepted']} | {st['acceptance']:.1%} | {st['tokens_per_step']:.2f} |")
    (Path(args.out) / "mtp_acceptance.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
