"""SNLI-VE: [CLS] -> entailment / neutral / contradiction; accuracy; predictions as
``{pairID: label}``, scored against ``snli_ve_<split>.jsonl``."""

from __future__ import annotations

from cmal.data.schema import VE_LABELS
from cmal.model.heads import EntailmentHead
from cmal.tasks import LabelTask, read_width


class VisualEntailment(LabelTask):
    name = "ve"
    train_set = "ve/train"
    eval_splits = ("dev", "test")
    labels = VE_LABELS
    annotation_flag, id_field, label_field = "--jsonl", "pairID", "gold_label"

    def eval_sets(self, split: str) -> list[tuple[str, str]]:
        return [(split, f"ve/{split}")]

    def head(self, hidden, info):
        return EntailmentHead(hidden, read_width(hidden, info))


TASK = VisualEntailment()
