"""The anchor operator ⊕: detector tags ∩ caption words, after normalisation.

An anchor is a concept that is both a detected object in the image and a word (or a
phrase, for multi-word tags) in the text. For every occurrence in the text we keep one
pair (text position, region slot): the text position is the first wordpiece of the first
word of the occurrence, the region is the highest-confidence region carrying that concept.

Normalisation, applied to tags and words alike (:meth:`ConceptVocab.canonical`): lower
case; a possessive ``'s`` and hyphens dropped ("man's head" is "man head", "t-shirt" is
"t shirt"); singular form per word (rules plus an irregular table); then the synonym table
(``synonyms.json``, shipped) maps to a canonical concept name: the whole phrase if the
table has it, else word by word, so that attribute tags ("red car") match "red automobile"
as well.

The rule that turns a detector's class list into anchor concepts (:class:`ConceptVocab`):
every class whose normalised name is not in the stop-list (``stoplist.txt``, shipped: VG's
numbers, colours, function words and abstract nouns) becomes its canonical name; classes
with the same canonical name share one concept (donut and doughnut; man, woman, boy, ...,
person under the shipped table). Concept ids number the distinct names in class order;
they are the AMC labels. Pure Python; the only files it reads are those two, shipped in
the package.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
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


_JOINERS = {"'", "’", "-"}
"""Marks that join the words of one name: a possessive ("man's", with the ``s`` after it
dropped too) and a hyphen ("t-shirt"); any other mark ends a phrase."""


def name_words(words: list[str]) -> list[int]:
    """Indices of the words that take part in names: alphanumeric words, without the ``s``
    of a possessive; joiners between words are skipped (they do not break a phrase)."""
    kept: list[int] = []
    for k, w in enumerate(words):
        if w in _JOINERS:
            continue
        if w.lower() == "s" and k > 0 and words[k - 1] in {"'", "’"}:
            continue
        kept.append(k)
    return kept


def _norm(phrase: str) -> str:
    words = split_words(phrase.lower())
    return " ".join(singular(words[k]) for k in name_words(words) if words[k].isalnum())


@lru_cache(maxsize=1)
def default_synonyms() -> dict[str, str]:
    """The synonym table shipped with the package (word or phrase -> concept)."""
    raw = json.loads(resources.files("cmal.data").joinpath("synonyms.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}


@lru_cache(maxsize=1)
def default_stoplist() -> frozenset[str]:
    """The shipped stop-list: detector classes that are not objects (one per line)."""
    text = resources.files("cmal.data").joinpath("stoplist.txt").read_text()
    return frozenset(read_names(text.splitlines()))


def read_names(lines: Iterable[str]) -> list[str]:
    """Non-empty lines that are not ``#`` comments, stripped."""
    return [s for s in (line.strip() for line in lines) if s and not s.startswith("#")]


@dataclass
class ConceptVocab:
    """The anchor-concept vocabulary: a detector's class list after normalisation, the
    stop-list and synonym mapping (the rule is in the module docstring).

    Concept ids index ``concepts``; they are the AMC labels.
    """

    classes: list[str]
    """The detector's class names (its tags), in id order."""
    synonyms: dict[str, str | None] = field(default_factory=default_synonyms)
    """Word or phrase -> canonical concept name (None drops an entry)."""
    stoplist: Iterable[str] = field(default_factory=default_stoplist)
    """Class names that are no concept (compared after normalisation)."""
    aliases: dict[str, str] = field(default_factory=dict)
    """Other names of a class (a tag or a phrase) -> that class: the names after the first
    on a line of ``objects_vocab.txt`` ("stop sign,stopsign")."""

    def __post_init__(self) -> None:
        self.synonyms = {_norm(k): _norm(v) for k, v in self.synonyms.items() if v is not None}
        self._targets = set(self.synonyms.values())
        self.stopped = {_norm(s) for s in self.stoplist}
        for alias, cls in self.aliases.items():
            target = self._class_name(cls)
            if target is not None:
                self.synonyms.setdefault(_norm(alias), target)
        self.class_concept: dict[str, str | None] = {c: self._class_name(c) for c in self.classes}
        self.concepts: list[str] = list(
            dict.fromkeys(n for n in self.class_concept.values() if n is not None)
        )
        """Canonical concept names, in id order (first class that gives each)."""
        self.index = {c: i for i, c in enumerate(self.concepts)}
        # Longest phrase first, so "tv set" wins over "set".
        phrases = set(self.index) | {k for k, v in self.synonyms.items() if v in self.index}
        self.max_ngram = max((len(p.split()) for p in phrases), default=1)
        self._ids: dict[str, int | None] = {}

    def _class_name(self, cls: str) -> str | None:
        norm = _norm(cls)
        if not norm or norm in self.stopped:
            return None
        name = self.canonical(cls)
        return None if name in self.stopped else name

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
        # Memoised: conversion asks for every tag of an image and every n-gram of every
        # text, mostly the same few thousand strings (x9 faster conversion at 36 regions).
        if phrase not in self._ids:
            if len(self._ids) > 1 << 20:
                self._ids.clear()
            self._ids[phrase] = self.index.get(self.canonical(phrase))
        return self._ids[phrase]

    def classes_of(self) -> dict[str, list[str]]:
        """Concept name -> the classes that map to it (to report what merged)."""
        out: dict[str, list[str]] = {}
        for c, n in self.class_concept.items():
            if n is not None:
                out.setdefault(n, []).append(c)
        return out

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


