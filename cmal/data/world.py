"""``cmal data world``: write the scene world in the public file formats of the real data
sets, so the same converters read it as they read COCO, VQA v2, SNLI-VE, NLVR2 and
RefCOCO+.

Layout under ``out``::

    images/<key>.jpg                      rendered images named as COCO 2014 names them
                                          (COCO_train2014_000000000042.jpg; the image id is
                                          42); NLVR2 pairs as <split>-<n>-0-img0/img1
    features/det.tsv                      simulated detector regions (noisy boxes and tags),
                                          LXMERT tsv format keyed by file stem as LXMERT's
                                          are, class ids into classes.txt
    features/gt.tsv                       ground-truth boxes as regions (REC gt setting)
    classes.txt, attributes.txt           the detector's class and attribute lists
    synonyms.json                         the world's shape words (disc, block, ...), merged
                                          over the shipped synonym table
    coco/captions_{train,val}.json        pre-training pairs (COCO captions format)
    coco/dataset_coco.json                Karpathy's splits (train / val / test, as the
                                          world's), five captions per image: its two of
                                          captions_*.json and three more (retrieval)
    vqa/v2_OpenEnded_mscoco_<s>_questions.json, vqa/v2_mscoco_<s>_annotations.json
    snli_ve/snli_ve_{train,dev,test}.jsonl
    nlvr2/{train,dev,test1}.json          one JSON object per line, as NLVR2 ships it
    refcoco+/refs(unc).p, refcoco+/instances.json
    world.json                            seed, counts and the noise settings

Every file has the fields of its release (checked against the datasets' own readers, see
``tests/test_formats.py``); ids take their real forms: SNLI-VE's ``Flikr30kID`` is a file
name (``"42.jpg"``), NLVR2's images ``dev-3-0-img0``, RefCOCO+'s refs a ``file_name``.

Every image is generated from ``numpy.random.default_rng([seed, index])``, so the world
is the same for a seed whatever the number of worker processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import pickle
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cmal.data import language
from cmal.data.errors import DataError
from cmal.data.features import lxmert_line
from cmal.data.scene import (
    ATTRIBUTES,
    IMAGE_SIZE,
    SHAPES,
    NoiseConfig,
    Obj,
    detect,
    draw,
    ground_truth,
    region_features,
    sample_objects,
)

SPLITS = {"train": 0.8, "val": 0.1, "test": 0.1}
VERSION = 6
"""Bumped whenever the same seed would give different files or shards (a workflow's
world stage is redone when it changes). 2: colour attributes per region; 300 NLVR2 pairs per
evaluation split at 2,000 images. 3: NLVR2 statements of three families per pair, as
many false as true per family (:func:`cmal.data.language.statements`). 4: the 25%
pre-training subset (``pretrain/train_25``) holds 25% of the images, not the 50% subset.
5: the releases' layouts (COCO file names and feature keys, SNLI-VE ``Flikr30kID``, VQA's
and RefCOCO+'s full records), ``synonyms.json``, and the shards' ``concepts.json`` /
``anchor_stats.json``. 6: ``coco/dataset_coco.json`` and the retrieval shards (every other
file as in version 5)."""
NLVR2_EVAL = 0.3
"""NLVR2 pairs in dev and in test1, each, per image of the world (0.1 per image before
version 2 gave 100 statements per split at 2,000 images: too few to tell models apart)."""
VQA_PER_IMAGE = 3
CAPTIONS_PER_IMAGE = 2
KARPATHY_CAPTIONS = 5
"""Captions per image in ``coco/dataset_coco.json``, as in Karpathy's COCO and Flickr30k
files (retrieval is scored with five per image)."""


@dataclass
class WorldConfig:
    """How big and how noisy the world is."""

    images: int = 2000
    """Number of scene images (NLVR2 renders its own pairs on top: 0.4 per image for
    training, 0.15 per image for each of dev and test1)."""
    seed: int = 0
    """Seed of the whole world."""
    feature_dim: int = 128
    """Size of a region feature vector."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Tag noise of the simulated detector."""
    workers: int = 2
    """Processes that render images in parallel."""


