"""JSON values as paigeant carries them: numbers JSON can say (no NaN, no infinity)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .exceptions import NonFiniteNumber

__all__ = ("check_finite", "is_finite")


def check_finite(value: Any, where: str) -> None:
    """Raise `NonFiniteNumber` naming the first NaN or infinity in `value` (JSON-like data), if there is one."""
    path = _non_finite_path(value)
    if path is not None:
        found, place = path
        raise NonFiniteNumber(
            f"{where} holds {found} at {place or 'the top level'}; JSON has no NaN or infinity: use null, a string "
            "or a finite number there"
        )


def is_finite(value: Any) -> bool:
    """Whether `value` (JSON-like data) holds no NaN and no infinity."""
    return _non_finite_path(value) is None


def _non_finite_path(value: Any, path: str = "") -> tuple[str, str] | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else (repr(value), path)
    if isinstance(value, Mapping):
        for key, item in value.items():  # pyright: ignore[reportUnknownVariableType]
            found = _non_finite_path(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
            found = _non_finite_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None
