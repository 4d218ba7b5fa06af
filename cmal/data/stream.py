"""Streaming a shard set's text samples, each joined with its image's regions from the
image store, from a local folder or ``s3://bucket/prefix`` (any S3-compatible endpoint);
:mod:`cmal.data.batches` makes them model batches.

The reader always copies shards from the source (``remote``) into a separate cache folder
(``local``), so every shard's sha1 is checked on arrival and the source stays untouched.
Its position lives in ``StreamingDataLoader.state_dict()``, which goes into checkpoints:
a resumed loader yields exactly the samples not yet seen in the epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cmal.config import ConfigError, DataConfig
from cmal.data.errors import DataError
from cmal.data.images import ImageStore, attach, text_index
from cmal.data.mds import map_readers
from cmal.data.schema import IMAGES
from cmal.data.source import join, read_bytes


def cache_folder(cfg: DataConfig, remote: str) -> str:
    """The local cache of a source: ``cfg.local``, or a temp folder named by the source and
    the content of its two index.json files (texts, images) — so shards converted again
    are never read stale."""
    indexes = [
        read_bytes(join(remote, "index.json")),
        read_bytes(join(remote, IMAGES, "index.json")),
    ]
    if cfg.local:
        for index, name in zip(indexes, ("index.json", f"{IMAGES}/index.json"), strict=True):
            cached = Path(cfg.local) / name
            if index is not None and cached.is_file() and cached.read_bytes() != index:
                raise DataError(
                    f"data.local={cfg.local} holds a cache of another version of {remote}; "
                    "delete that folder or point data.local elsewhere"
                )
        return cfg.local
    tag = hashlib.sha1(remote.encode() + b"".join(i or b"" for i in indexes)).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / "cmal-cache" / tag)


def _s3_env(cfg: DataConfig) -> None:
    if cfg.s3_endpoint:
        os.environ["S3_ENDPOINT_URL"] = cfg.s3_endpoint


def _probe_s3(remote: str) -> Exception | None:
    """Ask the store directly why ``remote`` failed (streaming reports every failure as
    "not found"): the bucket's own error, or None when the bucket answers fine."""
    import boto3
    import botocore.exceptions

    bucket = remote[len("s3://") :].split("/", 1)[0]
    try:
        boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL")).head_bucket(
            Bucket=bucket
        )
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code"))
        if code in ("404", "NoSuchBucket"):
            return RuntimeError("NoSuchBucket")
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            return RuntimeError(f"AccessDenied ({code})")
        return e
    except botocore.exceptions.BotoCoreError as e:
        return e
    return None


def _explain(remote: str, e: Exception) -> DataError:
    """One line for the ways a source fails to open."""
    text = f"{type(e).__name__}: {e}"
    if "NoSuchBucket" in text:
        why = "the bucket does not exist"
    elif re.search(
        r"InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied|NoCredentials|credentials", text
    ):
        why = "the object store refused the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    elif isinstance(e, FileNotFoundError) or "404" in text or "Not Found" in text:
        why = "no index.json there (not a shard folder?)"
    elif (
        "Could not connect" in text
        or "Connection refused" in text
        or "EndpointConnectionError" in text
    ):
        why = "cannot reach the object store endpoint (data.s3_endpoint / S3_ENDPOINT_URL)"
    else:
        why = text.splitlines()[0][:300]
    return DataError(f"cannot open shards at {remote}: {why}")


def _shard_error(remote: str, e: Exception) -> Exception:
    """A clear error for a shard that failed to arrive or to verify."""
    text = str(e)
    if "Checksum failure" in text:
        shard = Path(text.split(":", 1)[1].strip()).name
        return DataError(
            f"shard {shard} of {remote} failed its sha1 check (corrupted); "
            "convert or upload it again"
        )
    if isinstance(e, DataError):
        return e
    return DataError(
        f"cannot read a shard of {remote}: {type(e).__name__}: {text.splitlines()[0][:300]}"
    )


def check_shard_folder(remote: str, field: str = "") -> None:
    """A local shard folder must hold index.json; else one DataError naming it."""
    if not (Path(remote) / "index.json").is_file():
        raise DataError(
            f"{field + ': ' if field else ''}cannot open shards at {remote}: no index.json "
            "there (not a shard folder? `cmal data convert` or `cmal data world` writes them)"
        )


