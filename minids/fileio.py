"""Files written whole: a temporary name beside the destination, flushed to disk, then renamed over it.

A crash, Ctrl-C or full disk while writing leaves the previous file as it was (or no file), never a
half-written one, and no temporary behind. Used for the files minids writes into a user's
directories one at a time: checkpoints' JSON, a run's configs, metrics rewrite, expert loads, sample,
tokenizer and plots, and the benchmarks' records. (Whole directories, a training checkpoint or a
converted model, are written under a temporary name and renamed the same way.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write_text", "written_whole"]


@contextlib.contextmanager
def written_whole(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``dst`` to write; when the block ends without an exception the
    temporary is fsynced and renamed over ``dst``. Either way no temporary is left behind."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "r+b") as fh:  # (a handle open for writing: Windows refuses to flush a read-only one)
            os.fsync(fh.fileno())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(text: str, dst: str | Path) -> None:
    """Write ``text`` to ``dst`` whole (see ``written_whole``)."""
    with written_whole(dst) as tmp:
        tmp.write_text(text)