MIN_IMAGES = 40
"""Fewer images would leave some split of some task empty. Every size from 40 to 100 with
seeds 0-4 has all its splits (``python bench/world_sizes.py --sizes 40-100 --seeds 5``:
305 worlds, none too small); a world that still is says so when it is made."""


def _split_of(index: int, n: int) -> str:
    """Last tenth (at least 2 images) test, the tenth before val, the rest train."""
    held = max(2, round(n * SPLITS["test"]))
    return "train" if index < n - 2 * held else "val" if index < n - held else "test"


def _regions_line(key: str, image, det, feature_dim: int) -> str:
    feats = region_features(image, det.boxes, feature_dim)
    ids = [SHAPES.index(t) for t in det.tags]
    attrs = [ATTRIBUTES.index(a) for a in det.attributes]
    return lxmert_line(
        key, IMAGE_SIZE, IMAGE_SIZE, det.boxes, ids, det.confidences, feats, attrs, det.confidences
    )


def _render(job: tuple[str, int, Path, WorldConfig]) -> tuple[list[Obj], str, str]:
    """Draw one image and save it; return its objects and its two region-feature lines."""
    key, seed_index, out, cfg = job
    rng = np.random.default_rng([cfg.seed, seed_index])
    objs = sample_objects(rng)
    image = draw(objs)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=92)
    (out / "images" / f"{key}.jpg").write_bytes(buf.getvalue())
    # Features come from the rendered pixels (before JPEG), where background is exact.
    det = _regions_line(key, image, detect(rng, objs, cfg.noise), cfg.feature_dim)
    gt = _regions_line(key, image, ground_truth(objs), cfg.feature_dim)
    return objs, det, gt


