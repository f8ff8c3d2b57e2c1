"""A parallel group under a token budget with no estimate of what a branch uses: its first branch runs alone.

Without a step before the group that used a model, nothing tells what a branch will use, and branches sent at once
could each spend all that is left. The fan-out then sends only the group's first branch, the probe (see
`paigeant_ai._budget.probes_first`); once the probe completed and stored its result, its worker sends the other
branches, each carrying the probe's log entry, so that each knows what is left and what a branch uses before it
starts, and only as many as that pays for get a share. A probe whose worker dies between storing its result and
sending the others is delivered again and sends them again, with the same message ids (the dedupe drops a copy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._budget import probes_first
from ._sealing import seal
from .contracts import ActivityLogEntry, PaigeantMessage

if TYPE_CHECKING:
    from ._settle import SettleDeps

__all__ = ("first_branches", "send_after_probe")


def first_branches(message: PaigeantMessage, hops: list[PaigeantMessage]) -> list[PaigeantMessage]:
    """The branch hops the fan-out of `message` sends now: the probe alone, or all of them."""
    return hops[:1] if probes_first(message) else hops


async def send_after_probe(message: PaigeantMessage, entries: list[ActivityLogEntry], deps: SettleDeps) -> None:
    """If `message` is the probe's hop and `entries` its log as stored: send the group's other branches."""
    if not probes_first(message):
        return
    slip = message.routing_slip
    before = [logged for logged in slip.completed if logged.branch is None]
    for spec in slip.itinerary[0].branches[1:]:
        branch = slip.model_copy(
            update={
                "branch": spec.branch_key,
                "current": spec.name,
                "completed": [*before, *entries],
                "carried_usage": [],
            }
        )
        hop = message.model_copy(update={"routing_slip": branch, "resume": None}).next_hop()
        body = seal(hop, deps.security, max_bytes=deps.max_message_bytes)
        await deps.transport.publish(spec.name, body, headers=dict(hop.headers))
