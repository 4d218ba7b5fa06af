"""Region features from a detector, in the formats VLP work ships them:

- **BUTD/LXMERT tsv** (one image per line, tab-separated, arrays base64-encoded):
  ``img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features``
  (LXMERT's 10 fields; tags come from ``objects_id`` and a class list, and with an
  attribute list too, ``attrs_id`` prefixes each tag: "red car", VinVL-style), or the original
  bottom-up-attention 6 fields ``image_id image_w image_h num_boxes boxes features``
  (no tags, so no anchors).
- **VinVL tsv**: ``image_key <tab> json`` with ``{"image_w", "image_h", "objects": [{"rect":
  [x1,y1,x2,y2], "class", "conf", "feature": base64 float32}]}``.
- **npz folder**: ``<key>.npz`` per image with ``features`` (R, F), ``boxes`` (R, 4) pixel
  x1,y1,x2,y2, ``image_w``, ``image_h``, and ``tags`` (R,) + ``confidences`` (R,), or
  ``objects_id`` + ``objects_conf`` with a class list (and optionally ``attrs_id`` with an
  attribute list).

Every reader gives :class:`Regions` keyed by the image key as a string.
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmal.data.errors import DataError

LXMERT_FIELDS = [
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
]
BUTD_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]
csv.field_size_limit(sys.maxsize)


@dataclass
class Regions:
    """The detector's output for one image."""

    features: np.ndarray
    """(R, F) float16."""
    boxes: np.ndarray
    """(R, 4) float32 x1, y1, x2, y2 divided by image width / height."""
    tags: list[str]
    """Class name per region ("" when the source has none)."""
    confidences: np.ndarray
    """(R,) float32."""


def _regions(where: str, feats, boxes_px, w, h, tags, confs) -> Regions:
    """Check shapes and normalise boxes; errors name ``where`` (file and image)."""
    feats = np.asarray(feats)
    boxes_px = np.asarray(boxes_px, np.float32)
    if feats.ndim != 2:
        raise DataError(
            f"{where}: features: expected a (regions, dim) array, got shape {feats.shape}"
        )
    r = feats.shape[0]
    if boxes_px.shape != (r, 4):
        raise DataError(f"{where}: boxes: expected shape ({r}, 4), got {boxes_px.shape}")
    if len(tags) != r or len(confs) != r:
        raise DataError(f"{where}: {r} regions but {len(tags)} tags and {len(confs)} confidences")
    if not (w > 0 and h > 0):
        raise DataError(f"{where}: image size must be positive, got {w}x{h}")
    if not np.isfinite(feats).all():
        raise DataError(f"{where}: features contain NaN or inf")
    scale = np.array([w, h, w, h], np.float32)
    return Regions(
        feats.astype(np.float16),
        np.clip(boxes_px / scale, 0.0, 1.0),
        [str(t) for t in tags],
        np.asarray(confs, np.float32),
    )


def _b64(text: str, dtype, where: str, field: str) -> np.ndarray:
    try:
        return np.frombuffer(base64.b64decode(text), dtype=dtype)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: {field}: not base64 of {np.dtype(dtype).name} ({e})") from None