def generate(out: str | Path, cfg: WorldConfig) -> dict:
    """Write the world under ``out``; returns counts and the images/s achieved."""
    out = Path(out)
    for sub in ("images", "features", "coco", "vqa", "snli_ve", "nlvr2", "refcoco+"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    if cfg.images < MIN_IMAGES:
        raise DataError(f"the scene world needs at least {MIN_IMAGES} images, got {cfg.images}")
    n = cfg.images
    train_pairs = round(n // 2 * SPLITS["train"])
    held = max(2, round(n * NLVR2_EVAL / 2))
    pairs = train_pairs + 2 * held
    jobs = [(coco_stem(i, n), i, out, cfg) for i in range(n)]
    nlvr_keys = []
    for p in range(pairs):
        split = "train" if p < train_pairs else "dev" if p < train_pairs + held else "test1"
        for side in (0, 1):
            key = f"{split}-{p}-0-img{side}"
            nlvr_keys.append(key)
            jobs.append((key, n + 2 * p + side, out, cfg))
    start = time.perf_counter()
    if cfg.workers > 1:
        with mp.get_context("fork").Pool(cfg.workers) as pool:
            rendered = pool.map(_render, jobs, chunksize=64)
    else:
        rendered = [_render(j) for j in jobs]
    scenes = [objs for objs, _, _ in rendered]
    for name, column in (("det", 1), ("gt", 2)):
        with open(out / "features" / f"{name}.tsv", "w") as f:
            f.writelines(r[column] for r in rendered)
    rate = len(jobs) / (time.perf_counter() - start)
    (out / "classes.txt").write_text("\n".join(SHAPES) + "\n")
    (out / "attributes.txt").write_text("\n".join(ATTRIBUTES) + "\n")
    words = {w: shape for shape, ws in language.SYNONYMS.items() for w in ws if w != shape}
    (out / "synonyms.json").write_text(json.dumps(words, indent=1, sort_keys=True) + "\n")

    text_rng = np.random.default_rng([cfg.seed, 1_000_000_007])
    counts = _write_captions_vqa_ve(out, scenes[:n], text_rng)
    counts.update(_write_nlvr2(out, nlvr_keys, scenes[n:], text_rng))
    counts.update(_write_refcoco(out, scenes[:n], text_rng))
    # A generator of its own: the files above stay as a version-5 world wrote them.
    counts.update(
        _write_karpathy(out, scenes[:n], np.random.default_rng([cfg.seed, 1_000_000_009]))
    )
    counts.update({"images": n, "nlvr2_images": 2 * pairs, "images_per_s": round(rate, 1)})
    # The rate stays out of world.json, so a seed gives byte-identical files.
    stable = {k: v for k, v in counts.items() if k != "images_per_s"}
    meta = {
        "version": VERSION,
        "seed": cfg.seed,
        "feature_dim": cfg.feature_dim,
        "noise": asdict(cfg.noise),
        "counts": stable,
    }
    (out / "world.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return counts


def coco_stem(i: int, n: int) -> str:
    """COCO 2014's file stem of image ``i`` (train2014 for the training split, val2014 for
    the held-out images, as VQA v2 and RefCOCO+ use COCO 2014)."""
    part = "train" if _split_of(i, n) == "train" else "val"
    return f"COCO_{part}2014_{i:012d}"


def _coco_image(i: int, n: int) -> dict:
    """An ``images`` entry with the fields of the COCO release."""
    stem = coco_stem(i, n)
    return {
        "license": 1 + i % 8,
        "file_name": f"{stem}.jpg",
        "coco_url": f"http://images.cocodataset.org/{stem.split('_')[1]}/{stem}.jpg",
        "height": IMAGE_SIZE,
        "width": IMAGE_SIZE,
        "date_captured": "2013-11-14 11:18:45",
        "flickr_url": "",
        "id": i,
    }


def _coco_header(kind: str, subtype: str) -> dict:
    """The top-level fields COCO and VQA files carry besides their records."""
    return {
        "info": {"description": f"scene world, {kind} in the COCO layout", "version": "1.0"},
        "licenses": [{"id": k, "name": "generated", "url": ""} for k in range(1, 9)],
        "data_subtype": subtype,
    }


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def _write_captions_vqa_ve(out: Path, scenes: list[list[Obj]], rng) -> dict:
    n = len(scenes)
    caps = {s: {"images": [], "annotations": []} for s in ("train", "val")}
    questions = {s: [] for s in SPLITS}
    annotations = {s: [] for s in SPLITS}
    ve = {s: [] for s in SPLITS}
    for i, objs in enumerate(scenes):
        split = _split_of(i, n)
        cap_split = "train" if split == "train" else "val"
        caps[cap_split]["images"].append(_coco_image(i, n))
        for c in range(CAPTIONS_PER_IMAGE):
            text = language.caption(rng, objs)
            caps[cap_split]["annotations"].append(
                {"id": i * 10 + c, "image_id": i, "caption": text}
            )
        for q in range(VQA_PER_IMAGE):
            qid = i * 10 + q
            question, answer, kind = language.vqa(rng, objs)
            questions[split].append({"image_id": i, "question": question, "question_id": qid})
            answers = language.human_answers(rng, answer, kind)
            annotations[split].append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "question_type": question.split()[0].lower(),
                    "answer_type": kind,
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                        for k, a in enumerate(answers)
                    ],
                }
            )
        premise = language.caption(rng, objs)
        for h, (hyp, label) in enumerate(language.hypotheses(rng, objs)):
            # The release's fields (necla-ml/SNLI-VE); the image field is spelt as there.
            ve[split].append(
                {
                    "Flikr30kID": f"{i}.jpg",
                    "annotator_labels": [label],
                    "captionID": f"{i}.jpg#0",
                    "gold_label": label,
                    "pairID": f"{i}.jpg#0r{h}{label[0]}",
                    "sentence1": premise,
                    "sentence2": hyp,
                }
            )
    for s, data in caps.items():
        _dump(out / "coco" / f"captions_{s}.json", {**_coco_header("captions", f"{s}2014"), **data})
    for s in SPLITS:
        head = {**_coco_header("VQA", f"{s}2014"), "data_type": "mscoco"}
        _dump(
            out / "vqa" / f"v2_OpenEnded_mscoco_{s}_questions.json",
            {**head, "task_type": "Open-Ended", "questions": questions[s]},
        )
        _dump(
            out / "vqa" / f"v2_mscoco_{s}_annotations.json", {**head, "annotations": annotations[s]}
        )
        ve_name = {"train": "train", "val": "dev", "test": "test"}[s]
        (out / "snli_ve" / f"snli_ve_{ve_name}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in ve[s])
        )
    return {
        "captions": sum(len(c["annotations"]) for c in caps.values()),
        "vqa_questions": sum(len(q) for q in questions.values()),
        "ve_pairs": sum(len(v) for v in ve.values()),
    }


