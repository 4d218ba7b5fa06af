"""The units a workflow chains: pretrain(cfg) — and the export of a run's weights.

A run has a name; its folder ``<checkpoint.root>/<name>`` holds the resolved config, the
checkpoints, the JSONL log and (later) metrics and predictions. Job ids never name folders.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
from torch import nn

from cmal.config import Config, save_config, to_yaml
from cmal.model.cmal import CMAL


class PretrainObjective(nn.Module):
    """What the engine trains in pre-training: batch -> dict of losses."""

    def __init__(self, model: CMAL, batch_size: int = 1):
        super().__init__()
        self.model = model
        self.batch_size = batch_size  # the MLM head scores a number of rows per batch

    def forward(self, item: dict) -> dict[str, torch.Tensor]:
        return self.model.pretrain_losses(item["batch"])

    def flops_per_row(self) -> float:
        """Training FLOPs of one batch row (a caption-image pair) at the padded shapes."""
        return self.model.flops_per_sample(batch_size=self.batch_size)


def run_dir(cfg: Config) -> Path:
    """The run's folder (for a run on ``s3://``, its local mirror)."""
    from cmal.engine.store import is_remote, mirror_of

    if is_remote(cfg.checkpoint.root):
        return mirror_of(run_url(cfg), cfg.checkpoint.mirror)
    return Path(cfg.checkpoint.root) / cfg.name


def run_url(cfg: Config) -> str:
    return f"{cfg.checkpoint.root.rstrip('/')}/{cfg.name}"


def run_store(cfg: Config):
    """The run's object store (None for a local run)."""
    from cmal.engine.store import is_remote, store_for

    return store_for(cfg, run_url(cfg)) if is_remote(cfg.checkpoint.root) else None


def pull_log(store, folder: Path) -> None:
    """The store's log.jsonl into the mirror when it is longer (the run went on on another
    node), so that the mirror's log is appended to, never uploaded over the store's."""
    log = folder / "log.jsonl"
    remote = store.read_text("log.jsonl")
    have = log.stat().st_size if log.exists() else 0
    if remote is not None and len(remote.encode()) > have:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(remote)


def sync_run(cfg: Config, folder: Path) -> None:
    """Send the run folder's own files (config, log, metrics, predictions) to its store."""
    store = run_store(cfg)
    if store is not None:
        store.upload_top(folder)


def announce(cfg: Config, world, folder: Path, quiet: bool) -> None:
    if world.is_main and not quiet:
        print(f"# resolved config -> {folder / 'config.yaml'}\n{to_yaml(cfg)}", file=sys.stderr)
        print(
            f"# world: {world.size} process(es), this is rank {world.rank}, "
            f"device {world.device}, "
            f"{str(world.dtype).removeprefix('torch.')}, ZeRO stage {cfg.engine.zero_stage}",
            file=sys.stderr,
        )


def train_module(
    cfg: Config, world, module: nn.Module, force: bool, quiet: bool, start_info: dict | None = None
):
    """Wrap ``module`` in the engine, resume the run's newest checkpoint, run the loop
    (``start_info`` goes into the log's start record); a rank lost on the way ends it in
    one line, within ``engine.collective_timeout_s``."""
    from cmal.engine.deepspeed import peers_watched

    with peers_watched(cfg, world):
        return _train_module(cfg, world, module, force, quiet, start_info)


def _train_module(cfg: Config, world, module: nn.Module, force: bool, quiet: bool,
                  start_info: dict | None):  # fmt: skip
    from cmal.data.batches import make_loader
    from cmal.data.stream import open_dataset, release
    from cmal.engine.checkpoint import Checkpointer
    from cmal.engine.deepspeed import build_engine, watch_peers
    from cmal.engine.loop import train, validation_losses

    folder = run_dir(cfg)
    engine, _ = build_engine(module, cfg, world)
    store = run_store(cfg)
    if store is not None and world.is_main:
        pull_log(store, folder)
    ckpt = Checkpointer(folder, cfg, world.rank, world.size, store, world.local_rank)
    start, data_state = 0, None
    newest = ckpt.newest()
    if newest is not None:
        state = ckpt.read_state(newest, force)
        how = ckpt.load(engine, newest, state)
        start, data_state = state["step"], state["data"]
        if world.is_main and not quiet:
            print(f"# resumed from {newest} (step {start}, {how})", file=sys.stderr)
    else:
        # Each rank draws its own masks and swaps; ranks differ, runs repeat.
        torch.manual_seed(cfg.seed * 1000 + world.rank)
    fdim = cfg.model.visual.feature_dim
    # Concept ids are AMC labels: pre-training checks them; fine-tuning never reads them.
    concepts = cfg.model.num_concepts if cfg.task.name is None else None
    dataset = open_dataset(cfg.data, feature_dim=fdim, num_concepts=concepts)
    loader = make_loader(cfg.data, dataset, cfg.model.max_text_len, cfg.model.max_regions)
    if cfg.task.head_only:
        from cmal.workflow.head_only import feature_loader

        loader = feature_loader(module, loader, cfg, world, newest is None, quiet)
    if data_state:
        loader.load_state_dict(data_state)
    evaluate, val_set = None, None
    if cfg.engine.eval_every:
        val_cfg = dataclasses.replace(cfg.data, shuffle=False, local=None)
        val_set = open_dataset(
            val_cfg, remote=cfg.data.val_remote, feature_dim=fdim, num_concepts=concepts
        )
        val_loader = make_loader(val_cfg, val_set, cfg.model.max_text_len, cfg.model.max_regions)

        def evaluate():
            return validation_losses(engine, val_loader, world, cfg.engine.eval_batches)

    observer = make_observer(cfg, world, module, folder / "log.jsonl")
    watch_peers(cfg)
    try:
        outcome = train(
            engine, loader, cfg, world, ckpt, folder / "log.jsonl", start, evaluate, observer,
            start_info,
        )  # fmt: skip
    finally:
        observer.close()
    # Not on an error: its rank may be alone, and release() ends in a barrier.
    for done in (dataset, val_set):
        if done is not None:
            release(done)
    return outcome


