"""COCO captions (``captions_<split>.json``) -> pre-training records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, load_json
from cmal.data.errors import DataError


def records(captions: str | Path) -> Iterator[Record]:
    """One record per caption annotation; the image key is the COCO image id."""
    data = load_json(captions)
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise DataError(f"{captions}: expected an object with an 'annotations' list")
    for k, ann in enumerate(anns):
        where = f"{captions}: annotations[{k}]"
        image = get(ann, "image_id", (int, str), where)
        yield Record(
            str(get(ann, "id", (int, str), where)), str(image), get(ann, "caption", str, where)
        )
