"""Anchor coverage of a shard set: how much of the data CMAL can learn associations from.

CMAL learns only at anchors (a detected class that the text names too), so a conversion
always says how many samples have one. :class:`Coverage` counts while shards are written;
``anchor_stats.json`` (the counts) and ``concepts.json`` (the anchor vocabulary the concept
ids index, with the class each came from) land beside the shards; pre-training reads both
(``model.num_concepts`` follows ``concepts.json``; its log states the anchor share).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmal.data.anchors import ConceptVocab

STATS_FILE = "anchor_stats.json"
VOCAB_FILE = "concepts.json"
TOP = 20
"""Concepts listed in the report."""
COUNTERS = ("samples", "with_anchor", "anchors", "regions", "tagged_regions",
            "untagged_regions", "skipped")  # fmt: skip


@dataclass
class Coverage:
    """Counts over the samples written."""

    vocab: ConceptVocab
    samples: int = 0
    with_anchor: int = 0
    anchors: int = 0
    regions: int = 0
    tagged_regions: int = 0
    """Regions whose detector tag is one of the vocabulary's concepts."""
    untagged_regions: int = 0
    """Regions with no tag at all (features without classes)."""
    skipped: int = 0
    by_concept: Counter = field(default_factory=Counter)

    def add(
        self,
        sample: dict[str, Any],
        image: dict[str, Any],
        image2: dict[str, Any] | None = None,
    ) -> None:
        """Count a written text sample with its image's store row (and NLVR2's second)."""
        found: list[int] = []
        for suffix, row in (("", image), ("2", image2)):
            if row is None:
                continue
            found += [c for _, _, c in sample[f"anchors{suffix}"]]
            self.regions += len(row["concepts"])
            self.tagged_regions += int((row["concepts"] >= 0).sum())
            self.untagged_regions += sum(t == "" for t in row["tags"])
        self.count(found)

    def count(self, concepts: list[int]) -> None:
        """Count one sample's anchors, given as concept ids."""
        self.samples += 1
        self.anchors += len(concepts)
        self.with_anchor += len(concepts) > 0
        self.by_concept.update(self.vocab.concepts[c] for c in concepts)

    def counts(self) -> dict[str, Any]:
        """The counters, as JSON (a conversion part's share of the coverage)."""
        return {k: getattr(self, k) for k in COUNTERS} | {"by_concept": dict(self.by_concept)}

    @classmethod
    def from_counts(cls, vocab: ConceptVocab, counts: dict[str, Any]) -> Coverage:
        return cls(
            vocab, **{k: counts[k] for k in COUNTERS}, by_concept=Counter(counts["by_concept"])
        )

    def merge(self, other: Coverage) -> None:
        """Add another part's counts to these."""
        for k in COUNTERS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.by_concept.update(other.by_concept)

    def never_matched(self) -> list[str]:
        """Classes (not stop-listed) whose concept never made an anchor."""
        return [
            c
            for c, name in self.vocab.class_concept.items()
            if name is not None and self.by_concept[name] == 0
        ]

    def summary(self) -> dict[str, Any]:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "skipped": self.skipped,
            "share_with_anchor": round(self.with_anchor / n, 4),
            "anchors_per_sample": round(self.anchors / n, 3),
            "regions_per_sample": round(self.regions / n, 2),
            "share_of_regions_tagged": round(self.tagged_regions / max(self.regions, 1), 4),
            "share_of_regions_without_tag": round(self.untagged_regions / max(self.regions, 1), 4),
            "concepts": len(self.vocab),
            "classes": len(self.vocab.classes),
            "stop_listed": [c for c, n in self.vocab.class_concept.items() if n is None],
            "top_concepts": self.by_concept.most_common(TOP),
            "never_matched": self.never_matched(),
        }

    def write(self, out: Path) -> None:
        (out / STATS_FILE).write_text(json.dumps(self.summary(), indent=1) + "\n")
        vocab = {"concepts": self.vocab.concepts, "classes": self.vocab.class_concept}
        (out / VOCAB_FILE).write_text(json.dumps(vocab, indent=1) + "\n")


def report(stats: dict[str, Any], name: str = "") -> list[str]:
    """The lines `cmal data convert` ends with."""
    head = f"{name}: " if name else ""
    never = stats["never_matched"]
    lines = [
        f"{head}{stats['samples']} samples ({stats['skipped']} skipped); "
        f"{100 * stats['share_with_anchor']:.1f}% with >= 1 anchor; "
        f"{stats['anchors_per_sample']:.2f} anchors per sample; "
        f"{stats['concepts']} concepts from {stats['classes']} classes "
        f"({len(stats['stop_listed'])} stop-listed)",
        "  most frequent: "
        + (", ".join(f"{c} {k}" for c, k in stats["top_concepts"][:10]) or "(no anchor)"),
        f"  never matched: {len(never)} classes"
        + (f" ({', '.join(never[:15])}{', ...' if len(never) > 15 else ''})" if never else ""),
    ]
    return lines


def text_coverage(texts, vocab: ConceptVocab) -> Coverage:
    """Coverage of the texts alone, as if the detector found every class in every image:
    the most any detector output can give (``cmal data coverage``)."""
    from cmal.data.anchors import find_anchors, split_words

    every = list(vocab.classes)
    ones = [1.0] * len(every)
    cov = Coverage(vocab)
    for text in texts:
        words = split_words(text)
        cov.count(
            [p.concept for p in find_anchors(words, list(range(len(words))), every, ones, vocab)]
        )
    return cov
