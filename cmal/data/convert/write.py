"""Records joined with region features, written as one part of a shard set: the image
rows of a slice of the images (each read and written once) and the text samples whose
image is in that slice (tokenised, anchored, naming their image by row).

A text sample needs only its image's tags to find its anchors, so the features of an image
are decoded once for all of its texts (5 COCO captions, ~50 VG phrases), not once a text.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from streaming import MDSWriter

from cmal.data.anchors import ConceptVocab, find_anchors, region_concepts, tokenize
from cmal.data.convert import Record
from cmal.data.coverage import Coverage
from cmal.data.errors import DataError
from cmal.data.features import FeatureSource, Regions
from cmal.data.schema import IMAGE_COLUMNS, IMAGES, columns

TEXT_SHARD_BYTES = 1 << 24
"""Text shards: 16 MB (~60k texts), so a shard set's texts are few files."""
IMAGE_SHARD_BYTES = 1 << 26
"""Image shards: 64 MB (~440 images at 36 x 2048 fp16), the size streaming recommends."""
PART_FILE = "part.json"


@dataclass
class Converted:
    """What a conversion wrote."""

    out: str
    """The shard folder."""
    samples: int
    """Text samples written."""
    skipped: int = 0
    """Samples skipped as bad (with ``on_bad_sample=skip``)."""
    anchors: int = 0
    """Anchor pairs over all samples."""
    coverage: Coverage | None = None
    """Anchor coverage of what was written (also in ``<out>/anchor_stats.json``)."""
    images: int = 0
    """Rows of the image store."""
    bad_images: int = 0
    """Images whose regions could not be read (their texts skipped)."""
    feature_dim: int | None = None
    """Size of a region feature vector (None: no image was read)."""
    seconds: float = 0.0
    """Wall time of the conversion (reading, joining, writing, merging)."""


class SampleBuilder:
    """Tokenises, computes anchors and makes image rows and text samples from records."""

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

    def image(self, key: str) -> Image:
        """An image's regions, its store row and the concepts it offers to anchors."""
        return self._image(key, self.regions(key))

    def placeholder(self, key: str) -> Image:
        """The store row of an image that could not be read (no text names it): one empty
        region, as MDS stores no array of size 0."""
        dim = self.feature_dim or 1
        empty = Regions(np.zeros((1, dim), np.float16), np.zeros((1, 4), np.float32), [""],
                        np.zeros(1, np.float32))  # fmt: skip
        return self._image(key, empty)

    def _image(self, key: str, regions: Regions) -> Image:
        concepts = [self.vocab.concept_id(t) for t in regions.tags]
        row = {
            "key": key,
            "feats": regions.features,
            "boxes": regions.boxes,
            "concepts": np.asarray([-1 if c is None else c for c in concepts], np.int32),
            "tags": regions.tags,
            "confidences": regions.confidences,
        }
        return Image(row, region_concepts(regions.tags, list(regions.confidences), self.vocab))

    def text_samples(
        self, recs: list[Record], rows: list[tuple[int, int | None]], images: list[tuple]
    ) -> list[dict[str, Any]]:
        """The text samples of records whose images (NLVR2: and second images) are at
        ``rows`` and are ``images``; the texts are tokenised in one call."""
        out = []
        for rec, (row, row2), (image, image2), (ids, words, starts) in zip(
            recs, rows, images, tokenize([r.text for r in recs], self.tokenizer, self.max_text_len),
            strict=True,
        ):  # fmt: skip
            sample = {
                "id": rec.id,
                "image": rec.image,
                "image_row": row,
                "text": rec.text,
                "input_ids": np.asarray(ids, np.int32),
                "anchors": image.anchors(words, starts, self.vocab),
            }
            if rec.image2 is not None:
                sample.update(image2=rec.image2, image_row2=row2)
                sample["anchors2"] = image2.anchors(words, starts, self.vocab)
            sample.update(rec.extra)
            out.append(sample)
        return out


@dataclass
class Image:
    """One image as conversion holds it."""

    row: dict[str, Any]
    """Its row in the image store (:data:`~cmal.data.schema.IMAGE_COLUMNS`)."""
    best: dict[int, tuple[float, int]]
    """Concept id -> (confidence, region) of its most confident region of each concept."""

    def anchors(self, words: list[str], starts: list[int | None], vocab) -> list[list[int]]:
        """A text's anchors with this image, as ``[text position, region, concept]``."""
        pairs = find_anchors(words, starts, self.row["tags"], [], vocab, self.best)
        return [[p.text_pos, p.region, p.concept] for p in pairs]


