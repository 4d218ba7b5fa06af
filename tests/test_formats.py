"""Every public format read as released: the fixtures under tests/fixtures are written
field for field as each release has them (its README names the reference loader each was
checked against), joined with region features in each tool's own layout and key form."""

from __future__ import annotations

import json
import pickle
import re
import struct

import numpy as np
import pytest
from conftest import ROOT
from typer.testing import CliRunner

from cmal.cli import app
from cmal.data.anchors import find_anchors, split_words
from cmal.data.convert import coco, karpathy, nlvr2, read_classes, refcoco, snli_ve, vg, vqa
from cmal.data.convert.parts import write_shards
from cmal.data.convert.write import SampleBuilder
from cmal.data.errors import DataError
from cmal.data.features import FeatureSource, encode_b64, key_forms, lxmert_line
from cmal.data.images import read_shard_set
from cmal.data.vocab import make_vocab
from cmal.model.pretrained import load_tokenizer

FIX = ROOT / "tests" / "fixtures"
VOCAB_FILE = FIX / "butd" / "objects_vocab.txt"
CLASSES = read_classes(VOCAB_FILE)
F = 16


# ------------------------------------------------------------------- features as released


def detector(texts: list[str], seed: int, extra: int = 2) -> list[str]:
    """Class names a detector could give an image described by ``texts``: the classes the
    texts name, plus ``extra`` it would also fire on (a stand-in for real detections)."""
    vocab = make_vocab(CLASSES, stoplist="none", synonyms="none")
    found: list[str] = []
    for text in texts:
        words = split_words(text)
        for p in find_anchors(words, list(range(len(words))), CLASSES, [1.0] * 1600, vocab):
            name = vocab.concepts[p.concept]
            cls = next(c for c in CLASSES if vocab.class_concept[c] == name)
            found.append(cls)
    rng = np.random.default_rng(seed)
    found += [CLASSES[int(i)] for i in rng.integers(0, len(CLASSES), extra)]
    return list(dict.fromkeys(found))[:12]


def regions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    return rng.normal(size=(n, F)).astype(np.float32), np.c_[xy, xy + 50].astype(np.float32)


def lxmert_tsv(path, images: dict[str, list[str]]) -> str:
    """LXMERT's 10-field tsv (airsplay/lxmert load_obj_tsv): img_id, img_h, img_w, then
    base64 objects_id (int64, 0-based into objects_vocab.txt), objects_conf, attrs_id,
    attrs_conf, num_boxes, boxes, features."""
    lines = []
    for k, (key, tags) in enumerate(images.items()):
        feats, boxes = regions(len(tags), k)
        ids = [CLASSES.index(t) for t in tags]
        lines.append(lxmert_line(key, 640, 480, boxes, ids, np.linspace(0.9, 0.3, len(ids)), feats))
    path.write_text("".join(lines))
    return str(path)


def butd_tsv(path, keys: list[str]) -> str:
    """bottom-up-attention's generate_tsv.py: image_id, image_w, image_h, num_boxes, boxes,
    features (no classes)."""
    rows = []
    for k, key in enumerate(keys):
        feats, boxes = regions(3, k)
        rows.append("\t".join([key, "640", "480", "3", encode_b64(boxes), encode_b64(feats)]))
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def vinvl_predictions(path, images: dict[str, list[str]]) -> str:
    """scene_graph_benchmark's predictions.tsv with TEST.OUTPUT_FEATURE, as its
    ``convert_predictions_to_tsv`` writes it: key, {"objects", "relations"} — no image size
    (that is in the data set's hw tsv, written here beside it as ``hw.tsv``)."""
    rows = []
    for k, (key, tags) in enumerate(images.items()):
        feats, boxes = regions(len(tags), k)
        objs = [
            {
                "rect": boxes[i].tolist(),
                "bbox_id": i,
                "class": c,
                "conf": 0.8,
                "feature": encode_b64(feats[i]),
            }
            for i, c in enumerate(tags)
        ]
        rows.append(f"{key}\t" + json.dumps({"objects": objs, "relations": None}))
    path.write_text("\n".join(rows) + "\n")
    hw = [f"{key}\t" + json.dumps([{"height": 480, "width": 640}]) for key in images]
    (path.parent / "hw.tsv").write_text("\n".join(hw) + "\n")
    return str(path)


