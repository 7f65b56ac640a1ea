"""Checkpoints in the Hugging Face layout: round trips, shards, FP8, conversion, and every bad input."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import minids
from minids.checkpoint import CheckpointError
from minids.cli import main
from minids.fp8 import weight_dequant, weight_quant


def tiny(name="tiny-v3", **over):
    cfg = minids.ModelConfig.load(name)
    return minids.ModelConfig.from_dict({**cfg.to_dict(), "num_hidden_layers": 2, **over})


def make(name="tiny-v3", seed=0, **over):
    torch.manual_seed(seed)
    model = minids.Transformer(tiny(name, **over)).eval()
    for m in model.modules():  # a non-zero selection bias, negative entries included
        if getattr(m, "e_score_correction_bias", None) is not None:
            m.e_score_correction_bias.normal_(0, 0.05)
    return model


def same_outputs(a, b, ids):
    with torch.no_grad():
        oa, ob = a(ids, labels=ids), b(ids, labels=ids)
    assert torch.equal(oa.logits, ob.logits)
    assert torch.equal(oa.loss, ob.loss)


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v2", "tiny-moe", "tiny-dense"])
def test_round_trip_is_exact(tmp_path, name):
    model = make(name)
    minids.save_pretrained(model, tmp_path)
    back = minids.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24))
    same_outputs(model, back, ids)
    assert back.cfg.to_dict() == {**model.cfg.to_dict(), "torch_dtype": "float32"}


def test_layout_names_experts_mtp_and_bias_like_the_official_checkpoint(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    L = model.cfg.num_hidden_layers
    assert "model.layers.1.mlp.experts.15.down_proj.weight" in sd  # per-expert keys (REFERENCE.md 6.1)
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for k in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "embed_tokens", "shared_head.head"):
        assert f"model.layers.{L}.{k}.weight" in sd  # the MTP layer sits at index num_hidden_layers
    assert f"model.layers.{L}.self_attn.kv_b_proj.weight" in sd
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["num_nextn_predict_layers"] == 1


def test_bf16_save_keeps_the_bias_fp32_and_load_honours_dtype(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path, dtype=torch.bfloat16)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    back = minids.from_pretrained(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16  # config.json's torch_dtype
    assert back.model.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    fp32 = minids.from_pretrained(tmp_path, dtype=torch.float32)
    assert fp32.lm_head.weight.dtype == torch.float32


def test_sharded_save_and_load(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path, max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = sum(t.numel() * 4 for t in model.state_dict().values())
    assert index["metadata"]["total_size"] == total + 2 * 512 * 256 * 4  # plus MTP's copies of embedding and head
    ids = torch.randint(0, 512, (2, 16))
    same_outputs(model, minids.from_pretrained(tmp_path).eval(), ids)
    # saving again unsharded removes the shards and the index of the earlier save
    minids.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_transformers5_fused_expert_tensors_are_read(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    for layer in (1, 2):  # layer 2 = the MTP layer
        base = f"model.layers.{layer}.mlp.experts"
        E = 16
        gate = torch.stack([sd.pop(f"{base}.{e}.gate_proj.weight") for e in range(E)])
        up = torch.stack([sd.pop(f"{base}.{e}.up_proj.weight") for e in range(E)])
        sd[f"{base}.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2I, D)
        sd[f"{base}.down_proj"] = torch.stack([sd.pop(f"{base}.{e}.down_proj.weight") for e in range(E)])
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    same_outputs(model, minids.from_pretrained(tmp_path).eval(), torch.randint(0, 512, (2, 16)))


# ------------------------------------------------------------------------------------------ FP8
def dequant_by_hand(q, s, block=128):
    out = torch.empty(q.shape)
    for i in range(math.ceil(q.shape[0] / block)):
        for j in range(math.ceil(q.shape[1] / block)):
            blk = q[i * block : (i + 1) * block, j * block : (j + 1) * block].float()
            out[i * block : (i + 1) * block, j * block : (j + 1) * block] = blk * s[i, j]
    return out


@pytest.mark.parametrize("shape", [(256, 256), (80, 256), (300, 130), (1, 7)])
def test_weight_quant_dequant_blocks(shape):
    torch.manual_seed(1)
    w = torch.randn(shape)
    q, s = weight_quant(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    d = weight_dequant(q, s, dtype=torch.float32)
    assert torch.equal(d, dequant_by_hand(q, s))
    # E4M3 keeps 3 mantissa bits: relative rounding error at most 2^-4 for normal values
    big = w.abs() > w.abs().max() * 2**-6
    assert ((d - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-6).all()
    wrong = torch.ones(s.shape[0] + 1, s.shape[1])
    with pytest.raises(ValueError, match=rf"scale_inv has shape \({wrong.shape[0]}, {wrong.shape[1]}\), expected"):
        weight_dequant(q, wrong)


def fp8_checkpoint(model, path):
    """The official layout: every linear weight of attention and the experts in E4M3 + weight_scale_inv."""
    minids.save_pretrained(model, path)
    sd = load_file(path / "model.safetensors")
    out = {}
    for k, v in sd.items():
        fp8 = k.endswith(("proj.weight", "proj_with_mqa.weight")) and "eh_proj" not in k and v.dim() == 2
        if fp8:
            out[k], out[k + "_scale_inv"] = weight_quant(v)
        else:
            out[k] = v
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                  "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(cfg))
    return out


def test_fp8_checkpoint_is_dequantized_blockwise(tmp_path):
    model = make("tiny-v3")
    sd = fp8_checkpoint(model, tmp_path)
    back = minids.from_pretrained(tmp_path, dtype=torch.float32)
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # (80, 256): partial edge block
    expect = dequant_by_hand(sd[key], sd[key + "_scale_inv"])
    assert torch.equal(back.model.layers[0].self_attn.kv_a_proj_with_mqa.weight, expect)
    e = "model.layers.2.mlp.experts.3.up_proj.weight"  # the MTP layer's expert
    assert torch.equal(back.mtp[0].mlp.experts.up_proj[3], dequant_by_hand(sd[e], sd[e + "_scale_inv"]))
    with torch.no_grad():
        ids = torch.randint(0, 512, (2, 16))
        a, b = back(ids).logits.flatten(), model(ids).logits.flatten()
    # E4M3 weights (3 mantissa bits) also flip a few routing decisions: close, not equal
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_convert_fp8_to_bf16_drops_scales_and_mtp(tmp_path):
    model = make("tiny-v3")
    fp8_checkpoint(model, tmp_path / "fp8")
    (tmp_path / "fp8" / "tokenizer.json").write_text("{}")
    assert main(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--drop-mtp"]) == 0
    sd = load_file(tmp_path / "bf16" / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in sd)
    assert not any(k.startswith("model.layers.2.") for k in sd)
    assert sd["model.layers.0.self_attn.o_proj.weight"].dtype == torch.bfloat16
    assert sd["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_nextn_predict_layers"] == 0
    assert (tmp_path / "bf16" / "tokenizer.json").is_file()
    back = minids.from_pretrained(tmp_path / "bf16")
    assert len(back.mtp) == 0 and back.lm_head.weight.dtype == torch.bfloat16


def test_convert_never_mixes_with_or_overwrites_a_destination(tmp_path, capsys):
    src = tmp_path / "src"
    minids.save_pretrained(make("tiny-v3"), src, max_shard_bytes=2_000_000)  # sharded
    shards = sorted(src.glob("model-*.safetensors"))
    assert len(shards) >= 3
    old = tmp_path / "old"
    minids.save_pretrained(make("tiny-dense"), old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    assert main(["convert", str(src), str(old)]) == 2  # a non-empty destination is refused, left as it was
    assert "exists and is not empty: convert into a new directory" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    (tmp_path / "file").write_text("mine")
    assert main(["convert", str(src), str(tmp_path / "file")]) == 2
    assert "the destination is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"

    with open(shards[-1], "r+b") as fh:  # the last shard cut short: found before anything is written
        fh.truncate(shards[-1].stat().st_size // 2)
    assert main(["convert", str(src), str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and shards[-1].name in err and "truncated" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "old", "src"]  # no destination, no temporary

    minids.save_pretrained(make("tiny-v3"), src, max_shard_bytes=2_000_000)  # mended: an empty directory is fine
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(src), str(tmp_path / "empty"), "--dtype", "fp32"]) == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "old", "src"]


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def saved(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path, max_shard_bytes=2_000_000)
    return tmp_path


def test_missing_config(tmp_path):
    with pytest.raises(minids.ConfigError, match="has no config.json"):
        minids.from_pretrained(tmp_path)


def test_unknown_model_type(saved):
    cfg = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(minids.ConfigError, match=r"model_type='qwen2': unknown model type"):
        minids.from_pretrained(saved)


def test_absent_shard(saved):
    shard = sorted(saved.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard.name} \(listed for \d+ tensors"):
        minids.from_pretrained(saved)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(256, 100)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"o_proj.weight has shape \(256, 100\), expected \(256, 256\)"):
        minids.from_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    model = make("tiny-v3")
    minids.save_pretrained(model, tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["model.layers.0.post_attention_layernorm.weight"]
    sd["model.layers.0.self_attn.rotary_emb.bogus"] = torch.zeros(3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        minids.from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing 1 tensor(s): model.layers.0.post_attention_layernorm.weight" in msg
    assert "unexpected 1 tensor(s): model.layers.0.self_attn.rotary_emb.bogus" in msg


def test_truncated_file(tmp_path):
    minids.save_pretrained(make("tiny-dense"), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        minids.from_pretrained(tmp_path)


def test_scale_shape_mismatch(tmp_path):
    sd = fp8_checkpoint(make("tiny-v3"), tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    sd[key] = torch.ones(3, 3)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"{key}: scale_inv has shape \(3, 3\), expected \(2, 2\)"):
        minids.from_pretrained(tmp_path)


def test_pickle_files_are_never_loaded(tmp_path):
    make("tiny-dense").cfg.save(tmp_path)
    torch.save({"x": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: pickle files are never loaded"):
        minids.from_pretrained(tmp_path)


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create the output directory"):
        minids.save_pretrained(make("tiny-dense"), blocker / "sub")


def test_tied_embeddings_stay_tied_through_save_and_load(tmp_path):
    model = make("tiny-dense", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    minids.save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    back = minids.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.model.embed_tokens.weight
    same_outputs(model, back, torch.randint(0, 512, (2, 16)))


def test_corrupt_offsets_are_rejected(tmp_path):
    import struct

    header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    from minids.safetensors_io import SafetensorsFile

    with pytest.raises(ValueError, match=r"corrupt safetensors entry for x: offsets 0..8 do not hold \(4,\)"):
        SafetensorsFile(tmp_path / "bad.safetensors")


def test_v3_layout_holds_the_official_files_element_count():
    """REFERENCE.md 1.4: the V3 HF files hold 684,489,830,400 weights (main model, MTP, and layer 61's copies of the
    embedding and head), and CKPT-R1 counts 684,531,386,000 elements with the fp32 selection biases and the
    ``*_scale_inv`` tensors: one float a 128 x 128 block of each FP8 tensor (5.2: the attention projections and
    every MLP's gate/up/down, experts and shared experts, MTP included; not the router, eh_proj, norms, embeddings
    or head). minids' layout of a meta-device V3 must give both counts and 5.2's example scale shapes."""
    import re
    import warnings

    from minids.checkpoint import hf_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = minids.ModelConfig.load("deepseek-v3")
    with torch.device("meta"):
        model = minids.Transformer(cfg)
    fp8 = re.compile(r"\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
    weights = biases = scales = 0
    shapes = {}
    for name, t in hf_state_dict(model):
        if name.endswith("e_score_correction_bias"):
            biases += t.numel()
            continue
        weights += t.numel()
        if fp8.search(name):
            shapes[name] = (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
            scales += math.prod(shapes[name])
    assert weights == 684_489_830_400
    assert weights + biases + scales == 684_531_386_000
    assert shapes["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (5, 56)
    assert shapes["model.layers.0.self_attn.kv_b_proj.weight"] == (256, 4)
    assert shapes["model.layers.61.mlp.experts.255.down_proj.weight"] == (56, 16)
