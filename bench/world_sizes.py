"""Which small scene worlds have every split of every task: generates worlds of the given
sizes and seeds (files only) and lists those that would stop as too small.

    python bench/world_sizes.py --sizes 40-100 --seeds 5

It measures, it asserts nothing; the numbers behind ``cmal.data.world.MIN_IMAGES``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from cmal.data.errors import DataError
from cmal.data.world import WorldConfig, generate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="40-100", help="first-last (inclusive)")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    first, last = (int(x) for x in args.sizes.split("-"))
    too_small, tried, start = [], 0, time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(first, last + 1):
            for seed in range(args.seeds):
                out = Path(tmp) / f"{n}-{seed}"
                try:
                    generate(out, WorldConfig(images=n, seed=seed, workers=1))
                except DataError as e:
                    too_small.append((n, seed, str(e)))
                tried += 1
                shutil.rmtree(out, ignore_errors=True)
    print(f"{tried} worlds ({args.sizes} images x seeds 0-{args.seeds - 1}) in "
          f"{time.perf_counter() - start:.0f} s; too small: {len(too_small)}")  # fmt: skip
    for n, seed, why in too_small:
        print(f"  {n} images, seed {seed}: {why}")


if __name__ == "__main__":
    main()
