"""JSON round-trip of the frozen config dataclasses: one ``config_from_dict`` for every config."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def _tuplify(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuplify(v) for v in value)
    return value


def config_from_dict(cls: type, d: dict) -> Any:
    """Build frozen config ``cls`` from a JSON-decoded dict: lists (nested too) become tuples, and
    unknown keys are refused with an error naming the class and the keys."""
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config key(s) {unknown}")
    return cls(**{k: _tuplify(v) for k, v in d.items()})
