"""Whether minids' Triton kernels can be used here, asked in one place by every module that dispatches to them.

The kernels live in the repository's ``kernels/`` folder, installed as ``minids.kernels`` (pyproject's package-dir
mapping). They are usable when Triton is installed and that mapping exists: a pip-installed minids (editable or
not). From a source checkout put on ``sys.path`` without installing, ``minids.kernels`` does not exist, and every
"auto" choice falls back to the torch paths instead of failing on the import.
"""

from __future__ import annotations

import functools

__all__ = ["kernels_available", "require_kernels"]


@functools.cache
def kernels_available() -> bool:
    """Triton installed and ``minids.kernels`` importable."""
    try:
        from minids.kernels import HAVE_TRITON
    except ImportError:
        return False
    return HAVE_TRITON


def require_kernels(what: str) -> None:
    """One clear line where a caller asked for the Triton path explicitly and it cannot run."""
    if not kernels_available():
        raise ValueError(f"{what} needs Triton installed and minids installed with pip (pip install -e '.[triton]'), "
                         "which makes kernels/ importable as minids.kernels; use the torch implementation instead")
