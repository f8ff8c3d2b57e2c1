"""The dispatcher's check against the registry: no workflow starts with a step that no live worker serves.

Every activity a route names counts: its steps, the branches of its parallel groups, their fallbacks and their
compensations. `WorkflowDispatcher(require_live_workers=...)` chooses when the check runs: `None` (the default)
only when the registry shows at least one live worker, so that a workflow dispatched before its workers start (a
burst-mode worker drained afterwards, in tests) still goes out; `True` always; `False` never.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from ._registry import LiveRegistry, read_registry
from .contracts import ActivitySpec
from .exceptions import NoWorker, TransportError
from .security import MessageSecurity
from .transports.base import Transport

__all__ = ("LiveCheck", "named_activities", "unserved_sentence")

logger = logging.getLogger("paigeant_ai.dispatch")


def named_activities(itinerary: Sequence[ActivitySpec]) -> list[str]:
    """Every activity `itinerary` names, in order, once: steps, branches, fallbacks and compensations."""
    names: dict[str, None] = {}
    for group in itinerary:
        for spec in group.branches or (group,):
            names.setdefault(spec.name)
            names.update(dict.fromkeys(spec.fallbacks))
            if spec.compensate is not None:
                names.setdefault(spec.compensate)
    return list(names)


UNREADABLE_FOR = 10.0
"""Seconds after a failed read of the registry during which dispatches skip the check instead of reading again."""


class LiveCheck:
    """A dispatcher's check against the registry, which it reads at most once per `fresh_for` seconds.

    A dispatch does not pay a registry read (a round trip and a signature check per worker) each time: dispatches
    within `fresh_for` of a read, or while one is under way, use its answer, also one that shows no live worker (a
    burst of dispatches made before the workers start pays one read, not one each). A refusal is never made on a
    cached answer: the registry is read again first, so a worker that started a moment ago counts.

    Args:
        transport: The dispatcher's transport.
        security: Verifies the workers' records.
        when: `True` always checks, `None` checks once any worker is live, `False` never checks.
        fresh_for: Seconds a read answers for.
    """

    def __init__(
        self, transport: Transport, security: MessageSecurity, *, when: bool | None, fresh_for: float = 1.0
    ) -> None:
        self.transport = transport
        self.security = security
        self.when = when
        self.fresh_for = fresh_for
        self._read: tuple[float, LiveRegistry | None] | None = None
        self._failed: tuple[float, TransportError] | None = None
        self._lock: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    async def require(self, itinerary: Sequence[ActivitySpec]) -> None:
        """Raise `NoWorker` when the registry shows no live worker for an activity `itinerary` names."""
        if self.when is False:
            return
        names = named_activities(itinerary)
        try:
            registry = await self._registry(fresh=False)
            if self._unserved(registry, names):
                registry = await self._registry(fresh=True)
        except TransportError as exc:
            if self.when:
                raise
            logger.warning("the registry cannot be read (%s); dispatching without checking for live workers", exc)
            return
        unserved = self._unserved(registry, names)
        if unserved and registry is not None:
            raise NoWorker(unserved_sentence(unserved, registry), activity=unserved[0], served=registry.names)

    def _unserved(self, registry: LiveRegistry | None, names: list[str]) -> list[str]:
        if registry is None or (self.when is None and not registry.live):
            return []
        return [name for name in names if not registry.serves(name)]

    async def _registry(self, *, fresh: bool) -> LiveRegistry | None:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock[0] is not loop:  # a lock serves one event loop
            self._lock = (loop, asyncio.Lock())
        async with self._lock[1]:  # dispatches at once wait for one read, then use it
            if not fresh and self._read is not None and time.monotonic() - self._read[0] <= self.fresh_for:
                return self._read[1]
            if self._failed is not None and time.monotonic() - self._failed[0] <= UNREADABLE_FOR:
                raise self._failed[1]  # dispatches right after a failed read do not each wait for another
            try:
                registry = await read_registry(self.transport, self.security)
            except TransportError as exc:
                self._failed = (time.monotonic(), exc)
                raise
            self._read, self._failed = (time.monotonic(), registry), None
            return registry


def unserved_sentence(unserved: Sequence[str], registry: LiveRegistry) -> str:
    """Why a route with `unserved` activities is refused, with what is live."""
    names = ", ".join(repr(name) for name in unserved)
    live = ", ".join(registry.names) or "nothing"
    what = "activity" if len(unserved) == 1 else "activities"
    return f"no live worker serves {what} {names}: start a worker for it, or use only what is live: {live}"
