"""One process group per run folder: a second `cmal pretrain` / `cmal finetune` of a run
that is training stops at once, before it writes anything, naming the holder.

The lock is ``flock`` on ``<run>/.lock``, taken by rank 0 and announced to every rank;
the kernel drops it when the holder ends, however it ends (a SIGKILL leaves no stale
lock). Across nodes it holds where the run folder's filesystem supports ``flock`` (local
disks; NFS v4). A run on ``s3://`` is locked in its node-local mirror only.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist

from cmal.errors import RunError


class RunInUse(RunError):
    """Another process is training this run folder."""


def _take(folder: Path) -> tuple[int | None, str | None]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return None, (
            f"run folder {folder} is in use by another cmal process ({holder}); wait for "
            "it to end, or give this run another name (name=...)"
        )
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}".encode(), 0)
    return fd, None


@contextmanager
def run_lock(folder: Path, rank: int, world_size: int):
    """Hold the run folder for the body; every rank raises :class:`RunInUse` when rank 0
    could not take it."""
    fd, refused = _take(folder) if rank == 0 else (None, None)
    box = [refused]
    if dist.is_initialized() and world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RunInUse(box[0])
    try:
        yield
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
