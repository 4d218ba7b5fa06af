"""Run folders under ``s3://bucket/prefix``: a local mirror that is written to, and the
object store that holds the truth.

A run on an object store is worked on in a local folder (``checkpoint.mirror``, default a
temp folder per node), exactly as a local run is; the store receives each checkpoint
after it is complete on disk. Objects cannot be renamed, so completeness is ordered
instead: every file of ``checkpoints/step_N/`` first, its ``state.json`` after them, and
the ``latest`` object last. A reader trusts only a step folder that has ``state.json``;
a process killed mid-upload leaves ``latest`` naming the previous complete checkpoint.

Nodes share nothing but the store: each node's first process uploads the files its
ranks wrote and downloads a checkpoint before its ranks load it. The endpoint is
``data.s3_endpoint`` or ``S3_ENDPOINT_URL`` (one object store per run).

Every file of a checkpoint goes up with its sha256 digest, taken when it was saved, for
the store to check against what arrives (``ChecksumSHA256``; a file over 5 GB goes in
parts, each checked); a refused upload stops the save like a full disk. A checkpoint
fetched from the store is checked against its digests before use, and one that fails is
fetched again once, then passed over for the next older one.

An unreachable store (stopped, restarting, network down) is retried with exponential
backoff (botocore's standard mode, ``ATTEMPTS`` tries); past that a :class:`StoreError`
says which store and why, and a save that needed it stops the run with ``latest`` (here and
on the store) still on the last complete checkpoint.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cmal.config import Config, ConfigError
from cmal.engine.files import write_atomic
from cmal.engine.manifest import DIGEST, STATE, damage, said
from cmal.errors import RunError

LATEST = "latest"
ATTEMPTS = 6
"""Tries of each store request (exponential backoff in between, about 30 s in all)."""
SINGLE_PUT = 5 << 30
"""S3's largest single PUT; a larger file goes up in parts, each with its own checksum."""


class StoreError(RunError):
    """The object store stayed unreachable through every retry."""


