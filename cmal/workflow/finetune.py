"""The downstream stages: finetune(cfg) and evaluate(run), and scoring a prediction file.

A fine-tuning run folder holds, besides what every run holds, ``task.json`` (the task and
what it learned from its training data, e.g. VQA's answer vocabulary), ``metrics.json``
and ``predictions_<split>.json`` in the official formats.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cmal.config import Config, ConfigError, load_config, save_config
from cmal.model.cmal import CMAL
from cmal.tasks import TASKS, Objective, Task, beside_accuracy, get_task, headline
from cmal.workflow.pretrain import announce, newest_weights, run_dir, sync_run, train_module


def _join(root: str, sub: str) -> str:
    return f"{root.rstrip('/')}/{sub}"


def pretrained_weights(source: str | Path, endpoint: str | None = None) -> dict[str, torch.Tensor]:
    """CMAL weights (no task head) from a run folder (local or s3://), a checkpoint folder
    or a .safetensors file."""
    from cmal.engine.checkpoint import checked, consolidated_state_dict
    from cmal.engine.store import local_run

    path = local_run(source, endpoint)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise ConfigError(f"task.init_from: no such file {path}")
        from safetensors.torch import load_file

        weights = load_file(str(path))
    elif (path / "checkpoints").is_dir():
        weights = newest_weights(path)
    elif path.name.startswith("step_") or (path / "state.json").is_file():
        weights = consolidated_state_dict(checked(path))
    else:
        raise ConfigError(
            f"task.init_from: {path} is not a run folder, a checkpoint folder "
            "or a .safetensors file"
        )
    if any(k.startswith("model.") for k in weights):  # saved from an engine module
        weights = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")}
    return weights


PRETRAIN_ONLY = ("amc.", "mlm.", "itm.", "itc.", "prompt.")
"""Parameters only pre-training uses (its heads and the prompt layer's blanks): the
pre-training run may or may not have them (the contrastive baseline has no AMC head)."""


def load_into(model: CMAL, weights: dict[str, torch.Tensor], source: str) -> None:
    """Load CMAL weights, or say which parameters do not fit. Every encoder parameter
    must be there; pre-training-only ones are taken where present."""
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not k.startswith(PRETRAIN_ONLY)]
    # A pre-training head of another size (AMC over another vocabulary) is not used here.
    wrong = [
        k
        for k in own
        if k in weights and weights[k].shape != own[k].shape and not k.startswith(PRETRAIN_ONLY)
    ]
    if missing or wrong:
        what = f"{len(missing)} missing (e.g. {missing[:1]})" if missing else ""
        what += f" {len(wrong)} of another shape (e.g. {wrong[:1]})" if wrong else ""
        raise ConfigError(f"{source}: weights do not fit this model config: {what.strip()}")
    fits = {k: weights[k] for k in own if k in weights and weights[k].shape == own[k].shape}
    model.load_state_dict(fits, strict=False)


def _task_info(cfg: Config, task: Task, world, folder: Path) -> dict[str, Any]:
    """The task's info: the run's task.json, or computed on rank 0 from the training shards
    and written there; shared with every rank."""
    from cmal.data.stream import open_dataset, release

    path = folder / "task.json"
    box: list[Any] = [json.loads(path.read_text()) if world.is_main and path.is_file() else None]
    if world.size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        return box[0]
    # Every rank opens the shards: streaming sets up its shared memory with a barrier.
    data = dataclasses.replace(cfg.data, shuffle=False, local=None)
    dataset = open_dataset(data, feature_dim=cfg.model.visual.feature_dim)
    if world.is_main:
        box[0] = {"task": task.name, "pool": cfg.task.pool, **task.prepare(dataset, cfg)}
        if cfg.task.head_only:
            box[0]["head_only"] = True
        path.write_text(json.dumps(box[0]))
    release(dataset)
    if world.size > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def finetune_config(
    task: str, source: str | None, config: str | None, overrides: list[str]
) -> Config:
    """The config of ``cmal finetune --task T --from SRC [-c FILE] [overrides]``."""
    get_task(task)
    extra = [f"task.name={task}"] + ([f"task.init_from={source}"] if source else [])
    return load_config(config or f"configs/finetune/{task}.yaml", [*overrides, *extra])


def finetune(cfg: Config, force: bool = False, quiet: bool = False, evaluate: bool = True):
    """Fine-tune on ``cfg.task.name`` from ``cfg.task.init_from``, then (``evaluate``)
    evaluate on ``task.eval_splits``; returns (outcome, metrics)."""
    from cmal.engine.deepspeed import init_world
    from cmal.engine.lock import run_lock
    from cmal.model.pretrained import build_model

    if cfg.task.name is None:
        raise ConfigError(f"fine-tuning needs a task (--task {'|'.join(TASKS)} or task.name)")
    task = get_task(cfg.task.name)
    cfg.data.remote = _join(cfg.task.data_root, task.train_set)
    world = init_world(cfg)
    folder = run_dir(cfg)
    with run_lock(folder, world.rank, world.size):
        if world.is_main:
            _check_run_task(folder, task)
            save_config(cfg, folder)
        announce(cfg, world, folder, quiet)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        if cfg.task.init_from:
            weights = pretrained_weights(cfg.task.init_from, cfg.data.s3_endpoint)
            load_into(model, weights, cfg.task.init_from)
        info = _task_info(cfg, task, world, folder)
        module = Objective(task, model, task.head(cfg.model.unified.hidden, info), info)
        outcome = train_module(cfg, world, module, force, quiet)
        if outcome.status == "done" and evaluate:
            splits = cfg.task.eval_splits or task.eval_splits
            return outcome, evaluate_module(cfg, task, module, world, folder, splits)
        return outcome, {}


def _check_run_task(folder: Path, task: Task) -> None:
    info = folder / "task.json"
    if info.is_file():
        had = json.loads(info.read_text()).get("task")
        if had != task.name:
            raise ConfigError(f"run folder {folder} was fine-tuned for {had}, not {task.name}")


def evaluate_module(
    cfg: Config, task: Task, module: Objective, world, folder: Path, splits, prefix: str = ""
) -> dict:
    """Metrics of ``module`` on every eval set of ``splits``, labelled ``prefix`` + the
    set's label; predictions and metrics.json written by rank 0. Predictions are gathered
    with a collective, never through files."""
    from cmal.data.batches import make_loader
    from cmal.data.stream import open_dataset, release
    from cmal.engine.loop import to_device

    module = module.to(world.device).eval()
    metrics: dict[str, dict[str, float]] = {}
    for split in splits:
        for label, subset in task.eval_sets(split):
            data = dataclasses.replace(cfg.data, shuffle=False, local=None)
            dataset = open_dataset(
                data,
                remote=_join(cfg.task.data_root, subset),
                feature_dim=cfg.model.visual.feature_dim,
            )
            loader = make_loader(data, dataset, cfg.model.max_text_len, cfg.model.max_regions)
            items = (to_device(item, world.device) for item in loader)
            with torch.no_grad():
                results = task.evaluate_set(module, items, world, cfg, prefix + label)
            release(dataset)
            for name, (preds, got) in results.items():
                metrics[name] = got
                if world.is_main and preds is not None:
                    task.write(preds, folder, name)
    if world.is_main:
        path = folder / "metrics.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        path.write_text(json.dumps({**old, **metrics}, indent=1))
        sync_run(cfg, folder)
    return metrics


def evaluate(
    run: str | Path,
    task_name: str,
    splits: list[str] | None = None,
    quiet: bool = False,
    data_root: str | None = None,
) -> dict:
    """Evaluate a fine-tuned run folder on its task's splits, or (a task that ranks with
    pre-training's heads: retrieval) a pre-training run zero-shot. ``data_root``: read the
    eval sets from there instead of the run's ``task.data_root``; their labels then start
    with its folder's name (``coco/test``), so the run's own results stay."""
    from cmal.engine.deepspeed import init_world
    from cmal.engine.store import local_run

    task = get_task(task_name)
    folder = local_run(run)
    if not (folder / "config.yaml").is_file():
        raise ConfigError(f"{folder}: not a run folder (no config.yaml)")
    cfg = load_config(folder / "config.yaml")
    prefix = ""
    if data_root:
        cfg.task.data_root = data_root
        prefix = Path(data_root.rstrip("/")).name + "/"
    fine_tuned = (folder / "task.json").is_file()
    if fine_tuned:
        _check_run_task(folder, task)
    elif not task.zero_shot:
        raise ConfigError(f"{folder}: not a fine-tuning run (no task.json); fine-tune it first")
    world = init_world(cfg)
    model = CMAL(cfg.model)
    if fine_tuned:
        info = json.loads((folder / "task.json").read_text())
    else:
        info = {"task": task.name, "zero_shot": True}
    module = Objective(task, model, task.head(cfg.model.unified.hidden, info), info)
    if fine_tuned:
        module.load_state_dict(newest_weights(folder))
    else:
        load_into(model, pretrained_weights(folder), str(folder))
    splits = splits or list(task.eval_splits)
    metrics = evaluate_module(cfg, task, module, world, folder, splits, prefix)
    if world.is_main and not quiet:
        print(metrics_table(task.name, metrics), file=sys.stdout)
    return metrics


def metrics_table(task: str, metrics: dict[str, dict[str, float]]) -> str:
    """A plain table: one row per evaluated split, its headline metric first (accuracy;
    retrieval's mean recall), then a column for each metric the task reports beside it
    (NLVR2's consistency, REC's upper bound, retrieval's recalls)."""
    more = {label: beside_accuracy(m) for label, m in metrics.items()}
    extra = list(dict.fromkeys(k for m in more.values() for k in m))
    names = list(dict.fromkeys(headline(m)[0].replace("_", " ") for m in metrics.values()))
    width = max(14, 2 + max(map(len, metrics), default=0))
    head = "".join(f"{k:>13}" for k in extra)
    lines = [f"{task:<10}{'split':<{width}}{'/'.join(names) or 'accuracy':>10}{head}{'n':>8}"]
    for label, m in metrics.items():
        cells = "".join(f"{100 * more[label][k]:>12.2f}%" if k in more[label] else f"{'':>13}"
                        for k in extra)  # fmt: skip
        value = 100 * headline(m)[1]
        lines.append(f"{'':<10}{label:<{width}}{value:>9.2f}%{cells}{int(m['n']):>8}")
    return "\n".join(lines)


def score_predictions(
    task_name: str, predictions: Path, files: dict[str, Path], split: str | None
) -> dict:
    """Score a prediction file against the official annotation files (no model)."""
    return get_task(task_name).score_file(Path(predictions), files, split)
