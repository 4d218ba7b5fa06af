"""Files of a shard source — a local folder or ``s3://bucket/prefix`` (any S3-compatible
endpoint, from ``S3_ENDPOINT_URL``) — read whole or copied into a local cache, each copy
checked against the sha1 its index records before it is used."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from cmal.data.errors import DataError


def join(remote: str, *names: str) -> str:
    """``remote``/``names`` for a folder or an s3:// prefix."""
    return "/".join([remote.rstrip("/"), *names])


def _s3(remote: str) -> tuple[object, str, str]:
    import boto3

    bucket, _, key = remote[len("s3://") :].partition("/")
    return boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL")), bucket, key


def read_bytes(remote: str) -> bytes | None:
    """A small file of the source (an index.json); None when it cannot be read (opening
    the dataset then says why)."""
    if not remote.startswith("s3://"):
        path = Path(remote)
        return path.read_bytes() if path.is_file() else None
    try:
        client, bucket, key = _s3(remote)
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[attr-defined]
    except Exception:
        return None


def fetch(remote: str, dest: Path, sha1: str | None) -> None:
    """Copy ``remote`` to ``dest`` unless it is there: under a temporary name, checked
    against ``sha1``, then renamed, with a lock so that the ranks and loader workers of a
    node copy each file once. A corrupted copy is a DataError and leaves nothing behind."""
    if dest.is_file():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if dest.is_file():  # another process copied it while this one waited
            return
        part = dest.with_name(f".{dest.name}.part-{os.getpid()}")
        try:
            if remote.startswith("s3://"):
                client, bucket, key = _s3(remote)
                client.download_file(bucket, key, str(part))  # type: ignore[attr-defined]
            else:
                shutil.copyfile(remote, part)
            if sha1 is not None and _sha1(part) != sha1:
                raise DataError(
                    f"shard {remote} failed its sha1 check (corrupted); convert or upload it again"
                )
            os.replace(part, dest)
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"cannot read {remote}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
            ) from None
        finally:
            part.unlink(missing_ok=True)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
