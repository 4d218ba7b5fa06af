"""Heads on the unified encoder: the pre-training heads (AMC, MLM, ITM, ITC for the
contrastive baseline) and the four downstream task heads."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, eps: float = 1e-12) -> nn.Sequential:
    """Linear -> GELU -> LayerNorm -> Linear: UNITER's classifier shape for every head."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        nn.LayerNorm(hidden, eps=eps),
        nn.Linear(hidden, out_dim),
    )


# ----------------------------------------------------------------------------- pre-training


class ConceptClassifier(nn.Module):
    """AMC, concept label space: a swapped slot -> logits over anchor concepts."""

    def __init__(self, hidden: int, num_concepts: int):
        super().__init__()
        self.net = mlp(hidden, hidden, num_concepts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class PairingPointer(nn.Module):
    """AMC, pointer label space: a swapped slot scores every slot of the other modality."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)

    def forward(
        self,
        sites: torch.Tensor,
        slots: torch.Tensor,
        slots_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B, S, d) sites, (B, N, d) candidate slots of the same samples -> (B, S, N)."""
        keys = self.key(slots)
        scores = torch.einsum("bsd,bnd->bsn", self.query(sites), keys) / math.sqrt(sites.shape[-1])
        return scores.masked_fill(~slots_mask[:, None], torch.finfo(scores.dtype).min)


class MaskedLMHead(nn.Module):
    """BERT's MLM head: transform, then a decoder to the WordPiece vocabulary."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__()
        self.net = mlp(hidden, hidden, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class MatchingHead(nn.Module):
    """ITM: [CLS] -> matched / not matched."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.net(cls)


class ContrastiveHead(nn.Module):
    """ITC (the contrastive baseline; retrieval): text [CLS] vs mean region, each projected
    and L2-normalised, learned temperature."""

    def __init__(self, hidden: int, temperature: float):
        super().__init__()
        self.text = nn.Linear(hidden, hidden)
        self.image = nn.Linear(hidden, hidden)
        self.log_inv_temp = nn.Parameter(torch.tensor([math.log(1.0 / temperature)]))

    def embed(self, text_cls: torch.Tensor, image_pool: torch.Tensor):
        """(B, d), (B', d) -> the unit vectors whose dot products ITC scores."""
        return F.normalize(self.text(text_cls), dim=-1), F.normalize(self.image(image_pool), dim=-1)

    def forward(self, text_cls: torch.Tensor, image_pool: torch.Tensor) -> torch.Tensor:
        """(B, d), (B, d) -> symmetric InfoNCE loss over the batch (pairs on the diagonal)."""
        return self.loss(*self.embed(text_cls, image_pool))

    def loss(
        self, t: torch.Tensor, v: torch.Tensor, same: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Symmetric InfoNCE of :meth:`embed`'s unit vectors. ``same`` (B, B) bool: which
        texts and images are pairs (retrieval batches hold several captions of one image:
        each is a positive, as ALBEF counts them); None: the diagonal."""
        # Clamp as CLIP does, so the temperature cannot collapse.
        logits = t @ v.t() * self.log_inv_temp.clamp(max=math.log(100.0)).exp()
        if same is None:
            target = torch.arange(len(t), device=t.device)
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        target = same.to(logits.dtype)
        return (
            _soft_cross_entropy(logits, target) + _soft_cross_entropy(logits.t(), target.t())
        ) / 2


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of cross-entropy against ``target`` (rows of 0/1) made distributions."""
    return -(F.log_softmax(logits, 1) * target / target.sum(1, keepdim=True)).sum(1).mean()


# ----------------------------------------------------------------------------- downstream


class VQAHead(nn.Module):
    """VQA v2: [CLS] -> 2-layer MLP -> answer-vocabulary logits (trained with BCE).
    ``in_dim``: width of what it reads (``hidden`` for [CLS] alone; see ``task.pool``)."""

    def __init__(self, hidden: int, num_answers: int, in_dim: int | None = None):
        super().__init__()
        self.net = mlp(in_dim or hidden, 2 * hidden, num_answers)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.net(cls)


class EntailmentHead(nn.Module):
    """SNLI-VE: [CLS] -> entailment / neutral / contradiction."""

    def __init__(self, hidden: int, in_dim: int | None = None):
        super().__init__()
        self.net = mlp(in_dim or hidden, 2 * hidden, 3)

    def forward(self, cls: torch.Tensor) -> torch.Tensor:
        return self.net(cls)


class PairReasoningHead(nn.Module):
    """NLVR2: [CLS] of (text, image 1) and of (text, image 2), concatenated -> 2-way."""

    def __init__(self, hidden: int, in_dim: int | None = None):
        super().__init__()
        self.net = mlp(2 * (in_dim or hidden), 2 * hidden, 2)

    def forward(self, cls1: torch.Tensor, cls2: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([cls1, cls2], dim=-1))


class RegionScoreHead(nn.Module):
    """REC: one score per region output; padding regions get -inf-like scores."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = mlp(hidden, hidden, 1)

    def forward(self, regions: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        scores = self.net(regions).squeeze(-1)
        return scores.masked_fill(~region_mask, torch.finfo(scores.dtype).min)
