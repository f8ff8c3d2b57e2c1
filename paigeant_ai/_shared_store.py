"""The store a worker's replicas share, so that replay protection and dedupe hold across processes.

On Redis the transport is that store (`SharedStores`). RabbitMQ has none: a worker there keeps its replay cache and
dedupe store in its own memory unless it is given one, a Redis URL (`Worker(shared_store="redis://...")` or
`PAIGEANT_SHARED_STORE_URL`), whose `RedisReplayCache` and `RedisDedupeStore` every replica then uses.
"""

from __future__ import annotations

import logging

from ._replay import InMemoryReplayCache
from .exceptions import UserError
from .security import MessageSecurity, MessageSigner
from .settings import Settings
from .transports.base import SharedStores, Transport

__all__ = ("PER_PROCESS_WARNING", "resolve_shared_store", "say_what_is_protected")

logger = logging.getLogger("paigeant_ai.worker")

PER_PROCESS_WARNING = (
    "replay protection is per process: this worker remembers the hops it ran in its own memory only. Protected: "
    "signatures, the trust policy, users' tokens, and copies of a hop sent again to this process. NOT protected: "
    "a hop replayed to another replica (another worker process on the same queues) runs again there, and a step "
    "redelivered to another replica after a crash is not recognised as done. Fix: point every replica at one "
    "Redis with PAIGEANT_SHARED_STORE_URL=redis://... (or Worker(shared_store=...))"
)


def resolve_shared_store(
    transport: Transport, given: str | SharedStores | None, settings: Settings
) -> tuple[SharedStores | None, Transport | None]:
    """The shared store for a worker on `transport`, and the connection the worker opens for it (None if the
    store is the transport itself, or given already connected).

    Raises:
        UserError: `given` is neither a URL nor an object with shared stores, or the Redis extra is missing.
    """
    if given is None:
        if isinstance(transport, SharedStores):
            return transport, None
        given = settings.shared_store_url
        if not given or transport.process_local:  # nothing outside this process can send it a copy
            return None, None
    if isinstance(given, SharedStores):
        return given, None
    if not given.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(
            f"shared_store must be a Redis URL (redis://host:6379/0) or a RedisTransport, not {given!r}; "
            "set PAIGEANT_SHARED_STORE_URL"
        )
    from .transports.redis import RedisTransport  # the one import of the Redis extra here; it names the pip line

    store = RedisTransport(given, namespace=settings.namespace)
    return store, store


def say_what_is_protected(transport: Transport, security: MessageSecurity) -> None:
    """Log, once at start, when replay protection holds only within this process on a broker others can reach."""
    if transport.process_local or not isinstance(security, MessageSigner) or security.unsigned:
        return
    if isinstance(security.replay_cache, InMemoryReplayCache):
        logger.warning(PER_PROCESS_WARNING)
