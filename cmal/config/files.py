"""Config files into dataclasses: YAML read with its bases, overridden by dotted
command-line options (``model.unified.layers=2``), validated with errors that name
the file and the key.

A YAML file may start with ``base: other.yaml`` (or a list of files, paths relative to
the file itself); the bases are merged first, then the file, then the overrides.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, worded for the user: names the source and the key."""


def requirer(source: str) -> Callable[[bool, str, str], None]:
    """``need(ok, key, why)``: a :class:`ConfigError` "source: key: why" unless ``ok``."""

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{source}: {key}: {why}")

    return need


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, source)
            except ConfigError as e:
                errors.append(str(e))
        names = " or ".join(_type_name(o) for o in options if o is not type(None))
        raise ConfigError(f"{source}: {key}: expected {names}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected float, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{source}: {key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected str, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _apply(obj: Any, data: dict[str, Any], source: str, prefix: str = "") -> None:
    """Write the mapping ``data`` into the dataclass ``obj`` in place, checking every key."""
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted}: expected a mapping, got {value!r}")
            _apply(getattr(obj, key), value, source, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, tp, dotted, source))


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The file's layers in merge order: its bases (recursively) first, then itself."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' includes itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    bases = data.pop("base", None) or []
    if isinstance(bases, str):
        bases = [bases]
    layers: list[tuple[str, dict[str, Any]]] = []
    for base in bases:
        layers += _read_yaml(path.parent / base, seen + (path,))
    layers.append((str(path), data))
    return layers


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b.c=value`` -> (``a.b.c``, YAML-parsed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command line: override {text!r} must look like key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def fill(obj: Any, path: str | Path | None, overrides: list[str] | None) -> Any:
    """Defaults of the dataclass ``obj``, then ``path`` (with its bases), then overrides."""
    if path is not None:
        for source, data in _read_yaml(Path(path)):
            _apply(obj, data, source)
    for text in overrides or []:
        key, value = parse_override(text)
        _apply(obj, _nest(key, value), f"command line ({text})")
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, as printed at start and saved with every run."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, folder: str | Path) -> Path:
    """Write ``config.yaml`` into ``folder`` (atomically) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "config.yaml"
    tmp = folder / ".config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    tmp.replace(target)
    return target
