"""What a checkpoint folder holds and the proof that it still does: every file's size and
sha256 digest, listed in its ``state.json``, and the names its pickles may call.

A size catches a truncated file; only a digest catches a flipped bit or a file swapped
for another of the same size. ``state.json`` carries a digest of its own content (its
``seal``), so a flipped bit there is caught too. Each rank digests the files it wrote (a
file's name says whose it is), right after the save while they are in the page cache, so
the cost is one read per file spread over the ranks (``bench/NOTES.md`` has the rate).
Checking reads every file once, on threads (hashlib lets go of the GIL on large buffers).

The files are torch pickles, and a pickle can name any callable. Before anything loads
them, each one's pickle is scanned without running it, and every name in it must be
in :data:`ALLOWED`; the load itself then goes through torch's weights-only unpickler
(:func:`safe_loading`), which refuses any other name as well.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cmal.config import ConfigError

DIGEST = "sha256"
STATE = "state.json"
_CHUNK = 8 << 20
_THREADS = min(8, os.cpu_count() or 1)

ALLOWED = (
    # DeepSpeed's ZeRO optimizer files: plain classes and an enum, built from their fields.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    # The RNG states of checkpoints saved before they were kept as tensors: numpy arrays.
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",  # the Mersenne Twister's key
)
"""Every name a cmal checkpoint's pickles may hold besides torch's own tensor types."""


class Damaged(Exception):
    """One line: which file of the checkpoint is not what was saved, and how."""


def digest(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _digests(folder: Path, rels: list[str]) -> dict[str, str]:
    """``digest`` of each of ``rels``, on threads."""
    with ThreadPoolExecutor(_THREADS) as pool:
        return dict(zip(rels, pool.map(lambda rel: digest(folder / rel), rels), strict=True))


def writer(rel: str) -> int:
    """The rank that writes a checkpoint file: DeepSpeed's ``zero_pp_rank_<r>`` files and
    cmal's ``rng_rank<r>`` are each rank's own, the rest (the model states below ZeRO-3)
    rank 0's."""
    found = re.search(r"(?:zero_pp_rank_|rng_rank)(\d+)", Path(rel).name)
    return int(found.group(1)) if found else 0


def describe(folder: Path, rank: int) -> dict[str, dict]:
    """Size and digest of the files under ``folder`` that ``rank`` wrote."""
    rels = sorted(
        str(f.relative_to(folder))
        for f in folder.rglob("*")
        if f.is_file() and f.name != STATE and writer(str(f.relative_to(folder))) == rank
    )
    return {
        rel: {"bytes": (folder / rel).stat().st_size, DIGEST: d}
        for rel, d in _digests(folder, rels).items()
    }


def _canonical(state: dict) -> bytes:
    body = {k: v for k, v in state.items() if k != "seal"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(state: dict) -> dict:
    """``state`` with the digest of the rest of it, checked by :func:`damage`."""
    return {**state, "seal": hashlib.sha256(_canonical(state)).hexdigest()}


def unsafe_names(path: Path) -> list[str]:
    """Names in a torch file's pickle outside :data:`ALLOWED`, read without running it; a
    file that is not a ``torch.save`` zip is itself refused."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError) as e:
        return [f"<not a torch.save file: {str(e).splitlines()[0] if str(e) else e!r}>"]
    return [n for n in names if n not in ALLOWED]


def check(folder: Path, files: dict, read: bool = True) -> None:
    """Raise :class:`Damaged` unless every listed file is there at its size and digest
    (a size alone for checkpoints saved before digests), and no pickle in the folder
    names a callable outside :data:`ALLOWED`; ``read=False``: the sizes only."""
    for rel, saved in files.items():
        f = folder / rel
        if not f.is_file():
            raise Damaged(f"{rel} is missing")
        size = saved["bytes"] if isinstance(saved, dict) else saved
        if f.stat().st_size != size:
            raise Damaged(f"{rel} has {f.stat().st_size} of its {size} bytes")
    if not read:
        return
    with_digest = [rel for rel, saved in files.items() if isinstance(saved, dict)]
    found = _digests(folder, with_digest)
    for rel in with_digest:
        if found[rel] != files[rel][DIGEST]:
            raise Damaged(f"{rel} does not match its {DIGEST} digest (its bytes changed)")
    for f in sorted(folder.rglob("*.pt")):
        bad = unsafe_names(f)
        if bad:
            rel = f.relative_to(folder)
            raise Damaged(f"{rel} names {', '.join(bad)}, which a checkpoint never holds")


def damage(path: Path, read: bool = True) -> str | None:
    """What is wrong with a checkpoint folder, or None when it is complete: renamed into
    place, with a readable state.json, every file it lists at the size and digest it had
    when saved (a size alone for checkpoints saved before digests), and no pickle in it
    that names a callable outside :data:`ALLOWED`. ``read=False`` reads no file but
    state.json (sizes only: what keep-K pruning needs at every save)."""
    if not path.name.startswith("step_"):
        return "not a checkpoint folder"
    try:
        state = json.loads((path / STATE).read_text())
    except FileNotFoundError:
        return f"{STATE} is missing"
    except (OSError, ValueError) as e:
        return f"{STATE} is unreadable ({type(e).__name__})"
    if not isinstance(state, dict):
        return f"{STATE} is not a JSON object"
    if "seal" in state and hashlib.sha256(_canonical(state)).hexdigest() != state["seal"]:
        return f"{STATE} does not match its seal (its bytes changed)"
    try:
        check(path, state.get("files", {}), read)
    except Damaged as e:
        return str(e)
    except OSError as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def first_intact(paths: Iterable[Path], notes: list[str] | None) -> Path | None:
    """The first of ``paths`` that is not damaged; each one passed over is described in
    ``notes``."""
    for path in paths:
        why = damage(path)
        if why is None:
            return path
        if notes is not None:
            notes.append(f"{path.name} is damaged ({why})")
    return None


def said(where: Path, found: Path | None, notes: list[str]) -> Path | None:
    """``found``, with each checkpoint passed over said on stderr in one line that names
    its file; when every one was damaged, an error rather than starting over."""
    for note in notes:
        print(f"# warning: {where}: {note}; passed over", file=sys.stderr)
    if found is None and notes:
        raise ConfigError(
            f"{where}: no intact checkpoint ({'; '.join(notes)}); restore the damaged "
            "files, or move the checkpoints away to start the run over"
        )
    return found


@contextlib.contextmanager
def safe_loading():
    """Every ``torch.load`` inside — DeepSpeed's own, which ask for ``weights_only=False``,
    included — runs torch's weights-only unpickler, with :data:`ALLOWED` besides."""
    import importlib
    import warnings

    allowed = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy.core's deprecation, on numpy 2
            allowed.append(getattr(importlib.import_module(module), attr))
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before