@dataclass
class Plan:
    """Where every image and text goes: the image store's rows are the images in order
    of first mention (a record's image, then its second image), and the texts follow
    their (first) image, in record order. A slice of the images therefore owns a run of
    image rows and a run of texts, and the slices written one after another give exactly
    the shard set written in one go."""

    images: list[str]
    """Image keys, in image-store row order."""
    texts: list[list[int]]
    """For each image row, the records (indices) whose first image it is."""

    @classmethod
    def of(cls, records: list[Record]) -> Plan:
        row: dict[str, int] = {}
        texts: list[list[int]] = []
        for i, rec in enumerate(records):
            for key in (rec.image, rec.image2):
                if key is not None and key not in row:
                    row[key] = len(texts)
                    texts.append([])
            texts[row[rec.image]].append(i)
        return cls(list(row), texts)

    def row(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.images)}

    def spans(self, parts: int) -> list[range]:
        """``parts`` contiguous, disjoint slices of the image rows (as equal as can be)."""
        cuts = [len(self.images) * k // parts for k in range(parts + 1)]
        return [range(cuts[k], cuts[k + 1]) for k in range(parts)]


def write_part(
    records: list[Record],
    plan: Plan,
    builder: SampleBuilder,
    folder: Path,
    task: str,
    span: range,
    on_bad_sample: Literal["error", "skip"] = "error",
) -> Converted:
    """Write the image rows of ``span`` (under ``folder/images``) and their texts (under
    ``folder``), with a ``part.json`` of the counts; returns them."""
    done = Converted(str(folder), 0, coverage=Coverage(builder.vocab))
    rows = plan.row()
    cache: OrderedDict[str, Image | None] = OrderedDict()

    def image(key: str, rec: Record) -> Image | None:
        """An image (None: unreadable, with on_bad_sample=skip)."""
        if key not in cache:
            try:
                cache[key] = builder.image(key)
            except DataError as e:
                if on_bad_sample == "error":
                    raise DataError(f"sample {rec.id}: {e}") from None
                cache[key] = None
            while len(cache) > 64:  # NLVR2's second images; the rest are read once
                cache.popitem(last=False)
        return cache[key]

    text_writer = MDSWriter(out=str(folder), columns=columns(task), hashes=["sha1"],
                            size_limit=TEXT_SHARD_BYTES)  # fmt: skip
    image_writer = MDSWriter(out=str(folder / IMAGES), columns=IMAGE_COLUMNS, hashes=["sha1"],
                             size_limit=IMAGE_SHARD_BYTES)  # fmt: skip
    with text_writer, image_writer:
        for pos in span:
            key = plan.images[pos]
            mine = [records[i] for i in plan.texts[pos]]
            first = image(key, mine[0] if mine else Record(f"(second image) {key}", key, ""))
            done.bad_images += first is None
            image_writer.write((first or builder.placeholder(key)).row)
            done.images += 1
            good, pairs = [], []
            for rec in mine:
                second = None if rec.image2 is None else image(rec.image2, rec)
                if first is None or (rec.image2 is not None and second is None):
                    done.skipped += 1
                    continue
                good.append(rec)
                pairs.append((first, second))
            if not good:
                continue
            where = [(pos, None if r.image2 is None else rows[r.image2]) for r in good]
            for sample, (a, b) in zip(builder.text_samples(good, where, pairs), pairs, strict=True):
                text_writer.write(sample)
                done.samples += 1
                done.anchors += len(sample["anchors"])
                done.coverage.add(sample, a.row, None if b is None else b.row)
    done.feature_dim = builder.feature_dim
    counts = {k: getattr(done, k) for k in ("samples", "skipped", "anchors", "images",
                                             "bad_images", "feature_dim")}  # fmt: skip
    (folder / PART_FILE).write_text(json.dumps({**counts, "coverage": done.coverage.counts()}))
    return done


def read_part(folder: Path, vocab: ConceptVocab) -> Converted:
    """The counts a finished part wrote (its ``part.json``)."""
    data = json.loads((folder / PART_FILE).read_text())
    coverage = Coverage.from_counts(vocab, data.pop("coverage"))
    return Converted(str(folder), coverage=coverage, **data)
