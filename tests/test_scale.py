"""Data at real feature size: an image's features are stored once however many texts it
has, conversion split over processes (or array tasks) gives the shard set one process
writes, and the loader still visits every text once an epoch and resumes bitwise."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ROOT
from scale_fixtures import feature_bytes, folder_bytes, write_coco, write_vg
from test_stream import cfg_for

from cmal.data.batches import make_loader
from cmal.data.convert.public import convert_public
from cmal.data.errors import DataError
from cmal.data.images import read_shard_set
from cmal.data.schema import IMAGES
from cmal.data.stream import open_dataset, release

CLASSES = ROOT / "tests/fixtures/butd/objects_vocab.txt"


def convert(fmt: str, files: dict, out, **kw):
    options = dict(classes=CLASSES, attributes=None, synonyms="default", stoplist="default",
                   labels=None, hw=None, max_text_len=40, max_regions=36, on_bad_sample="error",
                   warn=lambda _: None)  # fmt: skip
    features = str(files.pop("features"))
    return convert_public(fmt, features, out, files, **{**options, **kw})


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """12 COCO-shaped images (5 captions each) at 36 x 2048, converted once."""
    root = tmp_path_factory.mktemp("coco")
    files = write_coco(root / "src", 12)
    convert("karpathy", {**files, "splits": "train"}, root / "shards")
    return root


def same(a: list[dict], b: list[dict]) -> bool:
    def eq(x, y) -> bool:
        return np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y

    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True)
    )


def test_features_are_stored_once_per_image_at_36_x_2048(coco, tmp_path):
    # COCO-shaped: 5 captions an image; VG-shaped: 50 phrases an image.
    vg = write_vg(tmp_path / "vg", 3)
    convert("vg", {**vg}, tmp_path / "vg-shards")
    for shards, images, texts in ((coco / "shards", 12, 60), (tmp_path / "vg-shards", 3, 150)):
        floor = feature_bytes(images)
        store = folder_bytes(shards / IMAGES)
        text = folder_bytes(shards) - store
        assert store <= 1.15 * floor, (shards, store / floor)
        # A text sample is its tokens and anchors: no features (one copy would be 147 KB).
        assert text / texts < 2_000, text / texts
        assert len(list(read_shard_set(shards))) == texts


def test_parallel_conversion_writes_what_one_process_writes(coco, tmp_path):
    one = list(read_shard_set(coco / "shards"))
    src = coco / "src"
    files = {"captions": src / "dataset_coco.json", "features": src / "feats.tsv",
             "splits": "train"}  # fmt: skip
    done = convert("karpathy", dict(files), tmp_path / "three", workers=3)
    assert done.samples == 60 and done.images == 12
    assert same(list(read_shard_set(tmp_path / "three")), one)
    for name in ("anchor_stats.json", "concepts.json"):
        assert (tmp_path / "three" / name).read_text() == (coco / "shards" / name).read_text()
    # Array tasks: part 1 first (no merge yet), part 0 merges; nothing of the parts is left.
    out = tmp_path / "array"
    assert convert("karpathy", dict(files), out, part=(1, 2)) is None
    parts = list(tmp_path.glob(".array.parts-*"))
    assert len(parts) == 1 and not out.exists()
    # A rerun of a done part redoes nothing (a requeued task whose part was written).
    stamp = (parts[0] / "p00001" / "part.json").stat().st_mtime_ns
    assert convert("karpathy", dict(files), out, part=(1, 2)) is None
    assert (parts[0] / "p00001" / "part.json").stat().st_mtime_ns == stamp
    merged = convert("karpathy", dict(files), out, part=(0, 2))
    assert merged is not None and merged.samples == 60
    assert same(list(read_shard_set(out)), one) and not parts[0].exists()
    # A task requeued after the merge finds the conversion done.
    assert convert("karpathy", dict(files), out, part=(1, 2)).samples == 60


def test_nlvr2_pairs_keep_both_images_across_parts(world, tmp_path):
    from cmal.data.convert import nlvr2, read_classes
    from cmal.data.convert.parts import write_shards
    from cmal.data.convert.write import SampleBuilder
    from cmal.data.features import FeatureSource
    from cmal.data.vocab import make_vocab
    from cmal.model.pretrained import load_tokenizer

    classes = read_classes(world / "classes.txt")
    source = FeatureSource(world / "features/det.tsv", classes)
    builder = SampleBuilder(source, make_vocab(classes), load_tokenizer())
    recs = list(nlvr2.records(world / "nlvr2/dev.json"))
    write_shards(recs, builder, tmp_path / "one", "nlvr2")
    write_shards(recs, builder, tmp_path / "four", "nlvr2", workers=4)
    one = list(read_shard_set(tmp_path / "one"))
    assert same(list(read_shard_set(tmp_path / "four")), one)
    assert sorted(s["id"] for s in one) == sorted(r.id for r in recs)
    for s in one:  # each image's rows are its own, the second image's too
        assert s["image_row"] != s["image_row2"] and s["feats2"].shape[1] == 128


def loader_epoch(cfg, state=None, stop_after=None):
    """(ids, sum of each batch's features) of an epoch, and the loader state where it stopped."""
    dataset = open_dataset(cfg, feature_dim=2048)
    loader = make_loader(cfg, dataset, 40, 36)
    if state is not None:
        loader.load_state_dict(state)
    ids, sums = [], []
    for k, item in enumerate(loader):
        ids += item["ids"]
        sums.append(item["batch"].region_feats.double().sum().item())
        if stop_after is not None and k + 1 == stop_after:
            break
    state = loader.state_dict()
    del loader
    release(dataset)
    return ids, sums, state


def test_every_text_once_an_epoch_and_resume_is_bitwise(coco, tmp_path):
    cfg = cfg_for(str(coco / "shards"), tmp_path / "c", "data.workers=2")
    ids, sums, _ = loader_epoch(cfg)
    assert sorted(ids) == sorted(s["id"] for s in read_shard_set(coco / "shards"))
    first, head, state = loader_epoch(cfg, stop_after=3)
    rest, tail, _ = loader_epoch(cfg, state=state)
    assert first + rest == ids and head + tail == sums


def test_a_conversion_reports_its_images(coco):
    done = json.loads((coco / "shards/conversion.json").read_text())
    assert done["images"] == 12 and done["samples"] == 60 and done["feature_dim"] == 2048


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_features_that_float16_cannot_hold_are_refused_when_written(tmp_path, bad):
    # The loader no longer checks every text's features: conversion checks each image once.
    files = write_coco(tmp_path / "src", 2, captions=1, dim=8)
    lines = files["features"].read_text().splitlines()
    key, h, w, ids, confs, attrs, aconfs, n, boxes, feats = lines[1].split("\t")
    from cmal.data.features import encode_b64

    values = np.zeros((int(n), 8), np.float32)
    values[3, 5] = bad
    lines[1] = "\t".join([key, h, w, ids, confs, attrs, aconfs, n, boxes, encode_b64(values)])
    files["features"].write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"feats.tsv \(image {key}\): features contain NaN"):
        convert("karpathy", {**files, "splits": "train"}, tmp_path / "o")
