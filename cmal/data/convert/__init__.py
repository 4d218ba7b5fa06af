"""Writers of MDS shards from public formats.

Each format module turns its files into :class:`Record` objects (validating every field,
with errors that name the file, the record and the field); :func:`write_shards` joins
them with region features, tokenises, computes anchors and writes the shards.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cmal.data.anchors import ConceptVocab, tokenize_with_anchors
from cmal.data.coverage import Coverage
from cmal.data.errors import DataError
from cmal.data.features import FeatureSource, Regions
from cmal.data.schema import columns


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


@dataclass
class Converted:
    """What a conversion wrote."""

    out: str
    """The shard folder."""
    samples: int
    """Samples written."""
    skipped: int = 0
    """Samples skipped as bad (with ``on_bad_sample=skip``)."""
    anchors: int = 0
    """Anchor pairs over all samples."""
    coverage: Coverage | None = None
    """Anchor coverage of what was written (also in ``<out>/anchor_stats.json``)."""


class SampleBuilder:
    """Tokenises, computes anchors and attaches region features to records."""

    def __init__(
        self,
        features: FeatureSource,
        vocab: ConceptVocab,
        tokenizer,
        max_text_len: int = 40,
        max_regions: int = 36,
        feature_dim: int | None = None,
    ):
        self.features, self.vocab, self.tokenizer = features, vocab, tokenizer
        self.max_text_len, self.max_regions, self.feature_dim = (
            max_text_len,
            max_regions,
            feature_dim,
        )

    def regions(self, key: str) -> Regions:
        """The image's regions, highest confidence first, at most ``max_regions``."""
        r = self.features[key]
        if self.feature_dim is None:
            self.feature_dim = r.features.shape[1]
        if r.features.shape[1] != self.feature_dim:
            raise DataError(
                f"image {key}: region features have {r.features.shape[1]} "
                f"dims, the shards so far have {self.feature_dim}"
            )
        if len(r.tags) == 0:
            raise DataError(f"image {key}: no regions")
        order = np.argsort(-r.confidences, kind="stable")[: self.max_regions]
        return Regions(
            r.features[order], r.boxes[order], [r.tags[i] for i in order], r.confidences[order]
        )

    def image_columns(
        self, regions: Regions, text: str, suffix: str = ""
    ) -> tuple[list[int], dict[str, Any]]:
        """Token ids of the text, and the image columns (with anchors) of one image."""
        ids, pairs = tokenize_with_anchors(
            text,
            self.tokenizer,
            regions.tags,
            list(regions.confidences),
            self.vocab,
            self.max_text_len,
        )
        concepts = [self.vocab.concept_id(t) for t in regions.tags]
        cols = {
            f"anchors{suffix}": [[p.text_pos, p.region, p.concept] for p in pairs],
            f"feats{suffix}": regions.features,
            f"boxes{suffix}": regions.boxes,
            f"concepts{suffix}": np.asarray([-1 if c is None else c for c in concepts], np.int32),
            f"tags{suffix}": regions.tags,
            f"confidences{suffix}": regions.confidences,
        }
        return ids, cols

    def build(self, rec: Record) -> dict[str, Any]:
        """The MDS sample of a record; a DataError names the sample."""
        try:
            return self._build(rec)
        except DataError as e:
            raise DataError(f"sample {rec.id}: {e}") from None

    def _build(self, rec: Record) -> dict[str, Any]:
        ids, cols = self.image_columns(self.regions(rec.image), rec.text)
        sample = {
            "id": rec.id,
            "image": rec.image,
            "text": rec.text,
            "input_ids": np.asarray(ids, np.int32),
        }
        sample.update(cols)
        if rec.image2 is not None:
            _, cols2 = self.image_columns(self.regions(rec.image2), rec.text, "2")
            sample.update(cols2)
            sample["image2"] = rec.image2
        sample.update(rec.extra)
        return sample


def check_out(out: str | Path) -> Path:
    """The shard folder to write, refused when it holds anything (earlier output stays)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pick another --out")
    if out.exists() and any(out.iterdir()):
        raise DataError(
            f"{out}: shard folder exists and is not empty; remove it or pick another --out"
        )
    return out


def write_shards(
    records: Iterable[Record],
    builder: SampleBuilder,
    out: str | Path,
    task: str,
    on_bad_sample: Literal["error", "skip"] = "error",
    size_limit: int = 1 << 24,
) -> Converted:
    """Write the records as MDS shards (sha1 per shard) into ``out``, with the anchor
    vocabulary (``concepts.json``) and its coverage (``anchor_stats.json``) beside them.
    Written into a folder beside ``out`` and renamed into place when complete: a
    conversion that fails (bad input, a full disk, Ctrl-C) leaves no partial ``out``."""
    from streaming import MDSWriter

    out = check_out(out)
    part = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    done = Converted(str(out), 0, coverage=Coverage(builder.vocab))
    try:
        with MDSWriter(
            out=str(part), columns=columns(task), hashes=["sha1"], size_limit=size_limit
        ) as w:
            for rec in records:
                try:
                    sample = builder.build(rec)
                except DataError:
                    if on_bad_sample == "skip":
                        done.skipped += 1
                        continue
                    raise
                w.write(sample)
                done.samples += 1
                done.anchors += len(sample["anchors"])
                done.coverage.add(sample)
        if done.samples == 0:
            raise DataError(
                f"{out}: no sample was written (skipped {done.skipped}); check the inputs"
            )
        done.coverage.skipped = done.skipped
        done.coverage.write(part)
        if out.exists():
            out.rmdir()  # checked empty above
        os.replace(part, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the shards ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return done
