"""Hopper's Gluon API (TMA, mbarriers, warpgroup MMAs) for the warp-specialized kernels (``kernels.fp8_ws``,
``kernels.fp8_tma_quant``, ``kernels.mla_decode_gluon``): the one place that decides whether it is usable here.

Gluon is experimental and its API moves. These kernels are written against Triton 3.6's (the device's, where they
were measured); later releases renamed the TMA copies (``tma.async_load`` / ``async_store``), so there, as without
Triton or Gluon, ``HAVE_GLUON`` is False, the names below are None, and the callers keep their Triton kernels.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = not hasattr(tma, "async_load")
except ImportError:  # no Triton, or one without Gluon
    HAVE_GLUON = False
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = TensorDescriptor = None

__all__ = ["HAVE_GLUON", "TensorDescriptor", "fence_async_shared", "gl", "gluon", "mbarrier", "tma", "warpgroup_mma",
           "warpgroup_mma_wait"]
