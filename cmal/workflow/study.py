"""A study: arms × seeds, each pre-trained, fine-tuned on every task and evaluated —
written once in a workflow file and expanded here into its stages.

```yaml
name: claim
study:
  world: {out: data/world, images: 2000, seed: 0}
  tasks: [vqa, ve, nlvr2, rec]
  seeds: [0, 1, 2]
  pretrain_overrides: [engine.steps=200]       # every pre-training stage
  finetune_overrides: []                       # every fine-tuning stage
  arms:
    cmal: {config: configs/pretrain/world.yaml}
    no-amc: {config: configs/pretrain/world.yaml, overrides: [model.losses.amc=false], seeds: [0]}
    scratch: {pretrain: false}                 # fine-tuned from the untrained model
  quick: {world: {images: 200}, seeds: [0], arms: [cmal, scratch], overrides: [engine.steps=5]}
```

A study on several worlds names them under ``worlds`` instead (name -> the settings of
``world``), and each arm says which it trains on (``world: <name>``): its pre-training
reads that world's pre-training shards and its fine-tunings and evaluations its task
shards. Every world is a stage of every part (``--arms``), so a part's training stages
record the same worlds whichever arms it runs. ``zero_shot: [retrieval]`` evaluates each
pre-training run as it is on those tasks (stage ``zeroshot-<run>-<task>``); ``splits:
{task: [split, ...]}`` narrows what a task's evaluations score.

Runs are named ``<study>-<arm>-s<seed>`` (pre-training) and ``…-<task>`` (fine-tuning),
which is what ``cmal report`` groups by. ``cmal run FILE --quick`` applies ``quick``: its
world settings, fewer seeds, arms or tasks, and its overrides after everyone else's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cmal.config import ConfigError

STUDY_KEYS = {
    "world",
    "tasks",
    "seeds",
    "arms",
    "pretrain_overrides",
    "finetune_overrides",
    "quick",
    "worlds",
    "zero_shot",
    "splits",
}
ARM_KEYS = {"config", "overrides", "seeds", "pretrain", "world"}
QUICK_KEYS = {"world", "worlds", "seeds", "arms", "tasks", "overrides"}
FINETUNE_CONFIG = "configs/finetune/{task}.yaml"


def _list(value: Any, where: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return value


def _seeded(seed: int) -> list[str]:
    """A seed sets the model's initialisation, its masking draws and the data order."""
    return [f"seed={seed}", f"data.shuffle_seed={seed}"]


def _world_data(out: str) -> tuple[list[str], list[str]]:
    """The overrides that point an arm's pre-training and its fine-tunings at the world in
    ``out`` (its ``task.data_root`` also goes to the pre-training run, which a zero-shot
    evaluation reads its eval sets from)."""
    shards = f"{out}/shards"
    pre = [f"data.remote={shards}/pretrain/train", "data.val_remote=null",
           f"task.data_root={shards}"]  # fmt: skip
    return pre, [f"task.data_root={shards}"]


