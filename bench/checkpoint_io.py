"""Checkpoint save/load speed against the disk's own speed, and peak memory while loading.

    python bench/checkpoint_io.py [--params 1e9] [--dtype bf16] [--dir /tmp/minids-ckpt] [--out bench/results]

Builds a random DeepSeek-V3-style model of about ``--params`` parameters (made here, not shipped),
saves it sharded with ``minids.save_pretrained``, and loads it back with ``minids.from_pretrained`` in
a fresh process (so peak RSS is that of loading alone). The ceiling is measured in the same run on
the same files: a plain sequential write of the same bytes (with fsync) and a plain read of the
written shards. The page cache is dropped for the files (posix_fadvise DONTNEED after fsync) before
each read, so reads come from the disk where the OS allows it. Writes JSON with device and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import minids
from minids.train import _git_sha

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_atomic

CFG = {  # ~1.0B parameters with the default width; scaled by --params through the layer count
    "model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
    "moe_intermediate_size": 704, "num_hidden_layers": 8, "num_attention_heads": 16, "q_lora_rank": 512,
    "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64,
    "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
    "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "max_position_embeddings": 4096,
}


def drop_cache(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def raw_write(path: Path, nbytes: int, chunk: int = 64 << 20) -> float:
    buf = os.urandom(chunk)
    t = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            fh.write(buf[: min(chunk, left)])
            left -= chunk
        fh.flush()
        os.fsync(fh.fileno())
    return time.perf_counter() - t


def raw_read(path: Path, chunk: int = 64 << 20) -> tuple[float, int]:
    drop_cache(path)
    n = 0
    t = time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while b := fh.read(chunk):
                n += len(b)
    return time.perf_counter() - t, n


def load_child(path: str, dtype: str, strategy: str) -> None:
    t = time.perf_counter()
    model = minids.from_pretrained(path, dtype=getattr(torch, dtype), read_strategy=strategy)
    dt = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"load_s": dt, "peak_rss_bytes": rss, "model_bytes": nbytes}))


def diagnose(ckpt: Path) -> None:
    """Where a load's time goes: reads into fresh memory, into touched memory, and a profile of from_pretrained."""
    import cProfile
    import pstats

    from minids.safetensors_io import SafetensorsFile

    for touched in (False, True):
        drop_cache(ckpt)
        files = [SafetensorsFile(f) for f in sorted(ckpt.glob("*.safetensors"))]
        outs = [(f, k, torch.empty(f.meta(k)[1], dtype=f.meta(k)[0])) for f in files for k in f.keys()]
        if touched:
            for _, _, o in outs:
                o.view(-1).view(torch.uint8).fill_(1) if o.numel() else None
        t = time.perf_counter()
        for f, k, o in outs:
            f.read(k, out=o)
        dt = time.perf_counter() - t
        n = sum(o.numel() * o.element_size() for _, _, o in outs)
        print(f"diagnose: per-tensor reads into {'touched' if touched else 'fresh'} memory: {n / dt / 1e9:.2f} GB/s")
    t = time.perf_counter()
    big = torch.empty(2 << 30, dtype=torch.uint8)
    big.fill_(0)
    print(f"diagnose: first touch of 2 GiB: {2 * 1.074 / (time.perf_counter() - t):.2f} GB/s")
    drop_cache(ckpt)
    pr = cProfile.Profile()
    pr.enable()
    minids.from_pretrained(ckpt, dtype=torch.bfloat16)
    pr.disable()
    pstats.Stats(pr).sort_stats("cumulative").print_stats(12)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=1e9)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--dir", default="/tmp/minids-ckpt-bench")
    ap.add_argument("--shard-gb", type=float, default=0.5)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="staged", help=argparse.SUPPRESS)
    ap.add_argument("--diagnose", action="store_true", help="also time the parts of a load (fresh vs touched memory)")
    args = ap.parse_args()
    if args.child:
        return load_child(args.child, args.dtype, args.strategy)

    cfg = dict(CFG)
    base = minids.count(minids.ModelConfig.from_dict(cfg)).total
    per_layer = (minids.count(minids.ModelConfig.from_dict({**cfg, "num_hidden_layers": 9})).total - base)
    cfg["num_hidden_layers"] = max(2, round(8 + (args.params - base) / per_layer))
    mcfg = minids.ModelConfig.from_dict(cfg)
    dtype = getattr(torch, args.dtype)
    with torch.device("meta"):
        model = minids.Transformer(mcfg)
    model.to(dtype).to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.reset_buffers()
    n_params = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    ckpt = root / "ckpt"

    t = time.perf_counter()
    minids.save_pretrained(model, ckpt, max_shard_bytes=int(args.shard_gb * 1e9))
    save_s = time.perf_counter() - t
    del model
    file_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    raw_w = raw_write(root / "raw.bin", file_bytes)
    (root / "raw.bin").unlink()
    raw_r, _ = raw_read(ckpt)
    loads = {}
    # each load in a fresh process from a dropped page cache; the first one may also pay for the VM
    # growing its memory (on Firecracker machines guest memory is backed on first use), so it is
    # reported apart as "cold" and the staged load is timed again after it
    for strategy in ("cold", "staged", "direct"):
        drop_cache(ckpt)
        out = subprocess.run([sys.executable, __file__, "--child", str(ckpt), "--dtype", args.dtype,
                              "--strategy", "staged" if strategy == "cold" else strategy],
                             capture_output=True, text=True, check=True)
        loads[strategy] = json.loads(out.stdout.strip().splitlines()[-1])
    child = loads["staged"]
    if args.diagnose:
        diagnose(ckpt)
    shutil.rmtree(root, ignore_errors=True)

    gb = file_bytes / 1e9
    rec = {
        "bench": "checkpoint_io",
        "date": time.strftime("%Y-%m-%d"),
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "minids": minids.__version__, "git_sha": _git_sha(),
        "config": cfg, "parameters": n_params, "dtype": args.dtype, "file_bytes": file_bytes,
        "save_s": save_s, "save_GBps": gb / save_s, "raw_write_GBps": gb / raw_w,
        "load_s": child["load_s"], "load_GBps": gb / child["load_s"], "raw_read_GBps": gb / raw_r,
        "peak_rss_bytes": child["peak_rss_bytes"], "peak_rss_over_model": child["peak_rss_bytes"] / nbytes,
        "load_GBps_by_strategy": {k: gb / v["load_s"] for k, v in loads.items()},
    }
    print(f"{n_params / 1e9:.2f}B parameters, {gb:.2f} GB in {len(list(ckpt.parent.glob('*')))} dir")
    print(f"save  {rec['save_GBps']:.2f} GB/s   (plain write+fsync of the same bytes: {rec['raw_write_GBps']:.2f} GB/s)")
    by = rec["load_GBps_by_strategy"]
    print(f"load  {rec['load_GBps']:.2f} GB/s   (plain read of the same files: {rec['raw_read_GBps']:.2f} GB/s; "
          f"direct reads: {by['direct']:.2f} GB/s; first load in a cold process/VM: {by['cold']:.2f} GB/s)")
    print(f"peak RSS while loading: {rec['peak_rss_bytes'] / 1e9:.2f} GB = {rec['peak_rss_over_model']:.2f} x the model")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    dest = Path(args.out) / f"checkpoint_io-{platform.node() or 'host'}.json"
    write_atomic(json.dumps(rec, indent=1) + "\n", dest)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
