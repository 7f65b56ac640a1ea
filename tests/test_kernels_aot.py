"""Every Triton kernel compiled ahead of time for Hopper (sm_90) on this machine, no GPU needed.

The interpreter runs a kernel's Python, not Triton's compiler: code the compiler rejects (two returns of different
types from a constexpr branch, a loop-carried value changing type) passes every interpreter test and fails only on
the GPU, and so does a tile config whose shared memory exceeds what an H100/H200 block may use. This test

1. calls each kernel wrapper on small bf16 / FP8 inputs under the interpreter and records every launch: the
   kernel, its arguments' types (the pointer dtypes, int widths and 16-divisibility the JIT specialises on) and
   its constexprs;
2. compiles each recorded launch through Triton's whole CUDA pipeline for sm_90 (ptxas ships in Triton's wheel) in
   a subprocess without TRITON_INTERPRET, where ``triton.jit`` gives compilable kernels;
3. compiles every config of every autotuner over the same arguments there (with MINIDS_AUTOTUNE=1, the GPU lists),
   and, where a run without autotuning takes an autotuner's first config (the MoE GEMMs), checks that it fits in
   a block's shared memory (a launch would fail on the GPU; the autotuner skips other configs that do not fit).
   The configs are compiled over the recorded launch's other constexprs, so for the MoE GEMMs with the
   interpreter's row-block size, not necessarily the GPU's.

It compiles with the Triton installed here (CI installs the newest); the H200 this project measures on runs
Triton 3.6, so a pass here does not prove a compile there, only that the code is valid Triton for this version.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.runtime.interpreter import InterpretedFunction
from triton.tools.tensor_descriptor import TensorDescriptor

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches in the interpreter")

_PTR = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
        torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
        torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}


def _spec(fn, args: tuple, kwargs: dict, jit_kwargs: dict) -> dict | None:
    """What the JIT would compile for this launch: {"module", "name", "signature", "constexprs", "attrs",
    "options"}; None where an argument has a type this test does not translate (reported, not compiled).
    jit_kwargs: the kernel's ``triton.jit`` arguments (its do_not_specialize lists are honoured)."""
    params = inspect.signature(fn).parameters
    names = list(params)

    def named(key: str) -> set:
        return {names[v] if isinstance(v, int) else v for v in jit_kwargs.get(key) or ()}

    no_spec = named("do_not_specialize")
    no_align = no_spec | named("do_not_specialize_on_alignment")
    bound = dict(zip(names, args))
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas", "maxnreg") if k in kwargs}
    bound.update(kwargs)
    sig, consts, attrs = {}, {}, []
    for i, (name, p) in enumerate(params.items()):
        v = bound.get(name, p.default)
        if "constexpr" in str(p.annotation):
            if isinstance(v, triton.language.dtype):
                v = {"tl_dtype": str(v)}
            elif not (v is None or isinstance(v, (bool, int, float, str))):
                return None
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            if v.dtype not in _PTR:
                return None
            sig[name] = "*" + _PTR[v.dtype]
            if v.data_ptr() % 16 == 0 and name not in no_align:
                attrs.append(i)
        elif isinstance(v, TensorDescriptor):  # a TMA descriptor: its element type and block shape
            if v.base.dtype not in _PTR:
                return None
            sig[name] = f"tensordesc<{_PTR[v.base.dtype]}{list(v.block_shape)}>"
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1 and name not in no_spec:  # the JIT specialises an int equal to 1 as a constant
                sig[name], consts[name] = "constexpr", 1
                continue
            sig[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0 and name not in no_align:
                attrs.append(i)
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v is None:
            sig[name], consts[name] = "constexpr", None
        else:
            return None
    return {"module": fn.__module__, "name": fn.__name__, "signature": sig, "constexprs": consts, "attrs": attrs,
            "options": options}


def _record_launches(monkeypatch) -> tuple[list[dict], list[str]]:
    specs, untranslated = [], []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        spec = _spec(self.fn, args, dict(kwargs), getattr(self, "kwargs", {}))
        if spec is None:
            untranslated.append(self.fn.__name__)
        elif spec not in specs:
            specs.append(spec)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording_run)
    return specs, untranslated


