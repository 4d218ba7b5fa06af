"""Atomic checkpoints under ``<run>/checkpoints``, a ``latest`` pointer written last,
keep-K, and discovery of the newest complete checkpoint at start.

A checkpoint is written into ``.tmp-step_N`` by every rank (DeepSpeed's save is
collective), then rank 0 renames it to ``step_N`` and only then replaces ``latest``. A
process killed at any point leaves ``latest`` naming a complete checkpoint (or no
``latest``); a stale ``.tmp-*`` folder is removed by the next save.

Each checkpoint holds: DeepSpeed's engine state (module, optimizer, LR scheduler) under
``ds/``, every rank's RNG states (tensors and numbers), and ``state.json`` with the step,
the data loader's state, the world size, the ZeRO stage, the resolved config with its
hash, and the size and sha256 digest of every other file (``cmal.engine.manifest``). A
checkpoint whose files do not match (truncated, deleted, a flipped bit, a file swapped,
a pickle that names a callable) is damaged: the newest undamaged one is used instead, and
the start says which file and why; a checkpoint named by hand that is damaged is an
error. Nothing is loaded from a checkpoint but through torch's weights-only unpickler.
A save that fails (a full disk) leaves ``latest`` on the last complete checkpoint, removes
its partial folder and stops the run with :class:`SaveError`, which says so.

A run on ``s3://`` is saved the same way into its local mirror, then sent to the store
(``cmal.engine.store``: files, then state.json, then ``latest``) before the save returns.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from cmal.config import Config, ConfigError, config_hash, to_dict
from cmal.engine import manifest
from cmal.engine.files import fsync_dir, write_atomic
from cmal.engine.manifest import damage
from cmal.engine.store import Store, StoreError
from cmal.errors import RunError

TAG = "ds"
LATEST = "latest"


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every random generator the step touches, as tensors and plain numbers: what the
    weights-only unpickler loads (numpy's key as an int64 tensor)."""
    algo, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "algo": algo,
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    mt = state["numpy"]
    if isinstance(mt, dict):
        key = mt["key"].numpy().astype(np.uint32)
        mt = (mt["algo"], key, mt["pos"], mt["has_gauss"], mt["gauss"])
    np.random.set_state(mt)  # else a tuple with a numpy array: saved before 2026-12-05
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_file(path: Path) -> Any:
    """A torch file of a checkpoint, through the weights-only unpickler."""
    try:
        with manifest.safe_loading():
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not loadable as a checkpoint file ({why})") from None


class SaveError(RunError):
    """A checkpoint could not be written (a full disk, a failing store); the run stopped
    and ``latest`` still names the last complete checkpoint."""


def is_complete(path: Path) -> bool:
    """A checkpoint folder that was renamed into place with every part of it there."""
    return damage(path) is None


def newest_complete(checkpoints: Path, notes: list[str] | None = None) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete folder;
    each damaged checkpoint passed over is described in ``notes``."""
    if not checkpoints.is_dir():
        return None
    pointer = checkpoints / LATEST
    named = checkpoints / pointer.read_text().strip() if pointer.is_file() else None
    found = (p for p in checkpoints.iterdir() if p.name.startswith("step_"))
    candidates = sorted(found, reverse=True)
    if named is not None and named in candidates:
        candidates.remove(named)
        candidates.insert(0, named)
    return manifest.first_intact(candidates, notes)


def _why(e: BaseException, folder: Path) -> str:
    """A failed write in one line, with the free space of its disk (the usual cause)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        return f"{type(e).__name__}: {text}"
    full = "no space left on device, " if free < (64 << 20) else ""
    return f"{full}{type(e).__name__}: {text} ({free / 1e6:.1f} MB free on that disk)"


def newest_intact(checkpoints: Path) -> Path | None:
    """:func:`newest_complete`, each damaged checkpoint passed over said on stderr in one
    line naming its file; when every one is damaged, an error rather than nothing."""
    notes: list[str] = []
    return manifest.said(checkpoints, newest_complete(checkpoints, notes), notes)


def checked(path: Path) -> Path:
    """A checkpoint folder named by hand, refused in one line if it is damaged."""
    why = damage(path)
    if why is not None:
        raise ConfigError(f"{path}: damaged checkpoint ({why}); not loaded")
    return path


