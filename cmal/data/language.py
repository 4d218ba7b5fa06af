"""The scene world's text: captions, VQA questions with ten human answers, SNLI-VE
hypotheses, NLVR2 statements and referring expressions, all true (or false, on purpose)
of the objects they describe.

Captions use synonyms and plural forms ("two red discs", "a blue block"), so the anchor
operator has real normalisation to do.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from cmal.data.scene import COLOURS, SHAPES, Obj

SYNONYMS = {
    "square": ["square", "square", "block", "cube"],
    "circle": ["circle", "circle", "disc", "ring"],
    "triangle": ["triangle", "triangle", "wedge"],
    "star": ["star"],
    "cross": ["cross", "cross", "plus"],
    "bar": ["bar", "bar", "stripe", "stick"],
}
"""Words a caption may use for a shape (all in the shipped synonym table)."""
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
DISTRACTORS = [
    "on a grey background",
    "in a simple drawing",
    "with plenty of empty space",
    "drawn with flat colours",
    "seen from above",
]
NEUTRAL = [
    "{a} {c} {s} was drawn by a child.",
    "The {c} {s} is made of wood.",
    "The {c} {s} was painted on a monday.",
    "Someone is about to move the {c} {s}.",
]


def plural(word: str) -> str:
    """English plural of a shape word."""
    return word + "es" if word.endswith(("s", "x", "ch", "sh")) else word + "s"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _word(rng, shape: str) -> str:
    return _pick(rng, SYNONYMS[shape])


def caption(rng: np.random.Generator, objs: list[Obj]) -> str:
    """A caption naming one to three colour-shape groups of the scene."""
    groups = Counter((o.colour, o.shape) for o in objs)
    keys = list(groups)
    rng.shuffle(keys)
    phrases = []
    for colour, shape in keys[: int(rng.integers(1, min(3, len(keys)) + 1))]:
        n, w = groups[(colour, shape)], _word(rng, shape)
        phrases.append(
            f"{NUMBERS[n]} {colour} {plural(w)}" if n > 1 else f"{article(colour)} {colour} {w}"
        )
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if rng.random() < 0.5:
        text += " " + _pick(rng, DISTRACTORS)
    return text[0].upper() + text[1:] + "."


def vqa(rng: np.random.Generator, objs: list[Obj]) -> tuple[str, str, str]:
    """(question, answer, answer_type) about colour, count, existence or shape.

    Balanced as VQA v2 is, so that the question alone tells little: "Is there…?" is
    answered yes and no equally often, and a count question first draws its answer from
    the counts the scene has, then a shape with that count."""
    shapes = Counter(o.shape for o in objs)
    colours = Counter(o.colour for o in objs)
    kind = _pick(rng, ["colour", "count", "exists", "shape"])
    if kind == "colour":
        unique = [o for o in objs if shapes[o.shape] == 1]
        if unique:
            o = _pick(rng, unique)
            return f"What color is the {o.shape}?", o.colour, "other"
        kind = "count"
    if kind == "shape":
        unique = [o for o in objs if colours[o.colour] == 1]
        if unique:
            o = _pick(rng, unique)
            return f"What shape is the {o.colour} object?", o.shape, "other"
        kind = "count"
    if kind == "count":
        n = _pick(rng, sorted({shapes[s] for s in SHAPES}))
        s = _pick(rng, [s for s in SHAPES if shapes[s] == n])
        return f"How many {plural(s)} are there?", str(n), "number"
    present = sorted({(o.colour, o.shape) for o in objs})
    if rng.random() < 0.5:
        (colour, shape), answer = _pick(rng, present), "yes"
    else:
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        (colour, shape), answer = _pick(rng, absent), "no"
    return f"Is there {article(colour)} {colour} {shape}?", answer, "yes/no"


def human_answers(rng: np.random.Generator, answer: str, kind: str, n: int = 10) -> list[str]:
    """Ten annotators: most give the answer (in varied surface forms), some disagree."""
    out = []
    for _ in range(n):
        a = answer
        if rng.random() < 0.15:  # a plausible disagreement
            if kind == "number":
                a = str(max(0, int(answer) + _pick(rng, [-1, 1])))
            elif kind == "yes/no":
                a = "no" if answer == "yes" else "yes"
            else:
                a = _pick(rng, list(COLOURS) if answer in COLOURS else list(SHAPES))
        if kind == "number" and rng.random() < 0.3:
            a = NUMBERS[int(a)] if int(a) < len(NUMBERS) else a  # "two": normalises to 2
        elif rng.random() < 0.1:
            a = a.capitalize() + "."  # case and punctuation: normalised away
        out.append(a)
    return out


def hypotheses(rng: np.random.Generator, objs: list[Obj]) -> list[tuple[str, str]]:
    """Four (hypothesis, gold_label) pairs per image, from templates shared between labels
    so that the text alone cannot tell the label: a fact ("There is a red disc.", "There
    are two discs.") entailed, and one of the same form contradicted; a neutral sentence
    about an object that is there ("The red disc is made of wood."), and the same sentence
    about one that is not (a contradiction)."""
    present = sorted({(o.colour, o.shape) for o in objs})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    counts = Counter(o.shape for o in objs)

    def exists(c: str, s: str) -> str:
        return f"There is {article(c)} {c} {s}."

    def count(s: str, n: int) -> str:
        return f"There are {NUMBERS[n]} {plural(s)}." if n != 1 else f"There is one {s}."

    def neutral(c: str, s: str) -> str:
        return _pick(rng, NEUTRAL).format(a=article(c).capitalize(), c=c, s=s)

    if rng.random() < 0.5:
        (c, s), (c2, s2) = _pick(rng, present), _pick(rng, absent)
        fact, false_fact = exists(c, s), exists(c2, s2)
    else:
        s = _pick(rng, sorted(counts))
        s2 = _pick(rng, list(SHAPES))
        wrong = [n for n in range(1, 6) if n != counts[s2]]
        fact, false_fact = count(s, counts[s]), count(s2, _pick(rng, wrong))
    return [
        (fact, "entailment"),
        (false_fact, "contradiction"),
        (neutral(*_pick(rng, present)), "neutral"),
        (neutral(*_pick(rng, absent)), "contradiction"),
    ]


def statements(
    rng: np.random.Generator, left: list[Obj], right: list[Obj]
) -> list[tuple[str, str, bool]]:
    """NLVR2 statements about an image pair, as (family, text, truth): for each family, one
    true and one false statement where the pair has them. False ones are near misses (a
    colour-shape pair in one image only, not in both; the count comparison reversed), so
    one image or the words alone cannot tell; the world keeps as many false as true ones
    per family (NLVR2 pairs each sentence with true and false image pairs)."""
    lpairs = {(o.colour, o.shape) for o in left}
    rpairs = {(o.colour, o.shape) for o in right}
    nl, nr = Counter(o.shape for o in left), Counter(o.shape for o in right)
    out: list[tuple[str, str, bool]] = []

    def add(family: str, true: set, false: set, text) -> None:
        for pool, truth in ((true, True), (false, False)):
            if pool:
                out.append((family, text(_pick(rng, sorted(pool))), truth))

    def thing(cs: tuple[str, str]) -> str:
        return f"{article(cs[0])} {cs[0]} {cs[1]}"

    add("both", lpairs & rpairs, lpairs ^ rpairs, lambda cs: f"Both images contain {thing(cs)}.")
    side, other, mine, theirs = ("left", "right", lpairs, rpairs)
    if rng.random() < 0.5:
        side, other, mine, theirs = ("right", "left", rpairs, lpairs)
    add(
        "only",
        mine - theirs,
        theirs,  # in the other image only, or in both
        lambda cs: f"The {side} image contains {thing(cs)} and the {other} image does not.",
    )
    add(
        "more",
        {s for s in SHAPES if nl[s] > nr[s]},
        {s for s in SHAPES if nl[s] < nr[s]},
        lambda s: f"The left image contains more {plural(s)} than the right image.",
    )
    return out


def expressible(objs: list[Obj], k: int) -> bool:
    """Whether object k can be told apart by appearance (colour, shape, size)."""
    o = objs[k]
    return sum((x.colour, x.shape, x.size) == (o.colour, o.shape, o.size) for x in objs) == 1


def expression(rng: np.random.Generator, objs: list[Obj], k: int) -> str | None:
    """A RefCOCO+-style expression (appearance only, no absolute location) for object k,
    or None when the object cannot be told apart by appearance."""
    if not expressible(objs, k):
        return None
    o = objs[k]
    same_cs = [x for x in objs if (x.colour, x.shape) == (o.colour, o.shape)]
    if len(same_cs) == 1:
        if sum(x.colour == o.colour for x in objs) == 1 and rng.random() < 0.3:
            return f"the {o.colour} one"
        return f"{o.colour} {_word(rng, o.shape)}"
    same_all = [x for x in same_cs if x.size == o.size]
    if len(same_all) == 1:
        return f"the {o.size} {o.colour} {_word(rng, o.shape)}"
    return None
