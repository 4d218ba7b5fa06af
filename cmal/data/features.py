"""Region features from a detector, in the formats VLP work ships them:

- **BUTD/LXMERT tsv** (one image per line, tab-separated, arrays base64-encoded):
  ``img_id img_h img_w objects_id objects_conf attrs_id attrs_conf num_boxes boxes features``
  (LXMERT's 10 fields; tags come from ``objects_id`` and a class list, and with an
  attribute list too, ``attrs_id`` prefixes each tag: "red car", VinVL-style), or the original
  bottom-up-attention 6 fields ``image_id image_w image_h num_boxes boxes features``
  (no tags, so no anchors).
- **VinVL tsv** in the layouts VinVL and Oscar release (see :mod:`cmal.data.vinvl`): the
  detector's ``predictions.tsv`` (classes and features inside), or a ``*.feature.tsv``
  with its ``*.label.tsv`` (and ``*.hw.tsv``) beside it.
- **npz folder**: ``<key>.npz`` per image with ``features`` (R, F), ``boxes`` (R, 4) pixel
  x1,y1,x2,y2, ``image_w``, ``image_h``, and ``tags`` (R,) + ``confidences`` (R,), or
  ``objects_id`` + ``objects_conf`` with a class list (and optionally ``attrs_id`` with an
  attribute list).

Every reader gives :class:`Regions` keyed by the image key as a string. An annotation's
image reference finds its features under any of the forms the releases use for one image
(:func:`key_forms`): COCO's ``391895``, ``000000391895``, ``COCO_val2014_000000391895``
and ``.jpg`` file names; Flickr30k's ``3416050480.jpg``; NLVR2's ``dev-850-0-img0.png``.
"""

from __future__ import annotations

import base64
import csv
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmal.data import vinvl
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
F16_MAX = float(np.finfo(np.float16).max)


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
    # Checked here, once per image, not when read: NaN or inf, or beyond float16's range
    # (stored as inf). max/min propagate NaN, so one comparison each catches all three.
    top = float(feats.max(initial=0.0)), float(feats.min(initial=0.0))
    if not (top[0] <= F16_MAX and top[1] >= -F16_MAX):
        raise DataError(f"{where}: features contain NaN or inf (or values beyond float16)")
    scale = np.array([w, h, w, h], np.float32)
    return Regions(
        feats.astype(np.float16),
        np.clip(boxes_px / scale, 0.0, 1.0),
        [str(t) for t in tags],
        np.asarray(confs, np.float32),
    )


_b64 = vinvl.b64_array


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


_IMAGE_EXT = re.compile(r"\.(jpe?g|png|gif|bmp|webp|npz)$", re.IGNORECASE)
_COCO_NAME = re.compile(r"(?:COCO_[A-Za-z]+\d{4}_)?0*(\d+)")


def key_forms(key: str) -> list[str]:
    """The forms one image's key takes across releases, most specific first: the key, its
    file stem, and for a numeric COCO / Flickr name the bare number ("COCO_val2014_
    000000391895.jpg" -> "COCO_val2014_000000391895" -> "391895")."""
    forms = [key]
    stem = _IMAGE_EXT.sub("", key.rsplit("/", 1)[-1])
    forms.append(stem)
    m = _COCO_NAME.fullmatch(stem)
    if m:
        forms.append(m.group(1) or "0")
    return list(dict.fromkeys(forms))


