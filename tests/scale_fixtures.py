"""Real-size data sets with synthetic features, in the public layouts: COCO-shaped (a
Karpathy json, 5 captions per image) and VG-shaped (region descriptions, ~50 phrases per
image), both with an LXMERT obj36 tsv (36 regions x 2048 float32, base64), as the
releases ship them. Shared by the data-scale tests and ``bench/data_scale.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ROOT / "tests/fixtures/butd/objects_vocab.txt"
WORDS = ["a", "the", "next to", "near", "on", "with", "behind", "and"]


def _classes() -> list[str]:
    return [line.split(",")[0] for line in CLASSES.read_text().splitlines() if line.strip()]


def write_features(path: Path, keys: list[str], regions: int, dim: int, seed: int) -> list[list]:
    """An LXMERT tsv of ``keys`` (random features and boxes, class ids from the 1,600-class
    list); returns each image's class names, for texts that name them."""
    from cmal.data.features import lxmert_line

    rng = np.random.default_rng(seed)
    names = _classes()
    tags = []
    with open(path, "w") as f:
        for key in keys:
            ids = rng.integers(0, 200, regions)  # the common classes, so texts can name them
            xy = rng.uniform(0, 400, (regions, 2)).astype(np.float32)
            boxes = np.concatenate([xy, xy + rng.uniform(20, 200, (regions, 2))], 1)
            feats = rng.standard_normal((regions, dim), dtype=np.float32)
            confs = rng.uniform(0.2, 1.0, regions).astype(np.float32)
            f.write(lxmert_line(key, 640, 480, boxes, ids, confs, feats))
            tags.append([names[i] for i in ids])
    return tags


def _text(rng, tags: list[str]) -> str:
    picked = rng.choice(len(tags), 3, replace=False)
    parts = [f"{rng.choice(WORDS)} {tags[i]}" for i in picked]
    return " ".join(parts).capitalize() + "."


def _texts(folder: Path, keys: list[str], per_image: int, regions: int, dim: int,
           seed: int) -> list[list[str]]:  # fmt: skip
    """Writes ``feats.tsv`` for ``keys``; returns ``per_image`` texts naming each image's tags."""
    folder.mkdir(parents=True, exist_ok=True)
    tags = write_features(folder / "feats.tsv", keys, regions, dim, seed)
    rng = np.random.default_rng(seed + 1)
    return [[_text(rng, tags[k]) for _ in range(per_image)] for k in range(len(keys))]


def write_coco(folder: Path, images: int, captions: int = 5, regions: int = 36,
               dim: int = 2048, seed: int = 0,
               split: str = "train") -> dict[str, Path]:  # fmt: skip
    """``dataset_coco.json`` (Karpathy) + ``feats.tsv``: ``captions`` per image, every image
    in ``split``."""
    keys = [str(100000 + k) for k in range(images)]
    out, texts_of = [], _texts(folder, keys, captions, regions, dim, seed)
    for k, (key, texts) in enumerate(zip(keys, texts_of, strict=True)):
        sentences = [{"raw": raw, "tokens": [], "sentid": k * captions + j}
                     for j, raw in enumerate(texts)]  # fmt: skip
        out.append({"split": split, "filename": f"COCO_train2014_{int(key):012}.jpg",
                    "filepath": "train2014", "cocoid": int(key), "imgid": k,
                    "sentids": [s["sentid"] for s in sentences],
                    "sentences": sentences})  # fmt: skip
    (folder / "dataset_coco.json").write_text(json.dumps({"images": out, "dataset": "coco"}))
    return {"captions": folder / "dataset_coco.json", "features": folder / "feats.tsv"}


def write_vg(folder: Path, images: int, phrases: int = 50, regions: int = 36,
             dim: int = 2048, seed: int = 0) -> dict[str, Path]:  # fmt: skip
    """``region_descriptions.json`` + ``feats.tsv``: ``phrases`` per image."""
    keys = [str(1 + k) for k in range(images)]
    out, texts_of = [], _texts(folder, keys, phrases, regions, dim, seed)
    for k, (key, texts) in enumerate(zip(keys, texts_of, strict=True)):
        regs = [{"region_id": k * phrases + j, "image_id": int(key), "phrase": phrase,
                 "x": 1, "y": 1, "width": 10, "height": 10}
                for j, phrase in enumerate(texts)]  # fmt: skip
        out.append({"id": int(key), "regions": regs})
    (folder / "region_descriptions.json").write_text(json.dumps(out))
    return {"regions": folder / "region_descriptions.json", "features": folder / "feats.tsv"}


def feature_bytes(images: int, regions: int = 36, dim: int = 2048) -> int:
    """One fp16 copy of every image's features: the floor a layout is measured against."""
    return images * regions * dim * 2


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
