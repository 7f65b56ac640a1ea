"""Training (minids/train.py, minids/cli.py train/plot, minids/plots.py): exact resume, Ctrl-C, the NaN
diagnosis, every bad input, the CLI and its run directory, parse_overrides, the schedules by hand, and a
run that learns.

Every run is tiny (tiny-v3 cut to 2 layers, or tiny-dense; seq_len 32, batch 4, <= 24 steps) on a ~20 KB
Python-like corpus written to a temporary directory, so the whole file runs in well under a minute on
two CPU cores.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import minids
from minids.checkpoint import from_pretrained
from minids.cli import main
from minids.data import DataError
from minids.safetensors_io import SafetensorsFile
from minids.train import (
    TrainConfig, TrainError, first_nonfinite_module, gamma_at, lr_at, mtp_weight_at, parse_overrides, train,
)

TWO_LAYERS = {"num_hidden_layers": 2}

WORDS = ("alpha beta gamma delta value count total item node result index buffer stream token layer "
         "weight bias expert router batch window offset length parse render update merge split shard "
         "cache query key hidden state config model train eval sample loss grad step scale norm").split()


def write_corpus(root: Path, n_files: int = 8, n_funcs: int = 8, seed: int = 0) -> Path:
    """~20 KB of varied Python-like text in n_files files (varied enough for a 600-token BPE)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        lines = [f'"""{rng.choice(WORDS).title()} {rng.choice(WORDS)} helpers: {" ".join(rng.sample(WORDS, 5))}."""',
                 f"import {rng.choice(['math', 'json', 'os', 're', 'itertools'])}", ""]
        for _ in range(n_funcs):
            a, b, c = rng.sample(WORDS, 3)
            lines += [
                f"def {a}_{b}({c}, {b}_size={rng.randint(1, 999)}):",
                f'    """Return the {a} {b} of {c} (see {rng.choice(WORDS)}_{rng.choice(WORDS)})."""',
                f"    {a} = [{c} * i + {rng.randint(0, 9999)} for i in range({b}_size)]",
                f"    if len({a}) > {rng.randint(2, 64)} and {c} != {rng.random():.3f}:",
                f"        return sum({a}) / {rng.choice(['2.5', '3', 'len(' + a + ')'])}  # {rng.choice(WORDS)}",
                f"    return {{'{b}': {a}, '{rng.choice(WORDS)}': {rng.randint(0, 100)}}}",
                "",
            ]
        (root / f"mod_{f}.py").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "src")