def _write_karpathy(out: Path, scenes: list[list[Obj]], rng) -> dict:
    """``coco/dataset_coco.json`` in the layout of Karpathy's file (the fields
    ruotianluo/ImageCaptioning.pytorch's ``scripts/prepro_labels.py`` reads from it):
    every image with its world split and five sentences, the first two those of
    ``captions_<split>.json`` (same ids), the others new."""
    n = len(scenes)
    own: dict[int, list[dict]] = {}
    for s in ("train", "val"):
        for a in json.loads((out / "coco" / f"captions_{s}.json").read_text())["annotations"]:
            own.setdefault(a["image_id"], []).append({"raw": a["caption"], "sentid": a["id"]})
    images = []
    for i, objs in enumerate(scenes):
        sents = own[i] + [
            {"raw": language.caption(rng, objs), "sentid": i * 10 + k}
            for k in range(len(own[i]), KARPATHY_CAPTIONS)
        ]
        for sent in sents:  # the lower-cased words, as Karpathy's files carry them
            sent["tokens"] = sent["raw"].lower().rstrip(".").replace(",", "").split()
        stem = coco_stem(i, n)
        images.append({
            "filepath": stem.split("_")[1], "sentids": [x["sentid"] for x in sents],
            "filename": f"{stem}.jpg", "imgid": i, "split": _split_of(i, n),
            "sentences": [{**x, "imgid": i} for x in sents], "cocoid": i,
        })  # fmt: skip
    _dump(out / "coco" / "dataset_coco.json", {"images": images, "dataset": "coco"})
    return {"karpathy_captions": sum(len(im["sentences"]) for im in images)}


