"""Task metrics against values worked out by hand, prediction-file scoring, and the
fine-tune -> evaluate chain end to end on the tiny model."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT

from cmal.config import ConfigError
from cmal.model.cmal import Batch
from cmal.model.prompt import Anchors
from cmal.tasks import get_task
from cmal.tasks.vqa_normalize import accuracy, normalize


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two.", "2"),
        ("the dog", "dog"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("A Red-Ball", "red ball"),
        ("1,000", "1000"),
        ("none", "0"),
        ("3.5", "3.5"),
    ],
)
def test_vqa_normalisation(raw, norm):
    assert normalize(raw) == norm


def test_vqa_accuracy_by_hand():
    assert accuracy("2", ["2"] * 10) == 1.0
    # 3 of 10 say "2": leaving out one of them gives 2/3, any other annotator 3/3 -> 1
    assert accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    # 2 of 10: (2 * 1/3 + 8 * 2/3) / 10
    assert accuracy("two", ["2", "Two."] + ["3"] * 8) == pytest.approx(0.6)
    # as in the official code: humans who all agree are not normalised
    assert accuracy("2", ["two"] * 10) == 0.0
    assert accuracy("dog", ["cat"] * 10) == 0.0


def _rec_item(pred_box, target_box, mask=(True, True)):
    n, r = 1, 2
    boxes = torch.tensor([[pred_box, [0.9, 0.9, 1.0, 1.0]]])
    batch = Batch(
        torch.tensor([[101, 102]]),
        torch.ones(n, 2, dtype=torch.bool),
        torch.zeros(n, r, 4),
        boxes,
        torch.tensor([mask]),
        torch.zeros(n, r, dtype=torch.long),
        Anchors(
            *(torch.zeros(n, 1, dtype=torch.long) for _ in range(3)),
            torch.zeros(n, 1, dtype=torch.bool),
        ),
    )
    return {
        "batch": batch,
        "ids": ["7"],
        "ref_id": torch.tensor([3]),
        "target_box": torch.tensor([target_box]),
        "image_size": torch.tensor([[100.0, 50.0]]),
    }


def test_rec_iou_boundary_at_one_half():
    rec = get_task("rec")
    logits = torch.tensor([[5.0, 0.0]])  # picks region 0
    hit = rec.predict(logits, _rec_item([0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 0.5]), {})
    assert hit[0]["score"] == 1.0  # IoU exactly 0.5 counts
    miss = rec.predict(logits, _rec_item([0.0, 0.0, 0.49, 0.5], [0.0, 0.0, 1.0, 0.5]), {})
    assert miss[0]["score"] == 0.0
    assert hit[0]["bbox"] == [0.0, 0.0, 50.0, 25.0]  # pixels, x y w h


def test_rec_upper_bound_by_hand():
    """Upper bound: the share of expressions whose target some real candidate box covers
    at IoU >= 0.5, whichever box the model picks."""
    rec = get_task("rec")
    target, far = [0.0, 0.0, 0.5, 0.5], [0.6, 0.6, 0.7, 0.7]
    first, second = torch.tensor([[5.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    records = [
        *rec.predict(first, _rec_item(target, target), {}),  # right: hit, covered
        *rec.predict(second, _rec_item(target, target), {}),  # wrong box, yet covered
        *rec.predict(first, _rec_item(far, target), {}),  # no box covers it
        *rec.predict(second, _rec_item(target, target, mask=(False, True)), {}),  # padding
    ]
    assert [r["score"] for r in records] == [1.0, 0.0, 0.0, 0.0]
    assert rec.metrics(records) == {"accuracy": 0.25, "upper_bound": 0.5, "n": 4.0}


def test_nlvr2_accuracy_and_consistency_by_hand(tmp_path):
    """As lil-lab/nlvr's nlvr2/eval/metrics.py scores them: accuracy over pairs; a sentence
    (identifier but its pair field) is consistent when every one of its pairs is right.
    Predictions as its CSV (labels compared without case) or as cmal's JSON."""
    nlvr2 = get_task("nlvr2")
    gold = {"dev-1-0-0": "True", "dev-1-1-0": "False", "dev-1-2-0": "True",  # sentence 1
            "dev-2-0-1": "False", "dev-2-1-1": "False",  # sentence 2
            "dev-3-0-0": "True"}  # fmt: skip
    said = {"dev-1-0-0": "True", "dev-1-1-0": "false", "dev-1-2-0": "True",  # all right
            "dev-2-0-1": "False", "dev-2-1-1": "True",  # one wrong
            "dev-3-0-0": "False"}  # fmt: skip
    want = {"accuracy": pytest.approx(4 / 6), "consistency": pytest.approx(1 / 3), "n": 6.0}
    annotations = tmp_path / "dev.json"
    annotations.write_text("".join(json.dumps({"identifier": k, "label": v}) + "\n"
                                   for k, v in gold.items()))  # fmt: skip
    csv, js = tmp_path / "p.csv", tmp_path / "p.json"
    csv.write_text("".join(f"{k},{v}\n" for k, v in said.items()))
    js.write_text(json.dumps(said))
    for path in (csv, js):
        assert nlvr2.score_file(path, {"json": annotations}, None) == want
    records = [{"id": k, "score": float(said[k].lower() == v.lower())} for k, v in gold.items()]
    assert nlvr2.metrics(records) == want
    csv.write_text("dev-1-0-0,True\ndev-1-1-0 False\n")
    with pytest.raises(ConfigError, match=r"p\.csv:2: expected 'identifier,prediction'"):
        nlvr2.score_file(csv, {"json": annotations}, None)


