"""Where the wide Gluon MLA decode kernel (H=128: 64-row blocks) spends a short cache's time: the whole call against
its parts, each from a CUDA graph, on the H=128 shapes that miss the issue's 300 TFLOP/s (1K, fixed and ragged) and
one that meets it (4K).

    python3 bench/mla_wide_parts.py --out bench/results --stem mla_decode-wide-parts   # the H200: about a minute

Per shape: ``call`` the default path (attention kernel, then the combine kernel as its programmatic dependent);
``attn`` the attention kernel alone (the combine launch left out: the output of cut sequences is then not
written, so this is a timing only); ``combine`` the combine kernel alone on random partials of the call's shape
and dtype (no PDL: its launch and schedule prologue are in it); ``floor`` the whole call with every length s_q (one
tile a sequence: the launch, schedule, query and first-tile loads, stores and the combine, with almost no tile work);
``no_cut`` the call with one program per sequence and row block (num_splits=B, fixed lengths: no partials, the
combine launched but finding nothing to merge; half the SMs or fewer busy). The call is checked against the float32
reference first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import graph_ms, metadata, write_results
from mla_decode import lengths, make_inputs, rotating, work

from minids.attention import mla_decode_ref
from minids.kernels import mla_decode_gluon as glu
from minids.kernels.mla_decode import MIN_UNITS, UNIT

CASES = [  # (B, mean length, ragged, s_q), V3's latent, 128 heads
    (32, 1024, False, 1), (32, 1024, True, 1), (128, 1024, False, 1), (128, 1024, True, 1), (32, 1024, False, 2),
    (32, 4096, False, 1),
]


def measure(B: int, mean: int, var: bool, s_q: int) -> dict:
    C, R, H = 512, 64, 128
    scale = (128 + 64) ** -0.5
    gen = torch.Generator().manual_seed(B * 7 + mean + s_q)
    lens = lengths(B, mean, var, s_q, gen)
    seqlens = lens.cuda()
    sets = make_inputs(B, s_q, H, C, R, lens, False, gen)
    q0, kv0, _ = sets[0]
    kind = glu.form(q0, kv0[..., :C], kv0[..., C:], C, None)
    if kind != "wide":
        raise SystemExit(f"mla_wide_parts: B={B} s_q={s_q} does not take the wide Gluon kernel here (form: {kind}); "
                         f"run it on an sm_90 GPU with Triton 3.6's Gluon")
    out = torch.empty(B, s_q, H, C, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(B, H, s_q, dtype=torch.float32, device="cuda")

    def call(q, kv, n, splits=None):
        return glu.mla_decode_gluon(q, kv[..., :C], kv[..., C:], n, scale, True, None, out, lse, kind,
                                    num_splits=splits)

    def timed(n, splits=None):
        fn = rotating(sets, lambda q_, kv_, t_: call(q_, kv_, n, splits))
        for _ in range(len(sets) - 1):
            fn()
        return graph_ms(fn) * 1e3

    grid = call(q0, kv0, seqlens)
    want = mla_decode_ref(q0, kv0, seqlens, C, scale, causal=True)[0].float()
    row = {"shape": f"V3 B={B} H={H} len={mean}{'~' if var else ''} s_q={s_q}", "programs": grid[0] * grid[1],
           "err": ((out.float() - want).abs().max() / want.abs().max()).item(), "call_us": timed(seqlens)}
    real_combine = glu.combine
    glu.combine = lambda *a, **k: None
    try:
        row["attn_us"] = timed(seqlens)
    finally:
        glu.combine = real_combine
    P = grid[1]
    o_part = torch.randn(2 * P, s_q * H, C, device="cuda").to(torch.bfloat16 if glu.PART_BF16 else torch.float32)
    l_part = torch.randn(2 * P, s_q * H, device="cuda")
    row["combine_us"] = graph_ms(
        lambda: glu.combine(o_part, l_part, seqlens, kv0.shape[1], MIN_UNITS, out, lse, UNIT)) * 1e3
    row["floor_us"] = timed(torch.full_like(seqlens, s_q))
    row["no_cut_us"] = timed(seqlens, B) if not var else float("nan")
    row["TFLOPs"] = work(int(lens.sum()), B, s_q, H, C, R)[1] / row["call_us"] / 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--stem", default="mla_decode-wide-parts")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("mla_wide_parts: needs a CUDA GPU (sm_90, with Triton 3.6's Gluon); none here")
    rows = []
    for case in CASES:
        rows.append(measure(*case))
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
        torch.cuda.empty_cache()
    if args.out:
        write_results(args.out, args.stem, metadata(), rows, list(rows[0]),
                      "Microseconds from CUDA graphs (bench/mla_wide_parts.py): call = the default path; attn = the "
                      "attention kernel without the combine launch; combine = the combine kernel alone on random "
                      "partials (no PDL); floor = the call with every length s_q; no_cut = one program per sequence "
                      "and row block (fixed lengths only). TFLOPs of the call as bench/mla_decode.py counts them; "
                      "err: the call's max error against the float32 reference, relative to its max.")


if __name__ == "__main__":
    main()
