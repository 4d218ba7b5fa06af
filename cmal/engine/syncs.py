"""Counting the reads from the device to the host that a training step makes.

On a GPU each such read (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``, a copy to
the CPU, an op whose output size depends on the data such as ``nonzero`` or boolean
indexing) stops the host until the device has caught up: the queue of kernels drains and
the device idles while the host launches the next ones. :class:`HostReads` sees them on
any device, the CPU included, so a test can count them where no GPU is: it is a
``TorchDispatchMode`` (every op passes through it, autograd's backward included) plus a
wrapper of ``Tensor.tolist``, which on the CPU reads memory without dispatching an op.

The loop uses it when ``engine.count_host_reads`` is on: each step's reads, with where they
came from, go to the run's log. A debugging switch: every op pays a Python call.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that hand a value to the host (item/float/bool/int all end in _local_scalar_dense).
_SCALAR = {aten._local_scalar_dense.default}
# Ops whose output size depends on the values: the host must read a count first.
_DATA_SIZED = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
# Indexing ops that size their result from the values when an index is boolean.
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default,
             aten._index_put_impl_.default}  # fmt: skip
_COPIES = {aten._to_copy.default, aten.copy_.default}

_HERE = str(Path(__file__).resolve())
_SKIP = (_HERE, "/torch/", "contextlib.py", "<frozen")


@dataclass
class Read:
    """One device-to-host read."""

    op: str
    """The op or method that read (``aten._local_scalar_dense``, ``Tensor.tolist``, ...)."""
    where: str
    """``file:line function`` of the innermost frame outside torch."""


class HostReads(TorchDispatchMode):
    """Records every device-to-host read while active; ``section`` names what the reads
    of a stretch of code belong to (the loop: "step", "log", "save", "eval")."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: dict[str, list[Read]] = {}
        self.section_name = "other"

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        before, self.section_name = self.section_name, name
        try:
            yield
        finally:
            self.section_name = before

    def take_all(self) -> dict[str, list[Read]]:
        """The reads recorded so far by section, forgotten here."""
        taken, self.reads = self.reads, {}
        return taken

    def _record(self, op: str) -> None:
        where = "?"
        for frame in reversed(traceback.extract_stack()):
            if not any(s in frame.filename for s in _SKIP):
                where = f"{frame.filename}:{frame.lineno} {frame.name}"
                break
        self.reads.setdefault(self.section_name, []).append(Read(op, where))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SCALAR or func in _DATA_SIZED:
            self._record(str(func.overloadpacket._qualified_op_name))
        elif func in _INDEXING and _bool_index(args[1]):
            self._record(f"{func.overloadpacket._qualified_op_name} (boolean index)")
        elif func in _COPIES and _to_host(func, args, kwargs):
            self._record(f"{func.overloadpacket._qualified_op_name} (device to host)")
        return func(*args, **kwargs)

    def __enter__(self):
        original = torch.Tensor.tolist

        def tolist(t: torch.Tensor):
            # A CPU tensor's tolist reads memory directly; a CUDA one copies (seen above).
            if t.device.type == "cpu":
                self._record("Tensor.tolist")
            return original(t)

        self._original_tolist = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._original_tolist
        return super().__exit__(*exc)


def _bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _to_host(func, args, kwargs) -> bool:
    if func is aten._to_copy.default:
        dev = kwargs.get("device")
        return args[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
    dst, src = args[0], args[1]
    return dst.device.type == "cpu" and src.device.type != "cpu"
