"""Which workflows are stalled, by the registry: their current step has no live worker.

With a registry the answer comes soon after a worker dies: once every worker serving its activity has been silent for
`STALL_BEATS` of its heartbeats (one to two heartbeats after the last one died), a workflow waiting at it is
stalled, with when a worker serving it was last seen. That is a heartbeat sooner than its record lapses, after which
the dispatcher refuses the step: a lost post may show a workflow stalled for a heartbeat, never refuse a dispatch.
An activity the registry has no record of (its workers never advertised it, or too long ago) is left to the
transport's count of consumers, as without a registry (see `paigeant_ai.store.mark_stalled`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC

from ._registry import LiveRegistry
from .store import WorkflowStatus

__all__ = ("WAITING_STATES", "judged_by_registry")

WAITING_STATES = ("pending", "running", "compensating")


def judged_by_registry(statuses: Sequence[WorkflowStatus], registry: LiveRegistry) -> list[WorkflowStatus | None]:
    """For each of `statuses`: as it stands, or marked `stalled`, when the registry knows its current step; None when
    the registry has no record of the step (the caller asks the transport who consumes it)."""
    judged: list[WorkflowStatus | None] = []
    for status in statuses:
        activity = status.current_activity
        if status.state not in WAITING_STATES or activity is None or registry.heard_from(activity):
            judged.append(status)
            continue
        seen = registry.last_seen(activity)
        if seen is None:
            judged.append(None)
            continue
        reason = f"no worker serves {activity!r} (last seen {seen.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC)"
        judged.append(status.model_copy(update={"state": "stalled", "stalled": reason}))
    return judged
