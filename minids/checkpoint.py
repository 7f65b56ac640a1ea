"""Hugging Face checkpoints both ways: ``from_pretrained`` and ``save_pretrained``.

Layout (REFERENCE.md 6.1): ``config.json`` and ``model.safetensors``, or shards
``model-0000x-of-0000y.safetensors`` with ``model.safetensors.index.json``. Keys are those of the
published checkpoints; the differences from minids' module names are:
- routed experts: ``mlp.experts.{e}.gate_proj.weight`` on disk is ``mlp.experts.gate_proj[e]`` here
  (transformers 5's fused ``mlp.experts.gate_up_proj`` / ``down_proj`` are read too);
- MTP layer k: ``model.layers.{L + k - 1}.*`` on disk is ``mtp.{k - 1}.*`` here. Its on-disk copies of
  the shared embedding and head (``embed_tokens``, ``shared_head.head``) are written for completeness
  and skipped on load (the main model's are used);
- FP8 weights (official V3/R1 files): a float8 ``weight`` with a float32 ``weight_scale_inv`` is
  dequantized block-wise (128x128, ``minids.fp8.weight_dequant``) to the requested dtype.

Loading is lazy per tensor: the model is built on the meta device, allocated once in the target
dtype and device, and each tensor is read from its file and copied into place, so memory stays near
one copy of the model. Only safetensors are read: no pickle is ever loaded.

Saving is atomic per file (temporary file, fsync, rename), the index and config last; shards of an
earlier save that the new index no longer names are removed afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from minids.config import ConfigError, ModelConfig
from minids.fileio import atomic_write_text
from minids.fp8 import weight_dequant
from minids.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["CheckpointError", "convert_checkpoint", "from_pretrained", "hf_state_dict", "save_pretrained"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
_MTP_SHARED_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_ARCH = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
         "deepseek": "DeepseekForCausalLM", "llama": "LlamaForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file and tensor."""


# --------------------------------------------------------------------------------------------- reading
def _shard_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from the index or the single file."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {}
        for name, fname in weight_map.items():
            f = path / fname
            if not f.is_file():
                n = sum(v == fname for v in weight_map.values())
                raise CheckpointError(f"{index}: shard {fname} (listed for {n} tensors, e.g. {name}) is missing")
            files[name] = f
        return files
    single = path / SINGLE
    if single.is_file():
        with _open(single) as f:
            return {k: single for k in f.keys()}
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX}{hint}")


