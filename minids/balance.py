"""Load balancing of the routed experts: the auxiliary-loss-free bias update, balance losses, MaxVio.

Bias update (DeepSeek-V3 2.1.2, 4.2; Wang et al. 2024, arXiv 2408.15664, Algorithm 1):
    after each optimizer step, with c_i the tokens routed to expert i over the WHOLE batch
    (all gradient-accumulation micro-batches, all data-parallel ranks) and c_mean their mean,
        b_i <- b_i + gamma * sign(c_mean - c_i)
    overloaded experts lose gamma of selection score, underloaded ones gain it. gamma = 0.001 in V3
    (then 0 for the last 500B tokens). The bias only changes which experts are chosen, never their
    gate weight, and it receives no gradient. This sign rule is the paper's (and Megatron-LM's).
    Variant "mean_centred": the same step followed by b <- b - mean(b), which keeps the biases
    centred at zero (adding a constant to every bias changes no selection, so it is a gauge choice).
    Variant "error": b_i <- b_i + gamma * (c_mean - c_i) / c_mean, the paper's non-sign rule with the
    error normalised by the mean load (the paper does not state its normalisation: REFERENCE-2 A7-6).

Balance losses (each returns a scalar to be multiplied by its alpha):
    sequence-wise (V3 eqs. 17-20): per sequence of T tokens, f_i = E/(K T) sum_t 1[i chosen for t],
        P_i = 1/T sum_t s'_{i,t} with s' = s / sum_j s_j (normalised over all experts);
        L = sum_i f_i P_i, averaged over sequences. alpha = 1e-4 in V3.
    expert-level (V2 eq. 23; DeepSeekMoE): the same with the raw scores s (softmax in V2), per
        sequence as the released code does ("seq_aux"); "batch" computes it once over all tokens.
    device-level (V2 eq. 25): experts in D = n_group contiguous groups; f'_d = mean_{j in d} f_j,
        P'_d = sum_{j in d} P_j; L = sum_d f'_d P'_d.
    communication (V2 eq. 28): f''_d = D/(M T) sum_t 1[token t sends to group d], M = topk_group;
        L = sum_d f''_d P'_d.
    Which tokens count as "chosen": the experts actually selected (after the bias and group limiting),
    as the released V2 code does; V3 eq. 18 writes the unbiased top-K (REFERENCE.md 8.14).

MaxVio (arXiv 2408.15664 eq. 4): (max_i c_i - c_mean) / c_mean, with c_mean = K T / E the load under
perfect balance. MaxVio_batch uses one training batch's counts; MaxVio_global the counts summed over
a held-out set. Both are averaged over the MoE layers in the paper's tables.

Shapes: B batch, S length, N = B*S tokens, E routed experts, K experts per token, G groups, L layers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "BiasBalancer", "comm_balance_loss", "device_balance_loss", "expert_balance_loss", "max_vio",
    "sequence_balance_loss", "update_bias",
]


def max_vio(counts: torch.Tensor) -> torch.Tensor:
    """MaxVio of token counts (..., E) -> (...): (max - mean) / mean, mean = the perfectly balanced load."""
    c = counts.float()
    mean = c.mean(dim=-1)
    return (c.amax(dim=-1) - mean) / mean


def update_bias(bias: torch.Tensor, counts: torch.Tensor, gamma: float, rule: str = "sign") -> None:
    """One bias step in place. bias: (E,) float32, counts: (E,) tokens per expert over the whole batch."""
    c = counts.float()
    err = c.mean() - c  # (E,): positive for underloaded experts
    if rule in ("sign", "mean_centred"):
        bias.add_(gamma * torch.sign(err))
        if rule == "mean_centred":
            bias.sub_(bias.mean())
    elif rule == "error":
        bias.add_(gamma * err / c.mean().clamp(min=1.0))
    else:
        raise ValueError(f"bias update rule {rule!r}: one of sign, mean_centred, error")


class BiasBalancer:
    """The aux-loss-free balancer as an optimizer-step hook.

    During training forwards each MoE router adds its token counts to a float32 buffer on its device
    (no host sync). ``step()`` after ``optimizer.step()`` all-reduces the counts across data-parallel
    ranks (when torch.distributed is initialised), updates every bias with ``update_bias`` and clears
    the counts; it returns the batch MaxVio per layer, for logging.

        balancer = BiasBalancer(model, gamma=1e-3)
        for micro_batch in batch: model(...).loss.backward()
        optimizer.step(); balancer.step()
    """

    def __init__(self, model: torch.nn.Module, gamma: float = 1e-3, rule: str = "sign"):
        from minids.moe import Router

        self.routers = [m for m in model.modules() if isinstance(m, Router) and m.e_score_correction_bias is not None]
        self.gamma = gamma
        self.rule = rule
        update_bias(torch.zeros(1), torch.zeros(1), 0.0, rule)  # validate the rule name now

    @torch.no_grad()
    def step(self, gamma: float | None = None, group: dist.ProcessGroup | None = None) -> torch.Tensor | None:
        """Update every bias from the accumulated counts; returns MaxVio_batch per layer (L,) or None."""
        if not self.routers:
            return None
        gamma = self.gamma if gamma is None else gamma
        counts = torch.stack([r.load_counts for r in self.routers])  # (L, E)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=group)
        if counts.sum() == 0:
            return None
        for r, c in zip(self.routers, counts):
            update_bias(r.e_score_correction_bias, c, gamma, self.rule)
            r.load_counts.zero_()
        return max_vio(counts)


def _fractions(indices: torch.Tensor, n_experts: int, shape: tuple[int, ...]) -> torch.Tensor:
    """f_i = E/(K T) * tokens choosing i, per sequence. indices: (N, K) -> (B, E), with shape = (B, S)."""
    B, S = shape
    K = indices.shape[-1]
    flat = indices.reshape(B, S * K)
    counts = torch.zeros(B, n_experts, device=indices.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts * n_experts / (K * S)  # (B, E)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss (before alpha). scores: (N, E), indices: (N, K)."""
    B, S = shape
    E = scores.shape[-1]
    f = _fractions(indices, E, shape)  # (B, E), no gradient
    s = scores / scores.sum(dim=-1, keepdim=True)  # (N, E): normalised over all experts
    P = s.view(B, S, E).mean(dim=1)  # (B, E)
    return (f * P).sum(dim=-1).mean()


