"""Padding waste: the share of padded text tokens and region slots in the batches the
training loader makes, without and with length bucketing (``data.bucket_pool``).

    python bench/padding.py                               # the scene world + real captions
    python bench/padding.py --shards DIR [DIR ...] --pools 1,4,16 --batch 64

Sources by default: the scene world's pre-training and VQA shards (a world of
``--images`` images is made in a temporary folder unless ``--world`` names one), and the
100 real COCO captions of ``tests/fixtures`` converted with LXMERT-layout features whose
region count is a stand-in detector's (the classes the captions name plus 2, at most 12).
Waste = padded slots / all slots, over every batch of one epoch (at most ``--batches``).
It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def waste(shards: str, batch: int, pool: int, batches: int, local: str) -> tuple[float, ...]:
    """(text waste, region waste, both) over the batches of one epoch."""
    from cmal.config import DataConfig
    from cmal.data.batches import make_loader
    from cmal.data.stream import open_dataset, release

    cfg = DataConfig(remote=shards, local=local, batch_size=batch, workers=0, bucket_pool=pool)
    dataset = open_dataset(cfg)
    loader = make_loader(cfg, dataset, max_text_len=40, max_regions=36)
    real_t = real_r = slots_t = slots_r = 0
    for k, item in enumerate(loader):
        if k == batches:
            break
        if not item.get("ids"):
            continue
        b = item["batch"]
        real_t += int(b.text_mask.sum())
        real_r += int(b.region_mask.sum())
        slots_t += b.text_mask.numel()
        slots_r += b.region_mask.numel()
    release(dataset)
    return (1 - real_t / slots_t, 1 - real_r / slots_r,
            1 - (real_t + real_r) / (slots_t + slots_r))  # fmt: skip


def sources(args, tmp: Path) -> dict[str, str]:
    if args.shards:
        return {Path(s).name: s for s in args.shards}
    from test_formats import convert_real_captions

    from cmal.data.convert.world import convert_world
    from cmal.data.world import WorldConfig, generate
    from cmal.model.pretrained import load_tokenizer

    world = Path(args.world) if args.world else tmp / "world"
    if not args.world:
        generate(world, WorldConfig(images=args.images, seed=0, workers=1))
        convert_world(world, world / "shards", load_tokenizer())
    convert_real_captions(tmp, tmp / "coco")
    return {
        "world pretrain": str(world / "shards/pretrain/train"),
        "world vqa": str(world / "shards/vqa/train"),
        "real COCO captions": str(tmp / "coco"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", nargs="*", help="shard folders (default: see above)")
    p.add_argument("--world", help="an existing world folder (default: make one)")
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pools", default="1,4,16")
    p.add_argument("--batches", type=int, default=200)
    args = p.parse_args()
    pools = [int(x) for x in args.pools.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, shards in sources(args, Path(tmp)).items():
            for pool in pools:
                local = tempfile.mkdtemp(dir=tmp)
                t, r, both = waste(shards, args.batch, pool, args.batches, local)
                rows.append((name, pool, t, r, both))
                print(rows[-1], flush=True)
    print("\n| source | bucket_pool | text padded | regions padded | all slots padded |")
    print("|---|---|---|---|---|")
    for name, pool, t, r, both in rows:
        print(f"| {name} | {pool} | {t:.1%} | {r:.1%} | {both:.1%} |")


if __name__ == "__main__":
    main()