def _call_every_kernel() -> None:
    """Each wrapper once or a few times, on small inputs in the dtypes the GPU runs (bf16, FP8)."""
    from minids.kernels import fp8, mla_decode, moe, rmsnorm

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16

    def rnd(*shape, dtype=bf):
        return torch.randn(*shape, generator=g).to(dtype)

    def norms(D: int, rows: int) -> None:
        x, r, w = rnd(rows, D).requires_grad_(), rnd(rows, D).requires_grad_(), rnd(D).requires_grad_()
        y = rmsnorm.rms_norm(x, w, 1e-6)
        y.backward(torch.ones_like(y))
        y, s = rmsnorm.add_rms_norm(x, r, w, 1e-6)
        (y.float().sum() + s.float().sum()).backward()

    for D, rows in ((512, 4), (512, 32), (1000, 3), (2048, 2), (7168, 1)):  # 32: a 16-divisible row count
        norms(D, rows)
    # what only huge inputs, the sweep or a spilling backward take: int64 offsets (one-pass and LOOPED), the fused
    # add in the LOOPED form, the backward without prefetch
    saved = rmsnorm._wide, rmsnorm._fwd_config, rmsnorm._PREFETCH
    try:
        rmsnorm._wide = lambda *a: True
        norms(512, 4)
        norms(2048, 2)
        rmsnorm._wide, rmsnorm._PREFETCH = saved[0], False
        rmsnorm._fwd_config = lambda D, fused=False: (1024, 2, 4, False, True)
        norms(2048, 2)
    finally:
        rmsnorm._wide, rmsnorm._fwd_config, rmsnorm._PREFETCH = saved

    N, D, E, inter, K = 12, 64, 4, 48, 2
    for dt in (bf, torch.float32):  # float32: the tiles' shared memory doubles
        x = rnd(N, D, dtype=dt).requires_grad_()
        wts = torch.rand(N, K, generator=g).requires_grad_()
        idx = torch.randint(0, E, (N, K), generator=g)
        wg, wu = rnd(E, inter, D, dtype=dt).requires_grad_(), rnd(E, inter, D, dtype=dt).requires_grad_()
        wd = rnd(E, D, inter, dtype=dt).requires_grad_()
        y, _ = moe.moe_experts(x, wts, idx, wg, wu, wd)
        y.float().sum().backward()

    for C, R, H, s_q, paged in ((512, 64, 16, 1, False), (512, 64, 16, 2, True), (256, 32, 16, 1, False)):
        B, L = 2, 70
        q = rnd(B, s_q, H, C + R)
        lens = torch.tensor([L, 5], dtype=torch.int32)
        if paged:
            cache = rnd(2 * B, 64, C + R)
            table = torch.arange(2 * B, dtype=torch.int32).view(B, 2)
            mla_decode.mla_decode(q, cache, lens, C, 0.1, block_table=table)
        else:
            mla_decode.mla_decode(q, rnd(B, L, C + R), lens, C, 0.1)

    x = rnd(130, 256)
    for exact in (False, True):
        fp8.act_quant(x, exact=exact)
        fp8.act_quant_t(x, exact=exact)
        fp8.act_quant_both(x, exact=exact)
    q8, s8 = fp8.act_quant(x)
    fp8.act_quant_t(q8, in_scale=s8)
    w8, ws = fp8.weight_quant(rnd(256, 256), transposed=True)[:2]
    fp8.weight_dequant(w8, ws)
    for variant in fp8.GEMM_VARIANTS:
        fp8.fp8_gemm(q8, s8, w8, ws, variant=variant)
    fp8.fp8_gemm(q8[:7], s8[:7], q8, s8)  # Wgrad form: both operands 1 x 128-scaled
    # the Wgrad form as the FP8 linear runs it: 128 x 1 scales of both operands M-major, the 64-row tiles (M > 256)
    dyt, dyt_s = fp8.act_quant_t(rnd(256, 384))
    xt, xt_s = fp8.act_quant_t(rnd(256, 136))
    fp8.fp8_gemm(dyt, dyt_s, xt, xt_s, variant="m64")