class _open:
    """SafetensorsFile with a one-line CheckpointError for a truncated or corrupt file."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self) -> SafetensorsFile:
        try:
            self.handle = SafetensorsFile(self.file)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.file}: not a readable safetensors file ({e})") from None
        return self.handle

    def __exit__(self, *exc):
        self.handle.close()
        return False


def _mtp_depths_on_disk(cfg: ModelConfig, names: list[str]) -> int:
    layers = {int(m.group(1)) for n in names if (m := _LAYER.match(n))}
    k = 0
    while cfg.num_hidden_layers + k in layers:
        k += 1
    return k


def _target(cfg: ModelConfig, name: str) -> tuple[str, int | None] | None:
    """On-disk name -> (minids parameter/buffer name, expert index or None); None = skip (documented)."""
    m = _LAYER.match(name)
    if m and int(m.group(1)) >= cfg.num_hidden_layers:
        depth = int(m.group(1)) - cfg.num_hidden_layers
        rest = m.group(2)
        if rest in _MTP_SHARED_COPIES:
            return None
        name = f"mtp.{depth}.{rest}"
    if e := _EXPERT.match(name):
        return f"{e.group(1)}.{e.group(3)}", int(e.group(2))
    return name, None


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    read_strategy: str = "staged",
) -> torch.nn.Module:
    """Load a Hugging Face DeepseekV2/V3 (or Llama / DeepSeekMoE) directory into ``minids.Transformer``.

    dtype: the parameters' dtype (default: the config's ``torch_dtype``/``dtype``, else float32).
    read_strategy: how tensors whose dtype already matches are read into place: "staged" (large
        sequential reads through a 64 MB buffer per file, the default) or "direct" (one positional read
        per tensor straight into the parameter, 8 in flight); bench/checkpoint_io.py compares them.
    """
    if read_strategy not in ("staged", "direct"):
        raise ValueError(f"read_strategy={read_strategy!r}: one of staged, direct")
    from minids.model import Transformer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected config.json + *.safetensors)")
    cfg = ModelConfig.load(path)
    files = _shard_files(path)
    names = sorted(files)
    on_disk = _mtp_depths_on_disk(cfg, names)
    if on_disk < cfg.num_nextn_predict_layers:
        warnings.warn(
            f"{path}: config declares {cfg.num_nextn_predict_layers} MTP layer(s) but the checkpoint holds "
            f"{on_disk} (transformers drops them): loading without the missing ones",
            stacklevel=2,
        )
        cfg.num_nextn_predict_layers = on_disk
    if dtype is None:
        dtype = getattr(torch, str(cfg.extra.get("torch_dtype") or cfg.extra.get("dtype") or "float32"), torch.float32)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype)
    model.to_empty(device=device)
    model.tie_weights()  # to_empty makes new parameters: share embedding and head again
    persistent = set(model.state_dict())  # parameters and persistent buffers (not RoPE tables, load counts)
    params = {n: t for n, t in [*model.named_parameters(), *model.named_buffers()] if n in persistent}
    loaded: dict[str, set] = {}
    unexpected = []
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(files[n], []).append(n)
    direct: list[tuple[SafetensorsFile, str, torch.Tensor]] = []  # read in parallel below
    with contextlib.ExitStack() as stack:
        for file, keys in by_file.items():
            f = stack.enter_context(_open(file))
            wanted = set(keys)
            for key in (k for k in f.keys() if k in wanted):  # file order: sequential reads
                if key.endswith("_scale_inv"):
                    if key[: -len("_scale_inv")] not in files:
                        unexpected.append(key)
                    continue
                tgt = _target(cfg, key)
                if tgt is None or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                    continue  # documented duplicates: MTP's copies, a tied head
                tname, expert = tgt
                fused = _FUSED.match(tname) if tname not in params else None
                if tname not in params and not fused:
                    unexpected.append(key)
                    continue
                if fused:
                    _copy_fused(params, fused, _read(f, key, file, files), key, file, loaded)
                    continue
                job = _load_into(f, params[tname], expert, key, file, files)
                if job is not None:
                    direct.append(job)
                loaded.setdefault(tname, set()).add(expert)
        with torch.no_grad(), ThreadPoolExecutor(max_workers=8 if read_strategy == "direct" else 4) as pool:
            if read_strategy == "direct":  # one positional read per tensor, 8 at a time
                list(pool.map(_direct_read, direct))
            else:  # per file, large sequential reads through a staging buffer; files in parallel
                per_file: dict[SafetensorsFile, list] = {}
                for f, key, dst in direct:
                    per_file.setdefault(f, []).append((key, dst))
                list(pool.map(_staged_read, per_file.items()))
    _check_complete(model, cfg, params, loaded, path, unexpected)
    model.reset_buffers()
    return model


def _read(f: SafetensorsFile, key: str, file: Path, files: dict) -> torch.Tensor:
    """A tensor as stored, FP8 weights dequantized to float32 with their ``weight_scale_inv``."""
    dtype, _ = f.meta(key)
    t = f.read(key)
    if dtype.itemsize == 1 and dtype.is_floating_point:
        skey = key + "_scale_inv"
        if skey not in files:
            raise CheckpointError(f"{file}: FP8 tensor {key} has no {skey}")
        if skey in f:
            scale = f.read(skey)
        else:
            with _open(files[skey]) as g:
                scale = g.read(skey)
        try:
            t = weight_dequant(t, scale, dtype=torch.float32)
        except ValueError as e:
            raise CheckpointError(f"{file}: {skey}: {e}") from None
    return t


def _staged_read(item: tuple[SafetensorsFile, list[tuple[str, torch.Tensor]]]) -> None:
    f, jobs = item
    try:
        f.read_many(jobs)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{f.path}: cannot be read ({e})") from None


def _direct_read(job: tuple[SafetensorsFile, str, torch.Tensor]) -> None:
    f, key, dst = job
    try:
        f.read(key, out=dst)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{f.path}: tensor {key} cannot be read ({e})") from None


def _load_into(
    f: SafetensorsFile, dst: torch.Tensor, expert: int | None, key: str, file: Path, files: dict
) -> tuple[SafetensorsFile, str, torch.Tensor] | None:
    """Check the shape, then either copy now (dtype conversion, FP8) or return a direct-read job."""
    if expert is not None:
        if expert >= dst.shape[0]:
            raise CheckpointError(f"{file}: tensor {key} names expert {expert}, the config has {dst.shape[0]}")
        dst = dst[expert]
    dtype, shape = f.meta(key)
    if tuple(shape) != tuple(dst.shape):
        raise CheckpointError(f"{file}: tensor {key} has shape {tuple(shape)}, expected {tuple(dst.shape)}")
    if dtype == dst.dtype and dst.device.type == "cpu" and not (dtype.itemsize == 1 and dtype.is_floating_point):
        return f, key, dst  # straight from disk into the parameter
    with torch.no_grad():
        dst.copy_(_read(f, key, file, files))
    return None


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str, file: Path) -> None:
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"{file}: tensor {key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def _copy_fused(params, fused: re.Match, src: torch.Tensor, key: str, file: Path, loaded: dict) -> None:
    base, kind = fused.group(1), fused.group(2)
    if kind == "down_proj":
        _copy(params[f"{base}.down_proj"], src, key, file)
        loaded.setdefault(f"{base}.down_proj", set()).add(None)
        return
    gate = params[f"{base}.gate_proj"]
    if src.dim() != 3 or src.shape[1] != 2 * gate.shape[1]:
        raise CheckpointError(f"{file}: tensor {key} has shape {tuple(src.shape)}, expected {(gate.shape[0], 2 * gate.shape[1], gate.shape[2])}")
    g, u = src.chunk(2, dim=1)
    _copy(gate, g, key, file)
    _copy(params[f"{base}.up_proj"], u, key, file)
    loaded.setdefault(f"{base}.gate_proj", set()).add(None)
    loaded.setdefault(f"{base}.up_proj", set()).add(None)


def _check_complete(model, cfg, params, loaded, path, unexpected) -> None:
    missing = []
    for name, t in params.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        got = loaded.get(name)
        if got is None:
            missing.append(name)
        elif None not in got and len(got) != t.shape[0]:
            missing.append(f"{name}[experts {sorted(set(range(t.shape[0])) - got)[:8]}...]")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(
                f"unexpected {len(unexpected)} tensor(s): {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}"
            )
        raise CheckpointError(f"{path}: {'; '.join(parts)} (does config.json match the weights?)")


# --------------------------------------------------------------------------------------------- writing
def hf_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(on-disk name, tensor) pairs in the Hugging Face layout; views, no copies except MTP's shared copies.

    state_dict: a full state dict to write instead of ``model.state_dict()`` (e.g. gathered from FSDP shards).
    """
    cfg: ModelConfig = model.cfg
    L = cfg.num_hidden_layers
    sd = model.state_dict() if state_dict is None else state_dict
    for name, t in sd.items():
        if name.startswith("rotary.") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name.startswith("mtp."):
            depth, rest = name[4:].split(".", 1)
            name = f"model.layers.{L + int(depth)}.{rest}"
        if (m := re.match(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)) is not None:
            for e in range(t.shape[0]):
                yield f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e]
            continue
        yield name, t
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    for depth in range(cfg.num_nextn_predict_layers):
        yield f"model.layers.{L + depth}.embed_tokens.weight", sd["model.embed_tokens.weight"].detach().clone()
        yield f"model.layers.{L + depth}.shared_head.head.weight", head.detach().clone()


