"""streaming's package ``__init__`` imports its ready-made dataset classes for C4, the
Pile, WebVid, ImageNet …; ``streaming.text`` pulls in transformers' AutoTokenizer on the
way: ~4 s of every process's start here (a training rank starts in ~8 s without it). cmal
uses none of them, so those three subpackages are imported when first used, not before."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

LATER = ("text", "multimodal", "vision")


class _Later(types.ModuleType):
    """Stands for a subpackage of streaming until a name in it is asked for, then is the
    real one (``from streaming.text import StreamingC4`` works as ever). It has the real
    package's ``__file__`` and ``__path__`` (its submodules import as ever), and answers
    other probes of dunder names (``inspect`` asks every module) without importing."""

    def __init__(self, name: str, folder: Path):
        super().__init__(name)
        self.__file__ = str(folder / "__init__.py")
        self.__path__ = [str(folder)]

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def defer() -> None:
    """Before streaming is first imported in this process (else: nothing to do)."""
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        return
    root = Path(list(spec.submodule_search_locations)[0])
    for sub in LATER:
        if (root / sub / "__init__.py").is_file():
            sys.modules.setdefault(f"streaming.{sub}", _Later(f"streaming.{sub}", root / sub))
