"""The anchor operator on hand-written cases."""

from __future__ import annotations

import pytest

from cmal.model.anchors import ConceptVocab, find_anchors, singular, split_words

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
    from cmal.model.anchors import tokenize_with_anchors
    from cmal.pretrained import load_tokenizer

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
    vocab = ConceptVocab(["red circle", "blue circle", "red square", "cell phone"])
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
