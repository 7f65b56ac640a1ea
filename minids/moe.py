"""DeepSeekMoE: shared experts plus fine-grained routed experts, the router, dispatch and combine.

Layer output (V2P eq. 20; V3P eq. 12; the block adds the residual):
    y_t = FFN_shared(u_t) + sum_i g_{i,t} FFN_i(u_t)

Router (``route``), all in float32 (REFERENCE.md 3.2-3.4):
  s_{i,t} = softmax_i(u_t e_i) (V2, MoE-16B) or sigmoid(u_t e_i) (V3)
  selection scores = s + b (b = ``e_score_correction_bias``, noaux_tc only; V3P eqs. 13-16)
  group-limited routing (n_group > 1, not greedy): score each of the n_group contiguous expert groups
    by its max (group_limited_greedy, V2) or by the sum of its top-2 biased scores (noaux_tc, V3),
    keep topk_group groups, and mask the others with -inf (as the official code since 2025-02 and
    transformers 5's V3 router do; older transformers and its V2 router fill 0.0, REFERENCE.md 8.1)
  top-K over the (masked) selection scores; the gate weight is the UNBIASED s of the chosen experts:
    the bias changes which experts are chosen, never their weight (V3P 2.1.2)
  norm_topk_prob: g <- g / (sum_K g + 1e-20); then g <- g * routed_scaling_factor.

Dispatch (``moe_experts``; ``resolve_moe_impl`` picks the path): on CUDA with the Triton kernels, the fused
experts of ``minids.kernels.moe`` (gather on load, SwiGLU epilogue, deterministic combine, their own backward).
Otherwise the (token, expert) pairs are sorted by expert, the experts run as one grouped GEMM over contiguous row
blocks (``torch._grouped_mm``) or, where that is unavailable, a loop over experts on contiguous slices (one host
sync for the counts, none per expert), and the outputs are scattered back with their gate weights (index_add in
float32). No Python loop over tokens.

Shapes: N tokens (= B*S), D hidden, E routed experts, K experts per token, G groups, I expert width,
P = N*K (token, expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minids._kernels import kernels_available, require_kernels
from minids.config import ModelConfig
from minids.fp8 import BLOCK_DGRAD, fp8_linear
from minids.mlp import MLP

__all__ = [
    "DeepSeekMoE", "Experts", "MoEAlignment", "Router", "Routing", "grouped_mm_available", "moe_align", "moe_experts",
    "overlap_available", "route", "shared_beside_routed",
]


def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    top_k: int,
    scoring_func: str = "softmax",
    topk_method: str = "greedy",
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference router. logits: (N, E) router logits, bias: (E,) selection bias or None.

    Returns gate weights (N, K) float32, expert indices (N, K) int64, and the scores s (N, E) float32.
    """
    if logits.dim() != 2:
        raise ValueError(f"route: logits must be (tokens, experts), got {tuple(logits.shape)}; flatten the batch first")
    E = logits.shape[1]
    if bias is not None and bias.shape != (E,):
        raise ValueError(f"route: bias must be ({E},), one per expert, got {tuple(bias.shape)}")
    if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"route: topk_method={topk_method!r}: one of greedy, group_limited_greedy, noaux_tc")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"route: n_group={n_group}, topk_group={topk_group}: n_group must divide the {E} experts "
                         "and 1 <= topk_group <= n_group")
    allowed = E if topk_method == "greedy" or n_group == 1 else topk_group * (E // n_group)
    if not 1 <= top_k <= allowed:
        raise ValueError(f"route: top_k={top_k}: must lie in [1, {allowed}] (the experts of the "
                         f"{'kept groups' if allowed < E else 'layer'})")
    logits = logits.float()
    if scoring_func == "softmax":
        scores = logits.softmax(dim=-1)  # (N, E)
    elif scoring_func == "sigmoid":
        scores = logits.sigmoid()  # (N, E)
    else:
        raise ValueError(f"scoring_func={scoring_func!r}: one of softmax, sigmoid")
    choice = scores if bias is None else scores + bias.float()  # (N, E): selection only
    if topk_method != "greedy" and n_group > 1:
        N, E = choice.shape
        grouped = choice.view(N, n_group, E // n_group)  # (N, G, E/G)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G): top-2 sum (V3P 2.1.2)
        else:
            group_scores = grouped.amax(dim=-1)  # (N, G): best expert of the group (V2P 2.2.2)
        keep = group_scores.topk(topk_group, dim=-1).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(N, E)  # (N, E)
    indices = choice.topk(top_k, dim=-1).indices  # (N, K)
    return gate_weights(scores, indices, norm_topk_prob, routed_scaling_factor), indices, scores


def gate_weights(scores: torch.Tensor, indices: torch.Tensor, norm_topk_prob: bool,
                 routed_scaling_factor: float) -> torch.Tensor:
    """The gate weights (N, K) float32 of chosen experts indices (N, K): their unbiased scores (N, E), normalised
    to sum 1 if norm_topk_prob, times routed_scaling_factor (``route``'s last step)."""
    weights = scores.gather(1, indices)  # (N, K)
    if norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor


class MoEAlignment(NamedTuple):
    """The (token, expert) pairs in expert order, each expert's rows padded to a multiple of ``block_m``.

    Pair p = t * K + k is token t's k-th choice. Padded rows hold pair -1. Every size is fixed by (P, E, block_m)
    alone (P_pad = P + E * (block_m - 1) rounded up to block_m), so nothing needs the counts on the host.
    """

    sorted_pair: torch.Tensor  # (P_pad,) int32: the pair at each padded row, -1 for padding
    block_expert: torch.Tensor  # (P_pad / block_m,) int32: the expert of each row block, -1 past the last one
    pair_row: torch.Tensor  # (P,) int32: the padded row of each pair (the inverse of sorted_pair)
    expert_start: torch.Tensor  # (E + 1,) int32: first padded row of each expert; [E] = rows in use
    counts: torch.Tensor  # (E,) int64: pairs per expert


def moe_align(indices: torch.Tensor, n_experts: int, block_m: int) -> MoEAlignment:
    """Sort the (token, expert) pairs of indices: (N, K) by expert and pad each expert to a multiple of block_m.

    All on the device, with no host synchronisation and shapes that depend only on (N, K, E, block_m), so it can be
    captured in a CUDA graph. This is what the Triton grouped GEMMs (``minids.kernels.moe``) iterate over: row
    block b belongs to expert block_expert[b], and its rows gather tokens sorted_pair // K.
    """
    if indices.dim() != 2 or indices.is_floating_point() or indices.dtype == torch.bool or block_m < 1:
        raise ValueError(f"moe_align: indices must be (N, K) integers and block_m >= 1, got {tuple(indices.shape)} "
                         f"{indices.dtype}, block_m={block_m}")
    N, K = indices.shape
    P, E, dev = N * K, n_experts, indices.device
    n_blocks = (P + E * (block_m - 1) + block_m - 1) // block_m
    flat = indices.reshape(-1).long()  # (P,) (int32 indices too)
    order = flat.argsort(stable=True)  # (P,): pairs sorted by expert
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m  # (E,)
    end = padded.cumsum(0)  # (E,): one past each expert's last padded row
    start = end - padded  # (E,)
    first = counts.cumsum(0) - counts  # (E,): first sorted pair of each expert
    expert_of = flat[order]  # (P,): expert of each sorted pair
    rank = torch.arange(P, device=dev) - first[expert_of]  # (P,): position inside its expert
    row = start[expert_of] + rank  # (P,): padded row of each sorted pair
    sorted_pair = torch.full((n_blocks * block_m,), -1, dtype=torch.int32, device=dev)
    sorted_pair[row] = order.to(torch.int32)  # (P_pad,)
    pair_row = torch.empty(P, dtype=torch.int32, device=dev)
    pair_row[order] = row.to(torch.int32)  # (P,)
    block_start = torch.arange(n_blocks, device=dev) * block_m  # (n_blocks,)
    block_expert = torch.searchsorted(end, block_start, right=True)  # (n_blocks,): E past the last expert
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)
    expert_start = torch.cat([start, end[-1:]]).to(torch.int32)  # (E + 1,)
    return MoEAlignment(sorted_pair, block_expert, pair_row, expert_start, counts)


_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs on this device type and dtype in the installed torch (probed once)."""
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.zeros(16, 16, device=key[0], dtype=dtype)
                b = torch.zeros(2, 16, 16, device=key[0], dtype=dtype)
                torch._grouped_mm(a, b.transpose(-2, -1), offs=torch.tensor([8, 16], device=key[0], dtype=torch.int32))
            except (RuntimeError, NotImplementedError, TypeError):  # this torch has no kernel here: use the loop
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects a gradient with zero strides (the gradient of .sum()).
    if t.requires_grad and not torch.compiler.is_compiling():
        t.register_hook(lambda g: g.contiguous())
    return t


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of x: (P, Din) in expert blocks ending at offs: (E,); w: (E, Dout, Din) -> (P, Dout)."""
    return _contiguous_grad(torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in: autocast's where it is on (as F.linear would), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _grouped_aligned(dtype: torch.dtype, hidden: int, inter: int) -> bool:
    """torch._grouped_mm needs every row stride a multiple of 16 bytes: hidden and expert width (fp32: multiples of 4)."""
    return all(n * dtype.itemsize % 16 == 0 for n in (hidden, inter))


def resolve_moe_impl(
    impl: str, device: torch.device, dtype: torch.dtype, hidden: int, inter: int, fp8: bool | str = False
) -> str:
    """The implementation ``moe_experts`` runs for these experts: "triton", "grouped" or "loop" (dtype: the GEMMs'
    compute dtype). fp8 always takes the loop; "auto" takes Triton on CUDA where the kernels are available (not under
    torch.compile), else torch._grouped_mm where it runs for this dtype and alignment, else the loop."""
    if impl not in ("auto", "grouped", "loop", "triton"):
        raise ValueError(f"impl={impl!r}: one of auto, grouped, loop, triton")
    if fp8:
        return "loop"
    if impl != "auto":
        return impl
    compiling = torch.compiler.is_compiling()
    if device.type == "cuda" and not compiling and kernels_available():
        return "triton"
    # under torch.compile the grouped op's shape function accepts only bf16 (torch 2.11-2.13)
    compilable = dtype == torch.bfloat16 or not compiling
    ok = _grouped_aligned(dtype, hidden, inter) and compilable and grouped_mm_available(device, dtype)
    return "grouped" if ok else "loop"


_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def overlap_available(x: torch.Tensor) -> bool:
    """Whether ``shared_beside_routed`` may put the shared experts on a side stream for x: a CUDA tensor, outside a
    CUDA-graph capture (the decode graphs keep one stream) and outside torch.compile (which orders streams itself)."""
    # is_compiling first: dynamo folds it to a constant, and cannot trace the capture query (it returns a bool)
    return x.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()


def shared_beside_routed(x: torch.Tensor, routed, shared, overlap: bool = True):
    """(routed(), shared(x)): with overlap (and ``overlap_available``), shared(x) runs on a side CUDA stream while
    routed() runs on the current one, so the cuBLAS GEMMs of the shared experts fill what the routed kernels leave
    idle (wave tails, the routing sort, the combine). The same operations on the same inputs (cuBLAS may take another
    kernel on the side stream's handle: results can differ by rounding, bf16 ulps on the H200).

    routed: () -> any; shared: (N, D) -> (N, D). Autograd runs each backward op on its forward's stream, so the
    backward overlaps the same way. The caller adds the two on the current stream, after the join here.
    """
    if not (overlap and overlap_available(x)):
        return routed(), shared(x)
    main = torch.cuda.current_stream(x.device)
    side = _SIDE_STREAMS.get(x.device.index)
    if side is None:
        side = _SIDE_STREAMS[x.device.index] = torch.cuda.Stream(x.device)
    side.wait_stream(main)  # x is ready
    with torch.cuda.stream(side):
        ys = shared(x)
    out = routed()
    main.wait_stream(side)  # join: ys is ready for the add
    ys.record_stream(main)  # ys was allocated on the side stream and is read on the main one
    # (x needs no record_stream: whatever reuses its memory on the main stream is queued after the join)
    return out, ys


def check_experts_args(x, weights, indices, w_gate, w_up, w_down) -> None:
    """One clear ValueError for shapes ``moe_experts`` (either implementation) cannot take."""
    if x.dim() != 2 or indices.shape != weights.shape or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"moe_experts: x {tuple(x.shape)} must be (N, D), weights {tuple(weights.shape)} and indices "
            f"{tuple(indices.shape)} (N, K)"
        )
    if indices.is_floating_point() or indices.dtype == torch.bool:
        raise ValueError(f"moe_experts: indices must hold expert numbers (integers), got {indices.dtype}")
    if w_gate.dim() != 3:
        raise ValueError(f"moe_experts: w_gate {tuple(w_gate.shape)} must be (E, I, D)")
    E, I, D = w_gate.shape
    if w_up.shape != (E, I, D) or w_down.shape != (E, D, I) or x.shape[1] != D:
        raise ValueError(
            f"moe_experts: w_gate {tuple(w_gate.shape)} and w_up {tuple(w_up.shape)} must be (E, I, D), w_down "
            f"{tuple(w_down.shape)} (E, D, I), with D = x.shape[1] = {x.shape[1]}"
        )


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    impl: str = "auto",
    fp8: bool | str = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The routed part of the MoE layer: sum_k weights[t, k] * FFN_{indices[t, k]}(x[t]).

    x: (N, D), weights: (N, K) float32, indices: (N, K), w_gate / w_up: (E, I, D), w_down: (E, D, I).
    impl: "grouped" (torch._grouped_mm), "loop" (per-expert slices), "triton" (``minids.kernels.moe``: gathered
    grouped GEMMs with fused SwiGLU and combine, its own backward) or "auto" (triton on CUDA where Triton is
    installed and not under torch.compile, else grouped where it runs, else loop).
    Under autocast the GEMMs run in autocast's dtype, as F.linear would. fp8: every expert GEMM through
    ``minids.fp8.fp8_linear`` on the per-expert loop: True or "sim" simulated, "real" FP8 GEMMs,
    "sim-block-dgrad" simulated with Dgrad's activation gradient in 128x128 blocks.
    Returns (y (N, D) in x.dtype, tokens per expert (E,) int64).
    """
    check_experts_args(x, weights, indices, w_gate, w_up, w_down)
    dt = _compute_dtype(x)
    impl = resolve_moe_impl(impl, x.device, dt, x.shape[-1], w_gate.shape[1], fp8)
    if impl == "triton":
        require_kernels("moe impl='triton'")
        from minids.kernels.moe import moe_experts as moe_experts_triton

        return moe_experts_triton(x, weights, indices, w_gate, w_up, w_down)
    N, K = indices.shape
    E = w_gate.shape[0]
    flat = indices.reshape(-1).long()  # (P,) (int32 indices too)
    order = flat.argsort(stable=True)  # (P,): pairs sorted by expert
    token = order // K  # (P,): source token of each sorted pair
    counts = torch.zeros(E, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))  # (E,)
    xs = x.index_select(0, token)  # (P, D), expert-contiguous (deterministic backward, unlike x[token])
    if impl == "grouped":
        if not _grouped_aligned(dt, x.shape[-1], w_gate.shape[1]):
            raise ValueError(
                f"impl='grouped': torch._grouped_mm needs hidden ({x.shape[-1]}) and expert width "
                f"({w_gate.shape[1]}) to be multiples of {16 // dt.itemsize} in {dt}; use impl='loop'"
            )
        offs = counts.cumsum(0).to(torch.int32)  # (E,): end row of each expert's block
        xs, wg, wu, wd = xs.to(dt), w_gate.to(dt), w_up.to(dt), w_down.to(dt)
        h = F.silu(_grouped_linear(xs, wg, offs)) * _grouped_linear(xs, wu, offs)  # (P, I)
        ys = _grouped_linear(h, wd, offs)  # (P, D)
    else:  # loop
        chunks = xs.split(counts.tolist())  # one host sync for all experts
        # unbind, not w[e]: indexing a stacked weight E times makes E full-size gradients in backward
        ws = zip(chunks, w_gate.unbind(0), w_up.unbind(0), w_down.unbind(0))
        lin = partial(fp8_linear, real=fp8 == "real", dgrad_block=fp8 == BLOCK_DGRAD) if fp8 else F.linear
        ys = torch.cat([lin(F.silu(lin(c, g)) * lin(c, u), d) for c, g, u, d in ws])  # (P, D)
    ys = ys.float() * weights.reshape(-1)[order].unsqueeze(-1)  # (P, D) float32
    y = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device).index_add_(0, token, ys)  # (N, D)
    return y.to(x.dtype), counts


class Router(nn.Module):
    """The gate: ``weight`` (E, D) and, for noaux_tc, the float32 selection bias buffer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.uses_selection_bias:
            # a buffer: it receives no gradient; the balance rule updates it (V3P 2.1.2)
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
            # tokens routed to each expert by training forwards since the last bias update (minids.balance)
            self.register_buffer("load_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.float32), persistent=False)
        else:
            self.e_score_correction_bias = None
            self.load_counts = None

    def _apply(self, fn, recurse=True):
        # keep the selection bias and the load counts in float32 whatever dtype the model is cast to
        keep = {n: b for n in ("e_score_correction_bias", "load_counts") if (b := getattr(self, n)) is not None}
        super()._apply(fn, recurse)
        dev = self.weight.device
        for n, b in keep.items():
            setattr(self, n, torch.empty_like(b, device=dev) if b.is_meta else b.to(device=dev, dtype=torch.float32))
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> weights (N, K) float32, indices (N, K), scores (N, E) float32."""
        c = self.cfg
        with torch.autocast(x.device.type, enabled=False):  # float32 even inside bf16 autocast
            logits = F.linear(x.float(), self.weight.float())  # (N, E)
        return route(
            logits, self.e_score_correction_bias, top_k=c.num_experts_per_tok, scoring_func=c.scoring_func,
            topk_method=c.topk_method, n_group=c.n_group, topk_group=c.topk_group,
            norm_topk_prob=c.norm_topk_prob, routed_scaling_factor=c.routed_scaling_factor,
        )


class Experts(nn.Module):
    """E routed SwiGLU experts stored stacked: gate_proj / up_proj (E, I, D), down_proj (E, D, I).

    Checkpoint key ``experts.{e}.gate_proj.weight`` is ``experts.gate_proj[e]`` here.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))