def tiny_cfg(corpus: Path, out_dir: Path, **over) -> TrainConfig:
    base = dict(model="tiny-v3", model_overrides=dict(TWO_LAYERS), data=str(corpus), seq_len=32, batch_size=4,
                max_steps=8, warmup_steps=2, lr=3e-3, eval_interval=4, eval_tokens=512, sample_tokens=0,
                plots=False, out_dir=str(out_dir))
    base.update(over)
    cfg = TrainConfig(**base)
    cfg.validate()
    return cfg


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def step_losses(run: Path) -> dict[int, float]:
    rows = [r for r in metrics(run) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def evals(run: Path) -> list[dict]:
    return [r for r in metrics(run) if "val_loss" in r]


def checkpoints(run: Path) -> list[str]:
    d = run / "checkpoints"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with SafetensorsFile(path) as f:
        return {k: f.read(k) for k in f.keys()}


def assert_complete_checkpoint(ck: Path) -> None:
    for name in ("config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"):
        assert (ck / name).is_file(), f"{ck} lacks {name}"


@pytest.fixture(scope="module")
def run_a(corpus, tmp_path_factory) -> Path:
    """The uninterrupted reference run: 8 steps, evaluations at steps 4 and 8."""
    run = tmp_path_factory.mktemp("run_a") / "run"
    result = train(tiny_cfg(corpus, run))
    assert result["step"] == 8 and "interrupted" not in result and "stopped" not in result
    return run


# ------------------------------------------------------------------------------------------------ resume
def test_exact_resume(corpus, run_a, tmp_path):
    run_b = tmp_path / "run_b"
    first = train(tiny_cfg(corpus, run_b, stop_after=4))
    assert first["step"] == 4 and first.get("stopped")
    assert checkpoints(run_b) == ["step-0000004"]
    assert_complete_checkpoint(run_b / "checkpoints" / "step-0000004")
    assert json.loads((run_b / "checkpoints/step-0000004/trainer_state.json").read_text())["step"] == 4
    assert sorted(step_losses(run_b)) == [1, 2, 3, 4]
    assert not (run_b / "sample.txt").exists()

    with open(run_b / "metrics.jsonl", "a") as f:  # a crash cut the last line short: the resume drops it
        f.write('{"step": 5, "lo')
    second = train(tiny_cfg(corpus, run_b, stop_after=4, resume=True))
    assert second["step"] == 8 and not second.get("stopped")
    assert not torch.are_deterministic_algorithms_enabled()  # train() restores the global setting

    la, lb = step_losses(run_a), step_losses(run_b)
    assert sorted(la) == sorted(lb) == list(range(1, 9))
    for s in range(1, 9):
        assert lb[s] == la[s], f"step {s}: resumed loss {lb[s]!r} != uninterrupted {la[s]!r}"
    ea, eb = evals(run_a), evals(run_b)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [4, 8]
    assert [e["val_loss"] for e in ea] == [e["val_loss"] for e in eb]

    # the final weights (selection biases included: persistent buffers of the routers) are identical
    ck_a, ck_b = run_a / "checkpoints" / "step-0000008", run_b / "checkpoints" / "step-0000008"
    sa = from_pretrained(ck_a, dtype=torch.float32).state_dict()
    sb = from_pretrained(ck_b, dtype=torch.float32).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    biases = [k for k in sa if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2  # layer 1's router and the MTP layer's
    for k in biases:
        assert sa[k].abs().sum() > 0, f"{k}: the bias update never ran"
    # and so is the optimizer state (moments, step counts) and the RNG state
    ta, tb = read_tensors(ck_a / "trainer_state.safetensors"), read_tensors(ck_b / "trainer_state.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    # resume keeps the newest keep_checkpoints (2) checkpoints and leaves no temporary directory
    assert checkpoints(run_b) == ["step-0000004", "step-0000008"]


def test_training_learns(run_a):
    e = evals(run_a)
    assert len(e) == 2
    assert e[-1]["val_loss"] < e[0]["val_loss"]
    assert e[0]["val_loss"] < math.log(512)  # below the uniform guess after four steps
    losses = step_losses(run_a)
    assert losses[8] < losses[1]
    for r in e:
        assert math.isfinite(r["val_bpb"]) and r["val_bpb"] > 0
        assert 0 <= r["maxvio_global"]
    rows = [r for r in metrics(run_a) if "loss" in r]
    assert all({"mtp_loss", "balance_sequence", "maxvio_batch", "lr", "grad_norm", "tokens"} <= set(r) for r in rows)
    assert rows[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup step 0 of 2


def test_dense_run_with_bpe_tokenizer_resumes(corpus, tmp_path):
    """tiny-dense (no MoE, no MTP) with a trained BPE: the tokenizer is saved and reused on resume."""
    run = tmp_path / "dense"
    kw = dict(model="tiny-dense", tokenizer="bpe:300", max_steps=4, eval_interval=2, stop_after=2)
    assert train(tiny_cfg(corpus, run, **kw))["stopped"]
    assert (run / "tokenizer.json").is_file()
    saved = (run / "tokenizer.json").read_bytes()
    result = train(tiny_cfg(corpus, run, resume=True, **kw))
    assert result["step"] == 4 and math.isfinite(result["val_bpb"])
    assert (run / "tokenizer.json").read_bytes() == saved
    assert sorted(step_losses(run)) == [1, 2, 3, 4]
    for r in metrics(run):
        assert not {"mtp_loss", "maxvio_batch", "maxvio_global", "balance_sequence"} & set(r)
    assert not (run / "expert_load.json").exists()
    assert json.loads((run / "model_config.json").read_text())["model_type"] == "llama"


def test_balance_losses_default_to_the_model_configs_recipe(corpus, tmp_path):
    """Without --balance, a V2-style model trains with its config's expert-level loss (aux_loss_alpha 0.001, per
    sequence), not V3's sequence-wise one; the resolved choice is what train_config.json records."""
    run = tmp_path / "v2"
    train(tiny_cfg(corpus, run, model="tiny-v2", max_steps=2, eval_interval=2))
    assert json.loads((run / "train_config.json").read_text())["balance"] == {"expert": 0.001}
    rows = [r for r in metrics(run) if "loss" in r]
    assert rows and all("balance_expert" in r and "balance_sequence" not in r for r in rows)


# ------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(corpus, tmp_path):
    run = tmp_path / "run"
    args = ["--model_overrides", json.dumps(TWO_LAYERS), "--data", str(corpus), "--seq_len", "32",
            "--batch_size", "4", "--max_steps", "60", "--eval_interval", "1000", "--eval_tokens", "512",
            "--sample_tokens", "0", "--plots", "false", "--out_dir", str(run)]
    with open(tmp_path / "stdout", "w") as out, open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "minids.cli", "train", *args], stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                if (run / "metrics.jsonl").is_file() and sum(
                        '"loss"' in line for line in (run / "metrics.jsonl").read_text().splitlines()) >= 2:
                    break
                time.sleep(0.02)
            assert proc.poll() is None, "the run ended before it could be interrupted: " + (
                tmp_path / "stderr").read_text()[-2000:]
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stdout = (tmp_path / "stdout").read_text()
    assert rc == 130, f"exit code {rc}; stderr: {(tmp_path / 'stderr').read_text()[-2000:]}"
    assert "interrupted at step" in stdout and "--resume" in stdout
    cks = checkpoints(run)
    assert cks and all(c.startswith("step-") for c in cks), cks  # no .step-*.tmp left behind
    assert not list((run / "checkpoints").glob(".step-*.tmp"))
    ck = run / "checkpoints" / cks[-1]
    assert_complete_checkpoint(ck)
    stopped = json.loads((ck / "trainer_state.json").read_text())["step"]
    assert 2 <= stopped < 60
    assert max(step_losses(run)) == stopped

    assert main(["train", *args, "--resume"]) == 0
    assert sorted(step_losses(run)) == list(range(1, 61))
    assert checkpoints(run)[-1] == "step-0000060"
    assert not list((run / "checkpoints").glob(".step-*.tmp"))


# ------------------------------------------------------------------------------------------------ NaN
def test_nonfinite_loss_names_step_and_module(corpus, tmp_path):
    torch.manual_seed(0)
    model = minids.Transformer(minids.ModelConfig.from_dict({**minids.ModelConfig.load("tiny-v3").to_dict(),
                                                             **TWO_LAYERS}))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    src = minids.save_pretrained(model, tmp_path / "bad_model")

    # the diagnosis itself: the first module in execution order whose output is not finite
    ids = torch.randint(0, 256, (2, 16))
    where = first_nonfinite_module(model, ids, {"mtp_weight": 0.3, "balance": {"sequence": 1e-4}})
    assert where == "model.layers.1.self_attn.o_proj"

    run = tmp_path / "run"
    with pytest.raises(TrainError) as e:
        train(tiny_cfg(corpus, run, model=str(src), model_overrides={}))
    msg = str(e.value)
    assert "non-finite loss" in msg and "step 0" in msg and "model.layers.1.self_attn.o_proj" in msg, msg
    assert "\n" not in msg
    assert not torch.are_deterministic_algorithms_enabled()  # restored on the way out of an error too
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert not list(run.rglob("*.tmp"))
    assert step_losses(run) == {}


# ------------------------------------------------------------------------------------------------ bad input
def bad_run(cfg: TrainConfig, *needles: str) -> str:
    with pytest.raises(ValueError) as e:
        train(cfg)
    assert isinstance(e.value, (TrainError, DataError)), type(e.value)
    msg = str(e.value)
    assert msg and "\n" not in msg, repr(msg)
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS (an address-space limit)")
def test_batch_too_large_for_memory(tmp_path):
    """A micro-batch that does not fit: the trainer runs in a process limited to 3 GiB of address space, so the
    forward's allocations fail as they would when RAM runs out (about 2.4 GB is touched first, 5 s). The error
    names the size tried and what to do, in one line, and no checkpoint is left behind."""
    data = write_corpus(tmp_path / "src", n_files=16)  # ~60 KB: enough for 1024-token windows
    run = tmp_path / "run"
    argv = ["train", "--model", "tiny-v3", "--data", str(data), "--batch_size", "128", "--seq_len", "1024",
            "--max_steps", "1", "--plots", "false", "--sample_tokens", "0", "--out_dir", str(run)]
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            f"from minids.cli import main; sys.exit(main({argv!r}))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [line for line in p.stderr.splitlines() if "out of memory" in line]
    assert errors == ["minids train: out of memory on cpu with a micro-batch of 128 x 1024 tokens: lower "
                      "--batch_size (and raise --grad_accum to keep the batch)"], p.stderr[-2000:]
    assert not (run / "checkpoints").exists() or not list((run / "checkpoints").iterdir())
    assert not list(run.rglob("*.tmp"))


def test_missing_data_path(corpus, tmp_path):
    bad_run(tiny_cfg(corpus, tmp_path / "run", data=str(tmp_path / "no_such_dir")), "no_such_dir", "no such file")


def test_empty_data_file(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    bad_run(tiny_cfg(corpus, tmp_path / "run", data=str(tmp_path / "empty.txt")), "empty.txt", "no non-empty")


def test_data_too_short_for_seq_len(tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n" * 20)
    (tmp_path / "b.txt").write_text("y = 2\n")
    bad_run(tiny_cfg(tmp_path, tmp_path / "run", data=str(tmp_path / "*.txt")), "fewer than one sequence", "--seq_len")


def test_seq_len_above_max_position_embeddings(corpus, tmp_path):
    cfg = tiny_cfg(corpus, tmp_path / "run", model_overrides={**TWO_LAYERS, "max_position_embeddings": 16})
    bad_run(cfg, "seq_len=32", "max_position_embeddings=16")


def test_unwritable_out_dir(corpus, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    bad_run(tiny_cfg(corpus, tmp_path / "file" / "run"), "not writable")


def test_resume_without_checkpoint(corpus, tmp_path):
    (tmp_path / "run").mkdir()
    bad_run(tiny_cfg(corpus, tmp_path / "run", resume=True), "--resume", "no checkpoint")


def test_resume_with_another_model_config(corpus, run_a):
    before = sorted(p.relative_to(run_a) for p in run_a.rglob("*"))
    cfg = tiny_cfg(corpus, run_a, resume=True, model_overrides={"num_hidden_layers": 3})
    bad_run(cfg, "different model config", "num_hidden_layers")
    assert sorted(p.relative_to(run_a) for p in run_a.rglob("*")) == before


def _snapshot(run: Path) -> dict:
    return {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_existing_run_is_not_overwritten(corpus, run_a, tmp_path):
    before = _snapshot(run_a)
    bad_run(tiny_cfg(corpus, run_a), "holds a run", "--resume", "another --out_dir")
    assert _snapshot(run_a) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.jsonl").write_text("a user's own file\n")
    bad_run(tiny_cfg(corpus, tmp_path / "mine"), "is not empty")
    assert (tmp_path / "mine" / "metrics.jsonl").read_text() == "a user's own file\n"


def test_a_copied_checkpoint_is_neither_resumed_nor_pruned(corpus, run_a, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    best = run / "checkpoints" / "step-0000008-best"  # a user's copy, which sorts after step-0000008
    shutil.copytree(run / "checkpoints" / "step-0000008", best)
    bad_run(tiny_cfg(corpus, run, resume=True, tokenizer="bpe:300"), "trained with byte", "leave --tokenizer out")
    result = train(tiny_cfg(corpus, run, resume=True, max_steps=10, ckpt_interval=1, keep_checkpoints=2))
    assert result["step"] == 10
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 11))  # resumed from step 8
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008-best", "step-0000009",
                                                                       "step-0000010"]


def test_model_override_typo_is_named(corpus, tmp_path):
    bad_run(tiny_cfg(corpus, tmp_path / "run", model_overrides={"num_hidden_layer": 2}),
            "unknown model config field(s) ['num_hidden_layer']", "did you mean num_hidden_layers?")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton MoE is refused only off CUDA")
def test_triton_moe_on_the_cpu_is_refused_up_front(corpus, tmp_path):
    bad_run(tiny_cfg(corpus, tmp_path / "run", moe_impl="triton"), "--moe_impl triton needs a CUDA GPU",
            "--moe_impl auto")


def test_unknown_train_config_field():
    with pytest.raises(TrainError, match=r"unknown training config field\(s\) \['bogus'\]"):
        TrainConfig.load(None, {"bogus": 1})
    with pytest.raises(TrainError, match="seq_len=0"):
        TrainConfig.load(None, {"seq_len": 0})
    with pytest.raises(TrainError, match="schedule"):
        TrainConfig.load(None, {"schedule": "linear"})


def test_train_config_file(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"seq_len": 64, "lr": 1e-3}))
    cfg = TrainConfig.load(tmp_path / "c.json", {"lr": 5e-4})
    assert (cfg.seq_len, cfg.lr) == (64, 5e-4)
    with pytest.raises(TrainError, match="cannot read"):
        TrainConfig.load(tmp_path / "missing.json")


def test_train_config_file_errors_name_the_file(tmp_path):
    cases = {"list.json": ([1], "a training config is a JSON object of fields, not a list"),
             "model.json": ({"hidden_size": 64, "model_type": "deepseek_v3"},
                            "this is a model config: pass it with --model"),
             "typo.json": ({"seq_lenn": 64}, "unknown training config field(s) ['seq_lenn']"),
             "type.json": ({"batch_size": "2"}, "batch_size='2': must be a positive integer"),
             "null.json": ({"out_dir": None}, "out_dir=None: must be a non-empty string"),
             "bool.json": ({"resume": "no"}, "resume='no': must be true or false")}
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        with pytest.raises(TrainError) as e:
            TrainConfig.load(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: ") and needle in str(e.value), str(e.value)
    with pytest.raises(TrainError) as e:  # the bad value came from the command line: no file to blame
        TrainConfig.load(tmp_path / "typo.json", {"seq_lenn": 32, "lr": -1})
    assert str(e.value).startswith("unknown")
    (tmp_path / "ok.json").write_text("{}")
    with pytest.raises(TrainError, match="^lr=-1: must be a non-negative number"):
        TrainConfig.load(tmp_path / "ok.json", {"lr": -1})
    for field in ("model", "tokenizer", "data"):
        with pytest.raises(TrainError, match=f"^{field}="):
            TrainConfig.load(None, {field: 3})


def test_tokenizer_larger_than_vocab(corpus, tmp_path):
    msg = bad_run(tiny_cfg(corpus, tmp_path / "run", tokenizer="bpe:600"), "600 tokens", "vocab_size is 512")
    assert "model_overrides" in msg and '"vocab_size": 600' in msg


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_train_and_plot(corpus, tmp_path, capsys):
    run = tmp_path / "cli_run"
    rc = main(["train", "--max_steps", "2", "--model_overrides", json.dumps(TWO_LAYERS), "--data", str(corpus),
               "--seq_len", "32", "--batch_size", "4", "--eval_tokens", "512", "--sample_tokens", "8",
               "--plots", "--out_dir", str(run)])
    assert rc == 0
    info = json.loads((run / "run_info.json").read_text())
    assert "git_sha" in info and "sha256" in info["data"] and str(corpus) in info["data"]
    assert info["train_tokens"] > 0 and info["val_tokens"] > 0 and info["parameters"] > 0
    tc = json.loads((run / "train_config.json").read_text())
    assert tc["max_steps"] == 2 and tc["model_overrides"] == TWO_LAYERS and tc["data"] == str(corpus)
    mc = json.loads((run / "model_config.json").read_text())
    assert mc["num_hidden_layers"] == 2 and mc["model_type"] == "deepseek_v3"
    rows = metrics(run)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert [r["step"] for r in rows if "val_bpb" in r] == [2]
    assert (run / "tokenizer_minids.json").is_file()
    sample = (run / "sample.txt").read_text()
    assert sample.startswith("def ")
    assert (run / "checkpoints" / "step-0000002").is_dir()
    for png in ("loss.png", "lr.png", "maxvio.png", "expert_load.png"):  # written at the end of the run
        assert (run / png).is_file(), png
        (run / png).unlink()

    assert main(["plot", str(run)]) == 0
    for png in ("loss.png", "lr.png", "maxvio.png", "expert_load.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("argv, needle", [
    (["train", "--bogus", "1"], "unknown option --bogus"),
    (["train", "--max_steps"], "--max_steps needs a value"),
    (["train", "max_steps", "2"], "unexpected argument"),
    (["train", "--seq_len", "0"], "seq_len=0"),
    (["plot", "/nonexistent/run"], "no metrics"),
])
def test_cli_errors(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"minids {argv[0]}: "), repr(err)
    assert needle in err, err


def test_cli_train_data_error(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing"), "--out_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "no such file" in err, repr(err)


# ------------------------------------------------------------------------------------------------ parse_overrides
def test_parse_overrides_types():
    got = parse_overrides([
        "--max_steps", "8", "--lr", "3e-3", "--plots", "--model_overrides", '{"num_hidden_layers": 2}',
        "--balance", '{"sequence": 0.001, "expert": 0.003}', "--tokenizer", "byte", "--data", "some/dir/*.py",
        "--compile", "--seq-len", "64", "--min_lr_ratio=0.05", "--sample_prompt", "1", "--stop_after", "null",
        "--resume",
    ])
    assert got == {
        "max_steps": 8, "lr": 3e-3, "plots": True, "model_overrides": {"num_hidden_layers": 2},
        "balance": {"sequence": 0.001, "expert": 0.003}, "tokenizer": "byte", "data": "some/dir/*.py",
        "compile": True, "seq_len": 64, "min_lr_ratio": 0.05, "sample_prompt": "1", "stop_after": None,
        "resume": True,
    }
    assert type(got["max_steps"]) is int and type(got["lr"]) is float
    assert parse_overrides(["--plots", "false", "--tensorboard", "true"]) == {"plots": False, "tensorboard": True}
    assert parse_overrides(["--model", "tiny-dense", "--tokenizer", "bpe:300"]) == {
        "model": "tiny-dense", "tokenizer": "bpe:300"}
    cfg = TrainConfig.load(None, parse_overrides(["--max_steps", "8", "--plots", "false"]))
    assert cfg.max_steps == 8 and cfg.plots is False
    assert parse_overrides(["--resume", "no", "--plots", "off", "--compile", "0", "--tensorboard", "Yes"]) == {
        "resume": False, "plots": False, "compile": False, "tensorboard": True}
    assert parse_overrides(["--plots=on"]) == {"plots": True}
    for argv, needle in ((["--nope", "1"], "unknown option --nope"), (["--nope=1"], "unknown option --nope"),
                         (["--lr"], "needs a value"), (["lr", "1"], "unexpected argument"),
                         (["--seq_len", "--out_dir", "x"], "--seq_len needs a value"),
                         (["--plots", "maybe"], "--plots maybe: say true or false")):
        with pytest.raises(TrainError, match=needle):
            parse_overrides(argv)


# ------------------------------------------------------------------------------------------------ schedules
def test_lr_cosine_by_hand():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    total = 110
    assert lr_at(cfg, 0, total) == pytest.approx(1e-4)  # lr / warmup
    assert lr_at(cfg, 4, total) == pytest.approx(5e-4)
    assert lr_at(cfg, 9, total) == pytest.approx(1e-3)  # end of warmup: the peak
    assert lr_at(cfg, 10, total) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(cfg, 60, total) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # midpoint: halfway
    assert lr_at(cfg, 35, total) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(cfg, 110, total) == pytest.approx(1e-4)  # endpoint: min_lr_ratio * lr
    assert lr_at(cfg, 500, total) == pytest.approx(1e-4)  # and it stays there
    vals = [lr_at(cfg, s, total) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_lr_wsd_by_hand():
    cfg = TrainConfig(lr=2e-3, warmup_steps=5, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    total = 100  # decay over steps 80..100
    assert lr_at(cfg, 0, total) == pytest.approx(2e-3 / 5)
    assert lr_at(cfg, 4, total) == pytest.approx(2e-3)
    for s in (5, 40, 79):
        assert lr_at(cfg, s, total) == 2e-3  # stable
    assert lr_at(cfg, 80, total) == pytest.approx(2e-3)
    assert lr_at(cfg, 90, total) == pytest.approx(0.5 * (2e-3 + 2e-4))  # linear halfway
    assert lr_at(cfg, 95, total) == pytest.approx(2e-3 - 0.75 * 1.8e-3)
    assert lr_at(cfg, 100, total) == pytest.approx(2e-4)


def test_mtp_weight_and_gamma_by_hand():
    cfg = TrainConfig(mtp_weight=0.3, mtp_weight_final=0.1, mtp_switch_fraction=0.5,
                      bias_gamma=1e-3, bias_gamma_final=0.0, bias_freeze_fraction=0.9)
    total = 100
    assert [mtp_weight_at(cfg, s, total) for s in (0, 49, 50, 99)] == [0.3, 0.3, 0.1, 0.1]
    assert [gamma_at(cfg, s, total) for s in (0, 89, 90, 99)] == [1e-3, 1e-3, 0.0, 0.0]
    v3 = TrainConfig()  # V3: 10T of 14.8T tokens at 0.3, gamma frozen for the last 500B
    assert v3.mtp_switch_fraction == pytest.approx(10 / 14.8, abs=1e-3)
    assert v3.bias_freeze_fraction == pytest.approx(1 - 0.5 / 14.8, abs=1e-3)
    assert mtp_weight_at(v3, 675, 1000) == 0.3 and mtp_weight_at(v3, 677, 1000) == 0.1
    assert gamma_at(v3, 965, 1000) == 1e-3 and gamma_at(v3, 966, 1000) == 0.0