def make_observer(cfg: Config, world, module: nn.Module, log: Path):
    """This rank's Prometheus metrics, labelled with the run, stage, rank and job."""
    import torch.distributed as dist

    from cmal.engine.observe import Observer, count_starts

    restarts = [count_starts(log) if world.is_main else 0]
    if world.size > 1:
        dist.broadcast_object_list(restarts, src=0)
    stage = f"finetune-{cfg.task.name}" if cfg.task.name else "pretrain"
    return Observer(
        cfg.observe, cfg.name, stage, world.rank, world.local_rank, world.device,
        restarts[0], module.flops_per_row(),
    )  # fmt: skip


def read_beside(cfg: Config, *names: str) -> list:
    """JSON files that conversion wrote beside the training shards (local or ``s3://``),
    each None where absent."""
    import json

    from cmal.engine.store import Store

    remote = cfg.data.remote
    if remote.startswith("s3://"):
        store = Store(remote, cfg.data.s3_endpoint, field="data.remote")
        texts = [store.read_text(name) for name in names]
    else:
        texts = [(Path(remote) / n).read_text() if (Path(remote) / n).is_file() else None
                 for n in names]  # fmt: skip
    return [None if t is None else json.loads(t) for t in texts]


def data_concepts(cfg: Config) -> dict | None:
    """Size the AMC head from the shards' ``concepts.json``: ``model.num_concepts`` unset
    takes its count; a value below it is an error that says what it must be. Returns the
    shards' ``anchor_stats.json`` (None for shards written without one)."""
    from cmal.config import ConfigError
    from cmal.data.coverage import STATS_FILE, VOCAB_FILE
    from cmal.data.stream import check_shard_folder

    if not cfg.data.remote.startswith("s3://"):
        check_shard_folder(cfg.data.remote, "data.remote")
    vocab, stats = read_beside(cfg, VOCAB_FILE, STATS_FILE)
    have = cfg.model.num_concepts
    if vocab is None:
        if have is None:
            raise ConfigError(
                f"model.num_concepts is unset and {cfg.data.remote} has no {VOCAB_FILE} "
                "(shards written before it existed): set model.num_concepts to the number of "
                "anchor concepts the shards were written with"
            )
    else:
        n = len(vocab["concepts"])
        if have is None:
            cfg.model.num_concepts = n
        elif have < n:
            raise ConfigError(
                f"model.num_concepts is {have} but {cfg.data.remote}/{VOCAB_FILE} has {n} "
                f"anchor concepts: set model.num_concepts={n} (or leave it unset)"
            )
    return stats


def pretrain(cfg: Config, force: bool = False, quiet: bool = False):
    """Pre-train (or resume) the run named by ``cfg.name``; returns the loop's Outcome."""
    from cmal.engine.deepspeed import init_world
    from cmal.engine.lock import run_lock
    from cmal.model.pretrained import build_model

    stats = data_concepts(cfg)
    world = init_world(cfg)
    folder = run_dir(cfg)
    with run_lock(folder, world.rank, world.size):
        if world.is_main:
            save_config(cfg, folder)
        announce(cfg, world, folder, quiet)
        facts = None
        if stats is not None:
            facts = {k: stats[k] for k in ("samples", "share_with_anchor", "anchors_per_sample")}
            if world.is_main and not quiet:
                print(
                    f"# data: {stats['samples']} samples, "
                    f"{100 * stats['share_with_anchor']:.1f}% with >= 1 anchor, "
                    f"{stats['anchors_per_sample']:.2f} anchors per sample, "
                    f"{cfg.model.num_concepts} AMC classes ({cfg.data.remote})",
                    file=sys.stderr,
                )
        torch.manual_seed(cfg.seed)
        module = PretrainObjective(build_model(cfg.model), cfg.data.batch_size)
        return train_module(cfg, world, module, force, quiet, start_info={"data": facts})


def newest_weights(run: str | Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of the run's newest intact checkpoint (a damaged newer one
    passed over with a warning), named as in the module the engine trained (``model.…``,
    ``head.…``)."""
    from cmal.config import ConfigError
    from cmal.engine.checkpoint import consolidated_state_dict, newest_intact
    from cmal.engine.store import local_run

    found = newest_intact(local_run(run) / "checkpoints")
    if found is None:
        raise ConfigError(f"{run}: no complete checkpoint under {run}/checkpoints")
    return consolidated_state_dict(found)


def export_fp32(run: str | Path, out: str | Path) -> Path:
    """Write the newest checkpoint of ``run`` as one safetensors file of fp32 weights (for a
    pre-training run: loadable with ``CMAL(cfg).load_state_dict``, no DeepSpeed needed)."""
    from safetensors.torch import save_file

    weights = newest_weights(run)
    if all(k.startswith("model.") for k in weights):
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out), metadata={"run": str(run)})
    return out