def save_pretrained(
    model: torch.nn.Module,
    path: str | Path,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    dtype: torch.dtype | None = None,
    drop_mtp: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` in the Hugging Face layout (shards + index above ``max_shard_bytes``).

    dtype: cast floating tensors on write (the selection bias stays float32). drop_mtp: leave out MTP.
    state_dict: write these tensors (minids names) instead of ``model.state_dict()``, e.g. an FSDP-gathered copy.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot create the output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK):
        raise CheckpointError(f"{path}: output directory is not writable")
    cfg: ModelConfig = model.cfg
    L = cfg.num_hidden_layers
    shards: list[dict[str, torch.Tensor]] = [{}]
    cast: dict[str, torch.dtype] = {}
    size = 0
    total = 0
    for name, t in hf_state_dict(model, state_dict):
        if drop_mtp and (m := _LAYER.match(name)) and int(m.group(1)) >= L:
            continue
        if dtype is not None and t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            cast[name] = dtype  # cast while writing, one tensor at a time
        nbytes = t.numel() * cast.get(name, t.dtype).itemsize
        if size and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach()
        size += nbytes
        total += nbytes
    out_cfg = cfg.to_dict()
    if drop_mtp:
        out_cfg["num_nextn_predict_layers"] = 0
    out_cfg.setdefault("architectures", [_ARCH[cfg.model_type]])
    dt = dtype or next(model.parameters()).dtype
    out_cfg["dtype" if "dtype" in out_cfg else "torch_dtype"] = str(dt).removeprefix("torch.")  # transformers 5 / 4
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # every shard complete under a temporary name first, then all renamed, the index and config last:
    # a crash leaves the previous checkpoint's files, or the new ones, never a half-written shard
    tmps = []
    try:
        for shard, fname in zip(shards, names):
            tmp = path / f".{fname}.tmp-{os.getpid()}"
            write_safetensors(shard, tmp, cast=cast)
            tmps.append((tmp, path / fname))
        for tmp, dst in tmps:
            os.replace(tmp, dst)
    finally:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
    if len(shards) > 1:
        weight_map = {k: fname for shard, fname in zip(shards, names) for k in shard}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(json.dumps(index, indent=2) + "\n", path / INDEX)
    else:
        (path / INDEX).unlink(missing_ok=True)
    atomic_write_text(json.dumps(out_cfg, indent=2) + "\n", path / "config.json")
    ours = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")  # only shards this layout names
    for stale in path.glob("model*.safetensors"):
        if ours.match(stale.name) and stale.name not in names:
            stale.unlink()
    return path


def convert_checkpoint(
    src: str | Path, dst: str | Path, *, dtype: torch.dtype = torch.bfloat16, drop_mtp: bool = False,
    progress: bool = True,
) -> Path:
    """Stream a checkpoint to ``dtype``, one shard at a time: FP8 weights are dequantized block-wise and
    their ``weight_scale_inv`` dropped (what the official ``fp8_cast_bf16.py`` does), the
    ``quantization_config`` removed, optionally the MTP layers too. Other files (tokenizer, ...) are copied.
    Memory: one shard at a time, never the whole model.
    """
    import shutil

    from tqdm.auto import tqdm

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the destination must differ from the source")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        what = "is a file" if not dst.is_dir() else "exists and is not empty"
        raise CheckpointError(f"{dst}: the destination {what}: convert into a new directory (nothing there is "
                              "overwritten)")
    cfg = ModelConfig.load(src)
    files = _shard_files(src)
    for file in sorted(set(files.values())):  # every shard readable before anything is written
        with _open(file):
            pass
    L = cfg.num_hidden_layers
    by_file: dict[Path, list[str]] = {}
    for n in sorted(files):
        by_file.setdefault(files[n], []).append(n)
    weight_map: dict[str, str] = {}
    total = 0
    # everything into a temporary directory beside dst, renamed to dst at the end: a failure half-way leaves nothing
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier try's
        tmp.mkdir()
    except OSError as e:
        raise CheckpointError(f"{dst}: cannot create the destination ({e.strerror})") from None
    try:
        bar = tqdm(total=len(files), desc=f"convert {src.name}", unit="tensor", disable=not progress)
        for file, keys in sorted(by_file.items()):
            out: dict[str, torch.Tensor] = {}
            with _open(file) as f:
                for key in keys:
                    bar.update(1)
                    if key.endswith("_scale_inv"):
                        continue
                    if drop_mtp and (m := _LAYER.match(key)) and int(m.group(1)) >= L:
                        continue
                    t = _read(f, key, file, files)
                    if t.is_floating_point() and not key.endswith("e_score_correction_bias"):
                        t = t.to(dtype)
                    out[key] = t.contiguous()
                    total += t.numel() * t.element_size()
            if out:
                write_safetensors(out, tmp / file.name)
                weight_map.update({k: file.name for k in out})
        bar.close()
        if (src / INDEX).is_file():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_text(json.dumps(index, indent=2) + "\n", tmp / INDEX)
        out_cfg = json.loads((src / "config.json").read_text())
        out_cfg.pop("quantization_config", None)
        out_cfg["dtype" if "dtype" in out_cfg else "torch_dtype"] = str(dtype).removeprefix("torch.")
        if drop_mtp:
            out_cfg["num_nextn_predict_layers"] = 0
        atomic_write_text(json.dumps(out_cfg, indent=2) + "\n", tmp / "config.json")
        for other in src.iterdir():
            if other.is_file() and not other.name.endswith(".safetensors") and other.name not in ("config.json", INDEX):
                shutil.copy2(other, tmp / other.name)
        for f in tmp.iterdir():
            with open(f, "r+b") as fh:
                os.fsync(fh.fileno())
        if dst.is_dir():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _dtype_from_name(name: str) -> torch.dtype:
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"dtype={name!r}: one of {', '.join(table)}")
    return table[name]
