"""REC (RefCOCO+): a score per region output, softmax over regions, cross-entropy on the
region that best matches the ground truth; accuracy = share of expressions whose chosen
box has IoU >= 0.5 with the ground-truth box, on UNC val / testA / testB, reported with
ground-truth boxes (``gt/``) and detected boxes (``det/``) separately, each beside its
upper bound: the share of expressions whose target some candidate box covers at IoU >=
0.5, the best any choice among those boxes can score (UNITER's users computed it by hand
to compare detectors: 86.1% for MAttNet's proposals against 99.6% for gt boxes).
Predictions: ``[{"sent_id", "bbox": [x, y, w, h]}]`` in pixels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cmal.config import ConfigError
from cmal.data.boxes import box_iou, xywh_to_xyxy
from cmal.data.convert import load_json
from cmal.data.convert.refcoco import load_refs
from cmal.model.heads import RegionScoreHead
from cmal.tasks import Task

IOU_HIT = 0.5


def iou_rows(boxes: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, R, 4) region boxes and (B, 4) targets -> (B, R) IoU (any consistent units)."""
    lt = torch.maximum(boxes[..., :2], target[:, None, :2])
    rb = torch.minimum(boxes[..., 2:], target[:, None, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)
    t_area = (target[:, 2:] - target[:, :2]).clamp(min=0).prod(-1)
    return inter / (area + t_area[:, None] - inter).clamp(min=1e-12)


class ReferringExpressions(Task):
    name = "rec"
    train_set = "rec_det/train"
    eval_splits = ("val", "testA", "testB")

    def eval_sets(self, split: str) -> list[tuple[str, str]]:
        return [(f"gt/{split}", f"rec_gt/{split}"), (f"det/{split}", f"rec_det/{split}")]

    def head(self, hidden, info):
        return RegionScoreHead(hidden)

    def features(self, model, item, info) -> tuple[torch.Tensor, ...]:
        batch = item["batch"]
        return model(batch)[:, batch.input_ids.shape[1] :], batch.region_mask

    def loss(self, logits, item, info) -> torch.Tensor:
        batch = item["batch"]
        iou = iou_rows(batch.boxes, item["target_box"].to(batch.boxes.dtype))
        best = iou.masked_fill(~batch.region_mask, -1.0).argmax(-1)
        return F.cross_entropy(logits.float(), best)

    def predict(self, logits, item, info) -> list[dict]:
        batch = item["batch"]
        target = item["target_box"].to(batch.boxes.dtype)
        chosen = logits.argmax(-1)
        boxes = batch.boxes[torch.arange(len(chosen)), chosen]
        hit = iou_rows(boxes[:, None], target)[:, 0] >= IOU_HIT
        covered = ((iou_rows(batch.boxes, target) >= IOU_HIT) & batch.region_mask).any(-1)
        size = item["image_size"].repeat(1, 2)
        px = (boxes * size).tolist()
        refs = item["ref_id"].tolist()
        out = []
        for i, r, b, h, c in zip(item["ids"], refs, px, hit.tolist(), covered.tolist(),
                                 strict=True):  # fmt: skip
            xywh = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            out.append({"id": i, "sent_id": int(i), "ref_id": r, "bbox": xywh, "score": float(h),
                        "covered": float(c)})  # fmt: skip
        return out

    def metrics(self, predictions: list[dict]) -> dict[str, float]:
        got = super().metrics(predictions)
        got["upper_bound"] = sum(p["covered"] for p in predictions) / max(len(predictions), 1)
        return got

    def write(self, predictions, folder: Path, label: str) -> Path:
        path = folder / f"predictions_{label.replace('/', '_')}.json"
        path.write_text(
            json.dumps([{"sent_id": p["sent_id"], "bbox": p["bbox"]} for p in predictions])
        )
        return path

    def score_file(self, predictions, files, split):
        if "refs" not in files or "instances" not in files or split is None:
            raise ConfigError("rec scoring needs --refs, --instances and --split")
        preds = load_json(predictions)
        if not isinstance(preds, list):
            raise ConfigError(
                f'{predictions}: expected [{{"sent_id" or "ref_id", "bbox": [x, y, w, h]}}]'
            )
        by_sent, by_ref = {}, {}
        for p in preds:
            if "sent_id" in p:
                by_sent[p["sent_id"]] = p["bbox"]
            elif "ref_id" in p:
                by_ref[p["ref_id"]] = p["bbox"]
        refs = load_refs(Path(files["refs"]))
        anns = {a["id"]: a["bbox"] for a in load_json(files["instances"])["annotations"]}
        hits, missing = [], []
        for ref in refs:
            if ref["split"] != split:
                continue
            for sent in ref["sentences"]:
                box = by_sent.get(sent["sent_id"], by_ref.get(ref["ref_id"]))
                if box is None:
                    missing.append(sent["sent_id"])
                    continue
                iou = box_iou(
                    np.array([xywh_to_xyxy(box)]), np.array([xywh_to_xyxy(anns[ref["ann_id"]])])
                )
                hits.append(float(iou[0, 0] >= IOU_HIT))
        if missing:
            raise ConfigError(
                f"{predictions}: {len(missing)} expressions of split {split} have no box "
                f"(first sent_id: {missing[0]})"
            )
        if not hits:
            raise ConfigError(f"{files['refs']}: no expressions in split {split!r}")
        return {"accuracy": sum(hits) / len(hits), "n": float(len(hits))}


TASK = ReferringExpressions()