def region_concepts(
    tags: list[str], confidences: list[float], vocab: ConceptVocab
) -> dict[int, tuple[float, int]]:
    """Concept id -> (confidence, region) of the most confident region tagged with it: what
    an image offers every text of it (computed once per image when it has many texts)."""
    if len(tags) != len(confidences):
        raise ValueError("tags and confidences must have the same length")
    best: dict[int, tuple[float, int]] = {}
    for region, (tag, conf) in enumerate(zip(tags, confidences, strict=True)):
        cid = vocab.concept_id(tag)
        if cid is not None and (cid not in best or conf > best[cid][0]):
            best[cid] = (conf, region)
    return best


def find_anchors(
    words: list[str],
    word_starts: list[int | None],
    tags: list[str],
    confidences: list[float],
    vocab: ConceptVocab,
    best: dict[int, tuple[float, int]] | None = None,
) -> list[AnchorPair]:
    """A = norm(tags) ∩ norm(words), as (text position, region, concept) pairs.

    ``words`` are the caption's words (see :func:`split_words`), ``word_starts[k]`` the
    token index of word k's first wordpiece (None when truncated away), ``tags`` and
    ``confidences`` the detector's output per region (or ``best``, their
    :func:`region_concepts`). Matching scans the caption left to right and takes the
    longest phrase (up to the vocabulary's longest n-gram) that maps to a concept present
    among the tags; a possessive or a hyphen inside a phrase does not end it ("the man's
    head", "a t-shirt"). Each occurrence gives one pair.
    """
    if len(words) != len(word_starts):
        raise ValueError("words and word_starts must have the same length")
    if best is None:
        best = region_concepts(tags, confidences, vocab)
    if not best:
        return []
    kept = name_words(words)
    lowered = [words[k].lower() for k in kept]
    # run[j]: how many alphanumeric words start at j (a phrase never spans another mark).
    run = [0] * (len(kept) + 1)
    for j in range(len(kept) - 1, -1, -1):
        run[j] = run[j + 1] + 1 if lowered[j].isalnum() else 0
    pairs: list[AnchorPair] = []
    j = 0
    while j < len(kept):
        matched = 0
        for n in range(min(vocab.max_ngram, run[j]), 0, -1):
            cid = vocab.concept_id(" ".join(lowered[j : j + n]))
            if cid is not None and cid in best:
                if word_starts[kept[j]] is not None:
                    pairs.append(AnchorPair(word_starts[kept[j]], best[cid][1], cid))
                matched = n
                break
        j += max(matched, 1)
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
    ((ids, words, starts),) = tokenize([text], tokenizer, max_len)
    return ids, find_anchors(words, starts, tags, confidences, vocab)


def tokenize(
    texts: list[str], tokenizer, max_len: int
) -> list[tuple[list[int], list[str], list[int | None]]]:
    """(WordPiece ids, words, token index of each word's first wordpiece or None when
    truncated away) of each text: the tokenizer's own ids with [CLS]/[SEP], truncated to
    ``max_len``. Each word's pieces are the tokenizer's for that word alone (it splits
    pre-split words independently) and are kept per tokenizer: conversion sees the same
    few thousand words millions of times, and asking the tokenizer for every text was a
    third of its time (tests/test_anchors.py checks the ids against the tokenizer's)."""
    pieces = _pieces(tokenizer)
    words = [split_words(t) for t in texts]
    new = sorted({w for ws in words for w in ws if w not in pieces})
    if new:
        for w, ids in zip(new, tokenizer(new, add_special_tokens=False)["input_ids"], strict=True):
            pieces[w] = list(ids)
    room = max_len - 2  # [CLS] and [SEP]
    out = []
    for ws in words:
        ids, starts = [tokenizer.cls_token_id], []
        for w in ws:
            got = pieces[w]
            starts.append(len(ids) if got and len(ids) - 1 < room else None)
            ids += got[: max(0, room - (len(ids) - 1))]
        out.append((ids + [tokenizer.sep_token_id], ws, starts))
    return out


def _pieces(tokenizer) -> dict[str, list[int]]:
    """The word -> pieces cache of a tokenizer, kept on it (a few MB for real corpora)."""
    cache = tokenizer.__dict__.setdefault("_cmal_word_pieces", {})
    if len(cache) > 1 << 21:
        cache.clear()
    return cache
