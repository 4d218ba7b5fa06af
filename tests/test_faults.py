"""Faults and odd inputs across every command, one row per case (docs/reliability.md is
the table): each asserts a one-line error naming the input (or a clean run) and that no
earlier output was damaged."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, start_moto, wait_until
from test_engine import finish, launch, logged, losses, write_config

from cmal.cli import run
from cmal.data.anchors import ConceptVocab
from cmal.data.convert import coco
from cmal.data.convert.parts import write_shards
from cmal.data.convert.write import SampleBuilder
from cmal.data.errors import DataError
from cmal.data.features import FeatureSource
from cmal.data.images import read_shard_set
from cmal.data.world import WorldConfig, generate
from cmal.engine.checkpoint import LATEST, newest_complete
from cmal.model.pretrained import load_tokenizer

CAPS = str(ROOT / "tests/fixtures/coco/captions_val2017.json")
TINY = str(ROOT / "configs/model/tiny.yaml")


def digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: "nothing earlier was damaged"."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def one_line(err: str, pattern: str) -> None:
    err = err.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, err), err


# ------------------------------------------------------- commands: arguments and config

ROWS = [
    # (case, argv ({t}: a temp folder; {run}: a finished run folder), exit status, stderr)
    ("unknown command", ["nope"], 2, r"No such command 'nope'"),
    ("unknown option", ["pretrain", "--bogus"], 2, r"No such option: --bogus"),
    ("missing argument", ["data", "convert"], 2, r"Missing argument 'FORMAT'"),
    ("wrong-type option", ["data", "world", "--out", "{t}/w", "--images", "ten"], 2,
     r"'--images'.*integer"),
    ("world below its minimum", ["data", "world", "--out", "{t}/w", "--images", "10"], 2,
     r"'--images'.*greater than or equal to 40"),
    ("config file missing", ["config", "show", "-c", "{t}/none.yaml"], 2,
     r"config file not found: .*none\.yaml"),
    ("config not a mapping", ["config", "show", "-c", "{t}/list.yaml"], 2,
     r"list\.yaml: expected a mapping"),
    ("config value of the wrong type", ["config", "show", "data.batch_size=1.5"], 2,
     r"data\.batch_size: expected int, got 1\.5"),
    ("config value out of range", ["model", "summary", "model.dropout=2"], 2,
     r"command line: model\.dropout: must be in \[0, 1\)"),
    ("config key unknown", ["config", "show", "model.unified.layerz=2"], 2,
     r"unknown key 'model\.unified\.layerz'"),
    ("override without a value", ["config", "show", "model.dropout"], 2,
     r"override 'model\.dropout' must look like key\.path=value"),
    ("empty run name", ["config", "show", "name="], 2, r"name: must be a non-empty name"),
    ("convert: unknown format", ["data", "convert", "coco", "--features", "{t}", "--out",
                                 "{t}/o"], 2, r"unknown format 'coco'"),
    ("convert: file option missing", ["data", "convert", "vqa", "--features", "{t}", "--out",
                                      "{t}/o"], 2, r"format vqa needs --questions"),
    ("convert: features missing", ["data", "convert", "coco-captions", "--captions", CAPS,
                                   "--features", "{t}/none", "--out", "{t}/o"], 2,
     r"region features not found: .*none"),
    ("convert: empty class list", ["data", "convert", "coco-captions", "--captions", CAPS,
                                   "--features", "{t}", "--classes", "{t}/empty.txt", "--out",
                                   "{t}/o"], 2, r"empty\.txt: the class list is empty"),
    ("convert: bad --on-bad-sample", ["data", "convert", "coco-captions", "--captions", CAPS,
                                      "--features", "{t}", "--out", "{t}/o",
                                      "--on-bad-sample", "maybe"], 2,
     r"--on-bad-sample must be error or skip"),
    ("coverage: class list missing", ["data", "coverage", "coco-captions", "--captions", CAPS,
                                      "--classes", "{t}/none.txt"], 2, r"class list not found"),
    ("pretrain: shards missing", ["pretrain", "-c", TINY, "data.remote={t}/none"], 2,
     r"data\.remote: cannot open shards at .*none: no index\.json"),
    ("pretrain: batch size 0", ["pretrain", "-c", TINY, "data.batch_size=0"], 2,
     r"data\.batch_size: must be > 0"),
    ("pretrain: steps not a number", ["pretrain", "-c", TINY, "engine.steps=abc"], 2,
     r"engine\.steps: expected int, got 'abc'"),
    ("finetune: unknown task", ["finetune", "--task", "nope"], 2, r"unknown task 'nope'"),
    ("evaluate: no such run", ["evaluate", "--task", "rec", "--run", "{t}/none"], 2,
     r"none: not a run folder \(no config\.yaml\)"),
    ("export: no checkpoint", ["export", "{t}"], 2, r"no complete checkpoint under"),
    ("run: no such workflow", ["run", "{t}/none.yaml"], 2, r"workflow file not found"),
    ("report: no evaluated run", ["report", "{t}/none"], 2, r"no evaluated runs"),
    ("visualize: no such run", ["visualize", "{t}/none"], 2, r"not a run folder"),
    ("extract: no such image folder", ["extract", "--images", "{t}/none", "--out", "{t}/f"], 2,
     r"--images: .*none is not a folder or an s3:// prefix"),
    ("submit: no such profile", ["submit", "pretrain", "-c", TINY, "--cluster",
                                 "{t}/none.yaml"], 2, r"--cluster .*none\.yaml: no profile"),
    ("status: no such profile", ["status", "x", "--cluster", "{t}/none.yaml"], 2,
     r"no profile"),
]  # fmt: skip


@pytest.mark.parametrize("case, argv, code, pattern", ROWS, ids=[r[0] for r in ROWS])
def test_command_rows(tmp_path, capsys, case, argv, code, pattern):
    (tmp_path / "list.yaml").write_text("- a\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "a.txt").write_text("earlier output")
    before = digest(tmp_path)
    assert run([a.replace("{t}", str(tmp_path)) for a in argv]) == code
    one_line(capsys.readouterr().err, pattern)
    assert digest(tmp_path) == before  # a refused command writes nothing


# ----------------------------------------------------------- tiny and degenerate data


@pytest.mark.parametrize("images, seed", [(40, 0), (42, 3), (64, 3)])
def test_small_worlds_work_down_to_the_minimum(tmp_path, images, seed):
    """64 images with seed 3 once stopped at rec_gt/testB with no sample; 42 with seed 3
    had testB images but no object in them an expression could single out."""
    from cmal.data.convert.world import convert_world

    generate(tmp_path, WorldConfig(images=images, seed=seed, workers=1))
    done = convert_world(tmp_path, tmp_path / "shards", load_tokenizer())
    assert all(d.samples > 0 for d in done.values())


def _npz(folder: Path, key: str, tags: list[str], regions: int | None = None) -> None:
    n = len(tags) if regions is None else regions
    rng = np.random.default_rng(0)
    np.savez(folder / f"{key}.npz", features=rng.normal(size=(n, 8)).astype(np.float32),
             boxes=np.tile([[1.0, 1.0, 9.0, 9.0]], (n, 1)), image_w=10, image_h=10,
             tags=np.array(tags[:n], dtype=str), confidences=np.ones(n))  # fmt: skip


def _convert(tmp_path, annotations: list[dict], on_bad="error", max_text_len=40):
    feats = tmp_path / "f"
    feats.mkdir(parents=True, exist_ok=True)
    _npz(feats, "1", ["dog", "frisbee"])
    _npz(feats, "2", [], regions=0)
    caps = tmp_path / "captions.json"
    caps.write_text(json.dumps({"annotations": annotations}))
    builder = SampleBuilder(FeatureSource(feats), ConceptVocab(["dog", "frisbee"]),
                            load_tokenizer(), max_text_len)  # fmt: skip
    return write_shards(coco.records(caps), builder, tmp_path / "o", "pretrain", on_bad)


def test_degenerate_conversions(tmp_path):
    cap = {"id": 1, "image_id": 1, "caption": "a dog catches a frisbee"}
    # One sample: a clean run.
    assert _convert(tmp_path / "one", [cap]).samples == 1
    # A split with no samples: one line, and no folder (not even a partial one) left.
    with pytest.raises(DataError, match=r"o: no sample was written \(skipped 0\)"):
        _convert(tmp_path / "none", [])
    assert sorted(p.name for p in (tmp_path / "none").iterdir()) == ["captions.json", "f"]
    # A caption with no anchor converts; the coverage says 0%.
    done = _convert(tmp_path / "plain", [{**cap, "caption": "an empty room"}])
    assert done.coverage.summary()["share_with_anchor"] == 0
    # An image with 0 regions: names the sample, or is skipped and counted.
    bad = {"id": 2, "image_id": 2, "caption": "nothing here"}
    with pytest.raises(DataError, match=r"sample 2: image 2: no regions"):
        _convert(tmp_path / "zero", [cap, bad])
    assert _convert(tmp_path / "skip", [cap, bad], on_bad="skip").skipped == 1
    # A text longer than max_text_len is cut to it ([SEP] kept), its late anchors dropped.
    long = {**cap, "caption": "a dog " + "and a very long story " * 20 + "with a frisbee"}
    _convert(tmp_path / "long", [long], max_text_len=12)
    (s,) = read_shard_set(tmp_path / "long" / "o")
    assert len(s["input_ids"]) == 12 and [c for _, _, c in s["anchors"]] == [0]


def test_convert_into_a_folder_with_earlier_output_leaves_it_alone(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "index.json").write_text("{}")
    before = digest(out)
    argv = ["data", "convert", "coco-captions", "--captions", CAPS, "--features",
            str(tmp_path), "--out", str(out)]  # fmt: skip
    assert run(argv) == 2
    one_line(capsys.readouterr().err, r"o: shard folder exists and is not empty")
    assert digest(out) == before


# ------------------------------------------------------------------ checkpoints damaged


@pytest.fixture(scope="module")
def finished_run(world, tmp_path_factory):
    """A 20-step run with checkpoints at 10 and 20 (kept), copied fresh for each test;
    ZeRO-1, so that its checkpoints hold every kind of file (an optimizer file of its own)."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = write_config(tmp, world, name="ckpt", engine={"steps": 20, "zero_stage": 1},
                       checkpoint={"every": 10, "keep": 2})  # fmt: skip
    assert finish(launch(cfg, 1)) == [0]
    return tmp, cfg


