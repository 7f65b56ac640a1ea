"""Triton RMSNorm (minids.kernels.rmsnorm) against the reference (minids.norm): forward and every gradient,
with and without the fused residual add, on odd shapes. On the CPU the kernels run under TRITON_INTERPRET=1 (set
by conftest) in float32; on CUDA the same tests also run in bf16.

Unwritten outputs are caught by NaN poisoning: torch's deterministic mode with ``fill_uninitialized_memory`` fills
every ``torch.empty`` (the kernels' output buffers) with NaN, and NaN never passes a comparison.
"""

import pytest
import torch
from minids.kernels import COUNTER_BUFFERS, HAVE_TRITON

from minids.norm import RMSNorm, add_rms_norm, rms_norm

pytestmark = [pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed"),
              pytest.mark.usefixtures("nan_poison")]

device = "cuda" if torch.cuda.is_available() else "cpu"
# float32: same formula, different summation order over D <= 7168: a few float32 ulps of O(1) values.
# bf16 (CUDA only; the interpreter does not model bf16 faithfully): rstd differs in its last float32 bits,
# which can flip the bf16 rounding of the normalised value or of dn by one bf16 ulp (2^-8 relative), so we
# compare by relative norm with a bound of a few ulps' worth.
DTYPES = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
SHAPES = [(1, 1), (7, 33), (3, 5, 1024), (4, 1024), (6, 2048), (3, 4096), (2, 7168), (127, 100), (0, 64)]
EPS = 1e-6


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    assert torch.isfinite(a).all(), "non-finite output: an element was not written"
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    else:
        # relative to the reference's norm, plus one bf16 step per element at unit scale: gradients that cancel to
        # ~0 (the (1, 1) shape's dx is exactly 0 in exact arithmetic) carry only rounding noise
        err = (a.float() - b.float()).norm()
        bound = 8e-3 * b.float().norm() + 2.0**-8 * a.numel() ** 0.5
        assert err <= bound, f"error {err:.2e} over bound {bound:.2e}"


def inputs(shape, dtype, w_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(shape[-1], generator=g)).to(device, w_dtype).requires_grad_()
    return x, w, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_backward(shape, dtype):
    from minids.kernels.rmsnorm import rms_norm as rms_norm_triton

    for seed, w_dtype in enumerate({dtype, torch.float32}):  # weight in x's dtype, and an fp32 weight (mixed)
        x, w, g = inputs(shape, dtype, w_dtype, seed)
        y = rms_norm_triton(x, w, EPS)
        y_ref = rms_norm(x, w, EPS)
        close(y, y_ref, dtype)
        dy = torch.randn(y.shape, generator=g).to(device, y.dtype)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        dx_ref, dw_ref = torch.autograd.grad(y_ref, (x, w), dy)
        close(dx, dx_ref, dtype)
        close(dw, dw_ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_add_rms_norm_forward_backward(shape, dtype):
    from minids.kernels.rmsnorm import add_rms_norm as add_rms_norm_triton

    x, w, g = inputs(shape, dtype, dtype, 7)
    r = torch.randn(shape, generator=g).to(device, dtype).requires_grad_()
    y, s = add_rms_norm_triton(x, r, w, EPS)
    y_ref, s_ref = add_rms_norm(x, r, w, EPS)
    close(y, y_ref, dtype)
    close(s, s_ref, dtype)
    dy = torch.randn(y.shape, generator=g).to(device, y.dtype)
    ds = torch.randn(s.shape, generator=g).to(device, s.dtype)
    # both outputs carry a gradient (the block uses s as the next residual), and only the normed one
    for loss, loss_ref in [((y * dy).sum() + (s * ds).sum(), (y_ref * dy).sum() + (s_ref * ds).sum()),
                           ((y * dy).sum(), (y_ref * dy).sum())]:
        grads = torch.autograd.grad(loss, (x, r, w), retain_graph=True)
        grads_ref = torch.autograd.grad(loss_ref, (x, r, w), retain_graph=True)
        for a, b in zip(grads, grads_ref):
            close(a, b, dtype)


@pytest.mark.parametrize("prefetch", [True, False])
def test_backward_many_tiles_per_program(prefetch, monkeypatch):
    # the persistent backward strides over many row tiles per program, the last one partial, with and without
    # loading the next tile ahead (PREFETCH; off where it would spill registers on the GPU)
    import minids.kernels.rmsnorm as k

    monkeypatch.setattr(k, "_PREFETCH", prefetch)
    x, w, g = inputs((300, 256), torch.float32, torch.float32, 13)
    r = torch.randn(300, 256, generator=g).to(device).requires_grad_()
    dy = torch.randn(300, 256, generator=g).to(device)
    ds = torch.randn(300, 256, generator=g).to(device)
    y, s = k.add_rms_norm(x, r, w, EPS)
    y_ref, s_ref = add_rms_norm(x, r, w, EPS)
    grads = torch.autograd.grad((y * dy).sum() + (s * ds).sum(), (x, r, w))
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + (s_ref * ds).sum(), (x, r, w))
    for a, b in zip(grads, grads_ref):
        close(a, b, torch.float32)
    dx, dw = torch.autograd.grad(k.rms_norm(x, w, EPS), (x, w), dy)
    dx_ref, dw_ref = torch.autograd.grad(rms_norm(x, w, EPS), (x, w), dy)
    close(dx, dx_ref, torch.float32)
    close(dw, dw_ref, torch.float32)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("variant", ["looped", "even", "looped_even", "wide", "looped_wide"])
