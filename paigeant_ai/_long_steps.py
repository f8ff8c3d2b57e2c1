"""Steps longer than the broker's ack deadline: their delivery is handed back before the broker takes it.

RabbitMQ closes the channel of a consumer that holds a delivery unacked past its consumer timeout and redelivers
everything that channel held; the redelivery would take the running step's claim over (see `paigeant_ai._replay`)
and run it a second time. A transport with such a deadline says so (`AckDeadline`), and a worker on it hands back,
after `detach_after` seconds (half the deadline), every delivery it still holds:

- a step that is running: a *watch copy* of the hop (the same signed bytes, with the `x-paigeant-watch` header: a
  sequence and this worker's signature over the hop's bytes and the sequence, `watch_marker`) is published to the
  step's queue, delayed one lease; once the broker has it, the worker renews the hop's claim every third of a lease
  until the hop is settled, and acks the delivery (its settling acks nothing more); a publish or an ack that fails
  is tried again with a short backoff until shortly before the broker's deadline;
- a delivery still waiting for a free slot, or for a copy of its step running here: published again, at once, then
  acked (the broker's redelivery of a hop whose worker died, and a copy that holds its claim, go back as watch
  copies: they keep their way to take a lapsed claim over); if the broker does not take it, it waits on and runs.

A watch copy is one only if its marker holds (signed by a trusted key for exactly these bytes); any other copy with
the header is a plain copy, refused as a replay if its hop runs or ran. A watch copy is authenticated as any hop,
then claimed as a fresh copy, never as the broker's redelivery: a claim that is running with a live lease (its
worker is alive and renews it) sends the copy on, one lease later, its sequence one more; a hop settled or done is
skipped; a claim that lapsed (its worker died) or was never there is taken over, and the step runs, and is handed
back again if it runs long. So a worker killed during a long step has its step taken over within about two leases.
Each running claim records a random token of its holder (`Hop.holder`): a worker whose claim was taken over renews
it no more, and says so; and the broker's redelivery of a delivery handed back (its ack failed) never takes over a
claim its worker renews.

Claims must be seen by every replica: on RabbitMQ that is the shared store (`PAIGEANT_SHARED_STORE_URL`). Without
one, the worker says so at start. A step shorter than `detach_after` costs a timer that never fires (about 10 µs).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass

from ._escape import escape_control
from ._hop import Hop
from ._outcome import Skip
from ._replay import InMemoryReplayCache
from .activity import DEFAULT_TIMEOUT, Activity
from .contracts import DEAD_LETTER, ActivitySpec
from .exceptions import SecurityError, TransportError
from .security import MessageSecurity, MessageSigner
from .settings import Settings
from .transports.base import AckDeadline, Delivery, Transport, dead_letter_headers

__all__ = (
    "WATCH_HEADER",
    "LongSteps",
    "StillRunning",
    "hand_over",
    "long_steps_warning",
    "watch_marker",
    "watch_sequence",
)

logger = logging.getLogger("paigeant_ai.worker")

WATCH_HEADER = "x-paigeant-watch"
"""The header of a watch copy: the hop, sent again one lease later by the worker that runs it (`watch_marker`)."""
WATCH_TYPE = "paigeant-watch"
"""The `typ` of a watch marker's signature."""
CLAIM_MARGIN = 60.0
"""Seconds a claim outlives its step's timeout, when nothing renews it."""
HAND_BACK_MARGIN = 0.1
"""The part of the broker's deadline left when a worker gives up handing a delivery back."""
HAND_BACK_PAUSE = 0.05
"""Seconds before a failed hand-back is tried again the first time; the pause doubles each time after."""
HAND_BACK_PAUSE_MAX = 2.0
GIVE_BACK_PAUSE = 0.5
"""Seconds a delivery that could not be settled waits before it is given back, doubled for each delivery of it
before, up to `GIVE_BACK_PAUSE_MAX`: its redelivery runs the step again, so a broker that keeps refusing the
successor must not have the step run in a tight loop (and dead-lettered as poison within a moment). Each
hand-back counts as a delivery, so ten of them (the brokers' default `max_deliveries`) take about three minutes:
an outage of a store the hop needs (a shared store's Redis) that short dead-letters nothing."""
GIVE_BACK_PAUSE_MAX = 60.0


def watch_marker(security: MessageSecurity, body: bytes, sequence: int = 0) -> str:
    """The value of the watch header of a copy of the hop `body`: its `sequence` (0 for the first watch copy, one
    more each time it is sent on) and this worker's signature over the hop's bytes, the word and the sequence."""
    return f"{sequence} {security.sign_bytes(_watched(body, sequence), typ=WATCH_TYPE) or ''}"