def oscar_features(folder, split: str, images: dict[str, list[str]]) -> str:
    """Oscar's release: <split>.feature.tsv ({"num_boxes", "features"}) with
    <split>.label.tsv ([{"class", "conf", "rect"}]) and <split>.hw.tsv beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    feat, label, hw = [], [], []
    for k, (key, tags) in enumerate(images.items()):
        feats, boxes = regions(len(tags), k)
        feat.append(
            f"{key}\t" + json.dumps({"num_boxes": len(tags), "features": encode_b64(feats)})
        )
        objs = [{"class": c, "conf": 0.7, "rect": boxes[i].tolist()} for i, c in enumerate(tags)]
        label.append(f"{key}\t" + json.dumps(objs))
        hw.append(f"{key}\t" + json.dumps([{"height": 480, "width": 640}]))
    for name, rows in (("feature", feat), ("label", label), ("hw", hw)):
        (folder / f"{split}.{name}.tsv").write_text("\n".join(rows) + "\n")
    return str(folder / f"{split}.feature.tsv")


def npz_folder(folder, images: dict[str, list[str]]) -> str:
    """`cmal extract`'s layout: <file stem>.npz with features, boxes, size, tags."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (key, tags) in enumerate(images.items()):
        feats, boxes = regions(len(tags), k)
        np.savez(
            folder / f"{key}.npz",
            features=feats.astype(np.float16),
            boxes=boxes,
            image_w=640,
            image_h=480,
            tags=np.array(tags),
            confidences=np.linspace(0.9, 0.3, len(tags)),
        )
    return str(folder)


