"""Head-only fine-tuning (``task.head_only``): the frozen model's features of the training
set, computed once, and a loader that serves them to the training loop.

Each rank keeps the features of its own part of the training shards (streaming partitions
them by rank), in memory: (rows, k, width) floats, e.g. 3,416 NLVR2 statements x 2 images x
384 = 10 MB; NLVR2's 86k real statements at width 768 would take about 0.5 GB.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from cmal.data.errors import DataError
from cmal.engine.loop import to_device
from cmal.tasks import Objective

SKIP = ("consumed", "skipped", "tokens", "batch", "batch2")
"""Item fields not kept: loader bookkeeping and the model inputs the features replace."""


@torch.no_grad()
def encode(module: Objective, loader, device: torch.device) -> dict[str, Any]:
    """One pass over ``loader``: every example's features, with the fields its loss and
    predictions read (label, answers, ids…), row-aligned."""
    was_training = module.training
    module.eval()  # no dropout: the features must be the ones evaluation will see
    rows: dict[str, list] = {"features": []}
    for item in loader:
        if not item.get("ids"):
            continue
        rows["features"].append(module.features(to_device(item, device)).float().cpu())
        for key, value in item.items():
            if key not in SKIP:
                rows.setdefault(key, []).append(value)
    module.train(was_training)
    if not rows["features"]:
        raise DataError("head-only fine-tuning: the training shards yielded no example")
    return {
        k: torch.cat(v) if isinstance(v[0], torch.Tensor) else [x for part in v for x in part]
        for k, v in rows.items()
    }


def fit_norm(module: Objective, features: torch.Tensor, world) -> None:
    """Set ``module.norm`` to the training features' mean and std over every rank's rows."""
    flat = features.double().flatten(0, 1)
    sums = torch.stack([flat.sum(0), (flat * flat).sum(0)])
    count = torch.tensor([float(len(flat))], dtype=torch.float64)
    if world.size > 1:
        sums, count = sums.to(world.device), count.to(world.device)
        dist.all_reduce(sums)
        dist.all_reduce(count)
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp(min=0.0)
    module.norm.mean.copy_(mean.float())
    module.norm.std.copy_(var.sqrt().float().clamp(min=1e-6))


class FeatureLoader:
    """Batches of cached rows, reshuffled every epoch (from the run's seed, the epoch and
    the rank, so a resumed run draws the same order); its state (epoch, position) goes into
    checkpoints as the streaming loader's does."""

    def __init__(self, rows: dict[str, Any], batch_size: int, seed: int, rank: int):
        self.rows, self.batch_size, self.seed, self.rank = rows, batch_size, seed, rank
        self.n = len(rows["features"])
        self.epoch, self.position = 0, 0

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1_009 + self.rank)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self._order()
        while self.position < self.n:
            take = order[self.position : self.position + self.batch_size]
            self.position += len(take)  # before the yield: a checkpoint then skips this batch
            yield {
                k: v[take] if isinstance(v, torch.Tensor) else [v[i] for i in take.tolist()]
                for k, v in self.rows.items()
            }
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def feature_loader(module: Objective, loader, cfg, world, fit: bool, quiet: bool) -> FeatureLoader:
    """The loader of head-only fine-tuning: ``loader``'s examples encoded once; ``fit``
    (a fresh run, not a resumed one, whose checkpoint holds them): set the norm's statistics."""
    t0 = time.perf_counter()
    rows = encode(module, loader, world.device)
    if fit:
        fit_norm(module, rows["features"], world)
    if world.is_main and not quiet:
        took = time.perf_counter() - t0
        print(f"# head-only: features of {len(rows['features'])} training examples "
              f"(this rank) in {took:.1f} s", file=sys.stderr)  # fmt: skip
    return FeatureLoader(rows, cfg.data.batch_size, cfg.seed, world.rank)
