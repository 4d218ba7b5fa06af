"""Streaming the shards: local folder and a real S3 server, resume, ranks, bad shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from conftest import ROOT, _free_port, _stderr_of, start_moto, wait_until, write_shard_set

from cmal.config import ConfigError, load_config
from cmal.data.batches import make_loader
from cmal.data.errors import DataError
from cmal.data.images import read_shard_set
from cmal.data.stream import open_dataset, release


def cfg_for(remote: str, cache, *more: str):
    return load_config(
        None, [f"data.remote={remote}", f"data.local={cache}", "data.batch_size=8", *more]
    ).data


def epoch(data_cfg, stop_after: int | None = None, state=None):
    """Sample ids of one epoch (or its first batches), and the loader state at the end."""
    ds = open_dataset(data_cfg, feature_dim=128)
    loader = make_loader(data_cfg, ds, 40, 36)
    if state is not None:
        loader.load_state_dict(state)
    ids = []
    for k, batch in enumerate(loader):
        ids += batch["ids"]
        if stop_after is not None and k + 1 == stop_after:
            break
    out = loader.state_dict()
    del loader
    release(ds)  # not streaming's clean_stale_shared_memory: it unlinks other jobs' memory too
    return ids, out


def all_ids(folder) -> list[str]:
    return [s["id"] for s in read_shard_set(folder)]


def test_local_epoch_covers_every_sample_once(world, tmp_path):
    shards = world / "shards/pretrain/train"
    ids, _ = epoch(cfg_for(str(shards), tmp_path / "c"))
    assert sorted(ids) == sorted(all_ids(shards))
    assert not any(p.name.endswith(".tmp") for p in shards.iterdir())


def test_batches_are_model_ready(world, tmp_path):
    data = cfg_for(str(world / "shards/nlvr2/train"), tmp_path / "c", "data.workers=0")
    ds = open_dataset(data, feature_dim=128)
    batch = next(iter(make_loader(data, ds, 40, 36)))
    release(ds)
    b, b2 = batch["batch"], batch["batch2"]
    assert b.input_ids.shape[0] == 8 and b.region_feats.shape[-1] == 128
    assert b.text_mask[:, 0].all() and b2.region_mask.any(1).all()
    assert set(batch["label"].tolist()) <= {0, 1}
    j = b.anchors.text_pos[b.anchors.valid]
    assert (j > 0).all()


def test_a_released_dataset_leaves_no_descriptor_or_shared_memory(world, tmp_path, caplog):
    # A workflow opens dozens of datasets in one process; streaming alone keeps each one's
    # shared memory open until the process exits (a study ran out of descriptors so).
    data = cfg_for(str(world / "shards/ve/train"), tmp_path / "c", "data.workers=0")
    ds = open_dataset(data, feature_dim=128)
    next(iter(make_loader(data, ds, 40, 36)))  # an epoch left unfinished, as training does
    prefix = f"{ds._shm_prefix_int:06}_"

    def held() -> tuple[list[str], list[str]]:
        fds = []
        for f in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{f}"))
            except FileNotFoundError:  # closed meanwhile (the listing's own descriptor)
                pass
        mine = [f for f in fds if os.path.basename(f).startswith(prefix)]
        return mine, [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]

    assert all(held())
    release(ds)
    assert held() == ([], [])
    assert "Invalid shard state" not in caplog.text  # its threads were stopped first


def test_s3_matches_local(world, s3, tmp_path):
    remote = "s3://cmal/world/pretrain/train"
    ids, _ = epoch(cfg_for(remote, tmp_path / "c", f"data.s3_endpoint={s3}"))
    assert sorted(ids) == sorted(all_ids(world / "shards/pretrain/train"))


def test_mid_epoch_resume_yields_exactly_the_unseen(world, s3, tmp_path):
    data = cfg_for("s3://cmal/world/pretrain/train", tmp_path / "c", f"data.s3_endpoint={s3}")
    full, _ = epoch(data)
    first, state = epoch(data, stop_after=5)
    rest, _ = epoch(data, state=state)
    assert len(first) == 40
    assert not set(first) & set(rest)
    assert sorted(first + rest) == sorted(full)


def two_ranks(code: str) -> list[subprocess.Popen]:
    """Two ranks of one job on this node, each running ``code`` (python) after making the
    process group, as training has it: left to itself, streaming opens and destroys one
    per dataset on the same port, and a rank can reach the other's old store while it is
    being torn down (seen hanging after other tests)."""
    procs, port = [], str(_free_port())
    for rank in (0, 1):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        setup = (
            "import json, os, sys; sys.path.insert(0, 'tests'); rank = os.environ['RANK'];"
            "import torch.distributed as dist; dist.init_process_group('gloo');"
        )
        log = tempfile.TemporaryFile("w+")  # a file, not a pipe: nobody reads it until the end
        proc = subprocess.Popen([sys.executable, "-c", setup + code], cwd=ROOT, env=env,
                                stderr=log)  # fmt: skip
        proc.log = log
        procs.append(proc)
    return procs


def ended(procs: list[subprocess.Popen]) -> list[int]:
    """Each rank's exit code (the stderr of those that failed goes to the test's output)."""
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p in procs:
        if p.returncode:
            print(_stderr_of(p)[-3000:])
        p.log.close()
    return codes


def test_two_ranks_two_workers_are_disjoint_and_cover(world, tmp_path):
    shards = world / "shards/pretrain/train"
    procs = two_ranks(
        "from test_stream import cfg_for, epoch;"
        f"ids, _ = epoch(cfg_for({str(shards)!r}, {str(tmp_path / 'c')!r}, 'data.workers=2'));"
        f"json.dump(ids, open({str(tmp_path)!r} + f'/r{{rank}}.json', 'w'))"
    )
    assert ended(procs) == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in (0, 1))
    assert r0 and r1 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(all_ids(shards))


@pytest.mark.parametrize("store", [".", "images"])
def test_corrupted_shard_is_named(world, tmp_path, store):
    src = tmp_path / "src"
    shutil.copytree(world / "shards/vqa/val", src)
    shard = next((src / store).glob("*.mds"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard .*{shard.name}.* failed its sha1 check"):
        epoch(cfg_for(str(src), tmp_path / "c", "data.workers=0"))
    assert not list((tmp_path / "c" / "images").glob(".*part*"))  # nothing half-copied kept


def test_missing_folder_bucket_and_bad_credentials(s3, tmp_path):
    with pytest.raises(DataError, match="no index.json there"):
        open_dataset(cfg_for(str(tmp_path / "none"), tmp_path / "c"))
    with pytest.raises(DataError, match=r"s3://nobucket/x: the bucket does not exist"):
        open_dataset(cfg_for("s3://nobucket/x", tmp_path / "c2", f"data.s3_endpoint={s3}"))
    proc, url = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})  # this one checks keys
    try:
        with pytest.raises(DataError, match="refused the credentials"):
            open_dataset(
                cfg_for("s3://cmal/world/vqa/val", tmp_path / "c3", f"data.s3_endpoint={url}")
            )
    finally:
        proc.kill()


def image(key: str, dim: int) -> dict:
    """An image-store row of two regions of ``dim`` features."""
    return {"key": key, "feats": np.zeros((2, dim), np.float16),
            "boxes": np.zeros((2, 4), np.float32), "concepts": np.zeros(2, np.int32),
            "tags": ["dog", "cat"], "confidences": np.ones(2, np.float32)}  # fmt: skip


GOOD = {"id": "ok", "image": "1", "image_row": 0, "text": "a dog", "anchors": [[2, 0, 0]],
        "input_ids": np.array([101, 1037, 3899, 102], np.int32)}  # fmt: skip
"""A pre-training text of image "1"."""


def test_datasets_opened_at_once_on_a_node_take_turns(tmp_path):
    """Streaming names a dataset's shared memory by the first free prefix it finds, then
    creates it: two processes opening datasets at once collided (``FileExistsError:
    '/004303_locals'``, two test workers). Opening waits for the node's turn, a lock in
    /dev/shm that every job's local leader takes; the wait is bounded."""
    import fcntl
    import threading
    import time

    from cmal.data.stream import shm_prefix_turn, shm_turn_lock

    write_shard_set(tmp_path / "s", "pretrain", [GOOD], [image("1", 128)])
    data = cfg_for(str(tmp_path / "s"), tmp_path / "c", "data.workers=0")
    other = open(shm_turn_lock(), "a")  # another job's leader
    fcntl.flock(other, fcntl.LOCK_EX)
    released = threading.Event()

    def let_go() -> None:
        time.sleep(1.0)
        released.set()
        fcntl.flock(other, fcntl.LOCK_UN)

    threading.Thread(target=let_go).start()
    ds = open_dataset(data, feature_dim=128)
    assert released.is_set()  # it waited for the other job's turn to end
    release(ds)
    fcntl.flock(other, fcntl.LOCK_EX)
    start = time.monotonic()
    with shm_prefix_turn(wait_s=0.2):  # a turn never given: goes on without it
        assert time.monotonic() - start < 30
    fcntl.flock(other, fcntl.LOCK_UN)
    other.close()


