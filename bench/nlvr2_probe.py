"""Probes on frozen features of the scene world's NLVR2 statements.

They show why NLVR2 stayed at chance when fine-tuned end to end for 100 steps, and led to
`task.head_only`, which the world's NLVR2 config now uses.

    python bench/nlvr2_probe.py runs/world-pretrain          # a pre-training run
    python bench/nlvr2_probe.py runs/world-rec               # a REC fine-tuning run

Run from the folder holding ``data/world`` (the run's config names the shards). For every
NLVR2 train and dev statement it encodes (statement, left image) and (statement, right
image) with the run's model, frozen, and keeps the two unified [CLS] states; for a REC run
also each image's best region score under the REC head (how well the statement's words
match the best region). Then it fits, on train, and scores on dev:

- an MLP on the standardised [CLS] pair, full batch, 300 epochs (what the features hold);
- the same MLP with the demo's budget, 100 steps of 32 statements (what 100 steps find),
  and with 3,000 such steps (28 epochs);
- for a REC run, a logistic regression on the two region scores per statement family,
  the family read from the words (what grounding scores give once the family is known).

It measures; it asserts nothing. Seeds fixed; CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("both", "more", "only-left", "only-right")


def family(sentence: str) -> str:
    """The world's statement family (cmal.data.language.statements) from its words."""
    if sentence.startswith("Both"):
        return "both"
    if " more " in sentence:
        return "more"
    return "only-left" if sentence.startswith("The left") else "only-right"


def encode(run: Path, split: str, root: Path) -> dict[str, torch.Tensor]:
    """Frozen [CLS] pair (and, for a REC run, best region scores) of every statement."""
    from cmal.config import load_config
    from cmal.data.batches import make_loader
    from cmal.data.stream import open_dataset, release
    from cmal.model.cmal import CMAL
    from cmal.tasks import Objective, get_task
    from cmal.workflow.finetune import load_into, pretrained_weights
    from cmal.workflow.pretrain import newest_weights

    cfg = load_config(run / "config.yaml")
    model = CMAL(cfg.model).eval()
    scorer = None
    info = json.loads((run / "task.json").read_text()) if (run / "task.json").is_file() else {}
    if info.get("task") == "rec":  # the model with its REC head, as `cmal evaluate` loads it
        rec = get_task("rec")
        scorer = rec.head(cfg.model.unified.hidden, info).eval()
        Objective(rec, model, scorer, info).load_state_dict(newest_weights(run))
    else:
        load_into(model, pretrained_weights(run), str(run))
    data = dataclasses.replace(cfg.data, shuffle=False, local=None, workers=0, batch_size=64)
    remote = str(root / cfg.task.data_root / f"nlvr2/{split}")
    dataset = open_dataset(data, remote=remote, feature_dim=cfg.model.visual.feature_dim)
    out: dict[str, list] = {"cls": [], "score": [], "label": [], "ids": []}
    with torch.no_grad():
        for item in make_loader(data, dataset, cfg.model.max_text_len, cfg.model.max_regions):
            if "batch" not in item:  # every sample of the batch was skipped as bad
                continue
            cls, score = [], []
            for key in ("batch", "batch2"):
                b = item[key]
                hidden = model(b)
                cls.append(hidden[:, 0])
                if scorer is not None:
                    score.append(scorer(hidden[:, b.input_ids.shape[1] :], b.region_mask).amax(1))
            out["cls"].append(torch.cat(cls, 1))
            if scorer is not None:
                out["score"].append(torch.stack(score, 1))
            out["label"].append(item["label"])
            out["ids"] += item["ids"]
    release(dataset, all_ranks=False)
    sentences = {}
    for line in (root / "data/world/nlvr2" / f"{split}.json").read_text().splitlines():
        record = json.loads(line)
        sentences[record["identifier"]] = record["sentence"]
    fam = [FAMILIES.index(family(sentences[i])) for i in out["ids"]]
    return {
        "cls": torch.cat(out["cls"]),
        "score": torch.cat(out["score"]) if out["score"] else torch.empty(0),
        "label": torch.cat(out["label"]),
        "family": torch.tensor(fam),
    }


def accuracy(logits: torch.Tensor, label: torch.Tensor) -> float:
    return (logits.argmax(-1) == label).float().mean().item()


def mlp_probe(train: dict, dev: dict, steps: int, batch: int | None) -> tuple[float, float]:
    """Train / dev accuracy of an MLP on the standardised [CLS] pair."""
    torch.manual_seed(0)
    mu, sd = train["cls"].mean(0), train["cls"].std(0) + 1e-6
    xt, xd = (train["cls"] - mu) / sd, (dev["cls"] - mu) / sd
    net = nn.Sequential(nn.Linear(xt.shape[1], 256), nn.GELU(), nn.Linear(256, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        rows = torch.randint(0, len(xt), (batch,)) if batch else slice(None)
        loss = F.cross_entropy(net(xt[rows]), train["label"][rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return accuracy(net(xt), train["label"]), accuracy(net(xd), dev["label"])


def score_probe(train: dict, dev: dict, k: int) -> float:
    """Dev accuracy of a logistic regression on the two region scores, family ``k`` only."""
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)
    rows = train["family"] == k
    x = torch.cat([train["score"][rows], torch.ones(int(rows.sum()), 1)], 1)
    y = train["label"][rows].float()

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y)
        loss.backward()
        return loss

    opt.step(closure)
    rows = dev["family"] == k
    xd = torch.cat([dev["score"][rows], torch.ones(int(rows.sum()), 1)], 1)
    with torch.no_grad():
        return ((xd @ w > 0).long() == dev["label"][rows]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a pre-training or fine-tuning run folder")
    parser.add_argument("--root", type=Path, default=Path("."), help="folder with data/world")
    args = parser.parse_args()
    from cmal.config import load_config
    from cmal.engine.deepspeed import init_world

    init_world(load_config(args.run / "config.yaml"))
    train, dev = encode(args.run, "train", args.root), encode(args.run, "dev", args.root)
    print(f"{args.run}: {len(train['label'])} train / {len(dev['label'])} dev statements")
    budgets = (("full batch, 300 epochs", 300, None), ("100 steps of 32", 100, 32),
               ("3,000 steps of 32", 3000, 32))  # fmt: skip
    for name, steps, batch in budgets:
        tr, dv = mlp_probe(train, dev, steps, batch)
        print(f"MLP on frozen [CLS] pair, {name}: train {100 * tr:.1f}%  dev {100 * dv:.1f}%")
    if train["score"].numel():
        total = 0.0
        for k, fam in enumerate(FAMILIES):
            n = int((dev["family"] == k).sum())
            acc = score_probe(train, dev, k)
            total += acc * n
            print(f"region-score logistic, family {fam:<10} (known): dev {100 * acc:.1f}% of {n}")
        overall = 100 * total / len(dev["label"])
        print(f"region-score logistic, all families (known): dev {overall:.1f}%")


if __name__ == "__main__":
    main()
