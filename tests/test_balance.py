"""Load balancing (REFERENCE.md 3.3-3.6, REFERENCE-2 A4): the bias update rules, the BiasBalancer hook end
to end (training-mode counts, MTP layer, gradient accumulation, data-parallel all-reduce), the V2/V3 balance
losses and MaxVio, each against hand computations on small explicit tensors.

The expected values are written out here (numbers, Fractions, explicit loops), never taken from minids.balance.
"""

from __future__ import annotations

import time
from datetime import timedelta
from fractions import Fraction as Fr

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minids.balance import (
    BiasBalancer, comm_balance_loss, device_balance_loss, expert_balance_loss, max_vio, recipe_balance,
    sequence_balance_loss, update_bias,
)
from minids.config import ModelConfig
from minids.model import Transformer
from minids.moe import Router, route

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny tensors: intra-op threads only add overhead, and spin badly when the CPU is shared
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


G = 0.125  # a power of two: b +- G is exact in float32, so the sign rule is checked bitwise


def cfg_of(name: str, **over) -> ModelConfig:
    return ModelConfig.from_dict({**ModelConfig.load(name).to_dict(), **over})


def tiny_v3() -> ModelConfig:
    # layer 0 dense, layer 1 MoE, plus the MoE MTP layer: two routers with a selection bias
    return cfg_of("tiny-v3", num_hidden_layers=2)


def ids_of(cfg: ModelConfig, B: int, S: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (B, S), generator=g)


def sign_rule(bias: list[float], counts: list[float], gamma: float) -> list[float]:
    """b_i + gamma * sign(mean - c_i), written with comparisons (ALF Algorithm 1, V3P 2.1.2)."""
    mean = sum(counts) / len(counts)
    return [b + (gamma if c < mean else -gamma if c > mean else 0.0) for b, c in zip(bias, counts)]


def sign_rule_f32(bias: torch.Tensor, counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """The sign rule in float32 arithmetic, elementwise from Python comparisons (bitwise reference)."""
    c = [float(v) for v in counts.tolist()]
    mean = sum(c) / len(c)
    step = torch.tensor([1.0 if v < mean else -1.0 if v > mean else 0.0 for v in c]) * torch.tensor(gamma)
    return bias + step


def routers_of(model: torch.nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


def biases_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [r.e_score_correction_bias.clone() for r in routers_of(model)]


# ---------------------------------------------------------------------------------------------- update rules
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_sign_rule_moves_each_bias_against_its_load_by_exactly_gamma(dtype):
    # mean load 4: expert 0 overloaded (6), expert 1 underloaded (2), experts 2 and 3 exactly at the mean
    bias = torch.tensor([0.5, -0.25, 0.0, 1.0])
    update_bias(bias, torch.tensor([6, 2, 4, 4], dtype=dtype), G, "sign")
    assert torch.equal(bias, torch.tensor([0.375, -0.125, 0.0, 1.0]))
    assert bias.dtype == torch.float32
    # the step does not depend on how far from the mean a load is, only on its side
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([100, 0, 1, 99], dtype=dtype), G)  # default rule: sign; mean 50
    assert torch.equal(bias, torch.tensor([-G, G, G, -G]))


def test_sign_rule_with_v3_gamma():
    bias = torch.zeros(8)
    counts = torch.tensor([9.0, 1, 3, 3, 5, 3, 3, 5])  # mean 4
    update_bias(bias, counts, 1e-3, "sign")
    want = torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3, -1e-3, 1e-3, 1e-3, -1e-3])
    assert torch.equal(bias, want)  # 0 +- float32(1e-3) is exact


