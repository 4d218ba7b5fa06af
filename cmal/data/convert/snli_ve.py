"""SNLI-VE jsonl (``snli_ve_<split>.jsonl``) -> entailment records.

Read as the dataset's own parser reads the release (necla-ml/SNLI-VE,
``vet/tools/snli_ve_parser.py``): the image is ``Flikr30kID`` (sic; a Flickr30k file name,
``"3416050480.jpg"``), the hypothesis ``sentence2``, the label ``gold_label``; ``pairID``
(``"3416050480.jpg#4r1e"``) names the sample. Files regenerated with the repository's newer
``snli_ve_generator.py`` name the image ``Flickr30K_ID`` (no ``.jpg``): both are read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, read_jsonl
from cmal.data.errors import DataError
from cmal.data.schema import VE_LABELS

IMAGE_FIELDS = ("Flikr30kID", "Flickr30K_ID")
"""The image field of the release, then of the regenerated files."""


def records(jsonl: str | Path) -> Iterator[Record]:
    """One record per line."""
    for where, rec in read_jsonl(jsonl):
        label = get(rec, "gold_label", str, where)
        if label not in VE_LABELS:
            raise DataError(
                f"{where}: field 'gold_label' should be one of {VE_LABELS}, got {label!r}"
            )
        name = next((f for f in IMAGE_FIELDS if isinstance(rec, dict) and f in rec), None)
        if name is None:
            raise DataError(f"{where}: missing field 'Flikr30kID' (the image; or 'Flickr30K_ID')")
        image = str(get(rec, name, (str, int), where))
        pair = str(get(rec, "pairID", (str, int), where))
        yield Record(
            pair, image, get(rec, "sentence2", str, where), {"label": VE_LABELS.index(label)}
        )
