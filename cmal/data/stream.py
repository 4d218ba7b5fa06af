"""Streaming MDS shards from a local folder or ``s3://bucket/prefix`` (any S3-compatible
endpoint) into padded model batches.

The reader always copies shards from the source (``remote``) into a separate cache folder
(``local``), so every shard's sha1 is checked on arrival and the source stays untouched.
Its position lives in ``StreamingDataLoader.state_dict()``, which goes into checkpoints:
a resumed loader yields exactly the samples not yet seen in the epoch.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmal.config import ConfigError, DataConfig
from cmal.data.errors import DataError
from cmal.data.images import ImageStore, attach, text_index
from cmal.data.mds import map_readers
from cmal.data.schema import IMAGES
from cmal.data.source import join, read_bytes
from cmal.model.cmal import Batch
from cmal.model.prompt import Anchors


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
            for sample_id in sample_ids.tolist():
                if it.should_exit():
                    return
                if sample_id == -1:
                    continue
                shard_id = self.spanner[sample_id][0]
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
            return decode(raw, cfg, feature_dim, num_concepts)

    try:
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


@dataclass
class Collate:
    """Pads decoded samples into model inputs (plus the raw columns a task needs), as numpy
    arrays and one shared-memory tensor of features; :func:`as_tensors` makes the item a
    :class:`Batch` of tensors in the process that trains. (A worker sends a tensor through
    shared memory and a file descriptor each: with the ten small ones of a batch that cost
    a third of the loader's time here; numpy arrays travel pickled with the item.)"""

    max_text_len: int
    """Captions longer than this are cut (anchors beyond it dropped)."""
    max_regions: int
    """Regions beyond this are dropped (shards keep them highest-confidence first)."""

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = [s for s in samples if s is not None]
        # First key: StreamingDataLoader counts a batch by the length of its first value,
        # and that count must include skipped samples for resume to be exact.
        out: dict[str, Any] = {
            "consumed": [None if s is None else s["id"] for s in samples],
            "skipped": len(samples) - len(good),
            "ids": [s["id"] for s in good],
        }
        if not good:
            return out
        out["batch"] = self.batch(good, "")
        # Counted here, on the host, so the training loop need not read the masks.
        out["tokens"] = int(out["batch"]["text_mask"].sum() + out["batch"]["region_mask"].sum())
        if "image2" in good[0]:
            out["batch2"] = self.batch(good, "2")
        for key in ("label", "question_id", "ref_id"):
            if key in good[0]:
                out[key] = np.asarray([s[key] for s in good], np.int64)
        for key in ("target_box", "image_size"):
            if key in good[0]:
                out[key] = np.stack([s[key] for s in good])
        if "answers" in good[0]:
            out["answers"] = [s["answers"] for s in good]
        return out

    def batch(self, samples: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
        """The padded inputs of ``samples`` (their second image with ``suffix`` "2"), by
        :class:`Batch` field; the features straight into shared memory when in a loader
        worker (else they would be copied once more on their way out)."""
        n = len(samples)
        lens = [min(len(s["input_ids"]), self.max_text_len) for s in samples]
        regions = [min(len(s[f"feats{suffix}"]), self.max_regions) for s in samples]
        lt, r = max(lens), max(1, max(regions))
        fdim = samples[0][f"feats{suffix}"].shape[1]
        ids = np.zeros((n, lt), np.int64)
        feats_t = _empty((n, r, fdim), torch.float16)
        feats = feats_t.numpy()
        boxes = np.zeros((n, r, 4), np.float32)
        concepts = np.full((n, r), -1, np.int64)
        pairs = []
        for k, s in enumerate(samples):
            t, m, lk = s["input_ids"], regions[k], lens[k]
            ids[k, :lk] = t[:lk]
            if len(t) > lk:
                ids[k, lk - 1] = t[-1]  # keep [SEP] last
            feats[k, :m] = s[f"feats{suffix}"][:m]
            feats[k, m:] = 0
            boxes[k, :m] = s[f"boxes{suffix}"][:m]
            concepts[k, :m] = s[f"concepts{suffix}"][:m]
            pairs.append([p for p in s[f"anchors{suffix}"] if p[0] < lk - 1 and p[1] < m])
        anchors = np.zeros((n, max(1, max(len(p) for p in pairs)), 3), np.int64)
        valid = np.zeros(anchors.shape[:2], bool)
        for k, p in enumerate(pairs):
            if p:
                anchors[k, : len(p)] = p
                valid[k, : len(p)] = True
        return {
            "input_ids": ids,
            "text_mask": np.arange(lt) < np.asarray(lens)[:, None],
            "region_feats": feats_t,
            "boxes": boxes,
            "region_mask": np.arange(r) < np.asarray(regions)[:, None],
            "concepts": concepts,
            "anchors": anchors,
            "valid": valid,
        }


def as_tensors(item: dict[str, Any]) -> dict[str, Any]:
    """A collated item as the model takes it: its arrays made tensors (no copy), its
    inputs a :class:`Batch` (``batch2``: NLVR2's second image)."""
    for key, value in item.items():
        if isinstance(value, np.ndarray):
            item[key] = torch.from_numpy(value)
        elif key in ("batch", "batch2"):
            t = {
                k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
                for k, v in value.items()
            }
            a = t["anchors"]
            item[key] = Batch(
                t["input_ids"], t["text_mask"], t["region_feats"], t["boxes"], t["region_mask"],
                t["concepts"], Anchors(a[..., 0], a[..., 1], a[..., 2], t["valid"]),
            )  # fmt: skip
    return item


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor, in shared memory when made in a loader worker (as torch's
    own default_collate allocates what it sends to the main process)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=dtype).untyped_storage()._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


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
    for value in list(vars(dataset).values()):
        for shm in blocks(value):
            atexit.unregister(shm.cleanup)
            shm.cleanup()
    if all_ranks and dist.is_available() and dist.is_initialized():
        dist.barrier()


def make_loader(cfg: DataConfig, dataset, max_text_len: int, max_regions: int):
    """A StreamingDataLoader with our collate; its state_dict() resumes mid-epoch. With
    ``data.bucket_pool`` > 1, a :class:`Buckets` of such pools."""
    from streaming import StreamingDataLoader

    collate = Collate(max_text_len, max_regions)
    pool = cfg.bucket_pool
    loader = StreamingDataLoader(
        dataset,
        batch_size=cfg.batch_size * pool,
        num_workers=cfg.workers,
        collate_fn=collate if pool == 1 else BucketCollate(collate, cfg.batch_size),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        drop_last=False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run would diverge from an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.shuffle_seed),
    )
    return Items(loader) if pool == 1 else Buckets(loader)


