"""Reading MDS samples fast: shard files memory-mapped (a sample costs no system call; the
reader streaming ships opens, seeks and reads the file for every sample, ~120 µs here),
and each column's decoder looked up once instead of once a value.

Used for the image store's rows and, through :class:`MappedMDSReader`, for the text
samples of a :class:`~streaming.StreamingDataset` once streaming has put a shard in the
cache (streaming still decides which shards to fetch, and checks them).
"""

from __future__ import annotations

import functools
import json
import mmap
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from streaming.base.format.mds.encodings import _get_coder  # one coder per column type
from streaming.base.format.mds.reader import MDSReader


@cache
def _coder(encoding: str):
    coder = _get_coder(encoding)
    if coder is None:
        raise ValueError(f"unsupported MDS encoding {encoding!r}")
    return coder


@cache
def _reader(encoding: str):
    """A decoder of one column type: streaming's, but for the types cmal writes a direct
    one (streaming's parses the encoding and the array header anew for every value)."""
    if encoding == "str":
        return lambda v: str(v, "utf-8")
    if encoding == "int":
        return lambda v: int.from_bytes(v[:8], "little", signed=True)
    if encoding == "json":
        return lambda v: json.loads(bytes(v))
    kind, _, dtype = encoding.partition(":")
    if kind == "ndarray" and dtype and ":" not in dtype:
        return functools.partial(_array, np.dtype(dtype))
    coder = _coder(encoding)
    return lambda v: coder.decode(v if kind == "ndarray" else bytes(v))


def _array(dtype: np.dtype, v: memoryview) -> np.ndarray:
    """MDS's ``ndarray:<dtype>`` with a stored shape: [ndim << 2 | log2 of the shape's
    integer size] [shape] [values]."""
    ndim, width = v[0] >> 2, 1 << (v[0] & 3)
    shape = [int.from_bytes(v[1 + k * width : 1 + (k + 1) * width], "little") for k in range(ndim)]
    return np.frombuffer(v, dtype, offset=1 + ndim * width).reshape(shape)


def decode(
    names: list[str],
    encodings: list[str],
    sizes: list[int | None],
    data: memoryview,
    wanted: set[str] | None = None,
) -> dict[str, Any]:
    """One MDS sample's columns (``wanted`` only, when given); arrays are views of ``data``."""
    lengths, at = [], 0
    for size in sizes:
        if size:
            lengths.append(size)
        else:
            lengths.append(int.from_bytes(data[at : at + 4], "little"))
            at += 4
    out = {}
    for name, encoding, size in zip(names, encodings, lengths, strict=True):
        if wanted is None or name in wanted:
            out[name] = _reader(encoding)(data[at : at + size])
        at += size
    return out


class MappedShard:
    """One MDS shard file, memory-mapped: ``shard[i]`` is sample i's bytes (a view)."""

    def __init__(self, path: Path, samples: int):
        with open(path, "rb") as f:
            self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.offsets = np.frombuffer(self.data, np.uint32, samples + 1, 4)
        self.base = self.offsets.ctypes.data - 4
        """The map's address: a decoded array's byte offset in the file is its address
        minus this (what another process needs to map the same bytes)."""

    def __getitem__(self, i: int) -> memoryview:
        return memoryview(self.data)[self.offsets[i] : self.offsets[i + 1]]


class MappedMDSReader(MDSReader):
    """streaming's MDS reader, reading samples from a memory map of the cached shard."""

    _mapped: MappedShard | None = None

    def get_sample_data(self, idx: int) -> bytes | memoryview:  # type: ignore[override]
        if self._mapped is None:
            path = Path(self.dirname, self.split, self.raw_data.basename)
            self._mapped = MappedShard(path, self.samples)
        return self._mapped[idx]

    def decode_sample(self, data: bytes | memoryview) -> dict[str, Any]:  # type: ignore[override]
        return decode(self.column_names, self.column_encodings, self.column_sizes,
                      memoryview(data))  # fmt: skip

    def evict(self) -> int:
        self._mapped = None
        return super().evict()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_mapped": None}  # a map is per process


def map_readers(readers: list) -> None:
    """Make streaming's MDS readers read through memory maps (in place: the dataset keeps
    its reader objects, their state and their place in its bookkeeping)."""
    for reader in readers:
        if type(reader) is MDSReader:
            reader.__class__ = MappedMDSReader
