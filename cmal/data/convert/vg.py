"""Visual Genome region descriptions (``region_descriptions.json``) -> pre-training records.

Read as the Visual Genome python driver reads it (``local.py``,
``GetAllRegionDescriptions``): a list of images, each ``{"id": image_id, "regions":
[{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}`` (some releases name
the image ``image_id``); every phrase becomes a text paired with the whole image's
detector regions.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, load_json
from cmal.data.errors import DataError


def records(regions: str | Path, min_words: int = 2) -> Iterator[Record]:
    """One record per region phrase of at least ``min_words`` words."""
    data = load_json(regions)
    if not isinstance(data, list):
        raise DataError(f"{regions}: expected a list of images")
    for k, image in enumerate(data):
        where = f"{regions}: [{k}]"
        name = "id" if not isinstance(image, dict) or "id" in image else "image_id"
        key = str(get(image, name, (int, str), where))
        for j, reg in enumerate(get(image, "regions", list, where)):
            rwhere = f"{where}.regions[{j}]"
            phrase = get(reg, "phrase", str, rwhere).strip()
            if len(phrase.split()) >= min_words:
                yield Record(str(get(reg, "region_id", (int, str), rwhere)), key, phrase)
