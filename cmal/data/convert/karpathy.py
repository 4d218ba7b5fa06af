"""Karpathy-split captions (``dataset_coco.json``, ``dataset_flickr30k.json``) ->
pre-training records: the files ALBEF, UNITER and BLIP train on.

Read as ruotianluo/ImageCaptioning.pytorch's ``scripts/prepro_labels.py`` reads them
(neuraltalk2's own ``prepro.py`` takes another, simpler json): ``images`` is a
list of ``{"split", "filename", "sentences": [{"raw", "tokens", "sentid"}], "imgid"}``,
COCO images adding ``"filepath"`` and ``"cocoid"``. The image key is ``cocoid`` for COCO,
the file name (``"1000092795.jpg"``) for Flickr30k.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, load_json
from cmal.data.errors import DataError

SPLITS = ("train", "restval", "val", "test")
"""The split names of the files; ``restval`` is COCO's val images given to training."""


def records(path: str | Path, splits: tuple[str, ...] = ("train", "restval")) -> Iterator[Record]:
    """One record per sentence of the images in ``splits``."""
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise DataError(f"Karpathy split must be among {', '.join(SPLITS)}, got {splits}")
    images = get(load_json(path), "images", list, str(path))
    for k, img in enumerate(images):
        where = f"{path}: images[{k}]"
        if get(img, "split", str, where) not in splits:
            continue
        if "cocoid" in img:
            key = str(get(img, "cocoid", (int, str), where))
        else:
            key = get(img, "filename", str, where)
        for j, sent in enumerate(get(img, "sentences", list, where)):
            swhere = f"{where}.sentences[{j}]"
            sid = get(sent, "sentid", (int, str), swhere)
            yield Record(str(sid), key, get(sent, "raw", str, swhere))
