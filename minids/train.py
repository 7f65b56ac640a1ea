"""Training: ``minids train`` and ``train(TrainConfig)``.

One loop for the CPU, one GPU and several (``accelerate launch``: DDP, or FSDP through the
accelerate config). What it does per optimizer step:
    lr, MTP lambda and bias gamma from their schedules; grad_accum micro-batches of forward + backward
    (LM loss + lambda * MTP loss + balance losses); clip the gradient norm; AdamW step; the
    aux-loss-free bias update from the token counts of the whole step (all ranks).
The defaults follow the published recipes where they apply (REFERENCE.md 7): AdamW beta2 0.95,
weight decay 0.1, clip 1.0; warmup then cosine (or warmup-stable-decay); MTP lambda 0.3 then 0.1
(V3: switch after 10T of 14.8T tokens); bias gamma 0.001 then 0 for the final 500B of 14.8T tokens;
the config's balance losses (``minids.balance.recipe_balance``: V3's sequence-wise alpha 1e-4 for the bias-balanced
routers, else the V2 / DeepSeekMoE expert-level loss at ``aux_loss_alpha``).

A run directory holds: ``train_config.json`` (resolved), ``model_config.json``, ``run_info.json``
(versions, git SHA, data hash), ``metrics.jsonl``, the tokenizer, ``checkpoints/step-NNNNNNN/``
(the model in the Hugging Face layout + ``trainer_state.json`` / ``trainer_state.safetensors`` with
the optimizer, step and RNG; written to a temporary directory, fsynced, renamed; the last
``keep_checkpoints`` kept), and PNG plots at the end. Data windows are a function of the step, so
``--resume`` continues exactly: on the CPU the resumed loss sequence equals the uninterrupted one.
Ctrl-C saves a checkpoint and exits; a non-finite loss stops the run before the optimizer step,
naming the step and the first module whose output was not finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minids.balance import BiasBalancer, max_vio, recipe_balance
from minids.checkpoint import CheckpointError, from_pretrained, save_pretrained
from minids.config import ModelConfig
from minids.data import TokenData, get_tokenizer, load_documents, split_documents
from minids.fileio import atomic_write_text
from minids.model import Transformer
from minids.safetensors_io import SafetensorsFile, write_safetensors
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict,
)

__all__ = ["TrainConfig", "TrainError", "train"]


class TrainError(ValueError):
    """A training run that cannot start or continue; the message says why and what to do."""


@dataclass
class TrainConfig:
    # model and data
    model: str = "tiny-v3"  # preset, JSON file or HF directory (a checkpoint continues from its weights)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_hidden_layers": 2}
    data: str | None = None  # None = the embedded Python standard library corpus
    tokenizer: str = "byte"  # byte | bpe:VOCAB | path to tokenizer.json
    val_fraction: float = 0.02
    # batch and budget
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch (per device)
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = 600_000  # used when max_steps is None
    # optimizer and schedule
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # DeepSeek specifics
    mtp_weight: float = 0.3
    mtp_weight_final: float = 0.1
    mtp_switch_fraction: float = 0.676  # V3: lambda 0.3 for the first 10T of 14.8T tokens
    bias_gamma: float = 1e-3
    bias_gamma_final: float = 0.0
    bias_freeze_fraction: float = 0.966  # V3: gamma 0 for the final 500B of 14.8T tokens
    bias_rule: str = "sign"
    balance: dict[str, float] | None = None  # None: the model config's recipe (minids.balance.recipe_balance)
    # execution
    precision: str = "auto"  # auto (fp32 on CPU, bf16 autocast on GPU) | fp32 | bf16
    compile: bool = False
    # off | sim (DeepSeek-V3's FP8 recipe simulated) | real (FP8 GEMMs: Triton on CUDA; minids.fp8) |
    # sim-block-dgrad (sim with Dgrad's activation gradient in 128x128 blocks: the report's negative result)
    fp8: str = "off"
    moe_impl: str = "auto"
    seed: int = 0
    # evaluation, logging, checkpoints
    eval_interval: int = 50
    eval_tokens: int = 65_536
    log_interval: int = 1
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    out_dir: str = "runs/default"
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this session
    tensorboard: bool = False
    sample_tokens: int = 160
    sample_prompt: str = "def "
    plots: bool = True

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
        data: dict[str, Any] = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise TrainError(f"{path}: cannot read the training config ({e})") from None
            if not isinstance(data, dict):
                raise TrainError(f"{path}: a training config is a JSON object of fields, not a {type(data).__name__}")
            if "hidden_size" in data or "model_type" in data:
                raise TrainError(f"{path}: this is a model config: pass it with --model (--config takes a training "
                                 "config, see minids/train.py's TrainConfig)")
        file_fields = set(data) - set(overrides or {})
        data.update(overrides or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            where = f"{path}: " if path is not None and set(unknown) <= file_fields else ""
            raise TrainError(f"{where}unknown training config field(s) {unknown}; known: {', '.join(sorted(known))}")
        cfg = cls(**data)
        try:
            cfg.validate()
        except TrainError as e:
            name = str(e).split("=", 1)[0]
            raise TrainError(f"{path}: {e}" if path is not None and name in file_fields else str(e)) from None
        return cfg

    def validate(self) -> None:
        def bad(name: str, rule: str) -> None:
            raise TrainError(f"{name}={getattr(self, name)!r}: {rule}")

        for n in ("seq_len", "batch_size", "grad_accum", "eval_interval", "log_interval", "ckpt_interval"):
            if not isinstance(getattr(self, n), int) or getattr(self, n) < 1:
                bad(n, "must be a positive integer")
        for n in ("lr", "min_lr_ratio", "beta1", "beta2", "weight_decay", "grad_clip", "mtp_weight", "mtp_weight_final",
                  "mtp_switch_fraction", "bias_gamma", "bias_gamma_final", "bias_freeze_fraction", "decay_fraction"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                bad(n, "must be a non-negative number")
        for n in ("warmup_steps", "eval_tokens", "keep_checkpoints", "sample_tokens", "seed"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                bad(n, "must be a non-negative integer")
        for n in ("max_steps", "max_tokens", "stop_after"):
            v = getattr(self, n)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                bad(n, "must be a positive integer or null")
        for n in ("model", "tokenizer", "schedule", "bias_rule", "precision", "fp8", "moe_impl", "out_dir",
                  "sample_prompt"):
            if not isinstance(getattr(self, n), str) or (n != "sample_prompt" and not getattr(self, n)):
                bad(n, "must be a non-empty string")
        if self.data is not None and (not isinstance(self.data, str) or not self.data):
            bad("data", "must be a path, folder, glob or hf:NAME (or null for the embedded corpus)")
        for n in ("compile", "resume", "tensorboard", "plots"):
            if not isinstance(getattr(self, n), bool):
                bad(n, "must be true or false")
        if not isinstance(self.model_overrides, dict):
            bad("model_overrides", "must be a JSON object, e.g. '{\"num_hidden_layers\": 2}'")
        if self.balance is not None and not isinstance(self.balance, dict):
            bad("balance", "must be a JSON object of loss weights, e.g. '{\"sequence\": 1e-4}', or null (the model "
                "config's recipe)")
        if self.max_steps is None and not self.max_tokens:
            bad("max_steps", "set max_steps or max_tokens")
        if self.schedule not in ("cosine", "wsd"):
            bad("schedule", "one of cosine, wsd")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad("precision", "one of auto, fp32, bf16")
        from minids.fp8 import FP8_MODES

        if self.fp8 not in FP8_MODES:
            bad("fp8", f"one of {', '.join(FP8_MODES)}")
        if self.moe_impl not in ("auto", "grouped", "loop", "triton"):
            bad("moe_impl", "one of auto, grouped, loop, triton")
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) \
                or not 0 < self.val_fraction < 1:
            bad("val_fraction", "must lie in (0, 1)")


def parse_overrides(argv: list[str], cls=TrainConfig) -> dict[str, Any]:
    """``--name value`` pairs -> typed values (JSON where it parses: numbers, bools, null, objects)."""
    out: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise TrainError(f"unexpected argument {arg!r}; write --name value")
        name = arg[2:].replace("-", "_")
        if "=" in name:
            name, value = name.split("=", 1)
            i += 1
        else:
            if name not in fields:
                raise TrainError(f"unknown option --{name}; fields: {', '.join(sorted(fields))}")
            typ = str(fields[name].type)
            if typ == "bool" and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out[name] = True
                i += 1
                continue
            if i + 1 == len(argv) or argv[i + 1].startswith("--"):
                raise TrainError(f"--{name} needs a value")
            value = argv[i + 1]
            i += 2
        if name not in fields:
            raise TrainError(f"unknown option --{name}; fields: {', '.join(sorted(fields))}")
        if str(fields[name].type) == "bool":
            words = {"true": True, "yes": True, "on": True, "1": True,
                     "false": False, "no": False, "off": False, "0": False}
            if value.lower() not in words:
                raise TrainError(f"--{name} {value}: say true or false")
            out[name] = words[value.lower()]
            continue
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if str(fields[name].type).startswith("str") and not isinstance(parsed, str) and parsed is not None:
            parsed = value
        out[name] = parsed
    return out


# ------------------------------------------------------------------------------------------------ schedules
def lr_at(cfg: TrainConfig, step: int, total: int) -> float:
    """Linear warmup, then cosine to min_lr_ratio * lr, or stable then linear decay (WSD)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
        return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(t, 1.0)))
    decay_start = int(total * (1 - cfg.decay_fraction))
    if step < decay_start:
        return cfg.lr
    t = (step - decay_start) / max(1, total - decay_start)
    return cfg.lr + (lo - cfg.lr) * min(t, 1.0)