def test_a_jobs_ranks_wait_for_their_leaders_turn(tmp_path):
    """Every rank of a job computes its dataset's prefix (the leader creates it, the others
    look it up by number): a rank that took its number while its leader waited for the
    node's turn got the one another job registered meanwhile, and stopped on that job's
    memory. Here the other job holds the turn and registers a prefix before letting go."""
    import fcntl
    import time
    from multiprocessing.shared_memory import SharedMemory

    from streaming.base.constant import LOCALS
    from streaming.base.shared.prefix import _check_and_find, _get_path, _pack_locals

    from cmal.data.stream import shm_turn_lock

    write_shard_set(tmp_path / "s", "pretrain", [GOOD], [image("1", 128)])
    # With its index not yet in the cache, rank 1 would wait for its leader to fetch it:
    # a cache filled by an earlier job lets it run ahead (as fine-tuning's does).
    release(open_dataset(cfg_for(str(tmp_path / "s"), tmp_path / "c", "data.workers=0")))
    procs = two_ranks(
        "import time; from test_stream import cfg_for;"
        "from cmal.data.stream import open_dataset, release;"
        f"data = cfg_for({str(tmp_path / 's')!r}, {str(tmp_path / 'c')!r}, 'data.workers=0');"
        f"open({str(tmp_path)!r} + f'/ready{{rank}}', 'w').close()\n"
        f"while not os.path.exists({str(tmp_path / 'go')!r}): time.sleep(0.05)\n"
        "release(open_dataset(data, feature_dim=128))"
    )
    try:
        wait_until(lambda: all((tmp_path / f"ready{r}").exists() for r in (0, 1)), 120,
                   "both ranks' datasets", procs, every=0.1)  # fmt: skip
    except AssertionError:
        for p in procs:  # the other rank waits for "go" for good
            p.kill()
        raise
    # The turn is held for seconds only: other tests' jobs wait for it meanwhile.
    other = open(shm_turn_lock(), "a")  # another job's leader
    fcntl.flock(other, fcntl.LOCK_EX)
    theirs = None
    try:
        (tmp_path / "go").touch()
        time.sleep(3)  # rank 1 is now as far as it goes without its leader
        prefix = _check_and_find([str(tmp_path / "theirs")], [None], LOCALS)
        packed = _pack_locals([str(tmp_path / "theirs")], prefix)
        theirs = SharedMemory(_get_path(prefix, LOCALS), create=True, size=len(packed))
        theirs.buf[: len(packed)] = packed
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        other.close()
    try:
        assert ended(procs) == [0, 0]
    finally:
        if theirs is not None:
            theirs.close()
            theirs.unlink()


