"""torchvision's Faster R-CNN (ResNet-50 FPN, COCO classes) with RoI-pooled region features.

The weights come from a file the user points to (torchvision's
``fasterrcnn_resnet50_fpn_coco-258fb6c6.pth`` or any state dict of the same model); nothing
is downloaded. A region's feature is the box head's 1024-d output for its final box, the
vector the classifier saw — as BUTD features are the detector's pooled fc7.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from PIL import Image
from torchvision.models.detection import fasterrcnn_resnet50_fpn
from torchvision.transforms.functional import pil_to_tensor

from cmal.data.errors import DataError
from cmal.detect.base import Candidates
from cmal.detect.centernet import coco_categories

EXPECTED = "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"


class FasterRCNN:
    """Boxes above nothing but NMS (selection is :func:`cmal.detect.base.select`'s)."""

    name = "frcnn"
    feature_dim = 1024

    def __init__(
        self, weights: str | Path | None, device: str = "cpu", min_size: int = 800, max_size=1333
    ):
        if weights is None or not Path(weights).is_file():
            raise DataError(
                f"Faster R-CNN weights file not found: {weights}; expected a torchvision "
                f"fasterrcnn_resnet50_fpn state dict (e.g. {EXPECTED}), passed as --weights"
            )
        model = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=min_size, max_size=max_size
        )
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
        except (RuntimeError, OSError, KeyError, AttributeError, pickle.UnpicklingError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(
                f"{weights}: not a fasterrcnn_resnet50_fpn state dict ({first})"
            ) from None
        # Every box the heads produce goes on to our own selection rule.
        model.roi_heads.score_thresh = 0.0
        self.model = model.eval().to(device)
        self.device = device
        self.labels = coco_categories()

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Candidates:
        m = self.model
        x = pil_to_tensor(image).float().div(255).to(self.device)
        images, _ = m.transform([x])
        feats = m.backbone(images.tensors)
        proposals, _ = m.rpn(images, feats)
        dets, _ = m.roi_heads(feats, proposals, images.image_sizes)
        boxes = dets[0]["boxes"]  # in the resized frame, where the features are
        vec = m.roi_heads.box_head(m.roi_heads.box_roi_pool(feats, [boxes], images.image_sizes))
        orig = m.transform.postprocess(dets, images.image_sizes, [x.shape[-2:]])[0]
        # COCO's unused ids ("N/A") are no class: a box labelled so is dropped.
        real = torch.tensor(
            [self.labels[int(c)] != "N/A" for c in orig["labels"]], dtype=torch.bool
        )
        return Candidates(
            orig["boxes"][real].cpu(),
            orig["scores"][real].cpu(),
            [self.labels[int(c)] for c in orig["labels"][real].tolist()],
            vec[real.to(vec.device)].cpu(),
        )
