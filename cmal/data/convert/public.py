"""A public data set's annotation files joined with its region features, written as
shards: the library behind ``cmal data convert``."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmal.data.convert import read_aliases, read_classes
from cmal.data.convert.parts import (
    check_out,
    finished,
    read_done,
    signature,
    write_shards,
    write_slice,
)
from cmal.data.convert.readers import annotation_records
from cmal.data.convert.write import Converted, SampleBuilder
from cmal.data.errors import DataError
from cmal.data.features import FeatureSource
from cmal.data.vocab import make_vocab
from cmal.model.pretrained import load_tokenizer


def convert_public(
    fmt: str,
    features: str,
    out: Path,
    files: dict[str, Any],
    *,
    classes: Path | None,
    attributes: Path | None,
    synonyms: str,
    stoplist: str,
    labels: Path | None,
    hw: Path | None,
    max_text_len: int,
    max_regions: int,
    on_bad_sample: str,
    warn: Callable[[str], None],
    workers: int = 1,
    part: tuple[int, int] | None = None,
) -> Converted | None:
    """Convert format ``fmt`` (its annotation ``files``, keyed as
    :func:`~cmal.data.convert.readers.annotation_records` takes them) joined with the region
    ``features`` into shards under ``out``, on ``workers`` processes; or (``part`` = (k, n),
    a SLURM array task) only the k-th of n slices of the images, merging them all when it
    finds the others done (None while some are not). ``warn`` hears what makes anchors
    unlikely."""
    start = time.perf_counter()
    if on_bad_sample not in ("error", "skip"):
        raise DataError(f"--on-bad-sample must be error or skip, got {on_bad_sample!r}")
    sig = signature(
        fmt, Path(features), sorted(files.items()), classes, attributes, synonyms, stoplist,
        labels, hw, max_text_len, max_regions, on_bad_sample,
    )  # fmt: skip
    if part is not None and finished(out, sig):
        return read_done(out)
    check_out(out)
    task, records = annotation_records(fmt, **files)
    names = read_classes(classes)
    attrs = read_classes(attributes)
    if attrs is not None and names is None:
        raise DataError("--attributes needs --classes (attribute tags name a class too)")
    source = FeatureSource(features, names, attrs, labels, hw)
    hint = source.tag_source()
    if hint:
        warn(f"{hint}; without classes no sample has an anchor")
    if names is None:
        found = sorted({t for k in source.keys() for t in source[k].tags} - {""})
        vocab = make_vocab(found, None, None, synonyms, stoplist)
    else:
        vocab = make_vocab(names, attrs, read_aliases(classes), synonyms, stoplist)
    if len(vocab) == 0:
        warn("the anchor vocabulary is empty: no sample can have an anchor")
    builder = SampleBuilder(source, vocab, load_tokenizer(), max_text_len, max_regions)
    if part is not None:
        k, n = part
        done = write_slice(records, builder, out, task, on_bad_sample, n, k, sig)  # type: ignore[arg-type]
    else:
        done = write_shards(records, builder, out, task, on_bad_sample, workers, sig)  # type: ignore[arg-type]
    if done is not None:  # from reading the annotations and indexing the features on
        done.seconds = time.perf_counter() - start
    return done