def test_forward_variants(variant, fused, monkeypatch, launch_spy):
    # the sweep's forward variants: LOOPED (two passes over 32-wide chunks of a row, the last chunk partial; rows
    # in pairs, the last pair half out of range), EVEN (no masks; D == BLOCK_D, or a multiple of the LOOPED chunk,
    # and the row pairs divide n_rows),
    # and the int64 offsets that only inputs past 2^31 elements take (WIDE), forced here on a small one
    import minids.kernels.rmsnorm as k

    shape, cfg = {"looped": ((7, 100), (32, 2, 1, False, True)), "even": ((6, 64), (64, 2, 1, True, False)),
                  "looped_even": ((6, 96), (32, 2, 1, False, True)), "wide": ((7, 100), (128, 2, 1, True, False)),
                  "looped_wide": ((7, 100), (32, 2, 1, False, True))}[variant]
    monkeypatch.setattr(k, "_fwd_config", lambda D, fused=False: cfg)
    monkeypatch.setattr(k, "_wide", lambda *a: "wide" in variant)
    launches = launch_spy(k, "_rms_norm_fwd")
    x, w, g = inputs(shape, torch.float32, torch.float32, 17)
    dy = torch.randn(shape, generator=g).to(device)
    if fused:
        r = torch.randn(shape, generator=g).to(device).requires_grad_()
        (y, s), (y_ref, s_ref) = k.add_rms_norm(x, r, w, EPS), add_rms_norm(x, r, w, EPS)
        close(s, s_ref, torch.float32)
        leaves = (x, r, w)
    else:
        y, y_ref = k.rms_norm(x, w, EPS), rms_norm(x, w, EPS)
        leaves = (x, w)
    close(y, y_ref, torch.float32)
    for a, b in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_ref, leaves, dy)):
        close(a, b, torch.float32)
    assert [(c["LOOPED"], c["EVEN"], c["WIDE"]) for c in launches] == [
        ("looped" in variant, "even" in variant, "wide" in variant)]


