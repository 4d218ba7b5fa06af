"""A conversion split into parts — disjoint slices of the images — written by processes on
one machine (``--workers N``) or by the tasks of a SLURM array (``cmal submit convert``),
then merged into one shard set.

Every part reads the annotation files and computes the same :class:`~.write.Plan`, writes
its slice into ``.<out>.parts-<signature>/p<k>`` (renamed there when complete, so a
requeued or rerun task sees its part done and skips it), and whoever finds every part done
merges them: the shard files are linked into one folder with one index per store, and that
folder is renamed to ``out``. The result is the shard set one process writes, sample for
sample (same order, same anchors, same image rows).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from cmal.data.convert import Record
from cmal.data.convert.write import Converted, Plan, SampleBuilder, read_part, write_part
from cmal.data.coverage import Coverage
from cmal.data.errors import DataError
from cmal.data.schema import IMAGES

DONE_FILE = "conversion.json"
"""Written into a finished shard set: its signature and counts."""


def check_out(out: str | Path) -> Path:
    """The shard folder to write, refused when it holds anything (earlier output stays)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; pick another --out")
    if out.exists() and any(out.iterdir()):
        raise DataError(
            f"{out}: shard folder exists and is not empty; remove it or pick another --out"
        )
    return out


def signature(*inputs: object) -> str:
    """What names a conversion's parts folder: its inputs (files by path, size and
    modification time) and settings. Parts of another conversion are never reused."""
    h = hashlib.sha1()
    for x in inputs:
        if isinstance(x, Path) and x.exists():
            st = x.stat()
            x = f"{x.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        h.update(repr(x).encode())
    return h.hexdigest()[:16]


def parts_folder(out: Path, sig: str, parts: int) -> Path:
    """Where the ``parts`` parts of a conversion are written, beside ``out``."""
    return out.with_name(f".{out.name}.parts-{sig}-{parts}")


def write_shards(
    records: Iterable[Record],
    builder: SampleBuilder,
    out: str | Path,
    task: str,
    on_bad_sample: Literal["error", "skip"] = "error",
    workers: int = 1,
    sig: str | None = None,
) -> Converted:
    """Write the records as a shard set in ``out`` (text samples, the image store, with
    the anchor vocabulary ``concepts.json`` and its coverage ``anchor_stats.json``),
    split over ``workers`` processes. Nothing appears at ``out`` before it is complete;
    with ``sig`` (see :func:`signature`), parts finished by an interrupted run are kept."""
    start = time.perf_counter()
    out = check_out(out)
    records = list(records)
    plan = Plan.of(records)
    spans = plan.spans(max(1, min(workers, len(plan.images))))
    parts = parts_folder(out, sig or f"pid{os.getpid()}", len(spans))
    todo = [k for k in range(len(spans)) if not (parts / _name(k)).is_dir()]
    try:
        if len(todo) == 1:
            _part(records, plan, builder, parts, task, spans, todo[0], on_bad_sample)
        elif todo:
            _in_processes(records, plan, builder, parts, task, spans, todo, on_bad_sample)
        done = merge(parts, len(spans), out, builder.vocab, sig)
    except BaseException as e:
        # Parts are kept for a rerun only when the run stopped (killed, a full disk): bad
        # input fails again, and mended input is another signature.
        if sig is None or isinstance(e, DataError):
            shutil.rmtree(parts, ignore_errors=True)
        raise
    shutil.rmtree(parts, ignore_errors=True)
    done.seconds = time.perf_counter() - start
    return done


def write_slice(
    records: Iterable[Record],
    builder: SampleBuilder,
    out: str | Path,
    task: str,
    on_bad_sample: Literal["error", "skip"],
    parts: int,
    k: int,
    sig: str,
) -> Converted | None:
    """Part ``k`` of ``parts`` (a SLURM array task): write it unless done, then merge if
    every part is done. The merged shard set's counts, or None while parts are missing."""
    out = Path(out)
    if finished(out, sig):
        return read_done(out)
    check_out(out)
    records = list(records)
    plan = Plan.of(records)
    folder = parts_folder(out, sig, parts)
    spans = plan.spans(parts)
    if k >= len(spans) or not spans[k]:
        raise DataError(f"part {k} of {parts}: the data has only {len(plan.images)} images")
    if not (folder / _name(k)).is_dir():
        _part(records, plan, builder, folder, task, spans, k, on_bad_sample)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if finished(out, sig):
            return read_done(out)
        if not all((folder / _name(j)).is_dir() for j in range(parts)):
            return None
        done = merge(folder, parts, out, builder.vocab, sig)
    shutil.rmtree(folder, ignore_errors=True)
    return done


