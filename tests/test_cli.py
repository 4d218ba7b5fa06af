"""The command line as a user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

from cmal.config import load_config
from cmal.model.cmal import CMAL


def cmal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmal.cli", *args], capture_output=True, text=True, cwd=ROOT
    )


def test_model_summary_base():
    res = cmal("model", "summary", "--config", "configs/model/base.yaml")
    assert res.returncode == 0, res.stderr
    assert "# resolved config" in res.stdout and "hidden: 768" in res.stdout
    total = int(re.search(r"^total\s+([\d,]+)", res.stdout, re.M).group(1).replace(",", ""))
    model = CMAL(load_config(ROOT / "configs/model/base.yaml").model)
    assert total == sum(p.numel() for p in model.parameters())
    for group in ("text encoder", "visual encoder", "unified encoder", "AMC head"):
        assert group in res.stdout
    step = re.search(r"pre-training step \(f\+b\)\s+([\d.]+)GFLOP", res.stdout)
    assert (
        abs(float(step.group(1)) * 1e9 - model.flops_per_sample()) / model.flops_per_sample() < 0.01
    )


def test_bad_override_is_one_line_error():
    res = cmal("model", "summary", "-c", "configs/model/tiny.yaml", "model.unified.layerz=2")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert "unknown key 'model.unified.layerz'" in res.stderr
    assert "Traceback" not in res.stderr


def test_data_world_and_convert_from_the_command_line(tmp_path):
    res = cmal("data", "world", "--out", str(tmp_path / "w"), "--images", "40", "--seed", "4")
    assert res.returncode == 0, res.stderr
    assert re.search(r"shards pretrain/train\s+\d+ samples", res.stdout)
    assert (tmp_path / "w/shards/rec_det/testA/index.json").is_file()
    res = cmal(
        "data",
        "convert",
        "vqa",
        "--features",
        str(tmp_path / "w/features/det.tsv"),
        "--classes",
        str(tmp_path / "w/classes.txt"),
        "--questions",
        str(tmp_path / "w/vqa/v2_OpenEnded_mscoco_val_questions.json"),
        "--out",
        str(tmp_path / "vqa"),
    )
    assert res.returncode == 0, res.stderr
    assert "wrote" in res.stdout and (tmp_path / "vqa/index.json").is_file()


def test_data_convert_bad_input_is_one_line(tmp_path):
    res = cmal("data", "convert", "coco", "--features", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "unknown format 'coco'" in res.stderr
    res = cmal("data", "convert", "vqa", "--features", str(tmp_path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "format vqa needs --questions" in res.stderr
    assert "Traceback" not in res.stderr