def expert_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], per_sequence: bool = True
) -> torch.Tensor:
    """V2 / DeepSeekMoE expert-level balance loss (before alpha1); per sequence, or over the whole batch."""
    B, S = shape
    if not per_sequence:
        B, S = 1, B * S
    E = scores.shape[-1]
    f = _fractions(indices, E, (B, S))  # (B, E)
    P = scores.view(B, S, E).mean(dim=1)  # (B, E)
    return (f * P).sum(dim=-1).mean()


def device_balance_loss(scores: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], n_group: int) -> torch.Tensor:
    """V2's device-level balance loss (before alpha2): experts grouped into n_group contiguous devices."""
    B, S = shape
    E = scores.shape[-1]
    f = _fractions(indices, E, shape).view(B, n_group, E // n_group).mean(dim=-1)  # (B, G): mean f_j
    P = scores.view(B, S, E).mean(dim=1).view(B, n_group, E // n_group).sum(dim=-1)  # (B, G): sum P_j
    return (f * P).sum(dim=-1).mean()


def comm_balance_loss(
    scores: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], n_group: int, topk_group: int
) -> torch.Tensor:
    """V2's communication balance loss (before alpha3): f''_d = D/(M T) * tokens sending to device d."""
    B, S = shape
    E = scores.shape[-1]
    group = indices // (E // n_group)  # (N, K): the device of each chosen expert
    sent = torch.zeros(B * S, n_group, device=scores.device).scatter_(1, group, 1.0)  # (N, G): 1 per device used
    f = sent.view(B, S, n_group).sum(dim=1) * n_group / (topk_group * S)  # (B, G)
    P = scores.view(B, S, E).mean(dim=1).view(B, n_group, E // n_group).sum(dim=-1)  # (B, G)
    return (f * P).sum(dim=-1).mean()


BALANCE_LOSSES = ("sequence", "expert", "batch", "device", "comm")


def recipe_balance(cfg) -> dict[str, float]:
    """The balance losses of a model config's published recipe ({loss name: alpha}), what ``minids train`` adds
    unless given ``balance``: none for a dense model; V3's sequence-wise loss at alpha 1e-4 beside the bias rule
    for the aux-loss-free routers (``topk_method`` noaux_tc; V3P 4.2); otherwise the V2 / DeepSeekMoE
    expert-level loss at the config's ``aux_loss_alpha`` (0.001 in the published V2, V2-Lite and MoE-16B configs,
    and 0.001 where the config has none: the alpha1 of V2-Lite and MoE-16B, REFERENCE.md 1.1, 3.3), per sequence
    unless ``seq_aux`` is false. The V2 paper's alpha1 for the full V2 is 0.003 against its config's 0.001
    (REFERENCE.md 8); its device and communication losses (alpha2 0.05, alpha3 0.02) describe expert-parallel
    devices and are left to the caller (``{"device": ..., "comm": ...}``)."""
    if not cfg.is_moe:
        return {}
    if cfg.uses_selection_bias:
        return {"sequence": 1e-4}
    alpha = cfg.aux_loss_alpha if cfg.aux_loss_alpha is not None else 1e-3
    return {"batch" if cfg.seq_aux is False else "expert": float(alpha)}


def balance_losses(
    routing: Iterable, alphas: dict[str, float], n_group: int | None, topk_group: int | None
) -> dict[str, torch.Tensor]:
    """Each requested loss (alpha != 0), summed over MoE layers and times its alpha: {"sequence": ..., ...}."""
    unknown = set(alphas) - set(BALANCE_LOSSES)
    if unknown:
        raise ValueError(f"unknown balance loss(es) {sorted(unknown)}; known: {', '.join(BALANCE_LOSSES)}")
    out: dict[str, torch.Tensor] = {}
    for r in routing:
        shape = r.shape
        for name, alpha in alphas.items():
            if not alpha:
                continue
            if name == "sequence":
                v = sequence_balance_loss(r.scores, r.indices, shape)
            elif name == "expert":
                v = expert_balance_loss(r.scores, r.indices, shape, per_sequence=True)
            elif name == "batch":
                v = expert_balance_loss(r.scores, r.indices, shape, per_sequence=False)
            elif name == "device":
                v = device_balance_loss(r.scores, r.indices, shape, n_group)
            else:
                v = comm_balance_loss(r.scores, r.indices, shape, n_group, topk_group)
            out[name] = out.get(name, 0.0) + alpha * v
    return out
