"""Decoded samples into model batches: padding (:class:`Collate`), the tensors a worker
sends the training process (:func:`as_tensors`), length bucketing (:class:`Buckets`) and
the loader (:func:`make_loader`) whose ``state_dict()`` goes into every checkpoint."""

from __future__ import annotations

import queue
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cmal.config import DataConfig
from cmal.data.errors import DataError
from cmal.data.images import ImageStore
from cmal.model.cmal import Batch
from cmal.model.prompt import Anchors


@dataclass
class Collate:
    """Pads decoded samples into model inputs (plus the raw columns a task needs), as numpy
    arrays; :func:`as_tensors` makes the item a :class:`Batch` of tensors in the process
    that trains, copying each text's region features there from its own map of the image
    store. Measured here (bench/NOTES.md): a worker that copies the features into a new
    shared-memory tensor for every batch spends more on the kernel's fresh pages and the
    file descriptor that carries it than on everything else, and a tensor sent per field
    costs a descriptor each; the arrays travel pickled with the item (~100 KB a batch)."""

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
            "index": [s.get("index", -1) for s in good],
        }
        if not good:
            return out
        out["batch"] = self.batch(good, "")
        # Counted here, on the host, so the training loop need not read the masks.
        out["tokens"] = int(out["batch"]["text_mask"].sum() + out["batch"]["region_mask"].sum())
        if "image2" in good[0]:
            out["batch2"] = self.batch(good, "2")
        else:  # which texts share an image (retrieval's positives and its gallery)
            out["image_keys"] = [s["image"] for s in good]
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
        :class:`Batch` field; the features as their image rows, copied by
        :func:`as_tensors`."""
        n = len(samples)
        lens = [min(len(s["input_ids"]), self.max_text_len) for s in samples]
        regions = [min(len(s[f"feats{suffix}"]), self.max_regions) for s in samples]
        lt, r = max(lens), max(1, max(regions))
        ids = np.zeros((n, lt), np.int64)
        boxes = np.zeros((n, r, 4), np.float32)
        concepts = np.full((n, r), -1, np.int64)
        pairs = []
        for k, s in enumerate(samples):
            t, m, lk = s["input_ids"], regions[k], lens[k]
            ids[k, :lk] = t[:lk]
            if len(t) > lk:
                ids[k, lk - 1] = t[-1]  # keep [SEP] last
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
            "region_at": np.asarray([s[f"feats_at{suffix}"] for s in samples], np.int64),
            "region_dim": samples[0][f"feats{suffix}"].shape[1],
            "boxes": boxes,
            "region_mask": np.arange(r) < np.asarray(regions)[:, None],
            "concepts": concepts,
            "anchors": anchors,
            "valid": valid,
        }


def as_tensors(item: dict[str, Any], images: ImageStore) -> dict[str, Any]:
    """A collated item as the model takes it: its arrays made tensors (no copy), its
    inputs a :class:`Batch` (``batch2``: NLVR2's second image), the region features copied
    from ``images`` (into pinned memory where a GPU will take them)."""
    for key, value in item.items():
        if isinstance(value, np.ndarray):
            item[key] = torch.from_numpy(value)
        elif key in ("batch", "batch2"):
            t = {k: torch.from_numpy(v) for k, v in value.items() if isinstance(v, np.ndarray)}
            mask, a = t["region_mask"], t["anchors"]
            n, r = mask.shape
            feats = torch.empty((n, r, value["region_dim"]), dtype=torch.float16,
                                pin_memory=torch.cuda.is_available())  # fmt: skip
            out = feats.numpy()
            # From numpy, not the tensor: the step counts a tensor's .tolist() as a read.
            counts, dim = value["region_mask"].sum(1).tolist(), value["region_dim"]
            for k, (at, m) in enumerate(zip(value["region_at"].tolist(), counts, strict=True)):
                out[k, :m] = images.features(at, m, dim)
                out[k, m:] = 0
            item[key] = Batch(
                t["input_ids"], t["text_mask"], feats, t["boxes"], mask, t["concepts"],
                Anchors(a[..., 0], a[..., 1], a[..., 2], t["valid"]),
            )  # fmt: skip
    return item


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
    return Tensors(loader if pool == 1 else Buckets(loader), dataset.images)


class Tensors:
    """The items of ``inner`` (the loader, or its :class:`Buckets`) as the model takes them
    (:func:`as_tensors`), made by a thread up to ``ahead`` items before they are asked for,
    so that copying the features overlaps the training step instead of lengthening it. Its
    state is the inner loader's as of the last item handed out: items made ahead and never
    taken are read again after a resume, as if never drawn."""

    def __init__(self, inner, images: ImageStore, ahead: int = 2):
        self.inner, self.images, self.ahead = inner, images, ahead
        self._state: dict[str, Any] | None = None
        self._halt: Callable[[], None] = lambda: None

    def __iter__(self):
        self._halt()
        self._state = None
        made: queue.Queue = queue.Queue(self.ahead)
        stop = threading.Event()

        def put(value) -> bool:
            while not stop.is_set():
                try:
                    made.put(value, timeout=0.05)
                    return True
                except queue.Full:
                    pass
            return False

        def run() -> None:
            try:
                for raw in self.inner:
                    if stop.is_set() or not put(
                        (as_tensors(raw, self.images), self.inner.state_dict())
                    ):
                        return
                put(_END)
            except BaseException as e:  # raised where the items are taken
                put(_Failed(e))

        thread = threading.Thread(target=run, name="cmal-batches", daemon=True)

        def halt() -> None:
            stop.set()
            thread.join()

        self._halt = halt
        thread.start()
        try:
            while (got := made.get()) is not _END:
                if isinstance(got, _Failed):
                    raise got.error
                item, self._state = got
                yield item
        finally:  # also when the consumer drops the iteration midway (training ends)
            halt()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict() if self._state is None else self._state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._halt()
        self._state = None
        self.inner.load_state_dict(state)


_END = object()


@dataclass
class _Failed:
    error: BaseException


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
                yield batch
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
