"""The claim study: its expansion into stages, the report, and (slow) its quick variant
run end to end with the figures drawn from the runs it made."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT

from cmal.analysis.report import (
    _panels,
    across_worlds,
    collect,
    comparisons,
    plot,
    tables,
    verdict,
)
from cmal.config import ConfigError
from cmal.workflow.runner import load_workflow


def test_claim_study_expands_into_arms_seeds_and_tasks():
    wf = load_workflow(ROOT / "workflows/claim.yaml")
    pre = [s for s in wf.stages if s["kind"] == "pretrain"]
    fts = [s for s in wf.stages if s["kind"] == "finetune"]
    assert wf.stages[0]["kind"] == "world"
    # cmal and contrastive at 100/50/25% x 3 seeds, 4 single-seed ablations, and scratch
    assert len(pre) == 6 * 3 + 4 and len(fts) == (6 * 3 + 4 + 1) * 4
    names = {s["overrides"][-3] for s in pre}
    assert {"name=claim-cmal-s2", "name=claim-contrastive-50-s1", "name=claim-cmal-25-s2"} <= names
    scratch = [s for s in fts if "name=claim-scratch-s0-vqa" in s["overrides"]]
    assert scratch and scratch[0]["from"] == "none"
    contrastive = next(s for s in pre if "name=claim-contrastive-s0" in s["overrides"])
    assert contrastive["config"] == "configs/pretrain/world-contrastive.yaml"
    # the protocol users get: the fine-tuning configs as they are (head-only VQA/VE/NLVR2)
    assert all(s["overrides"][:-3] == [] for s in fts)
    part = load_workflow(ROOT / "workflows/claim.yaml", arms=["cmal", "scratch"], seeds=[0])
    tasks = ("vqa", "ve", "nlvr2", "rec")
    assert [s["name"] for s in part.stages if s["kind"] == "evaluate"] == [
        f"evaluate-claim-{arm}-s0-{t}" for arm in ("cmal", "scratch") for t in tasks
    ]
    with pytest.raises(ConfigError, match=r"--arms: \['nope'\] are not arms"):
        load_workflow(ROOT / "workflows/claim.yaml", arms=["nope"])
    quick = load_workflow(ROOT / "workflows/claim.yaml", quick=True)
    assert quick.stages[0]["out"] == "data/world-quick"
    assert {s["overrides"][-3] for s in quick.stages if s["kind"] == "pretrain"} == {
        "name=claim-cmal-s0", "name=claim-contrastive-s0"}  # fmt: skip
    # the first study's protocol stays runnable beside it
    e2e = load_workflow(ROOT / "workflows/claim-e2e.yaml")
    assert all("task.head_only=false" in s["overrides"] for s in e2e.stages
               if s["kind"] == "finetune")  # fmt: skip


@pytest.mark.parametrize(
    ("study", "budget"),
    [("claim.yaml", 24.7e12), ("claim10k.yaml", 24.7e12), ("claim3.yaml", 82.4e12)],  # fmt: skip
)
def test_every_arm_pretrains_on_the_same_flops(study, budget):
    """The studies compare methods at equal pre-training compute: steps x batch x the
    analytic FLOPs per sample that `cmal model summary` prints, within 1% of CMAL's."""
    from cmal.config import load_config
    from cmal.model.pretrained import build_model

    per_sample: dict[str, float] = {}  # model config -> FLOPs (building a model takes ~1 s)
    budgets = {}
    for st in load_workflow(ROOT / "workflows" / study).stages:
        if st["kind"] != "pretrain":
            continue
        cfg = load_config(ROOT / st["config"], st["overrides"])
        key = repr(cfg.model)
        if key not in per_sample:
            per_sample[key] = build_model(cfg.model).flops_per_sample(train=True)
        budgets[st["name"]] = cfg.engine.steps * cfg.data.batch_size * per_sample[key]
    cmal = budgets[f"pretrain-{study[:-5]}-cmal-s0"]
    assert abs(cmal / budget - 1) < 0.01  # the budget the study's file states
    off = {name: b / cmal for name, b in budgets.items() if abs(b / cmal - 1) > 0.01}
    assert not off, off


