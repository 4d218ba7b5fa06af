"""Image-text retrieval on Karpathy's splits (COCO 5k / 1k test, Flickr30k 1k test; five
captions per image): image -> text and text -> image recall at 1, 5 and 10, as ALBEF and
UNITER report them.

Ranking: every image against every text by the dot product of the two uni-modal embeddings
(:meth:`CMAL.embeddings`, through the ITC projections where the model has them); then,
where the model has an ITM head, each image's and each text's top ``task.rerank_k`` are
re-ranked by ITM's matched-vs-not log-odds (ALBEF's protocol); the rest keep their
embedding order below them. Fine-tuning trains the model's own ITC (every caption of an
image a positive) and ITM heads, ITM on the pair and on a hard negative text per image and
image per text, drawn by ITC similarity as ALBEF draws them; the config turns both losses
on. Zero-shot: ``cmal evaluate --task retrieval --run <pre-training run>`` ranks with the
heads that run trained (labels ``zeroshot-<split>``).

Metrics, ALBEF's names, as fractions: ``txt_r1/5/10`` (image -> text: some caption of the
image among the first K), ``img_r1/5/10`` (text -> image), ``txt_r_mean``, ``img_r_mean``
and ``r_mean``, the mean of the six (the headline); ``n`` the images. Predictions
``{"i2t": {image: [10 text ids]}, "t2i": {text id: [10 images]}}``; a file of them is
scored against the Karpathy json's split (``--captions``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmal.config import ConfigError
from cmal.data.convert import karpathy, load_json
from cmal.data.errors import DataError
from cmal.tasks import Task, gather

KS = (1, 5, 10)
"""Recall cut-offs; predictions keep the first ``max(KS)`` of each ranking."""


# ----------------------------------------------------------------------------- metrics


def recalls(
    i2t: dict[str, Sequence[str]], t2i: dict[str, Sequence[str]], image_of: dict[str, str]
) -> dict[str, float]:
    """Recall at :data:`KS` from ranked lists: ``i2t`` image -> text ids, ``t2i`` text id ->
    images, ``image_of`` text id -> its image (every text of the set; every image with a
    text is a query). A query whose answer is not in its list counts as a miss."""
    images = sorted({image_of[t] for t in image_of})
    missing = [i for i in images if i not in i2t] + [t for t in image_of if t not in t2i]
    if missing:
        raise ConfigError(f"{len(missing)} queries have no ranking (first: {missing[0]!r})")

    def first(ranked: Sequence[str], hit: Callable[[str], bool]) -> int:
        return next((k for k, x in enumerate(ranked) if hit(x)), len(ranked) + max(KS))

    txt = [first(i2t[i], lambda t, i=i: image_of.get(t) == i) for i in images]
    img = [first(t2i[t], lambda i, t=t: i == image_of[t]) for t in image_of]
    out: dict[str, float] = {}
    for side, ranks in (("txt", txt), ("img", img)):
        for k in KS:
            out[f"{side}_r{k}"] = sum(r < k for r in ranks) / len(ranks)
        out[f"{side}_r_mean"] = sum(out[f"{side}_r{k}"] for k in KS) / len(KS)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["n"] = float(len(images))
    return out


# ----------------------------------------------------------------------------- the gallery


class Gallery:
    """One eval set embedded: its texts (id, image index, sphere states, unit vector) and
    images (key, sphere states, boxes, unit vector), and the ITM scores of the pairs
    re-ranked so far (a fold reuses the whole set's)."""

    def __init__(self, texts: list[tuple], images: dict[str, tuple]):
        self.text_ids = [t[0] for t in texts]
        self.keys = list(images)
        at = {k: n for n, k in enumerate(self.keys)}
        self.image_of = torch.tensor([at[t[1]] for t in texts])
        self.text_states = [t[2] for t in texts]
        self.image_states = [images[k][0] for k in self.keys]
        self.boxes = [images[k][1] for k in self.keys]
        self.sims = (
            torch.stack([images[k][2] for k in self.keys]) @ torch.stack([t[3] for t in texts]).t()
        )
        self.itm: dict[tuple[int, int], float] = {}

    def match(self, model, pairs: list[tuple[int, int]], world, chunk: int) -> None:
        """ITM log-odds of the (image, text) ``pairs`` not scored yet, in chunks of
        ``chunk`` dealt out to the ranks: the same chunks, so the same numbers, on any
        number of ranks."""
        todo = sorted({p for p in pairs if p not in self.itm})
        chunks = [todo[k : k + chunk] for k in range(0, len(todo), chunk)]
        got: list[list[float]] = []
        for part in chunks[world.rank :: world.size]:
            t = _pad([self.text_states[j] for _, j in part], world.device)
            v = _pad([self.image_states[i] for i, _ in part], world.device)
            boxes = _pad([self.boxes[i] for i, _ in part], world.device)[0]
            logits = model.match_logits(t[0], v[0], t[1], v[1], boxes).float()
            got.append((logits[:, 1] - logits[:, 0]).tolist())
        for rank, scored in enumerate(gather(got, world)):
            for part, scores in zip(chunks[rank :: world.size], scored, strict=True):
                self.itm.update(zip(part, scores, strict=True))

    def rankings(self, model, images: torch.Tensor, k: int, world, chunk: int):
        """(i2t, t2i) top-:data:`KS` lists among ``images`` (indices) and their texts."""
        texts = torch.nonzero(torch.isin(self.image_of, images)).flatten()
        sims = self.sims[images][:, texts]
        i2t, t2i = sims.clone(), sims.t().clone()
        if model.itm is not None and k > 0:
            img, txt = images.tolist(), texts.tolist()
            top_t = sims.topk(min(k, len(txt)), dim=1).indices.tolist()
            top_i = sims.t().topk(min(k, len(img)), dim=1).indices.tolist()
            # (image, text) positions in this set whose pair ITM re-ranks, both directions
            i2t_at = [(a, b) for a, row in enumerate(top_t) for b in row]
            t2i_at = [(a, b) for b, row in enumerate(top_i) for a in row]
            pairs = [(img[a], txt[b]) for a, b in i2t_at + t2i_at]
            self.match(model, pairs, world, chunk)
            scores = [self.itm[pair] for pair in pairs]
            # Every re-ranked candidate above every other, which keep their embedding order
            # (cosines lie in [-1, 1]): the others are moved below the lowest ITM score.
            floor = min(scores) - 2.0
            i2t, t2i = i2t + floor - 1.0, t2i + floor - 1.0
            split = len(i2t_at)
            for (a, b), score in zip(i2t_at, scores[:split], strict=True):
                i2t[a, b] = score
            for (a, b), score in zip(t2i_at, scores[split:], strict=True):
                t2i[b, a] = score
        top = max(KS)
        best_t = i2t.topk(min(top, len(texts)), dim=1).indices
        best_i = t2i.topk(min(top, len(images)), dim=1).indices
        i2t_lists = {self.keys[int(images[a])]: [self.text_ids[int(texts[b])] for b in row]
                     for a, row in enumerate(best_t.tolist())}  # fmt: skip
        t2i_lists = {self.text_ids[int(texts[b])]: [self.keys[int(images[a])] for a in row]
                     for b, row in enumerate(best_i.tolist())}  # fmt: skip
        image_of = {self.text_ids[int(b)]: self.keys[int(self.image_of[b])] for b in texts}
        return i2t_lists, t2i_lists, image_of


def _pad(rows: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L_k, d) ragged rows -> (N, max L, d) zero-padded on ``device``, and its mask."""
    n, top = len(rows), max(len(r) for r in rows)
    out = rows[0].new_zeros((n, top, *rows[0].shape[1:]))
    mask = torch.zeros(n, top, dtype=torch.bool)
    for k, r in enumerate(rows):
        out[k, : len(r)], mask[k, : len(r)] = r, True
    return out.to(device), mask.to(device)


def _embed(model, items) -> tuple[list[tuple], dict[str, tuple]]:
    """Texts (id, image key, text states, vector) and images (key -> region states, boxes,
    vector) of the loader's items, on the host; an image once however many texts it has."""
    texts: list[tuple] = []
    images: dict[str, tuple] = {}
    for item in items:
        if "batch" not in item:
            continue
        b = item["batch"]
        t, v = model.spheres(b.input_ids, b.text_mask, b.region_feats, b.boxes, b.region_mask)
        tv, iv = model.embeddings(t, v, b.region_mask)
        lengths, regions = b.text_mask.sum(1).tolist(), b.region_mask.sum(1).tolist()
        rows = zip(item["index"], item["ids"], item["image_keys"], strict=True)
        for k, (at, tid, key) in enumerate(rows):
            texts.append((at, str(tid), key, t[k, : lengths[k]].cpu(), tv[k].cpu()))
            if key not in images:
                r = regions[k]
                images[key] = (v[k, :r].cpu(), b.boxes[k, :r].cpu(), iv[k].cpu())
    return texts, images


# ----------------------------------------------------------------------------- the task


class Retrieval(Task):
    name = "retrieval"
    train_set = "retrieval/train"
    eval_splits = ("val", "test")
    zero_shot = True

    def eval_sets(self, split: str) -> list[tuple[str, str]]:
        return [(split, f"retrieval/{split}")]

    def prepare(self, train_dataset, cfg) -> dict[str, Any]:
        losses = cfg.model.losses
        if not (losses.itc and losses.itm):
            raise ConfigError(
                "retrieval fine-tuning trains the model's ITC and ITM heads: set "
                "model.losses.itc=true and model.losses.itm=true (configs/finetune/retrieval.yaml)"
            )
        return {}

    def head(self, hidden, info):
        return nn.Module()  # ranking uses the model's own ITC and ITM heads

    def train_loss(self, objective, item) -> torch.Tensor:
        model, b = objective.model, item["batch"]
        t, v = model.spheres(b.input_ids, b.text_mask, b.region_feats, b.boxes, b.region_mask)
        keys = item["image_keys"]
        same = torch.tensor([[a == c for c in keys] for a in keys], device=t.device)
        losses = model.cfg.losses
        tv, iv = model.embeddings(t, v, b.region_mask)
        loss = losses.itc_weight * model.itc.loss(tv, iv, same)
        # Hard negatives as ALBEF draws them: by ITC similarity, never a positive.
        with torch.no_grad():
            sims = (tv @ iv.t()).float() * model.itc.log_inv_temp.exp().float()
            w_img = (F.softmax(sims, 1) + 1e-4).masked_fill(same, 0.0)  # per text
            w_txt = (F.softmax(sims.t(), 1) + 1e-4).masked_fill(same, 0.0)  # per image
        ok = (~same).any(1)
        n, rows = len(keys), torch.nonzero(ok).flatten()
        neg_img = torch.multinomial(w_img[ok], 1).flatten() if len(rows) else rows
        neg_txt = torch.multinomial(w_txt[ok], 1).flatten() if len(rows) else rows
        text_rows = torch.cat([torch.arange(n, device=t.device), rows, neg_txt])
        image_rows = torch.cat([torch.arange(n, device=t.device), neg_img, rows])
        logits = model.match_logits(
            t[text_rows], v[image_rows], b.text_mask[text_rows], b.region_mask[image_rows],
            b.boxes[image_rows],
        )  # fmt: skip
        target = (torch.arange(len(text_rows), device=t.device) < n).long()
        return loss + losses.itm_weight * F.cross_entropy(logits.float(), target)

    def flops_per_row(self, model) -> float:
        return model.flops_per_sample(unified_passes=3)  # the pair and two hard negatives

    def evaluate_set(self, objective, items, world, cfg, label):
        model = objective.model
        texts, images = [], {}
        for part_texts, part_images in gather(_embed(model, items), world):
            texts += part_texts
            images.update(part_images)
        # Each text once (streaming pads ranks to equal length by repeating samples), in
        # the set's order, and the images in the order of their first text: the order
        # folds are cut in (Karpathy's file order), whatever the number of ranks.
        texts = sorted({t[0]: t[1:] for t in texts}.items())
        if not texts:
            raise DataError(f"retrieval eval set {label!r} has no texts")
        order = dict.fromkeys(t[1][1] for t in texts)
        gallery = Gallery([t for _, t in texts], {k: images[k] for k in order})
        k, chunk = cfg.task.rerank_k, max(1, cfg.data.batch_size)
        name = f"zeroshot-{label}" if objective.info.get("zero_shot") else label
        everything = torch.arange(len(gallery.keys))
        i2t, t2i, image_of = gallery.rankings(model, everything, k, world, chunk)
        out: dict[str, tuple[Any, dict[str, float]]] = {
            name: ({"i2t": i2t, "t2i": t2i}, recalls(i2t, t2i, image_of))
        }
        fold = cfg.task.fold_images
        if fold and len(everything) >= 2 * fold:
            parts = everything[: len(everything) // fold * fold].split(fold)
            folds = [recalls(*gallery.rankings(model, p, k, world, chunk)) for p in parts]
            mean = {m: sum(f[m] for f in folds) / len(folds) for m in folds[0]}
            size = f"{fold // 1000}k" if fold % 1000 == 0 else str(fold)
            out[f"{name}-{size}"] = (None, {**mean, "n": float(fold)})
        return out

    def write(self, predictions, folder: Path, label: str) -> Path:
        path = folder / f"predictions_{label.replace('/', '_')}.json"
        path.write_text(json.dumps(predictions))
        return path

    def score_file(self, predictions, files, split):
        if "captions" not in files or split is None:
            raise ConfigError("retrieval scoring needs --captions (Karpathy's json) and --split")
        preds = load_json(predictions)
        if not (isinstance(preds, dict) and {"i2t", "t2i"} <= set(preds)):
            raise ConfigError(f'{predictions}: expected {{"i2t": {{...}}, "t2i": {{...}}}}')
        try:
            image_of = {r.id: r.image for r in karpathy.records(files["captions"], (split,))}
        except DataError as e:
            raise ConfigError(str(e)) from None
        if not image_of:
            raise ConfigError(f"{files['captions']}: no images in split {split!r}")
        i2t = {str(k): [str(x) for x in v] for k, v in preds["i2t"].items()}
        t2i = {str(k): [str(x) for x in v] for k, v in preds["t2i"].items()}
        try:
            return recalls(i2t, t2i, image_of)
        except ConfigError as e:
            raise ConfigError(f"{predictions}: {e}") from None


TASK = Retrieval()