def watch_sequence(security: MessageSecurity, delivery: Delivery) -> int | None:
    """The sequence of the watch copy `delivery`, if its watch marker holds (signed by a trusted key, for exactly
    these bytes); None if it has none, or one that does not hold: then it is a plain copy, claimed as such."""
    marker = delivery.headers.get(WATCH_HEADER)
    if marker is None:
        return None
    sequence, _, signature = marker.partition(" ")
    if not sequence.isdigit() or len(sequence) > 9:
        return None
    try:
        security.verify_bytes(signature, _watched(delivery.body, int(sequence)), typ=WATCH_TYPE)
    except SecurityError:
        return None
    return int(sequence)


def _watched(body: bytes, sequence: int) -> bytes:
    return f"watch {sequence} {hashlib.sha256(body).hexdigest()}".encode()


def step_timeout(spec: ActivitySpec) -> float:
    return spec.timeout or DEFAULT_TIMEOUT


@dataclass(frozen=True, slots=True)
class StillRunning(Skip):
    """A watch copy of a hop whose claim is live: its worker runs it. The copy is sent on, one lease later."""


def long_steps_warning(steps: list[str], detach_after: float) -> str:
    """What a worker without a shared store says at start about its steps longer than `detach_after`."""
    return (
        f"steps {', '.join(steps)} may run longer than {detach_after:g}s, half the broker's consumer timeout "
        "(PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT): their deliveries are handed back to the broker while they run, "
        "watched by copies of the hop that any worker may receive, and this worker keeps its claims in its own "
        "memory only; so another replica cannot see that such a step is running, and runs it again one lease "
        "later. Fix: point every replica at one Redis with PAIGEANT_SHARED_STORE_URL=redis://... "
        "(or Worker(shared_store=...))"
    )


