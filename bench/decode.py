"""Decoding throughput: CUDA-graph decode steps against eager per-step loops, the same model in one process.

    python3 bench/decode.py --out DIR                     # full sweep (H200: about 2-3 minutes)
    python3 bench/decode.py --out DIR --quick             # reduced sweep
    python3 bench/decode.py --out DIR --ckpt runs/mtp3m/checkpoints/step-0000732   # + MTP speculation, trained
    python3 bench/decode.py --out DIR --only spec --ckpt CK1 --ckpt CK2    # speculation rows only -> decode-spec.*

Model: the issue's small DeepSeek-V3-style model (configs/small-v3.json cut to 4 layers: dim 1024, 16 heads,
kv_lora 256, nope 64, rope 32, v 64, 16 experts top-4 + 1 shared, moe_inter 512, dense inter 2816, vocab
32000), random weights, bf16. For each batch B in (1, 8, 64) and cache length in (1K, 4K, 16K, 32K) the
cache is filled directly (random normalised latents, random RoPE keys, lengths set: the prefill is not
timed) and a fixed number of greedy steps is timed (no stop tokens). Rows:

- eager loop (official style): one eager forward per step, argmax, ``.tolist()`` (a host sync every step),
  routed experts as the per-expert loop (the official inference code's bincount + ``.tolist()``);
- minids eager: ``minids.decode.Decoder``'s step without graphs (no host sync, still one launch per op);
- minids graphs: the same step captured once into a CUDA graph and replayed, with mla_impl "auto" (the Triton
  MLA decode kernel, minids.kernels.mla_decode), "absorbed" (the torch reference) and "naive";

Reported per row: median step time over repeated timed runs (CUDA events, warm-up and capture first),
tokens/s = B / step time, peak memory, and the bytes a step must read at the least (weights of the used
experts and everything else but the embedding, plus the whole cache B x length x bytes/token) over the step
time as GB/s, with its fraction of the device-to-device copy bandwidth measured in the same run (bytes
read + written). The 8192^3 bf16 matmul rate is measured and recorded as the compute ceiling (decoding a
small model is bound by launches and bytes, not FLOPs).

Speculation (MTP, depth 1): without --ckpt the random model's drafts are never right, so only its cost is
shown (tokens/s with and without speculation after a 1K-token prefill). With --ckpt (a trained tiny-v3 with
MTP, e.g. runs/mtp3m) prompts are windows of the run's validation text, as scripts/mtp_acceptance.py takes
them, and the table gives tokens/s with and without speculation, the acceptance rate and tokens per step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import minids
from minids.cache import KVCache
from minids.decode import Decoder
from _common import copy_bandwidth_gbs, matmul_tflops, metadata, write_atomic  # noqa: E402

SMALL = {"num_hidden_layers": 4, "max_position_embeddings": 32768 + 256}  # small-v3 with the 4 layers
REFERENCE_TOKS = 366.0  # the eager official-style implementation at batch 8 (absorbed), H200
MAX_STEPS = 64  # most steps in one timed run (the cache is allocated for it)


# ------------------------------------------------------------------------------------------ measurement
def time_ms(fn, reps: int) -> list[float]:
    """Milliseconds of each of reps calls of fn, by CUDA events (fn may sync the host itself)."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


# ------------------------------------------------------------------------------------------ model and cache
def build_small() -> minids.Transformer:
    cfg = minids.ModelConfig.from_dict({**minids.ModelConfig.load("small-v3").to_dict(), **SMALL})
    torch.manual_seed(0)
    return minids.Transformer(cfg).to("cuda", torch.bfloat16).eval()


def fill_cache(cache: KVCache, length: int, g: torch.Generator) -> None:
    """Random cache contents up to length: unit-RMS latents (they are RMS-normalised) and RoPE'd keys."""
    for layer in cache.layers:
        layer.a[:, :length].normal_(generator=g)
        layer.b[:, :length].normal_(generator=g)


def step_bytes(model, B: int, length: int, cache_bytes_per_token: int) -> float:
    """Least bytes one decode step reads: non-embedding weights with only the routed experts B tokens are
    expected to hit (E (1 - (1 - K/E)^B) of E, uniform routing), plus the whole cache."""
    cfg = model.cfg
    es = next(model.parameters()).element_size()
    main = [p for n, p in model.named_parameters() if not n.startswith(("mtp.", "model.embed_tokens"))]
    total = sum(p.numel() for p in main)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    routed = cfg.num_moe_layers * E * per_expert
    hit = E * (1 - (1 - K / E) ** B) if E else 0
    weights = (total - routed + cfg.num_moe_layers * hit * per_expert) * es
    return weights + B * length * cache_bytes_per_token