def py2_pickle(obj) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) writes it: str as byte strings."""
    out = bytearray(b"\x80\x02")

    def put(x):
        if isinstance(x, dict):
            out.extend(b"}(")
            for k, v in x.items():
                put(k), put(v)
            out.extend(b"u")
        elif isinstance(x, list):
            out.extend(b"](")
            for v in x:
                put(v)
            out.extend(b"e")
        elif isinstance(x, str):
            data = x.encode()
            out.extend(
                b"U" + bytes([len(data)]) + data
                if len(data) < 256
                else b"T" + struct.pack("<i", len(data)) + data
            )
        elif isinstance(x, int):
            out.extend(b"J" + struct.pack("<i", x))
        else:
            raise TypeError(type(x))

    put(obj)
    return bytes(out + b".")


def read(out) -> list[dict]:
    return list(read_shard_set(out))


def build(features, vocab=None, **kw) -> SampleBuilder:
    source = FeatureSource(features, kw.pop("classes", None), None, **kw)
    return SampleBuilder(source, vocab or make_vocab(CLASSES), load_tokenizer(), 40, 36)


def concept_names(sample, vocab, suffix="") -> list[str]:
    return [vocab.concepts[c] for _, _, c in sample[f"anchors{suffix}"]]


CAPTIONS = FIX / "coco" / "captions_val2017.json"


def captions_by_image() -> dict[int, list[str]]:
    texts: dict[int, list[str]] = {}
    for a in json.loads(CAPTIONS.read_text())["annotations"]:
        texts.setdefault(a["image_id"], []).append(a["caption"])
    return texts


def convert_real_captions(tmp_path, out):
    """`cmal data convert` of the real captions with LXMERT features of the 1600 classes,
    keyed as LXMERT keys COCO images."""
    images = {f"COCO_val2014_{i:012d}": detector(t, i) for i, t in captions_by_image().items()}
    feats = lxmert_tsv(tmp_path / "val2014_obj36.tsv", images)
    args = ["--captions", CAPTIONS, "--features", feats, "--classes", VOCAB_FILE, "--out", out]
    res = convert("coco-captions", *args)
    assert res.exit_code == 0, res.output
    return res


# ------------------------------------------------------------------------ one per format


def test_image_keys_resolve_across_the_releases_forms():
    assert key_forms("COCO_val2014_000000391895.jpg") == [
        "COCO_val2014_000000391895.jpg",
        "COCO_val2014_000000391895",
        "391895",
    ]
    assert key_forms("000000397133.jpg")[-1] == "397133"
    assert key_forms("3416050480.jpg") == ["3416050480.jpg", "3416050480"]
    assert key_forms("dev-850-0-img0.png") == ["dev-850-0-img0.png", "dev-850-0-img0"]


def test_coco_captions_release_with_extract_npz(tmp_path):
    path = CAPTIONS
    # `cmal extract` on val2017 names files by stem: 000000397133.npz
    images = {f"{i:012d}": detector(t, i) for i, t in captions_by_image().items()}
    vocab = make_vocab(CLASSES)
    done = write_shards(
        coco.records(path),
        build(npz_folder(tmp_path / "f", images), vocab),
        tmp_path / "o",
        "pretrain",
    )
    samples = read(tmp_path / "o")
    assert done.samples == len(samples) == 100
    first = samples[0]
    assert (first["id"], first["image"]) == ("221865", "205401")
    assert first["text"] == "A plane floating on top of a lake surrounded by mountains."
    assert set(concept_names(first, vocab)) >= {"airplane", "lake", "mountain"}
    assert done.coverage.summary()["share_with_anchor"] > 0.9


def karpathy_images(path) -> dict[str, list[str]]:
    """Detector tags per image of a Karpathy file, keyed by file stem."""
    imgs = json.loads(path.read_text())["images"]
    return {
        im["filename"].removesuffix(".jpg"): detector([s["raw"] for s in im["sentences"]], k)
        for k, im in enumerate(imgs)
    }


def test_karpathy_coco_with_lxmert_tsv_keyed_by_coco_file_stem(tmp_path):
    path = FIX / "karpathy" / "dataset_coco.json"
    images = karpathy_images(path)
    feats = lxmert_tsv(tmp_path / "coco_obj36.tsv", images)
    vocab = make_vocab(CLASSES)
    write_shards(
        karpathy.records(path), build(feats, vocab, classes=CLASSES), tmp_path / "o", "pretrain"
    )
    samples = read(tmp_path / "o")
    # Default splits: train + restval (as ALBEF and UNITER train).
    assert [(s["id"], s["image"]) for s in samples] == [
        ("787980", "57870"),
        ("789366", "57870"),
        ("787985", "522418"),
    ]
    assert "table" in concept_names(samples[0], vocab)
    test = list(karpathy.records(path, ("test",)))
    assert len(test) == 5 and test[0].text.startswith("A man with a red helmet")


def test_karpathy_flickr30k_with_oscar_feature_and_label_tsv(tmp_path):
    path = FIX / "karpathy" / "dataset_flickr30k.json"
    # VinVL keys Flickr30k images by number; the Karpathy file names them 1000092795.jpg.
    images = karpathy_images(path)
    feats = oscar_features(tmp_path / "vinvl", "train", images)
    vocab = make_vocab(CLASSES)
    builder = build(feats, vocab)
    assert builder.features.labels is not None and builder.features.tag_source() is None
    write_shards(karpathy.records(path), builder, tmp_path / "o", "pretrain")
    samples = read(tmp_path / "o")
    assert len(samples) == 5 and {s["image"] for s in samples} == {"1000092795.jpg"}
    assert "person" in concept_names(samples[2], vocab)  # "Two men in green shirts ..."
    assert np.all((samples[0]["boxes"] >= 0) & (samples[0]["boxes"] <= 1))


def test_snli_ve_release_with_vinvl_predictions(tmp_path):
    path = FIX / "snli_ve" / "snli_ve_dev.jsonl"
    texts = [json.loads(line)["sentence2"] for line in path.read_text().splitlines()]
    feats = vinvl_predictions(tmp_path / "predictions.tsv", {"4705552913": detector(texts, 0)})
    vocab = make_vocab(CLASSES)
    # The rows carry no image size: without the hw tsv, one line naming the image.
    with pytest.raises(DataError, match=r"predictions.tsv \(image 4705552913\): no image size"):
        write_shards(snli_ve.records(path), build(feats, vocab), tmp_path / "x", "ve")
    hw = tmp_path / "hw.tsv"
    write_shards(snli_ve.records(path), build(feats, vocab, hw=hw), tmp_path / "o", "ve")
    samples = read(tmp_path / "o")
    assert samples[0]["boxes"].max() <= 1.0 and samples[0]["boxes"].max() > 0.2  # / 640, 480
    assert [s["label"] for s in samples] == [1, 0, 2]
    # The command line, as a user types it; an hw tsv without the image names it.
    args = ["data", "convert", "snli-ve", "--jsonl", str(path), "--features", feats,
            "--classes", str(tmp_path / "classes.txt")]  # fmt: skip
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    got = CliRunner().invoke(app, [*args, "--hw", str(hw), "--out", str(tmp_path / "cli")])
    assert got.exit_code == 0, got.output
    assert [s["id"] for s in read(tmp_path / "cli")] == [s["id"] for s in samples]
    hw.write_text("123\t" + json.dumps([{"height": 1, "width": 1}]) + "\n")
    got = CliRunner().invoke(app, [*args, "--hw", str(hw), "--out", str(tmp_path / "cli2")])
    assert got.exit_code != 0 and "hw.tsv (image 4705552913): no row for this image" in got.output
    assert samples[0]["id"] == "4705552913.jpg#2r1n"
    assert {s["image"] for s in samples} == {"4705552913.jpg"}
    assert "package" in concept_names(samples[1], vocab)
    # Files remade with the repository's newer generator name the image Flickr30K_ID.
    remade = tmp_path / "remade.jsonl"
    rec = json.loads(path.read_text().splitlines()[0])
    rec["Flickr30K_ID"] = rec.pop("Flikr30kID").removesuffix(".jpg")
    remade.write_text(json.dumps(rec) + "\n")
    assert next(snli_ve.records(remade)).image == "4705552913"


def test_nlvr2_release_with_extract_npz_named_by_png_stem(tmp_path):
    path = FIX / "nlvr2" / "dev.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    images = {}
    for r in rows:
        stem = r["identifier"].rsplit("-", 1)[0]
        for side in (0, 1):
            images[f"{stem}-img{side}"] = detector([r["sentence"]], side)
    vocab = make_vocab(CLASSES)
    write_shards(
        nlvr2.records(path),
        build(npz_folder(tmp_path / "f", images), vocab),
        tmp_path / "o",
        "nlvr2",
    )
    samples = read(tmp_path / "o")
    assert [(s["image"], s["image2"], s["label"]) for s in samples] == [
        ("dev-850-0-img0", "dev-850-0-img1", 1),
        ("dev-850-1-img0", "dev-850-1-img1", 0),
    ]
    assert "dog" in concept_names(samples[0], vocab) and "dog" in concept_names(
        samples[0], vocab, "2"
    )


def test_vqa_release_with_lxmert_tsv(tmp_path):
    q = FIX / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = FIX / "vqa" / "v2_mscoco_val2014_annotations.json"
    images = {
        "COCO_val2014_000000262148": ["man", "skateboard", "people"],
        "COCO_val2014_000000393225": ["bowl", "table"],
    }
    vocab = make_vocab(CLASSES)
    write_shards(
        vqa.records(q, a),
        build(lxmert_tsv(tmp_path / "f.tsv", images), vocab, classes=CLASSES),
        tmp_path / "o",
        "vqa",
    )
    samples = read(tmp_path / "o")
    assert [s["question_id"] for s in samples] == [262148000, 262148001, 393225000]
    assert samples[0]["answers"][:8] == ["down"] * 8 and len(samples[0]["answers"]) == 10
    assert concept_names(samples[1], vocab) == ["person"]  # "the people in the background"
    assert concept_names(samples[2], vocab) == ["bowl"]


def test_vg_region_descriptions_with_lxmert_tsv(tmp_path):
    path = FIX / "vg" / "region_descriptions.json"
    feats = lxmert_tsv(tmp_path / "vg.tsv", {"1": ["clock", "street", "man", "shade"]})
    vocab = make_vocab(CLASSES)
    write_shards(vg.records(path), build(feats, vocab, classes=CLASSES), tmp_path / "o", "pretrain")
    samples = read(tmp_path / "o")
    # "man" alone is under min_words (2): skipped as VLP pipelines do.
    assert [s["id"] for s in samples] == ["1382", "1383"]
    assert concept_names(samples[1], vocab) == ["shade", "street"]


def test_refcoco_plus_python2_refs_pickle(tmp_path):
    refs = [
        {
            "sent_ids": [0, 1, 2],
            "file_name": "COCO_train2014_000000581857_16.jpg",
            "ann_id": 1719310,
            "ref_id": 0,
            "image_id": 581857,
            "split": "testA",
            "sentences": [
                {
                    "tokens": ["navy", "blue", "shirt"],
                    "raw": "navy blue shirt",
                    "sent_id": 0,
                    "sent": "navy blue shirt",
                },
                {
                    "tokens": ["woman", "back", "in", "blue"],
                    "raw": "woman back in blue",
                    "sent_id": 1,
                    "sent": "woman back in blue",
                },
                {
                    "tokens": ["caf\u00e9", "lady"],
                    "raw": "caf\u00e9 lady",
                    "sent_id": 2,
                    "sent": "caf\u00e9 lady",
                },
            ],
            "category_id": 1,
        },
        {
            "sent_ids": [3],
            "file_name": "COCO_train2014_000000581857_17.jpg",
            "ann_id": 1719311,
            "ref_id": 1,
            "image_id": 581857,
            "split": "train",
            "sentences": [{"tokens": ["left"], "raw": "left", "sent_id": 3, "sent": "left"}],
            "category_id": 1,
        },
    ]
    pickled = tmp_path / "refs(unc).p"
    pickled.write_bytes(py2_pickle(refs))
    inst = FIX / "refcoco+" / "instances.json"
    feats = npz_folder(tmp_path / "f", {"COCO_train2014_000000581857": ["woman", "shirt"]})
    vocab = make_vocab(CLASSES)
    write_shards(
        refcoco.records(pickled, inst, "testA"), build(feats, vocab), tmp_path / "o", "rec"
    )
    samples = read(tmp_path / "o")
    assert [s["text"] for s in samples] == ["navy blue shirt", "woman back in blue", "café lady"]
    x, y, w, h = 103.93, 205.7, 183.16, 296.17
    assert np.allclose(samples[0]["target_box"], [x / 427, y / 640, (x + w) / 427, (y + h) / 640])
    assert concept_names(samples[1], vocab) == ["person"] and samples[0]["ref_id"] == 0


class _Runs:
    """Unpickles to a call of ``os.system``: what a hostile refs file would hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


