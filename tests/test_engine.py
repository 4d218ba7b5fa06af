"""The DeepSpeed engine on the CPU (gloo): ZeRO stages, exact resume after a signal with 2
ranks, resume on another world size, atomic checkpoints under SIGKILL, config-hash
refusal, non-finite losses, fp32 export."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import torch
from conftest import ROOT, _free_port, wait_until
from zygote import FIXED_ENV
from zygote import shared as shared_zygotes

from cmal.engine.loop import PREEMPTED_EXIT


def write_config(tmp_path, world, name="run", data_endpoint=None, **extra) -> str:
    endpoint = data_endpoint
    engine = {"steps": 40, "log_every": 1, **extra.pop("engine", {})}
    cfg = {
        "base": str(ROOT / "configs/model/tiny.yaml"),
        "name": name,
        "model": {
            "num_concepts": 48,
            "visual": {"feature_dim": 128},
            "max_text_len": 32,
            "max_regions": 8,
        },
        "data": {
            "remote": str(world / "shards/pretrain/train"),
            "batch_size": 8,
            "workers": 1,
            "local": str(tmp_path / f"cache-{name}"),
            **extra.pop("data", {}),
        },
        "optim": {"lr": 1e-3, "warmup_steps": 5},
        "engine": engine,
        "checkpoint": {
            "root": str(tmp_path / "runs"),
            "every": 1000,
            **extra.pop("checkpoint", {}),
        },
        **extra,
    }
    if endpoint:
        cfg["data"]["s3_endpoint"] = endpoint
    path = tmp_path / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def launch(
    config: str,
    ranks: int,
    *args: str,
    command: str = "pretrain",
    entry: str = "-m cmal.cli",
    env: dict[str, str] | None = None,
) -> list[subprocess.Popen]:
    """Start the ranks of `cmal <command>` as a launcher (torchrun, srun) would (``entry``:
    how python starts cmal; ``env``: more environment). Each rank is forked from a
    pre-imported interpreter (tests/zygote.py) unless ``env`` changes what those read at
    import."""
    port = str(_free_port())
    procs = []
    for r in range(ranks):
        rank_env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": str(ranks),
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        argv = [*entry.split(), command, "-c", config, *args]
        fresh = os.environ.get("CMAL_TESTS_FRESH_START") == "1"  # A/B: bench/NOTES.md
        if not fresh and all(rank_env.get(k) == v for k, v in FIXED_ENV.items()):
            procs.append(shared_zygotes().start(r, argv, rank_env, str(ROOT)))
            continue
        procs.append(
            subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def finish(procs, timeout=300) -> list[int]:
    codes = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        codes.append(p.returncode)
        if p.returncode not in (0, PREEMPTED_EXIT):
            # The error first: a report that shows the output's start still shows it (CI
            # cut a failure's stderr after the resolved config it printed).
            print(err[-4000:] if err else err, out, sep="\n")
    return codes


def losses(run, term: str = "loss") -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r[term] for r in rows if term in r}


def logged(run, steps: int) -> Callable[[], bool]:
    """Whether ``run``'s log holds ``steps`` steps yet."""
    return lambda: (run / "log.jsonl").is_file() and len(losses(run)) >= steps


def preempt(procs: list[subprocess.Popen], ready: Callable[[], bool]) -> None:
    """Once ``ready()``, signal every rank (as SLURM does: every task gets the signal) and
    check they saved and asked to be requeued. A rank that ends first fails the test with
    its stderr (a loop without that check hung a suite run for good)."""
    wait_until(ready, 300, "the signal's step", procs)
    for p in procs:
        p.send_signal(signal.SIGUSR2)
    assert finish(procs) == [PREEMPTED_EXIT] * len(procs)


def stop_and_resume(config: str, run, ranks: int, *args: str, command: str = "pretrain") -> int:
    """Start the run, preempt it once 10 steps are logged, start it again to the end;
    returns the step it had stopped at."""
    preempt(launch(config, ranks, *args, command=command), logged(run, 10))
    stopped = max(losses(run))
    assert finish(launch(config, ranks, *args, command=command)) == [0] * ranks
    return stopped


