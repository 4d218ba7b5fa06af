"""RefCOCO+ (``refs(unc).p`` + COCO ``instances.json``) -> referring-expression records.

Each sentence of a ref in the chosen UNC split becomes a record whose target is the
ref's annotation box, normalised by the image size from ``instances.json``.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cmal.data.boxes import xywh_to_xyxy
from cmal.data.convert import Record, get, load_json
from cmal.data.errors import DataError

SPLITS = ("train", "val", "testA", "testB")


def records(refs: str | Path, instances: str | Path, split: str) -> Iterator[Record]:
    """One record per sentence of the refs in ``split`` (train, val, testA or testB)."""
    if split not in SPLITS:
        raise DataError(f"RefCOCO+ split must be one of {SPLITS}, got {split!r}")
    refs = Path(refs)
    if not refs.is_file():
        raise DataError(f"annotation file not found: {refs}")
    try:
        ref_list = pickle.loads(refs.read_bytes())
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise DataError(f"{refs}: not a readable refs pickle ({type(e).__name__}: {e})") from None
    inst = load_json(instances)
    sizes = {}
    for k, im in enumerate(get(inst, "images", list, str(instances))):
        where = f"{instances}: images[{k}]"
        sizes[get(im, "id", int, where)] = (
            get(im, "width", (int, float), where),
            get(im, "height", (int, float), where),
        )
    boxes = {}
    for k, ann in enumerate(get(inst, "annotations", list, str(instances))):
        where = f"{instances}: annotations[{k}]"
        bbox = get(ann, "bbox", list, where)
        if len(bbox) != 4:
            raise DataError(f"{where}: field 'bbox' should be [x, y, w, h], got {bbox!r}")
        boxes[get(ann, "id", int, where)] = xywh_to_xyxy(bbox)
    for k, ref in enumerate(ref_list):
        where = f"{refs}: ref {k}"
        if get(ref, "split", str, where) != split:
            continue
        image, ann = get(ref, "image_id", int, where), get(ref, "ann_id", int, where)
        if image not in sizes or ann not in boxes:
            raise DataError(f"{where}: image_id {image} / ann_id {ann} not in {instances}")
        w, h = sizes[image]
        target = np.asarray(boxes[ann], np.float32) / np.array([w, h, w, h], np.float32)
        for j, sent in enumerate(get(ref, "sentences", list, where)):
            swhere = f"{where}.sentences[{j}]"
            yield Record(
                str(get(sent, "sent_id", int, swhere)),
                str(image),
                get(sent, "sent", str, swhere),
                {
                    "ref_id": get(ref, "ref_id", int, where),
                    "target_box": target,
                    "image_size": np.array([w, h], np.float32),
                },
            )
