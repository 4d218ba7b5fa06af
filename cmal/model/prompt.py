"""Cross-modal associative prompt layer (CMAP): anchor point masking + swap feature filling.

For each anchor pair (text slot j, region slot i), chosen with probability ``p_swap``:
both slots are blanked (anchor point masking), then the region's feature is written into
text slot j and the word's feature into region slot i (swap feature filling). The unified
encoder adds each slot's own position and modality embeddings afterwards, so a slot keeps
saying *where* while the filled feature says *what*.

Modes (``PromptConfig.mode``): ``both`` (default), ``text`` / ``region`` (fill only that
side; the other slot stays blanked), ``mask`` (blank both with a learned [MASK] vector per
modality, no filling). A region paired with several words is swapped at most once per
sample (the first chosen occurrence), so every filled slot has exactly one source.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cmal.config import PromptConfig


@dataclass
class Anchors:
    """Anchor pairs of a batch, padded to A pairs per sample."""

    text_pos: torch.Tensor
    """(B, A) long: token index j of the pair in the text."""
    region: torch.Tensor
    """(B, A) long: region slot i of the pair."""
    concept: torch.Tensor
    """(B, A) long: anchor-concept id (the AMC label)."""
    valid: torch.Tensor
    """(B, A) bool: False for padding."""


@dataclass
class Prompt:
    """The hybrid prompt after the layer, and which pairs were swapped."""

    text: torch.Tensor
    """(B, Lt, d) text slots."""
    regions: torch.Tensor
    """(B, R, d) region slots."""
    swapped: torch.Tensor
    """(B, A) bool: pairs that were masked (and filled, per mode)."""
    text_filled: bool
    """Whether the text slot j of a swapped pair is a prediction site."""
    region_filled: bool
    """Whether the region slot i of a swapped pair is a prediction site."""


class AssociativePrompt(nn.Module):
    """Anchor masking and swap feature filling on the two hyperspheres."""

    def __init__(self, cfg: PromptConfig, hidden: int):
        super().__init__()
        self.cfg = cfg
        # A learned blank only for the sides that stay blanked, so that every parameter
        # of the model is trained in every mode.
        blank_text = cfg.mode in ("region", "mask")
        blank_region = cfg.mode in ("text", "mask")
        self.text_mask = nn.Parameter(0.02 * torch.randn(hidden)) if blank_text else None
        self.region_mask = nn.Parameter(0.02 * torch.randn(hidden)) if blank_region else None

    def choose(self, anchors: Anchors, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, A) bool: the pairs to swap this step; one pair per region at most."""
        if generator is None:  # rand_like: torch.compile traces it at symbolic shapes
            draw = torch.rand_like(anchors.valid, dtype=torch.float)
        else:
            draw = torch.rand(anchors.valid.shape, generator=generator, device=anchors.valid.device)
        chosen = anchors.valid & (draw < self.cfg.p_swap)
        a = chosen.shape[1]
        same_region = anchors.region[:, :, None] == anchors.region[:, None, :]
        earlier = torch.ones(a, a, dtype=torch.bool, device=chosen.device).tril(-1)
        taken = (same_region & earlier & chosen[:, None, :]).any(-1)
        return chosen & ~taken

    def forward(
        self,
        text: torch.Tensor,
        regions: torch.Tensor,
        anchors: Anchors,
        noise: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Prompt:
        mode = self.cfg.mode
        if not (self.training and self.cfg.enabled):
            none = torch.zeros_like(anchors.valid)
            return Prompt(text, regions, none, False, False)
        swapped = self.choose(anchors, generator)
        # Every anchor slot is read and written, the unswapped ones to a spare slot: fixed
        # shapes, so the device never tells the host how many pairs were drawn.
        j, i = anchors.text_pos, anchors.region
        word, region = gather_slots(text, j), gather_slots(regions, i)
        if noise > 0:
            scale = (
                noise * text.new_tensor(word.shape[-1]).rsqrt() * word.norm(dim=-1, keepdim=True)
            )
            word = word + scale * torch.randn(word.shape, generator=generator, device=word.device)
            region = region + scale * torch.randn(
                region.shape, generator=generator, device=word.device
            )
        fill_text = mode in ("both", "text")
        fill_region = mode in ("both", "region")
        text_in = region if fill_text else self.text_mask.expand_as(word)
        region_in = word if fill_region else self.region_mask.expand_as(region)
        text = put_slots(text, j, swapped, text_in)
        regions = put_slots(regions, i, swapped, region_in)
        # In mask mode both blanked slots are the prediction sites.
        if mode == "mask":
            return Prompt(text, regions, swapped, True, True)
        return Prompt(text, regions, swapped, fill_text, fill_region)


def gather_slots(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, d) slots, (B, A) slot indices -> (B, A, d)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def put_slots(x: torch.Tensor, index: torch.Tensor, where: torch.Tensor, values: torch.Tensor):
    """``x`` (B, N, d) with ``values`` (B, A, d) written at slots ``index`` (B, A) where
    ``where``; the other rows go to a spare slot past the end, which is dropped."""
    n = x.shape[1]
    spare = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], 1)
    index = torch.where(where, index, n)[..., None].expand(-1, -1, x.shape[-1])
    return spare.scatter(1, index, values.to(x.dtype))[:, :n]
