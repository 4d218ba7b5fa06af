"""`cmal submit` on a real SLURM (Debian's slurm-wlm: slurmctld and four slurmd on
127.0.0.1, started by cluster/local/start): a 2-node job trains, is preempted by its
signal and requeued by the controller, and ends with the losses of an uninterrupted run;
a job that keeps failing stops after the profile's max requeues with its error shown by
`cmal status`; bad input is refused before anything is submitted."""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, wait_until
from test_engine import finish, launch, losses, write_config


def _free_block(n: int) -> int:
    """A base port with the n ports from it free on 127.0.0.1."""
    for base in range(21000, 40000, 97):
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError("no free block of ports")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The local SLURM cluster, once per session, with its own state folder and ports."""
    if shutil.which("slurmctld") is None:
        pytest.fail("slurm-wlm is not installed: `just services` installs it (apt, as root)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CMAL_SLURM_DIR": str(state), "CMAL_SLURM_PORT": str(_free_block(5))}
    res = subprocess.run(
        [str(ROOT / "cluster/local/start")], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    conf = res.stdout.strip().removeprefix("export SLURM_CONF=")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    yield conf
    subprocess.run([str(ROOT / "cluster/local/stop"), "--clean"], env=env)
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def profile(tmp_path, **extra) -> str:
    prof = {
        "executor": "slurm",
        "partition": "debug",
        "time_min": 10,
        "tasks_per_node": 1,
        "cpus_per_task": 1,
        "signal_delay_s": 30,
        "max_requeues": 3,
        "jobs": str(tmp_path / "jobs"),
        **extra,
    }
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(prof))
    return str(path)


def cmal(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmal.cli", *args], cwd=ROOT, capture_output=True, text=True
    )


def state(job: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job], capture_output=True, text=True
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


wait = functools.partial(wait_until, every=0.5)  # each check asks slurmctld


def logged_steps(run) -> int:
    path = run / "log.jsonl"
    return len(losses(run)) if path.is_file() else 0


def starts(run) -> list[dict]:
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("event") == "start"]


def steps_since_start(run) -> int:
    """How many steps the run's newest start has logged."""
    rows = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    last = max(i for i, r in enumerate(rows) if r.get("event") == "start")
    return sum("loss" in r for r in rows[last:])


