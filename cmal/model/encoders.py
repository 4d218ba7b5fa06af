"""Uni-modal semantic encoders (UMSE) and the hypersphere heads.

Text: BERT embeddings (word + position + segment) and ``L_t`` BERT layers.
Visual: region feature and 7-d box geometry, each projected and normalised, summed, and
``L_v`` layers; the box is the region's position encoding.
Each modality's output is projected to the unified width and put on its own hypersphere:
L2-normalised per token, times a learnable radius.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cmal.config import SphereConfig, TextEncoderConfig, VisualEncoderConfig
from cmal.model.transformer import Encoder

BOX_DIMS = 7
"""Box geometry per region: x1, y1, x2, y2, w, h, area (image-normalised)."""


def box_geometry(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) image-normalised x1,y1,x2,y2 -> (…, 7) with width, height and area."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)


class TextEncoder(nn.Module):
    """BERT embeddings + BERT layers over WordPiece ids."""

    def __init__(self, cfg: TextEncoderConfig, dropout: float):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.position = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.encoder = Encoder(
            cfg.layers, cfg.hidden, cfg.heads, cfg.ff, dropout, cfg.layer_norm_eps
        )

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Segment 0 everywhere: a caption is a single segment.
        x = self.word(input_ids) + self.position(pos)[None] + self.segment.weight[0]
        return self.encoder(self.drop(self.ln(x)), mask)


class VisualEncoder(nn.Module):
    """Region features + box geometry -> Transformer layers."""

    def __init__(self, cfg: VisualEncoderConfig, dropout: float):
        super().__init__()
        self.feature = nn.Linear(cfg.feature_dim, cfg.hidden)
        self.feature_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.geometry = nn.Linear(BOX_DIMS, cfg.hidden)
        self.geometry_ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.encoder = Encoder(
            cfg.layers, cfg.hidden, cfg.heads, cfg.ff, dropout, cfg.layer_norm_eps
        )

    def forward(self, feats: torch.Tensor, boxes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.feature_ln(self.feature(feats)) + self.geometry_ln(
            self.geometry(box_geometry(boxes))
        )
        return self.encoder(self.drop(self.ln(x)), mask)


class Hypersphere(nn.Module):
    """Project to the unified width, L2-normalise per token, scale by a learnable radius."""

    def __init__(self, in_dim: int, out_dim: int, cfg: SphereConfig):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        radius = cfg.scale_init if cfg.scale_init is not None else math.sqrt(out_dim)
        self.radius = nn.Parameter(torch.tensor([float(radius)]), requires_grad=cfg.learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x), dim=-1) * self.radius
