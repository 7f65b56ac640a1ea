"""Generation with the static cache: greedy, temperature, top-k, top-p, stop tokens, batches, streaming.

    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)                 # greedy, ragged batch
    out = generate(model, prompts, 64, temperature=0.8, top_p=0.95, generator=g)  # sampling
    for step_tokens in stream(model, prompts, 64): ...                            # one (B,) tensor per step

Prompts of different lengths are right-padded and prefilled in one forward; each sequence then
decodes from its own position. A finished sequence (stop token or max_new_tokens) keeps the batch's
static shape, stops advancing its cache and is masked out of the result. Every decode step is
``minids.decode.Decoder``'s: tensor operations on static state, no host sync, replayed as a CUDA graph
on CUDA (``cuda_graphs="auto"``, the default) and run eagerly elsewhere; the prefill is eager.
Sampling inside a step draws with pre-drawn exponential noise (``minids.decode.sample_with_noise``,
the same distribution as ``sample_next``).

Shapes: B batch, P longest prompt, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from minids.decode import Decoder, check_prompts, sampling_probs

__all__ = ["generate", "sample_next", "speculative_generate", "stream"]


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> next tokens (B,). temperature 0 is greedy; top-k then top-p (nucleus) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _decoder(model, prompts, max_new_tokens, speculative, **kw) -> Decoder:
    need = check_prompts(model, prompts, max_new_tokens)
    return Decoder(model, len(prompts), need, max_new_tokens, speculative=speculative, **kw)


@contextmanager
def _eval_mode(model):
    """Decode in eval mode and give the model back in the mode it came in, also on an error."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def stream(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None, mla_impl: str = "auto", cuda_graphs: bool | str = "auto",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) after each decoding step; finished[b]: sequence b had
    already ended (its token is to be ignored). Stops once every sequence has ended (a host sync per
    step when stop tokens are given: streaming reads every step anyway).

    cuda_graphs: "auto" replays each step as a CUDA graph on CUDA (``minids.decode``), True forces it,
    False runs the same step eagerly.
    """
    if max_new_tokens <= 0:
        return
    with _eval_mode(model):
        dec = _decoder(model, prompts, max_new_tokens, False, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_tokens=stop_tokens, generator=generator, mla_impl=mla_impl, cuda_graphs=cuda_graphs)
        dec.prefill(prompts)
        s = dec.state
        for step in range(max_new_tokens):
            yield s["step_tokens"].clone(), s["step_done"].clone()
            if step == max_new_tokens - 1 or (len(stop_tokens) and bool(s["finished"].all())):
                break
            dec.step()


@torch.no_grad()
def generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None, mla_impl: str = "auto", cuda_graphs: bool | str = "auto",
) -> list[list[int]]:
    """The new tokens of each prompt (up to and including its stop token).

    The steps run without host syncs (``minids.decode.Decoder``): one after the prefill, then one per 16
    steps when stop tokens may end the batch early. cuda_graphs: as in ``stream``.
    """
    if max_new_tokens <= 0:
        check_prompts(model, prompts, 0)
        return [[] for _ in prompts]
    with _eval_mode(model):
        dec = _decoder(model, prompts, max_new_tokens, False, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_tokens=stop_tokens, generator=generator, mla_impl=mla_impl, cuda_graphs=cuda_graphs)
        return dec.generate(prompts)


@torch.no_grad()
def speculative_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None, mla_impl: str = "auto", cuda_graphs: bool | str = "auto",
) -> tuple[list[list[int]], dict[str, float]]:
    """MTP speculative decoding (V3P 2.2, 5.4.3): the MTP module drafts the token after next, the main
    model verifies the next token and the draft in one forward of two positions, the caches roll back a
    rejected draft. Greedy (temperature 0) gives exactly ``generate``'s tokens; sampling uses the
    lossless rule: accept draft d ~ q with probability min(1, p(d) / q(d)), else draw from
    norm(max(0, p - q)), so the output follows the main model's distribution.

    Returns the new tokens of each prompt and {"drafted", "accepted", "acceptance", "tokens_per_step"}.
    """
    if not len(model.mtp):
        raise ValueError("this model has no MTP module (num_nextn_predict_layers=0): it cannot draft tokens")
    if max_new_tokens <= 0:
        check_prompts(model, prompts, 0)
        return [[] for _ in prompts], {"drafted": 0, "accepted": 0, "acceptance": 0.0, "tokens_per_step": 0.0}
    with _eval_mode(model):
        dec = _decoder(model, prompts, max_new_tokens, True, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop_tokens=stop_tokens, generator=generator, mla_impl=mla_impl, cuda_graphs=cuda_graphs)
        tokens = dec.generate(prompts)
        return tokens, dec.stats()
