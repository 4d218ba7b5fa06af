"""What every detector gives, and how regions are chosen from its candidates.

A detector maps one RGB image to candidate boxes (pixels, x1 y1 x2 y2), class names,
confidences and one RoI-pooled feature vector per box. Which candidates become an image's
regions is decided here, the same way for every detector (UNITER/BUTD's rule): per-class
non-maximum suppression, then every box at or above ``min_confidence``, topped up to
``min_boxes`` with the next best and cut at ``max_boxes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torchvision.ops import batched_nms, roi_align


@dataclass
class DetectConfig:
    """How regions are extracted (``cmal extract``)."""

    detector: str = "centernet"
    """``centernet`` (MobileNetV3 CenterNet from @vladmandic/human, fetched with npm on first
    use) or ``frcnn`` (torchvision Faster R-CNN ResNet-50 FPN from ``weights``)."""
    weights: str | None = None
    """frcnn: the state-dict file (required); centernet: a folder holding centernet.json
    and centernet.bin (default: the cache folder, filled by npm on first use)."""
    min_confidence: float = 0.2
    """Boxes at or above this confidence are kept (UNITER's 0.2)."""
    min_boxes: int = 10
    """At least this many regions per image, taking the next best below the threshold."""
    max_boxes: int = 100
    """At most this many regions per image."""
    nms_iou: float = 0.5
    """IoU above which a lower-scoring box of the same class is suppressed."""
    fp16: bool = True
    """Store features as float16 (half the disk; the shards store float16 anyway)."""
    min_size: int = 800
    """frcnn: the shorter image side after resizing (torchvision's 800)."""
    device: str = "cpu"
    """Torch device the detector runs on."""
    on_bad_image: str = "error"
    """``error``: stop at an unreadable or empty image, naming it; ``skip``: count it."""
    convert_modes: bool = True
    """Convert grayscale, CMYK, palette and RGBA images to RGB (counted); False treats them
    as bad images."""
    key: str = "stem"
    """Image key from the file name: ``stem`` (file name without extension; Flickr30K,
    NLVR2) or ``coco-id`` (the trailing number: COCO_train2014_000000000009.jpg -> 9)."""


def detect_config(detector: str, settings: list[str]) -> DetectConfig:
    """Defaults, then ``detector``, then ``key=value`` settings (errors name the key)."""
    from cmal.config import ConfigError, fill

    cfg = fill(DetectConfig(detector=detector), None, settings)
    if not 0 <= cfg.min_confidence <= 1:
        raise ConfigError(f"min_confidence: must be in [0, 1], got {cfg.min_confidence}")
    if not 0 <= cfg.min_boxes <= cfg.max_boxes or cfg.max_boxes < 1:
        raise ConfigError(
            "min_boxes/max_boxes: need 0 <= min_boxes <= max_boxes and max_boxes >= 1, got "
            f"{cfg.min_boxes}/{cfg.max_boxes}"
        )
    return cfg


@dataclass
class Candidates:
    """A detector's raw output for one image."""

    boxes: torch.Tensor
    """(N, 4) float pixels x1, y1, x2, y2 in the original image."""
    scores: torch.Tensor
    """(N,) confidences."""
    labels: list[str]
    """(N,) class names."""
    features: torch.Tensor
    """(N, F) RoI-pooled features."""


class Detector(Protocol):
    name: str
    feature_dim: int

    def __call__(self, image: Image.Image) -> Candidates: ...


def select(c: Candidates, cfg: DetectConfig) -> np.ndarray:
    """Indices of the regions kept, best first (see the module docstring)."""
    if len(c.scores) == 0:
        return np.zeros(0, np.int64)
    classes = {name: k for k, name in enumerate(sorted(set(c.labels)))}
    idx = torch.tensor([classes[n] for n in c.labels])
    keep = batched_nms(c.boxes.float(), c.scores.float(), idx, cfg.nms_iou)  # score order
    confident = int((c.scores[keep] >= cfg.min_confidence).sum())
    n = min(max(confident, cfg.min_boxes), cfg.max_boxes, len(keep))
    return keep[:n].numpy()


def pool(maps: list[tuple[torch.Tensor, float]], boxes: torch.Tensor) -> torch.Tensor:
    """Mean of 7x7 RoIAlign over each (NCHW map, spatial scale), concatenated: (N, sum C)."""
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1).float()
    out = [
        roi_align(m.float(), rois, 7, scale, sampling_ratio=2, aligned=True).mean((2, 3))
        for m, scale in maps
    ]
    return torch.cat(out, 1)