def test_mean_centred_rule_keeps_mean_zero_and_sign_rule_differences():
    steps = [
        torch.tensor([7, 1, 2, 2]),  # mean 3: one over, three under
        torch.tensor([1, 5, 3, 3]),  # mean 3: one under, one over, two at the mean
        torch.tensor([4, 4, 4, 0]),  # mean 3: three over, one under
    ]
    # hand: step 1 sign = [-1, 1, 1, 1] -> [-G, G, G, G], mean G/2 -> [-1.5G, .5G, .5G, .5G]
    #       step 2 sign = [1, -1, 0, 0] -> [-.5G, -.5G, .5G, .5G], mean 0 -> unchanged
    #       step 3 sign = [-1, -1, -1, 1] -> [-1.5G, -1.5G, -.5G, 1.5G], mean -.5G -> [-G, -G, 0, 2G]
    want = [[-1.5 * G, 0.5 * G, 0.5 * G, 0.5 * G], [-0.5 * G, -0.5 * G, 0.5 * G, 0.5 * G], [-G, -G, 0.0, 2 * G]]
    centred, plain, ref_plain = torch.zeros(4), torch.zeros(4), [0.0] * 4
    for counts, w in zip(steps, want):
        update_bias(centred, counts, G, "mean_centred")
        update_bias(plain, counts, G, "sign")
        ref_plain = sign_rule(ref_plain, [float(c) for c in counts], G)
        assert torch.equal(centred, torch.tensor(w))
        assert centred.mean().item() == 0.0
        assert torch.equal(plain, torch.tensor(ref_plain))
        # same differences between experts as the sign rule: a constant shift selects the same experts
        d_centred = centred[:, None] - centred[None, :]
        d_plain = torch.tensor(ref_plain)[:, None] - torch.tensor(ref_plain)[None, :]
        assert torch.equal(d_centred, d_plain)


def test_mean_centred_from_an_uncentred_bias():
    bias = torch.tensor([1.0, 0.0, 0.5, 0.5])  # mean 0.5
    update_bias(bias, torch.tensor([3, 3, 3, 3]), G, "mean_centred")  # balanced: only the centring acts
    assert torch.equal(bias, torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_error_rule_by_hand():
    bias = torch.zeros(4)
    update_bias(bias, torch.tensor([6, 2, 4, 4]), G, "error")  # (mean - c) / mean = [-.5, .5, 0, 0]
    assert torch.equal(bias, torch.tensor([-G / 2, G / 2, 0.0, 0.0]))
    bias = torch.tensor([0.01, 0.0, -0.01, 0.0])
    update_bias(bias, torch.tensor([7, 1, 2, 2]), 1e-3, "error")  # mean 3: errors [-4, 2, 1, 1] / 3
    want = torch.tensor([0.01 - 4e-3 / 3, 2e-3 / 3, -0.01 + 1e-3 / 3, 1e-3 / 3])
    torch.testing.assert_close(bias, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("rule", ["sign", "mean_centred", "error"])
def test_no_tokens_no_change(rule):
    bias = torch.tensor([0.5, -0.5, 0.25, -0.25])
    update_bias(bias, torch.zeros(4), G, rule)
    assert torch.equal(bias, torch.tensor([0.5, -0.5, 0.25, -0.25]))


def test_unknown_rule_is_refused_by_name():
    with pytest.raises(ValueError, match="'bogus'"):
        update_bias(torch.zeros(4), torch.tensor([1, 2, 3, 4]), G, "bogus")
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="'signum'"):
        BiasBalancer(Transformer(tiny_v3()), rule="signum")


# ---------------------------------------------------------------------------------------------- bias vs weights
@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_router_bias_that_keeps_the_selection_keeps_the_weights(scoring):
    cfg = cfg_of("tiny-v3", scoring_func=scoring, norm_topk_prob=scoring == "sigmoid")
    router = Router(cfg)
    g = torch.Generator().manual_seed(3)
    torch.nn.init.normal_(router.weight, 0.0, 0.2, generator=g)
    x = torch.randn(64, cfg.hidden_size, generator=g)
    w0, i0, s0 = router(x)

    def by_index(w, i):
        i_s, perm = i.sort(dim=-1)
        return w.gather(-1, perm), i_s

    # a constant bias (same shift for every expert) and a small non-constant one, both keeping every
    # token's choice (checked below as a precondition)
    e = torch.arange(cfg.n_routed_experts, dtype=torch.float32)
    eps = 1e-4
    for bias in (torch.full_like(e, 0.75), eps * torch.cos(e)):  # a constant shift, then a non-constant one
        router.e_score_correction_bias.copy_(bias)
        w1, i1, s1 = router(x)
        assert torch.equal(i1.sort(-1).values, i0.sort(-1).values)  # precondition: the same choices
        assert torch.equal(by_index(w1, i1)[0], by_index(w0, i0)[0])  # bitwise: the bias never enters the gate weight
        assert torch.equal(s1, s0)  # nor the scores the balance losses see


@pytest.mark.parametrize("scoring", ["sigmoid", "softmax"])
def test_route_bias_changes_selection_not_weight_by_hand(scoring):
    # scores [0.4, 0.3, 0.2, 0.1] (softmax of their logs; sigmoid of their logits); K = 2, greedy top-2
    p = [0.4, 0.3, 0.2, 0.1]
    logits = torch.tensor([[(v / (1 - v)) for v in p]]).log() if scoring == "sigmoid" else torch.tensor([p]).log()
    kw = dict(top_k=2, scoring_func=scoring, topk_method="noaux_tc", n_group=1, topk_group=1,
              norm_topk_prob=False, routed_scaling_factor=1.0)
    w, i, _ = route(logits, torch.zeros(4), **kw)
    assert i.tolist() == [[0, 1]]
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.3]]), rtol=1e-6, atol=1e-7)
    w2, i2, _ = route(logits, torch.tensor([0.05, -0.05, 0.02, 0.0]), **kw)  # biased 0.45, 0.25, 0.22, 0.1
    assert i2.tolist() == [[0, 1]] and torch.equal(w2, w)
    w3, i3, _ = route(logits, torch.tensor([0.0, -0.2, 0.0, 0.5]), **kw)  # biased 0.4, 0.1, 0.2, 0.6
    assert i3.tolist() == [[3, 0]]
    torch.testing.assert_close(w3, torch.tensor([[0.1, 0.4]]), rtol=1e-6, atol=1e-7)  # unbiased s of 3 and 0


