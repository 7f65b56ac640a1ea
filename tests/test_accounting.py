"""Parameter counts, KV-cache sizes and the published figures.

Every expected number below is copied from REFERENCE.md (1.3, 1.4, 2.5, 2.7) or REFERENCE-2.md
(A1.2, A2.2), never computed by the code under test.
"""

import pytest
import torch

import minids
from minids.accounting import PUBLISHED, count, flops_per_token, kv_cache_elements_per_token
from minids.cli import main

# (preset, CALC total, CALC activated without input embedding, with it) -- REFERENCE.md 1.4, REFERENCE-2 A1.2/A2.2
CALC = [
    ("deepseek-v3", 671_026_404_352, 36_625_603_584, 37_552_282_624),
    ("deepseek-r1", 671_026_404_352, 36_625_603_584, 37_552_282_624),
    ("deepseek-v2", 235_741_434_880, 20_851_512_320, 21_375_800_320),
    ("deepseek-v2-lite", 15_706_484_224, 2_451_435_008, 2_661_150_208),
    ("deepseek-coder-v2-lite", 15_706_484_224, 2_451_435_008, 2_661_150_208),
    # REFERENCE.md 1.4 gives 2,619,079,296 for MoE-16B without the embedding, which is not its
    # "with" figure minus the 102400 x 2048 embedding (= 2,618,935,296); only "with" is checked here.
    ("deepseek-moe-16b", 16_375_728_128, None, 2_828_650_496),
    ("deepseek-vl2-tiny", 2_934_734_080, 574_127_360, 739_605_760),
    ("deepseek-vl2-small", 15_706_484_224, 2_451_435_008, 2_661_150_208),
    ("deepseek-llm-7b", 6_910_365_696, None, None),
    ("deepseek-math-7b", 6_910_365_696, None, None),
    ("deepseek-prover-v1.5-7b", 6_910_365_696, None, None),
    ("deepseek-llm-67b", 67_425_001_472, None, None),
    ("deepseek-coder-1.3b", 1_346_471_936, None, None),
    ("deepseek-coder-6.7b", 6_740_512_768, None, None),
    ("deepseek-coder-33b", 33_342_991_360, None, None),
]


@pytest.mark.parametrize("name,total,act,act_emb", CALC)
def test_counts_equal_the_reference_calculation(name, total, act, act_emb):
    c = count(name)
    assert c.total == total
    if act is not None:
        assert c.activated == act
    if act_emb is not None:
        assert c.activated_with_embedding == act_emb


def test_v3_mtp_module_and_selection_biases():
    c = count("deepseek-v3")
    assert c.mtp == 11_610_067_968  # REFERENCE.md 1.4: enorm+hnorm, eh_proj, one MoE layer, shared_head.norm
    assert c.selection_bias == 58 * 256  # one fp32 bias per MoE layer, not in the published total


def test_vl2_total_counts_its_selection_biases():
    # REFERENCE-2 A2.2's CALC for VL2 (27B) includes the 29 x 72 noaux_tc biases
    c = count("deepseek-vl2")
    assert c.total + c.selection_bias == 27_033_548_328
    assert c.activated + c.selection_bias == 4_124_128_808


# published figures and how far minids may be from them: 1%, or half a unit of the printed last digit
PUBLISHED_FIGURES = [
    ("deepseek-v3", "total", 671e9, 0.5e9),
    ("deepseek-v3", "activated", 37e9, 0.5e9),
    ("deepseek-v3", "mtp", 11.5e9, 0.05e9),
    ("deepseek-v2", "total", 236e9, 0.5e9),
    ("deepseek-v2", "activated", 21e9, 0.5e9),
    ("deepseek-v2-lite", "total", 15.7e9, 0.05e9),
    ("deepseek-moe-16b", "total", 16.4e9, 0.05e9),
    ("deepseek-moe-16b", "activated_with_embedding", 2.8e9, 0.05e9),
    ("deepseek-llm-7b", "total", 7e9, 0.5e9),
    ("deepseek-llm-67b", "total", 67e9, 0.5e9),
    ("deepseek-coder-33b", "total", 33e9, 0.5e9),
]


