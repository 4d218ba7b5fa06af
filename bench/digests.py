"""What the checkpoint digests cost: sha256 GB/s on this machine (one thread, and the
threads ``cmal.engine.manifest`` uses), and the digest's share of a save and of a resume
of the same bytes (``torch.save`` / ``torch.load`` of a state dict the size of a model's
checkpoint: fp32 weights and two Adam moments, what DeepSpeed writes with the same calls).

    python bench/digests.py [--params 110e6] [--tmp /tmp]

Prints one JSON line per measurement; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    import torch

    from cmal.engine import manifest

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=float, default=110e6, help="model parameters")
    ap.add_argument("--tmp", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp) / "step_00000001"
        folder.mkdir()
        n = int(args.params)
        # Weights and the two moments in separate files, as ZeRO writes model and optimizer.
        parts = {"model.pt": {"w": torch.randn(n)},
                 "optim.pt": {"m": torch.randn(n), "v": torch.randn(n)}}  # fmt: skip
        save = sum(timed(lambda f=f, s=s: torch.save(s, folder / f)) for f, s in parts.items())
        size = sum((folder / f).stat().st_size for f in parts)
        one = timed(lambda: [manifest.digest(folder / f) for f in parts])
        files: dict = {}
        describe = timed(lambda: files.update(manifest.describe(folder, 0)))
        check = timed(lambda: manifest.check(folder, files))

        def load():
            with manifest.safe_loading():
                for f in parts:
                    torch.load(folder / f, map_location="cpu", weights_only=True)

        resume = timed(load)
        gb = size / 1e9
        print(json.dumps({"bytes": size, "digest_gb_per_s_one_thread": gb / one,
                          "digest_gb_per_s_threads": gb / describe,
                          "threads": manifest._THREADS,
                          "save_s": save, "digest_at_save_s": describe,
                          "share_of_save": describe / (save + describe),
                          "load_s": resume, "check_at_resume_s": check,
                          "share_of_resume": check / (resume + check)}))  # fmt: skip


if __name__ == "__main__":
    main()
