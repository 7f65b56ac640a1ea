"""A minimal safetensors reader and writer that move bytes straight between disk and tensor memory.

The format (huggingface/safetensors): an 8-byte little-endian header length N, a JSON header of N
bytes mapping each name to {dtype, shape, data_offsets [begin, end)} (plus "__metadata__"), then the
raw little-endian data. The library's ``safe_open`` maps the file and ``save_file`` builds the
whole file in memory first; here a read is one ``readinto`` into the destination tensor (no
intermediate copy when dtypes match) and a write streams each tensor's bytes, so checkpoints move at
close to disk speed with memory near one copy of the model. Files stay byte-compatible with the
library (tests read each other's files). Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

__all__ = ["SafetensorsFile", "write_safetensors"]

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


class SafetensorsFile:
    """Open a .safetensors file: ``keys()``, ``meta(name)`` -> (dtype, shape), ``read(name, out=None)``.

    Raises ValueError with the file name for a truncated or corrupt file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.fh = open(self.path, "rb", buffering=0)
        size = os.fstat(self.fh.fileno()).st_size
        head = self.fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{self.path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{self.path}: corrupt or truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(self.fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {})
        self.base = 8 + n
        self.entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = _DTYPES[e["dtype"]], tuple(e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{self.path}: corrupt safetensors entry for {name}") from None
            if self.base + end > size:
                raise ValueError(f"{self.path}: truncated safetensors file: tensor {name} ends past the end of the file")
            numel = 1
            for n_ in shape:
                numel *= n_
            if not 0 <= begin <= end or end - begin != numel * dtype.itemsize:
                raise ValueError(f"{self.path}: corrupt safetensors entry for {name}: offsets {begin}..{end} "
                                 f"do not hold {shape} of {e['dtype']}")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        """Tensor names in file order (sequential reads)."""
        return sorted(self.entries, key=lambda k: self.entries[k][2])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[name]
        return dtype, shape

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor ``name``; with ``out`` (CPU, contiguous, same dtype and shape) read straight into it.

        Thread-safe: reads are positional (``os.preadv``), so several tensors can be read in parallel.
        """
        dtype, shape, begin, end = self.entries[name]
        direct = out is not None and out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=dtype)
        view = buf.reshape(-1).view(torch.uint8).numpy() if buf.numel() else None
        if view is not None:  # positional reads: safe to call from several threads at once
            got, want, fd = 0, end - begin, self.fh.fileno()
            while got < want:
                n = os.preadv(fd, [view[got:]], self.base + begin + got)
                if n <= 0:
                    raise ValueError(f"{self.path}: short read of tensor {name} ({got} of {want} bytes)")
                got += n
        if out is not None and not direct:
            out.copy_(buf)
            return out
        return buf

    def read_many(self, jobs: list[tuple[str, torch.Tensor]], chunk_bytes: int = 64 << 20) -> None:
        """Read several tensors straight into their ``out`` tensors (CPU, contiguous, same dtype) with large
        sequential reads through one staging buffer, copying each piece into place: the disk sees the
        same access pattern as a plain copy of the file, whatever the tensor sizes."""
        spans = []
        for name, out in jobs:
            dtype, shape, begin, end = self.entries[name]
            if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous() or out.device.type != "cpu":
                raise ValueError(f"{self.path}: read_many needs a contiguous CPU {dtype} {shape} tensor for {name}")
            if end > begin:
                spans.append((self.base + begin, self.base + end, out.reshape(-1).view(torch.uint8).numpy()))
        spans.sort(key=lambda s: s[0])
        buf = torch.empty(chunk_bytes, dtype=torch.uint8).numpy()
        fd = self.fh.fileno()
        i = 0
        while i < len(spans):
            pos = spans[i][0]
            n = os.preadv(fd, [buf[: min(chunk_bytes, max(e for _, e, _ in spans[i:]) - pos)]], pos)
            if n <= 0:
                raise ValueError(f"{self.path}: short read at byte {pos}")
            stop = pos + n
            j = i
            while j < len(spans) and spans[j][0] < stop:
                b, e, dst = spans[j]
                lo, hi = max(b, pos), min(e, stop)
                dst[lo - b : hi - b] = buf[lo - pos : hi - pos]
                if e <= stop:
                    if j == i:
                        i += 1
                else:
                    spans[j] = (b, e, dst)
                j += 1
            # the first span not finished starts the next read where this one stopped
            if i < len(spans) and spans[i][0] < stop:
                b, e, dst = spans[i]
                spans[i] = (stop, e, dst[stop - b :])

    def close(self) -> None:
        self.fh.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | Path,
    metadata: dict | None = None,
    cast: dict[str, torch.dtype] | None = None,
) -> None:
    """Write ``tensors`` (any device; each moved to CPU and cast to ``cast[name]`` only as it is written)
    to ``path`` and fsync it, so a write never holds more than one extra tensor."""
    cast = cast or {}
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        dtype = cast.get(name, t.dtype)
        n = t.numel() * dtype.itemsize
        header[name] = {"dtype": _CODES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hbytes)))
        fh.write(hbytes)
        for name, t in tensors.items():
            if t.numel():
                t = t.detach().to(device="cpu", dtype=cast.get(name, t.dtype)).contiguous()
                fh.write(t.reshape(-1).view(torch.uint8).numpy().data)
        fh.flush()
        os.fsync(fh.fileno())