class FeatureSource:
    """Random access to region features by image key, from any supported format."""

    def __init__(
        self,
        path: str | Path,
        classes: list[str] | None = None,
        attributes: list[str] | None = None,
        labels: str | Path | None = None,
        hw: str | Path | None = None,
    ):
        self.path = Path(path)
        self.classes = classes
        self.attributes = attributes
        """When given, each region's tag is "<attribute> <class>" (LXMERT tsv and npz
        with ``attrs_id``): anchors then bind attribute and object together."""
        self._offsets: dict[str, int] = {}
        self._forms: dict[str, str | None] | None = None
        self.labels: _Rows | None = None
        self.hw: _Rows | None = None
        if self.path.is_dir():
            self.kind = "npz"
        elif self.path.is_file():
            self._index_tsv()
        else:
            raise DataError(f"region features not found: {self.path}")
        if self.kind == "vinvl":
            found = labels or vinvl.sibling(self.path, "label")
            self.labels = _Rows(Path(found)) if found else None
            found = hw or vinvl.sibling(self.path, "hw")
            self.hw = _Rows(Path(found)) if found else None
        elif labels is not None or hw is not None:
            raise DataError(f"{self.path}: --labels / --hw go with a VinVL feature tsv only")

    def _index_tsv(self) -> None:
        """Byte offset of every image's line, so lookups read one line."""
        self._offsets, n = _index(self.path)
        self.kind = {10: "lxmert", 6: "butd", 2: "vinvl", 3: "vinvl"}.get(n)
        if self.kind is None:
            raise DataError(
                f"{self.path}: line 1 has {n} tab-separated fields; expected 10 (LXMERT), "
                "6 (bottom-up-attention) or 2-3 (VinVL)"
            )
        if self.kind == "lxmert" and self.classes is None:
            raise DataError(
                f"{self.path}: LXMERT tsv stores class ids; pass the class list (--classes)"
            )

    def tag_source(self) -> str | None:
        """None when the regions carry detector classes; else why they do not and which
        flag or file would give them (the words of the converter's warning)."""
        if self.kind == "butd":
            return (
                f"{self.path} is a bottom-up-attention 6-field tsv, which stores no object "
                "classes: use the LXMERT 10-field tsv of the same detector (objects_id) with "
                "--classes objects_vocab.txt, a VinVL tsv, or `cmal extract`"
            )
        if self.kind == "npz" and not self._npz_has_tags():
            return (
                f"the npz files in {self.path} have no 'tags' (or 'objects_id' with "
                "--classes): write them with `cmal extract`, or add the detector's classes"
            )
        if self.kind == "vinvl" and self.labels is None and not self._vinvl_has_objects():
            return (
                f"{self.path} holds VinVL features without classes and no label file was "
                "found beside it: pass --labels <split>.label.tsv"
            )
        return None

    def keys(self) -> list[str]:
        """Image keys available."""
        if self.kind == "npz":
            return sorted(p.stem for p in self.path.glob("*.npz"))
        return list(self._offsets)

    def _has(self, key: str) -> bool:
        if self.kind == "npz":
            return (self.path / f"{key}.npz").is_file()
        return key in self._offsets

    def resolve(self, key: str) -> str | None:
        """The source's own key for an annotation's image reference (see
        :func:`key_forms`); None when there is none, or when two images share the form."""
        if self._has(key):
            return key
        if self._forms is None:
            self._forms = {}
            for own in self.keys():
                for form in key_forms(own)[1:]:
                    self._forms[form] = None if self._forms.get(form, own) != own else own
        for form in key_forms(key):
            if self._has(form):
                return form
            if self._forms.get(form) is not None:
                return self._forms[form]
        return None

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) is not None

    def __getitem__(self, key: str) -> Regions:
        own = self.resolve(key)
        if own is None:
            some = ", ".join(repr(k) for k in self.keys()[:3])
            raise DataError(
                f"{self.path}: no region features for image {key!r} (tried "
                f"{', '.join(key_forms(key))}; the file's keys look like {some})"
            )
        if self.kind == "npz":
            return self._npz(own)
        fields = _Rows.read(self.path, self._offsets[own])
        where = f"{self.path} (image {own})"
        if self.kind == "vinvl":
            return self._vinvl(own, fields, where)
        return {"lxmert": self._lxmert, "butd": self._butd}[self.kind](fields, where)

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
        n = vinvl.count(f[7], where, "num_boxes")
        ids = _b64(f[3], np.int64, where, "objects_id")
        attrs = _b64(f[5], np.int64, where, "attrs_id") if self.attributes is not None else None
        return _regions(
            where,
            vinvl.region_rows(f[9], n, where),
            _boxes(f[8], where),
            _size(f[2], where, "img_w"),
            _size(f[1], where, "img_h"),
            self._tags(ids, attrs, where),
            _b64(f[4], np.float32, where, "objects_conf"),
        )

    def _butd(self, f: list[str], where: str) -> Regions:
        if len(f) != 6:
            raise DataError(f"{where}: expected 6 fields, got {len(f)}")
        n = vinvl.count(f[3], where, "num_boxes")
        return _regions(
            where, vinvl.region_rows(f[5], n, where), _boxes(f[4], where),
            _size(f[1], where, "image_w"), _size(f[2], where, "image_h"), [""] * n, np.ones(n),
        )  # fmt: skip

    def _npz_has_tags(self) -> bool:
        first = next(iter(sorted(self.path.glob("*.npz"))), None)
        if first is None:
            return True  # no file: the conversion's own error says so
        try:
            names = np.load(first, allow_pickle=False).files
        except (ValueError, OSError, EOFError):
            return True  # unreadable: the conversion names the file
        return "tags" in names or ("objects_id" in names and self.classes is not None)

    def _vinvl_has_objects(self) -> bool:
        first = next(iter(self._offsets), None)
        if first is None:
            return False
        fields = _Rows.read(self.path, self._offsets[first])
        return isinstance(vinvl.features_of(fields, f"{self.path} (image {first})"), dict)

    def _vinvl(self, key: str, f: list[str], where: str) -> Regions:
        got = vinvl.features_of(f, where)
        if isinstance(got, dict):  # predictions.tsv: everything in one row but the size
            objs, size = vinvl.objects_of(got, where)
            feats = [
                _b64(vinvl.field(o, "feature", where), np.float32, where, "feature") for o in objs
            ]
            size = self._image_size(key, size, where)
            return self._from_objects(where, vinvl.stack(feats, where), objs, size)
        feats = got
        if self.labels is None:
            n = len(feats)
            return _regions(where, feats, np.zeros((n, 4)), 1.0, 1.0, [""] * n, np.ones(n))
        lwhere = f"{self.labels.path} (image {key})"
        objs, size = vinvl.objects_of(
            vinvl.json_field(self.labels.row(key, lwhere)[1], lwhere), lwhere
        )
        if len(objs) != len(feats):
            raise DataError(
                f"{lwhere}: {len(objs)} objects, but {self.path} has {len(feats)} boxes for this "
                "image; VinVL pairs them by position, so both must come from one detector run"
            )
        return self._from_objects(lwhere, feats, objs, self._image_size(key, size, lwhere))

    def _image_size(self, key: str, size, where: str) -> tuple[float, float]:
        """The row's own (width, height), else the hw tsv's: scene_graph_benchmark writes
        predictions.tsv rows without one, the size being in the data set's hw tsv."""
        if size is not None:
            return size
        if self.hw is None:
            raise DataError(
                f"{where}: no image size in the row and no hw tsv (found beside "
                f"{self.path} or given): pass --hw <split>.hw.tsv"
            )
        hwhere = f"{self.hw.path} (image {key})"
        return vinvl.size_of(self.hw.row(key, hwhere)[1], hwhere)

    def _from_objects(self, where: str, feats, objs: list, size) -> Regions:
        return _regions(
            where, feats, [vinvl.field(o, "rect", where) for o in objs],
            _size(size[0], where, "image_w"), _size(size[1], where, "image_h"),
            [vinvl.field(o, "class", where) for o in objs],
            [_size(vinvl.field(o, "conf", where), where, "conf") for o in objs],
        )  # fmt: skip

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
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{where}: not a readable npz file ({e})") from None


