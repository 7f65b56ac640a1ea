"""DeepSeekMoE: routing by hand (REFERENCE.md 3.2, 3.4, 7, 8.1), dispatch paths against a per-token
reference (forward and backward), token counts, and the float32 selection bias.

The per-token loops below are the test's own reference; minids itself never loops over tokens.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minids.config import ModelConfig
from minids.moe import DeepSeekMoE, Router, grouped_mm_available, moe_experts, route
from minids.model import Transformer

TOL32 = dict(rtol=1e-5, atol=1e-5)  # fp32 against fp32 / fp64: summation-order rounding of O(1) values

GROUPED = grouped_mm_available(torch.device("cpu"), torch.float32)
needs_grouped = pytest.mark.skipif(
    not GROUPED, reason="torch._grouped_mm does not run on CPU fp32 in this torch build; the loop path is tested"
)
IMPLS = ["loop", pytest.param("grouped", marks=needs_grouped)]


def logit(p: float) -> float:
    """The router logit whose sigmoid is p."""
    return math.log(p / (1 - p))


def sort_by_index(w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each token's (weight, expert) pairs by expert id, so results compare independent of top-k order."""
    idx_s, perm = idx.sort(dim=-1)
    return w.gather(-1, perm), idx_s


# ---------------------------------------------------------------------------------------------- route by hand
def test_softmax_greedy_by_hand():
    # softmax of ln([1, 2, 3, 4]) is [0.1, 0.2, 0.3, 0.4]; top-2 = experts 3, 2; no renormalisation (V2, 3.2)
    logits = torch.tensor([[0.0, math.log(2), math.log(3), math.log(4)],
                           [math.log(4), math.log(3), math.log(2), 0.0]])
    w, idx, s = route(logits, None, top_k=2, scoring_func="softmax", topk_method="greedy", routed_scaling_factor=16.0)
    assert idx.tolist() == [[3, 2], [0, 1]]
    torch.testing.assert_close(w, torch.tensor([[6.4, 4.8], [6.4, 4.8]]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s[0], torch.tensor([0.1, 0.2, 0.3, 0.4]), rtol=1e-6, atol=1e-7)
    assert w.dtype == torch.float32 and idx.dtype == torch.int64


def test_sigmoid_noaux_tc_by_hand():
    # 8 experts in 4 groups of 2; keep 2 groups; K = 4.
    p = [0.9, 0.2, 0.25, 0.3, 0.8, 0.7, 0.05, 0.6]
    # group scores (sum of top-2): g0 1.1, g1 0.55, g2 1.5, g3 0.65 -> keep g2, g0 -> experts {0, 1, 4, 5}
    # (plain top-4 would take expert 7 at 0.6 instead of expert 1 at 0.2)
    logits = torch.tensor([[logit(v) for v in p]])
    w, idx, s = route(logits, torch.zeros(8), top_k=4, scoring_func="sigmoid", topk_method="noaux_tc",
                      n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    w, idx = sort_by_index(w, idx)
    assert idx.tolist() == [[0, 1, 4, 5]]
    chosen = [0.9, 0.2, 0.8, 0.7]
    want = [2.5 * v / sum(chosen) for v in chosen]  # g = 2.5 * s / sum of selected s (V3P eqs. 13-16)
    torch.testing.assert_close(w, torch.tensor([want]), rtol=1e-6, atol=1e-6)
    assert w.sum().item() == pytest.approx(2.5, rel=1e-6)
    torch.testing.assert_close(s, torch.tensor([p]), rtol=1e-6, atol=1e-6)


def test_v3_weights_sum_to_2_5_per_token():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 16, generator=g) * 2
    bias = torch.randn(16, generator=g) * 0.1
    w, idx, _ = route(logits, bias, top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4,
                      topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    torch.testing.assert_close(w.sum(-1), torch.full((300,), 2.5), rtol=1e-6, atol=1e-6)  # REFERENCE.md 7
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts per token


def test_v2_group_limited_greedy_by_hand():
    # 8 experts in 4 groups of 2; group score = MAX (V2); keep 2 groups; K = 3; softmax of ln(p) with sum p = 1.
    p = [0.30, 0.05, 0.13, 0.13, 0.14, 0.01, 0.12, 0.12]
    # group max: g0 .30, g1 .13, g2 .14, g3 .12 -> keep g0, g2 -> experts {0, 1, 4, 5}: top-3 = 0, 4, 1
    # (a top-2-sum group score would keep g1 (0.26) instead of g2 (0.15))
    logits = torch.tensor([[math.log(v) for v in p]])
    w, idx, _ = route(logits, None, top_k=3, scoring_func="softmax", topk_method="group_limited_greedy",
                      n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=16.0)
    assert idx.tolist() == [[0, 4, 1]]
    torch.testing.assert_close(w, torch.tensor([[16 * 0.30, 16 * 0.14, 16 * 0.05]]), rtol=1e-5, atol=1e-6)
    assert w.sum().item() <= 16  # REFERENCE.md 7: V2 weights sum to <= 16


def best_groups(biased: torch.Tensor, n_group: int, topk_group: int, method: str) -> list[set[int]]:
    """Per token, the kept groups, computed with Python sorting from the biased scores."""
    N, E = biased.shape
    per = E // n_group
    out = []
    for t in range(N):
        scores = []
        for gi in range(n_group):
            members = sorted(biased[t, gi * per : (gi + 1) * per].tolist(), reverse=True)
            scores.append(members[0] + members[1] if method == "noaux_tc" else members[0])
        out.append(set(sorted(range(n_group), key=lambda gi: -scores[gi])[:topk_group]))
    return out


@pytest.mark.parametrize("bias_shift", [-1.0, -3.0])
def test_negative_bias_never_picks_a_masked_group(bias_shift):
    # All biased scores are negative: with a 0.0 fill (older transformers, REFERENCE.md 8.1) the masked
    # experts (0.0) would beat every kept one; with -inf they never can.
    g = torch.Generator().manual_seed(1)
    N, E, G, TG, K = 400, 16, 4, 2, 4
    logits = torch.randn(N, E, generator=g) * 2
    bias = bias_shift - torch.rand(E, generator=g)  # in (shift - 1, shift]
    w, idx, s = route(logits, bias, top_k=K, scoring_func="sigmoid", topk_method="noaux_tc", n_group=G,
                      topk_group=TG, norm_topk_prob=True, routed_scaling_factor=2.5)
    biased = torch.sigmoid(logits.double()) + bias.double()
    assert (biased < 0).all()
    kept = best_groups(biased, G, TG, "noaux_tc")
    for t in range(N):
        chosen = idx[t].tolist()
        assert {e // (E // G) for e in chosen} <= kept[t], (t, chosen, kept[t])
        # and inside the kept groups, the K best biased scores
        allowed = [e for e in range(E) if e // (E // G) in kept[t]]
        want = sorted(allowed, key=lambda e: -biased[t, e].item())[:K]
        assert sorted(chosen) == sorted(want)
    torch.testing.assert_close(w.sum(-1), torch.full((N,), 2.5), rtol=1e-6, atol=1e-6)


def test_group_limited_greedy_picks_only_from_kept_groups():
    g = torch.Generator().manual_seed(2)
    N, E, G, TG, K = 300, 16, 4, 2, 3
    logits = torch.randn(N, E, generator=g) * 3
    _, idx, _ = route(logits, None, top_k=K, scoring_func="softmax", topk_method="group_limited_greedy",
                      n_group=G, topk_group=TG)
    kept = best_groups(torch.softmax(logits.double(), -1), G, TG, "group_limited_greedy")
    for t in range(N):
        assert {e // (E // G) for e in idx[t].tolist()} <= kept[t]


# ---------------------------------------------------------------------------------------------- bias: selection only
V3_ROUTE = dict(top_k=4, scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2)


@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0)])
def test_bias_that_keeps_the_selection_keeps_the_weights(norm, scale):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 16, generator=g)
    w0, i0, _ = route(logits, None, **V3_ROUTE, norm_topk_prob=norm, routed_scaling_factor=scale)
    # a constant bias shifts every score and every group's top-2 sum alike: the same choice
    w1, i1, _ = route(logits, torch.full((16,), 0.37), **V3_ROUTE, norm_topk_prob=norm, routed_scaling_factor=scale)
    assert torch.equal(i0, i1)
    assert torch.equal(w0, w1)


@pytest.mark.parametrize("norm,scale", [(True, 2.5), (False, 1.0)])
def test_bias_that_changes_the_selection_gathers_unbiased_scores(norm, scale):
    g = torch.Generator().manual_seed(4)
    N = 64
    logits = torch.randn(N, 16, generator=g)
    _, i0, _ = route(logits, None, **V3_ROUTE, norm_topk_prob=norm, routed_scaling_factor=scale)
    bias = torch.zeros(16)
    bias[[1, 9]] = 10.0  # forces experts 1 and 9 (groups 0 and 2) into every token's selection
    w1, i1, _ = route(logits, bias, **V3_ROUTE, norm_topk_prob=norm, routed_scaling_factor=scale)
    assert ((i1 == 1).any(-1) & (i1 == 9).any(-1)).all()
    assert not torch.equal(i0.sort(-1).values, i1.sort(-1).values)
    s = torch.sigmoid(logits.double())
    picked = s.gather(1, i1)  # the UNBIASED scores at the new indices (V3P 2.1.2)
    want = picked / picked.sum(-1, keepdim=True) * scale if norm else picked * scale
    torch.testing.assert_close(w1.double(), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- dispatch
def naive_experts(x, weights, indices, w_gate, w_up, w_down):
    """sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t), one token and one pick at a time."""
    N, K = indices.shape
    rows = []
    for t in range(N):
        acc = torch.zeros(x.shape[-1], dtype=x.dtype)
        for k in range(K):
            e = indices[t, k].item()
            h = F.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])
            acc = acc + weights[t, k] * (w_down[e] @ h)
        rows.append(acc)
    return torch.stack(rows)


