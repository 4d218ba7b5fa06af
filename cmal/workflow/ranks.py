"""The ranks of one ``cmal run`` job (``cmal submit run`` with several tasks) going through
the chain together: every rank trains, fine-tunes and evaluates (those stages are
collective), rank 0 alone decides what is skipped, makes the worlds and writes the state
file, and tells the others what it decided and made. A job of one rank never starts a
process group here."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, TypeVar

from cmal.config import Config

T = TypeVar("T")

WAIT = datetime.timedelta(hours=24)
"""How long the other ranks wait for rank 0's word: a world stage of the 10k world takes
~40 min on one CPU, longer than any collective timeout a training stage uses."""


class Ranks:
    """This process's place in the job (from RANK / WORLD_SIZE, as the launchers set them)."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", "0"))
        self.size = int(os.environ.get("WORLD_SIZE", "1"))
        self._group: Any = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, make: Callable[[], T], engine: Callable[[], Config]) -> T:
        """``make()`` run on rank 0, its result on every rank; an error on rank 0 is raised
        on every rank (rank 0's own exception there, a one-line RuntimeError elsewhere).
        ``engine``: the config whose ``engine`` section starts the process group, if none
        is up yet (the same one the training stages then use)."""
        if self.size == 1:
            return make()
        import torch.distributed as dist

        if self._group is None:
            from cmal.engine.deepspeed import init_world, patient_group

            init_world(engine())
            self._group = patient_group(WAIT)
        said: list[Any] = [None]
        error: Exception | None = None
        if self.main:
            try:
                said = [("ok", make())]
            except Exception as e:
                error, said = e, [("error", f"{type(e).__name__}: {e}")]
        dist.broadcast_object_list(said, src=0, group=self._group)
        kind, value = said[0]
        if error is not None:
            raise error
        if kind == "error":
            raise RuntimeError(f"rank 0: {value}")
        return value
