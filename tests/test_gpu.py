"""The CUDA paths against the CPU references: grouped expert GEMMs, fused attention, autocast, compile.

Skipped on machines without a CUDA GPU (CI); run on the H200 through bench/run_gpu.sh.
Tolerances: bf16 operands give relative errors between 1e-3 and 1e-2 (8 mantissa bits), so bf16
results are compared with a 2e-2 relative norm error against float64/float32 references.
"""

import pytest
import torch

import minids
from minids.moe import grouped_mm_available, moe_experts, route

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_grouped_mm_runs_in_bf16_on_this_gpu():
    assert grouped_mm_available("cuda", torch.bfloat16), "torch._grouped_mm should run in bf16 on Hopper"


@pytest.mark.parametrize("N,D,E,I,K", [(7, 256, 16, 128, 4), (4096, 1024, 16, 512, 4), (1000, 2048, 64, 1408, 6)])
def test_grouped_equals_loop_forward_backward_bf16(N, D, E, I, K):
    g = torch.Generator(device="cuda").manual_seed(N)
    x = torch.randn(N, D, device="cuda", generator=g)
    ws = [torch.randn(E, I, D, device="cuda", generator=g) * D**-0.5 for _ in range(2)]
    ws.append(torch.randn(E, D, I, device="cuda", generator=g) * I**-0.5)
    w, idx, _ = route(torch.randn(N, E, device="cuda", generator=g), None, top_k=K)
    up = torch.randn(N, D, device="cuda", generator=g)
    outs = {}
    for impl in ("grouped", "loop"):
        leaves = [t.clone().bfloat16().requires_grad_() for t in (x, *ws)]
        y, counts = moe_experts(leaves[0], w, idx, *leaves[1:], impl=impl)
        (y.float() * up).sum().backward()
        outs[impl] = (y, *[t.grad for t in leaves])
    ref_leaves = [t.clone().requires_grad_() for t in (x, *ws)]  # float32 (TF32 is off by default)
    yr, _ = moe_experts(ref_leaves[0], w, idx, *ref_leaves[1:], impl="loop")
    (yr * up).sum().backward()
    ref = (yr, *[t.grad for t in ref_leaves])
    for impl, got in outs.items():
        for a, b, name in zip(got, ref, ("y", "dx", "dgate", "dup", "ddown")):
            assert rel(a, b) < 2e-2, f"{impl} {name}: {rel(a, b):.2e}"


def test_grouped_under_autocast_matches_fp32():
    g = torch.Generator(device="cuda").manual_seed(3)
    N, D, E, I, K = 512, 256, 16, 128, 4
    x = torch.randn(N, D, device="cuda", generator=g)
    ws = [torch.randn(E, I, D, device="cuda", generator=g) * 0.05, torch.randn(E, I, D, device="cuda", generator=g) * 0.05,
          torch.randn(E, D, I, device="cuda", generator=g) * 0.05]
    w, idx, _ = route(torch.randn(N, E, device="cuda", generator=g), None, top_k=K)
    ref, _ = moe_experts(x, w, idx, *ws, impl="loop")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = moe_experts(x, w, idx, *ws, impl="grouped")
    assert got.dtype == torch.float32 and rel(got, ref) < 2e-2


@pytest.mark.parametrize("name", ["tiny-v3", "tiny-v2", "tiny-moe", "tiny-dense"])
def test_model_on_gpu_matches_cpu(name):
    torch.manual_seed(0)
    model = minids.Transformer(name).eval()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        cpu = model(ids, labels=ids)
        model.cuda()
        fp32 = model(ids.cuda(), labels=ids.cuda())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(ids.cuda(), labels=ids.cuda())
    # fp32 on the GPU: TF32 is off by default in torch, so this is fp32 rounding
    assert rel(fp32.logits.cpu(), cpu.logits) < 1e-4
    assert rel(bf16.logits.float().cpu(), cpu.logits) < 5e-2
    assert abs(bf16.loss.item() - cpu.loss.item()) < 2e-2 * cpu.loss.item()


def test_sdpa_matches_reference_on_mla_shapes():
    g = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 16, 512, 192, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(2, 16, 512, 192, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(2, 16, 512, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    got = minids.attention(q, k, v, 192**-0.5)
    ref = minids.attention_ref(q.double(), k.double(), v.double(), 192**-0.5)
    assert rel(got, ref) < 2e-2


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = minids.Transformer("tiny-v3").cuda().train()
    model.set_moe_impl("grouped")
    ids = torch.randint(0, 512, (4, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        eager = model(ids, labels=ids).loss
        compiled = torch.compile(model)(ids, labels=ids).loss
    assert abs(eager.item() - compiled.item()) < 1e-2 * eager.item()
    compiled.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