def test_zero_stages_train_and_checkpoint(world, tmp_path):
    variants = [{"zero_stage": s} for s in (0, 1, 2, 3)]
    variants.append({"zero_stage": 2, "offload": True, "grad_accum": 2})
    configs = [write_config(tmp_path, world, name=f"z{k}", engine={"steps": 4, **engine})
               for k, engine in enumerate(variants)]  # fmt: skip
    for pair in (configs[:2], configs[2:4], configs[4:]):  # one run a core
        assert finish([p for cfg in pair for p in launch(cfg, 1)]) == [0] * len(pair)
    for k in range(len(variants)):
        ck = tmp_path / "runs" / f"z{k}" / "checkpoints"
        assert (ck / "latest").read_text().strip() == "step_00000004"
    rows = losses(tmp_path / "runs/z4")
    assert sorted(rows) == [1, 2, 3, 4]


def test_signal_then_resume_gives_bitwise_same_losses_two_ranks(world, tmp_path):
    steps = 40  # 16 steps an epoch: the resumed leg crosses two epoch ends
    ref = write_config(tmp_path, world, name="ref", engine={"steps": steps})
    assert finish(launch(ref, 2)) == [0, 0]
    want = losses(tmp_path / "runs/ref")
    assert len(want) == steps

    cfg = write_config(
        tmp_path,
        world,
        name="ref",
        engine={"steps": steps},
        checkpoint={"root": str(tmp_path / "runs2")},
    )
    assert stop_and_resume(cfg, tmp_path / "runs2/ref", 2) < steps
    got = losses(tmp_path / "runs2/ref")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # bitwise: same floats at every step


def test_bucketed_batches_resume_bitwise_two_ranks(world, tmp_path):
    """data.bucket_pool: a stop inside a pool reads that pool again and skips the batches
    already trained (state.json's "taken"), so the losses are an uninterrupted run's."""
    steps = 40
    kw = {"engine": {"steps": steps}, "data": {"bucket_pool": 4}}
    ref = write_config(tmp_path, world, name="bk", **kw)
    assert finish(launch(ref, 2)) == [0, 0]
    want = losses(tmp_path / "runs/bk")
    cfg = write_config(tmp_path, world, name="bk", checkpoint={"root": str(tmp_path / "r2")}, **kw)
    stopped = stop_and_resume(cfg, tmp_path / "r2/bk", 2)
    state = json.loads((tmp_path / f"r2/bk/checkpoints/step_{stopped:08d}/state.json").read_text())
    assert state["data"]["taken"] == (stopped - 1) % 4 + 1  # of its pool, trained before
    assert losses(tmp_path / "r2/bk") == want


def test_resume_on_another_world_size(world, tmp_path):
    cfg = write_config(tmp_path, world, name="ws", engine={"steps": 60, "zero_stage": 2})
    run = tmp_path / "runs/ws"
    preempt(launch(cfg, 2), logged(run, 30))
    before = losses(run)
    stop = max(before)
    res = launch(cfg, 1)  # 2 ranks -> 1 rank
    assert finish(res) == [0]
    after = losses(run)
    # Medians: about one batch in 25 draws no MLM site at this size, and its loss is ~1/5.
    first = statistics.median(before[s] for s in range(1, 6))
    last_before = statistics.median(before[s] for s in range(stop - 4, stop + 1))
    # The first resumed step's loss is computed with the restored weights, before any
    # update (fresh Adam moments take large first steps, so later steps say less); the
    # first resumed step whose batch had MLM sites, for the same reason as above.
    mlm = losses(run, "mlm")
    resumed = next(after[s] for s in range(stop + 1, stop + 6) if mlm[s] > 0)
    # The run learned (48 anchor concepts: AMC starts at ln 48), and the resumed weights
    # keep most of it: a resume from fresh weights would be back near ``first``.
    learned = first - last_before
    assert learned > 0.1 * first, (first, last_before)
    assert resumed < first - 0.5 * learned, (first, last_before, resumed)
    assert abs(resumed - last_before) < 0.25 * last_before, (last_before, resumed)
    # and back: 1 rank -> 2 ranks, from the end of the 1-rank leg
    cfg2 = write_config(tmp_path, world, name="ws", engine={"steps": 75, "zero_stage": 2})
    assert finish(launch(cfg2, 2, "--force")) == [0, 0]  # steps changed: the schedule did
    final = losses(run)
    again = statistics.median(final[s] for s in range(61, 66))
    assert again < first - 0.5 * learned, (first, learned, again)


