"""Named presets: a registered model plus the training regime it was found best with, got by
name (`cdsr train --preset NAME`, `cdsr tune`/benchmark read the same expansion).

A preset is declared in params.yaml under ``presets:``::

    presets:
      abxi-paper:
        model: abxi
        description: ABXI's public recipe
        set: [train.lr=0.0001, train.weight_decay=5.0, model.d=256]

``set`` holds ``--set`` style overrides applied over params.yaml before the user's own
``--set`` (which win). ``base: OTHER`` starts from preset OTHER's overrides (its ``set``, its
own base's first), so a regime is written once and its variants name only what they change;
the model is always the preset's own. A preset is data, not code: it is checked at the edge (known model,
well-formed overrides, a config that parses) and expands to ``(model, overrides)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from cdsr.config import ConfigError, from_dict

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")


@dataclass(frozen=True)
class Preset:
    model: str
    description: str = ""
    set: list[str] = field(default_factory=list)
    base: str = ""


def presets(params: dict[str, Any]) -> dict[str, Preset]:
    """Every preset declared in ``params`` (``presets:``), parsed and checked."""
    from cdsr.models.registry import MODELS

    raw = params.get("presets") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"presets: expected a mapping of name -> preset, got {raw!r}")
    out = {}
    for name, spec in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"presets: {name!r} is not a valid preset name (letters, digits, _ . + -)")
        p = from_dict(Preset, spec, f"presets.{name}")
        if p.model not in MODELS:
            raise ConfigError(f"presets.{name}.model: unknown model {p.model!r}; known: {sorted(MODELS)}")
        bad = [s for s in p.set if not isinstance(s, str) or "=" not in s]
        if bad:
            raise ConfigError(f"presets.{name}.set: expected section.key=value strings, got {bad}")
        out[name] = p
    return {name: _with_base(out, name, ()) for name in out}


def _with_base(declared: dict[str, Preset], name: str, seen: tuple[str, ...]) -> Preset:
    """Preset ``name`` with its base's overrides before its own (``set`` then holds them all)."""
    p = declared[name]
    if not p.base:
        return p
    if p.base not in declared:
        raise ConfigError(f"presets.{name}.base: unknown preset {p.base!r}; declared: {sorted(declared)}")
    if p.base in seen + (name,):
        raise ConfigError(f"presets.{name}.base: a cycle ({' -> '.join(seen + (name, p.base))})")
    base = _with_base(declared, p.base, seen + (name,))
    return Preset(p.model, p.description, [*base.set, *p.set])


def expand(params: dict[str, Any], name: str, model: str | None = None) -> tuple[str, list[str]]:
    """``(model, overrides)`` of preset ``name``; ``model``, when given, must be the preset's."""
    known = presets(params)
    if name not in known:
        raise ConfigError(f"unknown preset {name!r}; declared in params.yaml `presets:`: {sorted(known) or 'none'}")
    p = known[name]
    if model is not None and model != p.model:
        raise ConfigError(f"preset {name!r} is a {p.model!r} preset, not {model!r} (drop --model, or pick another preset)")
    return p.model, list(p.set)
