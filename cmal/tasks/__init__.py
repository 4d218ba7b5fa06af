"""Downstream tasks. A task file is the only place that knows its dataset fields, its head,
its loss, its official metric and its prediction format; this module holds what they share.

Imports ``config``, ``model`` (the heads, the encoder it reads) and ``data`` (file
readers, boxes); the engine never imports a task, the workflow hands one to it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cmal.config import ConfigError
from cmal.config.components import TASK_NAMES
from cmal.data.convert import load_json, read_jsonl
from cmal.model.cmal import CMAL

TASKS = TASK_NAMES


def read_out(model: CMAL, batch, info: dict[str, Any]) -> torch.Tensor:
    """What a sentence-level head reads (``task.pool``, kept in the run's task.json):
    ``cls``, the unified [CLS] state; ``cls+max``, [CLS] beside the element-wise max over
    the real regions' states."""
    hidden = model(batch)
    cls = hidden[:, 0]
    if info.get("pool", "cls") == "cls":
        return cls
    regions = hidden[:, batch.input_ids.shape[1] :]
    regions = regions.masked_fill(~batch.region_mask[..., None], torch.finfo(regions.dtype).min)
    return torch.cat([cls, regions.amax(1)], -1)


def read_width(hidden: int, info: dict[str, Any]) -> int:
    """Width of :func:`read_out`'s vector."""
    return hidden * (2 if info.get("pool", "cls") == "cls+max" else 1)


class Task:
    """A downstream task; the subclasses fill in the task-specific parts."""

    name: str = ""
    train_set: str = ""
    """Shard folder (under the data root) of the training split."""
    eval_splits: tuple[str, ...] = ()
    """Splits evaluated by default."""
    zero_shot: bool = False
    """Whether a pre-training run can be evaluated as it is (it ranks with the model's own
    heads, no task head to train)."""

    def eval_sets(self, split: str) -> list[tuple[str, str]]:
        """(label, shard folder) pairs that ``split`` is evaluated on."""
        raise NotImplementedError

    def prepare(self, train_dataset, cfg) -> dict[str, Any]:
        """Task information learned from the training data (saved with the run)."""
        return {}

    def head(self, hidden: int, info: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    def features(
        self, model: CMAL, item: dict[str, Any], info: dict[str, Any]
    ) -> tuple[torch.Tensor, ...]:
        """What the head reads from the model for a collated item; the head is called as
        ``head(*features)`` ([CLS] by default, ``task.pool``)."""
        return (read_out(model, item["batch"], info),)

    def loss(
        self, logits: torch.Tensor, item: dict[str, Any], info: dict[str, Any]
    ) -> torch.Tensor:
        raise NotImplementedError

    def train_loss(self, objective: Objective, item: dict[str, Any]) -> torch.Tensor:
        """The loss a fine-tuning step takes: :meth:`loss` of the head's logits; a task
        that trains no head of its own (retrieval) computes it from the model."""
        return self.loss(objective.logits(item), item, objective.info)

    def flops_per_row(self, model: CMAL) -> float:
        """Training FLOPs of one batch row at the padded shapes: the encoders and one pass
        of the unified encoder (the task head is small beside them)."""
        return model.flops_per_sample(unified_passes=1)

    def predict(
        self, logits: torch.Tensor, item: dict[str, Any], info: dict[str, Any]
    ) -> list[dict]:
        """One record per example: its id, its prediction, and ``score`` (its metric value)."""
        raise NotImplementedError

    def metrics(self, predictions: list[dict]) -> dict[str, float]:
        """An eval set's metrics from its prediction records (each id once): ``accuracy``
        (the mean ``score``) and ``n``; a task adds what its official evaluation reports
        beside accuracy."""
        scores = [p["score"] for p in predictions if not math.isnan(p["score"])]
        accuracy = sum(scores) / len(scores) if scores else float("nan")
        return {"accuracy": accuracy, "n": float(len(predictions))}

    def evaluate_set(
        self, objective: Objective, items: Iterable[dict[str, Any]], world, cfg, label: str
    ) -> dict[str, tuple[Any, dict[str, float]]]:
        """One eval set, from the loader's ``items`` (on the device) of every rank: label ->
        (predictions for :meth:`write`, or None; metrics). Every rank returns the same."""
        mine: list[dict] = []
        for item in items:
            if "batch" in item:
                mine += objective.predict(item)
        # Streaming pads ranks to equal length by repeating samples: count each id once.
        unique = {p["id"]: p for part in gather(mine, world) for p in part}
        preds = list(unique.values())
        return {label: (preds, self.metrics(preds))}

    def write(self, predictions: Any, folder: Path, label: str) -> Path:
        """Write predictions in the official submission format; returns the file."""
        raise NotImplementedError

    def score_file(
        self, predictions: Path, files: dict[str, Path], split: str | None
    ) -> dict[str, float]:
        """Score a prediction file against the official annotation files (no model)."""
        raise NotImplementedError


HEADLINES = ("accuracy", "r_mean")
"""The metric that sums up an eval set: accuracy, or retrieval's mean recall."""


def headline(metrics: dict[str, float]) -> tuple[str, float]:
    """(name, value) of an eval set's summing-up metric (see :data:`HEADLINES`)."""
    name = next((k for k in HEADLINES if k in metrics), None)
    if name is None:
        raise ConfigError(f"metrics without {' or '.join(HEADLINES)}: {sorted(metrics)}")
    return name, metrics[name]


def beside_accuracy(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics an eval set reports beside its headline and n, by their printed names
    (``upper_bound`` -> ``upper bound``)."""
    return {k.replace("_", " "): v for k, v in metrics.items() if k not in (*HEADLINES, "n")}


def gather(obj: Any, world) -> list[Any]:
    """``obj`` of every rank, in rank order (a list of one on a single rank)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


class FeatureNorm(nn.Module):
    """Per-dimension standardisation of frozen features (head-only fine-tuning). Without it
    the head barely learns from raw [CLS] in 3,000 steps (scene-world NLVR2, 150-step
    pre-training: 49.2% dev raw, 63.5% standardised). The statistics are buffers: saved in
    checkpoints, so evaluation standardises alike."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Objective(nn.Module):
    """What the engine trains when fine-tuning: item -> {"loss"}. An item holds either
    model inputs (``batch``…) or, in head-only fine-tuning, the frozen model's
    ``features`` (B, k, width), already computed (see :mod:`cmal.workflow.head_only`)."""

    def __init__(self, task: Task, model: CMAL, head: nn.Module, info: dict[str, Any]):
        super().__init__()
        self.task, self.model, self.head, self.info = task, model, head, info
        self.norm = None
        if info.get("head_only"):
            model.requires_grad_(False)
            self.norm = FeatureNorm(read_width(model.cfg.unified.hidden, info))

    def features(self, item: dict[str, Any]) -> torch.Tensor:
        """The model's features of ``item``, stacked as (B, k, width)."""
        return torch.stack(self.task.features(self.model, item, self.info), 1)

    def logits(self, item: dict[str, Any]) -> torch.Tensor:
        if self.norm is None:
            return self.head(*self.task.features(self.model, item, self.info))
        feats = item["features"] if "features" in item else self.features(item)
        return self.head(*self.norm(feats).unbind(1))

    def forward(self, item: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self.task.train_loss(self, item)}

    def flops_per_row(self) -> float:
        """Training FLOPs of one batch row (:meth:`Task.flops_per_row`). Head-only: the
        head's alone (2 per weight forward, 4 backward)."""
        if self.norm is not None:
            return 6.0 * sum(p.numel() for p in self.head.parameters())
        return self.task.flops_per_row(self.model)

    @torch.no_grad()
    def predict(self, item: dict[str, Any]) -> list[dict]:
        return self.task.predict(self.logits(item), item, self.info)


def get_task(name: str) -> Task:
    """The task called ``name``, or a one-line error listing the known ones."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    from importlib import import_module

    return import_module(f"cmal.tasks.{name}").TASK


class LabelTask(Task):
    """A task whose answer is one of ``labels``: cross-entropy, accuracy, and predictions
    as ``{id: label}`` scored against a JSON-lines annotation file."""

    labels: tuple[str, ...] = ()
    """Label names in class-index order."""
    annotation_flag: str = ""
    """The ``cmal evaluate`` flag naming the annotation file."""
    id_field: str = ""
    """Field of an annotation line holding the example's id."""
    label_field: str = ""
    """Field of an annotation line holding its gold label."""

    def loss(self, logits, item, info) -> torch.Tensor:
        return F.cross_entropy(logits.float(), item["label"])

    def predict(self, logits, item, info) -> list[dict]:
        pred = logits.argmax(-1).tolist()
        gold = item["label"].tolist()
        return [
            {"id": i, "label": self.labels[p], "score": float(p == g)}
            for i, p, g in zip(item["ids"], pred, gold, strict=True)
        ]

    def write(self, predictions, folder: Path, label: str) -> Path:
        path = folder / f"predictions_{label}.json"
        path.write_text(json.dumps({p["id"]: p["label"] for p in predictions}))
        return path

    def read_predictions(self, path: Path) -> dict[str, str]:
        """A prediction file as {id: label}."""
        preds = load_json(path)
        if not isinstance(preds, dict):
            raise ConfigError(f"{path}: expected a JSON object {{id: label}}")
        return {str(k): str(v) for k, v in preds.items()}

    def right(self, predicted: str, gold: str) -> bool:
        """Whether a predicted label is the gold one (as the official evaluation compares)."""
        return predicted == gold

    def score_file(self, predictions, files, split):
        key = self.annotation_flag.removeprefix("--")
        if key not in files:
            raise ConfigError(f"{self.name} scoring needs {self.annotation_flag}")
        gold = {str(r[self.id_field]): str(r[self.label_field]) for _, r in read_jsonl(files[key])}
        preds = self.read_predictions(Path(predictions))
        missing = [k for k in gold if k not in preds]
        if missing:
            raise ConfigError(
                f"{predictions}: {len(missing)} of {len(gold)} ids have no prediction "
                f"(first: {missing[0]!r})"
            )
        records = [{"id": k, "score": float(self.right(preds[k], v))} for k, v in gold.items()]
        return self.metrics(records)