def encode_b64(array: np.ndarray) -> str:
    """Base64 of the array's raw bytes, as the tsv formats store arrays."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def lxmert_line(
    key: str, w: int, h: int, boxes_px, class_ids, confs, feats, attr_ids=None, attr_confs=None
) -> str:
    """One LXMERT-format tsv line (float32 boxes and features, int64 class and attribute
    ids; attributes default to id 0 with confidence 0, as when a detector has none)."""
    n = len(class_ids)
    fields = [
        key,
        str(h),
        str(w),
        encode_b64(np.asarray(class_ids, np.int64)),
        encode_b64(np.asarray(confs, np.float32)),
        encode_b64(np.asarray(np.zeros(n) if attr_ids is None else attr_ids, np.int64)),
        encode_b64(np.asarray(np.zeros(n) if attr_confs is None else attr_confs, np.float32)),
        str(n),
        encode_b64(np.asarray(boxes_px, np.float32)),
        encode_b64(np.asarray(feats, np.float32)),
    ]
    return "\t".join(fields) + "\n"


class FeatureSource:
    """Random access to region features by image key, from any supported format."""

    def __init__(
        self,
        path: str | Path,
        classes: list[str] | None = None,
        attributes: list[str] | None = None,
    ):
        self.path = Path(path)
        self.classes = classes
        self.attributes = attributes
        """When given, each region's tag is "<attribute> <class>" (LXMERT tsv and npz
        with ``attrs_id``): anchors then bind attribute and object together."""
        self._offsets: dict[str, int] = {}
        if self.path.is_dir():
            self.kind = "npz"
        elif self.path.is_file():
            self._index_tsv()
        else:
            raise DataError(f"region features not found: {self.path}")

    def _index_tsv(self) -> None:
        """Byte offset of every image's line, so lookups read one line."""
        with open(self.path, "rb") as f:
            first = f.readline().rstrip(b"\r\n").split(b"\t")
            n = len(first)
            self.kind = {10: "lxmert", 6: "butd", 2: "vinvl"}.get(n)
            if self.kind is None:
                raise DataError(
                    f"{self.path}: line 1 has {n} tab-separated fields; expected 10 (LXMERT), "
                    "6 (bottom-up-attention) or 2 (VinVL key + json)"
                )
            f.seek(0)
            offset = 0
            for line in f:
                key = line.split(b"\t", 1)[0].decode()
                self._offsets[key] = offset
                offset += len(line)
        if self.kind == "lxmert" and self.classes is None:
            raise DataError(
                f"{self.path}: LXMERT tsv stores class ids; pass the class list (--classes)"
            )

    def keys(self) -> list[str]:
        """Image keys available."""
        if self.kind == "npz":
            return sorted(p.stem for p in self.path.glob("*.npz"))
        return list(self._offsets)

    def __contains__(self, key: str) -> bool:
        if self.kind == "npz":
            return (self.path / f"{key}.npz").is_file()
        return key in self._offsets

    def __getitem__(self, key: str) -> Regions:
        if key not in self:
            raise DataError(f"{self.path}: no region features for image {key!r}")
        if self.kind == "npz":
            return self._npz(key)
        with open(self.path, "rb") as f:
            f.seek(self._offsets[key])
            fields = f.readline().decode().rstrip("\r\n").split("\t")
        where = f"{self.path} (image {key})"
        return {"lxmert": self._lxmert, "butd": self._butd, "vinvl": self._vinvl}[self.kind](
            fields, where
        )

    def _tags(self, class_ids, attr_ids, where: str) -> list[str]:
        names = [_lookup(self.classes, int(i), where, "class") for i in class_ids]
        if self.attributes is None or attr_ids is None:
            return names
        if len(attr_ids) != len(names):
            raise DataError(f"{where}: {len(attr_ids)} attribute ids for {len(names)} regions")
        attrs = [_lookup(self.attributes, int(i), where, "attribute") for i in attr_ids]
        return [f"{a} {c}" for a, c in zip(attrs, names, strict=True)]

    def _lxmert(self, f: list[str], where: str) -> Regions:
        if len(f) != 10:
            raise DataError(f"{where}: expected 10 fields, got {len(f)}")
        n = int(f[7])
        feats = _b64(f[9], np.float32, where, "features")
        if feats.size % max(n, 1):
            raise DataError(f"{where}: features: {feats.size} floats do not split into {n} regions")
        ids = _b64(f[3], np.int64, where, "objects_id")
        attrs = _b64(f[5], np.int64, where, "attrs_id") if self.attributes is not None else None
        return _regions(
            where,
            feats.reshape(n, -1),
            _b64(f[8], np.float32, where, "boxes").reshape(-1, 4),
            float(f[2]),
            float(f[1]),
            self._tags(ids, attrs, where),
            _b64(f[4], np.float32, where, "objects_conf"),
        )

    def _butd(self, f: list[str], where: str) -> Regions:
        n = int(f[3])
        feats = _b64(f[5], np.float32, where, "features")
        if feats.size % max(n, 1):
            raise DataError(f"{where}: features: {feats.size} floats do not split into {n} regions")
        boxes = _b64(f[4], np.float32, where, "boxes").reshape(-1, 4)
        return _regions(
            where, feats.reshape(n, -1), boxes, float(f[1]), float(f[2]), [""] * n, np.ones(n)
        )

    def _vinvl(self, f: list[str], where: str) -> Regions:
        try:
            data = json.loads(f[1])
            objs = data["objects"]
            feats = [_b64(o["feature"], np.float32, where, "feature") for o in objs]
            dims = {len(x) for x in feats}
            if len(dims) > 1:
                raise DataError(f"{where}: feature: regions have different sizes {sorted(dims)}")
            return _regions(
                where,
                np.stack(feats) if feats else np.zeros((0, 0), np.float32),
                [o["rect"] for o in objs],
                float(data["image_w"]),
                float(data["image_h"]),
                [o["class"] for o in objs],
                [float(o["conf"]) for o in objs],
            )
        except (KeyError, json.JSONDecodeError, TypeError) as e:
            raise DataError(f"{where}: malformed VinVL record ({type(e).__name__}: {e})") from None

    def _npz(self, key: str) -> Regions:
        path = self.path / f"{key}.npz"
        where = f"{path}"
        try:
            z = np.load(path, allow_pickle=False)
            if "tags" in z:
                tags, confs = list(z["tags"]), z["confidences"]
            elif "objects_id" in z:
                if self.classes is None:
                    raise DataError(f"{where}: stores objects_id; pass the class list (--classes)")
                attrs = z["attrs_id"] if "attrs_id" in z else None
                tags = self._tags(z["objects_id"], attrs, where)
                confs = z["objects_conf"]
            else:
                n = len(z["features"])
                tags, confs = [""] * n, np.ones(n)
            return _regions(
                where,
                z["features"],
                z["boxes"],
                float(z["image_w"]),
                float(z["image_h"]),
                tags,
                confs,
            )
        except KeyError as e:
            raise DataError(f"{where}: missing array {e}") from None
        except (ValueError, OSError) as e:
            raise DataError(f"{where}: not a readable npz file ({e})") from None


def _lookup(names: list[str], i: int, where: str, what: str) -> str:
    if not 0 <= i < len(names):
        raise DataError(f"{where}: {what} id {i} outside the {what} list ({len(names)})")
    return names[i]
