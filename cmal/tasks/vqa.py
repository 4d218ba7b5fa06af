"""VQA v2: [CLS] -> 2-layer MLP -> answer vocabulary; BCE on the official soft scores;
official VQA accuracy; EvalAI submission JSON ``[{"question_id", "answer"}]``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cmal.config import ConfigError
from cmal.data.convert import load_json
from cmal.model.heads import VQAHead
from cmal.tasks import Task, read_width
from cmal.tasks.vqa_normalize import accuracy, normalize


class VQA(Task):
    name = "vqa"
    train_set = "vqa/train"
    eval_splits = ("val", "test")

    def eval_sets(self, split: str) -> list[tuple[str, str]]:
        return [(split, f"vqa/{split}")]

    def prepare(self, train_dataset, cfg) -> dict[str, Any]:
        """The answer vocabulary: the ``task.answers`` most frequent normalised answers."""
        counts: Counter[str] = Counter()
        for i in range(len(train_dataset)):
            counts.update(normalize(a) for a in train_dataset[i]["answers"])
        if not counts:
            raise ConfigError("vqa: the training shards hold no answers (test-dev shards?)")
        answers = [a for a, _ in counts.most_common(cfg.task.answers)]
        return {"answers": answers, "loss": cfg.task.vqa_loss}

    def head(self, hidden: int, info: dict[str, Any]) -> torch.nn.Module:
        return VQAHead(hidden, len(info["answers"]), read_width(hidden, info))

    def loss(self, logits, item, info) -> torch.Tensor:
        index = {a: i for i, a in enumerate(info["answers"])}
        target = torch.zeros_like(logits, dtype=torch.float32)
        for k, humans in enumerate(item["answers"]):
            for a in {normalize(h) for h in humans}:
                if a in index:
                    target[k, index[a]] = accuracy(a, humans)
        if info.get("loss") == "softmax":
            dist = target / target.sum(1, keepdim=True).clamp(min=1e-6)
            return -(dist * F.log_softmax(logits.float(), -1)).sum(1).mean()
        # UNITER's scaling: BCE summed over the answers, averaged over the batch.
        return F.binary_cross_entropy_with_logits(logits.float(), target) * target.shape[1]

    def predict(self, logits, item, info) -> list[dict]:
        best = logits.argmax(-1).tolist()
        out = []
        for k, qid in enumerate(item["question_id"].tolist()):
            answer = info["answers"][best[k]]
            humans = item["answers"][k]
            out.append(
                {"id": str(qid), "question_id": qid, "answer": answer,
                 "score": accuracy(answer, humans) if humans else float("nan")}
            )  # fmt: skip
        return out

    def write(self, predictions, folder: Path, label: str) -> Path:
        path = folder / f"predictions_{label}.json"
        rows = [{"question_id": p["question_id"], "answer": p["answer"]} for p in predictions]
        path.write_text(json.dumps(rows))
        return path

    def score_file(
        self, predictions: Path, files: dict[str, Path], split: str | None
    ) -> dict[str, float]:
        if "questions" not in files or "annotations" not in files:
            raise ConfigError("vqa scoring needs --questions and --annotations")
        preds = load_json(predictions)
        if not isinstance(preds, list) or not all(isinstance(p, dict) for p in preds):
            raise ConfigError(f'{predictions}: expected [{{"question_id", "answer"}}, ...]')
        by_id = {p.get("question_id"): str(p.get("answer", "")) for p in preds}
        questions = load_json(files["questions"]).get("questions", [])
        anns = load_json(files["annotations"]).get("annotations", [])
        humans = {
            a["question_id"]: ([x["answer"] for x in a["answers"]], a.get("answer_type"))
            for a in anns
        }
        missing = [q["question_id"] for q in questions if q["question_id"] not in by_id]
        if missing:
            raise ConfigError(
                f"{predictions}: {len(missing)} of {len(questions)} questions have no answer "
                f"(first question_id: {missing[0]})"
            )
        scores: dict[str, list[float]] = {"accuracy": []}
        for q in questions:
            answers, kind = humans[q["question_id"]]
            acc = accuracy(by_id[q["question_id"]], answers)
            scores["accuracy"].append(acc)
            scores.setdefault(f"accuracy/{kind}", []).append(acc)
        out = {k: sum(v) / len(v) for k, v in scores.items()}
        out["n"] = float(len(questions))
        return out


TASK = VQA()
