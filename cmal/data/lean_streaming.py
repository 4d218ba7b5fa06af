"""streaming's package ``__init__`` imports its ready-made dataset classes for C4, the
Pile, WebVid, ImageNet …; ``streaming.text`` pulls in transformers' AutoTokenizer on the
way: ~4 s of every process's start here (a training rank starts in ~8 s without it). cmal
uses none of them, so those three subpackages are imported when first used, not before.

``streaming.base.dataloader`` imports transformers too (~2.5 s here, half of it
``torch.distributed.tensor``), for two classes it only tests batches against
(``BatchEncoding``, ``BatchFeature``: a tokenizer's output as a batch, which cmal's
collate never returns). Where transformers is not imported yet, that module is executed
with stand-ins for those two, which are then taken out of ``sys.modules``: a later
``import transformers`` (the tokenizer, BERT weights) gets the real package."""

from __future__ import annotations

import importlib
import importlib.abc
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


STAND_INS = {
    "transformers.feature_extraction_utils": "BatchFeature",
    "transformers.tokenization_utils_base": "BatchEncoding",
}


class _WithoutTransformers(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``streaming.base.dataloader`` as ever, and executes it with transformers'
    modules it imports stood in for (see the module's doc)."""

    TARGET = "streaming.base.dataloader"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self.real = spec.loader
            spec.loader = self
        return spec

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module) -> None:
        if "transformers" in sys.modules:
            self.real.exec_module(module)
            return
        made = {"transformers": types.ModuleType("transformers")}
        for name, cls in STAND_INS.items():
            made[name] = types.ModuleType(name)
            setattr(made[name], cls, type(cls, (), {"__module__": name}))
        sys.modules.update(made)
        try:
            self.real.exec_module(module)
        finally:
            for name, stand_in in made.items():
                if sys.modules.get(name) is stand_in:
                    del sys.modules[name]


def defer() -> None:
    """Before streaming is first imported in this process (else: nothing to do)."""
    if "streaming" in sys.modules:
        return
    sys.meta_path.insert(0, _WithoutTransformers())
    spec = importlib.util.find_spec("streaming")
    if spec is None or not spec.submodule_search_locations:
        return
    root = Path(list(spec.submodule_search_locations)[0])
    for sub in LATER:
        if (root / sub / "__init__.py").is_file():
            sys.modules.setdefault(f"streaming.{sub}", _Later(f"streaming.{sub}", root / sub))