class _Matcher:
    """A stand-in for the model's ITM: a pair's log-odds from a table, the pair read from
    the states (a text's and an image's state hold their own index)."""

    itm = True

    def __init__(self, table):
        self.table, self.calls = table, 0

    def match_logits(self, t, v, text_mask, region_mask, boxes):
        self.calls += len(t)
        odds = [self.table[int(i)][int(j)] for i, j in zip(v[:, 0, 0], t[:, 0, 0], strict=True)]
        return torch.stack([torch.zeros(len(odds)), torch.tensor(odds)], 1)


def test_retrieval_recalls_and_reranking_by_hand(tmp_path):
    """Three images A, B, C; texts a1, a2 (of A), b1, b2 (of B), c1 (of C); embedding
    similarities as below. Every rank worked out by hand, with embeddings alone, with ITM
    re-ranking the top 2 and the top 3, and on the fold {A, B}."""
    from types import SimpleNamespace

    from cmal.tasks.retrieval import Gallery, recalls

    sims = [[0.9, 0.1, 0.8, 0.2, 0.3],  # A: a1 a2 b1 b2 c1
            [0.7, 0.6, 0.2, 0.5, 0.1],  # B
            [0.4, 0.3, 0.35, 0.9, 0.2]]  # C  # fmt: skip
    names, owner = ["a1", "a2", "b1", "b2", "c1"], ["A", "A", "B", "B", "C"]
    texts = [(n, o, torch.tensor([[float(j)]]), torch.tensor([r[j] for r in sims]))
             for j, (n, o) in enumerate(zip(names, owner, strict=True))]  # fmt: skip
    images = {k: (torch.tensor([[float(i)]]), torch.zeros(1, 4), torch.eye(3)[i])
              for i, k in enumerate("ABC")}  # fmt: skip
    # ITM: a matched pair 5 + its similarity, another pair its similarity - 5
    table = [[s + 5 if owner[j] == "ABC"[i] else s - 5 for j, s in enumerate(row)]
             for i, row in enumerate(sims)]  # fmt: skip
    world = SimpleNamespace(rank=0, size=1, device="cpu")
    image_of = dict(zip(names, owner, strict=True))

    def check(k, model, want, images_of_fold=(0, 1, 2)):
        g = Gallery(texts, images)
        i2t, t2i, of = g.rankings(model, torch.tensor(images_of_fold), k, world, chunk=3)
        got = recalls(i2t, t2i, of)
        assert {m: got[m] for m in want} == pytest.approx(want), (k, i2t, t2i)
        return i2t, t2i

    plain = SimpleNamespace(itm=None)
    # i2t: A a1 (rank 0); B a1 a2 b2 (rank 2); C b2 a1 b1 a2 c1 (rank 4)
    # t2i: a1 A (0); a2 B C A (2); b1 A C B (2); b2 C B (1); c1 A C (1)
    i2t, t2i = check(0, plain, {"txt_r1": 1 / 3, "txt_r5": 1.0, "img_r1": 1 / 5, "img_r5": 1.0,
                                "r_mean": (7 / 9 + 11 / 15) / 2, "n": 3.0})  # fmt: skip
    assert i2t["C"] == ["b2", "a1", "b1", "a2", "c1"] and t2i["a2"] == ["B", "C", "A"]
    assert recalls(i2t, t2i, image_of)["txt_r1"] == pytest.approx(1 / 3)
    # top 2 re-ranked: b2 -> B and c1 -> C move first; no image's text moves (B's and C's
    # own texts are not among their top 2)
    matcher = _Matcher(table)
    check(2, matcher, {"txt_r1": 1 / 3, "img_r1": 3 / 5, "img_r5": 1.0})
    assert matcher.calls == 11  # 3 x 2 + 5 x 2 pairs, 5 of them in both directions: once
    # top 3: every text's image is re-ranked first; C's c1 still is not among C's top 3
    check(3, _Matcher(table), {"txt_r1": 2 / 3, "txt_r5": 1.0, "img_r1": 1.0})
    # the fold {A, B}: A a1 (0), B a1 a2 b2 (2); a1 A, a2 B A (1), b1 A B (1), b2 B (0)
    check(0, plain, {"txt_r1": 1 / 2, "txt_r5": 1.0, "img_r1": 2 / 4, "n": 2.0}, (0, 1))
    # a text whose image is missing from its list is a miss, not an error
    assert recalls({"A": ["a2"]}, {"a2": ["B"]}, {"a2": "A"})["img_r10"] == 0.0
    with pytest.raises(ConfigError, match="no ranking"):
        recalls({"A": ["a2"]}, {}, {"a2": "A"})


