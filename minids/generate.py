"""Generation with the static cache: greedy, temperature, top-k, top-p, stop tokens, batches, streaming.

    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32)                 # greedy, ragged batch
    out = generate(model, prompts, 64, temperature=0.8, top_p=0.95, generator=g)  # sampling
    for step_tokens in stream(model, prompts, 64): ...                            # one (B,) tensor per step

Prompts of different lengths are right-padded and prefilled in one forward; each sequence then
decodes from its own position. A finished sequence (stop token or max_new_tokens) keeps the batch's
static shape and is masked out of the result. This is the plain reference decoder: the fast GPU
path (no host sync per step, CUDA graphs, the Triton MLA kernel) and MTP speculation build on it.

Shapes: B batch, P longest prompt, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from minids.cache import KVCache

__all__ = ["generate", "sample_next", "speculative_generate", "stream"]


def sample_next(
    logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits: (B, V) -> next tokens (B,). temperature 0 is greedy; top-k then top-p (nucleus) filtering."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    cfg = model.cfg
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (encode an empty text as the BOS/EOS token)")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {cfg.vocab_size}): {bad[:5]}")
    need = max(len(p) for p in prompts) + max_new_tokens
    if need > cfg.max_position_embeddings:
        raise ValueError(
            f"prompt of {max(len(p) for p in prompts)} tokens + {max_new_tokens} new tokens exceeds "
            f"max_position_embeddings={cfg.max_position_embeddings}: shorten the prompt or --max_new_tokens"
        )
    return need


@torch.no_grad()
def stream(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None, mla_impl: str = "absorbed",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), finished (B,) bool) after each decoding step."""
    need = _check_prompts(model, prompts, max_new_tokens)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    B = len(prompts)
    P = max(len(p) for p in prompts)
    cache = KVCache.allocate(model.cfg, B, need, dtype=dtype, device=device, mla_impl=mla_impl)
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(ids, cache=cache, lengths=lens).logits  # (B, P, V)
        last = logits[torch.arange(B, device=device), lens - 1]  # (B, V): each prompt's last real position
        stops = torch.tensor(list(stop_tokens), device=device, dtype=torch.long)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample_next(last, temperature, top_k, top_p, generator)  # (B,)
            yield nxt, finished.clone()
            finished |= torch.isin(nxt, stops)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            last = model(nxt[:, None], cache=cache).logits[:, -1]  # (B, V)
    finally:
        model.train(was_training)


def generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None, mla_impl: str = "absorbed",
) -> list[list[int]]:
    """The new tokens of each prompt (up to and including its stop token)."""
    out: list[list[int]] = [[] for _ in prompts]
    for tokens, done in stream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               stop_tokens=stop_tokens, generator=generator, mla_impl=mla_impl):
        for b, (t, d) in enumerate(zip(tokens.tolist(), done.tolist())):
            if not d:
                out[b].append(t)
    return out


def _probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """The distribution ``sample_next`` draws from (temperature > 0), as probabilities (B, V)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        p = sorted_logits.softmax(dim=-1)
        sorted_logits = sorted_logits.masked_fill(p.cumsum(dim=-1) - p >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


@torch.no_grad()
def speculative_generate(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
    generator: torch.Generator | None = None, mla_impl: str = "absorbed",
) -> tuple[list[list[int]], dict[str, float]]:
    """MTP speculative decoding (V3P 2.2, 5.4.3): the MTP module drafts the token after next, the main
    model verifies the next token and the draft in one forward of two positions, the caches roll back a
    rejected draft. Greedy (temperature 0) gives exactly ``generate``'s tokens; sampling uses the
    lossless rule: accept draft d ~ q with probability min(1, p(d) / q(d)), else draw from
    norm(max(0, p - q)), so the output follows the main model's distribution.

    Returns the new tokens of each prompt and {"drafted", "accepted", "acceptance", "tokens_per_step"}.
    """
    need = _check_prompts(model, prompts, max_new_tokens) + 2
    if not len(model.mtp):
        raise ValueError("this model has no MTP module (num_nextn_predict_layers=0): it cannot draft tokens")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cfg = model.cfg
    B, P = len(prompts), max(len(p) for p in prompts)
    main = KVCache.allocate(cfg, B, need, dtype=dtype, device=device, mla_impl=mla_impl)
    mtp = KVCache.allocate(cfg, B, need, dtype=dtype, device=device, mla_impl=mla_impl, mtp=True)
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p, device=device)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    rows = torch.arange(B, device=device)
    greedy = temperature <= 0

    def pick(logits):  # (B, V) -> tokens (B,)
        return sample_next(logits, temperature, top_k, top_p, generator)

    was_training = model.training
    model.eval()
    try:
        out = model(ids, cache=main, lengths=lens)
        nxt = pick(out.logits[rows, lens - 1])  # (B,) the next token
        follow = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (B, P): token after each prompt position
        follow[rows, lens - 1] = nxt
        q_logits = model.mtp_logits(out.hidden, follow, mtp, lens)[rows, lens - 1]  # (B, V)
        draft = pick(q_logits)
        tokens: list[list[int]] = [[t] for t in nxt.tolist()]
        stops = set(stop_tokens)
        done = [t in stops for t in nxt.tolist()]
        drafted = accepted = steps = 0
        while not all(d or len(t) >= max_new_tokens for t, d in zip(tokens, done)):
            steps += 1
            # finished sequences ride along without advancing their caches (their writes hit the spare slot)
            active = torch.tensor([not d and len(t) < max_new_tokens for t, d in zip(tokens, done)], device=device)
            v = model(torch.stack([nxt, draft], dim=1), cache=main, lengths=2 * active.long())  # verify 2 positions
            if greedy:
                pred = v.logits[:, 0].argmax(-1)
                ok = pred == draft
                fix = pred
            else:
                p = _probs(v.logits[:, 0], temperature, top_k, top_p)
                q = _probs(q_logits, temperature, top_k, top_p)
                pd, qd = p[rows, draft], q[rows, draft]
                u = torch.rand(B, device=device, generator=generator)
                ok = u * qd <= pd  # accept with probability min(1, p(d) / q(d))
                resid = (p - q).clamp(min=0)
                resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p)
                fix = torch.multinomial(resid / resid.sum(-1, keepdim=True), 1, generator=generator).squeeze(-1)
            bonus = pick(v.logits[:, 1])
            main.lengths = main.lengths - (~ok & active).long()  # roll back a rejected draft
            first = torch.where(ok, draft, fix)  # the token after nxt
            new_next = torch.where(ok, bonus, first)
            # MTP sees the main hidden states of the kept positions with the token that follows each
            q_all = model.mtp_logits(v.hidden, torch.stack([first, bonus], dim=1), mtp, (1 + ok.long()) * active.long())
            q_logits = q_all[rows, ok.long()]
            draft = pick(q_logits)
            for b in range(B):
                if done[b] or len(tokens[b]) >= max_new_tokens:
                    continue
                drafted += 1
                new = [int(first[b])] + ([int(bonus[b])] if bool(ok[b]) else [])
                accepted += int(bool(ok[b]))
                for t in new:
                    if len(tokens[b]) < max_new_tokens and not done[b]:
                        tokens[b].append(t)
                        done[b] = t in stops
            nxt = new_next
    finally:
        model.train(was_training)
    stats = {"drafted": drafted, "accepted": accepted, "acceptance": accepted / max(drafted, 1),
             "tokens_per_step": sum(len(t) - 1 for t in tokens) / max(drafted, 1)}  # per active verification
    return tokens, stats