class Items:
    """The loader's items as tensors (:func:`as_tensors`); its state is the loader's."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return map(as_tensors, self.loader)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def _length(sample: dict[str, Any]) -> tuple[int, int]:
    """Sort key of bucketing: text first (on the world, pool 16, text-first left 9.9% of all
    slots padded, regions-first 18.0%, their sum 16.7%: bench/padding.py)."""
    return len(sample["input_ids"]), len(sample["feats"])


@dataclass
class BucketCollate:
    """One pool of samples -> collated batches of like lengths (in the loader's
    workers). The batches' order is drawn from the pool's sample ids, so reading the same
    pool again gives the same batches in the same order."""

    collate: Collate
    batch_size: int

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        good = sorted((s for s in samples if s is not None), key=_length)
        # A pool cut short (the epoch's end) makes fewer batches, not smaller ones.
        n = max(1, -(-len(good) // self.batch_size))
        parts = np.array_split(np.arange(len(good)), n)
        seed = zlib.crc32(" ".join(str(s["id"]) for s in good).encode())
        order = np.random.default_rng(seed).permutation(n)
        batches = [self.collate([good[i] for i in parts[k]]) for k in order]
        # The pool's own "consumed" first: StreamingDataLoader counts it for resume.
        return {"consumed": [None if s is None else s["id"] for s in samples],
                "skipped": len(samples) - len(good), "batches": batches}  # fmt: skip


class Buckets:
    """Yields the batches of each pool a :class:`BucketCollate` loader reads; its state is
    the loader's before the current pool and how many of that pool's batches were taken,
    so a resume reads the pool again and skips those."""

    def __init__(self, loader):
        self.loader = loader
        # None: the start. (Asking streaming for its state before the first iteration reads
        # shared memory a previous run may have left half-written: seen as a JSON error.)
        self.before: dict[str, Any] | None = None
        self.taken = 0
        self.skip = 0
        self.started = False

    def __iter__(self):
        self.started = True
        for pool in self.loader:
            for k, batch in enumerate(pool["batches"]):
                if k < self.skip:
                    continue
                self.skip, self.taken = 0, k + 1
                yield as_tensors(batch)
            self.before, self.taken = self.loader.state_dict(), 0

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.before, "taken": self.taken}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["loader"] is not None:
            self.loader.load_state_dict(state["loader"])
        elif self.started:  # going back (on_nonfinite=skip) into the first pool
            raise DataError(
                "data.bucket_pool: cannot go back to a checkpoint saved inside the first pool "
                "(the loader cannot restart mid-run); use on_nonfinite=stop or bucket_pool=1"
            )
        self.before, self.skip, self.taken = state["loader"], state["taken"], 0