@pytest.mark.parametrize("reader", ["convert", "score"])
def test_a_refs_pickle_that_names_a_callable_runs_nothing(tmp_path, reader):
    marker = tmp_path / "ran"
    refs = tmp_path / "refs(unc).p"
    refs.write_bytes(pickle.dumps([{"ref_id": _Runs(f"touch {marker}")}], protocol=2))
    inst = FIX / "refcoco+" / "instances.json"
    if reader == "convert":
        feats = npz_folder(tmp_path / "f", {"COCO_train2014_000000581857": ["woman"]})
        args = ["data", "convert", "refcoco", "--refs", refs, "--instances", inst,
                "--split", "testA", "--features", feats, "--out", tmp_path / "o"]  # fmt: skip
    else:
        (tmp_path / "p.json").write_text("[]")
        args = ["evaluate", "--task", "rec", "--predictions", tmp_path / "p.json",
                "--refs", refs, "--instances", inst, "--split", "testA"]  # fmt: skip
    res = CliRunner().invoke(app, list(map(str, args)))
    assert res.exit_code == 2 and not marker.exists(), res.output
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in res.output, res.output
    assert "refs(unc).p: not a readable refs pickle" in err and "posix.system" in err, err


def test_refs_pickles_of_plain_data_load_from_python_2_and_3(tmp_path):
    refs = [{"ref_id": 1, "split": "val", "sentences": [{"sent": "caf\u00e9"}],
             "raw": b"bytes", "tags": {"a", "b"}}]  # fmt: skip
    for protocol in (0, 2, 4):
        (tmp_path / "r.p").write_bytes(pickle.dumps(refs, protocol=protocol))
        got = refcoco.load_refs(tmp_path / "r.p")
        assert got[0]["sentences"][0]["sent"] == "caf\u00e9" and got[0]["raw"] == "bytes"
    (tmp_path / "r.p").write_bytes(py2_pickle([{"sent": "caf\u00e9"}]))
    assert refcoco.load_refs(tmp_path / "r.p") == [{"sent": "caf\u00e9"}]


