"""SNLI-VE jsonl (``snli_ve_<split>.jsonl``) -> entailment records."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, read_jsonl
from cmal.data.errors import DataError
from cmal.data.schema import VE_LABELS


def records(jsonl: str | Path) -> Iterator[Record]:
    """One record per line: Flickr30K_ID (image), sentence2 (hypothesis), gold_label."""
    for where, rec in read_jsonl(jsonl):
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
