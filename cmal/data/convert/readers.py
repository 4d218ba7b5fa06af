"""Which reader turns which public format into records: the one table `cmal data convert`
and the tests share."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cmal.data.convert import Record, coco, karpathy, nlvr2, refcoco, snli_ve, vg, vqa
from cmal.data.errors import DataError

FORMATS = ("coco-captions", "karpathy", "vg", "vqa", "snli-ve", "nlvr2", "refcoco")


def annotation_records(fmt: str, **given: Any) -> tuple[str, Iterator[Record]]:
    """(task, records) of a format from its files (``splits``: comma-separated, as typed);
    a missing file option is named by the flag the command line gives it."""

    def need(name: str, flag: str) -> Any:
        if given.get(name) is None:
            raise DataError(f"format {fmt} needs {flag}")
        return given[name]

    readers = {
        "coco-captions": lambda: ("pretrain", coco.records(need("captions", "--captions"))),
        "karpathy": lambda: (
            "pretrain",
            karpathy.records(need("captions", "--captions"), _names(given.get("splits"))),
        ),
        "vg": lambda: ("pretrain", vg.records(need("regions", "--regions"))),
        "vqa": lambda: (
            "vqa",
            vqa.records(need("questions", "--questions"), given.get("annotations")),
        ),
        "snli-ve": lambda: ("ve", snli_ve.records(need("jsonl", "--jsonl"))),
        "nlvr2": lambda: ("nlvr2", nlvr2.records(need("statements", "--json"))),
        "refcoco": lambda: (
            "rec",
            refcoco.records(
                need("refs", "--refs"), need("instances", "--instances"), need("split", "--split")
            ),
        ),
    }
    if fmt not in readers:
        raise DataError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return readers[fmt]()


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip() for s in (text or "").split(",") if s.strip())
