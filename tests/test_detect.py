"""Region extraction with real detectors: CenterNet's real weights on real photos, Faster
R-CNN's real architecture with random weights, and the extraction job around them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmal.data.errors import DataError
from cmal.data.features import FeatureSource
from cmal.detect.base import Candidates, DetectConfig, select
from cmal.detect.extract import extract

SAMPLES = Path(__import__("skimage.data").data.__file__).parent
"""scikit-image's bundled sample photos."""


@pytest.fixture(scope="module")
def centernet():
    from cmal.detect.centernet import CenterNet

    return CenterNet()  # fetched with npm into the cache on first use


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cmal.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "photo, expected",
    [
        ("astronaut.png", "person"),
        ("coffee.png", "cup"),
        ("motorcycle_left.png", "motorcycle"),
        ("horse.png", "horse"),
    ],
)
def test_centernet_finds_the_objects_of_real_photos(centernet, photo, expected):
    image = Image.open(SAMPLES / photo).convert("RGB")
    cand = centernet(image)
    keep = select(cand, DetectConfig())
    confident = {cand.labels[i] for i in keep if cand.scores[i] >= 0.2}
    assert expected in confident
    best = keep[0]
    assert cand.labels[best] == expected  # the most confident box is the photo's subject
    x1, y1, x2, y2 = cand.boxes[best].tolist()
    w, h = image.size
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and (x2 - x1) * (y2 - y1) > 0.05 * w * h
    assert cand.features.shape == (len(cand.scores), centernet.feature_dim)
    assert torch.isfinite(cand.features).all() and cand.features.abs().sum() > 0


def test_tfjs_executor_matches_torch_on_a_hand_built_graph(tmp_path):
    """SAME padding (asymmetric when odd), HWIO kernels, fused bias + Relu6, depthwise
    kernels and TF's legacy bilinear resize, against torch computed directly."""
    from cmal.detect.tfjs import GraphModel

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 3, 2, 4, generator=g)  # HWIO
    b = torch.randn(4, generator=g)
    dw = torch.randn(3, 3, 4, 1, generator=g)  # H W C M
    weights = {"w": w, "b": b, "dw": dw, "size": torch.tensor([10, 12], dtype=torch.int32)}
    b64 = __import__("base64").b64encode

    def attr_list(key, values):
        return {key: {"list": {"i": [str(v) for v in values]}}}

    def s(x: str) -> dict:
        return {"s": b64(x.encode()).decode()}

    nodes = [
        {"name": "x", "op": "Placeholder"},
        *({"name": k, "op": "Const"} for k in weights),
        {"name": "conv", "op": "_FusedConv2D", "input": ["x", "w", "b"],
         "attr": {**attr_list("strides", [1, 2, 2, 1]), "padding": s("SAME"),
                  "fused_ops": {"list": {"s": [s("BiasAdd")["s"], s("Relu6")["s"]]}}}},
        {"name": "dwconv", "op": "DepthwiseConv2dNative", "input": ["conv", "dw"],
         "attr": {**attr_list("strides", [1, 1, 1, 1]), "padding": s("SAME")}},
        {"name": "up", "op": "ResizeBilinear", "input": ["dwconv", "size"],
         "attr": {"align_corners": {"b": False}, "half_pixel_centers": {"b": False}}},
    ]  # fmt: skip
    blob, manifest = b"", []
    for k, v in weights.items():
        blob += v.numpy().tobytes()
        dtype = "int32" if v.dtype == torch.int32 else "float32"
        manifest.append({"name": k, "shape": list(v.shape), "dtype": dtype})
    (tmp_path / "m.bin").write_bytes(blob)
    spec = {"format": "graph-model", "modelTopology": {"node": nodes},
            "weightsManifest": [{"paths": ["m.bin"], "weights": manifest}]}  # fmt: skip
    (tmp_path / "m.json").write_text(json.dumps(spec))
    x = torch.randn(1, 9, 11, 2, generator=g)  # odd sizes: TF pads more at the end
    out = GraphModel(tmp_path / "m.json").run({"x": x}, ["conv", "dwconv", "up"])

    xin = torch.nn.functional.pad(x.permute(0, 3, 1, 2), (1, 1, 1, 1))  # 11->6, 9->5: 1 + 1
    ref = torch.nn.functional.conv2d(xin, w.permute(3, 2, 0, 1), b, stride=2).clamp(0, 6)
    assert torch.allclose(out["conv"].permute(0, 3, 1, 2), ref, atol=1e-5)
    ref2 = torch.nn.functional.conv2d(
        torch.nn.functional.pad(ref, (1, 1, 1, 1)), dw.permute(2, 3, 0, 1).reshape(4, 1, 3, 3),
        groups=4,
    )  # fmt: skip
    assert torch.allclose(out["dwconv"].permute(0, 3, 1, 2), ref2, atol=1e-5)
    up = out["up"]
    assert up.shape == (1, 10, 12, 4)
    # Legacy TF resize: output pixel (i, j) samples input (i * 5/10, j * 6/12), no half-pixel.
    src = out["dwconv"]
    assert torch.allclose(up[0, 2, 4], src[0, 1, 2], atol=1e-6)
    assert torch.allclose(up[0, 3, 4], (src[0, 1, 2] + src[0, 2, 2]) / 2, atol=1e-6)


