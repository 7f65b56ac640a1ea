"""Training throughput: minids vs transformers' DeepseekV3ForCausalLM, same config, batch and precision.

    python bench/train_throughput.py --device cuda      # the issue's GPU config (284M), B=16, S=1024, bf16
    python bench/train_throughput.py --device cpu       # the tiny CPU config, B=8, S=256, fp32, 2 threads
    python bench/train_throughput.py --device cpu --rounds 5   # each variant 5 times, taking turns: the median

Both models get identical weights (minids loads transformers' checkpoint), the same random batches
and AdamW (beta2 0.95, weight decay 0.1, grad clip 1.0). Each step is forward + backward + clip +
optimizer step. Reported: median step time over the timed steps after warm-up, tokens/s and, on a GPU,
model FLOP utilisation = (6 * N_active + 12 * L * H * (d_qk + d_v) / 2 * S / 2 ... see flops_per_token) *
tokens/s / the bf16 matmul rate measured in the same run. Variants of minids: eager, and with
torch.compile (GPU). Results go to bench/results/train_throughput-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_atomic

import minids  # noqa: E402
from minids.train import _git_sha  # noqa: E402

GPU_CFG = dict(  # the Training issue's reference config (transformers: ~168k tokens/s on an H200)
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512, num_hidden_layers=8,
    first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=16,
    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=384, kv_lora_rank=256,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
)
CPU_CFG = dict(  # the CPU reference config (transformers: ~3.8k tokens/s on 2 threads)
    vocab_size=512, hidden_size=256, intermediate_size=704, moe_intermediate_size=128, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8, n_routed_experts=16,
    n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, q_lora_rank=96, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=1024,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: str, dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def time_steps(step, device: str, warmup: int, steps: int) -> float:
    for i in range(warmup):
        step(i)
    sync(device)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(warmup + i)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_step(model, opt, batches, forward, device, dtype):
    def step(i: int) -> None:
        ids = batches[i % len(batches)]
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(model, ids)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def adamw(model, fused: bool):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=fused or None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--variants", default=None, help="comma list: transformers,minids,minids-compile")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of 3 minids steps")
    ap.add_argument("--rounds", type=int, default=1, help="time each variant this many times, taking turns; report "
                    "the median")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds {args.rounds}: at least 1")
    import transformers

    dev = args.device
    gpu = dev == "cuda"
    if not gpu:
        torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    B = args.batch or (16 if gpu else 8)
    S = args.seq_len or (1024 if gpu else 256)
    steps = args.steps or (20 if gpu else 10)
    warmup = args.warmup or (5 if gpu else 3)
    dtype = torch.bfloat16 if gpu else torch.float32
    variants = (args.variants or ("transformers,minids,minids-compile" if gpu else "transformers,minids")).split(",")
    cfg_dict = GPU_CFG if gpu else CPU_CFG

    torch.manual_seed(0)
    hf_cfg = transformers.DeepseekV3Config(**cfg_dict, num_nextn_predict_layers=0)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg)
    tmp = Path(tempfile.mkdtemp())
    hf.save_pretrained(tmp)
    n_params = sum(p.numel() for p in hf.parameters())
    mcfg = minids.ModelConfig.load(tmp)
    counts = minids.count(mcfg)
    fpt = minids.flops_per_token(mcfg, S)  # forward FLOPs per token (matmuls + causal attention)
    train_flops_per_token = 3 * fpt  # forward + backward (2x forward)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg_dict["vocab_size"], (B, S), generator=gen).to(dev) for _ in range(4)]
    ceiling = matmul_tflops(dev, dtype) if gpu else None

    runs = {}
    for name in variants:  # every model and optimizer first, so that the rounds below can take turns
        torch.manual_seed(0)
        if name == "transformers":
            model = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(dev).train()

            def fwd(m, ids):
                return m(input_ids=ids, labels=ids).loss
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = minids.from_pretrained(tmp, dtype=torch.float32).to(dev).train()

            def fwd(m, ids):
                return m(ids, labels=ids).loss
            if name == "minids-compile":
                model = torch.compile(model)
        opt = adamw(model, fused=gpu)
        runs[name] = make_step(model, opt, batches, fwd, dev, dtype)
    per_round = {name: [] for name in variants}
    for r in range(args.rounds):  # the variants take turns, so a slow spell of the machine hits them alike
        for name, step_fn in runs.items():
            per_round[name].append(time_steps(step_fn, dev, warmup if r == 0 else 1, steps))
    results = {}
    for name, step_fn in runs.items():
        t = statistics.median(per_round[name])
        if args.profile and name == "minids":
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
            with profile(activities=acts) as prof:
                for i in range(3):
                    step_fn(i)
                sync(dev)
            key = "cuda_time_total" if gpu else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60), flush=True)
        tps = B * S / t
        rec = {"step_s": t, "tokens_per_s": tps, "step_s_each_round": [round(x, 4) for x in per_round[name]]}
        if gpu:
            rec["model_tflops"] = train_flops_per_token * tps / 1e12
            rec["mfu"] = rec["model_tflops"] / ceiling
        results[name] = rec
        print(f"{name:>16}: {t * 1e3:8.1f} ms/step  {tps:10,.0f} tokens/s"
              + (f"  {rec['model_tflops']:.0f} TFLOP/s  MFU {rec['mfu']:.1%}" if gpu else "")
              + (f"  (rounds: {' '.join(f'{x * 1e3:.0f}' for x in per_round[name])} ms)" if args.rounds > 1 else ""),
              flush=True)
    del runs
    if gpu:
        torch.cuda.empty_cache()
    base = results.get("transformers", {}).get("tokens_per_s")
    if base:
        for name, rec in results.items():
            rec["speedup_vs_transformers"] = rec["tokens_per_s"] / base
    out = {
        "bench": "train_throughput", "date": time.strftime("%Y-%m-%d"), "device": dev,
        "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "minids": minids.__version__, "git_sha": _git_sha(), "config": cfg_dict, "parameters": n_params, "activated": counts.activated,
        "batch": B, "seq_len": S, "dtype": str(dtype), "steps": steps, "warmup": warmup, "rounds": args.rounds,
        "train_flops_per_token": train_flops_per_token, "bf16_matmul_tflops": ceiling, "results": results,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) / f"train_throughput-{dev}.json"
    write_atomic(json.dumps(out, indent=1) + "\n", dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
