"""The MDS columns of a shard set — the one place that says what its shards hold.

A shard set is two MDS datasets: the **text samples** (``<set>/index.json``), which the
loader shuffles and counts an epoch by, and the **image store** (``<set>/images/``), one
sample per image with its regions. A text sample names its image by row in the store
(``image_row``) and by key (``image``, checked against the row's ``key``), so an image's
features are stored once however many texts it has (5 COCO captions, ~50 Visual Genome
phrases). Text is tokenised and anchors are computed when shards are written (the image's
``tags`` are kept, so anchors can be recomputed).
"""

from __future__ import annotations

IMAGES = "images"
"""The image store's folder inside a shard set."""

TEXT_COLUMNS = {
    "id": "str",  # sample id in its source (caption id, question_id, pairID, sent_id, …)
    "image": "str",  # image key in the region-feature source
    "image_row": "int",  # the image's row in the image store
    "text": "str",  # caption / question / hypothesis / statement / expression
    "input_ids": "ndarray:int32",  # WordPiece ids with [CLS] … [SEP]
    "anchors": "json",  # [[text position, region slot, concept id], …] (may be empty)
}

IMAGE_COLUMNS = {
    "key": "str",  # image key in the region-feature source
    "feats": "ndarray:float16",  # (R, F) region features, finite (checked when written)
    "boxes": "ndarray:float32",  # (R, 4) x1, y1, x2, y2 / image size
    "concepts": "ndarray:int32",  # (R,) concept id of each region's tag, -1 if none
    "tags": "json",  # (R,) detector class names
    "confidences": "ndarray:float32",  # (R,)
}

REGION_COLUMNS = ("feats", "boxes", "concepts")
"""What a text sample gains from its image row when it is read for training (``tags`` and
``confidences`` stay in the store: conversion and tools read them, the model does not)."""

SECOND_IMAGE_COLUMNS = {"image2": "str", "image_row2": "int", "anchors2": "json"}
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

OLD_LAYOUT_COLUMN = "feats"
"""A text index with this column was written before features were stored once per image."""


def columns(task: str) -> dict[str, str]:
    """All MDS columns of a task's text samples."""
    if task not in TASK_COLUMNS:
        raise KeyError(f"unknown task {task!r}; expected one of {', '.join(TASK_COLUMNS)}")
    return {**TEXT_COLUMNS, **TASK_COLUMNS[task]}