def test_vqa_score_file(tmp_path):
    q = tmp_path / "q.json"
    a = tmp_path / "a.json"
    q.write_text(
        json.dumps(
            {
                "questions": [
                    {"question_id": 1, "image_id": 1, "question": "?"},
                    {"question_id": 2, "image_id": 1, "question": "?"},
                ]
            }
        )
    )
    anns = [
        {
            "question_id": 1,
            "answer_type": "number",
            "answers": [{"answer": x} for x in ["2"] * 3 + ["3"] * 7],
        },
        {
            "question_id": 2,
            "answer_type": "yes/no",
            "answers": [{"answer": x} for x in ["yes"] * 9 + ["no"]],
        },
    ]
    a.write_text(json.dumps({"annotations": anns}))
    p = tmp_path / "pred.json"
    p.write_text(
        json.dumps([{"question_id": 1, "answer": "Two"}, {"question_id": 2, "answer": "Yes."}])
    )
    got = get_task("vqa").score_file(p, {"questions": q, "annotations": a}, None)
    assert got["accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    assert got["accuracy/number"] == pytest.approx(0.9)
    p.write_text(json.dumps([{"question_id": 1, "answer": "2"}]))
    with pytest.raises(ConfigError, match="1 of 2 questions have no answer"):
        get_task("vqa").score_file(p, {"questions": q, "annotations": a}, None)


def test_id_label_and_rec_score_files(tmp_path):
    ve = tmp_path / "ve.jsonl"
    ve.write_text(
        "".join(
            json.dumps({"pairID": f"p{i}", "gold_label": g}) + "\n"
            for i, g in enumerate(["entailment", "neutral", "contradiction", "neutral"])
        )
    )
    p = tmp_path / "p.json"
    p.write_text(
        json.dumps({"p0": "entailment", "p1": "neutral", "p2": "neutral", "p3": "neutral"})
    )
    assert get_task("ve").score_file(p, {"jsonl": ve}, None)["accuracy"] == 0.75
    p.write_text(json.dumps({"p0": "entailment"}))
    with pytest.raises(ConfigError, match="3 of 4 ids have no prediction"):
        get_task("ve").score_file(p, {"jsonl": ve}, None)

    refs = [
        {
            "ref_id": 1,
            "ann_id": 10,
            "image_id": 5,
            "split": "testA",
            "sentences": [{"sent_id": 100}, {"sent_id": 101}],
        },
        {
            "ref_id": 2,
            "ann_id": 11,
            "image_id": 5,
            "split": "testA",
            "sentences": [{"sent_id": 102}],
        },
        {"ref_id": 3, "ann_id": 11, "image_id": 5, "split": "val", "sentences": [{"sent_id": 103}]},
    ]
    (tmp_path / "refs.p").write_bytes(pickle.dumps(refs))
    (tmp_path / "inst.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {"id": 10, "bbox": [0, 0, 20, 10]},
                    {"id": 11, "bbox": [50, 50, 10, 10]},
                ]
            }
        )
    )
    p.write_text(
        json.dumps(
            [
                {"sent_id": 100, "bbox": [0, 0, 10, 10]},  # IoU 0.5: hit
                {"sent_id": 101, "bbox": [0, 0, 9, 10]},  # IoU 0.45: miss
                {"ref_id": 2, "bbox": [50, 50, 10, 10]},  # by ref_id: hit
            ]
        )
    )
    files = {"refs": tmp_path / "refs.p", "instances": tmp_path / "inst.json"}
    got = get_task("rec").score_file(p, files, "testA")
    assert got == {"accuracy": pytest.approx(2 / 3), "n": 3.0}
    with pytest.raises(ConfigError, match="1 expressions of split val have no box"):
        get_task("rec").score_file(p, files, "val")


