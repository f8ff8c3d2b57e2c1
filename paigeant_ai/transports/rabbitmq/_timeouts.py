"""RabbitMQ's consumer timeout: how long a consumer may hold a delivery unacked before the broker takes it back.

RabbitMQ closes the channel of a consumer that holds a delivery unacked past its `consumer_timeout` (30 minutes by
default, often less on hosted brokers) and hands everything that channel held to other consumers. A worker hands a
delivery back itself before then (see `paigeant_ai._long_steps`), after `detach_after` seconds, half the timeout.
From RabbitMQ 3.11.15 (and 3.12) a consumer may ask for a timeout of its own (`x-consumer-timeout` in its
`basic.consume` arguments): the worker asks for one longer than twice its longest step, so that no running step
reaches the point where it would be handed back.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = (
    "MIN_DETACH_AFTER",
    "PER_CONSUMER_TIMEOUT_SINCE",
    "broker_version",
    "detach_after",
    "own_consumer_timeout",
    "per_consumer_timeout",
)

PER_CONSUMER_TIMEOUT_SINCE = (3, 11, 15)
"""The first RabbitMQ release that accepts `x-consumer-timeout` as an argument of `basic.consume`."""
MIN_DETACH_AFTER = 3.0
"""Seconds a worker holds a delivery at least, however short the broker's timeout."""
_MARGIN = 60.0


def broker_version(server_properties: Mapping[str, Any]) -> tuple[int, int, int] | None:
    """The version RabbitMQ announces in its connection's server properties; None if it announces none."""
    raw = server_properties.get("version")
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes | bytearray) else raw
    found = re.match(r"\s*(\d+)\.(\d+)\.(\d+)", text) if isinstance(text, str) else None
    if found is None:
        return None
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def per_consumer_timeout(version: tuple[int, int, int] | None) -> bool:
    """Whether a broker of `version` accepts a consumer's own timeout (`x-consumer-timeout`)."""
    return version is not None and version >= PER_CONSUMER_TIMEOUT_SINCE


def own_consumer_timeout(longest_step: float) -> float:
    """Seconds of the timeout a consumer asks for, running steps of up to `longest_step` seconds: twice that and a
    margin, so that half of it, where a worker hands a delivery back, is past every step's end."""
    return 2 * longest_step + _MARGIN


def detach_after(consumer_timeout: float) -> float:
    """Seconds after which a worker hands back a delivery it holds, under a broker timeout of `consumer_timeout`."""
    return max(MIN_DETACH_AFTER, consumer_timeout / 2)