class Checkpointer:
    """Saves and finds the checkpoints of one run."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: Config,
        rank: int,
        world_size: int,
        store: Store | None = None,
        local_rank: int | None = None,
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.hash = config_hash(cfg)
        self.store = store
        # The first process of each node moves that node's files to and from the store.
        self.node_lead = (rank if local_rank is None else local_rank) == 0

    # ------------------------------------------------------------------ saving

    def save(self, engine, step: int, data_state: dict | None) -> Path:
        """Collective: every rank must call it at the same step."""
        final = self.dir / step_dir(step)
        tmp = self.dir / f".tmp-{step_dir(step)}"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        elif self.node_lead and self.dir.is_dir():  # another node's mirror: its old parts
            for stale in self.dir.glob(".tmp-step_*"):
                if stale.name != tmp.name:
                    shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()
        files: dict[str, dict] = {}
        try:
            engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
            torch.save(rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
            failed = None
        # A full disk or a lost mount: OSError, or torch's zip writer's RuntimeError
        # ("unexpected pos"); every rank must hear of it.
        except (OSError, RuntimeError) as e:
            failed = _why(e, tmp)
        self._agree(failed, step, tmp)
        try:  # each rank its own files, on its own node's disk
            files = manifest.describe(tmp, self.rank)
        except OSError as e:
            failed = _why(e, tmp)
        self._agree(failed, step, tmp)
        if dist.is_initialized() and self.world_size > 1:
            parts: list = [None] * self.world_size
            dist.all_gather_object(parts, files)
            files = {rel: d for part in parts for rel, d in part.items()}
        if self.store is not None:
            if self.node_lead:
                try:
                    self.store.upload_tree(tmp, f"checkpoints/{final.name}", files)
                except StoreError as e:
                    failed = str(e)
            self._agree(failed, step, tmp)  # every node's parts are up before state.json
        failed = None
        if self.rank == 0:
            state = {
                "step": step,
                "world_size": self.world_size,
                "zero_stage": self.cfg.engine.zero_stage,
                "config_hash": self.hash,
                "config": to_dict(self.cfg),
                "data": data_state,
                "files": files,
            }
            try:
                write_atomic(tmp / "state.json", json.dumps(manifest.seal(state), indent=1))
                if final.exists():  # the same step saved before (e.g. at the end, resumed)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_dir(self.dir)
                write_atomic(self.dir / LATEST, final.name + "\n")
            except OSError as e:
                failed = _why(e, tmp)
        self._agree(failed, step, tmp)
        if self.rank == 0:
            self._prune(keep=final.name)
            if self.store is not None:
                try:  # state.json, then latest: a failure here leaves the store's latest
                    self.store.publish(final, self.cfg.checkpoint.keep)
                    self.store.upload_top(self.dir.parent)
                except StoreError as e:
                    failed = str(e)
        self._agree(failed, step, tmp)
        return final

    def _agree(self, failed: str | None, step: int, tmp: Path) -> None:
        """Every rank learns whether any rank failed to write its part; then all stop
        together, with the partial folder removed, or all go on."""
        flag = torch.tensor([0 if failed is None else 1])
        if dist.is_initialized() and self.world_size > 1:
            if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
                flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flag)
        if int(flag) == 0:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise self._failure(failed or "another rank could not write its part", step)

    def _failure(self, why: str, step: int) -> SaveError:
        kept = newest_complete(self.dir)
        where = f"latest is still {kept.name}" if kept else "no earlier checkpoint exists"
        if self.store is not None:
            where = f"the store's latest is unchanged ({self.store.url})"
        return SaveError(
            f"checkpoint of step {step} not saved under {self.dir}: {why}; {where} "
            "(nothing else lost): free space or fix the folder, then run again to resume"
        )

    def _prune(self, keep: str) -> None:
        done = sorted(p for p in self.dir.iterdir() if damage(p, read=False) is None)
        for old in done[: -self.cfg.checkpoint.keep]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.dir.glob(".tmp-*"):
            if stale.name != f".tmp-{keep}":
                shutil.rmtree(stale, ignore_errors=True)

    # ------------------------------------------------------------------ finding

    def newest(self) -> Path | None:
        """The newest complete checkpoint: ``latest`` if it names one, else the newest
        complete folder. Decided on rank 0 and broadcast, so every rank agrees."""
        choice: list = [None]
        if self.rank == 0:
            try:
                choice[0] = self._find()
            except ConfigError as e:  # every rank stops with it, none waits for rank 0
                choice[0] = e
        if dist.is_initialized() and self.world_size > 1:
            dist.broadcast_object_list(choice, src=0)
        if isinstance(choice[0], ConfigError):
            raise choice[0]
        if choice[0] is None:
            return None
        path = self.dir / choice[0]
        if self.store is not None:
            why = None
            if self.node_lead and self.rank != 0:  # rank 0 fetched and checked it in _find
                why = self.store.fetch_checkpoint(path.name, path)
            if why is None and self.node_lead:
                write_atomic(self.dir / LATEST, path.name + "\n")
            found = [why]
            if dist.is_initialized() and self.world_size > 1:
                found = [None] * self.world_size
                dist.all_gather_object(found, why)
            for rank, why in enumerate(found):
                if why is not None:  # every rank stops, none waits for the others
                    raise ConfigError(f"{path}: damaged checkpoint ({why}) on rank {rank}'s node")
        return path

    def _find(self) -> str | None:
        """The name of the newest complete checkpoint (on the store, for a run there);
        damaged ones passed over are said on stderr, and when every one is damaged the
        run stops rather than start over from nothing."""
        if self.store is not None:
            found = self.store.newest_intact(self.dir)
        else:
            found = newest_intact(self.dir)
        return found.name if found else None

    # ------------------------------------------------------------------ loading

    def read_state(self, path: Path, force: bool) -> dict:
        """The checkpoint's state.json, refusing one saved under another config."""
        state = json.loads((path / "state.json").read_text())
        if state["config_hash"] != self.hash and not force:
            raise ConfigError(
                f"{path}: saved with config hash {state['config_hash']}, "
                f"this run's is {self.hash}; "
                "the config changed since that checkpoint. Use --force to load it anyway, or "
                "give the run another name"
            )
        return state

    def load(self, engine, path: Path, state: dict) -> str:
        """Restore engine (and RNG) state; returns how: "exact" or "weights" (world size or
        ZeRO stage changed: module weights only, fresh optimizer moments, the LR schedule
        stepped to the saved step)."""
        rng = path / f"rng_rank{self.rank:05d}.pt"
        same = (
            state["world_size"] == self.world_size
            and state["zero_stage"] == self.cfg.engine.zero_stage
        )
        if same:
            with manifest.safe_loading():
                engine.load_checkpoint(
                    str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
                )
            set_rng_state(load_file(rng))
            return "exact"
        if state["zero_stage"] < 3 and self.cfg.engine.zero_stage < 3:
            # Below ZeRO-3 the module file holds the whole model whatever the world size;
            # DeepSpeed's module-only load also refreshes ZeRO's fp32 master copy.
            with manifest.safe_loading():
                engine.load_checkpoint(
                    str(path), tag=TAG, load_module_only=True,
                    load_optimizer_states=False, load_lr_scheduler_states=False,
                )  # fmt: skip
        else:
            import deepspeed

            weights = consolidated_state_dict(path)
            for name, p in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if self.rank == 0:
                        p.data.copy_(weights[name].to(p.dtype))
            if hasattr(engine.optimizer, "refresh_fp32_params"):
                engine.optimizer.refresh_fp32_params()
        for _ in range(state["step"]):
            engine.lr_scheduler.step()
        if rng.is_file():
            set_rng_state(load_file(rng))
        return "weights"


def consolidated_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """fp32 weights of a checkpoint folder, whatever its ZeRO stage and world size."""
    path = Path(path)
    ds = path / TAG
    if any(ds.glob("*zero_pp_rank_*_optim_states.pt")):
        # ZeRO 1-3: the fp32 master weights are spread over the ranks' optimizer files.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with manifest.safe_loading():
            state = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG)
        return {k: v.float() for k, v in state.items()}
    model_file = ds / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ConfigError(f"{path}: no model states found (not a cmal checkpoint?)")
    module = load_file(model_file)["module"]
    return {k: v.float() for k, v in module.items()}
