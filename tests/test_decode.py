"""The graph-capable decode step (minids.decode) on the CPU: the very step a CUDA graph captures, run eagerly.

Expected tokens come from explicit loops written here (one model forward per token over a KVCache, argmax,
Python bookkeeping: the pre-Decoder decoding loop) or from full no-cache forwards, never from the Decoder.
A dispatch-mode probe checks that a step never reads a tensor value on the host (what would stall the GPU
and break a graph capture); a positive control shows that the probe catches such a read.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import minids
from minids.cache import KVCache
from minids.decode import Decoder, graph_blocker, sample_with_noise, sampling_probs
from minids.generate import generate, speculative_generate, stream


def tiny(key: str = "tiny-v3", seed: int = 0, **over) -> minids.Transformer:
    base = minids.ModelConfig.load(key).to_dict()
    cfg = minids.ModelConfig.from_dict({**base, "num_hidden_layers": 2, "initializer_range": 0.08, **over})
    torch.manual_seed(seed)
    return minids.Transformer(cfg).eval()


def ragged_prompts(V: int, lens=(6, 1, 4), seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lens]


@torch.no_grad()
def reference_greedy(model, prompts, n: int, stop: int | None = None, mla_impl: str = "absorbed") -> list[list[int]]:
    """The plain loop: prefill each prompt alone, then one cached forward + argmax per token, Python bookkeeping."""
    out = []
    for p in prompts:
        cache = KVCache.allocate(model.cfg, 1, len(p) + n, mla_impl=mla_impl)
        last = model(torch.tensor([p]), cache=cache).logits[0, -1]
        toks = []
        for _ in range(n):
            t = int(last.argmax())
            toks.append(t)
            if t == stop or len(toks) == n:
                break
            last = model(torch.tensor([[t]]), cache=cache).logits[0, -1]
        out.append(toks)
    return out


def test_decoder_prefill_checks_its_prompts():
    """The public Decoder checks what generate checks: an empty prompt, an id outside the vocabulary."""
    model = tiny()
    V = model.cfg.vocab_size
    dec = Decoder(model, 2, 16, 4, cuda_graphs=False)
    with pytest.raises(ValueError, match="at least one token"):
        dec.prefill([[1, 2], []])
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, {V}\).*\[{V}\]"):
        dec.prefill([[1, 2], [3, V]])


# ------------------------------------------------------------------------------------------ greedy equality
@pytest.mark.parametrize("key,impl", [("tiny-v3", "absorbed"), ("tiny-v3", "naive"), ("tiny-v2", "absorbed"),
                                      ("tiny-dense", "absorbed")])
def test_decoder_greedy_equals_plain_loop(key, impl):
    model = tiny(key)
    prompts = ragged_prompts(model.cfg.vocab_size)
    want = reference_greedy(model, prompts, 9, mla_impl=impl)
    dec = Decoder(model, 3, 6 + 9, 9, mla_impl=impl, cuda_graphs=False)
    assert dec.generate(prompts) == want
    # step by step through the public pieces: the same tokens, one per step, in out[:, step]
    dec.prefill(prompts)
    for _ in range(8):
        dec.step()
    assert dec.state["n_out"].tolist() == [9, 9, 9] and bool(dec.state["finished"].all())
    assert dec.results() == want
    # reused for another batch: state fully reset by prefill
    other = ragged_prompts(model.cfg.vocab_size, (2, 5, 3), seed=1)
    assert dec.generate(other) == reference_greedy(model, other, 9, mla_impl=impl)


def test_generate_and_stream_run_the_decoder_step():
    model = tiny()
    prompts = ragged_prompts(model.cfg.vocab_size)
    want = reference_greedy(model, prompts, 7)
    assert generate(model, prompts, 7, cuda_graphs=False) == want
    assert generate(model, prompts, 7) == want  # "auto" on the CPU: eager
    steps = list(stream(model, prompts, 7))
    assert [[int(t[b]) for t, _ in steps] for b in range(3)] == want


def test_stop_tokens_finish_sequences_and_freeze_their_cache():
    model = tiny(seed=1)
    prompts = ragged_prompts(model.cfg.vocab_size, (3, 5))
    free = reference_greedy(model, prompts, 20)
    stop = free[0][3]
    want = reference_greedy(model, prompts, 20, stop=stop)
    dec = Decoder(model, 2, 5 + 20, 20, stop_tokens=[stop], cuda_graphs=False)
    assert dec.generate(prompts) == want and want[0][-1] == stop
    # a finished sequence stops advancing: its cache holds the prompt + emitted tokens minus the last
    assert dec.state["lengths"].tolist() == [3 + len(want[0]) - 1, 5 + len(want[1]) - 1]
    # steps after everything finished change nothing
    before = {k: t.clone() for k, t in dec.state.items()}
    dec.step()
    for k in ("lengths", "n_out", "finished"):
        assert torch.equal(dec.state[k], before[k]), k
    assert torch.equal(dec.state["out"][:, :20], before["out"][:, :20])  # only the discard columns were written


def test_speculative_decoder_equals_plain_greedy_and_counts():
    model = tiny(seed=2)
    prompts = ragged_prompts(model.cfg.vocab_size, (5, 1, 9), seed=3)
    want = reference_greedy(model, prompts, 17)
    dec = Decoder(model, 3, 9 + 17, 17, speculative=True, cuda_graphs=False)
    assert dec.generate(prompts) == want
    st = dec.stats()
    assert st["drafted"] > 0 and 0 <= st["accepted"] <= st["drafted"]
    # every verification of an active sequence adds 1 token, or 2 when its draft is accepted, except that the
    # budget may cut the second token of each sequence's last verification: 48 <= drafted + accepted <= 48 + 3
    assert 16 * 3 <= st["drafted"] + st["accepted"] <= 16 * 3 + 3
    assert st["tokens_per_step"] == 16 * 3 / st["drafted"]
    spec, stats = speculative_generate(model, prompts, 17, cuda_graphs=False)
    assert spec == want and stats == st


# ------------------------------------------------------------------------------------------ no host syncs
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "item"}


class HostReads(TorchDispatchMode):
    """Records ops that need a tensor value on the host (.item(), bool(t), nonzero, data-dependent shapes)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tolist_calls(monkeypatch):
    """Counts Tensor.tolist calls (they read values on the host without passing the dispatcher)."""
    calls = []
    orig = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return orig(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    return calls


@pytest.mark.parametrize("speculative,temperature", [(False, 0.0), (False, 0.9), (True, 0.0), (True, 0.9)])
def test_a_step_never_reads_values_on_the_host(speculative, temperature, tolist_calls):
    model = tiny(seed=3)
    model.set_moe_impl("grouped")  # the sync-free expert path (the "loop" one reads counts on the host)
    prompts = ragged_prompts(model.cfg.vocab_size, (4, 2))
    dec = Decoder(model, 2, 4 + 10, 10, temperature=temperature, top_k=50, top_p=0.9, stop_tokens=[3],
                  generator=torch.Generator().manual_seed(0), speculative=speculative, cuda_graphs=False)
    dec.prefill(prompts)
    tolist_calls.clear()
    with HostReads() as probe:
        for _ in range(3):
            dec.step()
    assert probe.seen == [] and tolist_calls == []
    # positive control: the per-expert loop reads the expert counts on the host, and the probe sees it
    model.set_moe_impl("loop")
    dec.prefill(prompts)
    with HostReads() as probe:
        dec.step()
    assert tolist_calls, "the probe missed the loop implementation's host read"


def test_cuda_graphs_forced_on_cpu_is_an_error():
    model = tiny()
    assert graph_blocker(model) == "CUDA graphs need the model on a CUDA device"
    with pytest.raises(ValueError, match="cuda_graphs=True: CUDA graphs need the model on a CUDA device"):
        generate(model, [[1, 2]], 3, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs="):
        generate(model, [[1, 2]], 3, cuda_graphs="yes")


# ------------------------------------------------------------------------------------------ sampling
def noise_draws(logits: torch.Tensor, n: int, seed: int, **kw) -> torch.Tensor:
    """Empirical distribution of n draws of sample_with_noise from one row of logits."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.empty(n, logits.shape[-1]).exponential_(generator=g)
    toks = sample_with_noise(logits[None].expand(n, -1), noise, **kw)
    return torch.bincount(toks, minlength=logits.shape[-1]).double() / n


def test_sample_with_noise_follows_the_filtered_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g) * 1.5
    # 20k draws: the standard error of a frequency is at most 0.0035, so 0.02 is over 5 standard errors
    for kw in ({"temperature": 1.0}, {"temperature": 0.5}, {"temperature": 1.0, "top_k": 3},
               {"temperature": 0.7, "top_p": 0.8}, {"temperature": 1.3, "top_k": 5, "top_p": 0.9}):
        want = torch.exp(logits.double() / kw["temperature"])
        order = logits.argsort(descending=True)
        keep = torch.zeros(8, dtype=torch.bool)
        keep[order[: kw.get("top_k", 8)]] = True
        want = torch.where(keep, want, 0.0)
        want = want / want.sum()
        if "top_p" in kw:  # keep the smallest prefix (by probability) whose mass reaches top_p
            sp = want[order]
            drop = sp.cumsum(0) - sp >= kw["top_p"]
            want[order[drop]] = 0
            want = want / want.sum()
        f = noise_draws(logits, 20_000, seed=len(kw), **kw)
        assert f[want == 0].sum() == 0, kw
        assert (f - want).abs().max() < 0.02, (kw, f, want)
        torch.testing.assert_close(sampling_probs(logits[None], **kw)[0].double(), want, rtol=1e-5, atol=1e-6)


def test_sample_with_noise_greedy_and_deterministic():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 50, generator=g)
    noise = torch.empty(16, 50).exponential_(generator=g)
    assert torch.equal(sample_with_noise(logits, noise), logits.argmax(-1))
    assert torch.equal(sample_with_noise(logits, noise, temperature=2.0, top_k=1), logits.argmax(-1))
    a = sample_with_noise(logits, noise, temperature=1.0)
    assert torch.equal(a, sample_with_noise(logits, noise.clone(), temperature=1.0))
    noise[:, :] = 1.0  # equal noise: the most probable token wins
    assert torch.equal(sample_with_noise(logits, noise, temperature=1.0), logits.argmax(-1))


def test_sampled_decoding_is_reproducible_and_finishes():
    model = tiny(seed=4)
    prompts = ragged_prompts(model.cfg.vocab_size, (3, 2, 5))
    runs = [generate(model, prompts, 12, temperature=1.0, top_p=0.95, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]
    assert all(len(r) == 12 for r in runs[0])
    spec, _ = speculative_generate(model, prompts, 12, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert all(len(r) == 12 for r in spec)