# ------------------------------------------------------------------------------------------ the rows
def official_loop(model, B: int, length: int, g: torch.Generator):
    """The eager per-step loop: forward, argmax, a host read of the tokens; per-expert MoE loop."""
    cache = KVCache.allocate(model.cfg, B, length + MAX_STEPS + 2, dtype=torch.bfloat16, device="cuda")
    fill_cache(cache, length, g)
    tok0 = torch.randint(0, model.cfg.vocab_size, (B,), device="cuda", generator=g)

    def run(steps: int) -> None:
        cache.lengths.fill_(length)
        tok = tok0
        with torch.no_grad():
            for _ in range(steps):
                logits = model(tok[:, None], cache=cache).logits[:, -1]
                tok = logits.argmax(-1)
                tok.tolist()  # the host looks at every step's tokens (stop check, streaming)

    return run, cache


def decoder_run(model, B: int, length: int, g: torch.Generator, *, graphs: bool, impl: str):
    dec = Decoder(model, B, length + MAX_STEPS + 2, MAX_STEPS + 1, mla_impl=impl, cuda_graphs=graphs)
    fill_cache(dec.cache, length, g)
    tok0 = torch.randint(0, model.cfg.vocab_size, (B,), device="cuda", generator=g)
    lens = torch.full((B,), length, dtype=torch.long, device="cuda")

    def run(steps: int) -> None:
        dec.reset(tok0, lens)
        for _ in range(steps):
            dec.step()

    return run, dec