def make_case(N: int, K: int, E: int, D: int, I: int, seed: int, dtype=torch.float32):
    """Random inputs; experts 0 and E-1 receive no token (an empty group at both ends)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    r = torch.rand(N, E, generator=g)
    r[:, 0] = r[:, -1] = -1.0
    indices = r.topk(K, dim=-1).indices  # (N, K), distinct experts, never 0 or E-1
    weights = torch.rand(N, K, generator=g)
    w_gate = torch.randn(E, I, D, generator=g, dtype=dtype) / math.sqrt(D)
    w_up = torch.randn(E, I, D, generator=g, dtype=dtype) / math.sqrt(D)
    w_down = torch.randn(E, D, I, generator=g, dtype=dtype) / math.sqrt(I)
    return x, weights, indices, w_gate, w_up, w_down


def grads_of(fn, tensors, upstream=None):
    """Forward fn on fresh leaf copies; backward of (y * upstream).sum() or y.sum(); returns y and the grads."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    y = fn(*leaves)
    y = y[0] if isinstance(y, tuple) else y
    (y.sum() if upstream is None else (y * upstream).sum()).backward()
    return y.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,K", [(1, 2), (7, 3), (40, 4)])
def test_moe_experts_matches_per_token_reference(impl, N, K):
    E, D, I = 6, 12, 8  # rows of 48 and 32 bytes: torch._grouped_mm needs multiples of 16
    case = make_case(N, K, E, D, I, seed=N)
    g = torch.Generator().manual_seed(99)
    upstream = torch.randn(N, D, generator=g)
    y, grads = grads_of(lambda *a: moe_experts(*a, impl=impl), case, upstream)
    y_ref, grads_ref = grads_of(naive_experts, [t.double() if t.is_floating_point() else t for t in case],
                                upstream.double())
    torch.testing.assert_close(y.double(), y_ref, **TOL32)
    # grads of x, gate weights, and the three expert stacks (indices have none)
    for name, a, b in zip(["x", "weights", "idx", "w_gate", "w_up", "w_down"], grads, grads_ref):
        if name == "idx":
            continue
        torch.testing.assert_close(a.double(), b, **TOL32, msg=lambda m: f"grad of {name}: {m}")
    for name, gw in (("w_gate", grads[3]), ("w_up", grads[4]), ("w_down", grads[5])):
        assert gw[0].abs().max() == 0 and gw[-1].abs().max() == 0, f"{name}: unused experts get zero gradient"


