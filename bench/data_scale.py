"""Data at real scale: COCO-shaped (Karpathy json, 5 captions an image) and VG-shaped
(region descriptions, 50 phrases an image) fixtures at 36 x 2048 in the public layouts
(LXMERT obj36 tsv, synthetic features), converted and streamed.

    python bench/data_scale.py [--coco 1000] [--vg 100] [--workers 2]
    PYTHONPATH=/path/to/old/checkout python bench/data_scale.py --before

Prints, per fixture: shard bytes per text against one fp16 copy of the features per image;
conversion images/s with 1 and N processes (the conversion's own time, and the command's
wall time with its start-up); loader texts/s and MB/s of features (2 workers, batch 64,
an epoch after a first one that fills the cache), with the data-wait share of a training
step at a GPU's pace (a step of 64 texts in 64/5000 s, slept: the rate one H100/H200 trains
a BERT-base-sized encoder); the share of same-image text pairs in batches against a
uniform shuffle, on the VG fixture's loader and, from streaming's own epoch order, at full
size. ``--before`` runs the same on a checkout of the old layout (no --workers there).
It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GPU_RATE = 5000
"""Texts/s one GPU trains at (BERT-base-sized encoder, plain PyTorch, H100/H200)."""


def convert(fmt: str, files: dict, out: Path, workers: int, before: bool) -> dict:
    from scale_fixtures import CLASSES

    args = [sys.executable, "-m", "cmal.cli", "data", "convert", fmt, "--out", str(out),
            "--classes", str(CLASSES)]  # fmt: skip
    for key, value in files.items():
        args += [{"regions": "--regions", "captions": "--captions", "features": "--features",
                  "splits": "--splits"}[key], str(value)]  # fmt: skip
    if not before:
        args += ["--workers", str(workers)]
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(res.stderr)
    own = re.search(r"in ([\d.]+) s \(([\d.]+) images/s", res.stdout)
    return {"wall_s": wall, "own_s": float(own.group(1)) if own else None}


def loader(remote: Path, cache: Path, workers: int, feature_dim: int, image_of) -> dict:
    """On one loader, as training uses it: an epoch that fills the cache, three timed
    epochs (median texts/s, with and without the epoch's start until its first batch), one
    paced at a GPU's rate (data-wait share), and the same-image pairs of its batches."""
    import statistics

    from cmal.config import load_config
    from cmal.data.stream import open_dataset

    try:
        from cmal.data.batches import make_loader
    except ImportError:  # the old layout's checkout
        from cmal.data.stream import make_loader

    over = [f"data.remote={remote}", f"data.local={cache}", f"data.workers={workers}",
            "data.batch_size=64"]  # fmt: skip
    cfg = load_config(None, over).data
    dataset = open_dataset(cfg, feature_dim=feature_dim)
    items = make_loader(cfg, dataset, 40, 36)
    rates, steady, starts, out = [], [], [], {}
    for epoch in ("fill", "rate", "rate", "rate", "paced"):
        texts, waited, slept, batches, first = 0, 0.0, 0.0, [], None
        start = mark = time.perf_counter()
        for item in items:
            now = time.perf_counter()
            waited += now - mark
            texts += len(item["ids"])
            batches.append(item["ids"])
            if first is None:
                first, after = now, texts
            if epoch == "paced":
                step = len(item["ids"]) / GPU_RATE
                time.sleep(step)
                slept += step
            mark = time.perf_counter()
        seconds = time.perf_counter() - start
        if epoch == "rate":
            rates.append(texts / seconds)
            steady.append((texts - after) / (time.perf_counter() - first))
            starts.append(first - start)
            out["same_image"] = same_image_share(batches, image_of)
        if epoch == "paced":
            out["data_wait"] = waited / (waited + slept)
    out["texts_per_s"] = statistics.median(rates)
    out["texts_per_s_after_first_batch"] = statistics.median(steady)
    out["first_batch_s"] = statistics.median(starts)
    out["feature_mb_per_s"] = out["texts_per_s"] * 36 * feature_dim * 2 / 1e6
    out["texts_per_epoch"] = texts
    free(dataset)
    return out


def free(dataset) -> None:
    """Free ``dataset``'s shared memory now. An old checkout (``--before``) has no
    ``release``: there streaming's clean-up, which frees every job's memory on the node
    (run the bench with nothing else streaming)."""
    try:
        from cmal.data.stream import release
    except ImportError:
        from streaming.base.util import clean_stale_shared_memory

        clean_stale_shared_memory()
    else:
        release(dataset)


def same_image_share(batches: list[list], image_of) -> float:
    """Pairs of texts in one batch that share an image, as a share of all pairs in batches."""
    same = pairs = 0
    for ids in batches:
        images = [image_of(i) for i in ids]
        n = len(images)
        pairs += n * (n - 1) // 2
        counts: dict = {}
        for im in images:
            counts[im] = counts.get(im, 0) + 1
        same += sum(c * (c - 1) // 2 for c in counts.values())
    return same / max(pairs, 1)


def full_size_order(texts: int, per_image: int, algo: str) -> float:
    """Same-image pair share in the batches of 64 of a whole epoch of streaming's order over
    a shard set of ``texts`` texts written ``per_image`` to an image side by side (one rank,
    one worker; the order is computed from the index alone, no shard is read)."""
    import numpy as np
    from streaming import StreamingDataset

    folder = Path(tempfile.mkdtemp(prefix="cmal-order-"))
    shards, left = [], texts
    while left > 0:
        n = min(60_000, left)  # ~16 MB text shards of ~250-byte texts
        left -= n
        raw = {"basename": f"shard.{len(shards):05}.mds", "bytes": 1, "hashes": {}}
        shards.append({"column_encodings": ["str"], "column_names": ["id"],
                       "column_sizes": [None], "compression": None, "format": "mds",
                       "hashes": [], "raw_data": raw, "samples": n, "size_limit": 1 << 24,
                       "version": 2, "zip_data": None})  # fmt: skip
    (folder / "index.json").write_text(json.dumps({"version": 2, "shards": shards}))
    ds = StreamingDataset(local=str(folder), shuffle=True, shuffle_algo=algo, batch_size=64)
    ds._unique_worker_world = ds._unique_rank_world.detect_workers()
    ds._parallel_worker_world = ds._parallel_rank_world.detect_workers()
    ids = ds._get_work(*ds._resume_incr_epoch())
    free(ds)
    ids = ids[ids >= 0]
    ids = ids[: len(ids) // 64 * 64]
    batch = np.arange(len(ids)) // 64
    _, counts = np.unique(batch * (texts // per_image + 1) + ids // per_image, return_counts=True)
    return float((counts * (counts - 1) // 2).sum() / (len(ids) // 64 * 64 * 63 // 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", type=int, default=1000, help="COCO-shaped images")
    ap.add_argument("--vg", type=int, default=100, help="VG-shaped images")
    ap.add_argument("--workers", type=int, default=2, help="conversion processes")
    ap.add_argument("--before", action="store_true", help="the old layout's checkout")
    ap.add_argument("--tmp", default=None, help="working folder (default: a new temp one)")
    args = ap.parse_args()

    from scale_fixtures import feature_bytes, folder_bytes, write_coco, write_vg

    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="cmal-scale-"))
    sets = {
        "coco": ("karpathy", args.coco, 5, lambda: write_coco(tmp / "coco", args.coco)),
        "vg": ("vg", args.vg, 50, lambda: write_vg(tmp / "vg", args.vg)),
    }
    for name, (fmt, images, per, write) in sets.items():
        files = write()
        if fmt == "karpathy":
            files["splits"] = "train"
        texts = images * per
        one = convert(fmt, files, tmp / f"{name}-1", 1, args.before)
        row = {"set": name, "images": images, "texts": texts}
        row["bytes_per_text"] = folder_bytes(tmp / f"{name}-1") / texts
        row["bytes_ratio"] = folder_bytes(tmp / f"{name}-1") / feature_bytes(images)
        if (tmp / f"{name}-1" / "images").is_dir():
            store = folder_bytes(tmp / f"{name}-1" / "images")
            row["store_ratio"] = store / feature_bytes(images)
            row["text_bytes_per_text"] = (folder_bytes(tmp / f"{name}-1") - store) / texts
        row["convert_1_images_per_s_wall"] = images / one["wall_s"]
        if one["own_s"]:
            row["convert_1_images_per_s"] = images / one["own_s"]
        if not args.before:
            many = convert(fmt, files, tmp / f"{name}-{args.workers}", args.workers, False)
            row[f"convert_{args.workers}_images_per_s"] = images / many["own_s"]
            row[f"convert_{args.workers}_images_per_s_wall"] = images / many["wall_s"]
            row["convert_speedup"] = one["own_s"] / many["own_s"]
        try:
            from cmal.data.images import read_shard_set

            ids = {s["id"]: s["image"] for s in read_shard_set(tmp / f"{name}-1")}
        except ImportError:  # the old layout: read its samples with streaming
            from streaming import StreamingDataset

            old = StreamingDataset(local=str(tmp / f"{name}-1"), shuffle=False)
            ids = {old[i]["id"]: old[i]["image"] for i in range(len(old))}
        row.update(loader(tmp / f"{name}-1", tmp / f"cache-{name}", 2, 2048, ids.get))
        row["same_image_uniform"] = (per - 1) / (texts - 1)
        print(json.dumps({k: round(v, 6) if isinstance(v, float) else v for k, v in row.items()}))
        sys.stdout.flush()
    for texts, per in ((617_000, 5), (5_400_000, 50)):
        for algo in ("py1e", "naive"):
            share = full_size_order(texts, per, algo)
            uniform = (per - 1) / (texts - 1)
            print(json.dumps({"full_size_texts": texts, "per_image": per, "shuffle_algo": algo,
                              "same_image": share, "uniform": uniform}))  # fmt: skip


if __name__ == "__main__":
    main()