def test_sigkill_during_saves_never_leaves_a_bad_latest(world, tmp_path):
    from cmal.engine.checkpoint import LATEST, consolidated_state_dict, is_complete

    cfg = write_config(
        tmp_path, world, name="kill", engine={"steps": 1000, "zero_stage": 1},
        checkpoint={"every": 1, "keep": 2},
    )  # fmt: skip
    ck = tmp_path / "runs/kill/checkpoints"
    pointer = ck / LATEST
    seen = set()
    for delay in (0.0, 0.05, 0.11, 0.17):
        (p,) = launch(cfg, 1)  # resumes from the previous leg's latest
        before = pointer.read_text() if pointer.is_file() else None
        while not pointer.is_file() or pointer.read_text() == before:
            assert p.poll() is None
            time.sleep(0.01)
        time.sleep(delay)  # a save every step: this lands inside one more often than not
        p.kill()
        p.communicate()
        named = ck / pointer.read_text().strip()
        assert is_complete(named)
        consolidated_state_dict(named)  # loads
        seen.add(named.name)
    assert len(seen) == 4  # every leg resumed and went further


def test_changed_config_is_refused_unless_forced(world, tmp_path):
    cfg = write_config(tmp_path, world, name="hash", engine={"steps": 3})
    assert finish(launch(cfg, 1)) == [0]
    (p,) = launch(cfg, 1, "optim.lr=0.5")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "config changed since that checkpoint" in err and "--force" in err
    assert err.strip().splitlines()[-1].startswith("error:")
    (p,) = launch(cfg, 1, "optim.lr=0.5", "--force")
    p.communicate(timeout=120)
    assert p.returncode == 0


def test_nonfinite_loss_stops_naming_step_and_term(world, tmp_path):
    cfg = write_config(
        tmp_path,
        world,
        name="nan",
        engine={"steps": 200},
        optim={"lr": 1.0e4, "warmup_steps": 1},
        checkpoint={"every": 1},
    )
    (p,) = launch(cfg, 1)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 3, err[-2000:]
    assert "non-finite loss (terms:" in err and "the last good checkpoint is kept" in err
    ck = tmp_path / "runs/nan/checkpoints"
    step = int(err.split("error: step ")[1].split(":")[0])
    assert (ck / "latest").read_text().strip() == f"step_{step - 1:08d}"


def test_export_fp32_loads_without_deepspeed(world, tmp_path):
    from safetensors.torch import load_file

    from cmal.config import load_config
    from cmal.model.cmal import CMAL
    from cmal.workflow.pretrain import export_fp32

    cfg = write_config(tmp_path, world, name="exp", engine={"steps": 3, "zero_stage": 3})
    assert finish(launch(cfg, 1)) == [0]
    out = export_fp32(tmp_path / "runs/exp", tmp_path / "m.safetensors")
    weights = load_file(str(out))
    model = CMAL(load_config(cfg).model)
    model.load_state_dict(weights, strict=True)
    assert all(v.dtype == torch.float32 for v in weights.values())
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "export", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2 and "no complete checkpoint" in res.stderr