@needs_grouped
@pytest.mark.parametrize("N", [1, 7, 33])
def test_grouped_backward_of_sum_and_equals_loop(N):
    # y.sum() has a zero-stride gradient, which torch._grouped_mm's backward rejects (DESIGN.md pitfalls)
    case = make_case(N, 2, 5, 8, 12, seed=10 + N)
    y_g, grads_g = grads_of(lambda *a: moe_experts(*a, impl="grouped"), case)
    y_l, grads_l = grads_of(lambda *a: moe_experts(*a, impl="loop"), case)
    torch.testing.assert_close(y_g, y_l, **TOL32)
    for i in (0, 1, 3, 4, 5):
        torch.testing.assert_close(grads_g[i], grads_l[i], **TOL32)


@needs_grouped
def test_grouped_linear_backward_of_sum():
    # Through moe_experts the gate-weight product and index_add already make the gradient dense; here the
    # zero-stride gradient of .sum() reaches the grouped GEMM directly (DESIGN.md pitfalls).
    from minids.moe import _grouped_linear

    g = torch.Generator().manual_seed(12)
    x = torch.randn(11, 8, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    offs = torch.tensor([0, 6, 11], dtype=torch.int32)  # expert 0 empty, then 6 and 5 rows
    _grouped_linear(x, w, offs).sum().backward()
    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    torch.cat([xr[:6] @ wr[1].T, xr[6:] @ wr[2].T]).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, **TOL32)
    torch.testing.assert_close(w.grad, wr.grad, **TOL32)


