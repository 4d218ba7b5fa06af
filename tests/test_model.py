"""The CMAL model on tiny sizes: prompt layer, AMC targets, gradients, overfitting,
determinism, FLOP accounting, task heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch, scene_batch, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cmal.data.anchors import ConceptVocab, split_words, tokenize_with_anchors
from cmal.model import heads
from cmal.model.cmal import CMAL, Batch, amc_targets, mlm_rows
from cmal.model.prompt import Anchors, AssociativePrompt


def _prompt(mode: str, p_swap: float = 1.0):
    cfg = tiny_config(f"model.prompt.mode={mode}", f"model.prompt.p_swap={p_swap}").model
    layer = AssociativePrompt(cfg.prompt, 8).train()
    return layer


def _anchors():
    # sample 0: pairs (1,0) and (3,2); sample 1: (2,1), and (4,1) shares region 1
    return Anchors(
        text_pos=torch.tensor([[1, 3], [2, 4]]),
        region=torch.tensor([[0, 2], [1, 1]]),
        concept=torch.tensor([[5, 6], [7, 7]]),
        valid=torch.tensor([[True, True], [True, True]]),
    )


def test_swap_moves_exactly_the_chosen_features():
    text, regions = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    out = _prompt("both")(text, regions, _anchors())
    # region 1 of sample 1 is claimed twice: only the first occurrence swaps
    assert out.swapped.tolist() == [[True, True], [True, False]]
    moved_t = {(0, 1): (0, 0), (0, 3): (0, 2), (1, 2): (1, 1)}
    exp_t, exp_r = text.clone(), regions.clone()
    for (b, j), (_, i) in moved_t.items():
        exp_t[b, j], exp_r[b, i] = regions[b, i], text[b, j]
    assert torch.equal(out.text, exp_t) and torch.equal(out.regions, exp_r)
    assert out.text_filled and out.region_filled


def test_one_sided_and_mask_modes():
    text, regions = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    layer = _prompt("text")
    out = layer(text, regions, _anchors())
    assert torch.equal(out.text[0, 1], regions[0, 0])
    assert torch.equal(out.regions[0, 0], layer.region_mask)  # blanked, not filled
    assert out.text_filled and not out.region_filled
    layer = _prompt("mask")
    out = layer(text, regions, _anchors())
    assert torch.equal(out.text[0, 1], layer.text_mask)
    assert torch.equal(out.regions[0, 0], layer.region_mask)
    untouched = torch.ones(2, 6, dtype=torch.bool)
    untouched[0, 1] = untouched[0, 3] = untouched[1, 2] = False
    assert torch.equal(out.text[untouched], text[untouched])


def test_prompt_is_identity_at_inference_and_respects_p_swap():
    text, regions = torch.randn(2, 6, 8), torch.randn(2, 4, 8)
    out = _prompt("both").eval()(text, regions, _anchors())
    assert out.text is text and not out.swapped.any()
    big = Anchors(
        torch.arange(400).repeat(2, 1),
        torch.arange(400).repeat(2, 1),
        torch.zeros(2, 400, dtype=torch.long),
        torch.ones(2, 400, dtype=torch.bool),
    )
    torch.manual_seed(0)
    share = _prompt("both", 0.3).choose(big).float().mean().item()
    assert 0.25 < share < 0.35


def test_amc_labels_match_anchors_from_real_text():
    from cmal.model.pretrained import load_tokenizer

    vocab = ConceptVocab(["dog", "cat", "frisbee"])
    tags = ["frisbee", "dog", "tree"]
    text = "Two puppies chase a frisbee near the dog house"
    tok = load_tokenizer()
    ids, pairs = tokenize_with_anchors(text, tok, tags, [0.9, 0.7, 0.5], vocab, 24)
    words = split_words(text)
    word_of = tok(words, is_split_into_words=True).word_ids()
    assert len(pairs) == 3
    anchors = Anchors(
        torch.tensor([[p.text_pos for p in pairs]]),
        torch.tensor([[p.region for p in pairs]]),
        torch.tensor([[p.concept for p in pairs]]),
        torch.ones(1, 3, dtype=torch.bool),
    )
    layer = _prompt("both")
    out = layer(torch.randn(1, len(ids), 8), torch.randn(1, 3, 8), anchors)
    sites = 0
    for side, _b, site, label in amc_targets(anchors, out, "concept"):
        for s, lab in zip(site.tolist(), label.tolist(), strict=True):
            name = vocab.concepts[lab]
            sites += 1
            if side == "text":
                assert vocab.canonical(words[word_of[s]]) == name  # puppies -> dog
            else:
                assert vocab.canonical(tags[s]) == name
    # "puppies" and "dog" both pair with region 1: it is swapped once, so 2 pairs x 2 sides
    assert sites == 4
    pointer = list(amc_targets(anchors, out, "pointer"))
    (_, _, j, i_label), (_, _, i, j_label) = pointer
    assert torch.equal(i_label, anchors.region[out.swapped]) and torch.equal(j_label, j)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.losses.amc_labels=pointer",),
        ("model.prompt.mode=mask",),
        ("model.prompt.mode=region",),
        ("model.losses.amc=false", "model.prompt.enabled=false", "model.losses.itc=true"),
    ],
    ids=["cmal", "pointer", "mask", "region-side", "contrastive"],
)
def test_every_parameter_gets_a_gradient(overrides):
    torch.manual_seed(0)
    cfg = tiny_config("model.prompt.p_swap=1.0", *overrides).model
    model = CMAL(cfg).train()
    out = model.pretrain_losses(random_batch(cfg, n=6))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_samples_without_anchors_skip_amc_without_nan():
    torch.manual_seed(0)
    cfg = tiny_config().model
    batch = random_batch(cfg)
    batch.anchors.valid[:] = False
    out = CMAL(cfg).train().pretrain_losses(batch)
    assert out["amc"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()


def test_same_seed_same_loss():
    def run():
        torch.manual_seed(3)
        cfg = tiny_config().model
        model = CMAL(cfg).train()
        return model.pretrain_losses(random_batch(cfg))["loss"].item()

    assert run() == run()


def test_tiny_model_overfits_a_few_samples():
    torch.manual_seed(0)
    cfg = tiny_config("model.dropout=0.0").model
    model = CMAL(cfg).train()
    batch = scene_batch(cfg, n=8)

    def mean_loss() -> float:  # over 10 draws of masks, swaps and negatives
        with torch.no_grad():
            return sum(model.pretrain_losses(batch)["loss"].item() for _ in range(10)) / 10

    first = mean_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(350):
        loss = model.pretrain_losses(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = mean_loss()
    assert last <= 0.1 * first, (first, last)


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        ("model.losses.amc_labels=pointer",),
        (
            "model.text.hidden=128",
            "model.text.heads=2",
            "model.text.ff=512",
            "model.unified.hidden=96",
            "model.unified.heads=3",
            "model.visual.feature_dim=300",
        ),
    ],
    ids=["tiny", "pointer", "wider"],
)
def test_analytic_flops_match_flop_counter(overrides):
    torch.manual_seed(0)
    # Deterministic site counts: every eligible token is an MLM site, every pair swaps.
    cfg = tiny_config(
        "model.losses.mlm_prob=1.0",
        "model.prompt.p_swap=1.0",
        "model.losses.itm_neg_prob=0.0",
        *overrides,
    ).model
    model = CMAL(cfg).train()
    n, lt, r = 4, 16, 8
    batch = random_batch(cfg, n=n, text_len=lt, regions=r)
    batch.text_mask[:] = True
    batch.anchors.valid[:] = True  # 2 pairs per sample, distinct regions
    mlm_sites = mlm_rows(n * lt, 1.0)  # rows the MLM head scores (fixed shapes)
    amc_sites = 2 * batch.anchors.valid.sum().item()
    # The math backend decomposes attention into matmuls the counter sees on the CPU.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.pretrain_losses(batch)["loss"].backward()
    measured = counter.get_total_flops()
    analytic = n * model.flops_per_sample(lt, r, mlm_sites / n, amc_sites / n)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_task_heads_shapes():
    cfg = tiny_config().model
    model = CMAL(cfg).eval()
    batch = random_batch(cfg, n=3, text_len=10, regions=5)
    hidden = model(batch)
    assert hidden.shape == (3, 15, cfg.unified.hidden)
    cls, regions = hidden[:, 0], hidden[:, 10:]
    d = cfg.unified.hidden
    assert heads.VQAHead(d, 11)(cls).shape == (3, 11)
    assert heads.EntailmentHead(d)(cls).shape == (3, 3)
    assert heads.PairReasoningHead(d)(cls, cls.flip(0)).shape == (3, 2)
    scores = heads.RegionScoreHead(d)(regions, batch.region_mask)
    assert scores.shape == (3, 5)
    assert scores.softmax(-1)[2, -2:].sum() < 1e-6  # padded regions are never chosen


def test_itm_reads_the_captions_unmasked():
    # ITM's positives must look like fine-tuning's inputs: no [MASK] tokens, no swapped
    # features, which only positives would carry (a label leak) if ITM shared the masked pass.
    torch.manual_seed(0)
    cfg = tiny_config("model.losses.itm_neg_prob=0.0", "model.prompt.p_swap=1.0").model
    model = CMAL(cfg).eval()
    batch = scene_batch(cfg, n=6)
    with torch.no_grad():
        itm = model.pretrain_losses(batch)["itm"]
        clean = F.cross_entropy(model.itm(model(batch)[:, 0]), torch.ones(6, dtype=torch.long))
    assert torch.allclose(itm, clean, atol=1e-6), (itm, clean)


def test_pooled_read_out_ignores_padded_regions():
    from cmal.tasks import read_out, read_width

    cfg = tiny_config().model
    model = CMAL(cfg).eval()
    batch = random_batch(cfg, n=3, text_len=10, regions=5)
    batch.region_mask[0, 3:] = False
    hidden = model(batch)
    cls_only = read_out(model, batch, {"pool": "cls"})
    pooled = read_out(model, batch, {"pool": "cls+max"})
    d = cfg.unified.hidden
    assert torch.equal(cls_only, hidden[:, 0]) and read_width(d, {}) == d
    assert pooled.shape == (3, read_width(d, {"pool": "cls+max"})) == (3, 2 * d)
    assert torch.equal(pooled[0, d:], hidden[0, 10:13].amax(0))  # regions 3, 4 are padding
    assert torch.equal(pooled[1, d:], hidden[1, 10:].amax(0))
    for head in (heads.VQAHead(d, 7, 2 * d), heads.EntailmentHead(d, 2 * d)):
        assert head(pooled).shape[0] == 3
    assert heads.PairReasoningHead(d, 2 * d)(pooled, pooled).shape == (3, 2)


def test_a_batch_of_one_trains():
    # The last batch of an epoch can hold one sample: no other caption to borrow for ITM.
    from dataclasses import fields

    cfg = tiny_config().model
    b = random_batch(cfg, n=4)
    one = {
        f.name: Anchors(*(getattr(v, g.name)[:1] for g in fields(v)))
        if isinstance(v := getattr(b, f.name), Anchors)
        else v[:1]
        for f in fields(b)
    }
    losses = CMAL(cfg).pretrain_losses(Batch(**one))
    assert torch.isfinite(losses["loss"]) and losses["itm"] > 0
