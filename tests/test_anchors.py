"""The anchor operator on hand-written cases."""

from __future__ import annotations

import pytest

from cmal.data.anchors import (
    ConceptVocab,
    default_synonyms,
    find_anchors,
    singular,
    split_words,
)
from cmal.data.language import SYNONYMS

VOCAB = ConceptVocab(["dog", "cat", "car", "traffic light", "light", "person", "giraffe"])


def anchors(text: str, tags: list[str], confs: list[float] | None = None):
    words = split_words(text)
    starts = list(range(1, len(words) + 1))  # one wordpiece per word, after [CLS]
    return find_anchors(words, starts, tags, confs or [0.9] * len(tags), VOCAB)


@pytest.mark.parametrize(
    "word, expected",
    [
        ("dogs", "dog"),
        ("boxes", "box"),
        ("buses", "bus"),
        ("glasses", "glass"),
        ("berries", "berry"),
        ("mice", "mouse"),
        ("bus", "bus"),
        ("people", "person"),
        ("crosses", "cross"),
        ("circles", "circle"),
    ],
)
def test_singular(word, expected):
    assert singular(word) == expected


def test_plural_in_text():
    (pair,) = anchors("Two dogs run.", ["dog", "car"])
    assert (pair.text_pos, pair.region, pair.concept) == (2, 0, VOCAB.index["dog"])


def test_synonym_in_text_and_tag():
    (pair,) = anchors("a puppy sleeps", ["tree", "dog"])
    assert pair.region == 1 and pair.concept == VOCAB.index["dog"]
    (pair,) = anchors("a woman waves", ["man"])  # both map to person
    assert pair.concept == VOCAB.index["person"]


def test_multi_word_tag_wins_over_its_part():
    pairs = anchors("the traffic lights are red", ["light", "traffic light"])
    assert [(p.text_pos, p.region, p.concept) for p in pairs] == [
        (2, 1, VOCAB.index["traffic light"])
    ]


def test_repeated_word_each_occurrence_to_best_region():
    pairs = anchors("a cat and another Cat", ["cat", "cat", "dog"], [0.3, 0.8, 0.9])
    assert [(p.text_pos, p.region) for p in pairs] == [(2, 1), (5, 1)]


def test_no_anchor():
    assert anchors("a dog on grass", ["car", "unknown thing"]) == []
    assert anchors("", ["dog"]) == []
    assert anchors("a dog", []) == []


def test_truncated_word_gives_no_pair():
    words = split_words("a dog and a cat")
    pairs = find_anchors(words, [1, 2, 3, None, None], ["cat", "dog"], [0.9, 0.9], VOCAB)
    assert [p.concept for p in pairs] == [VOCAB.index["dog"]]


def test_multi_wordpiece_word_with_real_tokenizer():
    from cmal.data.anchors import tokenize_with_anchors
    from cmal.model.pretrained import load_tokenizer

    tok = load_tokenizer()
    ids, pairs = tokenize_with_anchors(
        "Two giraffes near a traffic light",
        tok,
        ["giraffe", "traffic light"],
        [0.9, 0.8],
        VOCAB,
        32,
    )
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    assert len(tok.tokenize("giraffes")) > 1  # the case under test: several wordpieces
    by_concept = {VOCAB.concepts[p.concept]: p for p in pairs}
    assert pieces[by_concept["giraffe"].text_pos] == tok.tokenize("giraffes")[0]
    assert pieces[by_concept["traffic light"].text_pos] == "traffic"
    assert by_concept["traffic light"].region == 1


def test_attribute_tags_match_synonyms_word_by_word():
    world_words = {w: shape for shape, ws in SYNONYMS.items() for w in ws}
    vocab = ConceptVocab(
        ["red circle", "blue circle", "red square", "cell phone"],
        {**default_synonyms(), **world_words},
    )
    words = split_words("Two red discs and a blue ring near a red block")
    starts = list(range(1, len(words) + 1))
    tags = ["blue circle", "red circle", "red square"]
    pairs = find_anchors(words, starts, tags, [0.9] * 3, vocab)
    # Each anchor is the colour word (the phrase's first word) bound to its region.
    assert [(words[p.text_pos - 1], p.region, vocab.concepts[p.concept]) for p in pairs] == [
        ("red", 1, "red circle"),
        ("blue", 0, "blue circle"),
        ("red", 2, "red square"),
    ]
    # A colour that the image does not have is not an anchor, whatever the shape.
    assert find_anchors(["a", "blue", "block"], [1, 2, 3], tags, [0.9] * 3, vocab) == []
    # An already canonical phrase is not mapped again word by word ("phone" -> "cell phone").
    assert vocab.canonical("cell phone") == "cell phone"
    assert vocab.canonical("mobile phones") == "cell phone"


