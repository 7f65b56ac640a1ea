"""Triton routed experts (minids.kernels.moe) against the reference (minids.moe.moe_experts, the per-expert loop),
forward and every gradient (x, the routing weights, W_gate, W_up, W_down), and the routing plumbing (moe_align).

Routings cover: odd token counts (1, 37), experts with zero tokens, one expert taking most tokens (Zipf-like),
top-k from 1 to 8, hidden and expert widths that are not multiples of the tiles. On the CPU the kernels run under
TRITON_INTERPRET=1 (conftest) in float32 with small shapes; on CUDA the same file also runs bf16 at a larger size.
Unwritten outputs are caught by NaN poisoning: deterministic mode with ``fill_uninitialized_memory`` makes every
``torch.empty`` (all the kernels' output and scratch buffers) NaN, and NaN never passes.
"""

import pytest
import torch
from minids.kernels import HAVE_TRITON

from minids.moe import moe_align, moe_experts

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed"),
              pytest.mark.usefixtures("nan_poison")]

device = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), "non-finite values: an output element was not written"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def routing(N: int, E: int, K: int, kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights (N, K) float32, indices (N, K) int64): K distinct experts per token.

    balanced: random scores; zero: only the first half of the experts is ever chosen; skewed: expert 0 is every
    token's first choice and the rest follow a Zipf-like preference (weight 1 / rank).
    """
    scores = torch.rand(N, E, generator=g)
    if kind == "zero":
        scores[:, E // 2:] -= 2.0  # never in the top-K while K <= E // 2
    elif kind == "skewed":
        scores = scores * 0.1 + 1.0 / torch.arange(1, E + 1).float()
    indices = scores.topk(K, dim=-1).indices
    weights = torch.rand(N, K, generator=g) + 0.1
    return weights, indices


# ------------------------------------------------------------------------------------------------ routing plumbing
def test_moe_align_by_hand():
    # 3 tokens, top-2, 4 experts, blocks of 4: pairs (t * K + k) 0:e0 1:e2 2:e2 3:e1 4:e2 5:e0; expert 3 gets none
    idx = torch.tensor([[0, 2], [2, 1], [2, 0]], device=device)
    al = moe_align(idx, 4, 4)
    n_blocks = (6 + 4 * 3 + 3) // 4  # P + E * (BM - 1), rounded up to BM: fixed by the shapes alone
    assert al.sorted_pair.tolist() == [0, 5, -1, -1, 3, -1, -1, -1, 1, 2, 4, -1] + [-1] * (4 * n_blocks - 12)
    assert al.block_expert.tolist() == [0, 1, 2] + [-1] * (n_blocks - 3)
    assert al.expert_start.tolist() == [0, 4, 8, 12, 12]
    assert al.pair_row.tolist() == [0, 8, 9, 4, 10, 1]
    assert al.counts.tolist() == [2, 1, 3, 0]


@pytest.mark.parametrize("kind", ["balanced", "zero", "skewed"])
@pytest.mark.parametrize("N,E,K,bm", [(1, 4, 1, 16), (37, 8, 3, 16), (300, 16, 8, 64)])
def test_moe_align_invariants(N, E, K, bm, kind):
    g = torch.Generator().manual_seed(N * E + K)
    _, idx = routing(N, E, K, kind, g)
    idx = idx.to(device)
    al = moe_align(idx, E, bm)
    flat = idx.reshape(-1).cpu()
    sp, be, start = al.sorted_pair.cpu().long(), al.block_expert.cpu().long(), al.expert_start.cpu().long()
    counts = torch.bincount(flat, minlength=E)
    assert al.counts.cpu().tolist() == counts.tolist()
    assert sorted(sp[sp >= 0].tolist()) == list(range(N * K))  # every pair exactly once
    assert (al.pair_row.cpu().long() == torch.nonzero(sp >= 0).squeeze(1)[sp[sp >= 0].argsort()]).all()
    assert (sp[al.pair_row.cpu().long()] == torch.arange(N * K)).all()  # pair_row inverts sorted_pair
    assert (start.diff() % bm == 0).all() and start[0] == 0
    assert (start.diff() == (counts + bm - 1) // bm * bm).all()  # each expert padded to a multiple of BM
    for e in range(E):
        rows = sp[start[e] : start[e + 1]]
        assert (rows[: counts[e]] >= 0).all() and (rows[counts[e]:] == -1).all()
        assert (flat[rows[: counts[e]]] == e).all()
        assert (rows[: counts[e]].diff() > 0).all()  # stable: token order kept inside an expert
        assert (be[start[e] // bm : start[e + 1] // bm] == e).all()
    assert (be[start[E] // bm :] == -1).all() and (sp[start[E]:] == -1).all()


@pytest.mark.skipif(device != "cuda", reason="CUDA graphs need CUDA")
def test_moe_align_captures_in_a_cuda_graph():
    torch.use_deterministic_algorithms(False)  # the graph test needs no poisoning; the fixture restores the mode
    idx = torch.randint(0, 16, (512, 4), device=device)
    out = moe_align(idx, 16, 64)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_align(idx, 16, 64)
    idx.copy_(torch.randint(0, 16, (512, 4), device=device))
    graph.replay()
    want = moe_align(idx, 16, 64)
    for a, b in zip(out, want):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ experts
CASES = [  # N, D, I, E, K, routing kind
    (37, 40, 24, 5, 2, "balanced"),  # odd N; D and I not multiples of the 32-wide tiles
    (1, 33, 17, 3, 1, "balanced"),  # one token, top-1
    (29, 48, 20, 9, 8, "balanced"),  # top-8
    (31, 40, 24, 8, 3, "zero"),  # experts 4..7 get no token: their weight gradients must be zeros
    (40, 32, 24, 6, 4, "skewed"),  # expert 0 takes every token, the others Zipf-like
    (23, 24, 40, 7, 6, "skewed"),  # I > D
]


def make(N, D, I, E, K, kind, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weights, indices = routing(N, E, K, kind, g)
    x = torch.randn(N, D, generator=g)
    wg = torch.randn(E, I, D, generator=g) / D**0.5
    wu = torch.randn(E, I, D, generator=g) / D**0.5
    wd = torch.randn(E, D, I, generator=g) / I**0.5
    dy = torch.randn(N, D, generator=g)
    leaves = [t.to(device, dtype if t.is_floating_point() and t is not weights else t.dtype)
              for t in (x, weights, wg, wu, wd)]
    return [t.requires_grad_() for t in leaves], indices.to(device), dy.to(device, dtype)


def run(impl, leaves, indices, dy):
    x, weights, wg, wu, wd = leaves
    y, counts = moe_experts(x, weights, indices, wg, wu, wd, impl=impl)
    grads = torch.autograd.grad(y, leaves, dy)
    return y, counts, grads


@pytest.mark.parametrize("case", CASES, ids=[f"N{c[0]}-D{c[1]}-I{c[2]}-E{c[3]}-K{c[4]}-{c[5]}" for c in CASES])
def test_triton_matches_reference_fp32(case):
    leaves, indices, dy = make(*case, torch.float32, seed=sum(case[:5]))
    y, counts, grads = run("triton", leaves, indices, dy)
    y_ref, counts_ref, grads_ref = run("loop", leaves, indices, dy)
    assert torch.equal(counts, counts_ref)
    # float32 operands and accumulation on both sides: only summation order differs (~1e-7 relative)
    assert rel_err(y, y_ref) < 1e-5
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], grads, grads_ref):
        assert a.dtype == b.dtype, name
        assert rel_err(a, b) < 1e-5, name
    with torch.no_grad():  # inference keeps neither g nor u: same kernels, same result
        y_inference, _ = moe_experts(*leaves[:2], indices, *leaves[2:], impl="triton")
    assert rel_err(y_inference, y) < 1e-6
    if case[5] == "zero":
        assert (grads[2][case[3] // 2:] == 0).all() and (grads[4][case[3] // 2:] == 0).all()


def test_no_tokens():
    leaves, indices, dy = make(4, 32, 16, 4, 2, "balanced", torch.float32, seed=0)
    x, weights, wg, wu, wd = leaves
    x0, w0, i0 = x[:0], weights[:0], indices[:0]
    y, counts = moe_experts(x0, w0, i0, wg, wu, wd, impl="triton")
    assert y.shape == (0, 32) and counts.tolist() == [0, 0, 0, 0]
    dwg, dwd = torch.autograd.grad(y, (wg, wd), dy[:0])
    assert (dwg == 0).all() and (dwd == 0).all()


def test_bad_shapes_are_one_line_errors():
    from minids.kernels.moe import moe_experts as moe_experts_triton

    leaves, indices, _ = make(5, 32, 16, 4, 2, "balanced", torch.float32, seed=1)
    x, weights, wg, wu, wd = leaves
    with pytest.raises(ValueError, match="w_down"):
        moe_experts_triton(x, weights, indices, wg, wu, wd.transpose(1, 2))
    with pytest.raises(ValueError, match="impl"):
        moe_experts_triton(x, weights, indices, wg, wu, wd, impl="grouped")


def test_model_switch_accepts_triton():
    from minids.model import Transformer

    model = Transformer("tiny-moe")
    model.set_moe_impl("triton")
    assert {m.impl for m in model.modules() if hasattr(m, "impl") and hasattr(m, "experts")} == {"triton"}


@pytest.mark.skipif(device != "cuda", reason="bf16 is checked on the GPU only (the interpreter does not model it)")
@pytest.mark.parametrize("kind", ["balanced", "skewed"])
def test_triton_bf16_on_gpu(kind):
    # bf16 operands, float32 accumulation, against float32 autograd of the reference on the same bf16 values:
    # bf16 rounding of h, ys and (weights * dy) gives ~3e-3 relative error; the torch._grouped_mm pipeline lands
    # in the same range. 1.5e-2 leaves room for the K-fold sums without admitting a wrong element.
    N, D, I, E, K = 1000, 512, 192, 16, 6
    leaves, indices, dy = make(N, D, I, E, K, kind, torch.bfloat16, seed=3)
    y, counts, grads = run("triton", leaves, indices, dy)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    y_ref, counts_ref, grads_ref = run("loop", ref_leaves, indices, dy.float())
    assert torch.equal(counts, counts_ref)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y_ref) < 1.5e-2
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], grads, grads_ref):
        assert rel_err(a.float(), b) < 1.5e-2, name


@pytest.mark.skipif(device != "cuda", reason="autocast to bf16 is checked on the GPU only")
def test_triton_under_autocast_on_gpu():
    leaves, indices, dy = make(300, 256, 128, 8, 4, "balanced", torch.float32, seed=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, _, grads = run("triton", leaves, indices, dy)
        y_ref, _, grads_ref = run("grouped", leaves, indices, dy)
    assert y.dtype == torch.float32 and rel_err(y, y_ref) < 1.5e-2
    for a, b in zip(grads, grads_ref):
        assert a.dtype == b.dtype and rel_err(a, b) < 1.5e-2


@pytest.mark.skipif(device != "cuda", reason="the side stream exists on CUDA only (on the CPU the layer runs in order)")
def test_shared_experts_on_a_side_stream_change_nothing():
    # DeepSeekMoE on CUDA runs the shared experts on a side stream beside the routed kernels: the same operations
    # on the same inputs. Not bit-equal on the H200 (2.8e-3 relative, bf16 ulps): cuBLAS may take another kernel
    # on another stream's handle. A race (reading NaN-poisoned ys before it is written, or a gradient contribution
    # lost) would be NaN or off by tens of percent.
    import torch.nn.functional as F

    from minids.moe import shared_beside_routed

    leaves, indices, dy = make(1000, 512, 192, 16, 6, "balanced", torch.bfloat16, seed=7)
    g = torch.Generator(device=device).manual_seed(8)
    shared = [(torch.randn(384, 512, device=device, generator=g) / 23).bfloat16().requires_grad_() for _ in range(2)]
    shared.append((torch.randn(512, 384, device=device, generator=g) / 20).bfloat16().requires_grad_())
    x, weights, wg, wu, wd = leaves

    def shared_mlp(t):
        torch.cuda._sleep(5_000_000)  # a few ms of spinning first: the side stream finishes long after the routed
        return F.linear(F.silu(F.linear(t, shared[0])) * F.linear(t, shared[1]), shared[2])  # kernels (joins tested)

    def layer(overlap: bool):
        torch.cuda._sleep(5_000_000)  # the main stream is busy when the layer starts: x below is not ready yet
        xin = x * 1.0  # made on the main stream just before the call (the side stream must wait for it)
        y, ys = shared_beside_routed(
            xin, lambda: moe_experts(xin, weights, indices, wg, wu, wd, impl="triton")[0], shared_mlp,
            overlap=overlap)
        out = y + ys
        return (out, *torch.autograd.grad(out, [*leaves, *shared], dy))

    serial, overlapped = layer(False), layer(True)
    torch.cuda.synchronize()
    for a, b in zip(overlapped, serial):
        assert rel_err(a.float(), b.float()) < 1e-2


def test_shared_beside_routed_on_cpu_runs_in_order():
    from minids.moe import overlap_available, shared_beside_routed

    x = torch.randn(4, 8)
    calls = []
    out = shared_beside_routed(x, lambda: calls.append("routed") or 1, lambda t: calls.append("shared") or t * 2)
    assert not overlap_available(x) and calls == ["routed", "shared"] and out[0] == 1 and torch.equal(out[1], x * 2)


# ------------------------------------------------------------------------------------------------ backward variants
VARIANTS = {  # (WGRAD, DGRAD, BLOCK_M, DX_LOOPS, GATE_UP) of minids.kernels.moe, interpreter-sized tiles (the
    # default is tested above; DX_LOOPS 1 and 2 both appear below whichever is the default)
    "tiles-gather": ({"tile": (32, 32, 16, 1, 1)}, None, None, 1, None),
    "sorted": ({"sorted": True, "tile": (32, 32, 16, 1, 1)}, None, None, 1, None),
    "sorted-fused-persistent": ({"sorted": True, "fuse": True, "programs": 3, "flat": True, "tile": (32, 16, 32, 1, 1)},
                                {"dh": (16, 32, 1, 1, 4), "dx": (32, 16, 1, 1, 1)}, 32, 2, None),
    "gather-fused-persistent": ({"fuse": True, "programs": 2, "tile": (16, 32, 16, 1, 1)}, None, None, 1, None),
    # K = 1.5 blocks per loop in dx; a gate/up launch whose blocks divide neither D nor I
    "dx-two-loops-fixed-gate-up": ({"fuse": True, "tile": (16, 16, 16, 1, 1)},
                                   {"dh": (16, 32, 1, 1, 4), "dx": (16, 16, 1, 1, 4)}, None, 2, (16, 16, 1, 1, 4)),
}
VARIANT_CASES = [CASES[0], CASES[3], CASES[4]]  # uneven rows; experts with zero rows; one expert with most rows


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", VARIANT_CASES, ids=[f"N{c[0]}-E{c[3]}-K{c[4]}-{c[5]}" for c in VARIANT_CASES])
def test_backward_variants_match_reference(case, variant, monkeypatch, launch_spy):
    from minids.kernels import moe as kmoe

    wgrad, dgrad, block_m, dx_loops, gate_up = VARIANTS[variant]
    monkeypatch.setattr(kmoe, "DX_LOOPS", dx_loops)
    monkeypatch.setattr(kmoe, "GATE_UP", gate_up)
    fixed_gate_up = launch_spy(kmoe._gate_up_kernel, "fn")  # the fixed-config launch bypasses the autotuner
    fixed_grouped = launch_spy(kmoe._grouped_kernel, "fn")  # DGRAD's dh and dx launches
    wgrad_launches = launch_spy(kmoe, "_wgrad_tiles_kernel")
    gathers = launch_spy(kmoe, "_gather_rows_kernel")
    monkeypatch.setattr(kmoe, "WGRAD", wgrad)
    monkeypatch.setattr(kmoe, "DGRAD", dgrad)
    monkeypatch.setattr(kmoe, "BLOCK_M", block_m)
    leaves, indices, dy = make(*case, torch.float32, seed=sum(case[:5]) + 1)
    y, _, grads = run("triton", leaves, indices, dy)
    y_ref, _, grads_ref = run("loop", leaves, indices, dy)
    assert rel_err(y, y_ref) < 1e-5
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], grads, grads_ref):
        assert rel_err(a, b) < 1e-5, name
    if case[5] == "zero":
        assert all((gr[case[3] // 2:] == 0).all() for gr in grads[2:]), "experts with no rows get zero gradients"
    assert [c["BN"] for c in fixed_gate_up] == ([gate_up[0]] if gate_up else [])
    # the variant's knobs reached the launches (the values above would agree whichever variant ran)
    assert [c["BN"] for c in fixed_grouped] == ([dgrad["dh"][0], dgrad["dx"][0]] if dgrad else [])
    fused, srt = bool(wgrad.get("fuse")), bool(wgrad.get("sorted"))
    assert [c["TWO"] for c in wgrad_launches] == ([True, False] if fused else [False, False, False])
    assert all(c["FLAT"] == bool(wgrad.get("flat")) for c in wgrad_launches)
    assert wgrad_launches[-1]["A_GATHER"] == (not srt)  # dW_down's (weights * dy): gathered on load or pre-sorted
    assert len(gathers) == (2 if srt else 0)  # (weights * dy) and x, once each into padded-row order


def test_bad_dx_loops_is_one_line(monkeypatch):
    from minids.kernels import moe as kmoe

    monkeypatch.setattr(kmoe, "DX_LOOPS", 3)
    leaves, indices, dy = make(*CASES[0], torch.float32, seed=9)
    with pytest.raises(ValueError, match="DX_LOOPS=3"):
        run("triton", leaves, indices, dy)


@pytest.mark.parametrize("knob, value, match", [
    ("BLOCK_M", 24, "BLOCK_M=24"), ("GATE_UP", (16, 16), "GATE_UP="), ("DGRAD", {"dq": (16, 16, 1, 1, 4)}, "DGRAD="),
    ("WGRAD", {"sorted": True}, "WGRAD="),
])
def test_bad_knobs_are_one_line(knob, value, match, monkeypatch):
    from minids.kernels import moe as kmoe

    monkeypatch.setattr(kmoe, knob, value)
    leaves, indices, dy = make(*CASES[0], torch.float32, seed=9)
    with pytest.raises(ValueError, match=match):
        run("triton", leaves, indices, dy)


def test_gather_rows_pads_with_zeros():
    from minids.kernels.moe import _gather_rows

    g = torch.Generator().manual_seed(5)
    N, K, E, D = 9, 2, 4, 20
    _, idx = routing(N, E, K, "zero", g)
    al = moe_align(idx.to(device), E, 16)
    src = torch.randn(N, D, generator=g).to(device)
    w = torch.rand(N * K, generator=g).to(device)
    sp = al.sorted_pair.long()
    tok = (sp.clamp_min(0) // K)
    want = torch.where((sp >= 0)[:, None], src[tok] * w[sp.clamp_min(0)][:, None], 0.0)
    assert torch.equal(_gather_rows(src, al, w, K), want)
    assert torch.equal(_gather_rows(src, al, None, K), torch.where((sp >= 0)[:, None], src[tok], 0.0))