def test_unknown_task_is_one_line():
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "evaluate", "--task", "caption", "--run", "x"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (
        res.returncode == 2
        and "unknown task 'caption'; expected one of vqa, ve, nlvr2, rec" in res.stderr
    )


def _write_chain(tmp_path, world):
    pre = {
        "base": str(ROOT / "configs/model/tiny.yaml"),
        "name": "t-pre",
        "model": {
            "num_concepts": 48,
            "visual": {"feature_dim": 128},
            "max_text_len": 32,
            "max_regions": 8,
        },
        "data": {"remote": str(world / "shards/pretrain/train"), "batch_size": 8, "workers": 1},
        "engine": {"steps": 4, "log_every": 2},
        "optim": {"warmup_steps": 1},
        "checkpoint": {"root": str(tmp_path / "runs")},
        "task": {"data_root": str(world / "shards")},
    }
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"base": "pre.yaml", "engine": {"steps": 4}}))
    stages = [{"name": "pretrain", "kind": "pretrain", "config": str(tmp_path / "pre.yaml")}]
    for t in ("vqa", "ve", "nlvr2", "rec"):
        stages.append(
            {
                "name": f"ft-{t}",
                "kind": "finetune",
                "task": t,
                "config": str(tmp_path / "ft.yaml"),
                "from": "pretrain",
                "overrides": [f"name=t-{t}"],
            }
        )
        stages.append({"name": f"ev-{t}", "kind": "evaluate", "task": t, "run": f"ft-{t}"})
    # retrieval: ITM re-ranks the top 4 (fewer than 10: the order below them counts), and
    # folds of 8 images are scored beside the 16-image sets; zero-shot from the pre-training
    retrieval = ["model.losses.itc=true", "model.losses.itm=true", "task.rerank_k=4",
                 "task.fold_images=8", "name=t-retrieval"]  # fmt: skip
    stages += [
        {"name": "ft-retrieval", "kind": "finetune", "task": "retrieval", "from": "pretrain",
         "config": str(tmp_path / "ft.yaml"), "overrides": retrieval},
        {"name": "ev-retrieval", "kind": "evaluate", "task": "retrieval", "run": "ft-retrieval"},
        {"name": "zs-retrieval", "kind": "evaluate", "task": "retrieval", "run": "pretrain"},
    ]  # fmt: skip
    wf = tmp_path / "chain.yaml"
    wf.write_text(
        yaml.safe_dump({"name": "chain", "runs": str(tmp_path / "runs"), "stages": stages})
    )
    return wf