# modules whose autotuners, with autotuning off, run their first config (the others then take a fixed config
# from host code, which the recorded launches cover)
FIRST_CONFIG_RUNS = ["minids.kernels.moe"]

SCRIPT = r"""
import importlib, json, sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner

SMEM = 232448  # bytes of shared memory one block may use on an H100 / H200 (227 KB)
try:  # the ahead-of-time API this script speaks; another Triton's is a skip (exit 3), not a failure
    import inspect
    assert {"fn", "signature", "constexprs", "attrs"} <= set(inspect.signature(ASTSource).parameters)
    TARGET = GPUTarget("cuda", 90, 32)
except Exception as e:  # noqa: BLE001
    print(f"this Triton's ahead-of-time compile API differs: {type(e).__name__} {e}", file=sys.stderr)
    sys.exit(3)
job = json.load(sys.stdin)
specs, first_config_runs = job["specs"], set(job["first_config_runs"])


def jit_of(obj):
    while not isinstance(obj, triton.runtime.jit.JITFunction):
        obj = obj.fn
    return obj


def compile_spec(spec, consts=None, options=None):
    consts = {**spec["constexprs"], **(consts or {})}
    consts = {k: getattr(tl, v["tl_dtype"]) if isinstance(v, dict) else v for k, v in consts.items()}
    fn = jit_of(getattr(importlib.import_module(spec["module"]), spec["name"]))
    sig = {k: ("constexpr" if k in consts else t) for k, t in spec["signature"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in spec["attrs"] if sig[fn.arg_names[i]] != "constexpr"}
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        ck = triton.compile(src, target=TARGET, options={**spec["options"], **(options or {})})
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[-600:]}", None
    return None, ck.metadata.shared


report = {"errors": {}, "smem": {}, "compiled": 0}
for spec in specs:
    err, _ = compile_spec(spec)
    report["compiled"] += 1
    if err:
        report["errors"][f"{spec['name']} {spec['constexprs']}"] = err
# every autotuner's configs, over the arguments of the first recorded launch of its kernel
seen = set()
for mod_name in sorted({s["module"] for s in specs}):
    mod = importlib.import_module(mod_name)
    tuners = [v for v in vars(mod).values() if isinstance(v, Autotuner)]
    tuners += [t for v in vars(mod).values() if isinstance(v, dict) for t in v.values() if isinstance(t, Autotuner)]
    for tuner in tuners:
        name = jit_of(tuner).fn.__name__
        spec = next((s for s in specs if s["name"] == name and s["module"] == mod_name), None)
        if spec is None or id(tuner) in seen:
            continue
        seen.add(id(tuner))
        for i, cfg in enumerate(tuner.configs):
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            err, smem = compile_spec(spec, dict(cfg.kwargs), opts)
            report["compiled"] += 1
            key = f"{name} config {i} {cfg.kwargs} {opts}"
            if err:
                report["errors"][key] = err
            elif i == 0 and mod_name in first_config_runs and smem > SMEM:  # a run without autotuning takes it
                report["smem"][key] = smem
print(json.dumps(report))
"""


