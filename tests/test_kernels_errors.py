"""Each Triton wrapper called where it cannot run (a CPU tensor without TRITON_INTERPRET) or with operands it cannot
take gives one clear ValueError naming the torch function to use instead, not a traceback from inside Triton."""

import pytest
import torch
from minids.kernels import HAVE_TRITON

from minids import kernels

pytestmark = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")


def _calls():
    from minids.kernels import fp8, mla_decode, moe, rmsnorm

    x = torch.randn(4, 128)
    idx = torch.zeros(4, 1, dtype=torch.long)
    return {
        "fp8.act_quant": (lambda: fp8.act_quant(x), "minids.fp8.act_quant"),
        "fp8.act_quant_t": (lambda: fp8.act_quant_t(x), "minids.fp8.act_quant_t"),
        "fp8.act_quant_both": (lambda: fp8.act_quant_both(x), "minids.fp8.act_quant_both"),
        "fp8.weight_quant": (lambda: fp8.weight_quant(x), "minids.fp8.weight_quant"),
        "fp8.weight_dequant": (lambda: fp8.weight_dequant(x, torch.ones(1, 1)), "minids.fp8.weight_dequant"),
        "fp8.fp8_gemm": (lambda: fp8.fp8_gemm(x, torch.ones(4, 1), x, torch.ones(1, 1)), "minids.fp8.fp8_gemm"),
        "rmsnorm": (lambda: rmsnorm.rms_norm(x, torch.ones(128), 1e-6), "minids.rms_norm"),
        "moe": (lambda: moe.moe_experts(x, torch.ones(4, 1), idx, torch.zeros(2, 8, 128), torch.zeros(2, 8, 128),
                                        torch.zeros(2, 128, 8)), "minids.moe.moe_experts"),
        "mla_decode": (lambda: mla_decode.mla_decode(torch.randn(1, 1, 2, 96), torch.randn(1, 8, 96),
                                                     torch.tensor([8]), 64, 0.1), "minids.mla_decode_ref"),
    }


@pytest.mark.parametrize("name", list(_calls()))
def test_cpu_tensors_without_the_interpreter(name, monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRET", False)  # as on a machine without TRITON_INTERPRET=1
    call, instead = _calls()[name]
    with pytest.raises(ValueError, match=f"TRITON_INTERPRET=1 on the CPU; use {instead}"):
        call()


@pytest.mark.skipif(not kernels.runs_here(torch.zeros(1)) and not torch.cuda.is_available(),
                    reason="needs the interpreter or a GPU")
def test_fp8_gemm_takes_fp8_operands_only():
    from minids.kernels import fp8

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(4, 128, device=dev)
    with pytest.raises(ValueError, match="FP8 operands, got a torch.float32"):
        fp8.fp8_gemm(a, torch.ones(4, 1, device=dev), a, torch.ones(1, 1, device=dev))


def test_mla_decode_leaves_float64_to_the_reference():
    from minids.kernels.mla_decode import mla_decode

    dev = "cuda" if torch.cuda.is_available() else "cpu"  # (CPU tensors on a GPU machine are refused before)
    q, kv = (torch.randn(*shape, dtype=torch.float64, device=dev) for shape in ((1, 1, 2, 96), (1, 8, 96)))
    with pytest.raises(ValueError, match="float64 is minids.mla_decode_ref's"):
        mla_decode(q, kv, torch.tensor([8], device=dev), 64, 0.1)
