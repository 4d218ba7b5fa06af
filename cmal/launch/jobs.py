"""Executors for ``cmal submit``: SLURM through submitit, and local processes.

A submission is one job. ``cmal submit run workflows/x.yaml`` runs the whole chain in one
job: the workflow runner skips stages already done and resumes an interrupted one, so a
requeued chain goes on where it stopped, and no dependency chain of jobs can be left
half-cancelled.

Inside a SLURM job every task is one rank: RANK, WORLD_SIZE and LOCAL_RANK come from
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, MASTER_ADDR is the allocation's first node
and MASTER_PORT is derived from the job id (a requeued job keeps its id, so its port).
Before a preemption or the time limit SLURM sends the profile's signal; the engine saves
at the next step boundary on every rank, rank 0 requeues the job (``scontrol requeue``)
and the requeued job finds the newest checkpoint by itself. A job that fails is requeued
the same way, up to ``max_requeues`` (SLURM_RESTART_COUNT) — except for errors in the
config or the data, which no retry mends.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from cmal.config import ClusterConfig, ConfigError, load_profile
from cmal.data.errors import DataError

PROFILES = Path("cluster")
JOBS_FILE = "jobs.json"


def profile_path(name: str | None) -> Path:
    """``--cluster``: a profile name under cluster/ or a path; None: slurm where SLURM's
    sbatch is installed, else local."""
    if name is None:
        name = "slurm" if shutil.which("sbatch") else "local"
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise ConfigError(f"--cluster {name}: no profile {path} (profiles here: {known})")
    return path


@dataclass
class JobSpec:
    """What a job runs: a stage of the CLI, with its config and overrides."""

    kind: str
    """pretrain, finetune, run (a workflow), extract (region features) or convert (a
    public data set into shards, as a job array: ``overrides`` holds the arguments of
    ``cmal data convert``)."""
    name: str
    """The run (or workflow) name: it names the job's folder."""
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    task: str | None = None
    source: str | None = None
    workflow: str | None = None
    detector: str | None = None
    images: str | None = None
    out: str | None = None
    parts: int = 1
    """convert: how many slices of the images (one array task each)."""
    part: int | None = None
    """convert: the slice this task writes."""

    def argv(self) -> list[str]:
        """The same work as a ``cmal`` command line."""
        over = list(self.overrides)
        if self.kind == "convert":
            return ["data", "convert", *over, "--part", f"{self.part}/{self.parts}"]
        if self.kind == "run":
            return ["run", str(self.workflow), *over]
        if self.kind == "extract":
            where = ["--images", str(self.images), "--out", str(self.out)]
            return ["extract", *where, "--detector", str(self.detector), *over]
        args = [self.kind] + (["-c", self.config] if self.config else [])
        if self.kind == "finetune":
            args += ["--task", str(self.task)] + (["--from", self.source] if self.source else [])
        return args + over

    def run(self) -> str:
        """Run it in this process (a conversion task: in a child process of the command
        line, which parses its arguments); returns "done" or "preempted"."""
        if self.kind == "convert":
            return _convert_part(self.argv())
        if self.kind == "run":
            from cmal.workflow.runner import Runner, load_workflow

            return Runner(load_workflow(str(self.workflow), self.overrides)).run()
        if self.kind == "extract":
            from cmal.detect.extract import run_extract

            run_extract(str(self.images), str(self.out), str(self.detector), self.overrides)
            return "done"
        if self.kind == "pretrain":
            from cmal.config import load_config
            from cmal.workflow.pretrain import pretrain

            return pretrain(load_config(self.config, self.overrides)).status
        from cmal.workflow.finetune import finetune, finetune_config

        cfg = finetune_config(str(self.task), self.source, self.config, self.overrides)
        return finetune(cfg)[0].status


