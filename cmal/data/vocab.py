"""The anchor vocabulary of a conversion: a detector's class list (and attribute list) with
the synonym table and the stop-list chosen on the command line.

``--synonyms``: ``default`` (the shipped table), ``none``, or a JSON file of word or phrase
-> concept merged over the shipped table (a value of ``null`` removes an entry, so
``{"man": null, "woman": null}`` keeps man and woman apart from person).
``--stoplist``: ``default`` (the shipped list), ``none``, or a file of class names, one per
line (``#`` comments), used instead of the shipped one.
"""

from __future__ import annotations

import json
from pathlib import Path

from cmal.data.anchors import ConceptVocab, default_stoplist, default_synonyms, read_names
from cmal.data.convert import concept_names
from cmal.data.errors import DataError


def synonym_table(spec: str | Path = "default") -> dict[str, str | None]:
    """The synonym table named by ``--synonyms``."""
    if str(spec) == "none":
        return {}
    table: dict[str, str | None] = dict(default_synonyms())
    if str(spec) == "default":
        return table
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"synonym table not found: {path} (or use 'default' / 'none')")
    try:
        extra = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(extra, dict):
        raise DataError(f"{path}: expected an object of word -> concept")
    for k, v in extra.items():
        if k.startswith("_"):
            continue
        if v is not None and not isinstance(v, str):
            raise DataError(f"{path}: entry {k!r} should map to a string or null, got {v!r}")
        table[k] = v
    return table


def stop_list(spec: str | Path = "default") -> frozenset[str]:
    """The stop-list named by ``--stoplist``."""
    if str(spec) == "none":
        return frozenset()
    if str(spec) == "default":
        return default_stoplist()
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"stop-list not found: {path} (or use 'default' / 'none')")
    return frozenset(read_names(path.read_text().splitlines()))


def make_vocab(
    classes: list[str],
    attributes: list[str] | None = None,
    aliases: dict[str, str] | None = None,
    synonyms: str | Path = "default",
    stoplist: str | Path = "default",
) -> ConceptVocab:
    """Concepts of a detector's classes; with attributes, every "<attribute> <class>" of
    the classes the stop-list keeps (a stop-listed class is no object to bind a colour to)."""
    table, stop = synonym_table(synonyms), stop_list(stoplist)
    names = classes
    if attributes is not None:
        plain = ConceptVocab(classes, table, stop)
        names = concept_names(
            [c for c in classes if plain.class_concept[c] is not None], attributes
        )
    return ConceptVocab(names, table, stop, aliases or {})