def test_run_folder_on_s3_resumes_on_a_fresh_node_bitwise(world, s3, tmp_path):
    """checkpoint.root on a real S3 server (moto, loopback): stopped by signal, resumed
    with an empty mirror (another node), the losses are those of an uninterrupted run."""
    import boto3

    from cmal.engine.store import Store

    steps = 24
    ref = write_config(tmp_path, world, name="s3ref", engine={"steps": steps})
    assert finish(launch(ref, 2)) == [0, 0]
    want = losses(tmp_path / "runs/s3ref")

    def s3_config(mirror: str) -> str:
        return write_config(
            tmp_path,
            world,
            name="s3ref",  # the same name, so the same seeds and data order
            engine={"steps": steps},
            checkpoint={"root": "s3://cmal/runs", "every": 5, "keep": 2, "mirror": mirror},
            data_endpoint=s3,
        )

    cfg = s3_config(str(tmp_path / "node-a"))
    store = Store("s3://cmal/runs/s3ref", s3)
    preempt(launch(cfg, 2), lambda: len((store.read_text("log.jsonl") or "").splitlines()) >= 11)
    stopped = store.newest_checkpoint()
    assert stopped is not None and int(stopped.removeprefix("step_")) < steps
    complete = [
        s for s in store.folders("checkpoints") if store.exists(f"checkpoints/{s}/state.json")
    ]
    assert len(complete) <= 2 and complete[-1] == stopped  # keep=2 applied on the store

    # A half-uploaded newer checkpoint (no state.json) is never resumed from.
    client = boto3.client("s3", endpoint_url=s3)
    client.put_object(Bucket="cmal", Key="runs/s3ref/checkpoints/step_00000099/ds/x", Body=b"")
    assert store.newest_checkpoint() == stopped

    cfg = s3_config(str(tmp_path / "node-b"))  # an empty mirror: everything comes from S3
    assert finish(launch(cfg, 2)) == [0, 0]
    rows = map(json.loads, store.read_text("log.jsonl").splitlines())
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert got == want  # the whole log on the store, bitwise the uninterrupted run's
    assert store.newest_checkpoint() == f"step_{steps:08d}"

    # A stale mirror of the same URL (an earlier run of that name on this node) is not
    # trusted: its step folder is replaced by the store's.
    from cmal.engine.store import mirror_of

    tmp = tmp_path / "tmp"
    stale = mirror_of("s3://cmal/runs/s3ref", str(tmp / "cmal-runs")) / "checkpoints"
    (stale / f"step_{steps:08d}").mkdir(parents=True)
    (stale / f"step_{steps:08d}" / "state.json").write_text('{"step": 0}')
    out = tmp_path / "s3.safetensors"
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "export", "s3://cmal/runs/s3ref", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "S3_ENDPOINT_URL": s3, "TMPDIR": str(tmp)},
    )
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    from cmal.config import load_config
    from cmal.model.cmal import CMAL

    CMAL(load_config(cfg).model).load_state_dict(load_file(str(out)), strict=True)

    # A bit flipped in an object on the store: a fresh node's export checks the fetched
    # files against the digests taken at save, passes over that checkpoint and says so.
    newest, key = store.newest_checkpoint(), "ds/mp_rank_00_model_states.pt"
    rel = f"checkpoints/{newest}/{key}"
    data = bytearray(store.read_bytes(rel))
    data[len(data) // 2] ^= 1
    client.put_object(Bucket="cmal", Key=store.key(rel), Body=bytes(data))
    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "export", "s3://cmal/runs/s3ref", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "S3_ENDPOINT_URL": s3, "TMPDIR": str(tmp_path / "tmp2")},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert f"{newest} is damaged ({key} does not match its sha256 digest" in res.stderr
    # Uploads name the digest taken at save, for the store to check what arrives (moto
    # 5.2.5 does not check it; S3 and the stores that follow it do).
    sent = []
    store.client.meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request.headers)
    )
    (tmp_path / "f").write_bytes(b"payload")
    store.upload(tmp_path / "f", "f", hashlib.sha256(b"payload").hexdigest())
    want = base64.b64encode(hashlib.sha256(b"payload").digest()).decode()
    got = sent[-1]["x-amz-checksum-sha256"]
    assert (got.decode() if isinstance(got, bytes) else got) == want

    res = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "pretrain", "-c", cfg, "checkpoint.root=s3://nope/runs"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2, res.stderr
    assert "checkpoint.root: cannot use bucket 'nope'" in res.stderr.splitlines()[-1]


@pytest.mark.slow
def test_losses_fall_on_the_scene_world(world, tmp_path):
    cfg = write_config(tmp_path, world, name="fall", engine={"steps": 150, "log_every": 10})
    assert finish(launch(cfg, 1)) == [0]
    got = losses(tmp_path / "runs/fall")
    assert got[150] < 0.6 * got[10], got


def test_rng_states_load_through_the_weights_only_unpickler_old_and_new(tmp_path):
    """RNG states are saved as tensors and numbers; those saved before (numpy's state as an
    array) still load, through the same unpickler, to the same draws."""
    import random

    import numpy as np

    from cmal.engine.checkpoint import load_file, rng_state, set_rng_state
    from cmal.engine.manifest import unsafe_names

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    old = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
           "python": random.getstate()}  # fmt: skip
    torch.save(old, tmp_path / "old.pt")
    torch.save(rng_state(), tmp_path / "new.pt")
    want = (torch.rand(3), np.random.random(3), random.random())
    for name in ("old.pt", "new.pt"):
        assert unsafe_names(tmp_path / name) == []
        set_rng_state(load_file(tmp_path / name))
        got = (torch.rand(3), np.random.random(3), random.random())
        assert torch.equal(got[0], want[0]) and (got[1] == want[1]).all() and got[2] == want[2]
    assert "numpy" not in str(torch.serialization.get_unsafe_globals_in_checkpoint(
        str(tmp_path / "new.pt")))  # fmt: skip
