"""Offline sm_90 builds of the MLA decode kernels, for register / spill / shared-memory / SASS counts without a GPU.

Uses the ptxas and cuobjdump that ship inside the Triton wheel. The Gluon kernels are written against Triton 3.6's API
(the device's release), so run this under a 3.6 install beside the project's, e.g.

    python -m venv --system-site-packages /tmp/t36 && /tmp/t36/bin/pip install triton==3.6.0
    PYTHONPATH=. /tmp/t36/bin/python bench/aot_sm90.py [--jit-like]

``--jit-like`` specializes the Gluon builds' integers and pointers as the device's JIT does for a representative call
(B=32, H=16 or 128; integers equal to 1 become constants: S_Q at s_q=1, the lse strides), else they are plain i32.
Each build: registers, stack, shared memory, SASS opcode counts, and the tile loop's (``tile_loop``: its length, CTA
barriers, shuffles, shared-memory loads and stores, spill reloads). Counts are the compiler's, not measurements;
bench/results/kernels_notes.md quotes them as such.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import minids.kernels.mla_decode as tri
import minids.kernels.mla_decode_gluon as glu
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import mangle_type

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")


def tile_loop(sass: str) -> dict[str, int]:
    """The loop of a cuobjdump -sass listing that holds a kernel's MMAs: of the innermost loops with an HGMMA (a
    loop: a branch back to an earlier address, the address range between), the one with the most. Its instruction
    count and the count of each opcode (the mnemonic before its first dot; predicated ones included: code under a
    branch inside the loop, e.g. the last tile's, counts whether or not it runs). Empty when no loop holds an
    HGMMA. ``counts`` reports its barriers (BAR), shuffles, shared-memory loads / stores and spill reloads."""
    rows = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in
            re.finditer(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*);", sass, re.MULTILINE)]
    loops = []
    for a, op, rest in rows:
        target = re.search(r"(0x[0-9a-f]+)\s*$", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < a:
            loops.append((int(target.group(1), 16), a))
    mma = [(lo, hi) for lo, hi in loops if any(lo <= a <= hi and op == "HGMMA" for a, op, _ in rows)]
    inner = [(lo, hi) for lo, hi in mma if not any(lo <= x <= y <= hi and (x, y) != (lo, hi) for x, y in mma)]
    bodies = [[op for a, op, _ in rows if lo <= a <= hi] for lo, hi in inner]
    best = max(bodies, key=lambda b: (b.count("HGMMA"), -len(b)), default=None)
    return {"instructions": len(best), **collections.Counter(best)} if best else {}


def counts(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", sass, re.MULTILINE))
    regs = re.search(r"REG:(\d+) STACK:(\d+)", res)
    loop = tile_loop(sass)
    inner = (f"; tile loop {loop['instructions']} (BAR {loop.get('BAR', 0)}, SHFL {loop.get('SHFL', 0)}, LDS "
             f"{loop.get('LDS', 0)}, STS {loop.get('STS', 0)}, LDL {loop.get('LDL', 0)})" if loop else "")
    return (f"registers {regs.group(1)}, stack {regs.group(2)} B, SASS {sum(ops.values())} (HGMMA {ops['HGMMA']}, "
            f"HMMA {ops['HMMA']}, LDL {ops['LDL']}, STL {ops['STL']}){inner}")


def jit_ints(kind: str, rows: int, paged: bool, C: int) -> dict[str, int]:
    """The integer arguments of a representative call (B=32, cache capacity 1024, H=16 at 16 and 32 rows, else 128;
    contiguous outputs): what the device's JIT specializes on (``--jit-like``)."""
    H = 16 if kind != "wide" else rows
    s_q = rows // H
    return {"stride_tb": 16 if paged else 0, "stride_ob": s_q * H * C, "stride_os": H * C, "stride_oh": C,
            "stride_lb": H * s_q, "stride_ls": 1, "stride_lh": s_q, "capacity": 1024, "B": 32, "H": H, "S_Q": s_q,
            "min_units": glu.MIN_UNITS, "max_pieces": max(2, glu.MAX_PIECES)}


def gluon_kernel(kind: str, rows: int, paged: bool, C: int = 512, trace: bool = False, jit_like: bool = False) -> str:
    """One Gluon build's counts. jit_like: specialized as the JIT specializes a launch of ``jit_ints``' values
    (integers equal to 1 become constants, multiples of 16 and the pointers are marked 16-divisible), so the
    counts are those of the build the device runs for that call; else every integer is a plain i32."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.experimental.gluon._runtime import GluonASTSource

    fn = glu._narrow_kernel if kind == "narrow" else glu._ws_kernel
    t = torch.empty(1024, 576, dtype=torch.bfloat16)
    consts = {"CAUSAL": True, "PAGED": paged, "STAGES": glu.STAGES["wide" if kind == "wide" else "narrow"],
              "BLOCK_B": 128}
    if kind == "narrow":
        tn, stages = glu.NARROW_TILES[C, rows]
        consts.update(RN=rows, MERGE=rows in glu.MERGE_ROWS, NL=C // 64, TN=tn, STAGES=stages,
                      TMA3=C in glu.TMA3_LATENTS and tn == 64, ONE_WAIT=rows in glu.ONE_WAIT_ROWS,
                      TSTORE=(C, rows) in glu.NARROW_TSTORE and glu.PART_BF16 and rows not in glu.MERGE_ROWS,
                      PRE=rows in glu.NARROW_PRE)
        if not consts["TSTORE"]:
            consts.update(o_desc=None, p_desc=None)
    else:  # the warp-specialized kernel: wide, or the narrow math on two consumer warpgroups ("narrow2")
        consts.update(RN=64 if kind == "wide" else rows, TRANSPOSED=kind == "narrow2",
                      SPLIT=kind == "wide" and glu.WIDE_SPLIT, EARLY_Q_FREE=glu.EARLY_Q_FREE,
                      TMA3=kind == "wide" and glu.WIDE_TMA3,
                      TSTORE=kind == "wide" and glu.WIDE_TSTORE and glu.WIDE_SPLIT and glu.PART_BF16,
                      PRE=kind == "wide" and glu.WIDE_PREFORK)
        if not consts["TSTORE"]:
            consts.update(o_desc=None, p_desc=None)
    consts["TRACE"] = trace
    if not trace:
        consts["trace_ptr"] = None
    part = torch.bfloat16 if glu.PART_BF16 else torch.float32  # the partials' dtype
    sig = {}
    attrs = {}
    ints = jit_ints(kind, rows, paged, C) if jit_like else {}
    for i, a in enumerate(fn.arg_names):
        if a in ints and a not in consts:
            ty, spec = native_specialize_impl(CUDABackend, ints[a], False, True, True)
            if ty == "constexpr":
                consts[a] = spec
            elif spec:
                attrs[(i,)] = CUDABackend.parse_attr(spec)
        elif jit_like and a.endswith("_ptr") and a not in consts:
            attrs[(i,)] = CUDABackend.parse_attr("D")  # (torch's allocations are 256-byte aligned)
        if a in consts:
            sig[a] = "constexpr"
        elif a == "op_desc":
            sig[a] = mangle_type(glu._part_desc(torch.empty(8, rows, C, dtype=part)))
        elif a in ("q3_desc", "kv3_desc"):
            sig[a] = mangle_type(glu._desc3(t[:, :C], C // 64, rows if a == "q3_desc" and kind != "wide" else 64))
        elif a.endswith("_desc"):
            narrow_rows = a in ("q_desc", "o_desc", "p_desc") and kind != "wide"  # boxes of the narrow kernel's rows
            sig[a] = mangle_type(glu._desc(t, rows if narrow_rows else 64, 64))
        elif a in ("seqlens_ptr", "tbl_ptr", "cnt_ptr"):
            sig[a] = "*i32"
        elif a == "trace_ptr":
            sig[a] = "*i64"
        elif a in ("o_ptr", "l_ptr", "op_ptr", "lp_ptr"):
            sig[a] = "*bf16" if a == "o_ptr" or a == "op_ptr" and part == torch.bfloat16 else "*fp32"
        else:
            sig[a] = "fp32" if a == "qk_scale" else "i32"
    ck = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4})
    return f"shared {ck.metadata.shared} B, " + counts(ck.asm["cubin"])


def triton_kernel(block_m: int, block_n: int, warps: int, stages: int, v_split: int = 1) -> str:
    fn = tri._mla_decode_kernel
    consts = dict(STRIDE_KVT=576, STRIDE_PET=576, C=512, R=64, BLOCK_C=512, BLOCK_R=64, BLOCK_M=block_m,
                  BLOCK_N=block_n, BLOCK_B=32, ONE_B_BLOCK=True, PAGE=1, PAGED=False, CAUSAL=True,
                  DOT_PRECISION="tf32", UNIT=64, OVERHEAD=1, CHUNK_C=min(512 // v_split, 16384 // block_m),
                  BLOCK_J=32, OCC=1, V_SPLIT=v_split)
    ptrs = {"Q": "*bf16", "KV": "*bf16", "PE": "*bf16", "SEQLENS": "*i32", "BLOCK_TABLE": "*i32", "O": "*bf16",
            "LSE": "*fp32", "O_PART": "*fp32", "L_PART": "*fp32", "COUNTS": "*i32"}
    sig = {a: "constexpr" if a in consts else ptrs.get(a, "fp32" if a == "qk_scale" else "i32") for a in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if sig[a].startswith("*")}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    return counts(ck.asm["cubin"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jit-like", action="store_true", help="the Gluon builds specialized as the device's JIT "
                    "specializes a representative call (``jit_ints``), instead of plain i32 integers")
    jit = ap.parse_args().jit_like
    print(f"triton {triton.__version__}, sm_90{', JIT-like specialization' if jit else ''}")
    if glu.HAVE_GLUON:
        for kind, rows, C in (("wide", 128, 512), ("narrow", 16, 512), ("narrow", 32, 512), ("narrow2", 16, 512),
                              ("narrow2", 32, 512), ("narrow", 16, 256), ("narrow", 32, 256)):
            for paged in (False, True):
                print(f"gluon {kind} rows={rows} C={C} paged={paged}: "
                      f"{gluon_kernel(kind, rows, paged, C, jit_like=jit)}", flush=True)
        print(f"gluon narrow rows=16 C=512 traced: {gluon_kernel('narrow', 16, False, 512, True, jit)}", flush=True)
        print(f"gluon wide rows=128 C=512 traced: {gluon_kernel('wide', 128, False, 512, True, jit)}", flush=True)
    else:
        print("no Gluon with Triton 3.6's API here: the Gluon kernels skipped")
    for cfg in ((16, 32, 4, 3), (16, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 2), (128, 32, 8, 2, 2)):
        print(f"triton BLOCK_M/N {cfg[0]}/{cfg[1]} warps {cfg[2]} stages {cfg[3]} V_SPLIT {cfg[4] if len(cfg) > 4 else 1}: "
              f"{triton_kernel(*cfg)}", flush=True)


if __name__ == "__main__":
    main()