def _name(k: int) -> str:
    return f"p{k:05}"


def _part(records, plan, builder, parts: Path, task, spans, k: int, on_bad_sample) -> None:
    """Write part ``k`` under a temporary name, renamed when complete."""
    tmp = parts / f".{_name(k)}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_part(records, plan, builder, tmp, task, spans[k], on_bad_sample)
        os.replace(tmp, parts / _name(k))
    except OSError as e:
        raise DataError(f"{parts}: cannot write part {k} ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _in_processes(records, plan, builder, parts, task, spans, todo, on_bad_sample) -> None:
    """Each part in a forked process (they inherit the records, the plan and the feature
    index); the first failure is raised here as the DataError its process met."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's threads and fork
    ctx = multiprocessing.get_context("fork")
    errors = ctx.SimpleQueue()

    def run(k: int) -> None:
        try:
            _part(records, plan, builder, parts, task, spans, k, on_bad_sample)
        except DataError as e:
            errors.put(str(e))
            os._exit(1)
        except BaseException:
            errors.put(f"part {k}: " + traceback.format_exc().strip().splitlines()[-1])
            os._exit(1)
        os._exit(0)

    procs = [ctx.Process(target=run, args=(k,)) for k in todo]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise DataError(errors.get() if not errors.empty() else "a conversion process died")


def merge(parts: Path, n: int, out: Path, vocab, sig: str | None = None) -> Converted:
    """The parts' shards as one shard set at ``out``: files linked (copied across file
    systems) under part-numbered names into a folder beside ``out``, one index.json for
    the texts and one for the images, the coverage summed; then renamed to ``out``."""
    merging = out.with_name(f".{out.name}.merging-{os.getpid()}")
    shutil.rmtree(merging, ignore_errors=True)
    total = Converted(str(out), 0, coverage=Coverage(vocab))
    try:
        (merging / IMAGES).mkdir(parents=True)
        text, images = [], []
        for k in range(n):
            part = parts / _name(k)
            got = read_part(part, vocab)
            if got.feature_dim is not None:
                if total.feature_dim not in (None, got.feature_dim):
                    raise DataError(
                        f"part {k} has {got.feature_dim}-dim region features, the parts "
                        f"before it {total.feature_dim}: the feature source mixes sizes"
                    )
                total.feature_dim = got.feature_dim
            for name in ("samples", "skipped", "anchors", "images", "bad_images"):
                setattr(total, name, getattr(total, name) + getattr(got, name))
            total.coverage.merge(got.coverage)
            text += _link_shards(part, merging, k)
            images += _link_shards(part / IMAGES, merging / IMAGES, k)
        if total.samples == 0:
            raise DataError(
                f"{out}: no sample was written (skipped {total.skipped}); check the inputs"
            )
        _write_index(merging / IMAGES, images)
        total.coverage.skipped = total.skipped
        total.coverage.write(merging)
        counts = {"signature": sig, "samples": total.samples, "skipped": total.skipped,
                  "anchors": total.anchors, "images": total.images,
                  "bad_images": total.bad_images, "feature_dim": total.feature_dim}  # fmt: skip
        (merging / DONE_FILE).write_text(json.dumps(counts, indent=1) + "\n")
        _write_index(merging, text)  # the text index last: it is what makes a shard set
        if out.exists():
            out.rmdir()  # checked empty before the parts were written
        os.replace(merging, out)
    except OSError as e:
        raise DataError(f"{out}: cannot write the shards ({type(e).__name__}: {e})") from None
    finally:
        shutil.rmtree(merging, ignore_errors=True)
    return total


def _link_shards(part: Path, dest: Path, k: int) -> list[dict]:
    index = json.loads((part / "index.json").read_text())
    shards = []
    for j, shard in enumerate(index["shards"]):
        name = f"shard.{k:05}.{j:05}.mds"
        src = part / shard["raw_data"]["basename"]
        try:
            os.link(src, dest / name)
        except OSError:
            shutil.copyfile(src, dest / name)
        shard["raw_data"]["basename"] = name
        shards.append(shard)
    return shards


def _write_index(folder: Path, shards: list[dict]) -> None:
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))


def finished(out: Path, sig: str) -> bool:
    """Whether ``out`` is the merged shard set of the conversion named ``sig``."""
    path = out / DONE_FILE
    return path.is_file() and json.loads(path.read_text()).get("signature") == sig


def read_done(out: Path) -> Converted:
    """The counts of a shard set already merged (its coverage is in anchor_stats.json)."""
    data = json.loads((out / DONE_FILE).read_text())
    del data["signature"]
    return Converted(str(out), **data)