# ---------------------------------------------------------------------------------------------- BiasBalancer
def test_balancer_counts_only_training_forwards_and_match_expert_counts():
    torch.manual_seed(0)
    cfg = tiny_v3()
    model = Transformer(cfg)
    bal = BiasBalancer(model, gamma=G)
    routers = routers_of(model)
    assert bal.routers == routers and len(routers) == 2  # layers.1.mlp.gate, then mtp.0.mlp.gate (module order)
    assert routers[0] is model.model.layers[1].mlp.gate and routers[1] is model.mtp[0].mlp.gate
    B, S, E, K = 2, 12, cfg.n_routed_experts, cfg.num_experts_per_tok

    model.eval()
    out = model(ids_of(cfg, B, S, 1), labels=ids_of(cfg, B, S, 1))
    assert out.aux["expert_counts"].shape == (2, E)
    assert all(torch.equal(r.load_counts, torch.zeros(E)) for r in routers)  # eval: nothing counted
    assert bal.step() is None  # no tokens: no update
    assert all(torch.equal(b, torch.zeros(E)) for b in biases_of(model))

    model.train()
    total = torch.zeros(2, E)
    for seed in (2, 3):  # two training forwards accumulate
        ids = ids_of(cfg, B, S, seed)
        counts = model(ids, labels=ids).aux["expert_counts"].float()  # (main layer, MTP layer)
        assert counts[0].sum() == K * B * S and counts[1].sum() == K * B * (S - 1)  # MTP sees S-1 positions
        total += counts
    with torch.no_grad():  # an eval forward in between changes nothing
        model.eval()
        model(ids_of(cfg, B, S, 4), labels=ids_of(cfg, B, S, 4))
        model.train()
    for r, c in zip(routers, total):
        assert r.load_counts.dtype == torch.float32
        assert torch.equal(r.load_counts, c)

    vio = bal.step()
    for r, c in zip(routers, total):
        want = sign_rule([0.0] * E, c.tolist(), G)
        assert torch.equal(r.e_score_correction_bias, torch.tensor(want))
        assert set(r.e_score_correction_bias.tolist()) <= {-G, 0.0, G}
        assert torch.equal(r.load_counts, torch.zeros(E))  # cleared
    # MaxVio per layer: (max - mean) / mean with mean = K T / E the balanced load
    T = [2 * B * S, 2 * B * (S - 1)]
    want_vio = [(max(c.tolist()) - K * t / E) / (K * t / E) for c, t in zip(total, T)]
    assert vio.shape == (2,)
    torch.testing.assert_close(vio, torch.tensor(want_vio), rtol=1e-6, atol=0)
    assert (vio > 0).all()  # a random-init router is not perfectly balanced: the update above was not empty

    # gamma = 0 (V3's last 500B tokens): counts are cleared, biases stay
    before = biases_of(model)
    ids = ids_of(cfg, B, S, 5)
    model(ids, labels=ids)
    assert bal.step(gamma=0.0) is not None
    assert all(torch.equal(a, b) for a, b in zip(before, biases_of(model)))
    assert all(torch.equal(r.load_counts, torch.zeros(E)) for r in routers)


