"""SNLI-VE jsonl (``snli_ve_<split>.jsonl``) -> entailment records."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get
from cmal.data.errors import DataError
from cmal.data.schema import VE_LABELS


def records(jsonl: str | Path) -> Iterator[Record]:
    """One record per line: Flickr30K_ID (image), sentence2 (hypothesis), gold_label."""
    path = Path(jsonl)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}: line {n}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            label = get(rec, "gold_label", str, where)
            if label not in VE_LABELS:
                raise DataError(
                    f"{where}: field 'gold_label' should be one of {VE_LABELS}, got {label!r}"
                )
            image = str(get(rec, "Flickr30K_ID", (str, int), where))
            pair = str(get(rec, "pairID", (str, int), where))
            yield Record(
                pair, image, get(rec, "sentence2", str, where), {"label": VE_LABELS.index(label)}
            )