@pytest.mark.parametrize("name,field,published,half_unit", PUBLISHED_FIGURES)
def test_published_figures_within_1_percent_or_rounding(name, field, published, half_unit):
    ours = getattr(count(name), field)
    assert abs(ours / published - 1) <= 0.01 or abs(ours - published) <= half_unit


def test_v2_lite_activated_is_the_documented_exception():
    # V2P B.1 prints 2.4B; no convention gives 2.40B: 2.45B without the embedding, 2.66B with it.
    c = count("deepseek-v2-lite")
    assert 2.45e9 < c.activated < 2.46e9
    assert PUBLISHED["deepseek-v2-lite"].activated == 2.4e9


def test_kv_cache_per_token():
    # REFERENCE.md 2.5: 576 elements per token per layer for MLA; V2 Table 9's 34.6K and 15.6K
    assert kv_cache_elements_per_token("deepseek-v3") == 35_136
    assert kv_cache_elements_per_token("deepseek-v2") == 34_560
    assert kv_cache_elements_per_token("deepseek-v2-lite") == 15_552
    # naive MLA / transformers cache per-head K (192) and V (128): 40,960 per layer for V3
    assert kv_cache_elements_per_token("deepseek-v3", "naive") == 61 * 40_960
    # V2 Table 9: the MHA variant of the small MoE caches 110.6K elements per token (27 x 2 x 16 x 128)
    cfg = minids.ModelConfig.load("deepseek-v2-lite")
    mha = minids.ModelConfig.from_dict({**cfg.to_dict(), "use_mla": False})
    assert kv_cache_elements_per_token(mha) == 110_592
    with pytest.raises(ValueError, match="latent cache exists only for MLA"):
        kv_cache_elements_per_token("tiny-dense", "latent")


def test_forward_flops_per_token_by_hand():
    # tiny-dense (llama, GQA 8/4 heads of 32, 4 layers, I 704, V 512, D 256): count matmul weights by hand
    D, L, H, KV, Dh, I, V = 256, 4, 8, 4, 32, 704, 512
    matmuls = L * (D * H * Dh + 2 * D * KV * Dh + H * Dh * D + 3 * D * I) + V * D  # layers + head
    S = 128
    attn = L * 2 * H * (Dh + Dh) * (S + 1) / 2
    assert flops_per_token("tiny-dense", S) == pytest.approx(2 * matmuls + attn, rel=1e-12)


def test_meta_counting_uses_no_memory():
    with torch.device("meta"):
        model = minids.Transformer("deepseek-v3")
    assert all(p.is_meta for p in model.parameters())


def test_info_cli_prints_published_comparison(capsys):
    assert main(["info", "deepseek-v3", "deepseek-coder-1.3b"]) == 0
    out = capsys.readouterr().out
    assert "671,026,404,352" in out and "published 671B" in out
    assert "36,625,603,584" in out and "published 37B" in out
    assert "published 1.3B" in out  # preset names with dots resolve to their published figures
    assert "35,136 elements" in out


def test_info_cli_errors_are_one_line(capsys):
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("minids info: no preset named 'no-such-model'") and "\n" not in err


def test_smoke_cli_runs(capsys):
    assert main(["smoke", "tiny-dense", "--batch", "2", "--seq-len", "16"]) == 0
    assert "0 parameters without gradient" in capsys.readouterr().out


def test_presets_resolve_in_the_installed_wheel_layout(tmp_path):
    # a wheel installs configs/*.json as minids/configs/ (pyproject package-dir); mimic that layout
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(minids.__file__).resolve().parent.parent
    shutil.copytree(repo / "minids", tmp_path / "minids", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo / "configs", tmp_path / "minids" / "configs")
    code = "import minids; print(minids.__file__); print(minids.ModelConfig.load('deepseek-v3').hidden_size)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    where, hidden = out.stdout.split()
    assert where.startswith(str(tmp_path)) and hidden == "7168"
