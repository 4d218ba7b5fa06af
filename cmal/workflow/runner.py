"""``cmal run workflows/<chain>.yaml``: a chain of stages (world → pretrain → finetune →
evaluate), each recording its inputs, config hash and outputs in
``<runs>/workflow-<name>.json``.

A stage already done with the same hash is skipped; an interrupted one resumes from its
run's newest checkpoint (the run does that by itself); a failed one stops the chain with
the stage's name and its error. A pre-training or fine-tuning stage also records the
world(s) it was trained on: when its config, its upstream or a world stage before it has
changed since, it trains afresh, and its old run folder is kept beside as
``<run>.stale-<n>`` (never deleted). Stage kinds and their fields:

- ``world``: ``out``, ``images``, ``seed``, ``attribute_tags`` (default true: regions
  tagged "<colour> <shape>"), ``noise`` (the simulated detector's tag noise, fields of
  ``cmal.data.scene.NoiseConfig``; its defaults when absent) — the scene world and its
  shards.
- ``pretrain``: ``config``, ``overrides``.
- ``finetune``: ``task``, ``config``, ``from`` (a stage name, a path, or ``none`` for the
  untrained baseline), ``overrides``.
- ``evaluate``: ``task``, ``run`` (a finetune stage's name; a pretrain stage's for a
  task evaluated zero-shot, retrieval), ``splits``.

Top-level ``overrides`` apply to every config stage (before its own).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from cmal.config import Config, ConfigError, config_hash, load_config

KINDS = {
    "world": {"name", "kind", "out", "images", "seed", "attribute_tags", "noise"},
    "pretrain": {"name", "kind", "config", "overrides"},
    "finetune": {"name", "kind", "task", "config", "from", "overrides"},
    "evaluate": {"name", "kind", "task", "run", "splits"},
}


class StageFailed(RuntimeError):
    """A stage failed; the message names it."""


@dataclass
class Workflow:
    """A parsed workflow file."""

    name: str
    path: Path
    stages: list[dict[str, Any]]
    overrides: list[str] = field(default_factory=list)
    runs_root: str = "runs"


def load_workflow(
    path: str | Path,
    extra: list[str] | None = None,
    quick: bool = False,
    arms: list[str] | None = None,
    seeds: list[int] | None = None,
) -> Workflow:
    """Parse and check a workflow file (errors name the file, the stage and the field);
    a ``study:`` is expanded into its stages (``quick``: its reduced variant)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"workflow file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and "study" in data and "stages" not in data:
        from cmal.workflow.study import expand

        name = data.get("name") or path.stem
        data["stages"] = expand(name, data.pop("study"), path, quick, arms, seeds)
    elif quick or arms or seeds is not None:
        raise ConfigError(f"{path}: --quick/--arms/--seeds apply to a study; this has none")
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise ConfigError(f"{path}: expected a mapping with a 'stages' list (or a 'study')")
    unknown = set(data) - {"name", "stages", "overrides", "runs"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    names: set[str] = set()
    for k, st in enumerate(data["stages"]):
        where = f"{path}: stages[{k}]"
        if not isinstance(st, dict) or st.get("kind") not in KINDS:
            raise ConfigError(f"{where}: 'kind' must be one of {', '.join(KINDS)}")
        bad = set(st) - KINDS[st["kind"]]
        if bad:
            raise ConfigError(f"{where}: unknown key(s) {sorted(bad)} for a {st['kind']} stage")
        if not st.get("name") or st["name"] in names:
            raise ConfigError(f"{where}: every stage needs a unique 'name'")
        if st["kind"] == "world" and "noise" in st:
            _noise(st["noise"], f"{where}: noise")
        if st["kind"] == "evaluate" and st.get("run") not in names:
            raise ConfigError(f"{where}: run: {st.get('run')!r} is not an earlier stage")
        source = st.get("from")
        if (
            st["kind"] == "finetune"
            and source not in (None, "none", *names)
            and not Path(source).exists()
        ):
            raise ConfigError(f"{where}: from: {source!r} is neither an earlier stage nor a path")
        for key in ("task",) if st["kind"] in ("finetune", "evaluate") else ():
            if key not in st:
                raise ConfigError(f"{where}: a {st['kind']} stage needs '{key}'")
        names.add(st["name"])
    return Workflow(
        name=data.get("name") or path.stem,
        path=path,
        stages=data["stages"],
        overrides=[*(data.get("overrides") or []), *(extra or [])],
        runs_root=data.get("runs", "runs"),
    )


def _noise(value: Any, where: str):
    """A world stage's ``noise`` mapping as a NoiseConfig (errors name the field)."""
    from dataclasses import fields

    from cmal.data.scene import NoiseConfig

    known = {f.name for f in fields(NoiseConfig)}
    if not isinstance(value, dict) or set(value) - known:
        raise ConfigError(f"{where}: expected a mapping of {sorted(known)}")
    for key, v in value.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ConfigError(f"{where}: {key}: expected a number >= 0, got {v!r}")
        if key != "jitter" and v > 1:
            raise ConfigError(f"{where}: {key}: a probability, got {v!r}")
    return NoiseConfig(**{k: float(v) for k, v in value.items()})


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Runner:
    """Runs a workflow's stages in order, keeping the state file up to date."""

    def __init__(self, wf: Workflow, echo=print):
        from cmal.workflow.ranks import Ranks

        self.ranks = Ranks()
        self.wf = wf
        self.echo = echo if self.ranks.main else lambda *_, **__: None
        self.state_path = Path(wf.runs_root) / f"workflow-{wf.name}.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        )
        self.outputs: dict[str, dict[str, Any]] = {}
        self.hashes: dict[str, str] = {}
        self.configs: dict[str, Config] = {}
        self.worlds: list[str] = []
        """Hashes of the world stages so far: the data every later training stage reads."""
        self.remade = False
        """Whether a world stage ran (not skipped) in this invocation."""
        self.ran: set[str] = set()
        """The stages this runner has run (its records are the ones it writes)."""

    def _save(self) -> None:
        """Write the records of the stages this runner ran into the state file, over what
        is there now: several runners of one study (``--arms``/``--seeds`` parts, each
        with its own ``TMPDIR`` for streaming's caches) share the file without losing
        each other's records. Rank 0 alone writes it."""
        if not self.ranks.main:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            on_disk = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
            self.state = {**on_disk, **{k: self.state[k] for k in self.ran}}
            tmp = self.state_path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(self.state, indent=1))
            tmp.replace(self.state_path)

    def config(self, st: dict[str, Any], extra: list[str]) -> Config:
        return load_config(st["config"], [*self.wf.overrides, *(st.get("overrides") or []), *extra])

    def plan(self, st: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The stage's hash (its config and its inputs' hashes) and its inputs."""
        kind = st["kind"]
        if kind == "world":
            from cmal.data.world import VERSION, WorldConfig

            defaults = WorldConfig()  # a stage without images/seed gets the command's
            inputs = {
                "out": st.get("out"),
                "images": st.get("images", defaults.images),
                "seed": st.get("seed", defaults.seed),
            }
            inputs["attribute_tags"] = bool(st.get("attribute_tags", True))
            if "noise" in st:  # absent: the hash of a world made before noise was a field
                inputs["noise"] = st["noise"]
            inputs["version"] = VERSION  # a new generator makes a new world
            return _digest(inputs), inputs
        if kind == "pretrain":
            cfg = self.configs[st["name"]] = self.config(st, [])
            return _digest([config_hash(cfg)]), {"config": st["config"], "run": str(_run(cfg))}
        if kind == "finetune":
            source = st.get("from")
            init = (
                None
                if source in (None, "none")
                else self.outputs.get(source, {}).get("run", source)
            )
            extra = [
                f"task.name={st['task']}",
                f"task.init_from={init}" if init else "task.init_from=null",
            ]
            cfg = self.configs[st["name"]] = self.config(st, extra)
            upstream = self.hashes.get(source, str(source))
            return _digest([config_hash(cfg), upstream]), {
                "config": st["config"],
                "from": init,
                "run": str(_run(cfg)),
            }
        run = self.outputs[st["run"]]["run"]
        inputs = {"run": run, "task": st["task"], "splits": st.get("splits")}
        return _digest([self.hashes[st["run"]], inputs]), inputs

    def run(self) -> str:
        """Run every stage; returns "done" or "preempted"."""
        for st in self.wf.stages:
            name = st["name"]
            trains = st["kind"] in ("pretrain", "finetune")
            try:
                digest, inputs = self.plan(st)
                self.hashes[name] = digest
                if st["kind"] == "world":
                    self.worlds.append(digest)
                done, stale = self.ranks.share(partial(self._before, name, trains), self._engine)
            except Exception as e:
                raise StageFailed(f"stage {name!r} failed: {e}") from e
            if done is not None:
                self.echo(f"[{name}] done before with the same inputs: skipped")
                self.outputs[name] = done
                continue
            self.echo(f"[{name}] {st['kind']} …")
            self.state[name] = {
                "status": "running",
                "hash": digest,
                "inputs": inputs,
                "started": time.time(),
            }
            if trains:
                self.state[name]["worlds"] = list(self.worlds)
            self.ran.add(name)
            self._save()
            try:
                if stale:
                    self._set_aside(name, Path(inputs["run"]))
                if st["kind"] == "world":  # rank 0 makes it; the others read it after
                    make = partial(self.execute, st, inputs)
                    status, outputs = self.ranks.share(make, self._engine)
                else:  # collective: every rank
                    status, outputs = self.execute(st, inputs)
            except Exception as e:
                self.state[name].update(status="failed", error=f"{type(e).__name__}: {e}")
                self._save()
                raise StageFailed(f"stage {name!r} failed: {e}") from e
            self.outputs[name] = outputs
            self.state[name].update(status=status, outputs=outputs, finished=time.time())
            self._save()
            self.remade = self.remade or st["kind"] == "world"
            if status != "done":
                self.echo(f"[{name}] {status}; run the workflow again to resume")
                return status
        self.echo(self.summary())
        return "done"

    def _before(self, name: str, trains: bool) -> tuple[dict[str, Any] | None, bool]:
        """What the state file says of a stage (rank 0 reads it for the job): its outputs
        when done before with the same inputs, else None; and whether its run folder was
        trained on other inputs than now."""
        rec = self.state.get(name, {})
        same = rec.get("hash") == self.hashes[name] and not (trains and self._other_world(rec))
        if rec.get("status") == "done" and same and _present(rec):
            return rec.get("outputs", {}), False
        return None, trains and bool(rec) and not same

    def _engine(self) -> Config:
        """The config that starts a job's process group: the first training stage's (its
        engine section picks the backend the training stages then use)."""
        for st in self.wf.stages:
            if st["kind"] == "pretrain":
                return self.config(st, [])
            if st["kind"] == "finetune":
                return self.config(st, [f"task.name={st['task']}"])
        return Config()

    def _other_world(self, rec: dict[str, Any]) -> bool:
        """Whether a training stage's record was trained on other world data than now (a
        record from before worlds were recorded: when a world was made in this run)."""
        if "worlds" in rec:
            return rec["worlds"] != self.worlds
        return self.remade

    def _set_aside(self, name: str, run: Path) -> None:
        """Move a run folder trained on other inputs out of the way (resuming it would
        continue, or skip as finished, a training on the old ones)."""
        from cmal.workflow.pretrain import run_store, run_url

        cfg = self.configs[name]
        store = run_store(cfg)
        if store is not None and store.newest_checkpoint() is not None:
            raise ConfigError(
                f"{run_url(cfg)} was trained on other inputs than this stage's now; "
                "delete it or give the run another name"
            )
        # One rank moves it. The others touch the folder only after the stage's first
        # collective (engine setup, task info), which rank 0 joins after the move.
        if not self.ranks.main or not run.exists():
            return
        n = 1
        while run.with_name(f"{run.name}.stale-{n}").exists():
            n += 1
        aside = run.with_name(f"{run.name}.stale-{n}")
        run.rename(aside)
        self.echo(f"[{name}] {run} was trained on other inputs: kept as {aside}, training afresh")

    def summary(self) -> str:
        """Every evaluate stage's metrics, one line per evaluated split."""
        from cmal.tasks import beside_accuracy, headline

        lines = [f"\n# {self.wf.name}: results"]
        for st in self.wf.stages:
            if st["kind"] == "evaluate":
                for label, m in self.outputs.get(st["name"], {}).get("metrics", {}).items():
                    (name, value), n = headline(m), int(m["n"])
                    more = "".join(f"  {k} {100 * v:6.2f}%" for k, v in beside_accuracy(m).items())
                    lines.append(f"{st['task']:<6} {label:<10} {name.replace('_', ' ')} "
                                 f"{100 * value:6.2f}%{more}  (n={n})")  # fmt: skip
        return "\n".join(lines)

    def execute(self, st: dict[str, Any], inputs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        kind = st["kind"]
        if kind == "world":
            from cmal.data.convert.world import convert_world
            from cmal.data.world import WorldConfig, generate
            from cmal.model.pretrained import load_tokenizer

            out = Path(inputs["out"])
            noise = _noise(inputs.get("noise", {}), "noise")
            generate(
                out,
                WorldConfig(images=int(inputs["images"]), seed=int(inputs["seed"]), noise=noise),
            )
            import shutil

            shutil.rmtree(out / "shards", ignore_errors=True)
            convert_world(
                out, out / "shards", load_tokenizer(), attribute_tags=inputs["attribute_tags"]
            )
            return "done", {"world": str(out), "shards": str(out / "shards")}
        if kind == "pretrain":
            from cmal.workflow.pretrain import pretrain

            cfg = self.config(st, [])
            outcome = pretrain(cfg, quiet=True)
            return outcome.status, {
                "run": inputs["run"],
                "step": outcome.step,
                "losses": outcome.losses,
            }
        if kind == "finetune":
            from cmal.workflow.finetune import finetune

            init = inputs["from"]
            extra = [
                f"task.name={st['task']}",
                f"task.init_from={init}" if init else "task.init_from=null",
            ]
            outcome, _ = finetune(self.config(st, extra), quiet=True, evaluate=False)
            return outcome.status, {"run": inputs["run"], "step": outcome.step}
        from cmal.workflow.finetune import evaluate, metrics_table

        metrics = evaluate(inputs["run"], st["task"], st.get("splits"), quiet=True)
        self.echo(metrics_table(st["task"], metrics))
        return "done", {"run": inputs["run"], "metrics": metrics}


def _present(rec: dict[str, Any]) -> bool:
    """Whether a done stage's outputs are still on disk (else it runs again)."""
    out = rec.get("outputs", {})
    if "shards" in out:
        return (Path(out["shards"]) / "pretrain" / "train" / "index.json").is_file()
    if "run" in out:
        run = Path(out["run"])
        # An evaluation's metrics go when its run folder is remade (a fine-tuning redone
        # after its folder was removed): then the evaluation is due again too.
        if "metrics" in out and not (run / "metrics.json").is_file():
            return False
        return (run / "checkpoints" / "latest").is_file()
    return True


def _run(cfg: Config) -> Path:
    from cmal.workflow.pretrain import run_dir

    return run_dir(cfg)