def _write_nlvr2(out: Path, keys: list[str], scenes: list[list[Obj]], rng) -> dict:
    # Every family's candidates first, then per split and family as many false statements
    # as true ones, chosen at random: a family's words then say nothing about the label.
    found: dict[tuple[str, str], dict[bool, list]] = {}
    for p in range(len(keys) // 2):
        split = keys[2 * p].split("-")[0]
        for family, text, truth in language.statements(rng, scenes[2 * p], scenes[2 * p + 1]):
            found.setdefault((split, family), {True: [], False: []})[truth].append((p, text))
    kept: dict[int, list[tuple[str, bool]]] = {}
    for by_truth in found.values():
        k = min(len(v) for v in by_truth.values())
        for truth, items in by_truth.items():
            for i in sorted(rng.choice(len(items), size=k, replace=False)):
                p, text = items[i]
                kept.setdefault(p, []).append((text, truth))
    rows: dict[str, list[str]] = {"train": [], "dev": [], "test1": []}
    for p in sorted(kept):
        split, n, _, _ = keys[2 * p].split("-")
        for k, (text, truth) in enumerate(kept[p]):
            record = {
                "identifier": f"{split}-{n}-0-{k}",  # NLVR2's split-set-pair-sentence
                "sentence": text,
                "label": "True" if truth else "False",
                "left_url": f"{keys[2 * p]}.jpg",
                "right_url": f"{keys[2 * p + 1]}.jpg",
            }
            rows[split].append(json.dumps(record))
    for split, lines in rows.items():
        (out / "nlvr2" / f"{split}.json").write_text("".join(line + "\n" for line in lines))
    _need_every_split("nlvr2", {split: len(lines) for split, lines in rows.items()})
    return {"nlvr2_statements": sum(len(v) for v in rows.values())}


def _test_sides(scenes: list[list[Obj]], group_a: set[str]) -> dict[int, str]:
    """testA or testB for every test image, UNC style: testA images are those mostly of
    group A (RefCOCO's "people"). When no image on a side has an object of its group that
    an expression can single out (a small world), the test image with the most such
    objects moves to it, so both splits exist at every size (a world whose sides both
    have one is unchanged)."""
    n = len(scenes)
    sides = {}
    for i, objs in enumerate(scenes):
        if _split_of(i, n) == "test":
            in_a = sum(o.shape in group_a for o in objs)
            sides[i] = "testA" if 2 * in_a >= len(objs) else "testB"

    def referable(i: int, side: str) -> int:
        objs = scenes[i]
        return sum(
            (o.shape in group_a) == (side == "testA") and language.expressible(objs, k)
            for k, o in enumerate(objs)
        )

    for side in ("testA", "testB"):
        if any(referable(i, side) for i, s in sides.items() if s == side):
            continue
        others = [i for i, s in sides.items() if s != side]
        if len(others) > 1:
            best = max(others, key=lambda i: (referable(i, side), -i))
            if referable(best, side):
                sides[best] = side
    return sides


def _need_every_split(name: str, counts: dict[str, int]) -> None:
    """A split without samples would fail later, at conversion, naming a file the user
    never made: say it here, with what to do."""
    empty = [s for s, k in counts.items() if k == 0]
    if empty:
        raise DataError(
            f"this world is too small: {name} has no sample in {', '.join(empty)}; "
            f"use more images or another seed (sizes {MIN_IMAGES}-100 with seeds 0-4 all "
            "work: bench/world_sizes.py)"
        )


def _write_refcoco(out: Path, scenes: list[list[Obj]], rng) -> dict:
    n = len(scenes)
    group_a = {"circle", "star", "triangle"}  # plays the part of RefCOCO's "people" (testA)
    sides = _test_sides(scenes, group_a)
    refs, anns, images = [], [], []
    ann_id = sent_id = 0
    for i, objs in enumerate(scenes):
        split = sides.get(i, _split_of(i, n))
        images.append(_coco_image(i, n))
        for k, o in enumerate(objs):
            ann_id += 1
            x1, y1, x2, y2 = o.box
            anns.append(
                {
                    "id": ann_id,
                    "image_id": i,
                    "category_id": SHAPES.index(o.shape) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                }
            )
            if (
                split == "testA"
                and o.shape not in group_a
                or split == "testB"
                and o.shape in group_a
            ):
                continue
            text = language.expression(rng, objs, k)
            if text is None:
                continue
            sent_id += 1
            refs.append(
                {
                    "ref_id": len(refs),
                    "ann_id": ann_id,
                    "image_id": i,
                    "split": split,
                    "category_id": SHAPES.index(o.shape) + 1,
                    "file_name": f"{coco_stem(i, n)}_{ann_id}.jpg",
                    "sent_ids": [sent_id],
                    "sentences": [
                        {"sent_id": sent_id, "sent": text, "raw": text, "tokens": text.split()}
                    ],
                }
            )
    found = Counter(r["split"] for r in refs)
    _need_every_split("refcoco+", {s: found[s] for s in ("train", "val", "testA", "testB")})
    (out / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    categories = [{"id": k + 1, "name": s, "supercategory": "shape"} for k, s in enumerate(SHAPES)]
    _dump(
        out / "refcoco+" / "instances.json",
        {"images": images, "annotations": anns, "categories": categories},
    )
    return {"rec_expressions": len(refs)}