def test_chain_runs_skips_and_metrics_match_across_ranks(world, tmp_path):
    wf = _write_chain(tmp_path, world)
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "run", str(wf)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr[-3000:]
    runs = tmp_path / "runs"
    for t, labels in (
        ("vqa", {"val", "test"}),
        ("ve", {"dev", "test"}),
        ("nlvr2", {"dev", "test1"}),
        ("rec", {"gt/val", "det/val", "gt/testA", "det/testA", "gt/testB", "det/testB"}),
    ):
        metrics = json.loads((runs / f"t-{t}" / "metrics.json").read_text())
        assert set(metrics) == labels
        assert all(0.0 <= m["accuracy"] <= 1.0 and m["n"] > 0 for m in metrics.values())
    vqa_pred = json.loads((runs / "t-vqa/predictions_val.json").read_text())
    assert {"question_id", "answer"} == set(vqa_pred[0])
    # the prediction file scores the same through the official files
    w = world
    scored = get_task("vqa").score_file(
        runs / "t-vqa/predictions_val.json",
        {
            "questions": w / "vqa/v2_OpenEnded_mscoco_val_questions.json",
            "annotations": w / "vqa/v2_mscoco_val_annotations.json",
        },
        None,
    )
    assert scored["accuracy"] == pytest.approx(
        json.loads((runs / "t-vqa/metrics.json").read_text())["val"]["accuracy"]
    )
    # NLVR2's CSV scores as its metrics.json says; REC's upper bound bounds its accuracy
    nlvr2 = json.loads((runs / "t-nlvr2/metrics.json").read_text())["dev"]
    scored = get_task("nlvr2").score_file(
        runs / "t-nlvr2/predictions_dev.csv", {"json": w / "nlvr2/dev.json"}, None
    )
    assert scored == {k: pytest.approx(v) for k, v in nlvr2.items()}
    assert set(nlvr2) == {"accuracy", "consistency", "n"}
    rec = json.loads((runs / "t-rec/metrics.json").read_text())
    assert all(m["accuracy"] <= m["upper_bound"] <= 1.0 for m in rec.values())
    # retrieval: six recalls and their mean per set; the written rankings score the same
    # against the Karpathy json; zero-shot results in the pre-training run
    ret = json.loads((runs / "t-retrieval/metrics.json").read_text())
    assert set(ret) == {"val", "test", "val-8", "test-8"}
    for m in ret.values():
        recall = [m[f"{side}_r{k}"] for side in ("txt", "img") for k in (1, 5, 10)]
        ordered = sorted(recall[:3]) + sorted(recall[3:])  # R@1 <= R@5 <= R@10
        assert all(0.0 <= r <= 1.0 for r in recall) and recall == ordered
        assert m["r_mean"] == pytest.approx(sum(recall) / 6)
    assert ret["test"]["n"] == 16 and ret["test-8"]["n"] == 8
    scored = get_task("retrieval").score_file(
        runs / "t-retrieval/predictions_test.json",
        {"captions": w / "coco/dataset_coco.json"},
        "test",
    )
    assert scored == {k: pytest.approx(v) for k, v in ret["test"].items()}
    zero = json.loads((runs / "t-pre/metrics.json").read_text())
    assert set(zero) == {"zeroshot-val", "zeroshot-test"}
    assert "retrieval zeroshot-test r mean" in res.stdout  # the chain's summary line
    state = json.loads((runs / "workflow-chain.json").read_text())
    assert all(s["status"] == "done" for s in state.values())

    again = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "run", str(wf)], capture_output=True, text=True, cwd=ROOT
    )
    assert again.returncode == 0 and again.stdout.count("skipped") == 12

    # a Karpathy-layout data set (features as an LXMERT tsv) converted by `cmal data
    # convert` and ranked by the fine-tuned run, then its rankings scored from the file
    from scale_fixtures import CLASSES, write_coco

    files = write_coco(tmp_path / "karpathy", 12, regions=8, dim=128, split="test")
    root = tmp_path / "coco"
    cli = [sys.executable, "-m", "cmal.cli"]
    conv = subprocess.run(
        [*cli, "data", "convert", "karpathy", "--captions", str(files["captions"]), "--splits",
         "test", "--features", str(files["features"]), "--classes", str(CLASSES), "--out",
         str(root / "retrieval/test")], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert conv.returncode == 0, conv.stderr[-2000:]
    ev = subprocess.run(
        [*cli, "evaluate", "--task", "retrieval", "--run", str(runs / "t-retrieval"),
         "--data-root", str(root), "--split", "test"], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert ev.returncode == 0 and "coco/test" in ev.stdout, ev.stderr[-2000:]
    coco = json.loads((runs / "t-retrieval/metrics.json").read_text())
    assert coco["test"] == ret["test"] and coco["coco/test"]["n"] == 12
    scored = subprocess.run(
        [*cli, "evaluate", "--task", "retrieval", "--predictions",
         str(runs / "t-retrieval/predictions_coco_test.json"), "--captions",
         str(files["captions"]), "--split", "test"], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads(scored.stdout) == {k: pytest.approx(v) for k, v in coco["coco/test"].items()}

    # evaluation on 2 ranks (gloo) gives the same metrics as on 1
    for task, run, split, labels in (
        ("rec", "t-rec", "testA", ("gt/testA", "det/testA")),
        ("retrieval", "t-retrieval", "test", ("test", "test-8")),
    ):
        two, one = _evaluate_on_two_ranks(runs / run, task, split), state[f"ev-{task}"]
        assert {k: two[k] for k in labels} == {k: one["outputs"]["metrics"][k] for k in labels}


def _evaluate_on_two_ranks(run, task: str, split: str) -> dict:
    """The run's metrics.json after `cmal evaluate` on 2 gloo ranks."""
    import os

    from conftest import _free_port

    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cmal.cli",
                "evaluate",
                "--task",
                task,
                "--run",
                str(run),
                "--split",
                split,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "DS_ACCELERATOR": "cpu",
            },
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:]
    return json.loads((run / "metrics.json").read_text())


def test_evaluate_bad_runs_are_one_line_errors(world, tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "evaluate", "--task", "ve", "--run", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "not a run folder" in res.stderr
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmal.cli",
            "finetune",
            "--task",
            "ve",
            "--from",
            str(tmp_path / "nothing"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "task.init_from" in res.stderr and "Traceback" not in res.stderr


def test_failed_stage_stops_the_chain_with_its_name(world, tmp_path):
    wf = _write_chain(tmp_path, world)
    data = yaml.safe_load(wf.read_text())
    data["stages"][1]["overrides"].append("engine.stepz=3")
    wf.write_text(yaml.safe_dump(data))
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "run", str(wf)], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 1
    assert "stage 'ft-vqa' failed" in res.stderr and "unknown key 'engine.stepz'" in res.stderr
    state = json.loads((tmp_path / "runs/workflow-chain.json").read_text())
    assert (
        state["pretrain"]["status"] == "done"
        and "ft-vqa" not in state
        or state["ft-vqa"]["status"] == "failed"
    )


def test_vqa_losses_by_hand():
    """bce: BCE on the soft scores x answers; softmax: CE against the normalised scores."""
    import math

    from cmal.tasks.vqa import VQA

    logits = torch.tensor([[2.0, 0.0, -1.0]])
    item = {"answers": [["yes"] * 9 + ["no"]]}  # scores: yes 1, no 0.3 (1 of 3 x 10 subsets)
    info = {"answers": ["yes", "no", "2"], "loss": "softmax"}
    t_yes, t_no = 1.0, 0.3
    logp = torch.log_softmax(logits, -1)[0]
    want = -(t_yes * logp[0] + t_no * logp[1]).item() / (t_yes + t_no)
    assert math.isclose(VQA().loss(logits, item, info).item(), want, rel_tol=1e-5)
    sig = torch.sigmoid(logits)[0]
    bce = -(math.log(sig[0]) + t_no * math.log(sig[1]) + (1 - t_no) * math.log(1 - sig[1])
            + math.log(1 - sig[2])) / 3  # fmt: skip
    info["loss"] = "bce"
    assert math.isclose(VQA().loss(logits, item, info).item(), bce * 3, rel_tol=1e-5)


def test_an_evaluation_whose_metrics_are_gone_is_due_again(tmp_path):
    from cmal.workflow.runner import _present

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-100")
    evaluated = {"outputs": {"run": str(run), "metrics": {"val": {"accuracy": 0.5}}}}
    # the fine-tuning was redone in a new folder: its checkpoint is back, its metrics not
    assert _present({"outputs": {"run": str(run), "step": 100}})
    assert not _present(evaluated)
    (run / "metrics.json").write_text("{}")
    assert _present(evaluated)


@pytest.mark.slow
def test_a_remade_world_trains_afresh_and_keeps_the_old_run(tmp_path):
    _write_chain(tmp_path, tmp_path / "w")  # its pre.yaml reads the world stage's shards
    pre = yaml.safe_load((tmp_path / "pre.yaml").read_text())
    pre["engine"]["steps"] = 2
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))

    def run(seed):
        world = {"name": "world", "kind": "world", "out": str(tmp_path / "w"), "images": 60}
        pretrain = {"name": "pretrain", "kind": "pretrain", "config": str(tmp_path / "pre.yaml")}
        stages = [{**world, "seed": seed}, pretrain]
        wf = tmp_path / "remade.yaml"
        wf.write_text(yaml.safe_dump({"name": "remade", "runs": str(tmp_path / "runs"),
                                      "stages": stages}))  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "cmal.cli", "run", str(wf)],
                             capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    runs, state_file = tmp_path / "runs", tmp_path / "runs" / "workflow-remade.json"
    run(0)
    first = (runs / "t-pre" / "checkpoints" / "latest").read_text()
    assert run(0).count("skipped") == 2
    # a state file written before worlds were recorded: not retrained while the world stands
    state = json.loads(state_file.read_text())
    del state["pretrain"]["worlds"]
    state_file.write_text(json.dumps(state))
    assert run(0).count("skipped") == 2

    out = run(1)  # another world: the pre-training is redone, the old run kept aside
    assert "skipped" not in out and "kept as" in out
    assert (runs / "t-pre.stale-1" / "checkpoints" / "latest").read_text() == first
    assert (runs / "t-pre" / "checkpoints" / "latest").is_file()
    state = json.loads(state_file.read_text())
    assert state["pretrain"]["worlds"] == [state["world"]["hash"]]
    assert run(1).count("skipped") == 2


