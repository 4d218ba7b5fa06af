"""NLVR2 json (one object per line: identifier, sentence, label) -> two-image records.

Images follow NLVR2's naming: identifier ``split-set-pair-sentence`` has the images
``split-set-pair-img0`` and ``split-set-pair-img1`` (file extension dropped as the key).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, read_jsonl
from cmal.data.errors import DataError


def records(path: str | Path) -> Iterator[Record]:
    """One record per statement; label 1 for "True"."""
    for where, rec in read_jsonl(path):
        ident = get(rec, "identifier", str, where)
        parts = ident.split("-")
        if len(parts) != 4:
            raise DataError(
                f"{where}: field 'identifier' should look like split-set-pair-n, got {ident!r}"
            )
        label = get(rec, "label", str, where)
        if label not in ("True", "False"):
            raise DataError(f"{where}: field 'label' should be 'True' or 'False', got {label!r}")
        stem = "-".join(parts[:3])
        yield Record(
            ident, f"{stem}-img0", get(rec, "sentence", str, where),
            {"label": int(label == "True")}, image2=f"{stem}-img1",
        )  # fmt: skip