def test_study_on_two_worlds_with_zero_shot_stages():
    """Round 3: each arm reads its own world's shards in pre-training, fine-tuning and
    evaluation; every world is a stage of every part; zero-shot retrieval straight from
    each pre-training; retrieval scored on its test split only; CMAL sees one epoch."""
    from cmal.config import load_config

    wf = load_workflow(ROOT / "workflows/claim3.yaml", arms=["noisy-cmal-itc"], seeds=[1])
    assert [s["name"] for s in wf.stages[:2]] == ["world-w10k", "world-noisy"]
    assert wf.stages[1]["noise"]["wrong_tag"] == 0.15 and "noise" not in wf.stages[0]
    pre, zs = wf.stages[2:4]
    cfg = load_config(ROOT / pre["config"], pre["overrides"])
    assert cfg.data.remote == "data/world-10k/shards/pretrain/train" and cfg.data.val_remote is None
    assert cfg.model.losses.itc and cfg.engine.steps == 355 and cfg.task.rerank_k == 8
    assert zs == {"name": "zeroshot-claim3-noisy-cmal-itc-s1-retrieval", "kind": "evaluate",
                  "task": "retrieval", "run": "pretrain-claim3-noisy-cmal-itc-s1",
                  "splits": ["test"]}  # fmt: skip
    fts = [s for s in wf.stages if s["kind"] == "finetune"]
    assert [s["task"] for s in fts] == ["vqa", "ve", "nlvr2", "rec", "retrieval"]
    assert all(s["overrides"][0] == "task.data_root=data/world-10k/shards" for s in fts)
    evals = {s["task"]: s for s in wf.stages if s["name"].startswith("evaluate-")}
    assert evals["retrieval"]["splits"] == ["test"] and "splits" not in evals["vqa"]
    clean = load_workflow(ROOT / "workflows/claim3.yaml", arms=["cmal"], seeds=[0])
    cfg = load_config(ROOT / clean.stages[2]["config"], clean.stages[2]["overrides"])
    # one full epoch of the 10k world's 16,000 pre-training captions
    assert cfg.data.remote.startswith("data/world-10k-clean/") and cfg.engine.steps * 32 == 16_000
    assert [s["name"] for s in clean.stages[:2]] == ["world-w10k", "world-noisy"]


def test_bad_study_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"study": {"arms": {"a": {"cofig": "x.yaml"}}}}))
    with pytest.raises(ConfigError, match=r"s\.yaml: study: arms: a: expected a mapping of"):
        load_workflow(path)
    path.write_text(yaml.safe_dump({"study": {"arms": {"a": {"config": "x"}}}}))
    with pytest.raises(ConfigError, match="--quick needs a 'quick' mapping"):
        load_workflow(path, quick=True)
    worlds = {"w": {"out": "data/w"}}
    path.write_text(
        yaml.safe_dump({"study": {"worlds": worlds, "arms": {"a": {"config": "x", "world": "v"}}}})
    )
    with pytest.raises(ConfigError, match=r"s\.yaml: study: a: world: 'v' is not in worlds"):
        load_workflow(path)
    path.write_text(
        yaml.safe_dump(
            {
                "study": {
                    "worlds": worlds,
                    "world": {"out": "data/x"},
                    "arms": {"a": {"config": "x"}},
                }
            }
        )
    )
    with pytest.raises(ConfigError, match="either world or worlds"):
        load_workflow(path)
    arms = {"a": {"config": "x"}}
    path.write_text(yaml.safe_dump({"study": {"zero_shot": ["vqa"], "arms": arms}}))
    with pytest.raises(ConfigError, match=r"zero_shot: \['vqa'\] cannot be evaluated without"):
        load_workflow(path)
    path.write_text(yaml.safe_dump({"stages": []}))
    with pytest.raises(ConfigError, match="--quick/--arms/--seeds apply to a study"):
        load_workflow(path, quick=True)


def _metrics(folder, **splits):
    folder.mkdir(parents=True)
    data = {k: {"accuracy": v, "n": 10.0} for k, v in splits.items()}
    (folder / "metrics.json").write_text(json.dumps(data))


