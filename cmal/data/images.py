"""Reading a shard set's image store (``<set>/images/``, see :mod:`cmal.data.schema`): every
image's regions once, found by row.

Text samples are shuffled over the whole set, so rows are read in random order: each
store shard is copied into the node's cache on first use (sha1 checked, once per node
whatever the number of ranks and workers) and memory-mapped, so a row costs no system
call. A node thus caches the whole store once — the bytes of one copy per image (COCO +
Visual Genome at 36 x 2048 fp16: ~34 GB), where texts carrying their own copy needed 5x
(COCO) to 50x (VG) that.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cmal.data.errors import DataError
from cmal.data.mds import MappedShard, decode
from cmal.data.schema import IMAGES, OLD_LAYOUT_COLUMN, REGION_COLUMNS
from cmal.data.source import fetch, join, read_bytes


def text_index(remote: str) -> dict[str, Any]:
    """The text samples' index.json of a shard set, checked to be this layout: shards
    written when every text carried its image's features are one clear error."""
    raw = read_bytes(join(remote, "index.json"))
    if raw is None:
        raise DataError(
            f"cannot open shards at {remote}: no index.json there (not a shard folder?)"
        )
    index = json.loads(raw)
    names = {n for s in index.get("shards", []) for n in s.get("column_names", [])}
    if OLD_LAYOUT_COLUMN in names:
        raise DataError(
            f"shards at {remote} are of the old layout (features in every text sample); write "
            "them again with `cmal data convert` (`cmal data world` for the scene world)"
        )
    if names and "image_row" not in names:
        raise DataError(f"shards at {remote} are not cmal text shards (no 'image_row' column)")
    return index


class ImageStore:
    """The image rows of a shard set at ``remote``, cached under ``local``."""

    def __init__(
        self, remote: str, local: str | Path, validate_hash: bool = True, full: bool = False
    ):
        self.remote = join(remote, IMAGES)
        self.local = Path(local)
        self.validate_hash = validate_hash
        self.columns = None if full else {"key", *REGION_COLUMNS}
        """Columns decoded (None: all, ``tags`` too)."""
        raw = read_bytes(join(self.remote, "index.json"))
        if raw is None:
            raise DataError(
                f"cannot open the image store of {remote}: no {IMAGES}/index.json there "
                "(shards of an old layout? write them again with `cmal data convert`)"
            )
        self.shards = json.loads(raw)["shards"]
        for s in self.shards:
            if s.get("format") != "mds" or s.get("compression"):
                raise DataError(f"{self.remote}: expected uncompressed MDS shards")
        self.starts = np.cumsum([0] + [s["samples"] for s in self.shards]).tolist()
        self._maps: dict[int, MappedShard] = {}

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # maps are per process

    def _shard(self, k: int) -> MappedShard:
        if k not in self._maps:
            raw = self.shards[k]["raw_data"]
            path = self.local / raw["basename"]
            sha1 = raw.get("hashes", {}).get("sha1") if self.validate_hash else None
            fetch(join(self.remote, raw["basename"]), path, sha1)
            self._maps[k] = MappedShard(path, self.shards[k]["samples"])
        return self._maps[k]

    def __getitem__(self, row: int) -> dict[str, Any]:
        """A row's columns; ``feats_at``: where its features are, for :meth:`features`."""
        if not 0 <= row < len(self):
            raise DataError(f"image row {row} outside the image store ({len(self)} images)")
        k = bisect.bisect_right(self.starts, row) - 1
        shard, mapped = self.shards[k], self._shard(k)
        out = decode(shard["column_names"], shard["column_encodings"], shard["column_sizes"],
                     mapped[row - self.starts[k]], self.columns)  # fmt: skip
        if "feats" in out:
            out["feats_at"] = (k, out["feats"].ctypes.data - mapped.base)
        return out

    def features(self, at: tuple[int, int], regions: int, dim: int) -> np.ndarray:
        """The first ``regions`` (x ``dim``) float16 features of the row whose ``feats_at``
        is ``at`` (found by another process: a loader worker): a view of the mapped shard."""
        k, offset = at
        return np.frombuffer(self._shard(k).data, np.float16, regions * dim, offset).reshape(
            regions, dim
        )


def attach(sample: dict[str, Any], images: ImageStore) -> dict[str, Any]:
    """A text sample with its image's (and NLVR2's second image's) region columns."""
    for suffix in ("", "2") if "image_row2" in sample else ("",):
        image = images[sample[f"image_row{suffix}"]]
        if image["key"] != sample[f"image{suffix}"]:
            raise DataError(
                f"image row {sample[f'image_row{suffix}']} holds image {image['key']!r}, not "
                f"{sample[f'image{suffix}']!r}: the image store does not belong to these shards"
            )
        for name in (*REGION_COLUMNS, "feats_at", "tags", "confidences"):
            if name in image:  # tags and confidences: only when the store reads them all
                sample[name + suffix] = image[name]
    return sample


def read_shard_set(folder: str | Path) -> Iterator[dict[str, Any]]:
    """Every text sample of a local shard set in stored order, with its image's columns
    (``tags`` too): for tests and tools that read a whole set, without streaming."""
    from streaming.base.format import reader_from_json

    folder = str(folder)
    index = text_index(folder)
    images = ImageStore(folder, Path(folder) / IMAGES, validate_hash=False, full=True)
    for shard in index["shards"]:
        reader = reader_from_json(folder, None, shard)
        for i in range(reader.samples):
            sample = attach(reader.decode_sample(reader.get_sample_data(i)), images)
            yield {k: v for k, v in sample.items() if not k.startswith("feats_at")}
