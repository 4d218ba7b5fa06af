"""NLVR2: encode (text, image 1) and (text, image 2), concatenate the two [CLS] -> 2-way.
Scored as its authors' ``nlvr2/eval/metrics.py`` does: accuracy over the pairs, and
consistency, the share of sentences whose every image pair is right (a sentence's pairs
share their identifier but for its third field). Predictions are the CSV lines
``identifier,prediction`` that script reads (``True``/``False``, compared without case);
``{identifier: label}`` JSON files are read too."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from cmal.config import ConfigError
from cmal.model.heads import PairReasoningHead
from cmal.tasks import LabelTask, read_out, read_width


def sentence(identifier: str) -> str:
    """The sentence an identifier ``split-set-pair-sentence`` belongs to: the identifier
    with its pair field blanked, as the authors' script keys its consistency."""
    parts = identifier.split("-")
    if len(parts) > 2:
        parts[2] = ""
    return "-".join(parts)


def consistency(right: Iterable[tuple[str, bool]]) -> float:
    """The share of sentences whose every pair is right, from (identifier, right) pairs."""
    every: dict[str, bool] = {}
    for identifier, ok in right:
        key = sentence(identifier)
        every[key] = every.get(key, True) and ok
    return sum(every.values()) / len(every) if every else float("nan")


class NLVR2(LabelTask):
    name = "nlvr2"
    train_set = "nlvr2/train"
    eval_splits = ("dev", "test1")
    labels = ("False", "True")
    annotation_flag, id_field, label_field = "--json", "identifier", "label"

    def eval_sets(self, split: str) -> list[tuple[str, str]]:
        return [(split, f"nlvr2/{split}")]

    def head(self, hidden, info):
        return PairReasoningHead(hidden, read_width(hidden, info))

    def features(self, model, item, info) -> tuple[torch.Tensor, ...]:
        return read_out(model, item["batch"], info), read_out(model, item["batch2"], info)

    def flops_per_row(self, model) -> float:
        return 2 * super().flops_per_row(model)  # each image encoded with the text

    def metrics(self, predictions: list[dict]) -> dict[str, float]:
        got = super().metrics(predictions)
        got["consistency"] = consistency((p["id"], p["score"] == 1.0) for p in predictions)
        return got

    def write(self, predictions, folder: Path, label: str) -> Path:
        path = folder / f"predictions_{label}.csv"
        path.write_text("".join(f"{p['id']},{p['label']}\n" for p in predictions))
        return path

    def read_predictions(self, path: Path) -> dict[str, str]:
        if not path.is_file():
            raise ConfigError(f"prediction file not found: {path}")
        text = path.read_text()
        if text.lstrip().startswith("{"):
            return super().read_predictions(path)
        preds = {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            fields = line.strip().split(",")
            if len(fields) != 2 or not fields[0]:
                raise ConfigError(f"{path}:{n}: expected 'identifier,prediction', got {line!r}")
            preds[fields[0]] = fields[1]
        return preds

    def right(self, predicted: str, gold: str) -> bool:
        return predicted.lower() == gold.lower()


TASK = NLVR2()