def _pairs(vocab: ConceptVocab, text: str, tags: list[str]) -> list[tuple[str, str]]:
    words = split_words(text)
    found = find_anchors(words, list(range(len(words))), tags, [0.9] * len(tags), vocab)
    return [(words[p.text_pos], vocab.concepts[p.concept]) for p in found]


def test_classes_that_share_a_name_share_one_concept():
    vocab = ConceptVocab(["man", "woman", "person", "donut", "doughnut", "tv", "television"])
    assert vocab.concepts == ["person", "donut", "television"]
    assert vocab.classes_of()["person"] == ["man", "woman", "person"]
    # A woman's region anchors "man" in the text: both are the concept person.
    assert _pairs(vocab, "A man eats a doughnut", ["woman", "donut"]) == [
        ("man", "person"),
        ("doughnut", "donut"),
    ]
    # The rule is the synonym table: take man and woman out of it and they stay apart.
    apart = ConceptVocab(["man", "woman", "person"], {**default_synonyms(), "man": None,
                                                      "woman": None})  # fmt: skip
    assert apart.concepts == ["man", "woman", "person"]
    assert _pairs(apart, "A man and a woman", ["woman"]) == [("woman", "woman")]


def test_stop_list_drops_classes_that_are_no_object():
    vocab = ConceptVocab(["dog", "white", "2", "bad sentence", "and"], stoplist=["white", "2",
                         "bad sentence", "and"])  # fmt: skip
    assert vocab.concepts == ["dog"]
    assert vocab.class_concept["white"] is None
    assert _pairs(vocab, "a white dog and 2 cats", ["white", "dog", "2", "and"]) == [("dog", "dog")]


def test_multi_word_possessive_and_hyphenated_classes_match_the_text():
    vocab = ConceptVocab(["man's head", "t-shirt", "hot dog", "teddy bear", "tennis racket"])
    tags = list(vocab.classes)
    assert _pairs(vocab, "The man's head above a t-shirt", tags) == [
        ("man", "person head"),
        ("t", "t shirt"),
    ]
    assert _pairs(vocab, "two hot dogs, a Teddy Bear and a tennis racquet", tags) == [
        ("hot", "hot dog"),
        ("Teddy", "teddy bear"),
        ("tennis", "tennis racket"),
    ]
    # A comma between the words of a name ends it.
    assert _pairs(vocab, "hot, dog", tags) == []


def test_other_names_on_a_class_line_map_to_the_class():
    vocab = ConceptVocab(["stop sign", "car"], aliases={"stopsign": "stop sign"})
    assert vocab.concept_id("stopsign") == vocab.concept_id("stop sign") == 0
    assert _pairs(vocab, "a stopsign by a car", ["stop sign", "car"]) == [
        ("stopsign", "stop sign"),
        ("car", "car"),
    ]


def test_cached_word_pieces_give_the_tokenizers_own_ids():
    # tokenize() asks the tokenizer once per new word; its ids and word starts must be the
    # tokenizer's for the pre-split text, truncation included.
    import random

    from cmal.data.anchors import split_words, tokenize
    from cmal.model.pretrained import load_tokenizer

    tok = load_tokenizer()
    texts = ["Two dogs chase a frisbee.", "The man's t-shirt, red; café “naïve” 🙂 x²", "",
             "日本語 and supercalifragilisticexpialidocious " * 6]  # fmt: skip
    rng = random.Random(0)
    words = " ".join(texts).split()
    texts += [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(200)]
    for max_len in (6, 12, 40):
        got = tokenize(texts, tok, max_len)
        split = [split_words(t) for t in texts]
        enc = tok(split, is_split_into_words=True, truncation=True, max_length=max_len)
        for k, (ids, ws, starts) in enumerate(got):
            want = [None] * len(ws)
            for pos, wid in enumerate(enc.word_ids(k)):
                if wid is not None and want[wid] is None:
                    want[wid] = pos
            assert (ids, ws, starts) == (enc["input_ids"][k], split[k], want), texts[k]
