"""The scene world: deterministic, in the public formats, and learnable from features."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np

from cmal.data import language
from cmal.data.convert.world import convert_world
from cmal.data.scene import COLOURS, SHAPES, draw, ground_truth, region_features, sample_objects
from cmal.data.world import WorldConfig, generate
from cmal.model.pretrained import load_tokenizer


def _digest(root) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files_and_shards(tmp_path):
    tok = load_tokenizer()
    for name, seed, workers in (("a", 1, 1), ("b", 1, 2), ("c", 2, 1)):
        generate(tmp_path / name, WorldConfig(images=40, seed=seed, workers=workers))
        convert_world(tmp_path / name, tmp_path / name / "shards", tok)
    a, b, c = (_digest(tmp_path / n) for n in "abc")
    assert any(k.endswith(".mds") for k in a)
    assert a == b  # same seed, different worker count
    assert a.keys() == c.keys() and a != c


def test_world_files_are_in_the_public_formats(world):
    caps = json.loads((world / "coco/captions_train.json").read_text())
    assert {"images", "annotations"} <= caps.keys()
    assert {"id", "image_id", "caption"} <= caps["annotations"][0].keys()
    # Karpathy's file as ImageCaptioning.pytorch's scripts/prepro_labels.py reads it
    # (images[].split/filepath/filename/cocoid/sentences[].tokens): five sentences an image, the
    # first two those of the COCO captions files; the world's splits
    karpathy = json.loads((world / "coco/dataset_coco.json").read_text())["images"]
    assert {"split", "filepath", "filename", "cocoid", "imgid", "sentids", "sentences"} <= (
        karpathy[0].keys()
    )
    assert all(len(im["sentences"]) == 5 and im["sentids"] == [x["sentid"] for x in
               im["sentences"]] for im in karpathy)  # fmt: skip
    assert {"raw", "tokens", "sentid", "imgid"} <= karpathy[0]["sentences"][0].keys()
    first = {(a["image_id"], a["caption"]) for a in caps["annotations"]}
    assert first == {(im["cocoid"], x["raw"]) for im in karpathy if im["split"] == "train"
                     for x in im["sentences"][:2]}  # fmt: skip
    assert Counter(im["split"] for im in karpathy) == {"train": 128, "val": 16, "test": 16}
    ann = json.loads((world / "vqa/v2_mscoco_train_annotations.json").read_text())["annotations"]
    assert all(len(a["answers"]) == 10 for a in ann)
    disagree = sum(len({x["answer"] for x in a["answers"]}) > 1 for a in ann)
    assert disagree > len(ann) / 4  # the soft score matters
    ve = [json.loads(x) for x in (world / "snli_ve/snli_ve_train.jsonl").read_text().splitlines()]
    # Balanced per template family, so the hypothesis alone cannot tell the label: facts
    # ("There is/are ...") entailed or contradicted, neutral sentences neutral or not.
    facts = Counter(r["gold_label"] for r in ve if r["sentence2"].startswith("There "))
    others = Counter(r["gold_label"] for r in ve if not r["sentence2"].startswith("There "))
    assert facts == {"entailment": len(ve) / 4, "contradiction": len(ve) / 4}
    assert others == {"neutral": len(ve) / 4, "contradiction": len(ve) / 4}
    yes_no = Counter(a["multiple_choice_answer"] for a in ann if a["answer_type"] == "yes/no")
    assert yes_no.keys() == {"yes", "no"} and abs(yes_no["yes"] - yes_no["no"]) < 0.2 * sum(
        yes_no.values()
    )
    nl = [json.loads(x) for x in (world / "nlvr2/train.json").read_text().splitlines()]
    labels = Counter(r["label"] for r in nl)
    assert labels["True"] > 0.3 * len(nl) and labels["False"] > 0.3 * len(nl)
    # Several statements per image pair (NLVR2's split-set-pair-sentence identifiers), and
    # each family (its words with the colour and shape taken out) as often true as false.
    assert max(Counter((r["left_url"], r["right_url"]) for r in nl).values()) > 1
    assert len({r["identifier"] for r in nl}) == len(nl)
    vocab = {*COLOURS, *SHAPES, *map(language.plural, SHAPES), "a", "an", "left", "right"}
    family = Counter(
        (" ".join(w for w in r["sentence"].split() if w.strip(".") not in vocab), r["label"])
        for r in nl
    )
    for (words, label), n in family.items():
        assert family[(words, "True" if label == "False" else "False")] == n, words
    import pickle

    refs = pickle.loads((world / "refcoco+/refs(unc).p").read_bytes())
    assert {r["split"] for r in refs} == {"train", "val", "testA", "testB"}


def test_world_uses_the_releases_ids_and_fields(world):
    """The same fields and id forms as the fixtures of tests/test_formats.py (the real
    releases), so the demo runs the converters' real-data paths."""
    caps = json.loads((world / "coco/captions_train.json").read_text())
    image = caps["images"][0]
    assert {"info", "licenses"} <= caps.keys()
    assert image["file_name"] == f"COCO_train2014_{image['id']:012d}.jpg"
    keys = [line.split("\t", 1)[0] for line in (world / "features/det.tsv").open()]
    assert image["file_name"].removesuffix(".jpg") in keys  # LXMERT keys by file stem
    ve = json.loads((world / "snli_ve/snli_ve_dev.jsonl").read_text().splitlines()[0])
    assert ve["Flikr30kID"].endswith(".jpg") and ve["pairID"].startswith(ve["Flikr30kID"] + "#")
    assert {"captionID", "annotator_labels", "sentence1"} <= ve.keys()
    qs = json.loads((world / "vqa/v2_OpenEnded_mscoco_val_questions.json").read_text())
    assert qs["task_type"] == "Open-Ended" and qs["data_type"] == "mscoco"
    for name in ("pretrain/train", "ve/dev", "nlvr2/dev", "rec_det/testA"):
        stats = json.loads((world / "shards" / name / "anchor_stats.json").read_text())
        assert stats["samples"] > 0 and 0 < stats["share_with_anchor"] <= 1
        vocab = json.loads((world / "shards" / name / "concepts.json").read_text())
        assert len(vocab["concepts"]) == 48 and vocab["classes"]["red circle"] == "red circle"
    # The world's shape words come from its own synonyms.json, not from the shipped table.
    assert json.loads((world / "synonyms.json").read_text())["disc"] == "circle"


