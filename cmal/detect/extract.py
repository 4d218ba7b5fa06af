"""``cmal extract``: region features for a folder (or ``s3://`` prefix) of images.

Output: one ``<key>.npz`` per image in the out folder — ``features`` (R, F) float16,
``boxes`` (R, 4) pixels x1 y1 x2 y2, ``image_w``, ``image_h``, ``tags``, ``confidences``
— the npz feature format that ``cmal data convert --features OUT`` reads (and so ⊕ and
training). Each file is written under a temporary name and renamed, so a killed job never
leaves a half file; a rerun skips the images already done. Rank r of W takes every W-th
image of the sorted list, so nodes share nothing but the out folder. Each rank's counts
go to ``OUT/_extract/rank-<r>.json``.
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cmal.data.errors import DataError
from cmal.detect.base import DetectConfig, Detector, detect_config, select

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")


class BadImage(DataError):
    """An image that cannot be used; the message names it."""


@dataclass
class Summary:
    """What one rank did."""

    done: int = 0
    """Images extracted by this run."""
    already: int = 0
    """Images skipped because their file existed (resume)."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Bad images skipped (``on_bad_image=skip``): name -> why."""
    converted: int = 0
    """Grayscale, CMYK, palette or RGBA images converted to RGB."""
    regions: int = 0
    """Regions written."""
    images_per_s: float = 0.0


def image_key(name: str, how: str) -> str:
    """The key a feature file is saved under (what the annotation files call the image)."""
    stem = Path(name).stem
    if how == "stem":
        return stem
    if how == "coco-id":
        m = re.search(r"(\d+)$", stem)
        if not m:
            raise BadImage(f"{name}: --key coco-id needs a file name ending in digits")
        return str(int(m.group(1)))
    raise DataError(f"key: expected stem or coco-id, got {how!r}")


def sources(images: str, endpoint: str | None = None) -> list[tuple[str, Callable[[], bytes]]]:
    """(name, reader) for every image file, sorted by name."""
    if images.startswith("s3://"):
        from cmal.engine.store import Store

        store = Store(images, endpoint, field="--images")
        names = sorted(k for k in store.keys("") if k.lower().endswith(SUFFIXES))

        def reader(k: str) -> Callable[[], bytes]:
            return lambda: store.read_bytes(k) or b""

        return [(k, reader(k)) for k in names]
    root = Path(images)
    if not root.is_dir():
        raise DataError(f"--images: {root} is not a folder or an s3:// prefix")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    return [(str(p.relative_to(root)), p.read_bytes) for p in paths]


def open_rgb(name: str, data: bytes, convert: bool) -> tuple[Image.Image, bool]:
    """The decoded RGB image and whether it had to be converted (BadImage if unusable)."""
    if not data:
        raise BadImage(f"{name}: empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{name}: not a readable image ({e})") from None
    if im.mode == "RGB":
        return im, False
    if not convert:
        raise BadImage(f"{name}: {im.mode} image, not RGB (convert_modes is off)")
    return im.convert("RGB"), True


def _save(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def extract(
    detector: Detector,
    images: str,
    out: str | Path,
    cfg: DetectConfig,
    rank: int = 0,
    world: int = 1,
    endpoint: str | None = None,
    progress: bool = True,
) -> Summary:
    """Extract this rank's share of ``images`` into ``out``; returns its counts."""
    if cfg.on_bad_image not in ("error", "skip"):
        raise DataError(f"on_bad_image: expected error or skip, got {cfg.on_bad_image!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    every = sources(images, endpoint)
    keys: dict[str, str] = {}  # key -> image name
    for name, _ in every:  # all ranks' images: two ranks must not write one file
        key = image_key(name, cfg.key)
        if key in keys:
            raise DataError(f"--images: {keys[key]} and {name} both give the key {key!r}")
        keys[key] = name
    key_of = {name: key for key, name in keys.items()}
    todo = every[rank::world]
    summary = Summary()
    from tqdm import tqdm

    start = time.perf_counter()
    # images/s on the bar; to stderr so that stdout stays the summary.
    with tqdm(
        total=len(todo), unit="img", file=sys.stderr, mininterval=2, disable=not progress
    ) as bar:
        for name, read in todo:
            _one(detector, cfg, name, read, out / f"{key_of[name]}.npz", summary)
            bar.update(1)
    elapsed = time.perf_counter() - start
    summary.images_per_s = round(summary.done / elapsed, 2) if elapsed > 0 else 0.0
    report = out / "_extract"
    report.mkdir(exist_ok=True)
    info = {"detector": detector.name, "config": asdict(cfg), **asdict(summary)}
    (report / f"rank-{rank}.json").write_text(json.dumps(info, indent=1))
    return summary


def _one(detector, cfg: DetectConfig, name: str, read, target: Path, summary: Summary) -> None:
    """Extract one image into ``target`` (unless it exists), counting into ``summary``."""
    if target.exists():
        summary.already += 1
        return
    try:
        image, converted = open_rgb(name, read(), cfg.convert_modes)
    except BadImage as e:
        if cfg.on_bad_image == "error":
            raise
        summary.skipped[name] = str(e)
        return
    summary.converted += converted
    cand = detector(image)
    keep = select(cand, cfg)
    _save(
        target,
        features=cand.features[keep].numpy().astype(np.float16 if cfg.fp16 else np.float32),
        boxes=cand.boxes[keep].numpy().astype(np.float32),
        image_w=np.int64(image.width),
        image_h=np.int64(image.height),
        tags=np.array([cand.labels[i] for i in keep], dtype=str),
        confidences=cand.scores[keep].numpy().astype(np.float32),
    )
    summary.done += 1
    summary.regions += len(keep)


def load_detector(cfg: DetectConfig) -> Detector:
    """The detector ``cfg.detector`` names."""
    if cfg.detector == "centernet":
        from cmal.detect.centernet import CenterNet

        return CenterNet(cfg.weights, cfg.device)
    if cfg.detector == "frcnn":
        from cmal.detect.frcnn import FasterRCNN

        return FasterRCNN(cfg.weights, cfg.device, cfg.min_size)
    raise DataError(f"--detector: expected centernet or frcnn, got {cfg.detector!r}")


def run_extract(
    images: str, out: str, detector: str, settings: list[str]
) -> tuple[Summary, int, int]:
    """This process's share of the extraction (rank and world size from torch.distributed's
    variables, as ``cmal submit extract`` sets them); returns (summary, rank, world)."""
    cfg = detect_config(detector, settings)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return extract(load_detector(cfg), images, out, cfg, rank, world), rank, world