def test_a_damaged_latest_is_passed_over_file_by_file(finished_run):
    tmp, _ = finished_run
    ckpts = tmp / "runs/ckpt/checkpoints"
    newest = ckpts / "step_00000020"
    assert (ckpts / LATEST).read_text().strip() == newest.name
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    kinds = {re.sub(r"\d+", "N", f.name) for f in files}
    assert {"state.json", "rng_rankN.pt", "mp_rank_N_model_states.pt"} <= kinds, kinds
    assert any("optim_states" in k for k in kinds), kinds
    for f in files:
        data = f.read_bytes()
        for how in ("truncated", "deleted", "one bit flipped"):
            if how == "truncated":
                f.write_bytes(data[: len(data) // 2])
            elif how == "deleted":
                f.unlink()
            else:
                flip_a_bit(f)
            notes: list[str] = []
            assert newest_complete(ckpts, notes).name == "step_00000010", (f, how)
            assert notes and newest.name in notes[0], notes
            assert f.name in notes[0] or "state.json" in notes[0], notes
            f.write_bytes(data)
    assert newest_complete(ckpts).name == newest.name


def flip_a_bit(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


class _Runs:
    """Unpickles to a call of ``os.system``: what a hostile file in a checkpoint holds."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _copy_run(src: Path, cfg: str, tmp_path: Path) -> tuple[Path, Path]:
    """The finished run copied under ``tmp_path``, with its config pointing there."""
    import shutil

    shutil.copytree(src / "runs", tmp_path / "runs")
    text = Path(cfg).read_text().replace(str(src / "runs"), str(tmp_path / "runs"))
    (tmp_path / "c.yaml").write_text(text)
    return tmp_path / "c.yaml", tmp_path / "runs/ckpt/checkpoints"


def test_a_flipped_bit_is_seen_by_export_and_by_a_named_checkpoint(finished_run, tmp_path, capsys):
    from cmal.engine.checkpoint import consolidated_state_dict
    from cmal.workflow.finetune import pretrained_weights

    src, cfg = finished_run
    _, ckpts = _copy_run(src, cfg, tmp_path)
    flip_a_bit(ckpts / "step_00000020/ds/mp_rank_00_model_states.pt")
    # Export of the run: the newest intact checkpoint, with a warning naming the file.
    assert run(["export", str(tmp_path / "runs/ckpt"), "--out", str(tmp_path / "m.st")]) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: .*step_00000020 is damaged \(ds/mp_rank_00_model_states\.pt "
                     r"does not match its sha256 digest", err), err  # fmt: skip
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "m.st")
    older = consolidated_state_dict(ckpts / "step_00000010")
    assert all(torch.equal(exported[k.removeprefix("model.")], v) for k, v in older.items())
    # The damaged checkpoint named by hand (finetune's task.init_from): one line, refused.
    with pytest.raises(Exception, match=r"step_00000020: damaged checkpoint \(ds/mp_rank_00_"):
        pretrained_weights(ckpts / "step_00000020")


def test_a_hostile_rng_file_runs_nothing(finished_run, tmp_path, capsys):
    """The attack: a pickle that calls os.system, of the RNG file's exact size, dropped into
    the newest checkpoint of a run a user was handed; then the same with state.json
    rewritten to list its size and digest, as a forger would."""
    import pickle

    from cmal.engine import manifest
    from cmal.engine.checkpoint import load_file
    from cmal.workflow.finetune import pretrained_weights

    src, cfg = finished_run
    cfg, ckpts = _copy_run(src, cfg, tmp_path)
    marker = tmp_path / "ran"
    rng = ckpts / "step_00000020/rng_rank00000.pt"
    hostile = pickle.dumps({"torch": _Runs(f"touch {marker}")})
    rng.write_bytes(hostile + b" " * (rng.stat().st_size - len(hostile)))  # same size
    (p,) = launch(str(cfg), 1, "--force")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "step_00000020 is damaged (rng_rank00000.pt does not match its sha256" in err, err
    assert "step_00000010" in err.split("resumed from", 1)[1] and not marker.exists()
    # Forged: the manifest agrees with the hostile file; a torch.save zip naming os.system.
    torch.save({"torch": _Runs(f"touch {marker}")}, rng)
    state_file = ckpts / "step_00000020/state.json"
    state = json.loads(state_file.read_text())
    state["files"]["rng_rank00000.pt"] = manifest.describe(rng.parent, 0)["rng_rank00000.pt"]
    state_file.write_text(json.dumps(manifest.seal(state)))
    with pytest.raises(Exception, match=r"rng_rank00000\.pt names posix\.system, which a "):
        pretrained_weights(ckpts / "step_00000020")
    with pytest.raises(Exception, match=r"rng_rank00000\.pt: not loadable as a checkpoint file"):
        load_file(rng)  # even loaded straight, the weights-only unpickler refuses it
    assert not marker.exists()


def test_resume_uses_the_newest_complete_checkpoint_or_refuses(finished_run, tmp_path):
    import shutil

    src, cfg = finished_run
    shutil.copytree(src / "runs", tmp_path / "runs")
    text = Path(cfg).read_text().replace(str(src / "runs"), str(tmp_path / "runs"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    ckpts = tmp_path / "runs/ckpt/checkpoints"
    model = next((ckpts / "step_00000020").rglob("*model_states.pt"))
    model.write_bytes(model.read_bytes()[:100])
    (p,) = launch(str(cfg), 1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "step_00000020 is damaged (ds/" in err and "resumed from" in err
    assert "step_00000010" in err.split("resumed from", 1)[1]
    # Every checkpoint damaged: one line, exit 2, and nothing deleted or rewritten.
    for step in ckpts.glob("step_*"):
        (step / "state.json").write_text("{")
    before = digest(tmp_path / "runs")
    (p,) = launch(str(cfg), 1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2
    one_line(err.splitlines()[-1], r"no intact checkpoint \(step_\d+ is damaged")
    after = digest(tmp_path / "runs")
    assert {k: v for k, v in after.items() if k in before} == before


# ------------------------------------------------------------------ a rank lost

PEER_TIMEOUT = 20
"""engine.collective_timeout_s of the lost-rank runs (600 by default)."""


def test_a_lost_rank_ends_the_job_in_bounded_time_and_the_resume_is_bitwise(world, tmp_path):
    """Two ranks on gloo, ZeRO-1 (each rank writes its own optimizer file). Rank 1 killed
    inside a collective save, and rank 1 stopped (SIGSTOP) mid-step: rank 0 stops with one
    line, exit 4, in under ``collective_timeout_s`` + start-up slack; the launcher's part
    (torchrun and srun kill the job's other processes) is done by hand; the next run
    resumes from the newest intact checkpoint with the uninterrupted run's losses."""
    from cmal.engine.checkpoint import is_complete

    steps = 16

    def config(leg: str) -> str:
        (tmp_path / leg).mkdir()
        return write_config(tmp_path / leg, world, name="peers",
                            engine={"steps": steps, "zero_stage": 1,
                                    "collective_timeout_s": PEER_TIMEOUT},
                            checkpoint={"every": 4, "keep": 2})  # fmt: skip

    assert finish(launch(config("ref"), 2)) == [0, 0]
    want = losses(tmp_path / "ref/runs/peers")
    for leg in ("killed in a save", "stopped mid-step"):
        cfg, run_dir = config(leg), tmp_path / leg / "runs/peers"
        procs = launch(cfg, 2)
        ckpts = run_dir / "checkpoints"
        deadline = time.time() + 240
        while True:
            assert time.time() < deadline and procs[0].poll() is None, leg
            if leg.startswith("killed") and any(ckpts.glob(".tmp-step_00000008")):
                procs[1].kill()
                break
            if leg.startswith("stopped") and logged(run_dir, 6)():
                procs[1].send_signal(signal.SIGSTOP)
                break
            time.sleep(0.005)
        lost = time.time()
        out, err = procs[0].communicate(timeout=PEER_TIMEOUT + 120)
        waited = time.time() - lost
        procs[1].kill()  # what the launcher does once a task has failed
        procs[1].communicate()
        assert procs[0].returncode == 4, (leg, err)
        one_line(err.strip().splitlines()[-1],
                 r"rank 0: a collective with the other 1 rank\(s\) failed \(.*\); another "
                 r"rank died, hung or was stopped .*run the job again to resume")  # fmt: skip
        assert waited < PEER_TIMEOUT + 30, (leg, waited)
        newest = ckpts / (ckpts / LATEST).read_text().strip()
        assert is_complete(newest) and int(newest.name[5:]) < steps, leg
        assert finish(launch(cfg, 2)) == [0, 0], leg
        assert losses(run_dir) == want, leg  # bitwise, every step


# ------------------------------------------------------------------------- disk full


def mount_tmpfs(folder: Path, size_kb: int) -> None:
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                          str(folder)], capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the disk-full case (needs root): {res.stderr}")


def test_disk_full_during_a_save_keeps_the_last_complete_checkpoint(world, finished_run, tmp_path):
    # A disk with room for one checkpoint and a half: the save at step 10 fits, the one
    # at step 20 (keep=2, so the first stays) runs out of space.
    src, _ = finished_run
    one = sum(f.stat().st_size for f in (src / "runs/ckpt/checkpoints/step_00000010").rglob("*"))
    disk = tmp_path / "disk"
    disk.mkdir()
    mount_tmpfs(disk, int(one * 1.5) // 1024 + 256)
    try:
        cfg = write_config(
            tmp_path,
            world,
            name="full",
            engine={"steps": 20, "zero_stage": 1},  # as finished_run, whose size it uses
            checkpoint={"root": str(disk / "runs"), "every": 10, "keep": 2},
        )
        (p,) = launch(cfg, 1)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 4, err
        one_line(
            err.strip().splitlines()[-1],
            r"checkpoint of step 20 not saved under .*checkpoints: no space left on device, "
            r".*MB free on that disk\); latest is still step_00000010",
        )
        ckpts = disk / "runs/full/checkpoints"
        assert (ckpts / LATEST).read_text().strip() == "step_00000010"
        assert newest_complete(ckpts).name == "step_00000010"
        assert not list(ckpts.glob(".tmp-*"))  # the partial save is gone, its space free
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ------------------------------------------------------------------ the object store


def wait_for_lines(proc, mirror: Path, steps: int, name: str = "paused") -> None:
    """Until the run's log (in its node-local mirror) holds ``steps`` steps."""

    def enough() -> bool:
        logs = list(mirror.glob(f"{name}-*/log.jsonl"))
        return bool(logs) and len(losses(logs[0].parent)) >= steps

    wait_until(enough, 240, f"{steps} steps in the log", [proc])


def test_store_paused_mid_run_then_gone(world, tmp_path):
    """A run folder on a real S3 server (moto): paused (SIGSTOP) between saves and resumed,
    the run finishes with every save on the store; killed, the next save stops the run
    with one line and the store's last checkpoint stays the one before."""
    import boto3

    env = dict(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    os.environ.update(env)
    proc, url = start_moto()
    try:
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="runs")
        cfg = write_config(tmp_path, world, name="paused", data_endpoint=url,
                           engine={"steps": 16},
                           checkpoint={"root": "s3://runs/r", "every": 8, "keep": 2,
                                       "mirror": str(tmp_path / "mirror")})  # fmt: skip
        (p,) = launch(cfg, 1)
        wait_for_lines(p, tmp_path / "mirror", 9)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(3)
        proc.send_signal(signal.SIGCONT)
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        from cmal.engine.store import Store

        store = Store("s3://runs/r/paused", url)
        assert store.newest_checkpoint() == "step_00000016"
        # Gone for good: the save at step 8 of a new run cannot reach it.
        cfg2 = write_config(tmp_path, world, name="gone", data_endpoint=url,
                            engine={"steps": 16},
                            checkpoint={"root": "s3://runs/r", "every": 8,
                                        "mirror": str(tmp_path / "mirror")})  # fmt: skip
        (p,) = launch(cfg2, 1)
        wait_for_lines(p, tmp_path / "mirror", 4, "gone")
        proc.kill()
        proc.wait()
        out, err = p.communicate(timeout=400)
        assert p.returncode == 4, err
        one_line(err.strip().splitlines()[-1],
                 r"checkpoint of step 8 not saved .*s3://runs/r/gone unreachable after \d+ "
                 r"tries.*the store's latest is unchanged")  # fmt: skip
    finally:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- ports and run folders


def test_metrics_port_in_use_is_one_line(finished_run, tmp_path):
    src, cfg = finished_run
    before = digest(src / "runs/ckpt/checkpoints")
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        (p,) = launch(cfg, 1, f"observe.port={port}")
        out, err = p.communicate(timeout=300)
    assert p.returncode == 2
    one_line(err.strip().splitlines()[-1], rf"observe\.port: cannot serve /metrics on "
             rf"127\.0\.0\.1:{port}")  # fmt: skip
    assert digest(src / "runs/ckpt/checkpoints") == before


def test_a_second_pretrain_of_a_training_run_is_refused(world, tmp_path):
    cfg = write_config(tmp_path, world, name="busy", engine={"steps": 400})
    first = launch(cfg, 1)
    run_dir = tmp_path / "runs/busy"
    deadline = time.time() + 240
    while not logged(run_dir, 2)():
        assert time.time() < deadline and first[0].poll() is None
        time.sleep(0.05)
    config_before = (run_dir / "config.yaml").read_bytes()
    (second,) = launch(cfg, 1, "optim.lr=0.5")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 4
    one_line(err.strip().splitlines()[-1],
             r"run folder .*busy is in use by another cmal process \(pid \d+ on ")  # fmt: skip
    assert (run_dir / "config.yaml").read_bytes() == config_before
    first[0].send_signal(signal.SIGUSR2)  # the first one saves and stops as preempted
    assert finish(first) == [75]
