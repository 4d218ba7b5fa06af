"""NLVR2: encode (text, image 1) and (text, image 2), concatenate the two [CLS] -> 2-way;
accuracy; predictions as ``{identifier: "True"|"False"}``, scored against ``<split>.json``."""

from __future__ import annotations

import torch

from cmal.model.heads import PairReasoningHead
from cmal.tasks import LabelTask, read_out, read_width


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


TASK = NLVR2()
