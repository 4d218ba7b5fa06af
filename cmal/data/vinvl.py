"""VinVL region features as VinVL / Oscar release them (read as microsoft/Oscar's datasets
and scene_graph_benchmark's ``tsv_io`` read them).

Three feature-row layouts, each ``image_key`` first:

- ``key <tab> {"image_w", "image_h", "objects": [{"rect", "class", "conf", "feature"}]}``:
  scene_graph_benchmark's ``predictions.tsv`` with ``TEST.OUTPUT_FEATURE`` (classes inside);
- ``key <tab> {"num_boxes": N, "features": base64 float32 (N, D)}``: Oscar's released
  ``*.feature.tsv``;
- ``key <tab> N <tab> base64 float32 (N, D)``: the later 3-field feature file.

The last two carry no classes or boxes: those come from the label file beside them
(``*.label.tsv``: ``key <tab> [{"class", "conf", "rect"}]`` or ``{"objects": [...],
"image_h", "image_w"}``), and the image size from the ``*.hw.tsv`` file when the label row
does not have it (``key <tab> [{"height", "width"}]``). A label row must list as many
objects as the feature row has boxes, in the same order (Oscar pairs them by position).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from cmal.data.errors import DataError


def b64_array(text: Any, dtype, where: str, field: str) -> np.ndarray:
    """A base64 field as a flat array, or a DataError naming the field."""
    try:
        return np.frombuffer(base64.b64decode(text), dtype=dtype)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: {field}: not base64 of {np.dtype(dtype).name} ({e})") from None


def json_field(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e})") from None


def count(text: str, where: str, field: str) -> int:
    """An integer field (a box count), or a DataError naming it."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {field} should be an integer, got {text!r}") from None
    if n < 0:
        raise DataError(f"{where}: {field} should be >= 0, got {n}")
    return n


def features_of(fields: list[str], where: str) -> np.ndarray | dict:
    """The (N, D) features of a 2- or 3-field VinVL row, or (predictions layout) the row's
    JSON object, whose objects carry their own class, box and feature."""
    if len(fields) == 3:
        n = count(fields[1], where, "num_boxes")
        return region_rows(fields[2], n, where)
    data = json_field(fields[1], where)
    if isinstance(data, dict) and "objects" in data:
        return data
    if isinstance(data, dict) and "features" in data:
        n = count(data.get("num_boxes"), where, "num_boxes")
        return region_rows(data["features"], n, where)
    if isinstance(data, list):
        rows = [b64_array(field(o, "feature", where), np.float32, where, "feature") for o in data]
        return stack(rows, where)
    raise DataError(
        f"{where}: expected a VinVL row: {{'objects': [...]}}, {{'num_boxes', 'features'}} "
        "or a list of {'feature'}"
    )


def objects_of(data: Any, where: str) -> tuple[list[dict], tuple[float, float] | None]:
    """A label row's objects and, when it has it, the image size (width, height)."""
    if isinstance(data, dict):
        objs = field(data, "objects", where)
        size = (
            (data["image_w"], data["image_h"]) if "image_w" in data and "image_h" in data else None
        )
    else:
        objs, size = data, None
    if not isinstance(objs, list):
        raise DataError(f"{where}: objects should be a list, got {type(objs).__name__}")
    return objs, size


def size_of(text: str, where: str) -> tuple[float, float]:
    """(width, height) of an hw row: ``[{"height", "width"}]``, a dict, or "height width"."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = text.split()
        if len(data) == 2 and all(x.isdigit() for x in data):
            return float(data[1]), float(data[0])
    if isinstance(data, list) and data:
        data = data[0]
    if isinstance(data, dict):
        return field(data, "width", where), field(data, "height", where)
    raise DataError(f"{where}: expected [{{'height', 'width'}}], got {text[:80]!r}")


def sibling(path: Path, kind: str) -> Path | None:
    """The label or hw file beside a feature file, named as Oscar names them
    (``train.feature.tsv`` -> ``train.label.tsv``; ``features.tsv`` -> ``labels.tsv``)."""
    name = path.name
    for old, new in (("feature", kind), ("features", kind + "s")):
        for cand in (name.replace(f".{old}.", f".{new}."), name.replace(old, new, 1)):
            if cand != name and (path.parent / cand).is_file():
                return path.parent / cand
    return None


def field(obj: Any, name: str, where: str) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        raise DataError(f"{where}: missing field '{name}'")
    return obj[name]


def region_rows(text: Any, n: int, where: str) -> np.ndarray:
    """A base64 float32 ``features`` field split into ``n`` region rows (the tsv layouts
    of LXMERT, bottom-up-attention and VinVL store them so), or a DataError."""
    flat = b64_array(text, np.float32, where, "features")
    if n == 0:
        return np.zeros((0, 0), np.float32)
    if flat.size % n:
        raise DataError(f"{where}: features: {flat.size} floats do not split into {n} regions")
    return flat.reshape(n, -1)


def stack(rows: list[np.ndarray], where: str) -> np.ndarray:
    dims = {len(x) for x in rows}
    if len(dims) > 1:
        raise DataError(f"{where}: feature: regions have different sizes {sorted(dims)}")
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)