def test_wide_offsets_from_2_31():
    # int64 offsets once the last element's offset (padded rows times D, plus the widest column tile) reaches 2^31
    import minids.kernels.rmsnorm as k

    assert not k._wide(16384, 7168, 8192)  # the benches' largest: 117M elements
    rows = (2**31 - 8192 - 1) // 7168  # the largest row count whose offsets stay below 2^31 with an 8192-wide tile
    assert not k._wide(rows, 7168, 8192) and k._wide(rows + 1, 7168, 8192)
    assert k._wide(2**31 // 512, 512, 512)


@pytest.mark.parametrize("P, D", [(300, 200), (1, 7), (129, 64), (2000, 1000)])
def test_dweight_partial_sum(P, D):
    # the backward's (P, D) partials summed over P: column strips of 64, 128 partial rows a program, the last of a
    # strip's programs summing their stage rows. Run twice: each last arriver must zero its counter again.
    import minids.kernels.rmsnorm as k

    g = torch.Generator().manual_seed(P + D)
    for dtype in (torch.float32, torch.bfloat16):
        part = torch.randn(P, D, generator=g).to(device)
        for _ in range(2):
            out = k._sum_rows(part, dtype)
            assert out.dtype == dtype and out.shape == (D,)
            # bf16: the float32 sum rounded once; within one bf16 ulp (2^-7 relative; the interpreter's conversion
            # need not round to nearest)
            torch.testing.assert_close(out.float(), part.sum(0), rtol=1e-5 if dtype == torch.float32 else 2**-7,
                                       atol=1e-4)
    assert not any(c.any() for bufs in COUNTER_BUFFERS.values() for c in bufs), "an arrival counter was left non-zero"


@pytest.mark.skipif(device != "cuda", reason="bf16 is checked on the GPU only")
def test_add_rms_norm_mixed_dtypes_on_gpu():
    # autocast: a bf16 sublayer output added onto the float32 residual stream; s, y and dx are float32, dresidual
    # float32 and dx bf16 (autograd casts each gradient to its input's dtype)
    from minids.kernels.rmsnorm import add_rms_norm as add_rms_norm_triton

    x, w, g = inputs((50, 1000), torch.bfloat16, torch.float32, 5)
    r = torch.randn(50, 1000, generator=g).to(device).requires_grad_()
    y, s = add_rms_norm_triton(x, r, w, EPS)
    y_ref, s_ref = add_rms_norm(x, r, w, EPS)
    close(y, y_ref, torch.float32)
    close(s, s_ref, torch.float32)
    dy = torch.randn(y.shape, generator=g).to(device)
    grads = torch.autograd.grad((y * dy).sum() + s.sum(), (x, r, w))
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + s_ref.sum(), (x, r, w))
    for a, b in zip(grads, grads_ref):
        close(a, b, torch.bfloat16)  # dx is bf16: one rounding of the float32 gradient


def test_leaf_gradients_accumulate_separately():
    # the fused backward returns one tensor for both dx and dresidual: the two .grad fields must not alias
    from minids.kernels.rmsnorm import add_rms_norm as add_rms_norm_triton

    x, w, g = inputs((5, 40), torch.float32, torch.float32, 3)
    r = torch.randn(5, 40, generator=g).to(device).requires_grad_()
    y, s = add_rms_norm_triton(x, r, w, EPS)
    (y.square().sum() + s.sum()).backward()
    torch.testing.assert_close(x.grad, r.grad, rtol=0, atol=0)  # d/dx = d/dresidual: s = x + residual
    r_grad = r.grad.clone()
    x.grad.add_(1.0)
    torch.testing.assert_close(r.grad, r_grad, rtol=0, atol=0)


def test_non_contiguous_input():
    from minids.kernels.rmsnorm import rms_norm as rms_norm_triton

    x, w, _ = inputs((9, 64), torch.float32, torch.float32, 11)
    xt = x.detach()[:, ::2]  # (9, 32), row stride 64, column stride 2
    close(rms_norm_triton(xt, w[:32].detach(), EPS), rms_norm(xt, w[:32].detach(), EPS), torch.float32)
    ws = w.detach()[::2]  # (32,) weight with stride 2
    close(rms_norm_triton(xt, ws, EPS), rms_norm(xt, ws, EPS), torch.float32)


def test_bad_inputs_are_one_line_errors():
    from minids.kernels.rmsnorm import add_rms_norm as add_rms_norm_triton
    from minids.kernels.rmsnorm import rms_norm as rms_norm_triton

    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rms_norm_triton(x, torch.ones(7, device=device), EPS)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm_triton(x, torch.randn(4, 9, device=device), torch.ones(8, device=device), EPS)


def test_module_impls_agree():
    norm = RMSNorm(48).to(device)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = torch.randn(2, 3, 48, device=device, requires_grad=True)
    r = torch.randn(2, 3, 48, device=device)
    out = {}
    for impl in ("torch", "triton"):
        norm.impl = impl
        y = norm(x)
        y2, s = norm.add_forward(x, r)
        dx, dw = torch.autograd.grad((y * y2).sum() + s.sum(), (x, norm.weight))
        out[impl] = (y, y2, s, dx, dw)
    for a, b in zip(out["triton"], out["torch"]):
        close(a, b, torch.float32)
    norm.impl = "cuda"
    with pytest.raises(ValueError, match="impl"):
        norm(x)
