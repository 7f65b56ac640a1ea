"""MTP speculative decoding: greedy output identical to plain greedy decoding, sampling lossless."""

import pytest
import torch

import minids
from minids.generate import generate, speculative_generate


def tiny(**over):
    base = minids.ModelConfig.load("tiny-v3").to_dict()
    return minids.Transformer(minids.ModelConfig.from_dict({**base, "num_hidden_layers": 2, **over})).eval()


@pytest.mark.parametrize("impl", ["absorbed", "naive"])
def test_greedy_speculation_is_token_for_token_plain_greedy(impl):
    torch.manual_seed(0)
    model = tiny(initializer_range=0.08)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 1, 9)]
    plain = generate(model, prompts, 24, mla_impl=impl)
    spec, stats = speculative_generate(model, prompts, 24, mla_impl=impl)
    assert spec == plain
    assert stats["drafted"] > 0 and 0 <= stats["acceptance"] <= 1 and 1 <= stats["tokens_per_step"] <= 2


def test_greedy_speculation_with_stop_tokens():
    # a stop token taken from plain greedy output must end both decoders at the same place
    torch.manual_seed(3)
    model = tiny(initializer_range=0.08)
    prompts = [[1, 2, 3], [7, 8]]
    plain = generate(model, prompts, 30)
    stop = plain[0][10]
    plain = generate(model, prompts, 30, stop_tokens=[stop])
    spec, _ = speculative_generate(model, prompts, 30, stop_tokens=[stop])
    assert spec == plain and plain[0][-1] == stop


def test_sampling_is_lossless():
    # a vocabulary of 6 makes the joint law of the first two new tokens (36 cells) measurable
    torch.manual_seed(0)
    model = tiny(vocab_size=6, initializer_range=0.3)
    prompts = [[1, 4, 2]] * 3000
    plain = generate(model, prompts, 2, temperature=1.0, generator=torch.Generator().manual_seed(5))
    spec, stats = speculative_generate(model, prompts, 2, temperature=1.0, generator=torch.Generator().manual_seed(6))

    def law(samples):
        h = torch.zeros(6, 6)
        for a, b in samples:
            h[a, b] += 1
        return h / h.sum()

    tv = 0.5 * (law(plain) - law(spec)).abs().sum().item()
    assert tv < 0.06, f"total variation {tv:.3f} between plain and speculative sampling"
    assert stats["acceptance"] < 1.0  # a random drafter is rejected sometimes: the correction path ran


def test_a_model_without_mtp_cannot_speculate():
    model = tiny(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="no MTP module"):
        speculative_generate(model, [[1, 2]], 4)


def test_a_finished_sequence_rides_along_without_overflowing_its_cache():
    # sequence 0 stops at its first token; sequence 1 then decodes 40 more steps: the finished one must
    # not keep advancing its cache positions (it would run past the allocated length)
    torch.manual_seed(4)
    model = tiny(initializer_range=0.08)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6]]
    first = generate(model, prompts[:1], 1)[0][0]
    plain = generate(model, prompts, 40, stop_tokens=[first])
    spec, stats = speculative_generate(model, prompts, 40, stop_tokens=[first])
    assert spec == plain and spec[0] == [first] and (len(spec[1]) == 40 or first in spec[1])
    assert 1 <= stats["tokens_per_step"] <= 2