def test_report_means_and_stds_over_seeds_and_the_fraction_plot(tmp_path):
    _metrics(tmp_path / "claim-cmal-s0-vqa", val=0.50, test=0.40)
    _metrics(tmp_path / "claim-cmal-s1-vqa", val=0.60, test=0.44)
    _metrics(tmp_path / "claim-cmal-25-s0-vqa", val=0.30, test=0.20)
    _metrics(tmp_path / "claim-contrastive-s0-vqa", val=0.45, test=0.35)
    (tmp_path / "not-a-run").mkdir()
    results = collect(sorted(tmp_path.iterdir()))
    text = tables(results)
    sd = statistics.stdev([50.0, 60.0])
    assert f"| cmal | 2 | 55.0 ± {sd:.1f} | 42.0 ± {statistics.stdev([40.0, 44.0]):.1f} |" in text
    assert "| cmal-25 | 1 | 30.0 | 20.0 |" in text and "| contrastive | 1 | 45.0 | 35.0 |" in text
    # a task's other metrics (NLVR2's consistency) as columns of their own, not in verdicts
    folder = tmp_path / "claim-cmal-s0-nlvr2"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps(
        {"dev": {"accuracy": 0.6, "consistency": 0.25, "n": 8.0}}))  # fmt: skip
    nlvr2 = tables(collect([folder]))
    assert (
        "| arm | seeds | dev | dev consistency |" in nlvr2 and "| cmal | 1 | 60.0 | 25.0 |" in nlvr2
    )
    png = plot(results, tmp_path / "fig" / "fraction.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="no evaluated runs"):
        collect([tmp_path / "not-a-run"])


def test_report_sets_cmal_against_contrastive_with_a_verdict(tmp_path):
    _metrics(tmp_path / "claim-cmal-s0-vqa", val=0.50, test=0.40)
    _metrics(tmp_path / "claim-cmal-s1-vqa", val=0.60, test=0.44)
    _metrics(tmp_path / "claim-contrastive-s0-vqa", val=0.45, test=0.30)
    _metrics(tmp_path / "claim-contrastive-s1-vqa", val=0.47, test=0.32)
    _metrics(tmp_path / "claim-cmal-25-s0-vqa", val=0.30, test=0.20)
    text = comparisons(collect(sorted(tmp_path.iterdir())))
    # val: 55 - 46 = +9 against 2 x sqrt(50/2 + 2/2) = 10.2; test: 42 - 31 = +11 > 2 x sqrt(5)
    assert "| vqa | val | 55.0 ± 7.1 | 46.0 ± 1.4 | +9.0 | tie |" in text
    assert "| vqa | test | 42.0 ± 2.8 | 31.0 ± 1.4 | +11.0 | win |" in text
    # the less-data comparison: CMAL at 25% against the contrastive model at 100%
    assert (
        "### cmal-25 vs contrastive" in text
        and "| vqa | val | 30.0 | 46.0 ± 1.4 | -16.0 | 1 seed |" in text
    )
    assert "cmal-25 vs contrastive-25" not in text
    assert verdict([31.0, 32.0], [40.0, 44.0]) == "lose"


def test_report_pairs_within_a_world_and_reads_zero_shot_runs(tmp_path):
    """Round 3's names: a world prefix keeps each world's arms apart, a CMAL variant is set
    against its world's contrastive arm, and a pre-training run's zero-shot retrieval
    joins the fine-tuned runs' retrieval table (its own columns)."""
    for arm in ("cmal", "contrastive", "noisy-cmal", "noisy-contrastive", "noisy-cmal-itc",
                "text-fill"):  # fmt: skip
        _metrics(tmp_path / f"claim3-{arm}-s0-vqa", val=0.5)
    text = comparisons(collect(sorted(tmp_path.iterdir())))
    heads = [line for line in text.splitlines() if line.startswith("### ")]
    assert sorted(heads) == ["### cmal vs contrastive", "### noisy-cmal vs noisy-contrastive",
                             "### noisy-cmal-itc vs noisy-contrastive"]  # fmt: skip
    variants = comparisons(collect(sorted(tmp_path.iterdir())), variants=True)
    assert [line for line in variants.splitlines() if line.startswith("### ")] == [
        "### noisy-cmal-itc vs noisy-cmal"]  # fmt: skip
    run = tmp_path / "claim3-noisy-cmal-itc-s0"
    run.mkdir()
    recall = {"r_mean": 0.2, "i2t_r1": 0.1, "n": 5.0}
    (run / "metrics.json").write_text(json.dumps({"zeroshot-test": recall}))
    (tmp_path / "claim3-noisy-cmal-s0").mkdir()  # a pre-training run not evaluated: no row
    _metrics(tmp_path / "claim3-noisy-cmal-itc-s0-retrieval", test=0.0)
    folder = tmp_path / "claim3-noisy-cmal-itc-s0-retrieval"
    (folder / "metrics.json").write_text(json.dumps({"test": {**recall, "r_mean": 0.4}}))
    table = tables([r for r in collect(sorted(tmp_path.iterdir())) if r.task == "retrieval"])
    assert "| arm | seeds | zeroshot-test | zeroshot-test i2t r1 | test | test i2t r1 |" in table
    assert "| noisy-cmal-itc | 1 | 20.0 | 10.0 | 40.0 | 10.0 |" in table


def test_report_sets_the_lead_in_one_world_against_another(tmp_path):
    """Size apart from noise: CMAL's lead on the plain world against its lead on the noisy
    one, the change judged over the four means' errors (variants and fractions left out);
    and a seeds column that shows a range where splits have different runs."""
    for arm, test, val in [
        ("cmal", (60, 62), (60, 62)),
        ("contrastive", (50, 52), (50, 52)),
        ("noisy-cmal", (55, 57), (58, 60)),
        ("noisy-contrastive", (54, 56), (50, 52)),
        ("noisy-cmal-itc", (90, 92), (90, 92)),
        ("cmal-25", (0, 1), (0, 1)),
    ]:
        for seed in (0, 1):
            _metrics(tmp_path / f"claim3-{arm}-s{seed}-vqa", test=test[seed] / 100,
                     val=val[seed] / 100)  # fmt: skip
    text = across_worlds(collect(sorted(tmp_path.iterdir())))
    assert text.splitlines()[0] == "### cmal − contrastive against noisy-cmal − noisy-contrastive"
    # test: lead +10 then +1; each mean's error is 1, so the change's is 2: -9 < -2 x 2
    assert "| vqa | test | +10.0 | +1.0 | -9.0 | shrinks |" in text
    assert "| vqa | val | +10.0 | +8.0 | -2.0 | tie |" in text
    assert len([line for line in text.splitlines() if line.startswith("| vqa")]) == 2
    only_one = collect(sorted(p for p in tmp_path.iterdir() if "noisy" not in p.name))
    assert across_worlds(only_one) == ""
    run = tmp_path / "claim3-cmal-s0"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"zeroshot-test": {"r_mean": 0.2, "n": 5.0}}))
    _metrics(tmp_path / "claim3-cmal-s0-retrieval", test=0.3)
    _metrics(tmp_path / "claim3-cmal-s1-retrieval", test=0.4)
    table = tables([r for r in collect(sorted(tmp_path.iterdir())) if r.task == "retrieval"])
    assert "| cmal | 1–2 | 20.0 | 35.0 ± 7.1 |" in table
    # every arm at all the pairs: the figure has a bar per arm and task, zero-shot apart
    results = [r for r in collect(sorted(tmp_path.iterdir())) if r.arm != "cmal-25"]
    panels = _panels(results)
    assert list(panels) == ["vqa", "retrieval", "retrieval zero-shot"]
    assert panels["vqa"]["noisy-contrastive"] == pytest.approx([52.0, 54.0])  # splits' mean
    assert panels["retrieval"] == {"cmal": pytest.approx([30.0, 40.0])}
    assert panels["retrieval zero-shot"] == {"cmal": pytest.approx([20.0])}
    assert plot(results, tmp_path / "arms.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_study_runs_reports_and_draws(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "workflows").symlink_to(ROOT / "workflows")

    def cmal(*args):
        res = subprocess.run([sys.executable, "-m", "cmal.cli", *args], cwd=tmp_path,
                             capture_output=True, text=True)  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        return res.stdout

    cmal("run", "workflows/claim.yaml", "--quick")
    runs = tmp_path / "runs"
    report = cmal(
        "report", *map(str, sorted(runs.glob("claim-*"))), "--plot", str(tmp_path / "p.png")
    )
    for arm in ("cmal", "contrastive", "scratch"):
        assert f"| {arm} | 1 |" in report
    assert (tmp_path / "p.png").is_file()
    out = cmal("visualize", str(runs / "claim-cmal-s0"), str(runs / "claim-contrastive-s0"),
               "--out", str(tmp_path / "figs"), "--n", "32")  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "amc_confusion.png", "attention.png", "tsne.png"]  # fmt: skip
    assert "wrote" in out