@dataclass
class Routing:
    """What one MoE layer's router decided, for balance losses and statistics."""

    counts: torch.Tensor  # (E,) tokens per routed expert
    scores: torch.Tensor  # (N, E) float32 scores s (with gradient)
    indices: torch.Tensor  # (N, K) chosen experts
    shape: tuple[int, int]  # (B, S): N = B * S tokens


class DeepSeekMoE(nn.Module):
    """x: (B, S, D) -> (B, S, D) and the layer's Routing."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_intermediate_size) if cfg.n_shared_experts else None
        self.impl = "auto"  # "grouped" | "loop" | "triton" | "auto"; set through Transformer.set_moe_impl
        self.fp8: bool | str = False  # routed expert GEMMs through FP8 ("sim" or "real"); set by enable_fp8
        # on CUDA, the shared experts run on a side stream beside the routed ones (shared_beside_routed)
        self.overlap_shared = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        weights, indices, scores = self.gate(x)
        e = self.experts

        def routed() -> tuple[torch.Tensor, torch.Tensor]:
            return moe_experts(x, weights, indices, e.gate_proj, e.up_proj, e.down_proj, self.impl, self.fp8)

        if self.shared_experts is not None:
            (y, counts), ys = shared_beside_routed(x, routed, self.shared_experts, self.overlap_shared)
            y = y + ys
        else:
            y, counts = routed()
        if self.training and self.gate.load_counts is not None:
            with torch.no_grad():
                self.gate.load_counts.add_(counts)  # on device: no host sync
        return y.view(shape), Routing(counts, scores, indices, (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0]))