def test_head_only_trains_the_head_alone_and_resumes_exactly(world, tmp_path):
    """task.head_only on 2 ranks: the encoder's weights come out as they went in, the norm
    holds the training features' statistics, the head learns (training loss falls), a
    signal-stopped run resumes to the same losses bit for bit, and `cmal evaluate` of the
    run gives the metrics the fine-tuning wrote."""
    from test_engine import finish, launch, losses, stop_and_resume, write_config

    from cmal.workflow.finetune import pretrained_weights
    from cmal.workflow.pretrain import newest_weights

    pre = write_config(tmp_path, world, name="pre", engine={"steps": 2})
    assert finish(launch(pre, 1)) == [0]
    steps = 600

    def config(root: str) -> str:
        path = tmp_path / f"{root}.yaml"
        path.write_text(yaml.safe_dump({
            "base": pre, "name": "ho", "data": {"local": None, "batch_size": 16},
            "engine": {"steps": steps, "log_every": 1}, "optim": {"warmup_steps": 10},
            "checkpoint": {"root": str(tmp_path / root), "every": 1000},
            "task": {"data_root": str(world / "shards"), "head_only": True},
        }))  # fmt: skip
        return str(path)

    args = ("--task", "nlvr2", "--from", str(tmp_path / "runs/pre"))
    assert finish(launch(config("ref"), 2, *args, command="finetune")) == [0, 0]
    want = losses(tmp_path / "ref/ho")
    assert len(want) == steps
    early = sum(want[s] for s in range(1, 101)) / 100
    late = sum(want[s] for s in range(steps - 99, steps + 1)) / 100
    assert late < early - 0.1, (early, late)

    run = tmp_path / "again/ho"
    assert stop_and_resume(config("again"), run, 2, *args, command="finetune") < steps
    assert losses(run) == want  # bitwise: same floats at every step

    trained, start = newest_weights(run), pretrained_weights(tmp_path / "runs/pre")
    encoder = [k for k in trained if k.startswith("model.")]
    assert encoder and all(torch.equal(trained[k], start[k[len("model.") :]]) for k in encoder)
    assert trained["norm.mean"].abs().max() > 0 and (trained["norm.std"] != 1).any()
    wrote = json.loads((run / "metrics.json").read_text())
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "evaluate", "--task", "nlvr2", "--run", str(run)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text()) == wrote