def expand(
    name: str,
    study: Any,
    path: Path,
    quick: bool = False,
    only_arms: list[str] | None = None,
    only_seeds: list[int] | None = None,
) -> list[dict[str, Any]]:
    """The stages of ``study`` (the ``study:`` mapping of the workflow file at ``path``);
    ``only_arms`` / ``only_seeds`` keep a part of it (run the rest later: done stages are
    skipped)."""
    where = f"{path}: study"
    if not isinstance(study, dict):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = set(study) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    arms = study.get("arms")
    if not isinstance(arms, dict) or not arms:
        raise ConfigError(f"{where}: arms: expected a mapping of arm name -> settings")
    tasks = _list(study.get("tasks", ["vqa", "ve", "nlvr2", "rec"]), f"{where}: tasks")
    seeds = _list(study.get("seeds", [0]), f"{where}: seeds")
    world = dict(study.get("world") or {})
    worlds = study.get("worlds") or {}
    if world and worlds:
        raise ConfigError(f"{where}: give either world or worlds, not both")
    if not isinstance(worlds, dict) or not all(isinstance(w, dict) for w in worlds.values()):
        raise ConfigError(f"{where}: worlds: expected a mapping of name -> world settings")
    worlds = {k: dict(v) for k, v in worlds.items()}
    zero_shot = _list(study.get("zero_shot"), f"{where}: zero_shot")
    if zero_shot:
        from cmal.tasks import get_task

        bad = [t for t in zero_shot if not get_task(t).zero_shot]
        if bad:
            raise ConfigError(f"{where}: zero_shot: {bad} cannot be evaluated without "
                              "fine-tuning (retrieval can)")  # fmt: skip
    splits = study.get("splits") or {}
    if not isinstance(splits, dict):
        raise ConfigError(f"{where}: splits: expected a mapping of task -> [split, ...]")
    pre_over = _list(study.get("pretrain_overrides"), f"{where}: pretrain_overrides")
    ft_over = _list(study.get("finetune_overrides"), f"{where}: finetune_overrides")
    last: list[str] = []
    if quick:
        q = study.get("quick")
        if not isinstance(q, dict):
            raise ConfigError(f"{where}: --quick needs a 'quick' mapping in the study")
        if set(q) - QUICK_KEYS:
            raise ConfigError(f"{where}: quick: unknown key(s) {sorted(set(q) - QUICK_KEYS)}")
        world.update(q.get("world") or {})
        for key, settings in (q.get("worlds") or {}).items():
            if key not in worlds:
                raise ConfigError(f"{where}: quick: worlds: {key!r} is not a world of the study")
            worlds[key].update(settings)
        seeds = _list(q.get("seeds", seeds), f"{where}: quick: seeds")
        tasks = _list(q.get("tasks", tasks), f"{where}: quick: tasks")
        chosen = _list(q.get("arms", list(arms)), f"{where}: quick: arms")
        missing = [a for a in chosen if a not in arms]
        if missing:
            raise ConfigError(f"{where}: quick: arms: {missing} are not arms of the study")
        arms = {a: arms[a] for a in chosen}
        last = _list(q.get("overrides"), f"{where}: quick: overrides")

    if only_arms:
        missing = [a for a in only_arms if a not in arms]
        if missing:
            raise ConfigError(f"--arms: {missing} are not arms of {path}: {', '.join(arms)}")
        arms = {a: arms[a] for a in only_arms}
    stages: list[dict[str, Any]] = []
    if world:
        stages.append({"name": "world", "kind": "world", **world})
    for key, settings in worlds.items():
        if "out" not in settings:
            raise ConfigError(f"{where}: worlds: {key}: needs 'out'")
        stages.append({"name": f"world-{key}", "kind": "world", **settings})
    for arm, spec in arms.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - ARM_KEYS:
            raise ConfigError(f"{where}: arms: {arm}: expected a mapping of {sorted(ARM_KEYS)}")
        arm_seeds = seeds if quick else _list(spec.get("seeds", seeds), f"{where}: {arm}: seeds")
        pre_data: list[str] = []
        ft_data: list[str] = []
        if "world" in spec:
            if spec["world"] not in worlds:
                raise ConfigError(f"{where}: {arm}: world: {spec['world']!r} is not in worlds")
            pre_data, ft_data = _world_data(worlds[spec["world"]]["out"])
        for seed in arm_seeds:
            if only_seeds is not None and seed not in only_seeds:
                continue
            run = f"{name}-{arm}-s{seed}"
            source = "none"
            if spec.get("pretrain", True):
                if "config" not in spec:
                    raise ConfigError(f"{where}: arms: {arm}: needs a pre-training 'config'")
                own = _list(spec.get("overrides"), f"{where}: {arm}")
                over = [*pre_data, *pre_over, *own, *last]
                stages.append({"name": f"pretrain-{run}", "kind": "pretrain",
                               "config": spec["config"],
                               "overrides": [*over, f"name={run}", *_seeded(seed)]})  # fmt: skip
                source = f"pretrain-{run}"
                for task in zero_shot:
                    stages.append(_evaluate(f"zeroshot-{run}-{task}", task, source, splits))
            for task in tasks:
                ft = f"{run}-{task}"
                over = [*ft_data, *ft_over, *last, f"name={ft}", *_seeded(seed)]
                stages.append({"name": f"finetune-{ft}", "kind": "finetune", "task": task,
                               "config": FINETUNE_CONFIG.format(task=task), "from": source,
                               "overrides": over})  # fmt: skip
                stages.append(_evaluate(f"evaluate-{ft}", task, f"finetune-{ft}", splits))
    return stages


def _evaluate(name: str, task: str, run: str, splits: dict) -> dict[str, Any]:
    stage = {"name": name, "kind": "evaluate", "task": task, "run": run}
    if task in splits:
        stage["splits"] = splits[task]
    return stage
