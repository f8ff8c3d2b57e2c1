"""Transports move message bytes between addresses; `get_transport` picks one by name.

The seam is `Transport`; what a transport offers beyond it is declared, never guessed from its name:
`process_local` and `requeue_lag` on every transport, and the capabilities `ConsumerWatch` (who consumes),
`SharedClaims` (keys claimed once), `SharedStores` (stores every process shares), `Cancellations` (a
`CancelBoard` of cancel records every process reads) and `ProgressStreams` (a durable progress stream per
workflow). Each backend lives in one module or subpackage: `memory`,
`rabbitmq`, `redis`, `sqlite`.
"""

from __future__ import annotations

from .base import (
    CancelBoard,
    Cancellations,
    Consumer,
    ConsumerWatch,
    Delivery,
    ProgressStreams,
    SharedClaims,
    SharedStores,
    Transport,
)
from .memory import InMemoryTransport

__all__ = (
    "IN_MEMORY_NAMES",
    "CancelBoard",
    "Cancellations",
    "Consumer",
    "ConsumerWatch",
    "Delivery",
    "InMemoryTransport",
    "ProgressStreams",
    "SharedClaims",
    "SharedStores",
    "Transport",
    "get_transport",
)

IN_MEMORY_NAMES = frozenset({"inmemory", "memory", "in-memory"})
"""The names `PAIGEANT_TRANSPORT` accepts for the in-memory transport."""

_EXTRAS = {
    "rabbitmq": ("paigeant_ai.transports.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "redis": ("paigeant_ai.transports.redis", "RedisTransport", "redis"),
    "sqlite": ("paigeant_ai.transports.sqlite", "SQLiteTransport", ""),
}


def get_transport(name: str | None = None, **options: object) -> Transport:
    """A new transport chosen by `name`, else by `PAIGEANT_TRANSPORT` (default `inmemory`).

    Args:
        name: `inmemory`, `rabbitmq`, `redis` or `sqlite`.
        **options: Passed to the transport's constructor (for example `url=`, or `path=` for SQLite).

    Raises:
        UserError: The name is unknown, or the transport's extra is not installed.
    """
    import importlib

    from ..exceptions import UserError
    from ..settings import Settings

    chosen = (name or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        return InMemoryTransport(**options)  # pyright: ignore[reportArgumentType]
    if chosen not in _EXTRAS:
        known = ", ".join(["inmemory", *_EXTRAS])
        raise UserError(f"unknown transport {chosen!r}; set PAIGEANT_TRANSPORT to one of: {known}")
    module_name, class_name, extra = _EXTRAS[chosen]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and (exc.name or "").startswith("paigeant_ai"):
            raise UserError(f"the {chosen} transport is not available in this version of paigeant-ai") from exc
        if not extra:
            raise UserError(f"the {chosen} transport needs a Python built with {exc.name or 'it'}") from exc
        raise UserError(f'the {chosen} transport needs its extra: pip install "paigeant-ai[{extra}]"') from exc
    return getattr(module, class_name)(**options)