def test_balancer_second_step_starts_from_the_current_bias():
    torch.manual_seed(0)
    cfg = tiny_v3()
    model = Transformer(cfg)
    bal = BiasBalancer(model, gamma=G, rule="sign")
    start = [torch.linspace(-0.3, 0.3, cfg.n_routed_experts), torch.linspace(0.2, -0.2, cfg.n_routed_experts)]
    for r, b in zip(routers_of(model), start):
        r.e_score_correction_bias.copy_(b)
    ids = ids_of(cfg, 2, 10, 7)
    counts = model(ids, labels=ids).aux["expert_counts"]
    bal.step()
    for r, b, c in zip(routers_of(model), start, counts):
        assert torch.equal(r.e_score_correction_bias, sign_rule_f32(b, c, G))


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny_v3()
    B, S = 4, 12
    batches = [ids_of(cfg, B, S, 11), ids_of(cfg, B, S, 12)]  # two optimizer steps' worth of data

    def run(micro: int) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = Transformer(cfg).train()
        bal = BiasBalancer(model, gamma=G)
        biases, counts = [], []
        for ids in batches:
            for mb in ids.chunk(micro):  # forward + backward per micro-batch, no optimizer step
                model(mb, labels=mb).loss.backward()
            counts.append(torch.stack([r.load_counts.clone() for r in bal.routers]))
            bal.step()
            biases.append(biases_of(model))
        return biases, counts

    (b_acc, c_acc), (b_one, c_one) = run(2), run(1)
    for step in range(2):
        assert torch.equal(c_acc[step], c_one[step])
        for a, b in zip(b_acc[step], b_one[step]):
            assert torch.equal(a, b)  # bitwise
    assert any(b.abs().sum() > 0 for b in b_one[1])
    # the second step routed with a non-zero bias, and the two steps' counts differ
    assert not torch.equal(c_one[0], c_one[1])


