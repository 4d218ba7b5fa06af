"""VQA v2 questions + annotations -> VQA records (the ten human answers kept raw; the
VQA task normalises and scores them)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cmal.data.convert import Record, get, load_json
from cmal.data.errors import DataError


def records(questions: str | Path, annotations: str | Path | None = None) -> Iterator[Record]:
    """One record per question; without annotations (test-dev) the answers are empty."""
    qs = load_json(questions)
    if not isinstance(qs, dict) or not isinstance(qs.get("questions"), list):
        raise DataError(f"{questions}: expected an object with a 'questions' list")
    answers: dict[int, list[str]] = {}
    if annotations is not None:
        anns = load_json(annotations)
        if not isinstance(anns, dict) or not isinstance(anns.get("annotations"), list):
            raise DataError(f"{annotations}: expected an object with an 'annotations' list")
        for k, ann in enumerate(anns["annotations"]):
            where = f"{annotations}: annotations[{k}]"
            qid = get(ann, "question_id", int, where)
            given = get(ann, "answers", list, where)
            answers[qid] = [
                get(a, "answer", str, f"{where}.answers[{j}]") for j, a in enumerate(given)
            ]
    for k, q in enumerate(qs["questions"]):
        where = f"{questions}: questions[{k}]"
        qid = get(q, "question_id", int, where)
        if annotations is not None and qid not in answers:
            raise DataError(f"{where}: question_id {qid} has no annotation in {annotations}")
        yield Record(
            str(qid),
            str(get(q, "image_id", (int, str), where)),
            get(q, "question", str, where),
            {"question_id": qid, "answers": answers.get(qid, [])},
        )
