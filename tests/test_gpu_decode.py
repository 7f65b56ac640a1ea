"""CUDA-graph decoding (minids.decode) against eager decoding on a GPU: token for token.

Skipped without a CUDA GPU; the lead runs it on the H200:  python -m pytest -q tests/test_gpu_decode.py

A captured step replays the very kernels the eager step launches, on the same shapes, so graph and eager
decoding must agree exactly (greedy and, with the same seeded generator, sampled). Speculative and plain
greedy decoding run different shapes (2 positions per forward instead of 1), so in bf16 their logits differ
by rounding: they must agree token for token except where the two candidate tokens are a near-tie, which
is checked on a float32 copy of the model (gap below 2% of the largest logit, the size of bf16 rounding
carried through a few layers).
"""

import copy

import pytest
import torch

import minids
from minids.decode import Decoder, graph_blocker
from minids.generate import generate, speculative_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")


def tiny_v3(seed: int = 0, dtype=torch.bfloat16) -> minids.Transformer:
    cfg = minids.ModelConfig.from_dict({**minids.ModelConfig.load("tiny-v3").to_dict(), "initializer_range": 0.08})
    torch.manual_seed(seed)
    return minids.Transformer(cfg).to("cuda", dtype).eval()


def ragged(V: int, lens=(7, 1, 12, 4), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("impl", ["auto", "absorbed", "naive"])  # auto: the Triton MLA decode kernel
def test_graph_greedy_equals_eager_greedy_ragged(impl):
    model = tiny_v3()
    assert graph_blocker(model) is None
    prompts = ragged(model.cfg.vocab_size)
    eager = generate(model, prompts, 40, mla_impl=impl, cuda_graphs=False)
    dec = Decoder(model, len(prompts), 12 + 40, 40, mla_impl=impl, cuda_graphs=True)
    graphed = dec.generate(prompts)
    assert dec.graph is not None, "no graph was captured"
    assert graphed == eager and all(len(t) == 40 for t in graphed)
    # the captured graph is reused for a second batch of the same size
    again = ragged(model.cfg.vocab_size, (3, 9, 2, 5), seed=1)
    # (compared with an eager decoder of the same cache length: another length changes the attention's shapes)
    assert dec.generate(again) == Decoder(model, 4, 12 + 40, 40, mla_impl=impl, cuda_graphs=False).generate(again)
    assert generate(model, prompts, 40, mla_impl=impl) == eager  # "auto" captures on CUDA


def test_graph_greedy_with_stop_tokens_equals_eager():
    model = tiny_v3(seed=1)
    prompts = ragged(model.cfg.vocab_size)
    free = generate(model, prompts, 30, cuda_graphs=False)
    stop = free[0][5]
    eager = generate(model, prompts, 30, stop_tokens=[stop], cuda_graphs=False)
    assert eager[0][-1] == stop and len(eager[0]) <= 6
    assert generate(model, prompts, 30, stop_tokens=[stop], cuda_graphs=True) == eager


def test_graph_sampling_equals_eager_sampling_with_the_same_generator():
    model = tiny_v3(seed=2)
    prompts = ragged(model.cfg.vocab_size)
    kw = {"temperature": 0.9, "top_k": 100, "top_p": 0.95}
    runs = {g: generate(model, prompts, 32, generator=torch.Generator("cuda").manual_seed(5), cuda_graphs=g, **kw)
            for g in (False, True)}
    assert runs[True] == runs[False]
    assert generate(model, prompts, 32, generator=torch.Generator("cuda").manual_seed(6), **kw) != runs[True]


def test_eager_step_has_no_host_sync_on_cuda():
    model = tiny_v3(seed=3)
    prompts = ragged(model.cfg.vocab_size)
    for spec in (False, True):
        dec = Decoder(model, 4, 12 + 20, 20, temperature=1.0, top_p=0.9, stop_tokens=[1], speculative=spec,
                      generator=torch.Generator("cuda").manual_seed(0), cuda_graphs=False)
        dec.prefill(prompts)
        dec.step()  # first calls may initialise libraries
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
        try:
            for _ in range(3):
                dec.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_equal_up_to_near_ties(model, prompts, got, want):
    ref = copy.deepcopy(model).float()
    for p, g, w in zip(prompts, got, want):
        j = first_difference(g, w)
        if j is None:
            assert len(g) == len(w)
            continue
        with torch.no_grad():
            logits = ref(torch.tensor([p + w[:j]], device="cuda")).logits[0, -1]  # (V,) float32
        gap = (logits[w[j]] - logits[g[j]]).abs().item()
        assert gap < 2e-2 * logits.abs().max().item(), f"token {j}: {g[j]} vs {w[j]} is no near-tie (gap {gap:.3g})"


def test_speculative_greedy_with_graphs_equals_plain_greedy():
    model = tiny_v3(seed=4)
    prompts = ragged(model.cfg.vocab_size, seed=2)
    plain = generate(model, prompts, 48, cuda_graphs=True)
    spec_eager, st_eager = speculative_generate(model, prompts, 48, cuda_graphs=False)
    dec = Decoder(model, len(prompts), 12 + 48, 48, speculative=True, cuda_graphs=True)
    spec = dec.generate(prompts)
    assert dec.graph is not None
    assert spec == spec_eager and dec.stats() == st_eager  # same kernels, replayed
    assert_equal_up_to_near_ties(model, prompts, spec, plain)
    assert st_eager["drafted"] > 0


def test_per_expert_loop_falls_back_to_eager():
    model = tiny_v3(seed=5, dtype=torch.float32)
    model.set_moe_impl("loop")  # the per-expert loop reads the expert counts on the host: no graph possible
    assert "per-expert loop" in graph_blocker(model)
    with pytest.raises(ValueError, match="cuda_graphs=True: the routed experts"):
        generate(model, [[1, 2, 3]], 4, cuda_graphs=True)
    prompts = ragged(model.cfg.vocab_size)
    assert generate(model, prompts, 8) == generate(model, prompts, 8, cuda_graphs=False)