def mtp_weight_at(cfg: TrainConfig, step: int, total: int) -> float:
    return cfg.mtp_weight if step < cfg.mtp_switch_fraction * total else cfg.mtp_weight_final


def gamma_at(cfg: TrainConfig, step: int, total: int) -> float:
    return cfg.bias_gamma if step < cfg.bias_freeze_fraction * total else cfg.bias_gamma_final


# ------------------------------------------------------------------------------------------------ checkpoints
def _json_or_none(line: str) -> dict | None:
    """A metrics.jsonl line as a dict, or None for a blank or cut-off line."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) else None


def _git_sha() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


_CKPT_NAME = re.compile(r"step-\d{7}")


def save_checkpoint(
    run: Path, step: int, acc, fwd_model, model, optimizer, cfg: TrainConfig, extra: dict, tokenizer=None
) -> Path | None:
    """checkpoints/step-NNNNNNN: model (HF layout) + optimizer/step/RNG; atomic (temp dir, fsync, rename).

    Collective: every process calls it. The full model and optimizer states are gathered (FSDP) and
    written by the main process.
    """
    ckdir = run / "checkpoints"
    final = ckdir / f"step-{step:07d}"
    tmp = ckdir / f".step-{step:07d}.tmp"
    state_dict = acc.get_state_dict(fwd_model)  # gathers a full copy under FSDP; plain state_dict otherwise
    if acc.is_main_process:
        ckdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_pretrained(model, tmp, state_dict=state_dict)
        if tokenizer is not None:  # so that `minids generate CHECKPOINT` finds it
            tokenizer.save(tmp)
    # the whole optimizer state keyed by parameter name (gathered from the shards under FSDP), so a
    # run can resume on any number of processes
    opt = get_optimizer_state_dict(model, _inner(optimizer), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if acc.is_main_process:
        tensors = {"rng.torch": torch.get_rng_state()}
        for fqn, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optimizer.{fqn}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        write_safetensors(tensors, tmp / "trainer_state.safetensors")
    acc.wait_for_everyone()
    if acc.is_main_process:
        state = {"step": step, "param_groups": opt["param_groups"], "train_config": dataclasses.asdict(cfg),
                 "world_size": acc.num_processes, **extra}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n")
        _fsync_dir(tmp)
        old = ckdir / f".step-{step:07d}.old"
        if final.exists():  # a second save at the same step (Ctrl-C right after a periodic save)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for stale in _checkpoints(run)[: -max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(stale, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _is_fsdp(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.FSDP


def _checkpoints(run: Path) -> list[Path]:
    """The run's checkpoints, oldest first: checkpoints/step-NNNNNNN only (a user's copy beside them is not one)."""
    ckdir = run / "checkpoints"
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if _CKPT_NAME.fullmatch(p.name) and p.is_dir())


def latest_checkpoint(run: Path) -> Path | None:
    cks = _checkpoints(run)
    return cks[-1] if cks else None


def load_trainer_state(ck: Path, model, optimizer) -> dict:
    """Restore the optimizer (full state, keyed by parameter name; re-sharded under FSDP) and the RNG."""
    try:
        state = json.loads((ck / "trainer_state.json").read_text())
        with SafetensorsFile(ck / "trainer_state.safetensors") as f:
            tensors = {k: f.read(k) for k in f.keys()}
        if not isinstance(state, dict) or "step" not in state or "param_groups" not in state:
            raise ValueError("trainer_state.json: not a trainer state")
    except (OSError, ValueError) as e:  # (a JSONDecodeError is a ValueError)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise TrainError(f"{ck}: cannot resume from this checkpoint ({why}); move it out of {ck.parent} to resume "
                         "from the checkpoint before") from None
    opt_state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            fqn, key = k[len("optimizer."):].rsplit(".", 1)
            opt_state.setdefault(fqn, {})[key] = v
    set_optimizer_state_dict(
        model, _inner(optimizer), {"state": opt_state, "param_groups": state["param_groups"]},
        options=StateDictOptions(full_state_dict=True),
    )
    torch.set_rng_state(tensors["rng.torch"])
    return state


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


# ------------------------------------------------------------------------------------------------ diagnostics
def first_nonfinite_module(model, ids: torch.Tensor, kwargs: dict) -> str | None:
    """Re-run a forward with hooks; the name of the first module (in execution order) with a non-finite output."""
    found: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if not name:
            continue

        def hook(mod, inp, out, name=name):
            t = out[0] if isinstance(out, tuple) else out
            if not found and torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(name)

        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(ids, labels=ids, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------ the loop
def evaluate(model, data: TokenData, cfg: TrainConfig, device, autocast) -> dict[str, float]:
    """Validation loss (nats/token), bits per byte, and MaxVio_global over the validation windows."""
    model.eval()
    loss_sum, n_tok, n_bytes, counts = 0.0, 0, 0, None
    with torch.no_grad():
        for ids in data.val_batches(cfg.batch_size, cfg.seq_len, cfg.eval_tokens):
            ids = ids.to(device)
            with autocast():
                out = model(ids)
            targets = ids[:, 1:]
            ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum")
            loss_sum += ce.item()
            n_tok += targets.numel()
            n_bytes += data.token_bytes[targets.flatten().cpu()].sum().item()
            if "expert_counts" in out.aux:
                c = out.aux["expert_counts"].float()
                counts = c if counts is None else counts + c
    model.train()
    res = {"val_loss": loss_sum / max(n_tok, 1), "val_bpb": loss_sum / (math.log(2) * max(n_bytes, 1))}
    if counts is not None:
        res["maxvio_global"] = max_vio(counts).mean().item()
        res["expert_load"] = counts.tolist()
    return res


@torch.no_grad()
def sample(model, mcfg: ModelConfig, tokenizer, prompt: str, n: int, device) -> str:
    """Greedy continuation of ``prompt`` (full forward per token: the inference path makes this fast)."""
    model.eval()
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    limit = mcfg.max_position_embeddings
    for _ in range(n):
        x = torch.tensor([ids[-limit:]], device=device)
        nxt = int(model(x).logits[0, -1, : tokenizer.vocab_size].argmax())
        if nxt == tokenizer.eos_id:
            break
        ids.append(nxt)
    model.train()
    return tokenizer.decode(ids)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a training run; returns the final metrics."""
    # On the CPU, deterministic algorithms make every step bitwise reproducible (exact resume): without
    # them the backward of an indexing gather (the MoE dispatch x[token]) accumulates with parallel atomic
    # adds, and two identical runs drift apart. Restored on return.
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    if not torch.cuda.is_available():
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg)
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def _train(cfg: TrainConfig) -> dict[str, Any]:
    from accelerate import Accelerator

    torch.manual_seed(cfg.seed)
    run = Path(cfg.out_dir)
    if not cfg.resume and run.is_dir() and any(not p.name.startswith(".write-test") for p in run.iterdir()):
        is_run = (run / "train_config.json").is_file() or (run / "checkpoints").is_dir()
        raise TrainError(f"{run}: the output directory {'holds a run' if is_run else 'is not empty'}: add --resume to "
                         "continue it, or choose another --out_dir (nothing there is overwritten)")
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"{run}: output directory is not writable ({e.strerror})") from None

    on_gpu = torch.cuda.is_available()
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
    from accelerate.utils import DistributedDataParallelKwargs

    # DDP's buffer broadcast would overwrite every rank's token counts with rank 0's; the selection
    # biases stay identical on all ranks anyway (every rank applies the same all-reduced update)
    acc = Accelerator(mixed_precision="bf16" if precision == "bf16" else "no", cpu=not on_gpu,
                      kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    device = acc.device
    main = acc.is_main_process

    # data and tokenizer
    docs, data_desc = load_documents(cfg.data)
    train_docs, val_docs = split_documents(docs, cfg.val_fraction)
    ck = latest_checkpoint(run) if cfg.resume else None
    if cfg.resume and ck is None:
        raise TrainError(f"{run}: --resume given but the run has no checkpoint under {run / 'checkpoints'}")
    if ck is not None and (run / "train_config.json").is_file():
        was = _json_or_none((run / "train_config.json").read_text()) or {}
        if was.get("tokenizer", cfg.tokenizer) != cfg.tokenizer:
            raise TrainError(f"{run}: cannot resume with tokenizer {cfg.tokenizer}: the run was trained with "
                             f"{was['tokenizer']}; leave --tokenizer out (the run's own settings), or choose another "
                             "--out_dir")
    if cfg.moe_impl == "triton" and device.type != "cuda":
        raise TrainError(f"--moe_impl triton needs a CUDA GPU (this run is on {device.type}): use --moe_impl auto or "
                         "grouped")
    tokenizer = get_tokenizer(str(run) if ck is not None and (run / "tokenizer.json").is_file() else cfg.tokenizer,
                              train_docs)
    data = TokenData.build(train_docs, val_docs, tokenizer)
    data.check(cfg.seq_len)

    # model
    from_weights = Path(cfg.model).is_dir() and any(Path(cfg.model).glob("*.safetensors"))
    requested = ModelConfig.load(cfg.model)
    if cfg.model_overrides:
        if unknown := sorted(set(cfg.model_overrides) - ModelConfig.field_names()):
            hint = "; ".join(f"{k}: did you mean {n}?" for k in unknown if (n := ModelConfig.near_field(k)))
            raise TrainError(f"model_overrides: unknown model config field(s) {unknown}"
                             + (f" ({hint})" if hint else ""))
        requested = ModelConfig.from_dict({**requested.to_dict(), **cfg.model_overrides})
    if ck is not None:
        saved = ModelConfig.load(run / "model_config.json")
        if _arch(saved) != _arch(requested):
            diff = sorted(k for k in set(_arch(saved)) | set(_arch(requested)) if _arch(saved).get(k) != _arch(requested).get(k))
            raise TrainError(
                f"{run}: cannot resume: the run was trained with a different model config ({', '.join(diff)} differ); "
                "use another --out_dir or the run's own --model"
            )
        try:
            model = from_pretrained(ck, dtype=torch.float32)
        except CheckpointError as e:
            raise TrainError(f"{e}; move {ck.name} out of {ck.parent} to resume from the checkpoint before") from None
    elif from_weights:
        model = from_pretrained(cfg.model, dtype=torch.float32)
    else:
        model = Transformer(requested)
    mcfg = model.cfg
    if cfg.balance is None:  # recorded resolved, in train_config.json
        cfg = dataclasses.replace(cfg, balance=recipe_balance(mcfg))
    if tokenizer.vocab_size > mcfg.vocab_size:
        raise TrainError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{mcfg.vocab_size}: use a smaller tokenizer or --model_overrides '{{\"vocab_size\": {tokenizer.vocab_size}}}'"
        )
    if cfg.seq_len < mcfg.num_nextn_predict_layers + 2:
        raise TrainError(f"seq_len={cfg.seq_len} is too short for {mcfg.num_nextn_predict_layers} MTP layer(s): "
                         f"use at least {mcfg.num_nextn_predict_layers + 2}")
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise TrainError(
            f"seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={mcfg.max_position_embeddings}"
        )
    model.set_moe_impl(cfg.moe_impl)
    if cfg.fp8 != "off":
        from minids.fp8 import enable_fp8

        enable_fp8(model, cfg.fp8)
    model.to(device)
    balancer = BiasBalancer(model, gamma=cfg.bias_gamma, rule=cfg.bias_rule)

    def make_optimizer(module):
        decay = [p for p in module.parameters() if p.dim() >= 2]  # matrices; not norms or biases
        no_decay = [p for p in module.parameters() if p.dim() < 2]
        # fused on a single CPU process: one kernel per parameter group instead of foreach's many small ops (the
        # optimizer step of the CPU bench model was several times faster); GPU and sharded runs keep torch's
        # default (not measured there)
        fused = acc.num_processes == 1 and device.type == "cpu"
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None,
        )

    if _is_fsdp(acc) and getattr(acc.state.fsdp_plugin, "fsdp_version", 1) == 1:
        fwd_model = acc.prepare(model)  # FSDP1 flattens parameters: build the optimizer on the wrapped ones
        optimizer = acc.prepare(make_optimizer(fwd_model))
    else:  # single process, DDP, FSDP2 (which swaps the optimizer's parameters for the sharded ones itself)
        fwd_model, optimizer = acc.prepare(model, make_optimizer(model))
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * acc.num_processes
    total = cfg.max_steps or max(1, cfg.max_tokens // tokens_per_step)
    start = 0
    if ck is not None:
        state = load_trainer_state(ck, model, optimizer)
        start = state["step"]
    prepared = fwd_model  # what accelerate gathers state dicts from (torch.compile renames the keys)
    if cfg.compile:
        fwd_model = torch.compile(fwd_model)

    if main and ck is None:
        atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n", run / "train_config.json")
        mcfg.save(run / "model_config.json")
        tokenizer.save(run)
        info = {"minids": __import__("minids").__version__, "torch": torch.__version__,
                "python": platform.python_version(), "git_sha": _git_sha(), "device": str(device),
                "gpu": torch.cuda.get_device_name() if on_gpu else None, "processes": acc.num_processes,
                "data": data_desc, "train_tokens": len(data.train), "val_tokens": len(data.val),
                "parameters": sum(p.numel() for p in model.parameters()), "precision": precision}
        atomic_write_text(json.dumps(info, indent=1) + "\n", run / "run_info.json")
    if main and ck is not None and (run / "metrics.jsonl").is_file():
        # steps logged after the checkpoint (a crash) are run again: drop them so each step appears once, and a
        # line the crash cut short with them
        kept = [line for line in (run / "metrics.jsonl").read_text().splitlines()
                if (rec := _json_or_none(line)) is not None and rec.get("step", 0) <= start]
        atomic_write_text("".join(line + "\n" for line in kept), run / "metrics.jsonl")
    log = open(run / "metrics.jsonl", "a") if main else None
    tb = None
    if main and cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(run / "tensorboard"))
        except ImportError:
            print("tensorboard is not installed: pip install tensorboard", file=sys.stderr)

    def emit(rec: dict) -> None:
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, rec["step"])

    if main:
        print(f"minids train: {mcfg.model_type} {sum(p.numel() for p in model.parameters()):,} parameters on {device} "
              f"({precision}); {data_desc}; {total} steps of {tokens_per_step:,} tokens -> {run}")
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=start, disable=not main, dynamic_ncols=True, desc="train")
    interrupted = False

    def on_sigint(signum, frame):
        nonlocal interrupted
        interrupted = True

    old_handler = signal.signal(signal.SIGINT, on_sigint)
    last_eval: dict[str, Any] = {}
    step = start
    stop_at = min(total, start + cfg.stop_after) if cfg.stop_after else total
    t_last, tok_last = time.perf_counter(), 0
    try:
        while step < stop_at and not interrupted:
            lr = lr_at(cfg, step, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            kwargs = {"mtp_weight": mtp_weight_at(cfg, step, total), "balance": cfg.balance}
            loss_acc = torch.zeros((), device=device)
            total_acc = torch.zeros((), device=device)
            batches = []
            for micro in range(cfg.grad_accum):
                ids = data.train_batch(cfg.batch_size, cfg.seq_len, cfg.seed + 7919 * acc.process_index, step, micro)
                ids = ids.to(device)
                batches.append(ids)
                sync = acc.no_sync(fwd_model) if micro < cfg.grad_accum - 1 else _nullcontext()
                try:
                    with sync, acc.autocast():
                        out = fwd_model(ids, labels=ids, **kwargs)
                        loss = out.loss / cfg.grad_accum
                    acc.backward(loss)
                except RuntimeError as e:  # torch.OutOfMemoryError (torch >= 2.5) is a RuntimeError
                    if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e):
                        raise
                    raise TrainError(
                        f"out of memory on {device} with a micro-batch of {cfg.batch_size} x {cfg.seq_len} tokens: "
                        "lower --batch_size (and raise --grad_accum to keep the batch)"
                    ) from None
                loss_acc += out.aux["lm_loss"].detach() / cfg.grad_accum
                total_acc += out.loss.detach() / cfg.grad_accum
            if acc.num_processes > 1:  # all ranks stop together
                total_acc = acc.reduce(total_acc, reduction="sum")
            loss_val = loss_acc.item()
            if not math.isfinite(total_acc.item()):
                # the diagnostic forward needs every rank under FSDP: run it only when alone
                where = first_nonfinite_module(model, batches[0], kwargs) if acc.num_processes == 1 else None
                raise TrainError(
                    f"non-finite loss ({total_acc.item()}) at step {step}; first non-finite output in "
                    f"{where or 'the loss itself'}; the last good checkpoint is {latest_checkpoint(run) or 'none'}"
                )
            gnorm = acc.clip_grad_norm_(fwd_model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            vio = balancer.step(gamma_at(cfg, step, total))
            step += 1
            tok_last += tokens_per_step
            if step % cfg.log_interval == 0 or step == total:
                now = time.perf_counter()
                rec = {"step": step, "tokens": step * tokens_per_step, "loss": loss_val, "lr": lr,
                       "grad_norm": float(gnorm), "tokens_per_s": tok_last / (now - t_last)}
                if "mtp_loss" in out.aux:
                    rec["mtp_loss"] = out.aux["mtp_loss"].item()
                for k, v in out.aux.items():
                    if k.startswith("balance_"):
                        rec[k] = v.item()
                if vio is not None:  # main MoE layers, as MaxVio_global on validation (MTP routers apart)
                    rec["maxvio_batch"] = vio[: mcfg.num_moe_layers].mean().item()
                    if len(vio) > mcfg.num_moe_layers:
                        rec["maxvio_batch_mtp"] = vio[mcfg.num_moe_layers :].mean().item()
                emit(rec)
                t_last, tok_last = now, 0
                post = {"loss": f"{loss_val:.3f}", "tok/s": f"{rec['tokens_per_s']:.0f}", "lr": f"{lr:.2e}"}
                if vio is not None:
                    post["maxvio"] = f"{rec['maxvio_batch']:.2f}"
                if "val_bpb" in last_eval:
                    post["val_bpb"] = f"{last_eval['val_bpb']:.3f}"
                bar.set_postfix(post, refresh=False)
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == total:
                last_eval = evaluate(fwd_model, data, cfg, device, acc.autocast)
                emit({"step": step, "tokens": step * tokens_per_step,
                      **{k: v for k, v in last_eval.items() if k != "expert_load"}})
                if "expert_load" in last_eval and log is not None:
                    atomic_write_text(json.dumps({"step": step, "load": last_eval["expert_load"]}),
                                      run / "expert_load.json")
            if acc.num_processes > 1:  # every rank must agree to stop (Ctrl-C reaches them at different times)
                flag = torch.tensor(float(interrupted), device=device)
                interrupted = bool(acc.reduce(flag, reduction="sum").item())
            if step % cfg.ckpt_interval == 0 or step in (total, stop_at):
                save_checkpoint(run, step, acc, prepared, model, optimizer, cfg, {"tokens": step * tokens_per_step}, tokenizer)
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if interrupted:
        ckp = save_checkpoint(run, step, acc, prepared, model, optimizer, cfg, {"tokens": step * tokens_per_step}, tokenizer)
        if main:
            print(f"interrupted at step {step}: saved {ckp}; continue with --resume")
        if log is not None:
            log.close()
        return {"step": step, "interrupted": True}
    result = {"step": step, **{k: v for k, v in last_eval.items() if k != "expert_load"}}
    if step < total:
        if main:
            print(f"stopped at step {step} of {total} (stop_after): continue with --resume")
        if log is not None:
            log.close()
        return {**result, "stopped": True}
    if cfg.sample_tokens:  # every rank decodes: a sharded (FSDP) model needs all of them in each forward
        text = sample(fwd_model, mcfg, tokenizer, cfg.sample_prompt, cfg.sample_tokens, device)
        result["sample"] = text
        if main:
            atomic_write_text(text, run / "sample.txt")
            print("sample (greedy):\n" + text)
    if main:
        if cfg.plots:
            from minids.plots import PlotError, plot_run

            try:
                for p in plot_run(run):
                    print(f"wrote {p}")
            except PlotError as e:  # no matplotlib: the run itself is complete
                print(f"no plots: {e}")
        print(f"done: step {step}, " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)))
    if log is not None:
        log.close()
    if tb is not None:
        tb.close()
    return result


def _arch(cfg: ModelConfig) -> dict:
    """The parts of a model config that define the architecture (not dtype bookkeeping)."""
    d = cfg.to_dict()
    for k in ("torch_dtype", "dtype", "transformers_version", "_name_or_path"):
        d.pop(k, None)
    return d


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
