"""Loader throughput: samples/s of the streaming reader from a local folder and from an
S3-compatible server on 127.0.0.1, next to the raw bytes/s of reading the same shard files.

    python bench/loader.py [--images 2000] [--workers 2]

Prints a table and the ratios; it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def raw_read(folder: Path) -> tuple[float, int]:
    """Seconds and bytes to read every shard file of ``folder`` (cold copy, no decoding)."""
    files = sorted(folder.glob("*.mds"))
    start = time.perf_counter()
    total = sum(len(f.read_bytes()) for f in files)
    return time.perf_counter() - start, total


def stream(remote: str, cache: Path, workers: int, endpoint: str | None) -> tuple[float, int]:
    from cmal.config import load_config
    from cmal.data.batches import make_loader
    from cmal.data.stream import open_dataset, release

    over = [
        f"data.remote={remote}",
        f"data.local={cache}",
        f"data.workers={workers}",
        "data.batch_size=64",
    ]
    if endpoint:
        over.append(f"data.s3_endpoint={endpoint}")
    cfg = load_config(None, over).data
    dataset = open_dataset(cfg, feature_dim=128)
    loader = make_loader(cfg, dataset, 40, 36)
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["ids"])
    seconds = time.perf_counter() - start
    del loader
    release(dataset)  # not clean_stale_shared_memory: it unlinks every job's memory on the node
    return seconds, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    import boto3
    from conftest import start_moto

    from cmal.data.convert.world import convert_world
    from cmal.data.world import WorldConfig, generate
    from cmal.model.pretrained import load_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="cmal-bench-"))
    counts = generate(tmp / "w", WorldConfig(images=args.images, seed=0))
    print(f"world: {args.images} images at {counts['images_per_s']:.0f} images/s (rendering)")
    convert_world(tmp / "w", tmp / "w/shards", load_tokenizer())
    shards = tmp / "w/shards/pretrain/train"

    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    proc, url = start_moto()
    try:
        s3 = boto3.client("s3", endpoint_url=url)
        s3.create_bucket(Bucket="bench")
        for f in shards.iterdir():
            s3.upload_file(str(f), "bench", f"pretrain/{f.name}")
        raw_s, nbytes = raw_read(shards)
        loc_s, n = stream(str(shards), tmp / "cache-local", args.workers, None)
        s3_s, n3 = stream("s3://bench/pretrain", tmp / "cache-s3", args.workers, url)
    finally:
        proc.kill()
    per_sample = nbytes / n
    print(f"{'source':<22}{'samples/s':>12}{'MB/s':>10}")
    print(f"{'raw file read':<22}{n / raw_s:>12.0f}{nbytes / raw_s / 1e6:>10.1f}")
    print(f"{'stream local':<22}{n / loc_s:>12.0f}{n * per_sample / loc_s / 1e6:>10.1f}")
    print(f"{'stream s3 (moto)':<22}{n3 / s3_s:>12.0f}{n3 * per_sample / s3_s / 1e6:>10.1f}")
    print(f"local stream / raw read: {raw_s / loc_s:.4f}")
    print(f"s3 stream / raw read:    {raw_s / s3_s:.4f}")


if __name__ == "__main__":
    main()
