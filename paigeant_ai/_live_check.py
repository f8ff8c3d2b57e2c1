"""The dispatcher's check against the registry: no workflow starts with a step that no live worker serves.

Every activity a route names counts: its steps, the branches of its parallel groups, their fallbacks and their
compensations. `WorkflowDispatcher(require_live_workers=...)` chooses when the check runs: `None` (the default)
only when the registry shows at least one live worker, so that a workflow dispatched before its workers start (a
burst-mode worker drained afterwards, in tests) still goes out; `True` always; `False` never.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._registry import LiveRegistry, read_registry
from .contracts import ActivitySpec
from .exceptions import NoWorker
from .security import MessageSecurity
from .transports.base import Transport

__all__ = ("named_activities", "require_live_workers", "unserved_sentence")


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


async def require_live_workers(
    transport: Transport, security: MessageSecurity, itinerary: Sequence[ActivitySpec], *, when: bool | None
) -> None:
    """Raise `NoWorker` when the registry of `transport` shows no live worker for an activity `itinerary` names.

    Args:
        when: `True` always checks, `None` checks once any worker is live, `False` never checks.
    """
    if when is False:
        return
    registry = await read_registry(transport, security)
    if registry is None or (when is None and not registry.live):
        return
    unserved = [name for name in named_activities(itinerary) if not registry.serves(name)]
    if unserved:
        raise NoWorker(unserved_sentence(unserved, registry), activity=unserved[0], served=registry.names)


def unserved_sentence(unserved: Sequence[str], registry: LiveRegistry) -> str:
    """Why a route with `unserved` activities is refused, with what is live."""
    names = ", ".join(repr(name) for name in unserved)
    live = ", ".join(registry.names) or "nothing"
    what = "activity" if len(unserved) == 1 else "activities"
    return f"no live worker serves {what} {names}: start a worker for it, or use only what is live: {live}"