def _convert_part(argv: list[str]) -> str:
    """``cmal data convert … --part k/n``; its one-line error raised as a DataError (bad
    input: no requeue mends it), any other failure as a RuntimeError (requeued)."""
    res = subprocess.run([sys.executable, "-m", "cmal.cli", *argv], stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    sys.stderr.write(res.stderr)
    if res.returncode == 0:
        return "done"
    last = ([x for x in res.stderr.splitlines() if x.strip()] or ["(no output)"])[-1]
    if res.returncode == 2:
        raise DataError(last.removeprefix("error: "))
    raise RuntimeError(f"cmal {' '.join(argv[:3])} exited with {res.returncode}: {last}")


def set_rank_env() -> None:
    """torch.distributed's variables from SLURM's, for this task of the job."""
    env = os.environ
    if "SLURM_PROCID" not in env or "SLURM_JOB_ID" not in env:
        return
    from submitit import JobEnvironment

    nodes = JobEnvironment().hostnames
    per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0].split(",")[0])
    rank, local, size = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"]), per_node
    # Local ranks count processes per machine: shared memory (the streaming loader's), the
    # GPU index and the checkpoint mirror are per machine. Several SLURM nodes may be one
    # machine (multiple slurmd, as cluster/local runs): then they share one numbering.
    machines = _machines(nodes)
    node = int(env.get("SLURM_NODEID", rank // per_node))
    if machines and rank // per_node == node:
        mine = [i for i, m in enumerate(machines) if m == machines[node]]
        size = per_node * len(mine)
        local = mine.index(node) * per_node + local
    if "SLURM_CPUS_PER_TASK" in env and "OMP_NUM_THREADS" not in env:
        # As torchrun does: a rank's threads are the CPUs SLURM gave its task.
        import torch

        env["OMP_NUM_THREADS"] = env["SLURM_CPUS_PER_TASK"]
        torch.set_num_threads(int(env["SLURM_CPUS_PER_TASK"]))
    env.update(
        RANK=str(rank),
        WORLD_SIZE=env["SLURM_NTASKS"],
        LOCAL_RANK=str(local),
        LOCAL_WORLD_SIZE=str(size),
        MASTER_ADDR=nodes[0],
        MASTER_PORT=str(20000 + int(env["SLURM_JOB_ID"]) % 20000),
    )


def _machines(nodes: list[str]) -> list[str] | None:
    """The machine (NodeHostName) of each node of the job, in order; None if unknown."""
    res = _slurm("scontrol", "show", "node", "-o", ",".join(nodes))
    host = {}
    for line in res.stdout.splitlines():
        kv = dict(x.split("=", 1) for x in line.split() if "=" in x)
        host[kv.get("NodeName")] = kv.get("NodeHostName")
    if res.returncode != 0 or any(host.get(n) is None for n in nodes):
        return None
    return [host[n] for n in nodes]


class StageJob:
    """The callable submitit pickles and runs on every task of the job."""

    def __init__(self, spec: JobSpec, max_requeues: int, cwd: str):
        self.spec, self.max_requeues, self.cwd = spec, max_requeues, cwd

    def __call__(self, part: int | None = None) -> str:
        from cmal.engine.loop import PREEMPTED_EXIT

        os.chdir(self.cwd)
        set_rank_env()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", 0))
        spec = self.spec if part is None else replace(self.spec, part=part)
        try:
            status = spec.run()
        except (ConfigError, DataError):
            raise  # the same input fails the same way: no requeue
        except Exception as e:
            if restarts >= self.max_requeues:
                raise
            print(f"cmal: the job failed ({type(e).__name__}: {e}); requeued", file=sys.stderr)
            self._requeue()
            sys.exit(PREEMPTED_EXIT)
        if status == "preempted":
            if restarts >= self.max_requeues:
                raise RuntimeError(
                    f"stopped by signal after {restarts} requeues (max_requeues="
                    f"{self.max_requeues}); its checkpoint is saved: submit it again to go on"
                )
            self._requeue()
            sys.exit(PREEMPTED_EXIT)
        return status

    @staticmethod
    def _requeue() -> None:
        if os.environ.get("SLURM_PROCID", "0") != "0":
            return
        job = os.environ["SLURM_JOB_ID"]
        res = _slurm("scontrol", "requeue", job)
        if res.returncode != 0:  # e.g. SLURM requeues it already (preemption)
            print(f"cmal: scontrol requeue {job}: {res.stderr.strip()}", file=sys.stderr)

    def checkpoint(self, *args, **kwargs):
        """submitit's requeue hook (a signal outside the training loop): the requeued job
        resumes from the newest checkpoint on its own."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


# --------------------------------------------------------------------------- SLURM


def jobs_folder(prof: ClusterConfig, name: str) -> Path:
    """Where a run's job scripts, logs and job record live (absolute: nodes read it)."""
    return Path(prof.jobs).resolve() / name


def _sbatch_options(lines: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for line in lines:
        key, sep, value = line[2:].partition("=")
        out[key.replace("-", "_")] = value if sep else True
    return out


def sbatch_parameters(prof: ClusterConfig, spec: JobSpec) -> dict[str, object]:
    tasks = prof.tasks_per_node or max(prof.gpus_per_node, 1)
    if spec.kind == "convert":  # an array: each task one process on one node, no GPU
        prof = replace(prof, nodes=1, gpus_per_node=0)
        tasks = 1
    params: dict[str, object] = {
        "job_name": f"cmal-{spec.name}",
        "nodes": prof.nodes,
        "ntasks_per_node": tasks,
        "time": prof.time_min,
        "signal_delay_s": prof.signal_delay_s,
        "additional_parameters": {
            "requeue": True,
            "signal": f"{prof.signal}@{prof.signal_delay_s}",
            **_sbatch_options(prof.sbatch),
        },
    }
    optional = {
        "partition": prof.partition,
        "account": prof.account,
        "qos": prof.qos,
        "cpus_per_task": prof.cpus_per_task,
        "gpus_per_node": prof.gpus_per_node or None,
        "mem": f"{prof.mem_gb}GB" if prof.mem_gb else None,
        "setup": prof.setup or None,
        "array_parallelism": spec.parts if spec.kind == "convert" else None,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    return params


def _slurm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True)


def check_slurm(prof: ClusterConfig, where: str) -> None:
    """SLURM's commands are here, its controller answers and the partition exists."""
    if shutil.which("sbatch") is None:
        raise ConfigError(f"{where}: needs SLURM, but sbatch is not on this machine's PATH")
    res = _slurm("sinfo", "-h", "-o", "%P")
    if res.returncode != 0:
        first = (res.stderr.strip().splitlines() or ["no answer"])[-1]
        raise ConfigError(f"{where}: SLURM's controller does not answer ({first})")
    partitions = {p.rstrip("*") for p in res.stdout.split()}
    if prof.partition and prof.partition not in partitions:
        raise ConfigError(
            f"{where}: partition: {prof.partition!r} does not exist "
            f"(this cluster has: {', '.join(sorted(partitions))})"
        )
    part = ["-p", prof.partition] if prof.partition else []
    res = _slurm("sinfo", "-h", *part, "-o", "%D")
    have = sum(int(x) for x in res.stdout.split() if x.isdigit())
    if res.returncode == 0 and have and prof.nodes > have:
        raise ConfigError(
            f"{where}: --nodes {prof.nodes}: partition "
            f"{prof.partition or '(default)'} has {have} node(s)"
        )
    if prof.gpus_per_node:
        gres = _slurm("sinfo", "-h", *part, "-o", "%G").stdout
        if "gpu" not in gres:
            raise ConfigError(
                f"{where}: --gpus-per-node {prof.gpus_per_node}: partition "
                f"{prof.partition or '(default)'} has no GPUs"
            )


@contextlib.contextmanager
def _stderr_to(file) -> Iterator[None]:
    """Send this process's fd 2 (where sbatch, run by submitit, writes) to ``file``."""
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(file.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def sbatch_script(prof: ClusterConfig, spec: JobSpec) -> str:
    """The script ``sbatch`` would get (no submission)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = jobs_folder(prof, spec.name)
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(folder))])  # fmt: skip
    params = {k: v for k, v in sbatch_parameters(prof, spec).items() if k != "array_parallelism"}
    if spec.kind == "convert":
        params["array"] = f"0-{spec.parts - 1}%{spec.parts}"
    return _make_sbatch_string(command=command, folder=folder, **params)


def submit_slurm(prof: ClusterConfig, spec: JobSpec, where: str) -> str:
    """Submit through submitit; returns the job id and records it for status/cancel."""
    check_slurm(prof, where)
    os.environ["SUBMITIT_PREEMPT_SIGNAL"] = prof.signal
    import submitit

    folder = jobs_folder(prof, spec.name)
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=prof.max_requeues)
    executor.update_parameters(**sbatch_parameters(prof, spec))
    stage = StageJob(spec, prof.max_requeues, os.getcwd())
    with tempfile.TemporaryFile() as said:
        try:
            with _stderr_to(said):
                if spec.kind == "convert":
                    jobs = executor.map_array(stage, list(range(spec.parts)))
                else:
                    jobs = [executor.submit(stage)]
        except Exception as e:  # sbatch refused it: in its own words, on one line
            said.seek(0)
            text = said.read().decode(errors="replace") + "\n" + str(e)
            lines = [x for x in text.splitlines() if "error" in x.lower()] or [str(e)]
            why = lines[0].strip().removeprefix("sbatch: error: ")
            raise ConfigError(f"{where}: sbatch refused the job: {why}") from None
        said.seek(0)
        sys.stderr.write(said.read().decode(errors="replace"))
    records = [{"job_id": job.job_id, "submitted": time.time(), "spec": asdict(spec),
                "nodes": prof.nodes, "profile": asdict(prof)} for job in jobs]  # fmt: skip
    path = folder / JOBS_FILE
    earlier = json.loads(path.read_text()) if path.is_file() else []
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([*earlier, *records], indent=1))
    tmp.replace(path)
    return jobs[0].job_id.split("_")[0] if spec.kind == "convert" else jobs[0].job_id


def _scontrol_job(job_id: str) -> dict[str, str] | None:
    res = _slurm("scontrol", "show", "job", "-o", job_id)
    if res.returncode != 0 or "JobId=" not in res.stdout:
        return None
    return dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)


def _job_error(folder: Path, job_id: str) -> str | None:
    """The exception's own line from the job's result file, else the log's last line."""
    import pickle

    result = folder / f"{job_id}_0_result.pkl"
    if result.is_file():
        kind, value = pickle.loads(result.read_bytes())
        if kind == "error":
            return [x for x in str(value).strip().splitlines() if x.strip()][-1]
        return None
    err = folder / f"{job_id}_0_log.err"
    if err.is_file():
        lines = [x for x in err.read_text().splitlines() if x.strip() and "submitit" not in x]
        return lines[-1] if lines else None
    return None


def job_status(prof: ClusterConfig, name: str) -> list[dict]:
    """Every job submitted for run ``name``: id, state, restarts, nodes and its error."""
    folder = jobs_folder(prof, name)
    path = folder / JOBS_FILE
    if not path.is_file():
        raise ConfigError(f"{name}: no jobs submitted for this run (no {path})")
    out = []
    for rec in json.loads(path.read_text()):
        job_id = rec["job_id"]
        info = _scontrol_job(job_id) if shutil.which("scontrol") else None
        error = _job_error(folder, job_id)
        if info is not None:
            state, restarts = info.get("JobState", "?"), int(info.get("Restarts", 0))
            nodes, reason = info.get("NodeList", ""), info.get("Reason", "")
        else:  # no longer known to the controller: what the job left behind
            state = "FAILED" if error else "COMPLETED" if (
                folder / f"{job_id}_0_result.pkl").is_file() else "UNKNOWN"  # fmt: skip
            restarts, nodes, reason = -1, "", ""
        out.append({"job_id": job_id, "kind": rec["spec"]["kind"], "state": state,
                    "restarts": restarts, "nodes": nodes, "reason": reason,
                    "error": error if state not in ("COMPLETED", "RUNNING") else None})  # fmt: skip
    return out


def cancel(prof: ClusterConfig, name: str) -> list[str]:
    """scancel the run's jobs that have not ended; returns their ids."""
    ended = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "UNKNOWN", "OUT_OF_MEMORY"}
    live = [j["job_id"] for j in job_status(prof, name) if j["state"] not in ended]
    if live:
        res = _slurm("scancel", *live)
        if res.returncode != 0:
            raise ConfigError(f"scancel {' '.join(live)}: {res.stderr.strip()}")
    return live


# --------------------------------------------------------------------------- local


def run_local(prof: ClusterConfig, spec: JobSpec) -> int:
    """The job's ranks as processes here; started again (resuming) after a save on signal,
    up to ``max_requeues`` times. Returns the exit status."""
    from cmal.engine.deepspeed import _free_port
    from cmal.engine.loop import PREEMPTED_EXIT

    if spec.kind == "convert":  # the array's tasks side by side; the last one merges
        argvs = [replace(spec, part=k).argv() for k in range(spec.parts)]
        procs = [subprocess.Popen([sys.executable, "-m", "cmal.cli", *a]) for a in argvs]
        codes = [p.wait() for p in procs]
        return next((c for c in codes if c != 0), 0)
    ranks = prof.nodes * (prof.tasks_per_node or max(prof.gpus_per_node, 1))
    for attempt in range(prof.max_requeues + 1):
        port = str(_free_port())
        procs = []
        for r in range(ranks):
            env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(r),
                   "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port}  # fmt: skip
            cmd = [sys.executable, "-m", "cmal.cli", *spec.argv()]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if all(c == 0 for c in codes):
            return 0
        if PREEMPTED_EXIT not in codes or attempt == prof.max_requeues:
            return next(c for c in codes if c != 0)
    return PREEMPTED_EXIT


def load(cluster: str | None, nodes: int | None = None, gpus: int | None = None):
    """The profile ``--cluster`` names, with ``--nodes`` / ``--gpus-per-node`` applied."""
    path = profile_path(cluster)
    over = [f"nodes={nodes}"] if nodes is not None else []
    over += [f"gpus_per_node={gpus}"] if gpus is not None else []
    if nodes is not None and nodes < 1:
        raise ConfigError(f"--nodes {nodes}: must be >= 1")
    return path, load_profile(path, over)


def submit(
    spec: JobSpec,
    cluster: str | None,
    nodes: int | None,
    gpus: int | None,
    dry_run: bool,
    shown: str,
    echo: Callable[[str], Any],
) -> int:
    """Run ``spec`` where the profile ``cluster`` says: as a SLURM job (submitted, not waited
    for) or as local processes (waited for). ``dry_run``: echo the job script, or the
    command line, and ``shown`` (the resolved config), and run nothing. Returns the exit
    status (a local run's; 0 for a submitted job)."""
    path, prof = load(cluster, nodes, gpus)
    if prof.executor == "slurm" and spec.kind not in ("extract", "convert"):  # no steps
        spec.overrides = [*spec.overrides, f"checkpoint.signal=SIG{prof.signal}"]
    if dry_run:
        echo(f"# profile {path}: {prof.executor}, {prof.nodes} node(s)")
        if prof.executor == "slurm":
            echo(sbatch_script(prof, spec))
        else:
            echo("cmal " + " ".join(spec.argv()))
        echo(shown)
        return 0
    if prof.executor == "local":
        return run_local(prof, spec)
    job = submit_slurm(prof, spec, f"--cluster {path}")
    if spec.kind == "convert":
        echo(f"submitted job {job}: {spec.kind} {spec.name} as an array of {spec.parts} tasks")
    else:
        echo(f"submitted job {job}: {spec.kind} {spec.name} on {prof.nodes} node(s)")
    echo(f"  cmal status {spec.name}   # logs: {Path(prof.jobs) / spec.name}")
    return 0
