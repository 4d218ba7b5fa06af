"""Shared test helpers: tiny configs and generated batches (no fixtures from disk)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two tests at a time on two cores: one thread each. OpenMP's threads spin at every
    # barrier, so a 2-thread test beside another busy process ran ~20x slower (measured).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]

from cmal.config import load_config  # noqa: E402
from cmal.model.cmal import Batch  # noqa: E402
from cmal.model.prompt import Anchors  # noqa: E402

FULL_FIXTURES = {"world", "s3", "slurm", "finished_run", "centernet"}
"""Fixtures that make a world, start servers or a cluster, or train: a test that uses one
is in the full tier only (``just test``); the rest is the quick tier (``just test-quick``)."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if FULL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker(
            "slow"
        ):
            item.add_marker(pytest.mark.full)


def tiny_config(*overrides: str):
    """The tiny model config with overrides."""
    return load_config(ROOT / "configs/model/tiny.yaml", list(overrides))


def random_batch(cfg, n: int = 4, text_len: int = 12, regions: int = 6, seed: int = 0) -> Batch:
    """A batch of n samples with two anchor pairs each (the second sample: one, padded)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 5000, (n, text_len), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    text_mask = torch.ones(n, text_len, dtype=torch.bool)
    text_mask[1, -3:] = False  # one padded caption
    region_mask = torch.ones(n, regions, dtype=torch.bool)
    region_mask[2, -2:] = False  # one image with fewer regions
    concepts = torch.randint(0, cfg.amc_classes(), (n, regions), generator=g)
    text_pos = torch.tensor([[2, 5]] * n)
    region = torch.tensor([[0, 3]] * n)
    valid = torch.ones(n, 2, dtype=torch.bool)
    valid[1, 1] = False
    anchors = Anchors(text_pos, region, concepts.gather(1, region), valid)
    boxes = torch.rand(n, regions, 2, generator=g) * 0.5
    boxes = torch.cat([boxes, boxes + 0.1 + 0.4 * torch.rand(n, regions, 2, generator=g)], -1)
    feats = torch.randn(n, regions, cfg.visual.feature_dim, generator=g)
    return Batch(ids, text_mask, feats, boxes, region_mask, concepts, anchors)


@pytest.fixture
def tiny():
    return tiny_config()


def scene_batch(cfg, n: int = 4, regions: int = 5, mentions: int = 3, seed: int = 0) -> Batch:
    """A batch with the structure of real pairs: every region has a concept whose feature
    is a fixed code vector plus noise, and the caption mentions some regions' concepts by
    a word of their own (the anchors), between filler words."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(cfg.amc_classes(), cfg.visual.feature_dim, generator=g)
    concepts = torch.stack([torch.randperm(20, generator=g)[:regions] for _ in range(n)])
    feats = codes[concepts] + 0.1 * torch.randn(n, regions, cfg.visual.feature_dim, generator=g)
    text_len = 2 + 2 * mentions
    ids = torch.randint(1000, 1010, (n, text_len), generator=g)  # filler words
    ids[:, 0], ids[:, -1] = 101, 102
    text_pos = torch.arange(mentions) * 2 + 2
    region = torch.stack([torch.randperm(regions, generator=g)[:mentions] for _ in range(n)])
    ids[:, text_pos] = 2000 + concepts.gather(1, region)  # the concept's own word
    boxes = torch.rand(n, regions, 2, generator=g) * 0.5
    boxes = torch.cat([boxes, boxes + 0.3], -1)
    anchors = Anchors(
        text_pos.repeat(n, 1),
        region,
        concepts.gather(1, region),
        torch.ones(n, mentions, dtype=torch.bool),
    )
    return Batch(
        ids,
        torch.ones_like(ids, dtype=torch.bool),
        feats,
        boxes,
        torch.ones(n, regions, dtype=torch.bool),
        concepts,
        anchors,
    )


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small scene world with all its shards (written once per test session)."""
    from cmal.data.convert.world import convert_world
    from cmal.data.world import WorldConfig, generate
    from cmal.model.pretrained import load_tokenizer

    root = tmp_path_factory.mktemp("world")
    generate(root, WorldConfig(images=160, seed=5, workers=1))
    convert_world(root, root / "shards", load_tokenizer())
    return root


def write_shard_set(folder: Path, task: str, texts: list[dict], images: list[dict]) -> Path:
    """A hand-made shard set: ``texts`` (text columns) and ``images`` (image-store rows)."""
    from streaming import MDSWriter

    from cmal.data.schema import IMAGE_COLUMNS, IMAGES, columns

    with MDSWriter(out=str(folder), columns=columns(task), hashes=["sha1"]) as w:
        for t in texts:
            w.write(t)
    with MDSWriter(out=str(folder / IMAGES), columns=IMAGE_COLUMNS, hashes=["sha1"]) as w:
        for image in images:
            w.write(image)
    return folder


def _stderr_of(proc: subprocess.Popen) -> str:
    """An ended process's stderr: its pipe, or the file a test gave it as ``proc.log`` (a
    file, not a pipe, where nobody reads until the end)."""
    log = getattr(proc, "log", None)
    if log is not None:
        log.seek(0)
        return log.read()
    try:
        return proc.communicate(timeout=30)[1] or ""
    except subprocess.TimeoutExpired:  # its children hold the pipe open
        return "(stderr still open)"


def wait_until(
    check: Callable[[], object],
    timeout: float,
    what: str,
    procs: Iterable = (),
    every: float = 0.05,
):
    """``check()``'s first true value, asked every ``every`` s; a refused or failed HTTP
    connection counts as not yet (a server that is starting), other errors propagate. Fails
    the test after ``timeout`` s, or as soon as one of ``procs`` (what is being waited on)
    has ended, with the end of its stderr: a rank that died early made such loops sit out
    their whole timeout, and one without a bound hung a suite run for good."""
    import urllib.error

    end, last = time.monotonic() + timeout, None
    while True:
        try:
            got = check()
        except (ConnectionError, urllib.error.URLError) as e:
            got, last = None, e
        if got:
            return got
        for p in procs:
            if p.poll() is not None:
                err = _stderr_of(p)
                raise AssertionError(f"waiting for {what}: process {p.pid} exited "
                                     f"{p.returncode} first:\n{err[-3000:]}")  # fmt: skip
        if time.monotonic() > end:
            raise AssertionError(f"waiting for {what}: not there after {timeout:g} s"
                                 + (f" (last: {last!r})" if last else ""))  # fmt: skip
        time.sleep(every)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env_extra: dict[str, str] | None = None):
    """A real S3-compatible server (moto_server) on 127.0.0.1; returns (process, url)."""
    import shutil
    import urllib.request

    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(url + "/moto-api/", timeout=1), 20,
                   "moto_server", procs=[proc], every=0.1)  # fmt: skip
    except AssertionError:
        proc.kill()
        raise
    return proc, url


@pytest.fixture(scope="session")
def s3(world):
    """moto_server with the world's shards uploaded to s3://cmal/world/..."""
    import boto3

    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    proc, url = start_moto()
    client = boto3.client("s3", endpoint_url=url)
    client.create_bucket(Bucket="cmal")
    shards = world / "shards"
    for path in shards.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), "cmal", f"world/{path.relative_to(shards)}")
    yield url
    proc.kill()
    proc.wait()