@pytest.mark.parametrize("impl", IMPLS)
def test_moe_experts_bf16(impl):
    case = make_case(9, 2, 4, 16, 8, seed=5, dtype=torch.bfloat16)
    y, counts = moe_experts(*case, impl=impl)
    assert y.dtype == torch.bfloat16
    ref = naive_experts(*[t.double() if t.is_floating_point() else t for t in case])
    assert ((y.double() - ref).norm() / ref.norm()).item() < 2e-2  # bf16 rounding of inputs and products


@pytest.mark.parametrize("impl", IMPLS)
def test_token_counts_are_bincount(impl):
    x, weights, indices, *ws = make_case(23, 3, 7, 8, 4, seed=6)
    _, counts = moe_experts(x, weights, indices, *ws, impl=impl)
    want = [sum(int(e == j) for e in indices.flatten().tolist()) for j in range(7)]
    assert counts.tolist() == want and counts.dtype == torch.int64
    assert counts[0] == 0 and counts[-1] == 0 and counts.sum() == 23 * 3


@pytest.mark.parametrize("D,I", [(12, 10), (10, 8), (7, 5)])
def test_auto_falls_back_to_loop_when_rows_are_not_16_byte_aligned(D, I):
    # a valid config may have any width (e.g. moe_intermediate_size 10); torch._grouped_mm wants 16-byte rows
    case = make_case(7, 2, 4, D, I, seed=8)
    y, _ = moe_experts(*case, impl="auto")
    ref = naive_experts(*[t.double() if t.is_floating_point() else t for t in case])
    torch.testing.assert_close(y.double(), ref, **TOL32)
    if GROUPED:
        with pytest.raises(ValueError, match="impl='loop'"):
            moe_experts(*case, impl="grouped")


def test_bad_impl_is_refused():
    with pytest.raises(ValueError, match="impl"):
        moe_experts(*make_case(3, 2, 4, 8, 4, seed=7), impl="fast")


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_mismatched_shapes_are_one_line_errors(impl):
    x, w, idx, wg, wu, wd = make_case(3, 2, 4, 8, 4, seed=7)
    with pytest.raises(ValueError, match="w_down"):
        moe_experts(x, w, idx, wg, wu, wd.transpose(1, 2), impl=impl)
    with pytest.raises(ValueError, match="indices"):
        moe_experts(x, w, idx[:2], wg, wu, wd, impl=impl)


# ---------------------------------------------------------------------------------------------- the module
def moe_cfg(**over) -> ModelConfig:
    return ModelConfig.from_dict({**ModelConfig.load("tiny-v3").to_dict(), "num_hidden_layers": 2,
                                  "hidden_size": 32, "moe_intermediate_size": 16, "n_shared_experts": 2, **over})


