"""The GPU sweep scripts (bench/sweep_*.py) in their --cpu-smoke mode: every kernel variant they time on the H200
runs here under TRITON_INTERPRET=1 on a tiny shape and is checked against the reference, so a variant that a
kernel change broke (or a sweep that no longer matches the kernel's arguments) fails in CI, not on the device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from minids.kernels import HAVE_TRITON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("sweep", ["rmsnorm", "moe", "mla", "fp8_gemm"])
def test_sweep_variants_pass_on_the_cpu(sweep, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    args = [sys.executable, str(ROOT / "bench" / f"sweep_{sweep}.py"), "--cpu-smoke"]
    r = subprocess.run(args, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
