"""The ``minids`` command.

    minids info CONFIG [CONFIG ...]     parameters, activated parameters, MTP, KV cache, FLOPs per token,
                                        beside the published figures ("all" = every bundled config)
    minids smoke CONFIG                 a short forward/backward of a random batch on the CPU (or --device)
    minids convert SRC DST              a checkpoint to bf16/fp32 (FP8 weights dequantized), shard by shard
    minids train [--config F] [--name value ...]   train (defaults: tiny-v3, the Python stdlib corpus, CPU)
    minids plot RUN_DIR                 the PNG plots of a training run
    minids generate CKPT --prompt TEXT  continue a prompt (greedy, or --temperature/--top-k/--top-p), streaming

CONFIG is a preset name (``minids info --list``), a JSON file, or a Hugging Face model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

__all__ = ["main"]


def _fmt_count(n: float) -> str:
    return f"{n / 1e9:,.3f}B" if n >= 1e8 else f"{n / 1e6:,.3f}M"


def _published_check(ours: int, published: float) -> str:
    """Relative difference, and whether it lies within 1% or within the published rounding."""
    rel = ours / published - 1
    text = f"{ours / 1e9:.3f}B".rstrip("0")
    digits = len(f"{published / 1e9:g}".split(".")[1]) if "." in f"{published / 1e9:g}" else 0
    half_unit = 0.5 * 10 ** (-digits) * 1e9
    if abs(rel) <= 0.01:
        verdict = "within 1%"
    elif abs(ours - published) <= half_unit:
        verdict = f"within the published rounding ({published / 1e9:g}B = {text} rounded)"
    else:
        verdict = "OUTSIDE 1% and the published rounding"
    return f"{rel:+.2%}  {verdict}"


def _preset_key(name: str) -> str:
    """'deepseek-v3' for a preset name or a path to configs/deepseek-v3.json (names may contain dots)."""
    p = Path(str(name))
    return p.stem if p.suffix == ".json" else p.name


def info_record(name: str, seq_len: int) -> dict:
    """Everything ``minids info`` prints for one config, as a dict."""
    from minids.accounting import PUBLISHED, count, flops_per_token, kv_cache_elements_per_token
    from minids.config import ModelConfig

    cfg = ModelConfig.load(name)
    c = count(cfg)
    rec: dict = {"config": str(name), "counts": c.as_dict()}
    rec["kv_cache_elements_per_token"] = kv_cache_elements_per_token(cfg)
    rec["kv_cache_elements_per_token_naive"] = kv_cache_elements_per_token(cfg, "naive")
    rec["forward_flops_per_token"] = flops_per_token(cfg, seq_len, c)
    rec["seq_len"] = seq_len
    pub = PUBLISHED.get(_preset_key(name))
    if pub is not None:
        rec["published"] = {k: v for k, v in pub.__dict__.items() if v is not None}
    return rec


def _describe(cfg) -> str:
    attn = "MLA" if cfg.is_mla else ("GQA" if cfg.num_kv_heads < cfg.num_attention_heads else "MHA")
    parts = [cfg.model_type, f"{cfg.num_hidden_layers} layers", f"{attn} {cfg.num_attention_heads} heads"]
    if cfg.is_moe:
        dense = cfg.num_hidden_layers - cfg.num_moe_layers
        parts.append(
            f"{dense} dense + {cfg.num_moe_layers} MoE ({cfg.n_routed_experts} routed + {cfg.n_shared_experts} shared,"
            f" top-{cfg.num_experts_per_tok}, {cfg.scoring_func} {cfg.topk_method})"
        )
    if cfg.num_nextn_predict_layers:
        parts.append(f"MTP depth {cfg.num_nextn_predict_layers}")
    return ", ".join(parts)


def cmd_info(args: argparse.Namespace) -> int:
    from minids.accounting import PUBLISHED
    from minids.config import ModelConfig, preset_names

    if args.list:
        print("\n".join(preset_names()))
        return 0
    if args.seq_len < 1:
        raise ValueError(f"--seq-len {args.seq_len}: must be at least 1")
    names = preset_names() if args.configs == ["all"] or not args.configs else args.configs
    records = []
    for name in names:
        cfg = ModelConfig.load(name)
        rec = info_record(name, args.seq_len)
        records.append(rec)
        if args.json:
            continue
        c = rec["counts"]
        pub = PUBLISHED.get(_preset_key(name))
        print(f"{name}: {_describe(cfg)}")
        line = f"  parameters, total            {c['total']:>18,}  ({_fmt_count(c['total'])})"
        if pub and pub.total:
            line += f"  published {pub.total / 1e9:g}B [{pub.source}]  {_published_check(c['total'], pub.total)}"
        print(line)
        if cfg.is_moe:
            for key, label, incl in (("activated", "activated/token, no embed", False),
                                     ("activated_with_embedding", "activated/token, with embed", True)):
                line = f"  {label:<28} {c[key]:>18,}  ({_fmt_count(c[key])})"
                if pub and pub.activated and pub.activated_includes_embedding == incl:
                    line += f"  published {pub.activated / 1e9:g}B [{pub.source}]  {_published_check(c[key], pub.activated)}"
                print(line)
        if c["mtp"]:
            line = f"  MTP modules (unique)         {c['mtp']:>18,}  ({_fmt_count(c['mtp'])})"
            if pub and pub.mtp:
                line += f"  published {pub.mtp / 1e9:g}B [{pub.source}]  {_published_check(c['mtp'], pub.mtp)}"
            print(line)
        kv, naive = rec["kv_cache_elements_per_token"], rec["kv_cache_elements_per_token_naive"]
        if cfg.is_mla:
            print(f"  KV cache / token             {kv:>18,} elements = {2 * kv:,} B in bf16 (latent "
                  f"{cfg.kv_lora_rank}+{cfg.qk_rope_head_dim} per layer); per-head K/V would be {naive:,} "
                  f"({naive / kv:.1f}x)")
        else:
            print(f"  KV cache / token             {kv:>18,} elements = {2 * kv:,} B in bf16 (K and V, "
                  f"{cfg.num_kv_heads} kv heads x {cfg.mha_head_dim})")
        print(f"  forward FLOPs / token        {rec['forward_flops_per_token']:>18,.4g}  (seq {args.seq_len})")
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        print()
    return 0


def _check_device(device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device name; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: minids runs on cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA GPU available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def _check_memory(name: str, need: int, device: str, what: str) -> None:
    """One line instead of an allocator's traceback (or the kernel's OOM killer) when ``need`` bytes cannot fit."""
    import torch

    if torch.device(device).type == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:  # what the kernel could hand out: available memory (free + reclaimable cache) and free swap
        try:
            info = {k: int(v.split()[0]) * 1024 for k, v in
                    (line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)}
            free = info["MemAvailable"] + info.get("SwapFree", 0)
        except (OSError, KeyError, ValueError):  # not Linux: the physical memory, if the system says
            try:
                free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            except (ValueError, OSError, AttributeError):
                return
    if need > free:
        raise ValueError(f"{name}: {what} need at least {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB "
                         f"free on {device}; try a tiny preset (minids info --list)")


def cmd_smoke(args: argparse.Namespace) -> int:
    import torch

    _check_device(args.device)

    from minids.accounting import count
    from minids.config import ModelConfig
    from minids.model import Transformer

    cfg = ModelConfig.load(args.config)
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: must be at least 1")
    if not cfg.num_nextn_predict_layers + 2 <= args.seq_len <= cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len}: must lie in [{cfg.num_nextn_predict_layers + 2}, "
                         f"{cfg.max_position_embeddings}] for {args.config} (MTP depth + 2 up to its positions)")
    c = count(cfg)  # fp32 weights and their gradients, before any activation
    _check_memory(args.config, 8 * (c.total + c.mtp), args.device, f"{c.total + c.mtp:,} parameters in fp32")
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Transformer(cfg).to(device)
    n = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), device=device)
    t0 = time.perf_counter()
    out = model(ids, labels=ids)
    out.loss.backward()
    dt = time.perf_counter() - t0
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    missing = sum(g is None for g in grads)
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)).item()
    extra = f", MTP loss {out.aux['mtp_loss'].item():.4f}" if "mtp_loss" in out.aux else ""
    print(f"{args.config}: {n:,} parameters; batch {args.batch}x{args.seq_len} on {device}: "
          f"loss {out.aux['lm_loss'].item():.4f} (ln V = {torch.log(torch.tensor(float(cfg.vocab_size))).item():.4f})"
          f"{extra}, grad norm {norm:.4f}, {missing} parameters without gradient, forward+backward {dt:.2f} s")
    if not torch.isfinite(out.loss) or missing:
        print("smoke test FAILED: non-finite loss or parameters without gradient", file=sys.stderr)
        return 1
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from minids.checkpoint import _dtype_from_name, convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, dtype=_dtype_from_name(args.dtype), drop_mtp=args.drop_mtp)
    print(f"wrote {dst}")
    return 0


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from minids.train import TrainConfig, parse_overrides, train

    overrides = parse_overrides(rest)
    config = args.config
    if overrides.get("resume") and config is None:  # continue with the run's own settings
        saved = Path(overrides.get("out_dir", TrainConfig.out_dir)) / "train_config.json"
        if saved.is_file():
            config = saved
            overrides.setdefault("stop_after", None)  # a limit for the first session only
    cfg = TrainConfig.load(config, overrides)
    result = train(cfg)
    return 130 if result.get("interrupted") else 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    _check_device(args.device)

    from minids.checkpoint import from_pretrained
    from minids.data import ByteTokenizer, load_saved_tokenizer
    from minids.decode import check_prompts, check_sampling
    from minids.generate import stream
    from minids.model import Transformer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    check_sampling(args.temperature, args.top_k, args.top_p)  # before a model is loaded
    src = Path(args.model)
    if src.is_dir():  # a checkpoint: its weights, never random ones
        weights = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        _check_memory(args.model, weights, args.device, f"its {weights:,} bytes of weights")
        model = from_pretrained(src, device=args.device)
        tok = load_saved_tokenizer(src) or load_saved_tokenizer(src.parent.parent)  # a run's checkpoint dir
    else:
        from minids.accounting import count

        torch.manual_seed(0)
        c = count(args.model)
        n = c.total + c.mtp
        _check_memory(args.model, 4 * n, args.device, f"{n:,} parameters in fp32")
        model = Transformer(args.model).to(args.device)
        print(f"({args.model}: random weights; pass a checkpoint directory for a trained model)", file=sys.stderr)
        tok = None
    if tok is None:
        if model.cfg.vocab_size < ByteTokenizer.vocab_size:
            raise ValueError(f"{args.model}: no tokenizer found beside the weights (tokenizer.json or tokenizer_minids.json)")
        tok = ByteTokenizer()
    prompts = [tok.encode(p) or [tok.eos_id] for p in args.prompt]
    check_prompts(model, prompts, args.max_new_tokens)  # before the prompt is echoed
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    out = [list(p) for p in prompts]
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_tokens=[tok.eos_id], generator=g)
    shown = [len(tok.decode(p)) for p in prompts]
    if len(prompts) == 1:
        print(args.prompt[0], end="", flush=True)
    for tokens, done in stream(model, prompts, args.max_new_tokens, **kw):
        for b, (t, d) in enumerate(zip(tokens.tolist(), done.tolist())):
            if not d and t != tok.eos_id:
                out[b].append(t)
        if len(prompts) == 1:  # stream the single prompt's text as it grows
            text = tok.decode(out[0])
            print(text[shown[0]:], end="", flush=True)
            shown[0] = len(text)
    if len(prompts) == 1:
        print()
    else:
        for b in range(len(prompts)):
            print(f"[{b}] {tok.decode(out[b])}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from minids.plots import plot_run

    for p in plot_run(args.run):
        print(f"wrote {p}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minids", description="DeepSeek-family models in plain PyTorch.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="parameters, KV cache and FLOPs of configs, beside the published figures")
    i.add_argument("configs", nargs="*", help="preset names, JSON files or HF directories; 'all' (default) for every preset")
    i.add_argument("--seq-len", type=int, default=4096, help="sequence length for the FLOPs count (default 4096)")
    i.add_argument("--json", action="store_true", help="print JSON records instead of the table")
    i.add_argument("--list", action="store_true", help="list the preset names and exit")
    i.set_defaults(func=cmd_info)
    s = sub.add_parser("smoke", help="forward and backward of a random batch through a (tiny) model")
    s.add_argument("config", nargs="?", default="tiny-v3")
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--device", default="cpu")
    s.set_defaults(func=cmd_smoke)
    t = sub.add_parser("train", help="train a model (defaults: tiny-v3 on the Python standard library, CPU)",
                       description="Every TrainConfig field can be given as --name value (see minids/train.py).")
    t.add_argument("--config", default=None, help="a training config JSON; --name value pairs override its fields")
    t.set_defaults(func=cmd_train, takes_rest=True)
    g = sub.add_parser("generate", help="continue prompts with a checkpoint (greedy by default), streaming")
    g.add_argument("model", help="a checkpoint directory (e.g. runs/default/checkpoints/step-0000146) or a preset")
    g.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.set_defaults(func=cmd_generate)
    pl = sub.add_parser("plot", help="write the PNG plots of a training run directory")
    pl.add_argument("run")
    pl.set_defaults(func=cmd_plot)
    c = sub.add_parser("convert", help="convert a Hugging Face checkpoint (FP8 -> BF16/FP32), shard by shard")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bf16", help="bf16 (default), fp32 or fp16")
    c.add_argument("--drop-mtp", action="store_true", help="leave out the MTP layers")
    c.set_defaults(func=cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    from minids.config import ConfigError
    from minids.plots import PlotError

    args, rest = build_parser().parse_known_args(argv)
    # a warning is one line, once (not the source line that raised it, nor again each time a config is read)
    show, shown = warnings.showwarning, set()

    def one_line(message, *_args, **_kwargs) -> None:
        if str(message) not in shown:
            shown.add(str(message))
            print(f"minids {args.command}: warning: {message}", file=sys.stderr)

    warnings.showwarning = one_line
    try:
        if getattr(args, "takes_rest", False):
            return args.func(args, rest)
        if rest:
            raise ValueError(f"unrecognized arguments: {' '.join(rest)}")
        return args.func(args)
    except (ConfigError, ValueError, OSError, PlotError) as e:
        print(f"minids {args.command}: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
