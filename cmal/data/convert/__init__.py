"""Writers of MDS shards from public formats.

Each format module turns its files into :class:`Record` objects (validating every field,
with errors that name the file, the record and the field); :mod:`.write` joins them with
region features, tokenises, computes anchors and writes the shards, :mod:`.parts` splits
that work over processes or SLURM array tasks.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmal.data.errors import DataError


@dataclass
class Record:
    """One sample before it meets its region features."""

    id: str
    """Sample id in the source."""
    image: str
    """Image key in the region-feature source."""
    text: str
    """The sample's text."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Task columns (see ``schema.TASK_COLUMNS``)."""
    image2: str | None = None
    """NLVR2 only: the second image."""


def get(rec: dict, name: str, kind: type | tuple[type, ...], where: str) -> Any:
    """Field ``name`` of an annotation record, of type ``kind``, or a DataError naming it."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if name not in rec:
        raise DataError(f"{where}: missing field '{name}'")
    value = rec[name]
    if not isinstance(value, kind) or isinstance(value, bool) and bool not in _as_tuple(kind):
        want = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise DataError(f"{where}: field '{name}' should be {want}, got {value!r}")
    return value


def _as_tuple(kind) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def load_json(path: str | Path) -> Any:
    """A JSON file, or a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for every non-empty line of a JSON-lines file; bad lines are a
    DataError naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                where = f"{path}: line {n}"
                try:
                    yield where, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e})") from None


def read_classes(path: str | Path | None) -> list[str] | None:
    """A class list: one name per line, id order (objects_vocab.txt style: ',' separates
    other names of the class, the first is its name; see :func:`read_aliases`)."""
    if path is None:
        return None
    return [names[0] for names in _class_lines(path)]


def read_aliases(path: str | Path | None) -> dict[str, str]:
    """The other names on a class-list line -> the line's first name (bottom-up-attention's
    ``vg.py`` maps every name on a line to that line's class)."""
    if path is None:
        return {}
    return {alias: names[0] for names in _class_lines(path) for alias in names[1:]}


def _class_lines(path: str | Path) -> list[list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class list not found: {path}")
    try:
        lines = path.read_text().splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file ({e})") from None
    out = []
    for line in lines:
        names = [n.strip() for n in line.split(",") if n.strip()]
        if names:
            out.append(names)
    if not out:
        raise DataError(f"{path}: the class list is empty")
    return out


def concept_names(classes: list[str], attributes: list[str] | None = None) -> list[str]:
    """The anchor concepts of a detector: its classes, or every "<attribute> <class>" when
    regions are tagged with attributes too."""
    if attributes is None:
        return list(classes)
    return [f"{a} {c}" for c in classes for a in attributes]
