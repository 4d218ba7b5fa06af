"""The anchor operator ⊕: detector tags ∩ caption words, after normalisation.

An anchor is a concept that is both a detected object in the image and a word (or a
phrase, for multi-word tags) in the text. For every occurrence in the text we keep one
pair (text position, region slot): the text position is the first wordpiece of the first
word of the occurrence, the region is the highest-confidence region carrying that concept.

Normalisation, applied to tags and words alike: lower case, singular form (rules plus an
irregular table), then the shipped synonym table (``synonyms.json``) maps to a canonical
concept name: the whole phrase if the table has it, else word by word, so that attribute
tags ("red car") match "red automobile" as well. Pure Python; the only file it reads is
that table, shipped in the package.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

_IRREGULAR = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "persons": "person",
    "mice": "mouse",
    "geese": "goose",
    "feet": "foot",
    "teeth": "tooth",
    "knives": "knife",
    "wives": "wife",
    "leaves": "leaf",
    "shelves": "shelf",
    "loaves": "loaf",
    "halves": "half",
    "wolves": "wolf",
    "calves": "calf",
    "oxen": "ox",
    "dice": "die",
    "skis": "ski",
    "buses": "bus",
    "glasses": "glass",
    "scissors": "scissors",
    "pants": "pants",
    "jeans": "jeans",
    "shorts": "shorts",
    "sheep": "sheep",
    "fish": "fish",
    "deer": "deer",
}
# Words that end in s but are singular: leave them alone.
_KEEP = re.compile(r"(ss|us|is|ics|ous)$")

WORD_RE = re.compile(r"\w+|[^\w\s]")
"""How a caption is split into words before WordPiece (BERT's basic tokenizer splits the
same way: runs of word characters, and each punctuation mark on its own)."""


def singular(word: str) -> str:
    """Singular form of a lower-case English word (rules good enough for object names)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) <= 3 or not word.endswith("s") or _KEEP.search(word):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if re.search(r"(ches|shes|xes|zes|sses)$", word):
        return word[:-2]
    if word.endswith("oes") and len(word) > 4:
        return word[:-2]
    return word[:-1]


def split_words(text: str) -> list[str]:
    """Split a caption into the words that WordPiece will then split further."""
    return WORD_RE.findall(text)


def _norm(phrase: str) -> str:
    return " ".join(singular(w) for w in split_words(phrase.lower()) if w.isalnum())


@lru_cache(maxsize=1)
def default_synonyms() -> dict[str, str]:
    """The synonym table shipped with the package (word or phrase -> concept)."""
    raw = json.loads(resources.files("cmal.model").joinpath("synonyms.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


@dataclass
class ConceptVocab:
    """The anchor-concept vocabulary: the detector's class list after synonym mapping.

    Concept ids index ``concepts``; they are the AMC labels.
    """

    concepts: list[str]
    """Canonical concept names (normalised, singular), in id order."""
    synonyms: dict[str, str] = field(default_factory=default_synonyms)
    """Normalised word or phrase -> canonical concept name."""

    def __post_init__(self) -> None:
        self.synonyms = {_norm(k): _norm(v) for k, v in self.synonyms.items()}
        self._targets = set(self.synonyms.values())
        self.concepts = [self.canonical(c) for c in self.concepts]
        self.index = {c: i for i, c in enumerate(self.concepts)}
        if len(self.index) != len(self.concepts):
            dup = sorted({c for c in self.concepts if self.concepts.count(c) > 1})
            raise ValueError(f"concept list maps several classes to the same concept: {dup}")
        # Longest phrase first, so "tv set" wins over "set".
        phrases = set(self.index) | {k for k, v in self.synonyms.items() if v in self.index}
        self.max_ngram = max((len(p.split()) for p in phrases), default=1)

    def canonical(self, phrase: str) -> str:
        """Normalise a tag or a phrase: lower case, singular per word, synonym table."""
        norm = _norm(phrase)
        if norm in self.synonyms:
            return self.synonyms[norm]
        if norm in self._targets:  # already canonical: "cell phone" is not "cell" + "phone"
            return norm
        return " ".join(self.synonyms.get(w, w) for w in norm.split())

    def concept_id(self, phrase: str) -> int | None:
        """Concept id of a tag or phrase, or None if it is not in the vocabulary."""
        return self.index.get(self.canonical(phrase))

    def __len__(self) -> int:
        return len(self.concepts)


@dataclass(frozen=True)
class AnchorPair:
    """One anchor occurrence: where it is in the text and which region it pairs with."""

    text_pos: int
    """Index of the first wordpiece of the occurrence in the token sequence."""
    region: int
    """Region slot (index into the image's regions)."""
    concept: int
    """Concept id in the :class:`ConceptVocab` (the AMC label)."""


def find_anchors(
    words: list[str],
    word_starts: list[int | None],
    tags: list[str],
    confidences: list[float],
    vocab: ConceptVocab,
) -> list[AnchorPair]:
    """A = norm(tags) ∩ norm(words), as (text position, region, concept) pairs.

    ``words`` are the caption's words (see :func:`split_words`), ``word_starts[k]`` the
    token index of word k's first wordpiece (None when truncated away), ``tags`` and
    ``confidences`` the detector's output per region. Matching scans the caption left to
    right and takes the longest phrase (up to the vocabulary's longest n-gram) that maps to
    a concept present among the tags; each occurrence gives one pair.
    """
    if len(words) != len(word_starts):
        raise ValueError("words and word_starts must have the same length")
    if len(tags) != len(confidences):
        raise ValueError("tags and confidences must have the same length")
    best: dict[int, tuple[float, int]] = {}
    for region, (tag, conf) in enumerate(zip(tags, confidences, strict=True)):
        cid = vocab.concept_id(tag)
        if cid is not None and (cid not in best or conf > best[cid][0]):
            best[cid] = (conf, region)
    if not best:
        return []
    lowered = [w.lower() for w in words]
    pairs: list[AnchorPair] = []
    k = 0
    while k < len(words):
        matched = 0
        for n in range(min(vocab.max_ngram, len(words) - k), 0, -1):
            span = lowered[k : k + n]
            if not all(w.isalnum() for w in span):
                continue
            cid = vocab.concept_id(" ".join(span))
            if cid is not None and cid in best:
                if word_starts[k] is not None:
                    pairs.append(AnchorPair(word_starts[k], best[cid][1], cid))
                matched = n
                break
        k += max(matched, 1)
    return pairs


def tokenize_with_anchors(
    text: str,
    tokenizer,
    tags: list[str],
    confidences: list[float],
    vocab: ConceptVocab,
    max_len: int,
) -> tuple[list[int], list[AnchorPair]]:
    """WordPiece ids of ``text`` (with [CLS]/[SEP], truncated to ``max_len``) and its anchors.

    ``tokenizer`` is a Hugging Face fast BERT tokenizer (already loaded by the caller).
    """
    words = split_words(text)
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_len)
    starts: list[int | None] = [None] * len(words)
    for pos, wid in enumerate(enc.word_ids()):
        if wid is not None and starts[wid] is None:
            starts[wid] = pos
    return list(enc["input_ids"]), find_anchors(words, starts, tags, confidences, vocab)
