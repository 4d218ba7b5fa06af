"""Every shard set of a scene world, written by the same converters as the real data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, coco, karpathy, nlvr2, read_classes, refcoco, snli_ve, vqa
from cmal.data.convert.parts import write_shards
from cmal.data.convert.write import Converted, SampleBuilder
from cmal.data.features import FeatureSource
from cmal.data.vocab import make_vocab

FRACTIONS = (25, 50)
"""Percentages of the pre-training images kept in the subsets ``pretrain/train_<pct>``."""


def _image_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 62, key)


def _captions_of(captions: Path, images: list[str]) -> Iterator[Record]:
    """The caption records of ``images``. A function, not a generator expression in the
    loop: that one would read the loop's last subset when the shards are written (every
    subset was the 50% one until this was a function)."""
    keep = set(images)
    return (r for r in coco.records(captions) if r.image in keep)


def convert_world(
    world: str | Path,
    out: str | Path,
    tokenizer,
    max_text_len: int = 40,
    max_regions: int = 36,
    attribute_tags: bool = True,
) -> dict[str, Converted]:
    """Shards under ``out/<set>/<split>`` for pretrain, vqa, ve, nlvr2, rec_gt, rec_det,
    retrieval (Karpathy's train / val / test of ``coco/dataset_coco.json``, five captions
    per image; text samples as pre-training's), and ``pretrain/train_25`` / ``train_50``:
    the captions of the first 25% / 50% of the training images (nested subsets, for the
    less-data study of ``workflows/claim.yaml``).

    ``attribute_tags``: tag each region "<colour> <shape>" (48 anchor concepts), so an
    anchor binds a colour to a shape; False keeps the bare shape tags (6 concepts)."""
    w, out = Path(world), Path(out)
    classes = read_classes(w / "classes.txt")
    attributes = read_classes(w / "attributes.txt") if attribute_tags else None
    vocab = make_vocab(classes, attributes, synonyms=w / "synonyms.json")

    def builder(kind: str) -> SampleBuilder:
        return SampleBuilder(
            FeatureSource(w / "features" / f"{kind}.tsv", classes, attributes),
            vocab,
            tokenizer,
            max_text_len,
            max_regions,
        )

    det, gt = builder("det"), builder("gt")
    train_caps = w / "coco/captions_train.json"
    jobs = {
        "pretrain/train": ("pretrain", det, coco.records(train_caps)),
        "pretrain/val": ("pretrain", det, coco.records(w / "coco/captions_val.json")),
    }
    images = sorted({r.image for r in coco.records(train_caps)}, key=_image_order)
    for pct in FRACTIONS:
        first = images[: max(1, len(images) * pct // 100)]
        jobs[f"pretrain/train_{pct}"] = ("pretrain", det, _captions_of(train_caps, first))
    for s in ("train", "val", "test"):
        q = w / f"vqa/v2_OpenEnded_mscoco_{s}_questions.json"
        jobs[f"vqa/{s}"] = ("vqa", det, vqa.records(q, w / f"vqa/v2_mscoco_{s}_annotations.json"))
    for s in ("train", "dev", "test"):
        jobs[f"ve/{s}"] = ("ve", det, snli_ve.records(w / f"snli_ve/snli_ve_{s}.jsonl"))
    for s in ("train", "dev", "test1"):
        jobs[f"nlvr2/{s}"] = ("nlvr2", det, nlvr2.records(w / f"nlvr2/{s}.json"))
    for s in ("train", "val", "test"):
        jobs[f"retrieval/{s}"] = (
            "pretrain",
            det,
            karpathy.records(w / "coco/dataset_coco.json", (s,)),
        )
    for s in refcoco.UNC_SPLITS:
        refs, inst = w / "refcoco+/refs(unc).p", w / "refcoco+/instances.json"
        jobs[f"rec_gt/{s}"] = ("rec", gt, refcoco.records(refs, inst, s))
        jobs[f"rec_det/{s}"] = ("rec", det, refcoco.records(refs, inst, s))
    return {name: write_shards(recs, b, out / name, task) for name, (task, b, recs) in jobs.items()}