def _reachable(method):
    """Store methods turn a store that stays unreachable into one StoreError line."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        import botocore.exceptions

        try:
            return method(self, *args, **kwargs)
        except botocore.exceptions.BotoCoreError as e:
            raise StoreError(
                f"{self.field}: {self.url} unreachable after {ATTEMPTS} tries ({e})"
            ) from None

    return wrapper


def is_remote(path: str | Path) -> bool:
    return str(path).startswith("s3://")


def mirror_of(url: str, mirror_root: str | None = None) -> Path:
    """The local folder that mirrors ``url`` (the same on every call, per node)."""
    root = Path(mirror_root) if mirror_root else Path(tempfile.gettempdir()) / "cmal-runs"
    tag = hashlib.sha1(url.encode()).hexdigest()[:10]
    return root / f"{url.rstrip('/').rsplit('/', 1)[-1]}-{tag}"


class Store:
    """One run folder on an S3-compatible store: ``s3://bucket/prefix/<run>``."""

    def __init__(self, url: str, endpoint: str | None = None, field: str = "checkpoint.root"):
        import boto3

        self.field = field
        if not is_remote(url):
            raise ConfigError(f"{url}: not an s3:// address")
        self.url = url.rstrip("/")
        self.bucket, _, self.prefix = self.url[len("s3://") :].partition("/")
        if not self.bucket or not self.prefix:
            raise ConfigError(f"{field}: {url}: needs s3://bucket/prefix")
        from botocore.config import Config as Retries

        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint or os.environ.get("S3_ENDPOINT_URL"),
            config=Retries(retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                           connect_timeout=10, read_timeout=60),
        )  # fmt: skip
        self._check()

    def _check(self) -> None:
        import botocore.exceptions

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as e:
            raise ConfigError(
                f"{self.field}: cannot use bucket {self.bucket!r} of {self.url} "
                f"({e}); check the bucket, the credentials and data.s3_endpoint / "
                "S3_ENDPOINT_URL"
            ) from None

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if rel else self.prefix

    def _under(self, rel: str) -> str:
        return self.key(rel.strip("/")) + "/"

    # ------------------------------------------------------------------ objects

    @_reachable
    def read_bytes(self, rel: str) -> bytes | None:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(rel))["Body"]
        except self.client.exceptions.NoSuchKey:
            return None
        return body.read()

    def read_text(self, rel: str) -> str | None:
        data = self.read_bytes(rel)
        return None if data is None else data.decode()

    @_reachable
    def write_text(self, rel: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.key(rel), Body=text.encode())

    @_reachable
    def exists(self, rel: str) -> bool:
        import botocore.exceptions

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(rel))
            return True
        except botocore.exceptions.ClientError:
            return False

    @_reachable
    def _list(self, rel: str, nested: bool) -> tuple[list[str], list[str]]:
        """(keys, sub-folder names) under ``rel/``, relative to it; ``nested``: every key
        at any depth (and no folders), else only the keys and folders right under it."""
        base = self._under(rel)
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=base, **({} if nested else {"Delimiter": "/"})
        )
        keys, folders = [], []
        for page in pages:
            keys += [o["Key"][len(base) :] for o in page.get("Contents", [])]
            folders += [
                p["Prefix"][len(base) :].rstrip("/") for p in page.get("CommonPrefixes", [])
            ]
        return keys, folders

    def keys(self, rel: str) -> list[str]:
        """Every key under ``rel/``, relative to it."""
        return self._list(rel, nested=True)[0]

    def files(self, rel: str) -> list[str]:
        """The keys right under ``rel/`` (not in its sub-folders)."""
        return self._list(rel, nested=False)[0]

    def folders(self, rel: str) -> list[str]:
        """Names of the sub-folders right under ``rel/``."""
        return sorted(self._list(rel, nested=False)[1])

    @_reachable
    def upload(self, local: Path, rel: str, sha256: str | None = None) -> None:
        """``local`` to ``rel``, checked by the store: against ``sha256`` (the digest the
        file had when it was written) where given, else against one boto3 computes."""
        import boto3.exceptions
        import botocore.exceptions

        try:
            if sha256 is None or local.stat().st_size > SINGLE_PUT:
                self.client.upload_file(str(local), self.bucket, self.key(rel),
                                        ExtraArgs={"ChecksumAlgorithm": "SHA256"})  # fmt: skip
                return
            with open(local, "rb") as f:
                self.client.put_object(
                    Bucket=self.bucket, Key=self.key(rel), Body=f,
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256)).decode(),
                )  # fmt: skip
        except (botocore.exceptions.ClientError, boto3.exceptions.S3UploadFailedError) as e:
            raise StoreError(
                f"{self.url}/{rel}: the store refused the upload of {local} ({e})"
            ) from None

    def upload_tree(self, local: Path, rel: str, files: dict[str, dict]) -> None:
        """The ``files`` of a checkpoint's manifest that are under ``local`` (this node's)."""
        for name, saved in sorted(files.items()):
            if (local / name).is_file():
                self.upload(local / name, f"{rel}/{name}", saved.get(DIGEST))

    def upload_top(self, local: Path) -> None:
        """The run folder's own files (config, log, metrics, predictions), not checkpoints."""
        for path in sorted(p for p in local.iterdir() if p.is_file()):
            if not path.name.startswith("."):
                self.upload(path, path.name)

    @_reachable
    def download_tree(self, rel: str, local: Path) -> None:
        """Every object under ``rel/`` into ``local`` (written aside, then renamed)."""
        tmp = local.with_name(f".tmp-pull-{local.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        for name in self.keys(rel):
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(self.bucket, self.key(f"{rel}/{name}"), str(target))
        if local.exists():
            shutil.rmtree(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, local)

    def fetch_checkpoint(self, name: str, local: Path) -> str | None:
        """Make ``local`` the store's ``checkpoints/<name>`` and check it: what is wrong
        with it (see :func:`~cmal.engine.manifest.damage`), or None. A mirror whose
        state.json is the store's is kept if it checks, else downloaded afresh (a mirror
        left by an earlier run of the same name, or a file that rotted there)."""
        remote = self.read_text(f"checkpoints/{name}/{STATE}")
        mine = local / STATE
        if remote is not None and mine.is_file() and mine.read_text() == remote:
            if damage(local) is None:
                return None
        self.download_tree(f"checkpoints/{name}", local)
        return damage(local)

    def newest_intact(self, checkpoints: Path) -> Path | None:
        """The newest checkpoint complete on the store whose files, fetched into
        ``checkpoints/``, check; those passed over are said on stderr in one line each."""
        notes: list[str] = []
        for name in self.complete_checkpoints():
            why = self.fetch_checkpoint(name, checkpoints / name)
            if why is None:
                return said(checkpoints, checkpoints / name, notes)
            notes.append(f"{name} is damaged ({why})")
        return said(checkpoints, None, notes)

    # ------------------------------------------------------------------ checkpoints

    def complete_checkpoints(self) -> Iterator[str]:
        """``checkpoints/<step>`` folders with their state.json on the store: the one
        ``latest`` names first, then the others newest first (asked one at a time)."""
        named = (self.read_text(f"checkpoints/{LATEST}") or "").strip()
        steps = [s for s in reversed(self.folders("checkpoints")) if s.startswith("step_")]
        if named in steps:
            steps.remove(named)
            steps.insert(0, named)
        return (s for s in steps if self.exists(f"checkpoints/{s}/{STATE}"))

    def newest_checkpoint(self) -> str | None:
        """The first of :meth:`complete_checkpoints` (not fetched, not checked)."""
        return next(self.complete_checkpoints(), None)

    @_reachable
    def delete_tree(self, rel: str) -> None:
        keys = [self.key(f"{rel}/{k}") for k in self.keys(rel)]
        for i in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[i : i + 1000]]
            self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": chunk})

    def publish(self, step_folder: Path, keep: int) -> None:
        """After every file of ``step_folder`` is up: its state.json, then ``latest``, then
        the oldest complete checkpoints beyond ``keep`` go."""
        rel = f"checkpoints/{step_folder.name}"
        self.upload(step_folder / STATE, f"{rel}/{STATE}")
        self.write_text(f"checkpoints/{LATEST}", step_folder.name + "\n")
        steps = [s for s in self.folders("checkpoints") if s.startswith("step_")]
        complete = [s for s in steps if self.exists(f"checkpoints/{s}/{STATE}")]
        for old in complete[:-keep]:
            if old != step_folder.name:
                self.delete_tree(f"checkpoints/{old}")
        for partial in set(steps) - set(complete):
            if partial > step_folder.name:
                continue  # never a newer save in flight
            self.delete_tree(f"checkpoints/{partial}")


def store_for(cfg: Config, url: str) -> Store:
    return Store(url, cfg.data.s3_endpoint)


def local_run(path: str | Path, endpoint: str | None = None) -> Path:
    """A run folder given by the user, made local: an s3:// run's own files and its newest
    complete checkpoint are fetched into its mirror (local paths are returned as given)."""
    if not is_remote(path):
        return Path(path)
    store = Store(str(path), endpoint)
    local = mirror_of(store.url)
    local.mkdir(parents=True, exist_ok=True)
    names = store.files("")
    if not names:
        raise ConfigError(f"{path}: no run folder there (no objects under it)")
    for name in names:
        store.client.download_file(store.bucket, store.key(name), str(local / name))
    newest = store.newest_intact(local / "checkpoints")
    if newest:
        write_atomic(local / "checkpoints" / LATEST, newest.name + "\n")
    return local
