"""RefCOCO+ (``refs(unc).p`` + COCO ``instances.json``) -> referring-expression records.

Read as the refer API reads them (lichengunc/refer, ``refer.py``): ``refs(unc).p`` is a
pickle of ``{"ref_id", "ann_id", "image_id", "split", "category_id", "file_name",
"sent_ids", "sentences": [{"sent_id", "sent", "raw", "tokens"}]}``, written by Python 2
(its strings are byte strings: they are read as UTF-8); ``instances.json`` holds COCO's
``images`` and ``annotations``. Each sentence of a ref in the chosen split becomes a record
whose target is the ref's annotation box, normalised by the image size.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cmal.data.boxes import xywh_to_xyxy
from cmal.data.convert import Record, get, load_json
from cmal.data.errors import DataError

UNC_SPLITS = ("train", "val", "testA", "testB")
"""RefCOCO / RefCOCO+ splits by UNC."""
SPLITS = (*UNC_SPLITS, "test")
"""Every split a refs file may hold (``test``: RefCOCOg's, by UMD)."""


class _Refs(pickle.Unpickler):
    """Builds only data: builtin containers, str / bytes / int / float / bool / None. A
    refs file is handed from user to user, and a plain pickle runs whatever callable it
    names; this one refuses every name but the two harmless ones a protocol-2 pickle of
    plain data may use (sets, and bytes written by Python 3 as ``_codecs.encode``)."""

    ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
               ("__builtin__", "frozenset"), ("_codecs", "encode")}  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"it names {module}.{name}, and a refs file holds only plain data (not loaded)"
        )


def load_refs(path: Path):
    """The refs pickle (plain data only; nothing in it runs), Python 2's byte strings
    decoded as UTF-8."""
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with open(path, "rb") as f:
            refs = _text(_Refs(f, encoding="bytes").load())
    except Exception as e:  # any unpickling failure means the same thing to the user
        raise DataError(f"{path}: not a readable refs pickle ({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise DataError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def _text(obj):
    if isinstance(obj, bytes):
        return obj.decode("utf-8", errors="replace")
    if isinstance(obj, dict):
        return {_text(k): _text(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_text(v) for v in obj]
    return obj


def records(refs: str | Path, instances: str | Path, split: str) -> Iterator[Record]:
    """One record per sentence of the refs in ``split`` (train, val, testA or testB)."""
    if split not in SPLITS:
        raise DataError(f"RefCOCO+ split must be one of {SPLITS}, got {split!r}")
    refs = Path(refs)
    ref_list = load_refs(refs)
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
