"""Bad input to the command line, the library's loaders and its references: one line each, naming what, where and
what to do, never a traceback, and never a silently wrong answer from an oracle (minids/cli.py, config.py, data.py,
train.py, plots.py; attention.py, model.py, moe.py, decode.py, fp8.py, rope.py). The cases come from two reviews that
tried realistic mistakes against every command and public function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import minids
from minids.cli import main
from minids.config import ConfigError, ModelConfig
from minids.data import DataError, get_tokenizer, load_documents
from minids.train import TrainConfig, TrainError, train


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny checkpoint as a training run leaves it: runs/x/checkpoints/step-0000001 beside the run's tokenizer."""
    run = tmp_path_factory.mktemp("run") / "x"
    ck = run / "checkpoints" / "step-0000001"
    torch.manual_seed(0)
    minids.save_pretrained(minids.Transformer("tiny-v3"), ck)
    (run / "tokenizer_minids.json").write_text('{"type": "byte"}\n')
    return ck


def one_line(argv: list[str], capsys, *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"minids {argv[0]}: "), repr(err)
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize("argv, needles", [
    (["smoke", "tiny-v3", "--device", "mps"], ["--device mps: minids runs on cpu or cuda"]),
    (["smoke", "tiny-v3", "--batch", "0"], ["--batch 0: must be at least 1"]),
    (["smoke", "tiny-v3", "--seq-len", "-3"], ["--seq-len -3: must lie in [3, 1024]"]),
    (["smoke", "deepseek-v3"], ["deepseek-v3: 682,636,472,320 parameters in fp32 need at least", "tiny preset"]),
    (["info", "tiny-v3", "--seq-len", "0"], ["--seq-len 0: must be at least 1"]),
    (["generate", "tiny-v3", "--prompt", "x", "--top-k", "0"], ["top_k=0: must be a positive integer"]),
    (["generate", "tiny-v3", "--prompt", "x", "--top-p", "2"], ["top_p=2.0: must lie in (0, 1]"]),
    (["generate", "tiny-v3", "--prompt", "x", "--temperature", "-1"], ["temperature=-1.0: must be >= 0"]),
    (["generate", "tiny-v3", "--prompt", "x", "--max-new-tokens", "0"], ["--max-new-tokens 0: must be at least 1"]),
])
def test_cli_argument_errors(argv, needles, capsys):
    one_line(argv, capsys, *needles)


def test_generate_names_what_a_directory_is(ckpt, tmp_path, capsys):
    run = ckpt.parent.parent
    one_line(["generate", str(run), "--prompt", "x"], capsys, "a training run, not a checkpoint", str(ckpt))
    one_line(["generate", str(ckpt / "model.safetensors"), "--prompt", "x"], capsys, "not a JSON config (binary data)")
    bare = tmp_path / "config_only"  # a config beside no weights is not a model with random weights
    bare.mkdir()
    (bare / "config.json").write_text((ckpt / "config.json").read_text())
    (bare / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    one_line(["generate", str(bare), "--prompt", "x"], capsys, "no model.safetensors", "pickle files are never loaded")
    one_line(["generate", str(ckpt), "--prompt", "x" * 1100], capsys, "exceeds max_position_embeddings=1024",
             "fewer new tokens")
    assert "x" * 1100 not in capsys.readouterr().out  # the prompt is checked before it is echoed
    assert main(["generate", str(ckpt), "--prompt", "def ", "--max-new-tokens", "4"]) == 0


@pytest.mark.parametrize("field, value, needle", [
    ("hidden_sizee", 256, "hidden_sizee=256: not a config field; did you mean hidden_size?"),
    ("tie_word_embeddings", "false", "tie_word_embeddings='false': must be true or false"),
    ("use_mla", "false", "use_mla='false': must be true or false (or null)"),
    ("rope_theta", True, "rope_theta=True: must be a number"),
    ("aux_loss_alpha", "x", "aux_loss_alpha='x': must be a number (or null)"),
    ("eos_token_id", "x", "eos_token_id='x': must be a token id"),
])
def test_model_config_types_and_typos(tmp_path, field, value, needle):
    p = tmp_path / "c.json"
    base = json.loads(Path(minids.config.preset_path("tiny-v3")).read_text())
    if field == "hidden_sizee":  # a misspelt field standing in for the real one (beside it, it only warns)
        del base["hidden_size"]
    p.write_text(json.dumps({**base, field: value}))
    with pytest.raises(ConfigError) as e:
        ModelConfig.load(p)
    assert str(e.value) == f"{p}: {needle}" or str(e.value).startswith(f"{p}: {needle}"), str(e.value)


def test_model_config_keeps_unknown_keys_that_resemble_no_field():
    with pytest.warns(UserWarning, match="'initializer_cutoff' is not used"):
        cfg = ModelConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "initializer_cutoff": 3})
    assert cfg.extra["initializer_cutoff"] == 3 and cfg.to_dict()["initializer_cutoff"] == 3