# ---------------------------------------------------------------------------------------------- data parallel
def _dp_worker(rank: int, world: int, init: str, out_dir: str, cfg_dict: dict, batches: list) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_dict(cfg_dict)).train()
        bal = BiasBalancer(model, gamma=G)
        ids = batches[rank]
        model(ids, labels=ids).loss.backward()
        local = torch.stack([r.load_counts.clone() for r in bal.routers])
        vio = bal.step()
        torch.save(
            {"local": local, "bias": [r.e_score_correction_bias.clone() for r in bal.routers], "vio": vio,
             "after": torch.stack([r.load_counts.clone() for r in bal.routers])},
            f"{out_dir}/rank{rank}.pt",
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_counts_are_all_reduced_across_data_parallel_ranks(tmp_path):
    cfg = tiny_v3()
    B, S = 2, 12
    batches = [ids_of(cfg, B, S, 21), ids_of(cfg, B, S, 22)]
    init = f"file://{tmp_path}/rendezvous"
    ctx = mp.start_processes(_dp_worker, args=(2, init, str(tmp_path), cfg.to_dict(), batches), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail("data-parallel workers did not finish within 90 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    # each rank counted only its own batch: check against a single process forwarding that batch
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    for r in range(2):
        ids = batches[r]
        want = model(ids, labels=ids).aux["expert_counts"].float()
        assert torch.equal(res[r]["local"], want)
    assert not torch.equal(res[0]["local"], res[1]["local"])
    total = res[0]["local"] + res[1]["local"]  # (layers, E)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok

    for layer in range(2):
        want = torch.tensor(sign_rule([0.0] * E, total[layer].tolist(), G))  # the update of the summed counts
        for r in range(2):
            assert torch.equal(res[r]["bias"][layer], want)
        # not vacuous: some rank's own counts alone would have given a different update
        assert any(
            not torch.equal(torch.tensor(sign_rule([0.0] * E, res[r]["local"][layer].tolist(), G)), want)
            for r in range(2)
        )
    T = [2 * B * S, 2 * B * (S - 1)]  # tokens over both ranks, main layer and MTP layer
    want_vio = torch.tensor([(max(total[i].tolist()) - K * T[i] / E) / (K * T[i] / E) for i in range(2)])
    for r in range(2):
        torch.testing.assert_close(res[r]["vio"], want_vio, rtol=1e-6, atol=0)
        assert torch.equal(res[r]["after"], torch.zeros(2, E))

    # and the same as one process stepping on the concatenated batch
    torch.manual_seed(0)
    single = Transformer(cfg).train()
    bal = BiasBalancer(single, gamma=G)
    ids = torch.cat(batches)
    single(ids, labels=ids).loss.backward()
    bal.step()
    for layer, r in enumerate(bal.routers):
        assert torch.equal(r.e_score_correction_bias, res[0]["bias"][layer])


# ---------------------------------------------------------------------------------------------- balance losses
# B = 2 sequences of S = 3 tokens, E = 4 experts in n_group = 2 contiguous groups {0, 1}, {2, 3}, K = 2.
SCORES = [
    ["0.8", "0.4", "0.2", "0.6"],  # sequence 0
    ["0.1", "0.5", "0.9", "0.5"],
    ["0.6", "0.2", "0.1", "0.1"],
    ["0.5", "0.5", "0.5", "0.5"],  # sequence 1
    ["0.9", "0.1", "0.6", "0.4"],
    ["0.2", "0.7", "0.4", "0.7"],
]
INDICES = [[0, 3], [2, 1], [0, 3], [2, 3], [0, 2], [1, 3]]
B_, S_, E_, K_ = 2, 3, 4, 2


def _inputs() -> tuple[torch.Tensor, torch.Tensor, list[list[Fr]]]:
    s = [[Fr(v) for v in row] for row in SCORES]
    return torch.tensor([[float(v) for v in row] for row in SCORES]), torch.tensor(INDICES), s


def _f_and_p(s: list[list[Fr]], idx: list[list[int]], B: int, S: int, normalise: bool):
    """Per sequence: f_i = E/(K T) * #tokens choosing i, P_i = (1/T) sum_t s_it (s normalised over all E or raw)."""
    E, K = len(s[0]), len(idx[0])
    fs, ps = [], []
    for b in range(B):
        toks = range(b * S, (b + 1) * S)
        f = [Fr(E, K * S) * sum(1 for t in toks if i in idx[t]) for i in range(E)]
        p = [sum((s[t][i] / sum(s[t]) if normalise else s[t][i]) for t in toks) / S for i in range(E)]
        fs.append(f)
        ps.append(p)
    return fs, ps


def test_hand_numbers_of_the_example():
    # the Fraction helpers reproduce the numbers worked out on paper:
    _, _, s = _inputs()
    fs, ps = _f_and_p(s, INDICES, B_, S_, normalise=True)
    assert fs == [[Fr(4, 3), Fr(2, 3), Fr(2, 3), Fr(4, 3)], [Fr(2, 3), Fr(2, 3), Fr(4, 3), Fr(4, 3)]]
    assert ps[0] == [Fr(105, 300), Fr(65, 300), Fr(65, 300), Fr(65, 300)]  # normalised rows: t0 /2, t1 /2, t2 /1
    assert ps[1] == [Fr(80, 300), Fr(65, 300), Fr(75, 300), Fr(80, 300)]


def test_sequence_balance_loss_by_hand():
    # seq 0: (4*1.05 + 2*.65 + 2*.65 + 4*.65) / 9 = 9.4/9; seq 1: (2*.8 + 2*.65 + 4*.75 + 4*.8) / 9 = 9.1/9
    scores, idx, s = _inputs()
    want = (Fr(94, 90) + Fr(91, 90)) / 2  # = 37/36
    fs, ps = _f_and_p(s, INDICES, B_, S_, normalise=True)
    assert sum(sum(f * p for f, p in zip(fr, pr)) for fr, pr in zip(fs, ps)) / B_ == want
    got = sequence_balance_loss(scores, idx, (B_, S_))
    assert got.shape == () and got.item() == pytest.approx(float(want), rel=1e-6)
    # normalisation over all experts: scaling a token's scores changes nothing
    scaled = scores.clone()
    scaled[1] *= 3.0
    assert sequence_balance_loss(scaled, idx, (B_, S_)).item() == pytest.approx(float(want), rel=1e-6)


def test_expert_balance_loss_per_sequence_and_batch_by_hand():
    scores, idx, s = _inputs()
    # per sequence, raw scores: seq 0 P = [1.5, 1.1, 1.2, 1.2]/3 -> (4*1.5 + 2*1.1 + 2*1.2 + 4*1.2)/9 = 15.4/9;
    # seq 1 P = [1.6, 1.3, 1.5, 1.6]/3 -> (2*1.6 + 2*1.3 + 4*1.5 + 4*1.6)/9 = 18.2/9
    want_seq = (Fr(154, 90) + Fr(182, 90)) / 2
    fs, ps = _f_and_p(s, INDICES, B_, S_, normalise=False)
    assert sum(sum(f * p for f, p in zip(fr, pr)) for fr, pr in zip(fs, ps)) / B_ == want_seq
    got = expert_balance_loss(scores, idx, (B_, S_), per_sequence=True)
    assert got.item() == pytest.approx(float(want_seq), rel=1e-6)
    # batch-wise, T = 6: experts chosen [3, 2, 3, 4] times -> f = 4/(2*6) * count = [1, 2/3, 1, 4/3];
    # P = [3.1, 2.4, 2.7, 2.8]/6 -> (3*3.1 + 2*2.4 + 3*2.7 + 4*2.8)/18 = 33.4/18
    want_batch = Fr(334, 180)
    fb, pb = _f_and_p(s, INDICES, 1, B_ * S_, normalise=False)
    assert fb == [[Fr(1), Fr(2, 3), Fr(1), Fr(4, 3)]] and sum(f * p for f, p in zip(fb[0], pb[0])) == want_batch
    got = expert_balance_loss(scores, idx, (B_, S_), per_sequence=False)
    assert got.item() == pytest.approx(float(want_batch), rel=1e-6)
    assert want_batch != want_seq  # the example tells the two apart


def test_device_balance_loss_by_hand():
    scores, idx, s = _inputs()
    # seq 0: f = [4/3, 2/3 | 2/3, 4/3] -> f' = [1, 1]; P' = [(1.5+1.1)/3, (1.2+1.2)/3] -> (2.6 + 2.4)/3 = 5/3
    # seq 1: f = [2/3, 2/3 | 4/3, 4/3] -> f' = [2/3, 4/3]; P' = [2.9/3, 3.1/3] -> (5.8 + 12.4)/9 = 18.2/9
    want = (Fr(5, 3) + Fr(182, 90)) / 2
    fs, ps = _f_and_p(s, INDICES, B_, S_, normalise=False)
    ref = []
    for f, p in zip(fs, ps):
        fd = [(f[0] + f[1]) / 2, (f[2] + f[3]) / 2]
        pd = [p[0] + p[1], p[2] + p[3]]
        ref.append(fd[0] * pd[0] + fd[1] * pd[1])
    assert sum(ref) / B_ == want
    got = device_balance_loss(scores, idx, (B_, S_), n_group=2)
    assert got.item() == pytest.approx(float(want), rel=1e-6)


@pytest.mark.parametrize("M", [1, 2])
def test_comm_balance_loss_by_hand(M):
    scores, idx, s = _inputs()
    # devices a token sends to: seq 0 {0,1}, {1,0}, {0,1} -> [3, 3]; seq 1 {1}, {0,1}, {0,1} -> [2, 3]
    # f''_d = D/(M T) * count = 2/(3M) * count; P'' = sums of raw P over each group as in the device loss
    sends = [[3, 3], [2, 3]]
    P = [[Fr(26, 30), Fr(24, 30)], [Fr(29, 30), Fr(31, 30)]]
    want = sum(sum(Fr(2, 3 * M) * c * p for c, p in zip(sends[b], P[b])) for b in range(2)) / 2
    ref_sends = [[sum(1 for t in range(b * 3, b * 3 + 3) if any(i // 2 == d for i in INDICES[t])) for d in range(2)]
                 for b in range(2)]
    assert ref_sends == sends
    got = comm_balance_loss(scores, idx, (B_, S_), n_group=2, topk_group=M)
    assert got.item() == pytest.approx(float(want), rel=1e-6)


def test_losses_are_differentiable_in_the_scores_only():
    scores, idx, _ = _inputs()
    scores.requires_grad_(True)
    loss = sequence_balance_loss(scores, idx, (B_, S_))
    (g,) = torch.autograd.grad(loss, scores)
    # d/ds_{t,i} of (1/B) sum_j f_j (1/T) s_{t,j} / sum_k s_{t,k} = (f_i - sum_j f_j s'_{t,j}) / (B T sum_k s_{t,k})
    _, _, s = _inputs()
    fs, _ = _f_and_p(s, INDICES, B_, S_, normalise=True)
    for t in range(6):
        f = fs[t // 3]
        z = sum(s[t])
        fbar = sum(fj * sj / z for fj, sj in zip(f, s[t]))
        for i in range(4):
            assert g[t, i].item() == pytest.approx(float((f[i] - fbar) / (B_ * S_ * z)), rel=1e-5, abs=1e-7)


def _hand_sequence_loss(scores: torch.Tensor, indices: torch.Tensor, B: int, S: int) -> torch.Tensor:
    """V3 eqs. 17-20 with explicit loops over sequences and experts (float64)."""
    s = scores.double()
    s = s / s.sum(-1, keepdim=True)
    E, K = s.shape[-1], indices.shape[-1]
    total = s.new_zeros(())
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        for i in range(E):
            f = E / (K * S) * int((indices[rows] == i).any(-1).sum())
            total = total + f * s[rows, i].mean()
    return total / B


def test_model_adds_the_sequence_loss_and_it_reaches_the_router():
    torch.manual_seed(0)
    cfg = tiny_v3()
    model = Transformer(cfg).train()
    for r in routers_of(model):  # a non-zero bias: the loss counts the experts actually selected
        r.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, cfg.n_routed_experts))
    captured = []
    hooks = [r.register_forward_hook(lambda m, i, o: captured.append(o)) for r in routers_of(model)]
    B, S, alpha = 2, 10, 1e-4
    ids = ids_of(cfg, B, S, 31)
    out = model(ids, labels=ids, balance={"sequence": alpha})
    for h in hooks:
        h.remove()
    assert set(out.aux) >= {"lm_loss", "mtp_loss", "balance_sequence", "expert_counts"}
    assert len(captured) == 2  # main MoE layer (T = S), MTP layer (T = S - 1)
    want = alpha * (_hand_sequence_loss(captured[0][2].detach(), captured[0][1], B, S)
                    + _hand_sequence_loss(captured[1][2].detach(), captured[1][1], B, S - 1))
    torch.testing.assert_close(out.aux["balance_sequence"].double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, out.aux["lm_loss"] + 0.3 * out.aux["mtp_loss"] + out.aux["balance_sequence"],
                               rtol=1e-6, atol=1e-7)
    # the balance term alone has a gradient on each router weight, and none on its bias
    weights = [r.weight for r in routers_of(model)]
    grads = torch.autograd.grad(out.aux["balance_sequence"], weights)
    assert all(g is not None and g.abs().max() > 0 for g in grads)
    assert all(not r.e_score_correction_bias.requires_grad for r in routers_of(model))
    # a zero alpha adds nothing
    out0 = model(ids, labels=ids, balance={"sequence": 0.0})
    assert "balance_sequence" not in out0.aux


@pytest.mark.parametrize("name", ["sequence", "expert", "batch", "device", "comm"])
def test_every_named_loss_is_added_by_the_model(name):
    torch.manual_seed(0)
    cfg = tiny_v3()
    model = Transformer(cfg)
    ids = ids_of(cfg, 2, 8, 41)
    out = model(ids, labels=ids, balance={name: 0.01})
    v = out.aux[f"balance_{name}"]
    assert v.shape == () and torch.isfinite(v) and v > 0
    torch.testing.assert_close(out.loss, out.aux["lm_loss"] + 0.3 * out.aux["mtp_loss"] + v, rtol=1e-6, atol=1e-7)


def test_unknown_balance_loss_is_refused():
    torch.manual_seed(0)
    cfg = tiny_v3()
    model = Transformer(cfg)
    ids = ids_of(cfg, 1, 6, 51)
    with pytest.raises(ValueError, match="'bogus'"):
        model(ids, labels=ids, balance={"sequence": 1e-4, "bogus": 1.0})


# ---------------------------------------------------------------------------------------------- MaxVio
def test_max_vio_on_known_counts():
    assert max_vio(torch.tensor([4, 4, 4, 4])).item() == 0.0
    assert max_vio(torch.tensor([8, 4, 2, 2])).item() == 1.0  # (8 - 4) / 4
    assert max_vio(torch.tensor([0.0, 0.0, 12.0, 0.0])).item() == 3.0  # all on one expert: E - 1
    assert max_vio(torch.tensor([5, 3, 3, 3, 3, 3])).item() == pytest.approx(0.5, rel=1e-6)  # mean 20/6: (5 - 10/3) / (10/3)
    per_layer = max_vio(torch.tensor([[4, 4, 4, 4], [8, 4, 2, 2], [1, 1, 1, 5]]))  # (L, E) -> (L,)
    assert per_layer.shape == (3,) and per_layer.tolist() == [0.0, 1.0, 1.5]


@pytest.mark.parametrize("name, want", [
    ("deepseek-v3", {"sequence": 1e-4}),  # V3P 4.2: sequence-wise alpha 1e-4 beside the bias rule
    ("deepseek-vl2", {"sequence": 1e-4}),  # noaux_tc routers (REFERENCE-2 A2.1)
    ("deepseek-v2", {"expert": 0.001}),  # the config's aux_loss_alpha / seq_aux (REFERENCE.md 1.1)
    ("deepseek-v2-lite", {"expert": 0.001}),  # V2P B.1: alpha1 0.001 only
    ("deepseek-moe-16b", {"expert": 0.001}),  # MoEP 5.1.2: alpha1 0.001
    ("deepseek-vl2-tiny", {"expert": 0.001}),  # no aux_loss_alpha in its config: V2-Lite / MoE-16B's alpha1
    ("deepseek-llm-7b", {}),  # dense
])
def test_recipe_balance_follows_the_published_recipes(name, want):
    assert recipe_balance(ModelConfig.load(name)) == want


def test_recipe_balance_is_batch_wise_without_seq_aux():
    cfg = ModelConfig.load("tiny-v2")
    assert recipe_balance(cfg) == {"expert": 0.001}
    cfg.seq_aux = False
    assert recipe_balance(cfg) == {"batch": 0.001}