def test_runners_side_by_side_keep_each_others_records_and_noise_reaches_the_world(tmp_path):
    """Two runners of one workflow name, both started before either saved (two parts of a
    study run at once), share the state file without dropping a record; a world stage's
    ``noise`` reaches the simulated detector (det regions change, gt ones do not) and its
    hash, while a world without it hashes as before the field existed."""
    from cmal.workflow.runner import Runner, load_workflow

    def workflow(stage: str, **extra) -> Runner:
        st = {"name": stage, "kind": "world", "out": str(tmp_path / stage), "images": 40, **extra}
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump({"name": "parts", "runs": str(tmp_path / "runs"),
                                        "stages": [st]}))  # fmt: skip
        return Runner(load_workflow(path), echo=lambda *_: None)

    plain, noisy = workflow("plain"), workflow("noisy", noise={"wrong_tag": 1.0})
    assert plain.run() == "done" and noisy.run() == "done"
    state = json.loads((tmp_path / "runs/workflow-parts.json").read_text())
    assert {k: v["status"] for k, v in state.items()} == {"plain": "done", "noisy": "done"}
    assert "noise" not in state["plain"]["inputs"]
    assert state["noisy"]["inputs"]["noise"] == {"wrong_tag": 1.0}

    def regions(stage: str, kind: str) -> bytes:
        return (tmp_path / stage / "features" / f"{kind}.tsv").read_bytes()

    assert regions("plain", "gt") == regions("noisy", "gt")
    assert regions("plain", "det") != regions("noisy", "det")

    for bad, match in (({"wrong_tag": 2}, "wrong_tag: a probability"),
                       ({"jiter": 1}, "expected a mapping of"),
                       ({"missed": "x"}, "missed: expected a number")):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"bad\.yaml: stages\[0\]: noise: {match}"):
            path = tmp_path / "bad.yaml"
            path.write_text(yaml.safe_dump({"stages": [
                {"name": "w", "kind": "world", "out": "x", "noise": bad}]}))  # fmt: skip
            load_workflow(path)