def test_data_and_tokenizer_errors_name_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="the folder holds no files"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl: not UTF-8 text \(byte 13\)"):
        load_documents(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{bad")
    pytest.importorskip("tokenizers")
    with pytest.raises(DataError, match=r"tok/tokenizer.json: not a readable tokenizer.json"):
        get_tokenizer(str(tmp_path / "tok"))


def test_resume_from_a_broken_checkpoint_says_which_and_what_to_do(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    cfg = dict(model="tiny-v3", model_overrides={"num_hidden_layers": 2}, data=str(corpus), seq_len=32, batch_size=2,
               max_steps=2, eval_interval=2, eval_tokens=256, sample_tokens=0, plots=False, ckpt_interval=1,
               out_dir=str(tmp_path / "run"))
    train(TrainConfig(**cfg))
    ck = tmp_path / "run" / "checkpoints" / "step-0000002"
    (ck / "trainer_state.json").write_text('{"step": 2, "param')
    with pytest.raises(TrainError) as e:
        train(TrainConfig(**{**cfg, "resume": True, "max_steps": 3}))
    msg = str(e.value)
    assert msg.startswith(f"{ck}: cannot resume from this checkpoint") and "\n" not in msg
    assert f"move it out of {ck.parent} to resume from the checkpoint before" in msg
    (ck / "trainer_state.json").unlink()
    with pytest.raises(TrainError, match="No such file"):
        train(TrainConfig(**{**cfg, "resume": True, "max_steps": 3}))
    (tmp_path / "run" / "checkpoints" / "moved").mkdir()
    ck.rename(tmp_path / "run" / "checkpoints" / "moved" / ck.name)  # as the message says: step 1 resumes
    assert train(TrainConfig(**{**cfg, "resume": True, "max_steps": 3}))["step"] == 3


@pytest.mark.parametrize("metrics, load, needle", [
    ("", None, "metrics.jsonl: no records yet"),
    ('{"step": 1, "loss": 1.0}\n', None, "metrics.jsonl, line 1: a record needs its number of 'tokens'"),
    ('{"step": 1, "tokens": 10, "loss": 1.0}\n', {"step": 1, "load": [1, 2]},
     "expert_load.json: not an expert-load record (load of shape (2,)"),
])
def test_plot_errors(tmp_path, metrics, load, needle, capsys):
    pytest.importorskip("matplotlib")
    (tmp_path / "metrics.jsonl").write_text(metrics)
    if load is not None:
        (tmp_path / "expert_load.json").write_text(json.dumps(load))
    one_line(["plot", str(tmp_path)], capsys, needle)
    assert not list(tmp_path.glob("*.png")) or load is not None


# ------------------------------------------------------------------------------------------ the library's references
def test_mla_decode_ref_refuses_what_it_cannot_answer():
    """The oracle checks what the kernels check (shapes, dtypes) and, reading values as the kernels cannot (no host
    reads there), lengths past the cache and block-table entries a sequence uses that name no page."""
    from minids.attention import mla_decode_ref

    q, kv = torch.randn(2, 2, 4, 48), torch.randn(2, 10, 48)  # C = 32, R = 16
    lens = torch.tensor([7, 10])
    mla_decode_ref(q, kv, lens, 32, 0.3)  # fine
    for call, needle in (
        (lambda: mla_decode_ref(q[0], kv, lens, 32, 0.3), "q must be (batch, s_q, heads, C + R)"),
        (lambda: mla_decode_ref(q[..., :32], kv, lens, 32, 0.3), "kv_cache's last dimension is 48, expected 32"),
        (lambda: mla_decode_ref(q, kv, lens, 512, 0.3), "smaller than head_dim_v=512"),
        (lambda: mla_decode_ref(q, kv, torch.tensor([7, 15]), 32, 0.3), "cache_seqlens must lie in [0, 10]"),
        (lambda: mla_decode_ref(q, kv, torch.tensor([7]), 32, 0.3), "cache_seqlens must be a (batch=2,) tensor"),
        (lambda: mla_decode_ref(q, kv, [7, 10], 32, 0.3), "got list"),
        (lambda: mla_decode_ref(q.int(), kv, lens, 32, 0.3), "q must be bf16, fp16, fp32 (or float64"),
        # FlashMLA's argument order (block_table before the lengths) and its 4-D k_cache
        (lambda: mla_decode_ref(q, kv, torch.zeros(2, 3, dtype=torch.int32), lens, 0.3), "head_dim_v must be an int"),
        (lambda: mla_decode_ref(q, kv[:, :, None], lens, 32, 0.3), "pass k_cache[:, :, 0]"),
    ):
        with pytest.raises(ValueError, match=re_escape(needle)):
            call()
    pages = torch.randn(4, 4, 48)  # 4 pages of 4 tokens
    table = torch.tensor([[0, 1, -1], [2, 3, 7]])
    mla_decode_ref(q, pages, torch.tensor([8, 8]), 32, 0.3, block_table=table)  # -1 and 7 are past both ends: fine
    with pytest.raises(ValueError, match=re_escape("block_table[1, 2] = 7 is not a page of kv_cache (0..3)")):
        mla_decode_ref(q, pages, torch.tensor([8, 11]), 32, 0.3, block_table=table)
    with pytest.raises(ValueError, match=re_escape("cache_seqlens must lie in [0, 12]")):
        mla_decode_ref(q, pages, torch.tensor([8, 13]), 32, 0.3, block_table=table)
    with pytest.raises(ValueError, match=re_escape("block_table must be (batch=2, max_pages)")):
        mla_decode_ref(q, pages, torch.tensor([8, 8]), 32, 0.3, block_table=table[:1])


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


def test_attention_lengths_and_the_model_labels():
    from minids.attention import attention, attention_ref

    q, k, v = torch.randn(1, 2, 6, 24), torch.randn(1, 2, 10, 24), torch.randn(1, 2, 10, 16)
    assert attention_ref(q, k, v, 0.2).shape == (1, 2, 6, 16)  # the last 6 queries of 10 positions
    with pytest.raises(ValueError, match="it takes equal lengths"):
        attention(q, k, v, 0.2)  # SDPA would align the causal mask top-left: a different answer
    with pytest.raises(ValueError, match="k and v their length"):
        attention(q, q, v[:, :, :2], 0.2)
    with pytest.raises(ValueError, match=re_escape("10 queries over 6 keys")):
        attention_ref(k, q, v[:, :, :6], 0.2)
    m = minids.Transformer("tiny-v3")
    ids = torch.randint(0, 512, (2, 8))
    with pytest.raises(ValueError, match=re_escape("labels must be (batch, length) like input_ids (2, 8), unshifted")):
        m(ids, labels=ids[:, 1:])  # already shifted: would train on the token after next
    with pytest.raises(ValueError, match="at least 2 tokens"):
        m(ids[:, :1], labels=ids[:, :1])
    with pytest.raises(ValueError, match=re_escape("input_ids must lie in [0, vocab_size=512), got 0..512")):
        m(torch.tensor([[0, 512]]))


def test_router_sampling_fp8_and_rope_arguments():
    from minids.decode import sampling_probs
    from minids.fp8 import act_dequant, act_quant
    from minids.moe import route
    from minids.rope import apply_rope

    lg = torch.randn(20, 16)
    with pytest.raises(ValueError, match="logits must be \\(tokens, experts\\)"):
        route(lg[None], None, top_k=2)
    with pytest.raises(ValueError, match="topk_method='noaux-tc'"):
        route(lg, torch.zeros(16), top_k=4, topk_method="noaux-tc", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match=re_escape("top_k=9: must lie in [1, 8] (the experts of the kept groups)")):
        route(lg, torch.zeros(16), top_k=9, topk_method="noaux_tc", n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="n_group must divide the 16 experts"):
        route(lg, None, top_k=2, topk_method="group_limited_greedy", n_group=3, topk_group=1)
    for kw, needle in (({"top_p": 0.0}, "top_p=0.0: must lie in (0, 1]"), ({"top_k": 0}, "top_k=0: must be a positive"),
                       ({"top_p": -1.0}, "top_p=-1.0")):
        with pytest.raises(ValueError, match=re_escape(needle)):
            sampling_probs(lg, 1.0, **kw)
        with pytest.raises(ValueError, match=re_escape(needle)):
            minids.generate.generate(minids.Transformer("tiny-v3"), [[1, 2]], 2, temperature=1.0, **kw)
    x = torch.randn(4, 200)
    xq, s = act_quant(x, 64)
    assert (act_dequant(xq, s, 64) - x).abs().max() < 0.5
    with pytest.raises(ValueError, match=re_escape("scales (4, 4) do not fit q (4, 200) in blocks of 128")):
        act_dequant(xq, s)
    cos, sin = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    assert apply_rope(torch.randn(1, 5, 2, 16), cos, sin, True).shape == (1, 5, 2, 16)
    with pytest.raises(ValueError, match="apply_rope: x must be \\(B, S, H, R\\)"):
        apply_rope(torch.randn(1, 5, 16), cos, sin, True)  # would broadcast to (1, 5, 5, 16)


def test_cache_lengths_of_the_wrong_shape_are_refused_before_anything_is_written():
    from minids.cache import KVCache

    m = minids.Transformer("tiny-v3")
    cache = KVCache.allocate(m.cfg, 2, 16)
    with pytest.raises(ValueError, match=re_escape("lengths must be (2,) integers, one per sequence of the cache, got "
                                                   "(2,) torch.float32")):
        m(torch.randint(0, 512, (2, 4)), cache=cache, lengths=torch.tensor([4.0, 3.0]))
    with pytest.raises(ValueError, match=re_escape("got (3,)")):
        m(torch.randint(0, 512, (2, 4)), cache=cache, lengths=torch.tensor([4, 3, 2]))
    assert cache.lengths.tolist() == [0, 0]


def test_experts_take_int32_indices_and_refuse_float_ones():
    from minids.moe import moe_align, moe_experts

    torch.manual_seed(0)
    x, w = torch.randn(6, 16), torch.rand(6, 2)
    idx = torch.randint(0, 4, (6, 2))
    wg, wu, wd = torch.randn(4, 8, 16), torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    for impl in ("grouped", "loop"):
        y64, c64 = moe_experts(x, w, idx, wg, wu, wd, impl=impl)
        y32, c32 = moe_experts(x, w, idx.int(), wg, wu, wd, impl=impl)  # what kernel authors often hold
        assert torch.equal(y64, y32) and torch.equal(c64, c32)
    with pytest.raises(ValueError, match="indices must hold expert numbers"):
        moe_experts(x, w, idx.float(), wg, wu, wd, impl="loop")
    assert torch.equal(moe_align(idx.int(), 4, 4).sorted_pair, moe_align(idx, 4, 4).sorted_pair)
    with pytest.raises(ValueError, match="block_m >= 1"):
        moe_align(idx, 4, 0)


def test_mla_forms_refuse_mixed_up_shapes():
    from minids.attention import mla_attention_absorbed, mla_attention_naive

    qn, qp = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 4)
    c_kv, k_pe, wkv_b = torch.randn(1, 5, 16), torch.randn(1, 5, 4), torch.randn(2, 8 + 6, 16)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    assert mla_attention_naive(qn, qp, c_kv, k_pe, wkv_b, mask, 0.3).shape == (1, 3, 2, 6)
    for form in (mla_attention_naive, mla_attention_absorbed):
        for args in ((qn, qp, c_kv, k_pe[..., :2], wkv_b, mask),  # RoPE widths that differ
                     (qn, qp, c_kv, k_pe, wkv_b[0], mask),  # one head's weight
                     (qn, qp, c_kv[:, :4], k_pe, wkv_b, mask),  # latents and RoPE keys of different lengths
                     (qn, qp, c_kv, k_pe, wkv_b, mask.float())):  # an additive mask
            with pytest.raises(ValueError, match=f"{form.__name__}: expected q_nope"):
                form(*args, 0.3)


def test_a_config_warning_is_one_line_naming_the_file(tmp_path, capsys):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({**json.loads(Path(minids.config.preset_path("tiny-v3")).read_text()), "my_note": 3}))
    assert main(["info", str(p)]) == 0  # the config is read twice (the table and the counts): one warning
    err = capsys.readouterr().err
    assert err == (f"minids info: warning: {p}: config key 'my_note' is not used by minids (kept and written back "
                   "as is)\n")


def test_the_references_answer_float64_in_float64():
    """An oracle user asking in float64 gets float64 digits (the float32 path is ~1e-7 off), against the formula
    written out here in float64."""
    from minids.attention import attention_ref, mla_attention_absorbed, mla_attention_naive, mla_decode_ref

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    s = (q @ k.transpose(-1, -2)) * 0.3
    want = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ v
    got = attention_ref(q, k, v, 0.3)
    assert got.dtype == torch.float64 and (got - want).abs().max() < 1e-12
    assert (attention_ref(q.float(), k.float(), v.float(), 0.3).double() - want).abs().max() > 1e-9  # float32's error

    qd, kv = torch.randn(1, 1, 2, 12, dtype=torch.float64), torch.randn(1, 6, 12, dtype=torch.float64)  # C=8, R=4
    out, lse = mla_decode_ref(qd, kv, torch.tensor([6]), 8, 0.3)
    sc = torch.einsum("bshd,btd->bhst", qd, kv) * 0.3
    assert out.dtype == lse.dtype == torch.float64
    assert (out - torch.einsum("bhst,btc->bshc", sc.softmax(-1), kv[..., :8])).abs().max() < 1e-12
    assert (lse - sc.logsumexp(-1)).abs().max() < 1e-12

    qn, qp = torch.randn(1, 3, 2, 8, dtype=torch.float64), torch.randn(1, 3, 2, 4, dtype=torch.float64)
    c_kv, k_pe, wkv_b = (torch.randn(1, 5, 16, dtype=torch.float64), torch.randn(1, 5, 4, dtype=torch.float64),
                         torch.randn(2, 14, 16, dtype=torch.float64))
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool).tril(2)
    a = mla_attention_naive(qn, qp, c_kv, k_pe, wkv_b, mask, 0.3)
    b = mla_attention_absorbed(qn, qp, c_kv, k_pe, wkv_b, mask, 0.3)
    assert a.dtype == b.dtype == torch.float64 and (a - b).abs().max() < 1e-12  # the two forms agree to float64
