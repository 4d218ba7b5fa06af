"""The CMAL model: uni-modal encoders on hyperspheres -> associative prompt -> unified
encoder -> AMC / MLM / ITM (/ ITC for the contrastive baseline).

    from cmal.config import load_config
    from cmal.model.cmal import CMAL
    model = CMAL(load_config("configs/model/tiny.yaml").model)
    losses = model.pretrain_losses(batch)      # dict: loss, amc, mlm, itm
    hidden = model(batch)                      # fine-tuning / inference: no masking

Reconstruction from the paper's abstract: the structure is the paper's, every default is
ours and is a field of :class:`cmal.config.ModelConfig`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from cmal.config import ModelConfig
from cmal.model.encoders import BOX_DIMS, Hypersphere, TextEncoder, VisualEncoder
from cmal.model.heads import (
    ConceptClassifier,
    ContrastiveHead,
    MaskedLMHead,
    MatchingHead,
    PairingPointer,
)
from cmal.model.prompt import Anchors, AssociativePrompt, Prompt, gather_slots
from cmal.model.transformer import init_bert_, matmul_flops
from cmal.model.unified import UnifiedEncoder

MASK_TOKEN_ID = 103
"""[MASK] in the bert-base-uncased vocabulary (also MiniLM's)."""
SPECIAL_TOKEN_IDS = (0, 100, 101, 102, 103)
"""[PAD], [UNK], [CLS], [SEP], [MASK]: never chosen for MLM."""


@dataclass
class Batch:
    """A padded batch of image-text pairs, as the collate function builds it."""

    input_ids: torch.Tensor
    """(B, Lt) long WordPiece ids, [CLS] first."""
    text_mask: torch.Tensor
    """(B, Lt) bool, True on real tokens."""
    region_feats: torch.Tensor
    """(B, R, F) float detector features."""
    boxes: torch.Tensor
    """(B, R, 4) float x1, y1, x2, y2 normalised by image width/height."""
    region_mask: torch.Tensor
    """(B, R) bool, True on real regions."""
    region_concepts: torch.Tensor
    """(B, R) long concept id of each region's tag, -1 where it has none."""
    anchors: Anchors
    """Anchor pairs, padded."""

    def to(self, device: torch.device | str) -> Batch:
        """Copy to ``device`` (non-blocking where the source is pinned)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Anchors):
                v = Anchors(*(getattr(v, g.name).to(device, non_blocking=True) for g in fields(v)))
            else:
                v = v.to(device, non_blocking=True)
            moved[f.name] = v
        return Batch(**moved)


IGNORE = -100
"""Target of a row that is no prediction site (losses are computed in fixed shapes: the
device never has to tell the host how many sites a batch has)."""


def _ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows whose target is not :data:`IGNORE`; 0 (with a
    graph) rather than NaN when there is none."""
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def mlm_rows(tokens: int, mlm_prob: float) -> int:
    """Rows the MLM head scores for a batch of ``tokens`` text slots: 1.5x the expected
    sites and 8 more. A batch drawing more sites than this masks only the first ones (as
    BERT's ``max_predictions_per_seq`` does); at 15% the cap is 4.3 or more standard
    deviations above the mean count for every batch size, 6 or more from 600 tokens on."""
    return min(tokens, math.ceil(1.5 * mlm_prob * tokens) + 8)


class CMAL(nn.Module):
    """Cross-Modal Associative Learning."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, losses = cfg.unified.hidden, cfg.losses
        self.text = TextEncoder(cfg.text, cfg.dropout)
        self.visual = VisualEncoder(cfg.visual, cfg.dropout)
        self.text_sphere = Hypersphere(cfg.text.hidden, d, cfg.sphere)
        self.region_sphere = Hypersphere(cfg.visual.hidden, d, cfg.sphere)
        self.prompt = AssociativePrompt(cfg.prompt, d)
        self.unified = UnifiedEncoder(cfg.unified, cfg.text.max_positions, cfg.dropout)
        # Pre-training heads exist only when their loss is on, so every parameter trains.
        self.amc = None
        if losses.amc and cfg.prompt.enabled:
            concept = losses.amc_labels == "concept"
            self.amc = ConceptClassifier(d, cfg.amc_classes()) if concept else PairingPointer(d)
        self.mlm = MaskedLMHead(d, cfg.text.vocab_size) if losses.mlm else None
        self.itm = MatchingHead(d) if losses.itm else None
        self.itc = ContrastiveHead(d, losses.itc_temperature) if losses.itc else None
        init_bert_(self)

    # ------------------------------------------------------------------ forward paths

    def spheres(self, input_ids, text_mask, feats, boxes, region_mask):
        """Uni-modal encoders, each onto its hypersphere: (B, Lt, d), (B, R, d)."""
        t = self.text_sphere(self.text(input_ids, text_mask))
        v = self.region_sphere(self.visual(feats.to(t.dtype), boxes.to(t.dtype), region_mask))
        return t, v

    def forward(self, batch: Batch) -> torch.Tensor:
        """Fine-tuning / inference: (B, Lt + R, d) unified hidden states, no masking."""
        t, v = self.spheres(
            batch.input_ids, batch.text_mask, batch.region_feats, batch.boxes, batch.region_mask
        )
        return self.unified(t, v, batch.text_mask, batch.region_mask, batch.boxes.to(t.dtype))

    def embeddings(self, t, v, region_mask):
        """Retrieval's unit vectors: each text's [CLS] and each image's mean region, from the
        spheres' states ``t``, ``v``; through the ITC projections where the model has them,
        else the spheres' own directions (a model pre-trained without ITC, zero-shot)."""
        pooled = _masked_mean(v, region_mask)
        if self.itc is not None:
            return self.itc.embed(t[:, 0], pooled)
        return F.normalize(t[:, 0], dim=-1), F.normalize(pooled, dim=-1)

    def match_logits(self, t, v, text_mask, region_mask, boxes) -> torch.Tensor:
        """ITM's (P, 2) not-matched / matched logits of P text-image pairs, from the
        spheres' states (the model must have its ITM head)."""
        return self.itm(self.unified(t, v, text_mask, region_mask, boxes.to(t.dtype))[:, 0])

    def pretrain_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """All enabled pre-training losses of one batch, and their weighted sum ``loss``."""
        _cfg, losses = self.cfg, self.cfg.losses
        dev = batch.input_ids.device
        n, lt = batch.input_ids.shape
        input_ids, text_mask, anchors = batch.input_ids, batch.text_mask, batch.anchors

        # ITM sees the captions as they are, in a pass of its own (as UNITER and ALBEF do):
        # were its negatives scored in the masked pass, the [MASK] tokens and swapped
        # features that only positives carry would tell it the label.
        negative = torch.zeros(n, dtype=torch.bool, device=dev)
        if self.itm is not None and n > 1:
            negative = torch.rand(n, device=dev) < losses.itm_neg_prob

        mlm_sites = torch.zeros_like(text_mask)
        if self.mlm is not None:
            input_ids, mlm_sites = self._mask_tokens(input_ids, text_mask, anchors)

        t, v = self.spheres(
            input_ids, text_mask, batch.region_feats, batch.boxes, batch.region_mask
        )
        boxes = batch.boxes.to(t.dtype)
        out: dict[str, torch.Tensor] = {}

        if self.amc is not None or self.mlm is not None:
            pointer = losses.amc_labels == "pointer" and self.amc is not None
            prompt = self.prompt(t, v, anchors, noise=losses.pointer_noise if pointer else 0.0)
            hidden = self.unified(prompt.text, prompt.regions, text_mask, batch.region_mask, boxes)
            ht, hr = hidden[:, :lt], hidden[:, lt:]
            if self.amc is not None:
                out["amc"] = self._amc_loss(ht, hr, text_mask, batch.region_mask, anchors, prompt)
            if self.mlm is not None:
                out["mlm"] = self._mlm_loss(ht, batch.input_ids, mlm_sites)

        if self.itm is not None or self.itc is not None:
            # Unmasked captions: the text encoder is uni-modal, so a negative's borrowed
            # caption is the donor's row of the same encoding.
            clean = t
            if self.mlm is not None:
                clean = self.text_sphere(self.text(batch.input_ids, text_mask))
            if self.itc is not None:
                pooled = _masked_mean(v, batch.region_mask)
                out["itc"] = self.itc(clean[:, 0], pooled) if n > 1 else t.sum() * 0.0
            if self.itm is not None:
                pair_t, pair_mask = clean, text_mask
                if n > 1:  # a batch of one has no other caption to borrow
                    donor = self._negative_donors(batch)
                    pair_t = torch.where(negative[:, None, None], clean[donor], clean)
                    pair_mask = torch.where(negative[:, None], text_mask[donor], text_mask)
                pair = self.unified(pair_t, v, pair_mask, batch.region_mask, boxes)
                out["itm"] = _ce(self.itm(pair[:, 0]), (~negative).long())
        weights = {
            "amc": losses.amc_weight,
            "mlm": losses.mlm_weight,
            "itm": losses.itm_weight,
            "itc": losses.itc_weight,
        }
        out["loss"] = sum(weights[k] * v for k, v in out.items())
        return out

    # ------------------------------------------------------------------ loss pieces

    def _negative_donors(self, batch: Batch) -> torch.Tensor:
        """For every sample, the index of another sample whose caption it may borrow."""
        n = batch.input_ids.shape[0]
        dev = batch.input_ids.device
        if not self.cfg.losses.itm_hard_negatives:
            # A random other sample: shift by 1..n-1, so never oneself.
            return (torch.arange(n, device=dev) + torch.randint(1, n, (n,), device=dev)) % n
        concepts = batch.region_concepts.clamp(min=0)
        present = F.one_hot(concepts, self.cfg.amc_classes()).float()
        present = (present * (batch.region_concepts >= 0)[..., None]).amax(1)
        overlap = present @ present.t() + torch.rand(n, n, device=dev)  # random tie-break
        overlap.fill_diagonal_(-1.0)
        return overlap.argmax(1)

    def _mask_tokens(self, ids, text_mask, anchors: Anchors):
        """BERT masking of ``mlm_prob`` of the non-anchor, non-special tokens."""
        special = torch.zeros_like(text_mask)
        for sid in SPECIAL_TOKEN_IDS:
            special |= ids == sid
        hits = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
        is_anchor = hits.scatter_add_(1, anchors.text_pos, anchors.valid.long()) > 0
        eligible = text_mask & ~special & ~is_anchor
        p = self.cfg.losses.mlm_prob
        sites = eligible & (torch.rand(ids.shape, device=ids.device) < p)
        cap = (sites.flatten().cumsum(0) <= mlm_rows(sites.numel(), p)).view_as(sites)
        sites = sites & cap
        r = torch.rand(ids.shape, device=ids.device)
        noise = torch.randint_like(ids, self.cfg.text.vocab_size)
        masked = torch.where(sites & (r < 0.8), torch.full_like(ids, MASK_TOKEN_ID), ids)
        masked = torch.where(sites & (r >= 0.8) & (r < 0.9), noise, masked)
        return masked, sites

    def _mlm_loss(self, ht, ids, sites) -> torch.Tensor:
        """Cross-entropy at the masked tokens, scored in a fixed number of rows."""
        flat = sites.flatten()
        rows = mlm_rows(flat.numel(), self.cfg.losses.mlm_prob)
        order = torch.argsort((~flat).to(torch.uint8), stable=True)[:rows]  # sites first
        target = torch.where(flat[order], ids.flatten()[order], IGNORE)
        return _ce(self.mlm(ht.flatten(0, 1)[order]), target)

    def _amc_loss(self, ht, hr, text_mask, region_mask, anchors: Anchors, prompt) -> torch.Tensor:
        """Cross-entropy at every swapped slot: its concept, or (pointer) its partner slot;
        every anchor slot is scored and those not swapped are ignored."""
        total, terms = ht.new_zeros(()), 0
        for side, site, label in amc_slots(anchors, prompt, self.cfg.losses.amc_labels):
            h, others, others_mask = (
                (ht, hr, region_mask) if side == "text" else (hr, ht, text_mask)
            )
            if isinstance(self.amc, ConceptClassifier):
                logits = self.amc(gather_slots(h, site))
            else:
                logits = self.amc(gather_slots(h, site), others, others_mask)
            total, terms = total + _ce(logits.flatten(0, 1), label.flatten()), terms + 1
        return total / max(terms, 1)

    # ------------------------------------------------------------------ accounting

    def flops_per_sample(
        self,
        text_len: int | None = None,
        regions: int | None = None,
        mlm_sites: float | None = None,
        amc_sites: float | None = None,
        batch_size: int = 1,
        train: bool = True,
        unified_passes: int | None = None,
    ) -> float:
        """Analytic matmul FLOPs of one sample of a pre-training step at padded shapes.

        ``mlm_sites`` and ``amc_sites`` are the rows the MLM and AMC heads score per
        sample (in fixed shapes: :func:`mlm_rows` of the batch's text slots; every anchor
        slot of each filled side). Defaults: ``max_text_len``, ``max_regions``,
        :func:`mlm_rows` of a batch of ``batch_size``, and AMC rows a third of the text
        slots. The masked pass (AMC, MLM) and the unmasked one
        (ITM, ITC) are counted each where its losses are on. ``train`` counts forward +
        backward: 3x forward, minus the input-gradient half of the layers whose inputs need
        none (detector features and boxes enter through them). ``unified_passes``: count a
        fine-tuning step instead, the encoders once and the unified encoder that many times
        (retrieval: 3, a pair and its two hard negatives), no pre-training head.
        """
        cfg = self.cfg
        lt = cfg.max_text_len if text_len is None else text_len
        r = cfg.max_regions if regions is None else regions
        if mlm_sites is None:
            mlm_sites = mlm_rows(lt * batch_size, cfg.losses.mlm_prob) / batch_size
        amc_sites = lt / 3 if amc_sites is None else amc_sites
        tx, vi, un, d = cfg.text, cfg.visual, cfg.unified, cfg.unified.hidden
        input_layers = 2 * r * (cfg.visual.feature_dim * vi.hidden + BOX_DIMS * vi.hidden)
        input_layers += 2 * r * BOX_DIMS * d  # unified region positions
        fwd = input_layers
        fwd += matmul_flops(tx.layers, tx.hidden, tx.ff, lt)
        fwd += matmul_flops(vi.layers, vi.hidden, vi.ff, r)
        fwd += 2 * (lt * tx.hidden + r * vi.hidden) * d  # hypersphere projections
        unified = matmul_flops(un.layers, d, un.ff, lt + r)
        if unified_passes is not None:
            fwd += unified * unified_passes
            return 3 * fwd - input_layers if train else fwd
        masked_pass = self.amc is not None or self.mlm is not None
        pair_pass = self.itm is not None or self.itc is not None
        fwd += unified * (masked_pass + (self.itm is not None))
        if self.mlm is not None and pair_pass:  # the unmasked captions, once more
            fwd += matmul_flops(tx.layers, tx.hidden, tx.ff, lt) + 2 * lt * tx.hidden * d
        if self.mlm is not None:
            fwd += mlm_sites * 2 * (d * d + d * tx.vocab_size)
        if self.itm is not None:
            fwd += 2 * (d * d + 2 * d)
        if self.itc is not None:
            fwd += 2 * 2 * d * d + 2 * batch_size * d
        if isinstance(self.amc, ConceptClassifier):
            fwd += amc_sites * 2 * (d * d + d * cfg.amc_classes())
        elif isinstance(self.amc, PairingPointer):
            # keys of every slot, a query per site, and each site scores about half the slots
            fwd += 2 * (lt + r) * d * d + amc_sites * 2 * (d * d + (lt + r) / 2 * d)
        return 3 * fwd - input_layers if train else fwd


def amc_slots(anchors: Anchors, prompt: Prompt, labels: str):
    """The AMC prediction sites and labels per filled side, at fixed (B, A) shapes.

    Yields (side, slot index, label) with side "text" or "region"; the label is
    :data:`IGNORE` where the pair was not swapped. Concept labels are the anchor's concept
    id; pointer labels are the partner slot's index.
    """
    j, i = anchors.text_pos, anchors.region
    keep = prompt.swapped
    if prompt.text_filled:
        yield "text", j, torch.where(keep, anchors.concept if labels == "concept" else i, IGNORE)
    if prompt.region_filled:
        yield "region", i, torch.where(keep, anchors.concept if labels == "concept" else j, IGNORE)


def amc_targets(anchors: Anchors, prompt: Prompt, labels: str):
    """The swapped sites only, for inspection: (side, sample index, slot index, label)."""
    for side, site, label in amc_slots(anchors, prompt, labels):
        b, a = (label != IGNORE).nonzero(as_tuple=True)
        yield side, b, site[b, a], label[b, a]


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, N, d) over the positions where ``mask`` (B, N) is True."""
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)