def rank_pid(job: str, rank: int) -> int | None:
    """The process of task ``rank`` of SLURM job ``job`` (not its data-loader workers,
    which are its children with its command line and environment)."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"submitit" not in (proc / "cmdline").read_bytes():
                continue
            env = dict(x.split("=", 1) for x in (proc / "environ").read_text().split("\0")
                       if "=" in x)  # fmt: skip
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank):
            found[int(proc.name)] = parent
    mains = [pid for pid, parent in found.items() if parent not in found]
    return mains[0] if len(mains) == 1 else None


PEER_TIMEOUT = 20
"""engine.collective_timeout_s of the 2-node job (600 by default)."""


def test_two_node_job_survives_signal_requeue_and_a_lost_rank_with_the_same_losses(
    world, slurm, tmp_path
):
    """Four interruptions of one 2-node job: the preemption signal, a requeue with no
    warning, rank 1 killed inside a collective save, rank 1 stopped mid-step. Each time
    the job comes back by itself; at the end its losses are the uninterrupted run's."""
    steps = 60
    common = {"engine": {"steps": steps, "collective_timeout_s": PEER_TIMEOUT},
              "checkpoint": {"every": 10}}  # fmt: skip
    ref = write_config(tmp_path, world, name="ref", **common)
    assert finish(launch(ref, 2)) == [0, 0]
    want = losses(tmp_path / "runs/ref")

    cfg = write_config(tmp_path, world, name="ref", **{**common, "checkpoint": {
        "every": 10, "root": str(tmp_path / "slurm-runs")}})  # fmt: skip
    run = tmp_path / "slurm-runs/ref"
    prof = profile(tmp_path, max_requeues=5)
    res = cmal("submit", "pretrain", "-c", cfg, "--nodes", "2", "--cluster", prof)
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(":")[0]

    # 1. Preemption's signal: every rank saves at the next step, rank 0 requeues the job.
    wait(lambda: logged_steps(run) >= 15, 240, "15 steps")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait(lambda: int(state(job).get("Restarts", 0)) >= 1, 120, "the requeue after USR2")
    # 2. A requeue with no warning (as a node failure): back to the last periodic save.
    first = max(losses(run))
    wait(lambda: logged_steps(run) > first + 15, 240, "15 steps after the first requeue")
    subprocess.run(["scontrol", "requeue", job], check=True)
    # 3. Rank 1 killed inside a collective save: rank 0's collective fails at once and
    #    rank 0 requeues the job (a lost rank is a failure the profile's requeues mend).
    wait(lambda: len(starts(run)) >= 3, 240, "the start after the second requeue")
    begun = starts(run)[-1]["step"]
    rank1 = wait(lambda: rank_pid(job, 1), 60, "rank 1's process")
    ckpts = run / "checkpoints"
    saving = lambda: [p for p in ckpts.glob(".tmp-step_*") if int(p.name[10:]) > begun]  # noqa: E731
    wait(saving, 240, "a save after the second requeue", every=0.005)
    os.kill(rank1, signal.SIGKILL)
    wait(lambda: int(state(job).get("Restarts", 0)) >= 3, 60, "the requeue after a lost rank")
    # 4. Rank 1 stopped mid-step: rank 0 gives up after engine.collective_timeout_s.
    wait(lambda: len(starts(run)) >= 4, 240, "the start after the third requeue")
    rank1 = wait(lambda: rank_pid(job, 1), 60, "rank 1's process")
    wait(lambda: steps_since_start(run) >= 2, 240, "2 steps after the third requeue")
    os.kill(rank1, signal.SIGSTOP)
    stopped = time.monotonic()
    wait(
        lambda: int(state(job).get("Restarts", 0)) >= 4,
        PEER_TIMEOUT + 90,
        "a stopped rank's requeue",
    )
    assert time.monotonic() - stopped < PEER_TIMEOUT + 60
    wait(lambda: state(job).get("JobState") in ("COMPLETED", "FAILED"), 400, "the job's end")
    assert state(job)["JobState"] == "COMPLETED", (run / "log.jsonl").read_text()[-2000:]

    began = starts(run)
    assert [r["world_size"] for r in began] == [2] * 5
    assert began[0]["step"] == 0 and began[1]["step"] >= 15
    assert all(r["step"] % 10 == 0 for r in began[2:])
    assert losses(run) == want  # every step, bitwise, as the uninterrupted run
    said = (tmp_path / "jobs/ref" / f"{job}_0_log.err").read_text()
    lost = "a collective with the other 1 rank(s) failed"
    # Rank 0's output of each start (each prints its resolved config first): rank 1 is
    # lost in starts 3 and 4, and rank 0 says so; not in the first (the signal) or the last.
    # Start 2's requeue with no warning kills both ranks KillWait (5 s) after SIGTERM: on a
    # loaded machine rank 1 can go first and rank 0 says it lost it, which is true; seen.
    ran = said.split("# resolved config")[1:]
    assert len(ran) == 5, said[-3000:]
    assert lost not in ran[0] and lost in ran[2] and lost in ran[3] and lost not in ran[4]
    assert "another rank died, hung or was stopped" in ran[3]

    out = cmal("status", "ref", "--cluster", prof).stdout
    row = next(x for x in out.splitlines() if x.startswith(job))
    assert row.split()[2:4] == ["COMPLETED", "4"], out


