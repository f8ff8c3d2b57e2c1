"""How the Redis transport's entries look in Redis: the consumer group, headers as JSON, times in milliseconds."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import cast

__all__ = ("GROUP", "dump_headers", "load_headers", "ms")

GROUP = "workers"
"""The consumer group of every stream."""


def ms(seconds: float) -> int:
    """`seconds` in whole milliseconds, at least 1 (Redis reads 0 as "no expiry" or "no wait")."""
    return max(1, round(seconds * 1000))


def dump_headers(headers: Mapping[str, str] | None) -> bytes:
    """The `headers` field of an entry: a JSON object."""
    if not headers:
        return b"{}"
    return json.dumps(dict(headers), ensure_ascii=False, separators=(",", ":")).encode()


def load_headers(raw: bytes | None) -> dict[str, str]:
    """The headers of an entry; `{}` for a field someone wrote by hand that is not a JSON object."""
    if raw is None or raw == b"{}":
        return {}
    try:
        loaded = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(loaded, dict):
        return {}
    headers = cast("dict[object, object]", loaded)
    if all(type(v) is str for v in headers.values()):  # JSON keys are strings already
        return cast("dict[str, str]", headers)
    return {str(k): str(v) for k, v in headers.items()}
