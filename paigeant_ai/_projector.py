"""`WorkflowProjector`: applies the events published on a transport's `events` address to a `WorkflowStore`,
once their signature is checked (see `paigeant_ai._event_auth`)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING

from pydantic import ValidationError

from ._escape import escape_control
from ._event_auth import authenticate_events
from .contracts import EVENTS
from .exceptions import SecurityError, TransportError
from .security import MessageSecurity, MessageSigner

if TYPE_CHECKING:
    from .store import WorkflowStore
    from .transports.base import Consumer, Delivery, Transport

__all__ = ("WorkflowProjector",)

logger = logging.getLogger("paigeant_ai.store")


class WorkflowProjector:
    """Applies the events published on a transport's `events` address to a store.

    Run one per store, beside the workers (the events of a queue go to one of its consumers). Each batch is
    acknowledged once the store has it. A batch whose signature does not hold (unsigned, an unknown key,
    altered, or a `dispatched` event from a key without `start`) is never applied: it is counted in `refused`,
    logged with the reason, and dropped; so is a body that is not a batch of events.

    Args:
        transport: A connected transport.
        store: Where the events go.
        prefetch: Events in flight at once.
        security: Checks each batch's signature; by default a `MessageSigner` with the trusted keys of the
            `PAIGEANT_*` settings. Unsigned (`PAIGEANT_ALLOW_UNSIGNED=1`), it applies whatever it reads, and says
            so when it starts.

    Attributes:
        applied: How many events it applied.
        refused: How many batches it refused, by reason code (`unsigned`, `unknown_kid`, `bad_signature`,
            `not_allowed`, `malformed`...).
    """

    def __init__(
        self,
        transport: Transport,
        store: WorkflowStore,
        *,
        prefetch: int = 100,
        security: MessageSecurity | None = None,
    ) -> None:
        self.transport = transport
        self.store = store
        self.prefetch = prefetch
        self.security: MessageSecurity = security if security is not None else _verifier(transport)
        self.applied = 0
        self.refused: Counter[str] = Counter()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask `run()` to return."""
        self._stop.set()

    async def run(self, *, burst: bool = False) -> None:
        """Apply events until `stop()` or, with `burst=True`, until none is waiting (or none came for a second:
        events another consumer holds unacknowledged are counted as waiting but cannot be had)."""
        if isinstance(self.security, MessageSigner):
            self.security.ensure_ready(what="events, and so the status of any workflow")
        self._stop.clear()
        idle = 0
        async with await self.transport.consume(EVENTS, prefetch=self.prefetch) as consumer:
            while not self._stop.is_set():
                if burst and (idle >= 5 or await self.transport.pending(EVENTS) == 0):
                    return
                delivery = await self._next(consumer, 0.2 if burst else None)
                if delivery is None:
                    idle += 1
                    continue
                idle = 0
                await self._apply(delivery)

    async def _next(self, consumer: Consumer, wait: float | None) -> Delivery | None:
        """The next event, or `None` after `wait` seconds or on `stop()`."""
        receive = asyncio.ensure_future(anext(consumer))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({receive, stopped}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Also when `run()` is cancelled: a receive left running would take an event after the consumer
            # closed, and nobody would apply it or retrieve its error. A delivery it already got is unacked,
            # so closing the consumer gives it back.
            stopped.cancel()
            if not receive.done():
                receive.cancel()  # it waits for an entry: nothing is taken from the consumer yet
            await asyncio.gather(receive, stopped, return_exceptions=True)
        if receive.cancelled():
            return None
        if isinstance(receive.exception(), StopAsyncIteration):
            self._stop.set()
            return None
        return receive.result()

    async def _apply(self, delivery: Delivery) -> None:
        try:
            events = authenticate_events(self.security, delivery.body, delivery.headers)
        except SecurityError as exc:
            self.refused[exc.code] += 1
            logger.warning("refusing a batch of events, none applied: %s", escape_control(str(exc)))
            events = []
        except ValidationError as exc:
            self.refused["malformed"] += 1
            reason = escape_control(exc.errors(include_url=False)[0]["msg"])
            logger.warning("dropping an event that is not a WorkflowEvent: %s", reason)
            events = []
        try:
            for event in events:  # applying an event twice gives the same status, so a retried batch is safe
                await self.store.apply(event)
        except TransportError:
            logger.warning("could not store an event; it will be delivered again", exc_info=True)
            await asyncio.sleep(0.5)
            await self.transport.retry_later(delivery, 1.0)
            return
        self.applied += len(events)
        await self.transport.ack(delivery)


def _verifier(transport: Transport) -> MessageSigner:
    """The signer of the `PAIGEANT_*` settings, as a verifier: checking events needs the trusted keys only."""
    signer = MessageSigner.from_settings(transport)
    if signer.refusal is not None and len(signer.trusted_keys.keys) > 0:
        return MessageSigner(None, signer.trusted_keys, policy=signer.policy)
    return signer