def measure(make, reps: int, target_ms: float = 150.0) -> dict:
    """Warm up (captures a graph), size the timed run to about target_ms, return the median step time."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run, keep = make()
    run(2)
    torch.cuda.synchronize()
    probe = statistics.median(time_ms(lambda: run(4), 2)) / 4
    steps = max(4, min(MAX_STEPS, int(target_ms / max(probe, 1e-3))))
    ms = statistics.median(time_ms(lambda: run(steps), reps)) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    graphed = getattr(keep, "graph", None) is not None
    return {"step_ms": ms, "steps_per_run": steps, "peak_gib": peak, "graph": graphed}


# ------------------------------------------------------------------------------------------ speculation
def speculation_rows(model, prompts: list[list[int]], new_tokens: int, reps: int, label: str,
                     temperature: float = 0.0) -> list[dict]:
    """tokens/s of plain and speculative graph decoding of the same prompts (prefill untimed)."""
    rows = []
    B, P = len(prompts), max(len(p) for p in prompts)
    for spec in (False, True):
        name = f"{label}: graphs + MTP speculation" if spec else f"{label}: graphs, plain"
        try:
            g = torch.Generator("cuda").manual_seed(0)
            dec = Decoder(model, B, P + new_tokens, new_tokens, speculative=spec, temperature=temperature,
                          generator=g, cuda_graphs=True)
            dec.generate(prompts)  # warm-up and capture
            times, emitted = [], 0
            for _ in range(reps):
                dec.prefill(prompts)
                torch.cuda.synchronize()
                times += time_ms(dec.finish, 1)
                emitted = int(dec.state["n_out"].sum()) - B  # the prefill emitted one token per sequence
            ms = statistics.median(times)
            row = {"row": name, "B": B, "prompt": P, "new_tokens": new_tokens, "temperature": temperature,
                   "ms": ms, "tok_s": emitted / ms * 1e3}
            if spec:
                row.update(dec.stats())
            rows.append(row)
            print(f"  {name:55s} B={B:3d}  {row['tok_s']:10.1f} tok/s"
                  + (f"  acceptance {row['acceptance']:.1%}  tokens/step {row['tokens_per_step']:.2f}" if spec else ""),
                  flush=True)
        except Exception as e:  # noqa: BLE001  a failing row prints one line; the sweep goes on
            print(f"  {name}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            rows.append({"row": name, "B": B, "error": f"{type(e).__name__}: {e}"[:500]})
    if len(rows) == 2 and "tok_s" in rows[0] and "tok_s" in rows[1]:
        rows[1]["speedup_vs_plain"] = rows[1]["tok_s"] / rows[0]["tok_s"]
        print(f"  {label}: speculation speed-up {rows[1]['speedup_vs_plain']:.2f}x", flush=True)
    return rows


def checkpoint_prompts(ck: Path, n: int, length: int) -> tuple[object, list[list[int]]]:
    """Windows of the run's validation split, as scripts/mtp_acceptance.py takes them."""
    from minids.checkpoint import from_pretrained
    from minids.data import TokenData, load_documents, load_saved_tokenizer, split_documents

    model = from_pretrained(ck).to("cuda", torch.bfloat16).eval()
    tok = load_saved_tokenizer(ck) or load_saved_tokenizer(ck.parent.parent)
    docs, _ = load_documents(None)
    _, val = split_documents(docs, 0.02)
    data = TokenData.build(val[:1], val, tok)
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, len(data.val) - length, (n,), generator=g)
    return model, [data.val[s : s + length].tolist() for s in starts]


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--quick", action="store_true", help="reduced sweep")
    ap.add_argument("--ckpt", action="append", default=[],
                    help="a trained checkpoint with MTP for the speculation rows (repeat for several)")
    ap.add_argument("--only", choices=("all", "sweep", "spec"), default="all",
                    help="sweep: the batch x cache-length table only; spec: the speculation rows only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/decode.py needs a CUDA GPU")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = (1, 8, 64)
    lengths = (1024, 16384) if args.quick else (1024, 4096, 16384, 32768)
    eager_lengths = (1024,) if args.quick else lengths
    reps = 3 if args.quick else 5
    import triton

    record = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_sha": metadata()["git_sha"], "quick": args.quick,
    }
    bw, tflops = copy_bandwidth_gbs(), matmul_tflops()
    record["ceilings"] = {"copy_GBps": bw, "matmul_bf16_TFLOPs": tflops}
    print(f"{record['device']}  torch {record['torch']}  triton {record['triton']}  git {record['git_sha']}")
    print(f"ceilings: copy {bw:.0f} GB/s (read + write), bf16 matmul 8192^3 {tflops:.0f} TFLOP/s", flush=True)

    model = build_small()
    cfg = model.cfg
    bpt = KVCache.allocate(cfg, 1, 1, dtype=torch.bfloat16).bytes_per_token()
    record["model"] = {"config": "small-v3", "overrides": SMALL, "dtype": "bfloat16",
                       "parameters": sum(p.numel() for p in model.parameters()), "cache_bytes_per_token": bpt}
    print(f"model: small-v3, 4 layers, bf16; cache {bpt} bytes per token", flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    rows = []
    variants = [
        ("eager loop (official style)", lambda B, L: official_loop(model, B, L, g), "loop"),
        ("minids eager", lambda B, L: decoder_run(model, B, L, g, graphs=False, impl="auto"), "auto"),
        ("minids graphs (auto: Triton MLA)", lambda B, L: decoder_run(model, B, L, g, graphs=True, impl="auto"), "auto"),
        ("minids graphs (absorbed)", lambda B, L: decoder_run(model, B, L, g, graphs=True, impl="absorbed"), "auto"),
        ("minids graphs (naive)", lambda B, L: decoder_run(model, B, L, g, graphs=True, impl="naive"), "auto"),
    ]
    for L in lengths if args.only != "spec" else ():
        for B in batches:
            for name, make, moe in variants:
                if name.startswith(("eager", "minids eager")) and L not in eager_lengths:
                    continue
                H, Dqkv = cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim
                if "naive" in name and B * L * H * Dqkv * 4 > 8e9:  # the expanded fp32 keys/values of one layer
                    rows.append({"row": name, "B": B, "length": L, "skipped": "expanded K/V over 8 GB"})
                    continue
                model.set_moe_impl(moe)
                try:
                    r = measure(lambda make=make, B=B, L=L: make(B, L), reps)
                except Exception as e:  # noqa: BLE001  a failing row prints one line; the sweep goes on
                    print(f"{name:30s} B={B:3d} L={L:6d}  FAILED {type(e).__name__}: {str(e).splitlines()[0][:160]}",
                          flush=True)
                    rows.append({"row": name, "B": B, "length": L, "error": f"{type(e).__name__}: {e}"[:500]})
                    torch.cuda.empty_cache()
                    continue
                finally:
                    model.set_moe_impl("auto")
                nbytes = step_bytes(model, B, L, bpt)
                r.update({"row": name, "B": B, "length": L, "tok_s": B / r["step_ms"] * 1e3,
                          "GBps": nbytes / r["step_ms"] / 1e6, "bytes_per_step": nbytes})
                r["frac_copy_bw"] = r["GBps"] / bw
                rows.append(r)
                print(f"{name:30s} B={B:3d} L={L:6d}  {r['step_ms']:8.3f} ms/step  {r['tok_s']:10.1f} tok/s  "
                      f"{r['GBps']:7.0f} GB/s ({r['frac_copy_bw']:.0%})  peak {r['peak_gib']:.1f} GiB", flush=True)
    record["rows"] = rows

    # target: the graph step at batch 8 against the 366 tok/s and the same-run eager loop
    def tok_s(name, B, L):
        return next((r["tok_s"] for r in rows if r["row"] == name and r["B"] == B and r["length"] == L
                     and "tok_s" in r), None)

    fast = max((t for t in (tok_s("minids graphs (auto: Triton MLA)", 8, 1024), tok_s("minids graphs (absorbed)", 8, 1024))
                if t), default=None)
    eager = tok_s("eager loop (official style)", 8, 1024)
    record["target"] = {"graphs_B8_1K_tok_s": fast, "reference_tok_s": REFERENCE_TOKS,
                        "ratio_vs_reference": fast / REFERENCE_TOKS if fast else None,
                        "ratio_vs_same_run_eager_loop": fast / eager if fast and eager else None, "goal": 10.0}
    target_line = (f"TARGET: minids graphs (best MLA impl), batch 8, 1K cache: {fast:.0f} tok/s = "
                   f"{fast / REFERENCE_TOKS:.1f}x the issue's 366 tok/s eager reference (goal >= 10x)"
                   + (f"; {fast / eager:.1f}x this run's eager loop ({eager:.0f} tok/s)" if eager else "")
                   if fast else "TARGET: the graph row at batch 8, 1K did not run")
    print(target_line, flush=True)

    # speculation
    spec_rows = []
    print("speculation (MTP depth 1, greedy unless noted):", flush=True)
    gp = torch.Generator().manual_seed(1)
    for B in (1, 8) if args.only != "sweep" else ():  # random weights: the cost of a speculative step (drafts random)
        prompts = torch.randint(0, cfg.vocab_size, (B, 1024), generator=gp).tolist()
        spec_rows += speculation_rows(model, prompts, 64, reps, "small-v3 random weights")
    torch.cuda.empty_cache()
    for ck in args.ckpt if args.only != "sweep" else ():
        try:
            trained, prompts = checkpoint_prompts(Path(ck), 8, 64)
            label = f"trained {Path(ck).name} ({trained.cfg.num_hidden_layers} layers)"
            for B in (1, 8):
                spec_rows += speculation_rows(trained, prompts[:B], 128, reps, label)
            spec_rows += speculation_rows(trained, prompts, 128, reps, f"{label}, T=1", temperature=1.0)
            del trained
            torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001  a failing peer prints one line
            print(f"  checkpoint {ck}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
            spec_rows.append({"row": "checkpoint", "error": f"{type(e).__name__}: {e}"[:500]})
    if not args.ckpt:
        print("  (no --ckpt: the trained-model speculation rows are skipped)", flush=True)
    record["speculation"] = spec_rows

    # the markdown table
    head = (f"Decoding on {record['device']} (torch {record['torch']}, triton {record['triton']}, "
            f"git {record['git_sha']}, {record['date'][:19]}). Model: small-v3 cut to 4 layers, random bf16 weights, "
            f"greedy, cache {bpt} B/token. Ceilings measured in this run: copy {bw:.0f} GB/s, bf16 matmul "
            f"{tflops:.0f} TFLOP/s.")
    md = [head, "",
          "| row | batch | cache length | ms/step | tokens/s | GB/s (min. bytes) | of copy BW | peak GiB |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tok_s" in r:
            md.append(f"| {r['row']} | {r['B']} | {r['length']} | {r['step_ms']:.3f} | {r['tok_s']:.0f} | "
                      f"{r['GBps']:.0f} | {r['frac_copy_bw']:.0%} | {r['peak_gib']:.1f} |")
        else:
            md.append(f"| {r['row']} | {r['B']} | {r['length']} | {r.get('skipped') or 'failed'} | | | | |")
    md += ["", target_line, "", "| speculation | batch | new tokens | tokens/s | acceptance | tokens/step | speed-up |",
           "|---|---|---|---|---|---|---|"]
    for r in spec_rows:
        if "tok_s" in r:
            acc = f"{r['acceptance']:.1%}" if "acceptance" in r else ""
            tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else ""
            sp = f"{r['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in r else ""
            md.append(f"| {r['row']} | {r['B']} | {r['new_tokens']} | {r['tok_s']:.0f} | {acc} | {tps} | {sp} |")
        else:
            md.append(f"| {r['row']} | {r.get('B', '')} | failed | | | | |")
    text = "\n".join(md) + "\n"
    print()
    print(text)
    name = "decode" if args.only == "all" else f"decode-{args.only}"
    write_atomic(json.dumps(record, indent=1, default=str) + "\n", out_dir / f"{name}.json")
    write_atomic(text, out_dir / f"{name}.md")
    if any(math.isnan(r.get("tok_s", 0.0)) for r in rows):
        sys.exit("a row measured NaN")


if __name__ == "__main__":
    main()