def _photos(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("astronaut.png", "coffee.png"):
        (folder / name).write_bytes((SAMPLES / name).read_bytes())
    return folder


def test_extract_writes_the_npz_feature_format_and_resumes(centernet, tmp_path):
    images = _photos(tmp_path / "images")
    rgb = np.asarray(Image.open(SAMPLES / "chelsea.png").convert("RGB"))
    Image.fromarray(rgb).convert("L").save(images / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    out = tmp_path / "feats"
    cfg = DetectConfig()
    first = extract(centernet, str(images), out, cfg, progress=False)
    assert (first.done, first.already, first.converted) == (4, 0, 2)
    source = FeatureSource(out)  # the converters' reader: ready for ⊕ and training
    assert sorted(source.keys()) == ["astronaut", "cmyk", "coffee", "gray"]
    r = source["coffee"]
    assert r.features.dtype == np.float16 and r.features.shape[1] == 608
    assert cfg.min_boxes <= len(r.tags) <= cfg.max_boxes and "cup" in r.tags
    assert (np.diff(r.confidences) <= 0).all()  # best first
    assert ((r.boxes >= 0) & (r.boxes <= 1)).all()
    raw = np.load(out / "coffee.npz")
    assert (int(raw["image_w"]), int(raw["image_h"])) == Image.open(images / "coffee.png").size

    # A killed run leaves at most a temp file, never a half .npz; a rerun skips what exists.
    (out / "coffee.npz").unlink()
    (out / ".coffee.npz.123.tmp").write_bytes(b"partial")
    again = extract(centernet, str(images), out, cfg, progress=False)
    assert (again.done, again.already) == (1, 3)
    assert "cup" in FeatureSource(out)["coffee"].tags


def test_ranks_split_the_images(centernet, tmp_path):
    images = _photos(tmp_path / "images")
    (images / "b.png").write_bytes((SAMPLES / "horse.png").read_bytes())
    out = tmp_path / "feats"
    done = [
        extract(centernet, str(images), out, DetectConfig(), r, 2, progress=False) for r in (0, 1)
    ]
    assert [d.done for d in done] == [2, 1]
    assert sorted(p.stem for p in out.glob("*.npz")) == ["astronaut", "b", "coffee"]
    assert sorted(p.name for p in (out / "_extract").iterdir()) == ["rank-0.json", "rank-1.json"]


def test_bad_images_are_named_or_skipped_and_counted(centernet, tmp_path):
    images = _photos(tmp_path / "images")
    (images / "empty.jpg").write_bytes(b"")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        extract(centernet, str(images), tmp_path / "a", DetectConfig(), progress=False)
    skip = DetectConfig(on_bad_image="skip")
    done = extract(centernet, str(images), tmp_path / "b", skip, progress=False)
    assert done.done == 2 and done.skipped == {
        "broken.png": done.skipped["broken.png"],
        "empty.jpg": "empty.jpg: empty file (0 bytes)",
    }
    (images / "empty.jpg").unlink()
    (images / "broken.png").unlink()
    Image.new("L", (64, 64), 90).save(images / "gray.png")
    with pytest.raises(DataError, match=r"gray\.png: L image, not RGB"):
        extract(
            centernet,
            str(images),
            tmp_path / "c",
            DetectConfig(convert_modes=False),
            progress=False,
        )
    # Through the command line: one line, exit code 2, nothing from deep inside.
    res = _cli(
        "extract", "--images", str(images), "--out", str(tmp_path / "d"), "convert_modes=false"
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == (
        "error: gray.png: L image, not RGB (convert_modes is off)"
    )
    res = _cli("extract", "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "e"))
    assert res.returncode == 2 and "is not a folder or an s3:// prefix" in res.stderr


def test_images_from_an_s3_prefix(centernet, s3, tmp_path):
    import boto3

    client = boto3.client("s3", endpoint_url=s3)
    for name in ("astronaut.png", "coffee.png"):
        client.put_object(
            Bucket="cmal", Key=f"photos/sub/{name}", Body=(SAMPLES / name).read_bytes()
        )
    done = extract(
        centernet, "s3://cmal/photos", tmp_path / "f", DetectConfig(), endpoint=s3, progress=False
    )
    assert done.done == 2
    assert "person" in FeatureSource(tmp_path / "f")["astronaut"].tags


def test_faster_rcnn_from_a_weights_file(tmp_path):
    """The real torchvision architecture with random weights saved to a file: the job runs
    and writes the schema (what it detects is noise, so only shapes are checked)."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    from cmal.detect.centernet import coco80
    from cmal.detect.frcnn import FasterRCNN

    with pytest.raises(DataError, match="fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"):
        FasterRCNN(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a state dict")
    with pytest.raises(DataError, match=r"junk\.pth: not a fasterrcnn_resnet50_fpn state dict"):
        FasterRCNN(tmp_path / "junk.pth")

    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    torch.save(model.state_dict(), tmp_path / "frcnn.pth")
    images = _photos(tmp_path / "images")
    out = tmp_path / "feats"
    res = _cli(
        "extract", "--detector", "frcnn", "--images", str(images), "--out", str(out),
        f"weights={tmp_path / 'frcnn.pth'}", "min_size=320", "min_boxes=5", "max_boxes=20",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "extracted 2 images" in res.stdout
    for key in ("astronaut", "coffee"):
        r = FeatureSource(out)[key]
        assert r.features.shape[1] == 1024 and 5 <= len(r.tags) <= 20
        assert len(r.boxes) == len(r.tags) == len(r.confidences)
        assert set(r.tags) <= set(coco80())  # never "N/A" or the background slot


def test_select_keeps_confident_boxes_within_min_and_max():
    n = 30
    boxes = torch.tensor([[i * 10.0, 0, i * 10.0 + 8, 8] for i in range(n)])
    scores = torch.linspace(0.9, 0.01, n)
    cand = Candidates(boxes, scores, ["a"] * n, torch.zeros(n, 2))
    cfg = DetectConfig(min_confidence=0.5, min_boxes=3, max_boxes=10)
    confident = int((scores >= 0.5).sum())
    assert len(select(cand, cfg)) == min(confident, 10)
    assert len(select(cand, DetectConfig(min_confidence=0.95, min_boxes=3))) == 3
    # Overlapping boxes of one class: the weaker one goes; of two classes, both stay.
    dup = Candidates(torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([0.9, 0.8]),
                     ["a", "a"], torch.zeros(2, 2))  # fmt: skip
    assert select(dup, DetectConfig(min_boxes=0)).tolist() == [0]
    dup.labels = ["a", "b"]
    assert select(dup, DetectConfig(min_boxes=0)).tolist() == [0, 1]