def test_failing_job_stops_after_max_requeues_with_its_error(world, slurm, tmp_path):
    cfg = write_config(
        tmp_path, world, name="nan", engine={"steps": 200},
        optim={"lr": 1.0e4, "warmup_steps": 1}, checkpoint={"every": 1},
    )  # fmt: skip
    prof = profile(tmp_path, max_requeues=1)
    res = cmal("submit", "pretrain", "-c", cfg, "--cluster", prof)
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(":")[0]
    wait(lambda: state(job).get("JobState") in ("COMPLETED", "FAILED"), 300, "the job's end")
    info = state(job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1"
    out = cmal("status", "nan", "--cluster", prof).stdout
    assert f"{job}" in out and "FAILED" in out
    error = next(x for x in out.splitlines() if x.strip().startswith("error:"))
    assert "non-finite loss" in error, out


def test_bad_input_is_refused_and_nothing_is_submitted(world, slurm, tmp_path):
    cfg = write_config(tmp_path, world, name="bad")
    prof = profile(tmp_path)
    cases = {
        ("--nodes", "0"): "--nodes 0: must be >= 1",
        ("--nodes", "5"): "--nodes 5: partition debug has 4 node(s)",
        ("--gpus-per-node", "1"): "--gpus-per-node 1: partition debug has no GPUs",
        ("--cluster", "partition=gpu"): "partition: 'gpu' does not exist",
        # a node feature no node has: sbatch itself refuses, in its words, on one line
        (
            "--cluster",
            "sbatch=[--constraint=bigmem]",
        ): "refused the job: Batch job submission failed: Invalid feature",
    }
    for args, message in cases.items():
        if args[0] == "--cluster":
            key, value = args[1].split("=", 1)
            args = ("--cluster", profile(tmp_path, **{key: yaml.safe_load(value)}))
        res = cmal("submit", "pretrain", "-c", cfg, "--cluster", prof, *args)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and message in lines[0], res.stderr
        prof = profile(tmp_path)  # a --cluster case rewrote it
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("executor: slurm\npartitoin: debug\n")
    res = cmal("submit", "pretrain", "-c", cfg, "--cluster", str(unknown))
    assert res.returncode == 2 and "unknown key 'partitoin'" in res.stderr
    no_slurm = subprocess.run(
        [sys.executable, "-m", "cmal.cli", "submit", "pretrain", "-c", cfg, "--cluster", prof],
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PATH": os.path.dirname(sys.executable)},
    )  # fmt: skip
    assert no_slurm.returncode == 2 and "sbatch is not on this machine's PATH" in no_slurm.stderr
    assert not list(tmp_path.rglob("jobs.json"))  # no job recorded ...
    queue = subprocess.run(["squeue", "-h", "-n", "cmal-bad"], capture_output=True, text=True)
    assert queue.returncode == 0 and not queue.stdout.strip()  # ... and none queued

    dry = cmal("submit", "pretrain", "-c", cfg, "--cluster", prof, "--nodes", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "#SBATCH --nodes=2" in dry.stdout and "#SBATCH --signal=USR2@30" in dry.stdout
    assert "#SBATCH --requeue" in dry.stdout and "name: bad" in dry.stdout
    assert not list(tmp_path.rglob("jobs.json"))


@pytest.mark.slow  # a world of its own, then a training chain
def test_local_executor_runs_a_chain_on_two_ranks_and_dry_runs_a_workflow(tmp_path):
    """`cmal submit run` with two ranks (local executor): rank 0 alone makes the world and
    keeps the state file, both ranks pre-train, fine-tune and evaluate together; run
    again, every stage is skipped on both."""
    world = tmp_path / "w"
    cfg = yaml.safe_load(Path(write_config(tmp_path, world, name="loc")).read_text())
    cfg["engine"]["steps"] = 4
    cfg["task"] = {"data_root": str(world / "shards")}
    (tmp_path / "loc.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "ft.yaml").write_text(
        yaml.safe_dump({"base": "loc.yaml", "name": "loc-ve", "data": {"local": None}})
    )
    stages = [
        {"name": "w", "kind": "world", "out": str(world), "images": 40, "seed": 3},
        {"name": "pre", "kind": "pretrain", "config": str(tmp_path / "loc.yaml")},
        {"name": "ft", "kind": "finetune", "task": "ve", "config": str(tmp_path / "ft.yaml"),
         "from": "pre"},
        {"name": "ev", "kind": "evaluate", "task": "ve", "run": "ft", "splits": ["dev"]},
    ]  # fmt: skip
    wf = tmp_path / "chain.yaml"
    wf.write_text(
        yaml.safe_dump({"name": "chain", "runs": str(tmp_path / "runs"), "stages": stages})
    )
    local = tmp_path / "local.yaml"
    local.write_text("executor: local\nmax_requeues: 1\n")
    res = cmal("submit", "run", str(wf), "--nodes", "2", "--cluster", str(local))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("[w] world") == 1 and res.stdout.count("# chain: results") == 1
    for run in ("loc", "loc-ve"):
        rows = [
            json.loads(x) for x in (tmp_path / "runs" / run / "log.jsonl").read_text().splitlines()
        ]
        assert [r["world_size"] for r in rows if r.get("event") == "start"] == [2]
        assert max(r["step"] for r in rows) == 4
    done = json.loads((tmp_path / "runs/workflow-chain.json").read_text())
    assert {k: v["status"] for k, v in done.items()} == dict.fromkeys(
        ("w", "pre", "ft", "ev"), "done"
    )
    assert done["ev"]["outputs"]["metrics"]["dev"]["n"] > 0
    again = cmal("submit", "run", str(wf), "--nodes", "2", "--cluster", str(local))
    assert again.returncode == 0 and again.stdout.count("skipped") == 4, again.stderr[-2000:]

    dry = cmal("submit", "run", "workflows/world.yaml", "--cluster", "local", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "cmal run workflows/world.yaml" in dry.stdout and "finetune-rec (finetune)" in dry.stdout


def test_extract_job_splits_images_over_two_nodes(slurm, tmp_path):
    """`cmal submit extract` on the real SLURM: its two ranks write disjoint halves."""
    samples = Path(__import__("skimage.data").data.__file__).parent
    images = tmp_path / "photos"
    images.mkdir()
    for name in ("astronaut.png", "coffee.png", "horse.png"):
        (images / name).write_bytes((samples / name).read_bytes())
    out = tmp_path / "feats"
    res = cmal("submit", "extract", "--images", str(images), "--out", str(out), "--nodes", "2",
               "--cluster", profile(tmp_path))  # fmt: skip
    assert res.returncode == 0, res.stderr
    job = res.stdout.split("submitted job ")[1].split(":")[0]
    wait(lambda: state(job).get("JobState") in ("COMPLETED", "FAILED"), 300, "the job's end")
    assert state(job)["JobState"] == "COMPLETED"
    assert sorted(p.stem for p in out.glob("*.npz")) == ["astronaut", "coffee", "horse"]
    ranks = [json.loads((out / f"_extract/rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["done"] for r in ranks] == [2, 1]


def test_convert_job_array_writes_what_one_process_writes(slurm, tmp_path):
    """`cmal submit convert` on the real SLURM: three array tasks, each a slice of the
    images, merged by the last to finish into the shard set one process writes."""
    from scale_fixtures import write_coco
    from test_scale import same

    from cmal.data.images import read_shard_set

    src = write_coco(tmp_path / "src", 24, dim=64)
    classes = str(ROOT / "tests/fixtures/butd/objects_vocab.txt")
    args = ["karpathy", "--captions", str(src["captions"]), "--features", str(src["features"]),
            "--classes", classes, "--splits", "train"]  # fmt: skip
    assert cmal("data", "convert", *args, "--out", str(tmp_path / "one")).returncode == 0
    prof = profile(tmp_path)
    res = cmal("submit", "convert", *args, "--out", str(tmp_path / "arr"), "--parts", "3",
               "--cluster", prof)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "as an array of 3 tasks" in res.stdout
    job = res.stdout.split("submitted job ")[1].split(":")[0]

    def queued() -> bool:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
        return bool(out.stdout.strip())

    wait(lambda: not queued(), 300, "the array's end")
    assert same(list(read_shard_set(tmp_path / "arr")), list(read_shard_set(tmp_path / "one")))
    assert not list(tmp_path.glob(".arr.parts-*"))
    rows = cmal("status", "convert-arr", "--cluster", prof).stdout.splitlines()[1:]
    assert [r.split()[0] for r in rows] == [f"{job}_{k}" for k in range(3)]
    # A typo in the convert options is refused before anything is submitted.
    bad = cmal("submit", "convert", *args, "--out", str(tmp_path / "x"), "--regionz", "1",
               "--cluster", prof)  # fmt: skip
    assert bad.returncode == 2 and "No such option: --regionz" in bad.stderr
