"""Converters on small files written here in the exact public formats."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from cmal.data.anchors import ConceptVocab
from cmal.data.convert import coco, nlvr2, refcoco, snli_ve, vg, vqa
from cmal.data.convert.parts import write_shards
from cmal.data.convert.write import SampleBuilder
from cmal.data.errors import DataError
from cmal.data.features import FeatureSource, encode_b64, lxmert_line
from cmal.data.images import read_shard_set
from cmal.model.pretrained import load_tokenizer

CLASSES = ["dog", "frisbee", "tree", "person"]
F = 16


def _regions(n: int, seed: int):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 300, (n, 2))
    return rng.normal(size=(n, F)).astype(np.float32), np.c_[xy, xy + 50].astype(np.float32)


def write_npz(folder, keys, with_tags=True):
    folder.mkdir(parents=True, exist_ok=True)
    for k, key in enumerate(keys):
        feats, boxes = _regions(3, k)
        extra = (
            {"tags": np.array(["dog", "frisbee", "tree"]), "confidences": np.array([0.9, 0.8, 0.3])}
            if with_tags
            else {"objects_id": np.array([0, 1, 2]), "objects_conf": np.array([0.9, 0.8, 0.3])}
        )
        np.savez(
            folder / f"{key}.npz", features=feats, boxes=boxes, image_w=640, image_h=480, **extra
        )
    return folder


def write_lxmert(path, keys):
    lines = []
    for k, key in enumerate(keys):
        feats, boxes = _regions(3, k)
        lines.append(lxmert_line(key, 640, 480, boxes, [0, 1, 3], [0.9, 0.7, 0.6], feats))
    path.write_text("".join(lines))
    return path


def write_butd(path, keys):
    rows = []
    for k, key in enumerate(keys):
        feats, boxes = _regions(2, k)
        rows.append("\t".join([key, "640", "480", "2", encode_b64(boxes), encode_b64(feats)]))
    path.write_text("\n".join(rows) + "\n")
    return path


def write_vinvl(path, keys):
    rows = []
    for k, key in enumerate(keys):
        feats, boxes = _regions(2, k)
        objs = [
            {"rect": boxes[i].tolist(), "class": c, "conf": 0.8, "feature": encode_b64(feats[i])}
            for i, c in enumerate(["person", "dog"])
        ]
        rows.append(f"{key}\t" + json.dumps({"image_w": 640, "image_h": 480, "objects": objs}))
    path.write_text("\n".join(rows) + "\n")
    return path


def builder(features, classes=CLASSES):
    return SampleBuilder(FeatureSource(features, classes), ConceptVocab(CLASSES), load_tokenizer())


def read(out):
    return list(read_shard_set(out))


def test_coco_captions_with_npz_features(tmp_path):
    cap = tmp_path / "captions_train.json"
    cap.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "1.jpg", "width": 640, "height": 480}],
                "annotations": [
                    {"id": 10, "image_id": 1, "caption": "Two puppies chase a frisbee."},
                    {"id": 11, "image_id": 2, "caption": "A tree."},
                ],
            }
        )
    )
    feats = write_npz(tmp_path / "feats", ["1", "2"])
    done = write_shards(coco.records(cap), builder(feats), tmp_path / "out", "pretrain")
    assert done.samples == 2
    s0, s1 = read(tmp_path / "out")
    assert s0["id"] == "10" and s0["image"] == "1"
    tok = load_tokenizer()
    pieces = tok.convert_ids_to_tokens(s0["input_ids"].tolist())
    by_concept = {CLASSES[c]: (j, i) for j, i, c in s0["anchors"]}
    assert set(by_concept) == {"dog", "frisbee"}
    assert pieces[by_concept["dog"][0]] == tok.tokenize("puppies")[0]
    assert by_concept["frisbee"][1] == 1  # the frisbee region (order kept: confidences fall)
    assert s0["feats"].dtype == np.float16 and s0["feats"].shape == (3, F)
    assert np.all(s0["boxes"] <= 1) and s0["concepts"].tolist() == [0, 1, 2]
    assert s1["anchors"] == [[2, 2, 2]]


def test_vg_with_butd_tsv_has_no_tags(tmp_path):
    vgf = tmp_path / "region_descriptions.json"
    vgf.write_text(
        json.dumps(
            [
                {
                    "id": 7,
                    "regions": [
                        {
                            "region_id": 1,
                            "image_id": 7,
                            "phrase": "a dog on grass",
                            "x": 1,
                            "y": 2,
                            "width": 3,
                            "height": 4,
                        },
                        {
                            "region_id": 2,
                            "image_id": 7,
                            "phrase": "dog",
                            "x": 1,
                            "y": 2,
                            "width": 3,
                            "height": 4,
                        },
                    ],
                }
            ]
        )
    )
    done = write_shards(
        vg.records(vgf), builder(write_butd(tmp_path / "f.tsv", ["7"])), tmp_path / "o", "pretrain"
    )
    (s,) = read(tmp_path / "o")
    assert done.samples == 1 and s["anchors"] == [] and s["concepts"].tolist() == [-1, -1]


def test_vqa_with_lxmert_tsv(tmp_path):
    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(
        json.dumps(
            {"questions": [{"image_id": 3, "question": "Is the person happy?", "question_id": 30}]}
        )
    )
    answers = [
        {"answer": x, "answer_confidence": "yes", "answer_id": i}
        for i, x in enumerate(["yes"] * 9 + ["no"])
    ]
    a.write_text(
        json.dumps({"annotations": [{"question_id": 30, "image_id": 3, "answers": answers}]})
    )
    write_shards(
        vqa.records(q, a), builder(write_lxmert(tmp_path / "f.tsv", ["3"])), tmp_path / "o", "vqa"
    )
    (s,) = read(tmp_path / "o")
    assert s["question_id"] == 30 and s["answers"] == ["yes"] * 9 + ["no"]
    assert s["tags"] == ["dog", "frisbee", "person"] and [c for _, _, c in s["anchors"]] == [3]


def test_snli_ve_with_vinvl_tsv(tmp_path):
    f = tmp_path / "snli_ve_dev.jsonl"
    f.write_text(
        json.dumps(
            {
                "Flickr30K_ID": "55",
                "sentence2": "A man pets a dog.",
                "gold_label": "neutral",
                "pairID": "p1",
            }
        )
        + "\n"
    )
    write_shards(
        snli_ve.records(f), builder(write_vinvl(tmp_path / "v.tsv", ["55"])), tmp_path / "o", "ve"
    )
    (s,) = read(tmp_path / "o")
    assert s["label"] == 1 and sorted(CLASSES[c] for _, _, c in s["anchors"]) == ["dog", "person"]


def test_nlvr2_two_images(tmp_path):
    f = tmp_path / "dev.json"
    f.write_text(
        json.dumps({"identifier": "dev-1-2-0", "sentence": "One dog.", "label": "True"}) + "\n"
    )
    feats = write_npz(tmp_path / "n", ["dev-1-2-img0", "dev-1-2-img1"], with_tags=False)
    write_shards(nlvr2.records(f), builder(feats), tmp_path / "o", "nlvr2")
    (s,) = read(tmp_path / "o")
    assert (s["image"], s["image2"], s["label"]) == ("dev-1-2-img0", "dev-1-2-img1", 1)
    assert s["feats2"].shape == (3, F) and len(s["anchors2"]) == 1


def test_refcoco_refs_and_instances(tmp_path):
    refs = [
        {
            "ref_id": 0,
            "ann_id": 5,
            "image_id": 9,
            "split": "testA",
            "category_id": 1,
            "sentences": [
                {"sent_id": 100, "sent": "dog on left"},
                {"sent_id": 101, "sent": "brown dog"},
            ],
        },
        {
            "ref_id": 1,
            "ann_id": 6,
            "image_id": 9,
            "split": "train",
            "category_id": 1,
            "sentences": [{"sent_id": 102, "sent": "tree"}],
        },
    ]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "instances.json").write_text(
        json.dumps(
            {
                "images": [{"id": 9, "width": 640, "height": 480}],
                "annotations": [
                    {"id": 5, "image_id": 9, "bbox": [64, 48, 64, 96], "category_id": 1},
                    {"id": 6, "image_id": 9, "bbox": [0, 0, 10, 10], "category_id": 2},
                ],
            }
        )
    )
    recs = refcoco.records(tmp_path / "refs(unc).p", tmp_path / "instances.json", "testA")
    write_shards(recs, builder(write_npz(tmp_path / "n", ["9"])), tmp_path / "o", "rec")
    samples = read(tmp_path / "o")
    assert [s["id"] for s in samples] == ["100", "101"]
    assert np.allclose(samples[0]["target_box"], [0.1, 0.1, 0.2, 0.3])


# ----------------------------------------------------------------------------- bad input


def test_malformed_annotation_names_file_record_field(tmp_path):
    cap = tmp_path / "captions.json"
    cap.write_text(
        json.dumps(
            {"annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 1}]}
        )
    )
    with pytest.raises(
        DataError, match=r"captions\.json: annotations\[1\]: missing field 'caption'"
    ):
        list(coco.records(cap))
    f = tmp_path / "ve.jsonl"
    f.write_text(
        json.dumps({"Flickr30K_ID": "1", "sentence2": "x", "gold_label": "maybe", "pairID": "a"})
        + "\n"
    )
    with pytest.raises(DataError, match=r"ve\.jsonl: line 1: field 'gold_label' should be one of"):
        list(snli_ve.records(f))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        list(coco.records(tmp_path / "bad.json"))


def test_wrong_feature_shape_names_sample_or_is_skipped(tmp_path):
    feats = write_npz(tmp_path / "f", ["1"])
    np.savez(
        feats / "2.npz",
        features=np.zeros((3, F)),
        boxes=np.zeros((2, 4)),
        image_w=5,
        image_h=5,
        tags=np.array(["dog"] * 3),
        confidences=np.ones(3),
    )
    cap = tmp_path / "c.json"
    cap.write_text(
        json.dumps(
            {
                "annotations": [
                    {"id": 1, "image_id": 1, "caption": "a dog"},
                    {"id": 2, "image_id": 2, "caption": "a dog"},
                    {"id": 3, "image_id": 404, "caption": "a dog"},
                ]
            }
        )
    )
    with pytest.raises(DataError, match=r"sample 2: .*2\.npz: boxes: expected shape \(3, 4\)"):
        write_shards(coco.records(cap), builder(feats), tmp_path / "o1", "pretrain")
    done = write_shards(coco.records(cap), builder(feats), tmp_path / "o2", "pretrain", "skip")
    assert (done.samples, done.skipped) == (1, 2)
    with pytest.raises(DataError, match="not empty"):
        write_shards(coco.records(cap), builder(feats), tmp_path / "o2", "pretrain", "skip")


def test_attribute_tags_from_lxmert_attrs_id(tmp_path):
    feats, boxes = _regions(2, 0)
    line = lxmert_line("7", 640, 480, boxes, [0, 1], [0.9, 0.8], feats, [1, 0], [0.7, 0.6])
    (tmp_path / "a.tsv").write_text(line)
    src = FeatureSource(tmp_path / "a.tsv", ["dog", "frisbee"], ["black", "white"])
    assert src["7"].tags == ["white dog", "black frisbee"]
    assert FeatureSource(tmp_path / "a.tsv", ["dog", "frisbee"])["7"].tags == ["dog", "frisbee"]
    with pytest.raises(DataError, match=r"image 7\): attribute id 1 outside the attribute list"):
        FeatureSource(tmp_path / "a.tsv", ["dog", "frisbee"], ["black"])["7"]


def test_feature_file_errors(tmp_path):
    with pytest.raises(DataError, match="region features not found"):
        FeatureSource(tmp_path / "nope.tsv")
    (tmp_path / "x.tsv").write_text("a\tb\tc\td\n")
    with pytest.raises(DataError, match=r"x\.tsv: line 1 has 4 tab-separated fields"):
        FeatureSource(tmp_path / "x.tsv")
    with pytest.raises(DataError, match="pass the class list"):
        FeatureSource(write_lxmert(tmp_path / "l.tsv", ["1"]))
    src = FeatureSource(write_lxmert(tmp_path / "l.tsv", ["1"]), ["only-one"])
    with pytest.raises(DataError, match=r"image 1\): class id 1 outside the class list"):
        src["1"]