class LongSteps:
    """Hands back the deliveries a worker holds past its transport's ack deadline (see the module's docstring)."""

    def __init__(self, transport: Transport, security: MessageSecurity) -> None:
        self.transport = transport
        self.security = security
        self.detach_after: float | None = None
        """Seconds after which a delivery still held is handed back; None: never (no deadline, or not started)."""
        self.lease = transport.lease if isinstance(transport, AckDeadline) else Settings.from_env().step_lease
        self._renewals: dict[int, asyncio.Task[None]] = {}
        self._detached: dict[int, Hop] = {}  # by id of the delivery, until its handling ends (see `dead_letter`)
        self._holding: dict[str, Hop] = {}  # by message id, while handed back and running (see `holds`)

    def start(self, activities: Mapping[str, Activity]) -> None:
        """Learn from the transport when to hand deliveries back (before consuming), and warn where it is unsafe."""
        self.detach_after = None
        if not isinstance(self.transport, AckDeadline) or not activities:
            return
        after = self.transport.detach_after(max(step_timeout(act.spec) for act in activities.values()))
        if after is None:
            return
        security = self.security
        longer = sorted(name for name, act in activities.items() if step_timeout(act.spec) > after)
        if isinstance(security, MessageSigner) and security.unsigned:
            if longer:
                logger.warning(
                    "this worker runs unsigned, without claims: steps %s still running after %gs are not handed "
                    "back: once its consumer timeout passes, the broker closes the channel and delivers again "
                    "everything it held, these steps and every other delivery on it, short steps too",
                    ", ".join(longer),
                    after,
                )
            return
        self.detach_after = after
        if longer and isinstance(security, MessageSigner) and isinstance(security.replay_cache, InMemoryReplayCache):
            logger.warning(long_steps_warning(longer, after))

    def is_watch_copy(self, delivery: Delivery) -> bool:
        """Whether `delivery` is a genuine watch copy: its watch marker holds (see `watch_sequence`)."""
        return watch_sequence(self.security, delivery) is not None

    def redelivered(self, delivery: Delivery) -> bool:
        """Whether `delivery` is the broker's redelivery of a hop, which may take a running claim over; a genuine
        watch copy never is, whatever the broker says of it: it is claimed like a fresh copy."""
        return delivery.redelivered and not self.is_watch_copy(delivery)

    def claim_lease(self, spec: ActivitySpec) -> float:
        """Seconds a hop's claim stays running unless renewed: its step's timeout and a margin, or, when it may be
        handed back, until then and a lease (after that, it is renewed)."""
        lease = step_timeout(spec) + CLAIM_MARGIN
        return lease if self.detach_after is None else min(lease, self.detach_after + self.lease)

    def _due_in(self, delivery: Delivery) -> float:
        assert self.detach_after is not None
        return self.detach_after - (time.monotonic() - delivery.received_at)

    # -- a delivery waiting for a slot -----------------------------------------------------------------------

    async def wait_for_slot(self, slots: asyncio.Semaphore, delivery: Delivery) -> bool:
        """Take a slot for `delivery`; False if it waited until it was due and was handed back instead."""
        # The broker's redelivery (its worker died) goes back as a watch copy: as a fresh copy it would be refused
        # while the dead worker's claim is live; as a watch copy it waits that out.
        return await self._wait(slots.acquire, delivery, watch=self.redelivered(delivery))

    async def wait_turn(self, turn: Callable[[], Awaitable[None]], delivery: Delivery) -> bool:
        """Wait for `turn()` (another copy of the same step, running here, to end) for an authorized `delivery`;
        False if it waited until it was due and was handed back instead, as a watch copy: it may hold its claim,
        which lapses unrenewed, so that its watch copy then takes it over (or finds the step done)."""
        return await self._wait(turn, delivery, watch=True)

    async def _wait(self, wait: Callable[[], Awaitable[object]], delivery: Delivery, *, watch: bool) -> bool:
        if self.detach_after is None:
            await wait()
            return True
        try:
            async with asyncio.timeout(max(0.0, self._due_in(delivery))):
                await wait()
            return True
        except TimeoutError:
            pass
        # Published again first, then acked; a copy the broker did not confirm waits on here, and runs.
        headers = (
            {**delivery.headers, WATCH_HEADER: watch_marker(self.security, delivery.body)}
            if watch
            else delivery.headers
        )
        try:
            await self.transport.publish(delivery.address, delivery.body, headers=headers)
        except TransportError:
            logger.warning(
                "could not hand back a delivery waiting on %s; it waits here", delivery.address, exc_info=True
            )
            await wait()
            return True
        try:
            await self.transport.ack(delivery)
        except TransportError:
            logger.warning(
                "could not ack a delivery on %s once handed back; the broker delivers it again, and its copy then "
                "finds it running or settled",
                delivery.address,
                exc_info=True,
            )
        return False

    # -- a running step --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def watch(self, hop: Hop) -> AsyncGenerator[None]:
        """While the step of `hop` runs: hand its delivery back when it is due (see `detach`)."""
        if self.detach_after is None:
            yield
            return
        detaching: list[asyncio.Task[None]] = []

        def when_due() -> None:  # a task of its own: not interrupted once begun
            detaching.append(asyncio.create_task(self.detach(hop), name=f"paigeant-detach-{hop.spec.name}"))

        timer = asyncio.get_running_loop().call_later(max(0.0, self._due_in(hop.delivery)), when_due)
        try:
            yield
        finally:
            timer.cancel()
            for failed in await asyncio.gather(*detaching, return_exceptions=True):
                if isinstance(failed, BaseException) and not isinstance(failed, asyncio.CancelledError):
                    logger.error("handing back step %s failed", hop.spec.name, exc_info=failed)

    async def detach(self, hop: Hop) -> None:
        """Publish the watch copy of `hop` (delayed one lease), then ack its delivery, each tried again with a short
        backoff until shortly before the broker's deadline; from the moment the broker has the copy, the hop counts
        as handed back and its claim is renewed until it is settled, whatever the ack does."""
        delivery = hop.delivery
        give_up_at = delivery.received_at + self._deadline() - HAND_BACK_MARGIN * self._deadline()
        pause = HAND_BACK_PAUSE
        while True:
            try:
                if not hop.detached:
                    await self.transport.publish(
                        delivery.address, delivery.body, headers=self._watch(hop), delay=self.lease
                    )
                    self._hold(hop)
                await self.transport.ack(delivery)
                return
            except TransportError:
                what = "ack the delivery" if hop.detached else "publish the watch copy"
                if time.monotonic() + pause >= give_up_at:
                    logger.error(
                        "could not %s of step %s before the broker's deadline; the broker may take it back and "
                        "deliver it again",
                        what,
                        hop.spec.name,
                        exc_info=True,
                    )
                    return
                logger.warning("could not %s of step %s; trying again", what, hop.spec.name, exc_info=True)
            await asyncio.sleep(pause)
            pause = min(2 * pause, HAND_BACK_PAUSE_MAX)

    def _deadline(self) -> float:
        assert self.detach_after is not None
        return 2 * self.detach_after  # handed back at half the broker's deadline

    def _watch(self, hop: Hop) -> dict[str, str]:
        return {**hop.delivery.headers, WATCH_HEADER: watch_marker(self.security, hop.delivery.body)}

    def _hold(self, hop: Hop) -> None:
        """The broker has the watch copy of `hop`: it is handed back; renew its claim until it is settled."""
        hop.detached = True
        self._detached[id(hop.delivery)] = hop
        self._holding[hop.message.message_id] = hop
        self._renewals[id(hop)] = asyncio.create_task(self._renew(hop), name=f"paigeant-renew-{hop.spec.name}")

    def holds(self, message_id: str) -> bool:
        """Whether this worker runs the hop `message_id` with its delivery handed back: the broker's redelivery of
        that delivery (its ack failed) is then left over, and must not take the running claim over."""
        return message_id in self._holding

    async def _renew(self, hop: Hop) -> None:
        while True:
            try:
                found = await self.security.renew(hop.message, hop.digest, self.lease, hop.holder)
            except Exception:
                logger.warning("could not renew the claim of step %s; trying again", hop.spec.name, exc_info=True)
            else:
                if found == "taken":
                    logger.error(
                        "the claim of step %s of %s was taken over by another copy of its hop (this worker could "
                        "not renew it in time): the step now runs there too; this worker renews it no more",
                        hop.spec.name,
                        escape_control(hop.message.correlation_id),
                    )
                if found != "renewed":
                    return  # settled (or forgotten): nothing left to hold; or another's
            await asyncio.sleep(self.lease / 3)

    def forget(self, hop: Hop) -> None:
        """Stop renewing the claim of `hop`, done with (settled, or left to its watch copy)."""
        if self._holding.get(hop.message.message_id) is hop:
            del self._holding[hop.message.message_id]
        renewal = self._renewals.pop(id(hop), None)
        if renewal is not None:
            renewal.cancel()

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move `delivery`, on which the worker itself failed, to the dead-letter queue. One handed back while its
        step ran was acked then: its copy is published, and its hop recorded as settled, so that its watch copy
        does not run the step again."""
        hop = self._detached.get(id(delivery))
        if hop is None:
            await self.transport.dead_letter(delivery, reason)
            return
        await self.transport.publish(DEAD_LETTER, delivery.body, headers=dead_letter_headers(delivery, reason))
        await self.security.settled(hop.message, hop.digest)

    def after(self, delivery: Delivery) -> str:
        """What becomes of `delivery`, which could not be settled."""
        if id(delivery) in self._detached:
            return "it was handed back while its step ran: its watch copy runs the step again once its claim lapses"
        return "it is handed back, to be delivered again"

    async def give_back(self, delivery: Delivery, stopping: asyncio.Event) -> None:
        """Hand `delivery`, which could not be settled, back to the broker now, unless it was handed back already.

        A refused publish leaves the connection up: without this the broker would keep the delivery with this
        worker until its consumer closed (on RabbitMQ, until its consumer timeout), and the workflow would stall.
        It waits a pause first (`GIVE_BACK_PAUSE`), longer each time the same delivery comes back, cut short when the
        worker is `stopping`.
        """
        if id(delivery) in self._detached:
            return
        pause = min(GIVE_BACK_PAUSE_MAX, GIVE_BACK_PAUSE * 2 ** (delivery.delivery_count - 1))
        logger.warning("a delivery on %s could not be settled: handing it back in %gs", delivery.address, pause)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await stopping.wait()
        try:
            await self.transport.give_back(delivery)
        except TransportError as exc:  # the connection is gone: the broker takes its deliveries back by itself
            logger.warning("could not hand a delivery from %s back: %s", delivery.address, exc)

    def handled(self, delivery: Delivery) -> None:
        """Forget `delivery`, whose handling is over."""
        self._detached.pop(id(delivery), None)

    async def rearm(self, hop: Hop) -> None:
        """Send the watch copy `hop` on, one lease later: its step still runs under a live claim."""
        delivery = hop.delivery
        sequence = (watch_sequence(self.security, delivery) or 0) + 1
        headers = {**delivery.headers, WATCH_HEADER: watch_marker(self.security, delivery.body, sequence)}
        await self.transport.publish(delivery.address, delivery.body, headers=headers, delay=self.lease)
        await self.transport.ack(delivery)


async def hand_over(transport: Transport, hop: Hop, as_arrived: str | None) -> None:
    """Settle the delivery of `hop`: ack it, or, with the reason `as_arrived`, move it to the dead-letter queue as it
    arrived. A hop handed back while it ran was acked then: only its dead-lettered copy is still to send."""
    if not hop.detached:
        if as_arrived is None:
            await transport.ack(hop.delivery)
        else:
            await transport.dead_letter(hop.delivery, as_arrived)
    elif as_arrived is not None:
        await transport.publish(DEAD_LETTER, hop.delivery.body, headers=dead_letter_headers(hop.delivery, as_arrived))