def test_every_kernel_compiles_for_sm90(monkeypatch):
    specs, untranslated = _record_launches(monkeypatch)
    _call_every_kernel()
    monkeypatch.undo()
    names = {s["name"] for s in specs}
    assert len(names) >= 10, names  # the recording saw the kernels (rmsnorm, moe, mla, fp8)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MINIDS_AUTOTUNE"] = "1"  # the autotuners' GPU config lists
    job = {"specs": specs, "first_config_runs": FIRST_CONFIG_RUNS}
    done = subprocess.run([sys.executable, "-c", SCRIPT], input=json.dumps(job), check=False, env=env,
                          capture_output=True, text=True, timeout=1200)
    if done.returncode == 3:  # the script's API probe failed: another Triton's ahead-of-time interface
        pytest.skip((done.stderr.strip().splitlines() or ["Triton's ahead-of-time compile API differs"])[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert not report["errors"], report["errors"]
    assert not report["smem"], f"first configs over the shared memory of a block: {report['smem']}"
    assert not untranslated, f"launches this test cannot translate: {sorted(set(untranslated))}"
    assert report["compiled"] > len(specs)  # every recorded launch, and the autotuners' configs


REG_QUANT_SCRIPT = r"""
import collections, json, re, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    import minids.kernels.fp8_reg_quant as m
    from minids.kernels.fp8 import _format_flags
    assert m.HAVE_GLUON
except Exception as e:  # noqa: BLE001
    print(f"no Gluon ahead-of-time compile here: {type(e).__name__} {e}", file=sys.stderr)
    sys.exit(3)
fn = m._reg_quant_kernel
flags = dict(_format_flags("e4m3", False, False, False))
out = []
for call, x_ty, in_scale, write_q in (("both", "*bf16", False, True), ("requant", "*fp8e4nv", True, False),
                                      ("t", "*fp32", False, False), ("t", "*bf16", False, False),
                                      ("weight", "*bf16", False, True)):
    spec = m.SPECS[call]
    consts = {"FMAX": flags["FMAX"], "MBITS": flags["MBITS"], "EMIN": flags["EMIN"], "UE8M0": False,
              "IN_SCALE": in_scale, "WRITE_Q": write_q, "WEIGHT": call == "weight", "SOFT_CVT": call == "weight",
              **dict(zip(("SPT_T", "SPT_K", "LANES_T", "WARPS_T", "NUM_WARPS"), spec)),
              **dict(zip(("GROUP_M", "GROUP_K"), m.ORDER.get(call, (0, 0))))}
    sig = {a: "constexpr" if a in consts else x_ty if a == "x_ptr" else "*fp8e4nv" if a in ("q_ptr", "qt_ptr")
           else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
             if sig[a] != "constexpr" and a != "stride_stk"}
    opts = {"num_warps": spec[4], **({"maxnreg": spec[5]} if len(spec) > 5 else {})}
    ck = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options=opts)
    ops = collections.Counter(re.findall(r"(?:st|ld)\.(?:global|shared)[.\w]*", ck.asm["ptx"]))
    out.append({"spec": spec, "x": x_ty, "write_q": write_q, "shared": ck.metadata.shared, "ops": ops})
print(json.dumps(out))
"""


def test_reg_quant_compiles_for_sm90_without_a_shared_memory_transpose():
    """kernels/fp8_reg_quant.py's premise, checked in its sm_90 PTX: no (128 x 128) tile goes through shared memory
    (at most 2 KB, the cross-warp part of the two amax reductions, against the 16 KB of an FP8 tile), the transposed
    copy leaves as vector stores (a thread's tokens of a feature in one), and x comes in as vector loads; each call
    at its layout (``SPECS``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", REG_QUANT_SCRIPT], check=False, env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode == 3:
        pytest.skip((done.stderr.strip().splitlines() or ["no Gluon here"])[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    vector = {4: "b32", 8: "v2.b32", 16: "v4.b32"}  # PTX global accesses of 4, 8, 16 bytes
    for k in json.loads(done.stdout.strip().splitlines()[-1]):
        spt_t, spt_k, _, _, num_warps = k["spec"][:5]
        per_thread = 128 * 128 // (32 * num_warps)  # values of the tile a thread holds
        assert k["shared"] <= 2048, k
        # qt: a thread's spt_t tokens of a feature (one byte each) in one store
        assert k["ops"].get(f"st.global.{vector[spt_t]}", 0) >= per_thread // spt_t, k
        # x: a thread's spt_k consecutive features in one load (at most 16 bytes)
        elem = {"*bf16": 2, "*fp32": 4, "*fp8e4nv": 1}[k["x"]]
        size = min(16, elem * spt_k)
        assert k["ops"].get(f"ld.global.{vector[size]}", 0) >= per_thread * elem // size, k
