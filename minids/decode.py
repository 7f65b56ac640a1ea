"""Fast decoding: one static-shape decode step, run eagerly or replayed as a CUDA graph.

A ``Decoder`` owns everything a step touches, allocated once on the model's device: the static KV cache
(and the MTP cache when speculating), the next input tokens, the finished flags, the count of tokens each
sequence has emitted, an output buffer and the sampling noise. One step is

    plain (width 1):        forward(next tokens) -> sample -> record, finish on a stop token or the budget
    speculative (width 2):  forward([next, draft]) -> verify the MTP draft -> roll back a rejected one
                            -> MTP drafts the token after next -> record 1 or 2 tokens

written only with tensor operations: no ``.item()``, no ``.tolist()``, no Python branch on a tensor value,
positions and lengths as device tensors. Finished sequences ride along with zero new tokens, so their
cache neither advances nor overflows (their writes go to the cache's padding slot). That makes the step
capturable: on CUDA it is captured once per decoder (batch B, step width 1 or 2) into a
``torch.cuda.CUDAGraph`` and replayed, which removes the launch overhead of the few hundred small kernels
of a step (the main cost of decoding a small model). On the CPU the very same step function runs eagerly.

Sampling inside the graph: ``sample_with_noise`` draws token i with probability p_i as
argmax_i p_i / E_i over i.i.d. E_i ~ Exp(1) (the exponential race, equivalent to the Gumbel-max trick).
The noise is drawn into a static buffer before each step, outside the graph, from the caller's
generator, so a graph replays valid random draws without capturing generator state.

The host waits on the device only between chunks of steps: after the prefill and whenever the loop
needs to know how many tokens are still to come (twice for plain greedy decoding without stop tokens: the
first chunk and the check that ends the loop), and once more to read the results.

Shapes: B batch, P longest prompt, V vocabulary, N max new tokens.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from minids.cache import KVCache
from minids.moe import DeepSeekMoE, resolve_moe_impl

__all__ = ["Decoder", "check_prompts", "graph_blocker", "sample_with_noise", "sampling_probs"]

CHECK_EVERY = 16  # with stop tokens: steps between two host checks of "every sequence finished"


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One line for sampling settings that have no distribution (checked where sampling starts, and by the CLI)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be a positive integer (or None for all tokens)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r}: must lie in (0, 1] (or None)")


def sampling_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution ``minids.generate.sample_next`` draws from (temperature > 0): logits (B, V) ->
    probabilities (B, V) float32 after temperature, top-k, then top-p (the smallest prefix reaching p)."""
    check_sampling(temperature, top_k, top_p)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        logits = logits.masked_fill(logits < logits.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        p = sorted_logits.softmax(dim=-1)
        sorted_logits = sorted_logits.masked_fill(p.cumsum(dim=-1) - p >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)


def sample_with_noise(
    logits: torch.Tensor, noise: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """logits: (B, V), noise: (B, V) i.i.d. Exp(1) draws -> tokens (B,) int64; temperature 0 is greedy.

    Same distribution as ``minids.generate.sample_next``: P(argmax_i p_i / E_i = j) = p_j for independent
    E_i ~ Exp(1). All randomness is in ``noise``, so the function is deterministic and graph-capturable.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    p = sampling_probs(logits, temperature, top_k, top_p)
    return (p / noise.clamp_min(1e-30)).argmax(dim=-1)  # filtered tokens have p = 0 and never win


def check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> int:
    """One clear line for an empty prompt list or prompt, a token id outside the vocabulary, or prompt + new tokens
    past the positions; returns the cache length the longest prompt needs."""
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
            f"max_position_embeddings={cfg.max_position_embeddings}: shorten the prompt or ask for fewer new tokens"
        )
    return need


def graph_blocker(model) -> str | None:
    """Why a decode step of this model cannot be captured into a CUDA graph, or None if it can.

    The known host syncs on the decode path are in the routed experts: the "loop" implementation (and FP8,
    sim or real, which uses it) reads the per-expert token counts on the host; ``torch._grouped_mm`` takes its
    offsets on the device but runs sync-free only in bf16 (its float32 fallback copies them to the host).
    The Triton experts (``minids.kernels.moe``, impl "triton", or "auto" where Triton is installed) never sync.
    Which implementation a layer runs is ``minids.moe.resolve_moe_impl``'s answer, the one ``moe_experts`` follows.
    """
    p = next(model.parameters())
    if not p.is_cuda:
        return "CUDA graphs need the model on a CUDA device"
    for m in model.modules():
        if not isinstance(m, DeepSeekMoE):
            continue
        if m.fp8:
            return "FP8 (sim or real) runs the routed experts as a per-expert loop, which syncs with the host"
        _, inter, hidden = m.experts.gate_proj.shape
        impl = resolve_moe_impl(m.impl, p.device, p.dtype, hidden, inter)
        if impl == "triton" or (impl == "grouped" and p.dtype == torch.bfloat16):
            continue
        how = "as a per-expert loop" if impl == "loop" else f"through torch._grouped_mm's {p.dtype} fallback"
        return (f"the routed experts would run {how} ({p.dtype}, moe impl {m.impl!r}), which syncs with the host "
                "every layer: use moe impl 'triton', or a bf16 model with 'grouped'")
    return None


class Decoder:
    """Static-shape decoding of ``batch`` sequences of up to ``max_len`` tokens (longest prompt + new tokens).

        dec = Decoder(model, batch=8, max_len=1024, max_new_tokens=256, temperature=0.8, top_p=0.95)
        new_tokens = dec.generate(prompts)        # list of B lists; reuse dec for more batches of 8
        dec.prefill(prompts); dec.step(); ...     # or step by step (stream)

    cuda_graphs: "auto" (capture on CUDA when the model allows it, else eager), True (capture or raise),
    False (eager). mla_impl: the cache's (``minids.cache.KVCache``); "auto" takes the Triton MLA decode
    kernel for bf16/fp16 caches on CUDA and the torch absorbed form elsewhere. speculative: verify MTP drafts (width-2 steps) instead of plain width-1 steps.
    The model must stay where it is (same parameters, device, dtype) while a captured decoder is in use.
    """

    def __init__(
        self, model, batch: int, max_len: int, max_new_tokens: int, *, temperature: float = 0.0,
        top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
        generator: torch.Generator | None = None, mla_impl: str = "auto", cuda_graphs: bool | str = "auto",
        speculative: bool = False,
    ):
        if cuda_graphs not in ("auto", True, False):
            raise ValueError(f"cuda_graphs={cuda_graphs!r}: one of 'auto', True, False")
        check_sampling(temperature, top_k, top_p)
        if speculative and not len(model.mtp):
            raise ValueError("this model has no MTP module (num_nextn_predict_layers=0): it cannot draft tokens")
        self.model = model
        p = next(model.parameters())
        dev, V, B, N = p.device, model.cfg.vocab_size, batch, max_new_tokens
        self.device, self.batch, self.max_new, self.speculative = dev, B, N, speculative
        self.temperature, self.top_k, self.top_p, self.generator = temperature, top_k, top_p, generator
        self.greedy = temperature <= 0
        blocker = graph_blocker(model)
        if cuda_graphs is True and blocker:
            raise ValueError(f"cuda_graphs=True: {blocker}")
        self.use_graphs = cuda_graphs is not False and blocker is None
        self.cache = KVCache.allocate(model.cfg, B, max_len, dtype=p.dtype, device=dev, mla_impl=mla_impl)
        self.mtp_cache = (KVCache.allocate(model.cfg, B, max_len, dtype=p.dtype, device=dev, mla_impl=mla_impl, mtp=True)
                          if speculative else None)
        self.stops = torch.tensor(list(stop_tokens), dtype=torch.long, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.offsets = torch.arange(2, device=dev)  # column offsets of the (up to) 2 tokens a step emits
        long = {"dtype": torch.long, "device": dev}
        # the static state: every step reads and writes these tensors in place (a graph replays on them)
        pair = torch.zeros(B, 2, **long)  # [next input token, MTP's draft of the token after it]: one (B, 2) input
        self.state: dict[str, torch.Tensor] = {
            "lengths": self.cache.lengths,  # (B,) tokens in the main cache
            "pair": pair,  # (B, 2) the speculative step's input; "tokens" and "draft" are its columns
            "tokens": pair[:, 0],  # (B,) the next input token of each sequence
            "draft": pair[:, 1],  # (B,) MTP's draft of the token after it (speculative)
            "finished": torch.zeros(B, dtype=torch.bool, device=dev),  # (B,) stop token seen or N tokens emitted
            "n_out": torch.zeros(B, **long),  # (B,) tokens emitted so far
            "out": torch.zeros(B, N + 2, **long),  # (B, N + 2) emitted tokens; the last 2 columns take discards
            "step_tokens": torch.zeros(B, **long),  # (B,) the token sampled by the last step (stream)
            "step_done": torch.zeros(B, dtype=torch.bool, device=dev),  # (B,) finished before the last step
            "drafted": torch.zeros(B, **long),  # (B,) verifications while active, per sequence
            "accepted": torch.zeros(B, **long),  # (B,) accepted drafts, per sequence
        }
        if speculative:
            self.state["mtp_lengths"] = self.mtp_cache.lengths
            self.state["q_logits"] = torch.zeros(B, V, dtype=torch.float32, device=dev)  # draft's logits (sampling)
        # Exp(1) noise for (plain) the next token; (speculative) the correction, the bonus and the next draft
        self.noise = torch.ones(3 if speculative else 1, B, V, dtype=torch.float32, device=dev)
        self.uniform = torch.zeros(B, dtype=torch.float32, device=dev)  # acceptance draws (speculative sampling)
        self.graph: torch.cuda.CUDAGraph | None = None

    # ------------------------------------------------------------------------------------------ pieces
    def _draw_noise(self) -> None:
        """Fresh random draws for the next step (outside any graph: the generator advances on the host side)."""
        if not self.greedy:
            self.noise.exponential_(generator=self.generator)
            self.uniform.uniform_(generator=self.generator)

    def _sample(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """logits: (B, V) -> tokens (B,) with noise slot k."""
        return sample_with_noise(logits, self.noise[k], self.temperature, self.top_k, self.top_p)

    def _is_stop(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.isin(tokens, self.stops)

    def _forward(self, ids: torch.Tensor, new_lens: torch.Tensor):
        """The model over the main cache (which advances its lengths, the static state tensor, in place)."""
        return self.model(ids, cache=self.cache, lengths=new_lens)

    def _mtp(self, hidden: torch.Tensor, next_ids: torch.Tensor, new_lens: torch.Tensor) -> torch.Tensor:
        """MTP logits (B, S, V) over its own cache."""
        return self.model.mtp_logits(hidden, next_ids, self.mtp_cache, new_lens)

    def _emit(self, toks: torch.Tensor, emit: torch.Tensor) -> None:
        """Record toks (B, k) at out[b, n_out[b] + j] where emit (B, k) is set (a prefix of the k columns), count
        them, and finish a sequence on an emitted stop token or at N tokens. Discards land in a spare column."""
        s = self.state
        col = s["n_out"][:, None] + self.offsets[: toks.shape[1]]  # (B, k)
        s["out"].scatter_(1, torch.where(emit, col, self.max_new + 1), toks)
        s["n_out"].add_(emit.sum(1))
        done = s["n_out"] >= self.max_new
        if self.stops.numel():  # a static choice: decoders without stop tokens skip these kernels
            done |= (self._is_stop(toks) & emit).any(1)
        s["finished"].logical_or_(done)

    # ------------------------------------------------------------------------------------------ the steps
    def _plain_step(self) -> None:
        """Width 1: one token per active sequence. Graph-capturable (tensor ops on static state only)."""
        s = self.state
        active = ~s["finished"]  # (B,)
        logits = self._forward(s["tokens"][:, None], active.long()).logits[:, -1]  # (B, V)
        nxt = self._sample(logits, 0)  # (B,)
        s["step_done"].copy_(~active)
        s["step_tokens"].copy_(nxt)
        self._emit(nxt[:, None], active[:, None])
        s["tokens"].copy_(nxt)

    def _speculative_step(self) -> None:
        """Width 2: verify [next, draft] in one forward, keep 1 or 2 tokens, draft again (V3P 2.2, 5.4.3).

        Greedy: the draft is kept iff it is the main model's argmax, so the output is plain greedy decoding's.
        Sampling (lossless): keep draft d ~ q with probability min(1, p(d) / q(d)), else draw the token from
        norm(max(0, p - q)); the kept tokens then follow the main model's distribution p.
        Written with few kernels: on a small model a step is a few hundred launches, and every one added here
        is paid at every step (the bookkeeping below is about a dozen).
        """
        s, rows = self.state, self.rows
        active = ~s["finished"]  # (B,)
        act = active.long()
        draft = s["draft"]
        v = self._forward(s["pair"], 2 * act)  # (B, 2, V) over [next, draft]
        if self.greedy:
            am = v.logits.argmax(-1)  # (B, 2): the main model's choice after next, and after the draft
            fix, bonus = am[:, 0], am[:, 1]
            ok = fix == draft
        else:
            p = sampling_probs(v.logits[:, 0], self.temperature, self.top_k, self.top_p)  # (B, V)
            q = sampling_probs(s["q_logits"], self.temperature, self.top_k, self.top_p)  # (B, V)
            ok = self.uniform * q[rows, draft] <= p[rows, draft]  # accept with probability min(1, p(d) / q(d))
            resid = (p - q).clamp(min=0)
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p)
            fix = (resid / self.noise[0].clamp_min(1e-30)).argmax(-1)  # a draw from norm(resid)
            bonus = self._sample(v.logits[:, 1], 1)  # (B,) the token after an accepted draft
        kept = ok & active  # (B,) sequences that keep 2 tokens
        s["lengths"].sub_(act - kept.long())  # roll back a rejected draft
        first = torch.where(ok, draft, fix)  # (B,) the token after next
        toks = torch.stack([first, bonus], dim=1)  # (B, 2) the tokens this step may emit
        # MTP sees the main hidden states of the kept positions with the token that follows each
        q_all = self._mtp(v.hidden, toks, act + kept.long())  # (B, 2, V)
        pick = ok.long()  # the last kept position
        if self.greedy:
            new_draft = q_all.argmax(-1).gather(1, pick[:, None]).squeeze(1)  # (B,)
        else:
            q_logits = q_all[rows, pick]  # (B, V)
            new_draft = self._sample(q_logits, 2)
            s["q_logits"].copy_(q_logits)
        # emit first (if active), then bonus (if kept, first was no stop and the budget allows)
        second = kept & (s["n_out"] + 1 < self.max_new)
        if self.stops.numel():
            second &= ~self._is_stop(first)
        s["step_done"].copy_(~active)
        s["step_tokens"].copy_(first)
        s["drafted"].add_(act)
        s["accepted"].add_(kept.long())
        self._emit(toks, torch.stack([active, second], dim=1))
        s["tokens"].copy_(torch.where(ok, bonus, first))
        draft.copy_(new_draft)

    def _body(self) -> None:
        (self._speculative_step if self.speculative else self._plain_step)()

    # ------------------------------------------------------------------------------------------ public API
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> None:
        """Reset the state, run the prompts through the model (eager, one forward) and emit the first token."""
        B = self.batch
        if len(prompts) != B:
            raise ValueError(f"this decoder holds {B} sequences; got {len(prompts)} prompts")
        check_prompts(self.model, prompts, self.max_new)
        P = max(len(p) for p in prompts)
        if P + self.max_new > self.cache.max_len:
            raise ValueError(f"prompt of {P} tokens + {self.max_new} new tokens exceeds the cache ({self.cache.max_len})")
        s = self.state
        for k in ("lengths", "finished", "n_out", "drafted", "accepted", "step_done"):
            s[k].zero_()
        ids = torch.tensor([list(p) + [0] * (P - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=self.device)
        rows = self.rows
        self._draw_noise()
        out = self._forward(ids, lens)
        nxt = self._sample(out.logits[rows, lens - 1], 0)  # (B,) the first new token
        self._emit(nxt[:, None], torch.ones_like(s["finished"])[:, None])
        s["step_tokens"].copy_(nxt)
        s["tokens"].copy_(nxt)
        if self.speculative:
            s["mtp_lengths"].zero_()
            follow = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)  # (B, P): the token after each prompt position
            follow[rows, lens - 1] = nxt
            q_logits = self._mtp(out.hidden, follow, lens)[rows, lens - 1]  # (B, V)
            s["draft"].copy_(self._sample(q_logits, 2))
            s["q_logits"].copy_(q_logits.float())

    @torch.no_grad()
    def reset(self, tokens: torch.Tensor, lengths: torch.Tensor) -> None:
        """Start decoding from a cache the caller filled (benchmarks): tokens (B,) the next inputs at
        positions lengths (B,); nothing emitted yet. Plain decoding only."""
        s = self.state
        s["tokens"].copy_(tokens)
        s["lengths"].copy_(lengths)
        for k in ("finished", "n_out", "drafted", "accepted", "step_done"):
            s[k].zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One decode step: a CUDA-graph replay when graphs are on (captured at the first call), else eager."""
        self._draw_noise()
        if not self.use_graphs:
            self._body()
            return
        if self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:  # capture failed under cuda_graphs="auto": eager from now on
            self._body()

    def _capture(self) -> None:
        """Warm up on a side stream (lazy initialisation, autotuning), restore the state, capture one step."""
        snapshot = {k: t.clone() for k, t in self.state.items()}
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._body()
            torch.cuda.current_stream(self.device).wait_stream(side)
            for k, t in self.state.items():
                t.copy_(snapshot[k])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            self.graph = graph
        except RuntimeError as e:
            torch.cuda.synchronize(self.device)
            for k, t in self.state.items():
                t.copy_(snapshot[k])
            self.use_graphs = False
            warnings.warn(f"CUDA graph capture of the decode step failed ({str(e).splitlines()[0]}); decoding eagerly",
                          stacklevel=3)

    def _remaining(self) -> int:
        """Most tokens any unfinished sequence may still emit (one host sync)."""
        s = self.state
        return int(torch.where(s["finished"], 0, self.max_new - s["n_out"]).max())

    @torch.no_grad()
    def finish(self) -> None:
        """Step until every sequence is finished. The host reads the device only between chunks of steps: a
        chunk is as many steps as the longest remaining sequence needs at best (all drafts accepted), at
        most ``CHECK_EVERY`` when stop tokens may end sequences early."""
        width = 2 if self.speculative else 1
        while (r := self._remaining()) > 0:
            n = math.ceil(r / width)
            if self.stops.numel():
                n = min(n, CHECK_EVERY)
            for _ in range(n):
                self.step()

    def results(self) -> list[list[int]]:
        """The emitted tokens of each sequence (up to and including its stop token)."""
        out, n = self.state["out"].tolist(), self.state["n_out"].tolist()
        return [row[:k] for row, k in zip(out, n)]

    def stats(self) -> dict[str, float]:
        """Speculation counters: drafts verified for active sequences, accepted, their ratio, tokens per step."""
        s = self.state
        drafted, accepted = int(s["drafted"].sum()), int(s["accepted"].sum())
        emitted = int(s["n_out"].sum()) - self.batch  # the prefill's tokens come from no verification step
        return {"drafted": drafted, "accepted": accepted, "acceptance": accepted / max(drafted, 1),
                "tokens_per_step": emitted / max(drafted, 1)}

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Prefill, decode to the end, return the new tokens of each prompt."""
        self.prefill(prompts)
        self.finish()
        return self.results()
