"""The MDS columns of a sample — the one place that says what a shard holds.

Every sample has the base columns; a task adds its own. Text is tokenised and anchors are
computed when shards are written (``tags`` are kept, so anchors can be recomputed).
"""

from __future__ import annotations

BASE_COLUMNS = {
    "id": "str",  # sample id in its source (caption id, question_id, pairID, sent_id, …)
    "image": "str",  # image key in the region-feature source
    "text": "str",  # caption / question / hypothesis / statement / expression
    "input_ids": "ndarray:int32",  # WordPiece ids with [CLS] … [SEP]
    "anchors": "json",  # [[text position, region slot, concept id], …] (may be empty)
    "feats": "ndarray:float16",  # (R, F) region features
    "boxes": "ndarray:float32",  # (R, 4) x1, y1, x2, y2 / image size
    "concepts": "ndarray:int32",  # (R,) concept id of each region's tag, -1 if none
    "tags": "json",  # (R,) detector class names
    "confidences": "ndarray:float32",  # (R,)
}

SECOND_IMAGE_COLUMNS = {
    "image2": "str",
    "anchors2": "json",
    "feats2": "ndarray:float16",
    "boxes2": "ndarray:float32",
    "concepts2": "ndarray:int32",
    "tags2": "json",
    "confidences2": "ndarray:float32",
}
"""NLVR2's second image: the same fields, suffixed with 2 (the text is shared)."""

TASK_COLUMNS: dict[str, dict[str, str]] = {
    "pretrain": {},
    "vqa": {"question_id": "int", "answers": "json"},  # answers: the ten human answers
    "ve": {"label": "int"},  # 0 entailment, 1 neutral, 2 contradiction
    "nlvr2": {"label": "int", **SECOND_IMAGE_COLUMNS},  # 1 = True
    # target: x1, y1, x2, y2 / image size; image_size: width, height in pixels
    "rec": {"ref_id": "int", "target_box": "ndarray:float32", "image_size": "ndarray:float32"},
}

VE_LABELS = ("entailment", "neutral", "contradiction")


def columns(task: str) -> dict[str, str]:
    """All MDS columns of a task's shards."""
    if task not in TASK_COLUMNS:
        raise KeyError(f"unknown task {task!r}; expected one of {', '.join(TASK_COLUMNS)}")
    return {**BASE_COLUMNS, **TASK_COLUMNS[task]}
