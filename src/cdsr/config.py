"""Loading params.yaml and building typed config dataclasses from its sections.

Each part of the code owns the dataclass for its own section (data configs live in
``cdsr.data.config``); this module only reads the file and turns mappings into dataclasses,
failing with the section path and the offending key when the file is wrong.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(ValueError):
    """A params file that cannot be turned into a valid configuration."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def check_dataset_name(name: str) -> str:
    """A dataset name is one plain path component (it names ``<root>/<name>/``, ``runs/.../<name>``,
    ``metrics/<name>`` and the registered model): letters, digits, ``.``, ``_``, ``-``, not
    starting with a dot, so no name reaches outside those folders."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200:
        raise ConfigError(f"dataset name {name!r} is not allowed: use letters, digits, '.', '_' and '-' "
                          "(starting with a letter or digit)")
    return name


def declared_dataset(params: dict[str, Any], name: str) -> str:
    """``name`` if params.yaml declares it under ``datasets:`` (the only names the commands take)."""
    declared = params.get("datasets") or {}
    if not isinstance(declared, dict) or name not in declared:
        raise ConfigError(f"dataset {name!r} is not declared under 'datasets:' in the params file "
                          f"(declared: {sorted(declared) if isinstance(declared, dict) else []})")
    return check_dataset_name(name)


def load_params(path: str | Path | None = None) -> dict[str, Any]:
    """Read a params YAML file (``params.yaml`` in the working directory by default)."""
    p = Path(path) if path is not None else DEFAULT_PARAMS
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:  # pragma: no cover - message comes from yaml
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return data


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, where): _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool, float):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def check_choices(obj: Any, where: str) -> None:
    """Refuse a value outside its ``Literal[...]`` annotation in a config dataclass built
    directly (the params parser, :func:`from_dict`, checks them on the way in)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal and getattr(obj, f.name) not in typing.get_args(tp):
            choices = ", ".join(map(str, typing.get_args(tp)))
            raise ConfigError(f"{where}.{f.name} must be one of {choices}, not {getattr(obj, f.name)!r}")


def from_dict(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping; unknown or mistyped keys raise ConfigError."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = name
        if key in data:
            kwargs[name] = _convert(hints[name], data[key], f"{where}.{key}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key '{key}'")
    return cls(**kwargs)