def init_moe(m: DeepSeekMoE, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
        if m.gate.e_score_correction_bias is not None:
            m.gate.e_score_correction_bias.copy_(torch.randn(m.gate.e_score_correction_bias.shape, generator=g) * 0.1)


def naive_moe(m: DeepSeekMoE, x: torch.Tensor) -> torch.Tensor:
    """Shared experts (one SwiGLU of width N_s * I_e) + the per-token routed sum, in float64."""
    xs = x.reshape(-1, x.shape[-1])
    weights, indices, _ = m.gate(xs)
    e = m.experts
    routed = naive_experts(xs.double(), weights.double(), indices, e.gate_proj.double(), e.up_proj.double(),
                           e.down_proj.double())
    sh = m.shared_experts
    shared = F.silu(xs.double() @ sh.gate_proj.weight.double().T) * (xs.double() @ sh.up_proj.weight.double().T)
    shared = shared @ sh.down_proj.weight.double().T
    return (routed + shared).view(x.shape)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,S", [(1, 1), (1, 7), (2, 16)])
def test_deepseek_moe_module_matches_reference(impl, B, S):
    cfg = moe_cfg()
    m = DeepSeekMoE(cfg)
    assert m.shared_experts.gate_proj.weight.shape == (cfg.n_shared_experts * cfg.moe_intermediate_size, 32)
    init_moe(m, seed=B * 100 + S)
    m.impl = impl
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, S, 32, generator=g)
    upstream = torch.randn(B, S, 32, generator=g)

    def run(fn):
        m.zero_grad()
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        y = y[0] if isinstance(y, tuple) else y
        (y * upstream.to(y.dtype)).sum().backward()
        return y.detach(), xx.grad, {n: p.grad.clone() for n, p in m.named_parameters()}

    y, gx, gp = run(m)
    y_ref, gx_ref, gp_ref = run(lambda xx: naive_moe(m, xx))
    torch.testing.assert_close(y.double(), y_ref, **TOL32)
    torch.testing.assert_close(gx.double(), gx_ref.double(), **TOL32)
    for n in gp:
        torch.testing.assert_close(gp[n], gp_ref[n].to(gp[n].dtype), **TOL32, msg=lambda s: f"{n}: {s}")
    _, routing = m(x)
    _, idx, scores = m.gate(x.reshape(-1, 32))
    assert routing.counts.tolist() == torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts).tolist()
    assert torch.equal(routing.indices, idx) and torch.equal(routing.scores, scores) and routing.shape == (B, S)


# ---------------------------------------------------------------------------------------------- the bias buffer
def test_router_bias_is_a_float32_buffer_whatever_the_model_dtype():
    cfg = moe_cfg()
    r = Router(cfg)
    assert "e_score_correction_bias" in dict(r.named_buffers())
    assert "e_score_correction_bias" not in dict(r.named_parameters())
    assert r.e_score_correction_bias.dtype == torch.float32
    for dtype in (torch.bfloat16, torch.float64, torch.float16, torch.float32):
        r.to(dtype)
        assert r.weight.dtype == dtype
        assert r.e_score_correction_bias.dtype == torch.float32, dtype
    r.double()
    assert r.e_score_correction_bias.dtype == torch.float32
    r.to("meta")
    assert r.e_score_correction_bias.is_meta and r.e_score_correction_bias.dtype == torch.float32
    r.to_empty(device="cpu")
    assert r.e_score_correction_bias.device.type == "cpu" and r.e_score_correction_bias.dtype == torch.float32


def test_model_to_bf16_keeps_bias_float32_and_values():
    cfg = moe_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    biases = [m.e_score_correction_bias for m in model.modules() if isinstance(m, Router)]
    assert len(biases) == cfg.num_moe_layers + cfg.num_nextn_predict_layers
    with torch.no_grad():
        for i, b in enumerate(biases):
            b.copy_(torch.linspace(-1, 1, b.numel()) * (i + 1) + 1e-4)  # values bf16 cannot hold exactly
    want = [b.clone() for b in biases]
    model.to(torch.bfloat16)
    got = [m.e_score_correction_bias for m in model.modules() if isinstance(m, Router)]
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert torch.equal(a, b)  # not round-tripped through bf16
    sd = model.state_dict()
    keys = [k for k in sd if k.endswith("e_score_correction_bias")]
    assert keys and all(sd[k].dtype == torch.float32 for k in keys)
    assert any(k.startswith("model.layers.1.mlp.gate.") for k in keys)


def test_router_stays_float32_inside_bf16_autocast():
    cfg = ModelConfig.load("tiny-v3")
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, 0, 0.05)
    x = torch.randn(64, cfg.hidden_size)
    ref_w, ref_i, ref_s = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, i, s = router(x)
    assert s.dtype == torch.float32 and torch.equal(i, ref_i) and torch.equal(w, ref_w) and torch.equal(s, ref_s)