def test_bad_sample_is_named_or_skipped(tmp_path):
    good = GOOD
    bad = {**good, "id": "broken", "image": "2", "image_row": 1}
    write_shard_set(tmp_path / "s", "pretrain", [good, bad, good], [image("1", 128), image("2", 7)])
    with pytest.raises(DataError, match=r"sample 'broken' \(image '2'\): feats: shape \(2, 7\)"):
        epoch(cfg_for(str(tmp_path / "s"), tmp_path / "c", "data.workers=0", "data.shuffle=false"))
    data = cfg_for(
        str(tmp_path / "s"), tmp_path / "c2", "data.workers=0", "data.on_bad_sample=skip"
    )
    batches = list(make_loader(data, open_dataset(data, feature_dim=128), 40, 36))
    assert sum(b["skipped"] for b in batches) == 1 and sum(len(b["ids"]) for b in batches) == 2
    # Concept ids beyond model.num_concepts: shards and config disagree, never skipped.
    write_shard_set(tmp_path / "wide", "pretrain", [{**good, "anchors": [[2, 0, 3]]}],
                    [image("1", 128)])  # fmt: skip
    wide = cfg_for(
        str(tmp_path / "wide"), tmp_path / "c3", "data.workers=0", "data.on_bad_sample=skip"
    )
    assert open_dataset(wide, feature_dim=128, num_concepts=4)[0]["id"] == "ok"
    with pytest.raises(
        ConfigError, match=r"model.num_concepts is 3 but sample 'ok' has concept id 3"
    ):
        open_dataset(wide, feature_dim=128, num_concepts=3)[0]
    # A text naming another image than its row holds: the store is not these shards'.
    write_shard_set(tmp_path / "mixed", "pretrain", [{**good, "image": "9"}], [image("1", 128)])
    with pytest.raises(DataError, match=r"image row 0 holds image '1', not '9'"):
        epoch(cfg_for(str(tmp_path / "mixed"), tmp_path / "c4", "data.workers=0"))


def test_shards_of_the_old_layout_get_one_line_naming_the_command(tmp_path):
    from streaming import MDSWriter

    columns = {"id": "str", "image": "str", "text": "str", "feats": "ndarray:float16"}
    with MDSWriter(out=str(tmp_path / "old"), columns=columns, hashes=["sha1"]) as w:
        w.write({"id": "1", "image": "1", "text": "a dog", "feats": np.zeros((2, 4), np.float16)})
    with pytest.raises(DataError, match=r"old layout .*write them again with `cmal data convert`"):
        open_dataset(cfg_for(str(tmp_path / "old"), tmp_path / "c"))


def test_reconverted_source_is_never_read_stale(world, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(world / "shards/ve/dev", src)
    data = load_config(None, [f"data.remote={src}", "data.workers=0", "data.shuffle=false"]).data
    first, _ = epoch(data)
    shutil.rmtree(src)
    shutil.copytree(world / "shards/ve/test", src)  # converted again, same path
    second, _ = epoch(data)
    assert sorted(second) == sorted(all_ids(world / "shards/ve/test")) != sorted(first)
    pinned = cfg_for(str(src), tmp_path / "pinned", "data.workers=0")
    epoch(pinned)
    shutil.rmtree(src)
    shutil.copytree(world / "shards/ve/dev", src)
    with pytest.raises(DataError, match="holds a cache of another version"):
        epoch(pinned)
