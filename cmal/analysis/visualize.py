"""``cmal visualize RUN...``: the paper's kinds of figures for pre-trained runs, as PNGs.

- ``tsne.png`` (its Fig. 3): t-SNE of the unified encoder's hidden states at anchor words
  of validation captions, coloured by anchor concept (the ten most frequent), one panel
  per run.
- ``attention.png`` (Fig. 4): for the first validation captions with anchors, the last
  unified layer's attention (mean over heads) from each anchor word to the image's
  regions (r0, r1, … in confidence order; the anchor's own region outlined in red), one
  row per run.
- ``amc_confusion.png`` (Fig. 5): the AMC head's predictions at swapped slots against
  the anchor concepts, on validation captions with the prompt layer active (runs with an
  AMC concept head only; the contrastive baseline has none).

Each run is drawn with its own config and newest weights; the data are its
``data.val_remote`` (or ``--shards``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from cmal.config import Config, ConfigError, load_config


def _load(run: Path) -> tuple[Config, torch.nn.Module]:
    from cmal.model.pretrained import build_model
    from cmal.workflow.finetune import pretrained_weights

    if not (run / "config.yaml").is_file():
        raise ConfigError(f"{run}: not a run folder (no config.yaml)")
    cfg = load_config(run / "config.yaml")
    model = build_model(cfg.model)
    model.load_state_dict(pretrained_weights(run))
    return cfg, model.eval()


def _batches(cfg: Config, shards: str | None, n: int):
    from cmal.data.batches import make_loader
    from cmal.data.stream import open_dataset, release

    remote = shards or cfg.data.val_remote or cfg.data.remote
    data = dataclasses.replace(cfg.data, shuffle=False, local=None, workers=0, batch_size=32)
    ds = open_dataset(data, remote=remote, feature_dim=cfg.model.visual.feature_dim)
    seen = 0
    for item in make_loader(data, ds, cfg.model.max_text_len, cfg.model.max_regions):
        if "batch" in item and seen < n:
            seen += item["batch"].input_ids.shape[0]
            yield item["batch"]
    release(ds)


class _LastAttention:
    """Captures the last unified block's attention probabilities (mean over heads)."""

    def __init__(self, model):
        self.attn = model.unified.encoder.blocks[-1].attn
        self.probs: torch.Tensor | None = None
        self.handle = self.attn.register_forward_hook(self)

    def __call__(self, module, args, output) -> None:
        x, bias = args
        b, n, d = x.shape
        q, k, _ = module.qkv(x).view(b, n, 3, module.heads, d // module.heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / (d // module.heads) ** 0.5
        self.probs = (scores + bias).softmax(-1).mean(1)


@torch.no_grad()
def _features(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states at anchor words and their concepts."""
    feats, labels = [], []
    for batch in batches:
        hidden = model(batch)
        a = batch.anchors
        b, k = a.valid.nonzero(as_tuple=True)
        feats.append(hidden[b, a.text_pos[b, k]])
        labels.append(a.concept[b, k])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


@torch.no_grad()
def _confusion(model, cfg: Config, batches) -> np.ndarray | None:
    from cmal.model.cmal import amc_targets
    from cmal.model.heads import ConceptClassifier

    if not isinstance(getattr(model, "amc", None), ConceptClassifier):
        return None
    c = cfg.model.amc_classes()
    matrix = np.zeros((c, c), np.int64)
    torch.manual_seed(0)
    for batch in batches:
        t, v = model.spheres(batch.input_ids, batch.text_mask, batch.region_feats, batch.boxes,
                             batch.region_mask)  # fmt: skip
        model.prompt.train()  # the prompt layer acts only in training mode; nothing else does
        prompt = model.prompt(t, v, batch.anchors)
        model.prompt.eval()
        lt = batch.input_ids.shape[1]
        hidden = model.unified(prompt.text, prompt.regions, batch.text_mask, batch.region_mask,
                               batch.boxes.to(t.dtype))  # fmt: skip
        ht, hr = hidden[:, :lt], hidden[:, lt:]
        for side, b, site, label in amc_targets(batch.anchors, prompt, "concept"):
            h = ht if side == "text" else hr
            pred = model.amc(h[b, site]).argmax(-1)
            np.add.at(matrix, (label.numpy(), pred.numpy()), 1)
    return matrix


def visualize(runs: list[Path], out: Path, shards: str | None = None, n: int = 256) -> list[Path]:
    """Draw the figures for ``runs`` into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from cmal.model.pretrained import load_tokenizer

    tok = load_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    loaded = [(run.name, *_load(run)) for run in runs]
    written = []

    fig, axes = plt.subplots(1, len(loaded), figsize=(5 * len(loaded), 4.5), squeeze=False)
    for ax, (name, cfg, model) in zip(axes[0], loaded, strict=True):
        feats, labels = _features(model, _batches(cfg, shards, n))
        top = [c for c, _ in Counter(labels.tolist()).most_common(10)]
        keep = np.isin(labels, top)
        if keep.sum() < 5:
            raise ConfigError(f"{name}: fewer than 5 anchors in the data: nothing to embed")
        xy = TSNE(2, perplexity=min(30, keep.sum() - 1), random_state=0).fit_transform(feats[keep])
        for c in top:
            sel = labels[keep] == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, label=str(c))
        ax.set_title(f"{name}: hidden states at anchors")
        ax.legend(title="concept id", fontsize=6, markerscale=2)
    written.append(_save(fig, out / "tsne.png"))

    fig, axes = plt.subplots(len(loaded), 3, figsize=(12, 3.2 * len(loaded)), squeeze=False)
    for row, (name, cfg, model) in zip(axes, loaded, strict=True):
        batch = next(_batches(cfg, shards, 1))
        hook = _LastAttention(model)
        with torch.no_grad():
            model(batch)
        hook.handle.remove()
        lt = batch.input_ids.shape[1]
        shown = [i for i in range(batch.input_ids.shape[0]) if batch.anchors.valid[i].any()][:3]
        for ax, i in zip(row, shown, strict=False):
            a = batch.anchors
            pos = a.text_pos[i][a.valid[i]].tolist()
            regions = int(batch.region_mask[i].sum())
            att = hook.probs[i, pos, lt : lt + regions].numpy()
            ax.imshow(att, cmap="viridis", aspect="auto", vmin=0)
            for y, r in enumerate(a.region[i][a.valid[i]].tolist()):  # each anchor's partner
                ax.add_patch(plt.Rectangle((r - 0.5, y - 0.5), 1, 1, fill=False, ec="red", lw=2))
            words = tok.convert_ids_to_tokens(batch.input_ids[i, pos].tolist())
            ax.set_yticks(range(len(pos)), words)
            ax.set_xticks(range(regions), [f"r{r}" for r in range(regions)])
            ax.set_title(f"{name}: sample {i}, anchors -> regions", fontsize=8)
    written.append(_save(fig, out / "attention.png"))

    matrices = [
        (name, _confusion(model, cfg, _batches(cfg, shards, n))) for name, cfg, model in loaded
    ]
    matrices = [(name, m) for name, m in matrices if m is not None]
    if matrices:
        fig, axes = plt.subplots(1, len(matrices), figsize=(5 * len(matrices), 4.5), squeeze=False)
        for ax, (name, m) in zip(axes[0], matrices, strict=True):
            rows = m.sum(1, keepdims=True)
            ax.imshow(m / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
            acc = np.trace(m) / max(m.sum(), 1)
            ax.set_title(f"{name}: AMC accuracy {100 * acc:.1f}% ({m.sum()} slots)")
            ax.set_xlabel("predicted concept")
            ax.set_ylabel("anchor concept")
        written.append(_save(fig, out / "amc_confusion.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