def test_less_data_subsets_are_nested_quarters_and_halves(world):
    from cmal.data.images import read_shard_set

    def images(name: str) -> set[str]:
        return {s["image"] for s in read_shard_set(world / f"shards/pretrain/{name}")}

    full, half, quarter = images("train"), images("train_50"), images("train_25")
    assert quarter < half < full
    assert len(half) == len(full) // 2 and len(quarter) == len(full) // 4


def test_captions_exercise_the_anchor_operator(world):
    from cmal.data.images import read_shard_set

    caps = json.loads((world / "coco/captions_train.json").read_text())["annotations"]
    words = " ".join(c["caption"].lower() for c in caps).split()
    assert any(
        w.rstrip(",.") in ("disc", "block", "cube", "wedge", "plus", "stripe") for w in words
    )
    assert any(w.rstrip(",.").endswith("es") or w.rstrip(",.").endswith("s") for w in words)
    ds = list(read_shard_set(world / "shards/pretrain/train"))
    with_anchor = sum(len(ds[i]["anchors"]) > 0 for i in range(len(ds)))
    assert with_anchor / len(ds) > 0.8
    # Attribute tags ("red circle"): an anchor is the colour word of a colour-shape phrase,
    # its concept that colour and shape, and its region tagged so (the caption is true of
    # the scene, so mismatches can only come from the detector's 5% wrong colours/tags).
    tok = load_tokenizer()
    concepts = [f"{c} {s}" for s in SHAPES for c in COLOURS]
    agree = total = 0
    for i in range(len(ds)):
        sample = ds[i]
        pieces = tok.convert_ids_to_tokens(sample["input_ids"].tolist())
        for pos, region, concept in sample["anchors"]:
            colour, shape = concepts[concept].split()
            assert pieces[pos] == colour
            agree += sample["tags"][region] == f"{colour} {shape}"
            total += 1
    assert agree == total  # a pair's region carries the pair's concept by construction


def test_features_carry_colour_and_shape():
    rng = np.random.default_rng(0)
    feats, shapes, colours = [], [], []
    for _ in range(500):
        objs = sample_objects(rng)
        f = region_features(draw(objs), ground_truth(objs).boxes, 128)
        for o, v in zip(objs, f, strict=True):
            feats.append(v)
            shapes.append(SHAPES.index(o.shape))
            colours.append(list(COLOURS).index(o.colour))
    x = np.stack(feats)
    half = len(x) // 2
    for labels, n in ((np.array(shapes), len(SHAPES)), (np.array(colours), len(COLOURS))):
        xb = np.c_[x, np.ones(len(x))]
        w = np.linalg.lstsq(xb[:half], np.eye(n)[labels[:half]], rcond=None)[0]
        acc = ((xb[half:] @ w).argmax(1) == labels[half:]).mean()
        assert acc > 0.85, acc  # a linear probe on held-out regions; chance is 1/6 and 1/8


def test_language_is_true_of_the_scene():
    rng = np.random.default_rng(1)
    for _ in range(100):
        objs = sample_objects(rng)
        q, a, kind = language.vqa(rng, objs)
        if kind == "number":
            s = q.split()[2][:-1]  # "How many circles are there?" -> circle(s)
            assert int(a) == sum(language.plural(o.shape) == q.split()[2] for o in objs), (q, a, s)
        if q.startswith("Is there"):
            c, s = q[:-1].split()[-2:]
            assert (a == "yes") == any((o.colour, o.shape) == (c, s) for o in objs)
