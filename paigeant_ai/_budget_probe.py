"""The branches of a parallel group under a budget are sent in waves: only those that get a share of what is left.

A wave is the branches the budget pays for (see `paigeant_ai._budget.wave`), all sent with the same log, so that
each of them computes the same wave. When every branch of a wave stored its result, the worker of the last one sends
the next wave, each hop carrying the log of every branch that ran, from which each knows what is left and what a
branch uses. When what is left pays for no branch, only the first that has not run is sent: its share is nothing,
so it parks the workflow `budget_exhausted` before its step runs, the one wait its group may have. A resume with more
budget (`paigeant_ai._budget_resume`) sends it again with the grant, and with it the rest of its wave.

Without a step before the group that used a model, nothing tells what a branch will use, and branches sent at once
could each spend all that is left. The fan-out then sends only the group's first branch, the probe (see
`paigeant_ai._budget.probes_first`): a wave of one. A worker that dies between storing a result and sending the next
wave is delivered the branch again and sends the wave again, with the same message ids (the dedupe drops a copy).
A budget that faults when spent (`on_exhausted="fault"`) has no waves: after the probe, every branch is sent.
"""

from __future__ import annotations

from collections.abc import Collection

from ._budget import probes_first, wave
from ._join import BranchResult
from .contracts import PaigeantMessage

__all__ = ("first_branches", "next_wave", "resumed_wave", "sendable", "wave_done")


def first_branches(message: PaigeantMessage, hops: list[PaigeantMessage]) -> list[PaigeantMessage]:
    """The branch hops the fan-out of `message` sends now: the probe alone, or the first wave."""
    return hops[:1] if probes_first(message) else sendable(hops)


def sendable(hops: list[PaigeantMessage]) -> list[PaigeantMessage]:
    """Of the hops of a group's branches that have not run, all carrying the same log: those of the wave; the first
    alone when the wave is empty (it parks the workflow); all of them when the budget sends no waves."""
    keys = wave(hops[0]) if hops else None
    if keys is None:
        return hops
    return [hop for hop in hops if hop.routing_slip.branch in keys] or hops[:1]


def wave_done(message: PaigeantMessage, stored: Collection[str]) -> bool:
    """Whether every branch of the wave of `message` (a branch's hop) stored its result (`stored`: the keys the
    group's join store holds), so that the next wave is to be sent."""
    if probes_first(message):
        return True  # the probe ran alone
    keys = wave(message)
    return keys is not None and all(key in stored for key in keys)


def next_wave(message: PaigeantMessage, results: list[BranchResult]) -> list[PaigeantMessage]:
    """The hops of the next wave after `results` (verified: those of every branch of the group that ran), unsigned,
    each carrying their log."""
    slip = message.routing_slip
    before = [logged for logged in slip.completed if logged.branch is None]
    ran = [entry for result in results for entry in result.entries]
    done = {result.key for result in results}
    hops: list[PaigeantMessage] = []
    for spec in slip.itinerary[0].branches:
        if spec.branch_key in done:
            continue
        branch = slip.model_copy(
            update={"branch": spec.branch_key, "current": spec.name, "completed": [*before, *ran], "carried_usage": []}
        )
        hops.append(message.model_copy(update={"routing_slip": branch, "resume": None}).next_hop())
    return sendable(hops)


def resumed_wave(parked: PaigeantMessage, message: PaigeantMessage) -> list[PaigeantMessage]:
    """For `message`, the hop that resumes `parked` (parked `budget_exhausted`) with a new grant: if it is a branch
    the budget held back (its wave was empty), the other branches of its wave, unsigned, each with the same log and
    grants. A branch that ran out of its share mid-step is resumed alone: the rest of its wave was sent with it."""
    slip = message.routing_slip
    if slip.branch is None or not slip.itinerary or wave(parked) != []:
        return []
    done = {logged.branch for logged in slip.completed if logged.branch is not None}
    hops = [message]
    for spec in slip.itinerary[0].branches:
        if spec.branch_key in done or spec.branch_key == slip.branch:
            continue
        branch = slip.model_copy(update={"branch": spec.branch_key, "current": spec.name, "carried_usage": []})
        hops.append(message.model_copy(update={"routing_slip": branch}).next_hop())
    return [hop for hop in sendable(hops) if hop is not message]
