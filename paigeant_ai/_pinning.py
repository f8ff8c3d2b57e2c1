"""A step pinned to versions of its activity that this worker does not run is handed back for one that does.

The range is the step's `ActivitySpec.version`, part of the spec the dispatcher signed (its plan's digest covers
it). A worker outside it does not claim the hop, counts no attempt and dead-letters nothing: it gives the delivery
back to the broker, published afresh to be delivered after `PIN_RETRY_DELAY` seconds (so it never counts as a
delivery that failed), and reports the workflow `waiting` ("waiting for <activity> <range>"), once per hop, so that
`paigeant status` says what it waits for. A worker in the range then takes it as usual.
A cancelled workflow is not handed back: the worker that has its step ends it, whatever its version; nor is a copy of
a step that ran already (a lost ack's redelivery, a replay): it is settled as any copy is, and reports no wait; nor is
a hop whose pin its signed plan does not hold: it is refused.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from packaging.specifiers import InvalidSpecifier

from ._escape import escape_control
from ._events import EventReporter
from ._hop import Hop
from ._outcome import Reject
from ._versions import activity_version, fits
from .transports.base import Transport

__all__ = ("PIN_RETRY_DELAY", "Pins")

logger = logging.getLogger("paigeant_ai.worker")

PIN_RETRY_DELAY = 2.0
"""Seconds before a step handed back for another version is delivered again."""


class Pins:
    """Hands back the hops whose step is pinned to versions this worker's activity is not."""

    def __init__(self, transport: Transport, reporter: EventReporter, *, delay: float = PIN_RETRY_DELAY) -> None:
        self.transport = transport
        self.reporter = reporter
        self.delay = delay
        self._reported: OrderedDict[str, None] = OrderedDict()

    def missed(self, hop: Hop) -> str | Reject | None:
        """The range the authenticated `hop`'s step is pinned to, when this worker's activity is outside it; a
        `Reject` when the range is not one (a spec no dispatcher checked); else None."""
        slip = hop.message.routing_slip
        wire = slip.current_activity
        if wire is None or wire.version is None or slip.current != wire.name or slip.unwinding is not None:
            return None  # a fallback or a compensation runs whatever its version
        if hop.expired:
            return None  # past its deadline: it ends `expired` here, and nothing runs
        try:
            inside = fits(activity_version(hop.activity), wire.version)
        except InvalidSpecifier:
            return Reject(f"step {wire.name!r} is pinned to {wire.version!r}, which is not a PEP 440 version range")
        return None if inside else wire.version

    async def hand_back(self, hop: Hop, pin: str) -> None:
        """Give the hop's delivery back for a worker whose version is in `pin`; report the wait once per hop."""
        name, message = hop.spec.name, hop.message
        version = activity_version(hop.activity)
        logger.info(
            "step %s of %s is pinned to %s; this worker runs %s: handed back for a worker that fits",
            name,
            escape_control(message.correlation_id),
            escape_control(pin),
            version,
        )
        if message.message_id not in self._reported:
            self._reported[message.message_id] = None
            if len(self._reported) > 4096:
                self._reported.popitem(last=False)
            await self.reporter.report(
                "waiting", message, activity=name, detail=f"waiting for {name} {pin}", version=pin
            )
        # Published afresh, not `retry_later`: a hop no worker claimed has not been delivered in vain, and a
        # transport that counts deliveries (Redis's `max_deliveries`) would dead-letter a step waiting for long.
        # A crash between the two leaves a second copy, which is settled as a copy once the step has run.
        delivery = hop.delivery
        await self.transport.publish(delivery.address, delivery.body, headers=delivery.headers, delay=self.delay)
        await self.transport.ack(delivery)