class _Rows:
    """A keyed tsv beside the features (VinVL's label and hw files), indexed on first use."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise DataError(f"file not found: {path}")
        self.path = path
        self._offsets: dict[str, int] | None = None

    def row(self, key: str, where: str) -> list[str]:
        if self._offsets is None:
            self._offsets, _ = _index(self.path)
        if key not in self._offsets:
            raise DataError(f"{where}: no row for this image")
        fields = self.read(self.path, self._offsets[key])
        if len(fields) < 2:
            raise DataError(f"{where}: expected key <tab> json, got {len(fields)} field(s)")
        return fields

    @staticmethod
    def read(path: Path, offset: int) -> list[str]:
        with open(path, "rb") as f:
            f.seek(offset)
            line = f.readline()
        try:
            return line.decode().rstrip("\r\n").split("\t")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: byte {offset}: not UTF-8 text ({e})") from None


def _index(path: Path) -> tuple[dict[str, int], int]:
    """Byte offset of every key's line, and the field count of the first line."""
    offsets: dict[str, int] = {}
    n = 0
    with open(path, "rb") as f:
        offset = 0
        for line in f:
            if offset == 0:
                n = len(line.rstrip(b"\r\n").split(b"\t"))
            if line.strip():
                offsets[line.split(b"\t", 1)[0].decode(errors="replace")] = offset
            offset += len(line)
    if not offsets:
        raise DataError(f"{path}: empty file")
    return offsets, n


def _size(value, where: str, field: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {field} should be a number, got {value!r}") from None


def _boxes(text: str, where: str) -> np.ndarray:
    flat = _b64(text, np.float32, where, "boxes")
    if flat.size % 4:
        raise DataError(f"{where}: boxes: {flat.size} floats are not whole (x1, y1, x2, y2) boxes")
    return flat.reshape(-1, 4)


def _lookup(names: list[str], i: int, where: str, what: str) -> str:
    if not 0 <= i < len(names):
        raise DataError(f"{where}: {what} id {i} outside the {what} list ({len(names)})")
    return names[i]