# -------------------------------------------------- the command, its report and its errors


def convert(*args: str):
    return CliRunner().invoke(app, ["data", "convert", *map(str, args)])


def test_convert_reports_coverage_and_writes_vocabulary_beside_shards(tmp_path):
    res = convert_real_captions(tmp_path, tmp_path / "o")
    stats = json.loads((tmp_path / "o" / "anchor_stats.json").read_text())
    vocab = json.loads((tmp_path / "o" / "concepts.json").read_text())
    assert stats["samples"] == 100 and stats["concepts"] == len(vocab["concepts"]) == 1431
    assert vocab["classes"]["woman"] == vocab["classes"]["man"] == "person"
    assert vocab["classes"]["bad sentence"] is None and "white" in stats["stop_listed"]
    share = 100 * stats["share_with_anchor"]
    assert f"{share:.1f}% with >= 1 anchor" in res.output
    assert "most frequent: person" in res.output and "never matched:" in res.output
    assert stats["top_concepts"][0][0] == "person"


def test_features_without_classes_are_announced(tmp_path):
    q = FIX / "vqa" / "v2_OpenEnded_mscoco_val2014_questions.json"
    a = FIX / "vqa" / "v2_mscoco_val2014_annotations.json"
    feats = butd_tsv(tmp_path / "trainval_36.tsv", ["262148", "393225"])
    args = ["--questions", q, "--annotations", a, "--features", feats, "--classes", VOCAB_FILE]
    res = convert("vqa", *args, "--out", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "stores no object classes" in res.stderr and "objects_id" in res.stderr
    assert "no sample in" in res.stderr and "0.0% with >= 1 anchor" in res.stdout


@pytest.mark.parametrize(
    "case, expect",
    [
        ("snli_no_image", r"snli_ve_dev.jsonl: line 1: missing field 'Flikr30kID'"),
        ("karpathy_no_raw", r"dataset_coco.json: images\[0\].sentences\[0\]: missing field 'raw'"),
        ("refs_not_pickle", r"refs\(unc\).p: not a readable refs pickle"),
        ("label_count", r"train.label.tsv \(image 7\): 1 objects, but .* has 2 boxes"),
        ("lxmert_num_boxes", r"f.tsv \(image 7\): num_boxes should be an integer, got 'x'"),
        ("no_features", r"no region features for image '404' \(tried 404; the file's keys"),
        ("bad_synonyms", r"syn.json: entry 'man' should map to a string or null"),
    ],
)
def test_bad_input_is_one_line_naming_file_record_field(tmp_path, case, expect):
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"annotations": [{"id": 1, "image_id": 7, "caption": "a dog"}]}))
    feats = npz_folder(tmp_path / "f", {"7": ["dog"]})
    args = ["coco-captions", "--captions", caps, "--features", feats]
    if case == "snli_no_image":
        rec = json.loads((FIX / "snli_ve" / "snli_ve_dev.jsonl").read_text().splitlines()[0])
        del rec["Flikr30kID"]
        (tmp_path / "snli_ve_dev.jsonl").write_text(json.dumps(rec) + "\n")
        args = ["snli-ve", "--jsonl", tmp_path / "snli_ve_dev.jsonl", "--features", feats]
    elif case == "karpathy_no_raw":
        data = json.loads((FIX / "karpathy" / "dataset_coco.json").read_text())
        del data["images"][0]["sentences"][0]["raw"]
        (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
        args = [
            "karpathy",
            "--captions",
            tmp_path / "dataset_coco.json",
            "--splits",
            "test",
            "--features",
            feats,
        ]
    elif case == "refs_not_pickle":
        (tmp_path / "refs(unc).p").write_bytes(b"not a pickle")
        args = [
            "refcoco",
            "--refs",
            tmp_path / "refs(unc).p",
            "--instances",
            FIX / "refcoco+" / "instances.json",
            "--split",
            "testA",
            "--features",
            feats,
        ]
    elif case == "label_count":
        path = oscar_features(tmp_path / "v", "train", {"7": ["dog", "cat"]})
        label = tmp_path / "v" / "train.label.tsv"
        label.write_text("7\t" + json.dumps([{"class": "dog", "conf": 0.9, "rect": [0, 0, 1, 1]}]))
        args[-1] = path
    elif case == "lxmert_num_boxes":
        line = lxmert_line("7", 640, 480, np.zeros((1, 4)), [3], [0.9], np.zeros((1, F)))
        fields = line.split("\t")
        fields[7] = "x"
        (tmp_path / "f.tsv").write_text("\t".join(fields))
        args = [*args[:-1], tmp_path / "f.tsv", "--classes", VOCAB_FILE]
    elif case == "no_features":
        caps.write_text(json.dumps({"annotations": [{"id": 1, "image_id": 404, "caption": "x"}]}))
    elif case == "bad_synonyms":
        (tmp_path / "syn.json").write_text(json.dumps({"man": 3}))
        args += ["--synonyms", tmp_path / "syn.json"]
    res = convert(*args, "--out", tmp_path / "o")
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.count("\n") == 0 and "Traceback" not in res.output, res.output
    assert err.startswith("error: ")
    assert re.search(expect, err), err


def test_unknown_key_error_comes_from_the_source(tmp_path):
    with pytest.raises(DataError, match=r"tried COCO_val2014_000000000001\.jpg, "):
        FeatureSource(npz_folder(tmp_path / "f", {"42": ["dog"]}))["COCO_val2014_000000000001.jpg"]


# ------------------------------------------- the 1600-class list, end to end to pre-training


def test_visual_genome_1600_classes_convert_and_pretrain_with_amc(tmp_path):
    """bottom-up-attention's class list as released, through conversion of real COCO
    captions, into a short pre-training whose AMC head takes its size from the shards."""
    import yaml
    from test_engine import finish, launch

    convert_real_captions(tmp_path, tmp_path / "shards")
    share = json.loads((tmp_path / "shards" / "anchor_stats.json").read_text())["share_with_anchor"]
    cfg = {
        "base": str(ROOT / "configs/model/tiny.yaml"),
        "name": "vg1600",
        "model": {"visual": {"feature_dim": F}, "max_text_len": 40, "max_regions": 12},
        "data": {
            "remote": str(tmp_path / "shards"),
            "batch_size": 8,
            "workers": 1,
            "local": str(tmp_path / "cache"),
        },  # fmt: skip
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "engine": {"steps": 6, "log_every": 1},
        "checkpoint": {"root": str(tmp_path / "runs"), "every": 1000},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    procs = launch(str(tmp_path / "c.yaml"), 1)
    assert finish(procs) == [0]
    run = tmp_path / "runs" / "vg1600"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["num_concepts"] == 1431  # from concepts.json: 1600 classes merged
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    start = next(r for r in rows if r.get("event") == "start")
    assert start["data"]["share_with_anchor"] == share and share > 0.9
    amc = [r["amc"] for r in rows if "amc" in r]
    assert len(amc) == 6 and all(np.isfinite(amc)) and amc[0] > 0
    # A head smaller than the shards' vocabulary is refused, saying what it must be.
    cfg["model"]["num_concepts"] = 100
    cfg["name"] = "small-head"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    procs = launch(str(tmp_path / "c.yaml"), 1)
    out, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 2
    assert "set model.num_concepts=1431" in err and err.strip().count("\n") == 0


def test_text_coverage_of_real_captions_against_the_1600_classes():
    """The numbers the README reports (cmal data coverage on the shipped real captions)."""
    caps = CAPTIONS

    def coverage(*extra: str) -> str:
        res = CliRunner().invoke(
            app, ["data", "coverage", "coco-captions", "--captions", str(caps),
                  "--classes", str(VOCAB_FILE), *extra],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        return res.stdout

    out = coverage()
    assert "100 samples" in out and "100.0% with >= 1 anchor; 3.05 anchors per sample" in out
    assert "1431 concepts from 1600 classes (88 stop-listed)" in out
    assert "most frequent: person 28, kitchen 12" in out
    bare = coverage("--stoplist", "none", "--synonyms", "none")
    assert "4.30 anchors per sample" in bare and "most frequent: and 26" in bare


def test_npz_without_tags_is_announced(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    feats, boxes = regions(2, 0)
    np.savez(folder / "7.npz", features=feats, boxes=boxes, image_w=640, image_h=480)
    assert "have no 'tags'" in FeatureSource(folder).tag_source()
    assert FeatureSource(npz_folder(tmp_path / "g", {"7": ["dog"]})).tag_source() is None