def shm_turn_lock() -> str:
    """The node's lock file of :func:`shm_prefix_turn`."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(folder, "cmal-streaming-prefix.lock")


TURN_WAIT_S = 60.0
"""How long a process waits for the node's turn (:func:`shm_prefix_turn`) before going on
without it."""


@contextlib.contextmanager
def shm_prefix_turn(wait_s: float = TURN_WAIT_S) -> Iterator[None]:
    """Hold the node's turn to register a streaming dataset (taken by the job's local
    leader; its other ranks wait until it holds it).

    Streaming names a dataset's shared memory by the first free prefix it finds, then
    creates it: two jobs starting on one node at once can find the same one, and the later
    fails (``FileExistsError: '/004303_locals'``, seen with two test processes). The local
    leaders of every job on the node take turns on a lock in /dev/shm, where those names
    live (one folder for all jobs, whatever their TMPDIR). Every rank of the job computes
    the prefix (the leader creates it, the others look it up by number), so the other ranks
    start only once their leader holds the turn: before that, a rank could take a number
    that another job registered while its leader waited, and find that job's memory under
    it. The wait is bounded (``wait_s``), then it goes on without the turn: with a wrong
    LOCAL_WORLD_SIZE two ranks of one job would both be leaders and wait on each other."""
    import torch.distributed as dist
    from streaming.base.world import World

    with contextlib.ExitStack() as stack:
        if World.detect().is_local_leader:
            _take_turn(stack, wait_s)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        yield


def _take_turn(stack: contextlib.ExitStack, wait_s: float) -> None:
    """Take the node's turn of :func:`shm_prefix_turn` until ``stack`` closes, or go on
    without it after ``wait_s``."""
    lock = stack.enter_context(open(shm_turn_lock(), "a"))
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
        else:
            stack.callback(fcntl.flock, lock, fcntl.LOCK_UN)
            return


def open_dataset(
    cfg: DataConfig,
    remote: str | None = None,
    feature_dim: int | None = None,
    num_concepts: int | None = None,
    **kw: Any,
):
    """A StreamingDataset over ``remote`` (default ``cfg.remote``) returning decoded samples
    (checked against the model's ``feature_dim`` and, for pre-training, ``num_concepts``)."""
    from streaming import StreamingDataset
    from streaming.base.dataset import _Iterator, _ShardState

    remote = remote or cfg.remote
    if not remote.startswith("s3://"):
        check_shard_folder(remote)
        remote = str(Path(remote).resolve())
    _s3_env(cfg)
    local = cache_folder(cfg, remote)
    try:
        text_index(remote)
        images = ImageStore(remote, Path(local) / IMAGES, cfg.validate_hash)
    except DataError as e:
        if remote.startswith("s3://") and "cannot open shards" in str(e):
            raise _explain(remote, _probe_s3(remote) or FileNotFoundError()) from None
        raise

    class Decoded(StreamingDataset):
        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            # Streaming's download thread calls this for every sample, taking a file lock
            # each time (~400 µs a sample here, more than reading it): a shard already in
            # the cache needs nothing (only a cache_limit, which cmal never sets, would
            # use the access time it also records).
            if self._shard_states[shard_id] != _ShardState.LOCAL:
                super().prepare_shard(shard_id, blocking)

        def __iter__(self):
            # Streaming's own __iter__ runs a download thread and a ready thread beside the
            # yield loop, each stepping through every sample under locks: ~140 µs a sample
            # here, as much as reading it. This loop yields the same samples in the same
            # order (the same partition of the same epoch, so resume and world-size changes
            # are streaming's) and fetches a text shard when it first needs one: text
            # shards are few and small (~250 bytes a text), the features are in the store.
            if hasattr(self, "_iterator"):
                self._iterator.exit()
            self._unique_worker_world = self._unique_rank_world.detect_workers()
            self._parallel_worker_world = self._parallel_rank_world.detect_workers()
            epoch, sample_in_epoch = self._resume_incr_epoch()
            sample_ids = self._get_work(epoch, sample_in_epoch)
            self._iterator = it = _Iterator(sample_ids)
            for _ in range(it._num_threads_to_exit):
                it.on_exit()  # no download or ready thread to wait for
            ready: set[int] = set()
            shards = np.searchsorted(self.spanner.shard_bounds, sample_ids, side="right") - 1
            for sample_id, shard_id in zip(sample_ids.tolist(), shards.tolist(), strict=True):
                if it.should_exit():
                    return
                if sample_id == -1:
                    continue
                if shard_id not in ready:
                    try:
                        self.prepare_shard(shard_id, blocking=True)
                    except Exception as e:
                        raise _shard_error(remote, e) from None
                    ready.add(shard_id)
                yield self[sample_id]

        def __getitem__(self, idx: int) -> dict[str, Any] | None:
            try:
                raw = attach(super().__getitem__(idx), images)
            except DataError:
                raise
            except Exception as e:
                raise _shard_error(remote, e) from None
            sample = decode(raw, cfg, feature_dim, num_concepts)
            if sample is not None:
                sample["index"] = idx  # its row in the set: an order every rank agrees on
            return sample

    try:
        with shm_prefix_turn():
            dataset = Decoded(
                remote=remote,
                local=local,
                shuffle=cfg.shuffle,
                shuffle_seed=cfg.shuffle_seed,
                shuffle_algo=cfg.shuffle_algo,
                batch_size=cfg.batch_size * cfg.bucket_pool,  # as the loader draws them
                validate_hash="sha1" if cfg.validate_hash else None,
                **kw,
            )
        map_readers(dataset.shards)
        dataset.images = images  # the batches' features are copied from it, in this process
        return dataset
    except DataError:
        raise
    except Exception as e:
        if remote.startswith("s3://"):
            e = _probe_s3(remote) or e
        raise _explain(remote, e) from None


def decode(
    raw: dict[str, Any], cfg: DataConfig, feature_dim: int | None, num_concepts: int | None = None
) -> dict[str, Any] | None:
    """Check one sample; None (skip) or a DataError naming it when it is bad."""
    if num_concepts is not None:
        _check_concepts(raw, num_concepts)
    try:
        for suffix in ("", "2") if "image2" in raw else ("",):
            _check_image(raw, suffix, feature_dim)
        if len(raw["input_ids"]) < 2:
            raise DataError("input_ids: empty text")
    except DataError as e:
        if cfg.on_bad_sample == "skip":
            return None
        raise DataError(f"sample {raw.get('id')!r} (image {raw.get('image')!r}): {e}") from None
    return raw


def _check_image(raw: dict[str, Any], suffix: str, feature_dim: int | None) -> None:
    feats, boxes = raw[f"feats{suffix}"], raw[f"boxes{suffix}"]
    if feats.ndim != 2 or (feature_dim is not None and feats.shape[1] != feature_dim):
        raise DataError(f"feats{suffix}: shape {feats.shape}, expected (regions, {feature_dim})")
    r = feats.shape[0]
    if boxes.shape != (r, 4):
        raise DataError(f"boxes{suffix}: shape {boxes.shape}, expected ({r}, 4)")
    for t, i, _ in raw[f"anchors{suffix}"]:
        if not (0 <= i < r and 0 <= t < len(raw["input_ids"])):
            raise DataError(f"anchors{suffix}: pair ({t}, {i}) outside the text or the regions")


def _check_concepts(raw: dict[str, Any], num_concepts: int) -> None:
    """Concept ids beyond the model's AMC classes mean shards and config disagree: that is
    no bad sample to skip, but a config error."""
    top = max([c for _, _, c in raw["anchors"]] + [int(raw["concepts"].max(initial=-1))])
    if top >= num_concepts:
        raise ConfigError(
            f"model.num_concepts is {num_concepts} but sample {raw.get('id')!r} has concept id "
            f"{top}: set it to the anchor vocabulary the shards were made with"
        )


def release(dataset, all_ranks: bool = True) -> None:
    """Close (and, where this process made them, unlink) ``dataset``'s shared memory now.

    Streaming keeps a dataset's six blocks open until the process exits (an atexit handler
    holds them), and each new dataset probes every earlier prefix, opening a descriptor per
    block that is never closed either: a study running dozens of stages in one process ran
    out of file descriptors (20,000) that way. Call it once the dataset's loaders are done;
    with ``all_ranks`` every rank calls it and a barrier follows, so that no rank looks for
    a free prefix while another still holds its old one."""
    import atexit

    import torch.distributed as dist
    from streaming.base.shared import SharedArray, SharedBarrier, SharedMemory, SharedScalar

    def blocks(value) -> list:
        if isinstance(value, SharedMemory):
            return [value]
        if isinstance(value, SharedArray):
            return [value.shm]
        if isinstance(value, SharedScalar):
            return [value.arr.shm]
        if isinstance(value, SharedBarrier):
            return [value._arr.shm]
        return []

    if hasattr(dataset, "_iterator"):
        # Threads of an epoch left unfinished (training stops mid-epoch) still read the
        # shard states: stop them first, as streaming does before a new epoch.
        dataset._iterator.exit()
    with contextlib.ExitStack() as stack:
        # A prefix freed while another job's ranks look for a free one can give its ranks
        # different numbers (see shm_prefix_turn): unlink in the node's turn too.
        _take_turn(stack, TURN_WAIT_S)
        for value in list(vars(dataset).values()):
            for shm in blocks(value):
                atexit.unregister(shm.cleanup)
                shm.cleanup()
    if all_ranks and dist.is_available() and dist.is_initialized():
        dist.barrier()
