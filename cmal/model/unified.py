"""Unified semantic encoder (CMAI): one single-stream Transformer over the hybrid prompt
``[CLS] text… [SEP] regions…``.

Every slot gets its own position and modality-type embedding here, after the prompt
layer: a swapped slot keeps saying *where* it is while its feature says *what*.
"""

from __future__ import annotations

import torch
from torch import nn

from cmal.config import UnifiedConfig
from cmal.model.encoders import BOX_DIMS, box_geometry
from cmal.model.transformer import Encoder

TEXT, REGION = 0, 1
"""Modality-type ids."""


class UnifiedEncoder(nn.Module):
    """Self-attention over text and region slots together."""

    def __init__(self, cfg: UnifiedConfig, max_text_len: int, dropout: float):
        super().__init__()
        self.text_position = nn.Embedding(max_text_len, cfg.hidden)
        self.region_position = nn.Linear(BOX_DIMS, cfg.hidden)
        self.modality = nn.Embedding(2, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(dropout)
        self.encoder = Encoder(
            cfg.layers, cfg.hidden, cfg.heads, cfg.ff, dropout, cfg.layer_norm_eps
        )

    def forward(
        self,
        text: torch.Tensor,
        regions: torch.Tensor,
        text_mask: torch.Tensor,
        region_mask: torch.Tensor,
        boxes: torch.Tensor,
    ) -> torch.Tensor:
        """(B, Lt, d) and (B, R, d) slots -> (B, Lt + R, d) hidden states."""
        pos = torch.arange(text.shape[1], device=text.device)
        text = text + self.text_position(pos)[None] + self.modality.weight[TEXT]
        regions = regions + self.region_position(box_geometry(boxes)) + self.modality.weight[REGION]
        x = self.drop(self.ln(torch.cat([text, regions], dim=1)))
        return self.encoder(x, torch.cat([text_mask, region_mask], dim=1))
