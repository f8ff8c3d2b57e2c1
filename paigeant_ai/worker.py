"""`Worker`: runs activities, one hop at a time.

Each hop: decode and validate -> check the route -> skip if already done -> run the activity with a timeout ->
merge its output -> advance the slip -> publish the next hop -> remember the step -> ack. Nothing is acked before
its successor is safely with the broker, so a crash at any point loses nothing; a redelivered step that already
completed is recognised by its idempotency key and not run twice by the same worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol

from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.exceptions import UserError as PydanticAIUserError
from pydantic_core import to_json

from . import observability
from ._sealing import NonFiniteNumber, check_finite_json, encode_output, seal, too_large, unsigned_body
from .activity import DEFAULT_TIMEOUT, Activity, ActivityContext, ActivityFunc, as_activity, to_payload_update
from .approval import ParkedStep, ParkWorkflow, WaitingStore
from .contracts import DEAD_LETTER, EVENTS, ActivityLogEntry, ActivitySpec, PaigeantMessage, RetryPolicy, WorkflowEvent
from .exceptions import (
    EndWorkflow,
    InvalidMessage,
    MessageTooLarge,
    NonRetryableError,
    ReplayedMessage,
    RetryActivity,
    SecurityError,
    TokenError,
    TransportError,
    UserError,
)
from .security import MessageSigner
from .settings import Settings
from .transports.base import REASON_HEADER, SOURCE_HEADER, Consumer, Delivery, SharedStores, Transport

__all__ = ("DedupeStore", "InMemoryDedupeStore", "MessageSecurity", "Worker", "WorkerStats")

logger = logging.getLogger("paigeant_ai.worker")

_NON_RETRYABLE: tuple[type[BaseException], ...] = (NonRetryableError, PydanticAIUserError, UsageLimitExceeded)

EventCallback = Callable[[WorkflowEvent], Awaitable[None] | None]


class DedupeStore(Protocol):
    """Remembers which steps completed, so a redelivered step is not run again."""

    async def is_done(self, key: str) -> bool: ...

    async def mark_done(self, key: str) -> None: ...


class MessageSecurity(Protocol):
    """Signs what a worker or dispatcher sends and verifies what a worker receives."""

    def signature_for(self, body: bytes) -> str | None:
        """The detached JWS over `body`, a message encoded with no signature; None to send it unsigned."""
        ...

    async def verify(self, message: PaigeantMessage, spec: ActivitySpec, body: bytes) -> Mapping[str, Any] | None:
        """Check the signature of `body` (the bytes `message` was read from), replay and the user's token against
        `spec.required_scopes`.

        Returns:
            The validated claims of the user's on-behalf-of token, if there is one.

        Raises:
            SecurityError: With the precise reason; the message is dead-lettered and never run.
            ReplayedMessage: The hop was already settled: dead-lettered as a replay, or skipped as a duplicate.
            TokenError: The user's token fails a check: the workflow faults, never retried.
        """
        ...

    async def settled(self, message: PaigeantMessage) -> None:
        """Called once the hop `message` is settled (acked after its successor, retry or fault was published)."""
        ...


class InMemoryDedupeStore:
    """The steps this process completed, the most recent `max_keys` of them."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self.max_keys = max_keys
        self._keys: OrderedDict[str, None] = OrderedDict()

    async def is_done(self, key: str) -> bool:
        return key in self._keys

    async def mark_done(self, key: str) -> None:
        self._keys[key] = None
        if len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)


@dataclass(slots=True)
class WorkerStats:
    """Counters of what a worker did since it started."""

    completed_steps: int = 0
    completed_workflows: int = 0
    retried: int = 0
    faulted: int = 0
    rejected: int = 0
    duplicates: int = 0
    parked: int = 0


class _Settled(Exception):
    """The delivery was settled (dead-lettered) while the hop was prepared."""


class Worker:
    """Consumes the queues of its activities and runs each step it receives.

    Args:
        transport: The transport to consume from and publish to.
        activities: The activities this worker runs: `Activity` objects (`AgentActivity`, `@activity`
            functions) or plain functions. Each is consumed from the queue of its name.
        concurrency: How many steps run at once (also the prefetch of each queue).
        max_message_bytes: Larger messages are dead-lettered; defaults to `PAIGEANT_MAX_MESSAGE_BYTES`.
        dedupe: Where completed steps are remembered; by default the transport's shared store if it offers
            `SharedStores` (on Redis a `RedisDedupeStore`, shared by every worker), else this process's memory.
        security: Verifies every message received and signs every message sent; by default a `MessageSigner`
            with the keys of the `PAIGEANT_*` settings (see `paigeant_ai.security`).
        allow_unsigned: With no keys configured, run without signatures instead of refusing to start on a real
            broker (`PAIGEANT_ALLOW_UNSIGNED=1`). Anyone who can publish to the broker can then forge steps.
        on_event: Called (sync or async) with every `WorkflowEvent` this worker produces.
        publish_events: Also publish every event on the transport's `events` address (capped by each
            transport), where a `WorkflowProjector` in any process can feed them to a `WorkflowStore`.
        shutdown_timeout: On stop, seconds in-flight steps get to finish before they are cancelled and
            left unacked for redelivery.
        rng: Source of retry jitter (seed it for reproducible tests).
        waiting_store: Where steps that wait for input (an agent's tool that needs approval) are parked until
            `WorkflowDispatcher.resume`; share it with the dispatcher. Without one, such a step faults.
    """

    def __init__(
        self,
        transport: Transport,
        activities: Sequence[Activity | ActivityFunc],
        *,
        concurrency: int | None = None,
        max_message_bytes: int | None = None,
        dedupe: DedupeStore | None = None,
        security: MessageSecurity | None = None,
        allow_unsigned: bool | None = None,
        on_event: EventCallback | Sequence[EventCallback] | None = None,
        publish_events: bool = True,
        shutdown_timeout: float = 30.0,
        rng: random.Random | None = None,
        waiting_store: WaitingStore | None = None,
    ) -> None:
        if not activities:
            raise UserError("a Worker needs at least one activity")
        settings = Settings.from_env()
        self.transport = transport
        self.activities: dict[str, Activity] = {}
        for item in activities:
            act = as_activity(item)
            if act.spec.name in self.activities:
                raise UserError(f"two activities are named {act.spec.name!r}; activity names must be unique")
            self.activities[act.spec.name] = act
        self.concurrency = settings.concurrency if concurrency is None else concurrency
        if self.concurrency < 1:
            raise UserError("concurrency must be at least 1")
        self.max_message_bytes = settings.max_message_bytes if max_message_bytes is None else max_message_bytes
        if self.max_message_bytes < 1:
            raise UserError("max_message_bytes must be positive")
        self.dedupe = dedupe or _default_dedupe(transport)
        self.security: MessageSecurity = (
            security if security is not None else MessageSigner.from_settings(transport, allow_unsigned=allow_unsigned)
        )
        if on_event is None:
            self._callbacks: list[EventCallback] = []
        elif callable(on_event):
            self._callbacks = [on_event]
        else:
            self._callbacks = list(on_event)
        self.publish_events = publish_events
        self._events = _EventBatcher(transport)
        self.shutdown_timeout = shutdown_timeout
        self.rng = rng or random.Random()
        self.waiting_store = waiting_store
        self.stats = WorkerStats()
        self._slots = asyncio.Semaphore(self.concurrency)  # made anew by run(), after `concurrency` may change
        self._inflight: set[asyncio.Task[None]] = set()
        self._running_keys: dict[str, asyncio.Event] = {}
        self._consumers: list[Consumer] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._running = False
        self._background: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def run(self, *, burst: bool = False) -> None:
        """Consume and run steps until `stop()` is called (or, with `burst=True`, until all queues are drained).

        Raises:
            UserError: The worker is already running, or has no keys to sign and verify with (see `security`).
        """
        if self._running:
            raise UserError("this worker is already running")
        if isinstance(self.security, MessageSigner):
            self.security.ensure_ready()
        self._running = True
        self._slots = asyncio.Semaphore(self.concurrency)
        try:
            for name in self.activities:
                consumer = await self.transport.consume(name, prefetch=self.concurrency)
                self._consumers.append(consumer)
                self._pumps.append(asyncio.create_task(self._pump(consumer), name=f"paigeant-consume-{name}"))
            if burst:
                await self._wait_until_drained()
            else:
                await self._wait_until_stopped()
        finally:
            await self._shutdown()
            self._running = False
            self._stop = asyncio.Event()  # ready to run again; a stop() before run() still stops that run

    def stop(self) -> None:
        """Ask the worker to stop: no new steps start; running ones get `shutdown_timeout` to finish."""
        self._stop.set()

    async def __aenter__(self) -> Worker:
        self._background = asyncio.create_task(self.run(), name="paigeant-worker")
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._background is not None:
            await self._background
            self._background = None

    async def _wait_until_stopped(self) -> None:
        stopped = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait([stopped, *self._pumps], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        self._raise_if_a_consumer_failed()

    async def _wait_until_drained(self) -> None:
        # A broker may move a delayed retry back into its queue on its own time (RabbitMQ dead-letters it from a
        # delay queue), and for that moment no count shows it; so the queues must look drained for that long.
        quiet_for = self.transport.requeue_lag
        quiet_since: float | None = None
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self._raise_if_a_consumer_failed()
            if not self._inflight and await self._all_queues_empty():
                quiet_since = quiet_since if quiet_since is not None else loop.time()
                if loop.time() - quiet_since >= quiet_for:
                    return
            else:
                quiet_since = None
            await asyncio.sleep(0.02)

    async def _all_queues_empty(self) -> bool:
        for name in self.activities:  # stop at the first queue with work: each count may be a broker round trip
            if await self.transport.pending(name):
                return False
        return True

    def _raise_if_a_consumer_failed(self) -> None:
        # A transport reconnects by itself; a consumer that still ends has lost its broker for good, and a
        # worker that silently stopped consuming would look alive while doing nothing.
        if self._stop.is_set():
            return
        for pump in self._pumps:
            if pump.done() and not pump.cancelled():
                error = pump.exception()
                raise TransportError(f"consuming {pump.get_name()} stopped: {error or 'the consumer ended'}") from error

    async def _shutdown(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps.clear()
        if self._inflight:
            _, unfinished = await asyncio.wait(set(self._inflight), timeout=self.shutdown_timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        await self._events.flush()
        for consumer in self._consumers:
            try:
                await consumer.aclose()
            except TransportError:
                logger.warning("closing a consumer failed; its deliveries return to the broker", exc_info=True)
        self._consumers.clear()

    async def _pump(self, consumer: Consumer) -> None:
        async for delivery in consumer:
            await self._slots.acquire()
            if self._stop.is_set():
                self._slots.release()
                return
            task = asyncio.create_task(self._handle(delivery))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    # -- one hop ---------------------------------------------------------------------------------------------

    async def _handle(self, delivery: Delivery) -> None:
        try:
            await self.process(delivery)
        except asyncio.CancelledError:
            logger.info("step on %s cancelled by shutdown; it will be delivered again", delivery.address)
            raise
        except TransportError:
            # The broker failed while the hop was settled: it hands the unacked delivery out again.
            logger.exception("could not settle a delivery on %s; it will be delivered again", delivery.address)
        except Exception as exc:
            # A failure of the worker itself (a store, a callback, a bug): keep the message, with the reason, where
            # an operator can replay it once the cause is fixed, rather than hold it unsettled forever.
            logger.exception("the worker failed on a delivery from %s; dead-lettering it", delivery.address)
            with contextlib.suppress(Exception):
                await self.transport.dead_letter(delivery, f"the worker failed on this message: {_describe(exc)}")
        finally:
            self._slots.release()

    async def process(self, delivery: Delivery) -> None:
        """Process one delivery end to end and settle it (ack, publish onwards, or dead-letter)."""
        with observability.hop_span(delivery, self.transport.name):
            await self._process_delivery(delivery)

    async def _process_delivery(self, delivery: Delivery) -> None:
        try:
            message = await self._decode(delivery)
            key = message.idempotency_key
            while (running := self._running_keys.get(key)) is not None:
                await running.wait()  # a second copy of a step in flight here waits for the first, then dedupes
            self._running_keys[key] = done = asyncio.Event()
            try:
                await self._process(delivery, message)
            finally:
                del self._running_keys[key]
                done.set()
        except _Settled:
            pass

    async def _process(self, delivery: Delivery, message: PaigeantMessage) -> None:
        spec = message.routing_slip.current_activity
        activity = self.activities.get(spec.name) if spec is not None else None
        if spec is None or activity is None:
            await self._reject(delivery, message, "the workflow has no step left to run")
            return
        effective = _effective_spec(activity.spec, spec)
        claims = await self._verify(delivery, message, effective)
        observability.continue_trace(message)  # signed as it is: its trace context is trusted from here on
        if await self.dedupe.is_done(message.idempotency_key):
            await self._skip(delivery, message, "already completed (redelivery)")
            return
        ctx = ActivityContext(message=message, spec=effective, obo_claims=claims)
        started = datetime.now(UTC)
        await self._emit("step_started", message)
        try:
            with observability.activity_span(ctx):
                async with asyncio.timeout(effective.timeout or DEFAULT_TIMEOUT):
                    update = await activity.run(ctx)
            if update is not None and not isinstance(update, dict):
                update = to_payload_update(update, effective.name, effective.name)
        except EndWorkflow as exc:
            await self._end(delivery, message, started, exc)
            return
        except ParkWorkflow as signal:
            await self._park(delivery, message, ctx, started, signal)
            return
        except _NON_RETRYABLE as exc:
            await self._fault(delivery, message, started, _describe(exc))
            return
        except RetryActivity as exc:
            await self._retry_or_fault(delivery, message, effective.retry, started, _describe(exc), exc.delay)
            return
        except TimeoutError as exc:
            reason = f"timed out after {effective.timeout or DEFAULT_TIMEOUT:g}s" if not str(exc) else _describe(exc)
            await self._retry_or_fault(delivery, message, effective.retry, started, reason, None)
            return
        except Exception as exc:
            logger.warning("step %s of %s failed: %s", spec.name, message.correlation_id, _describe(exc))
            await self._retry_or_fault(delivery, message, effective.retry, started, _describe(exc), None)
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker is stopping: leave the delivery unacked for another worker
            # The activity raised it on its own (a cancelled inner call): a failure like any other.
            await self._retry_or_fault(delivery, message, effective.retry, started, "cancelled from inside", None)
            return
        update = update or {}
        encoded = encode_output(update)
        try:
            check_finite_json(encoded, update, "its output")
        except NonFiniteNumber as exc:
            await self._fault(delivery, message, started, str(exc))
            return
        projected = len(delivery.body) + len(encoded) + _LOG_ENTRY_BYTES
        if projected > self.max_message_bytes:  # fault now, while the slip still shows this step as current
            reason = (
                f"its output would make the next message about {projected} bytes, over the limit of "
                f"{self.max_message_bytes}; store large outputs elsewhere and put a reference in the payload"
            )
            await self._fault(delivery, message, started, reason)
            return
        await self._apply_revisions(message, ctx)
        message.resume = None  # the step is done; the next one starts afresh
        try:
            await self._advance(delivery, message, update, started)
        except (MessageTooLarge, NonFiniteNumber) as exc:  # the exact checks of the seal: nothing was sent
            await self._fault(delivery, message, started, str(exc), name=spec.name)

    async def _decode(self, delivery: Delivery) -> PaigeantMessage:
        if len(delivery.body) > self.max_message_bytes:
            await self._reject(
                delivery,
                None,
                f"message too large: {len(delivery.body)} bytes, the limit is {self.max_message_bytes}",
            )
        try:
            message = PaigeantMessage.from_json(delivery.body)
        except InvalidMessage as exc:
            await self._reject(delivery, None, str(exc))
        current = message.routing_slip.current
        if current != delivery.address:
            await self._reject(
                delivery,
                message,
                f"misrouted: the message is for step {current!r} but arrived on {delivery.address!r}",
            )
        if current not in self.activities:
            known = ", ".join(sorted(self.activities))
            await self._reject(delivery, message, f"unknown activity {current!r}; this worker runs: {known}")
        if message.expires_at is not None and message.expires_at < datetime.now(UTC):
            await self._reject(delivery, message, f"expired at {message.expires_at.isoformat()}")
        return message

    async def _reject(self, delivery: Delivery, message: PaigeantMessage | None, reason: str) -> NoReturn:
        self.stats.rejected += 1
        logger.warning("dead-lettering a message from %s: %s", delivery.address, reason)
        await self.transport.dead_letter(delivery, reason)
        # Nothing in a refused message is trusted: its event names no workflow, so it cannot change one's status.
        await self._emit("rejected", None, detail=reason, activity=delivery.address)
        raise _Settled

    async def _verify(
        self, delivery: Delivery, message: PaigeantMessage, spec: ActivitySpec
    ) -> Mapping[str, Any] | None:
        """The token's claims once the message passed every check; a refusal settles the delivery."""
        try:
            return await self.security.verify(message, spec, delivery.body)
        except ReplayedMessage as exc:
            observability.continue_trace(message)  # the signature held: only the hop is old
            if exc.same_content and not delivery.redelivered:
                await self._reject(delivery, message, f"security check failed: {exc}")
            # Not an attack: the broker's own redelivery of a hop settled here (its ack was lost), or the hop
            # produced again, and signed, by an upstream step that re-ran after a crash. It ran once; skip it.
            await self._skip(delivery, message, "already settled (duplicate)")
        except TokenError as exc:
            observability.continue_trace(message)  # the signature held: only the token is refused
            if await self.dedupe.is_done(message.idempotency_key):  # it ran while the token was still valid
                await self._skip(delivery, message, "already completed (redelivery)")
            else:
                await self._fault(delivery, message, datetime.now(UTC), str(exc))
        except SecurityError as exc:
            await self._reject(delivery, message, f"security check failed: {exc}")
        raise _Settled

    async def _skip(self, delivery: Delivery, message: PaigeantMessage, reason: str) -> None:
        self.stats.duplicates += 1
        logger.info("step %s of %s %s; skipping it", delivery.address, message.correlation_id, reason)
        await self._settle(delivery, message)
        await self._emit("step_skipped", message, detail=reason)

    async def _settle(self, delivery: Delivery, message: PaigeantMessage) -> None:
        """Ack the delivery, then let security remember the hop so that a replay of it is refused."""
        await self.transport.ack(delivery)
        await self.security.settled(message)

    async def _advance(
        self, delivery: Delivery, message: PaigeantMessage, update: dict[str, Any], started: datetime
    ) -> None:
        name = message.routing_slip.current or ""
        key, attempt = message.idempotency_key, message.attempt
        message.payload.update(update)
        entry = message.routing_slip.mark_complete(name, attempt=attempt, started_at=started, output_keys=list(update))
        if message.routing_slip.is_complete:
            self._check_final(message)
        else:
            hop = message.next_hop()
            body = self._seal(hop)
            await self.transport.publish(hop.routing_slip.current or "", body, headers=dict(hop.headers))
        await self._step_done(delivery, message, key, entry)

    async def _end(self, delivery: Delivery, message: PaigeantMessage, started: datetime, signal: EndWorkflow) -> None:
        name = message.routing_slip.current or delivery.address
        key, attempt = message.idempotency_key, message.attempt
        try:
            update = to_payload_update(signal.output, name, name)
        except NonRetryableError as exc:
            await self._fault(delivery, message, started, str(exc))
            return
        message.payload.update(update)
        entry = message.routing_slip.mark_ended(
            name, attempt=attempt, started_at=started, reason=signal.reason, output_keys=list(update)
        )
        await self._step_done(delivery, message, key, entry)

    async def _step_done(self, delivery: Delivery, message: PaigeantMessage, key: str, entry: ActivityLogEntry) -> None:
        """Report the completed step, remember it and ack; a workflow's last step reports its result first."""
        finished = message.routing_slip.is_complete
        fields: dict[str, Any] = {"activity": entry.name, "step": entry.step, "attempt": entry.attempt}
        # The result of a finished workflow lives only in its `completed` event: it is safely published before
        # the ack, so a crash in between runs the last step again rather than losing the result.
        self.stats.completed_steps += 1  # counted first, so that a callback reading the stats sees this step
        self.stats.completed_workflows += finished
        await self._emit("step_completed", message, duration=entry.duration, at=entry.finished_at, **fields)
        if finished:
            detail = entry.error if entry.outcome == "ended" else None
            await self._emit("completed", message, detail=detail, payload=dict(message.payload), now=True, **fields)
        await self.dedupe.mark_done(key)
        await self._settle(delivery, message)

    async def _apply_revisions(self, message: PaigeantMessage, ctx: ActivityContext) -> None:
        """Log the route changes the step made in the slip, so the message goes to the revised next step."""
        for revision in ctx.revisions:
            message.routing_slip.revise(revision)
            await self._emit("revised", message, detail=revision.summary)

    async def _park(
        self,
        delivery: Delivery,
        message: PaigeantMessage,
        ctx: ActivityContext,
        started: datetime,
        signal: ParkWorkflow,
    ) -> None:
        """Store the step with what it waits for, then ack: `WorkflowDispatcher.resume` publishes it again."""
        if self.waiting_store is None:
            reason = f"the step is {signal}, but the worker has no waiting store (pass Worker(waiting_store=...))"
            await self._fault(delivery, message, started, reason)
            return
        await self._apply_revisions(message, ctx)
        parked = ParkedStep.from_signal(message, signal)
        # The resume, however late, continues this hop's trace.
        parked.message.headers = observability.inject_context(parked.message.headers, message.correlation_id)
        await self.waiting_store.put(parked)
        await self._settle(delivery, message)
        self.stats.parked += 1
        await self._emit("waiting", message, detail=parked.describe())

    def _seal(self, message: PaigeantMessage) -> bytes:
        """The bytes of `message`, signed, with this hop's trace context (see `paigeant_ai._sealing`)."""
        return seal(message, self.security, max_bytes=self.max_message_bytes)

    def _check_final(self, message: PaigeantMessage) -> None:
        """A finished workflow's result goes out in its `completed` event: it must be one a hop could carry."""
        size = len(unsigned_body(message))
        if size > self.max_message_bytes:
            raise too_large(size, self.max_message_bytes)

    async def _retry_or_fault(
        self,
        delivery: Delivery,
        message: PaigeantMessage,
        policy: RetryPolicy | None,
        started: datetime,
        reason: str,
        delay: float | None,
    ) -> None:
        policy = policy or RetryPolicy()
        next_attempt = message.attempt + 1
        if next_attempt >= policy.max_attempts:
            attempts = "1 attempt" if policy.max_attempts == 1 else f"{policy.max_attempts} attempts"
            await self._fault(delivery, message, started, f"retries exhausted after {attempts}: {reason}")
            return
        wait = policy.delay_before(next_attempt, self.rng) if delay is None else delay
        retry = message.next_hop(attempt=next_attempt)
        await self.transport.publish(delivery.address, self._seal(retry), headers=dict(retry.headers), delay=wait)
        await self._settle(delivery, message)
        self.stats.retried += 1
        await self._emit("step_retried", message, detail=f"{reason}; attempt {next_attempt + 1} in {wait:.2f}s")

    async def _fault(
        self, delivery: Delivery, message: PaigeantMessage, started: datetime, reason: str, *, name: str | None = None
    ) -> None:
        name = name or message.routing_slip.current or delivery.address
        message.routing_slip.mark_failed(name, attempt=message.attempt, started_at=started, error=reason)
        detail = f"step {name!r} failed: {reason}"
        headers = {**message.headers, REASON_HEADER: detail[:2000], SOURCE_HEADER: delivery.address}
        copy = message.next_hop(attempt=message.attempt)
        try:
            body = self._seal(copy)  # a replay continues this hop's trace
        except (MessageTooLarge, NonFiniteNumber) as exc:
            # The failed step's log entry tipped it over (or it carries what cannot be sent): keep the bytes as
            # they arrived instead, with the reason, so that nothing is lost.
            logger.warning("dead-lettering %s as it arrived: %s", message.correlation_id, exc)
            await self.transport.dead_letter(delivery, detail[:2000])
            await self.security.settled(message)
        else:
            await self.transport.publish(DEAD_LETTER, body, headers=headers)
            await self._settle(delivery, message)
        self.stats.faulted += 1
        logger.warning("workflow %s faulted: %s", message.correlation_id, detail)
        await self._emit("step_failed", message, activity=name, detail=reason)
        await self._emit("faulted", message, activity=name, detail=detail)

    # -- events ----------------------------------------------------------------------------------------------

    async def _emit(self, kind: Any, message: PaigeantMessage | None, *, now: bool = False, **fields: Any) -> None:
        """Report an event to the callbacks, the hop's span and (batched, or at once with `now`) the broker."""
        values: dict[str, Any] = {**_EVENT_DEFAULTS, "kind": kind, "at": datetime.now(UTC)}
        if message is not None:
            values["correlation_id"] = message.correlation_id
            values["activity"] = message.routing_slip.current
            values["step"] = message.step
            values["attempt"] = message.attempt
            values["message_id"] = message.message_id
            values["remaining"] = [spec.name for spec in message.routing_slip.itinerary]
        values.update(fields)
        if self.publish_events and now:
            await self._events.flush()  # keep the workflow's events in order
            await self.transport.publish(EVENTS, to_json([values]))
        elif self.publish_events:
            self._events.add(values)
        if not self._callbacks and not observability.tracing_enabled():
            return  # nobody here reads the event: building the model on every hop would only cost time
        # Every field comes from the worker's own, already valid values: no need to validate them again.
        event = WorkflowEvent.model_construct(**values)
        observability.record_event(event)
        for callback in self._callbacks:
            try:
                result = callback(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("an on_event callback failed for %s", kind)


_EVENT_DEFAULTS: dict[str, Any] = {
    name: field.default
    for name, field in WorkflowEvent.model_fields.items()
    if not field.is_required() and field.default_factory is None
} | {"correlation_id": None}


_LOG_ENTRY_BYTES = 512
"""About what a step's log entry and new ids add to a message."""


class _EventBatcher:
    """Publishes events in batches (one message a batch), off the hop's path.

    A hop reports two or three events; publishing each on its own would cost as many broker round trips as the
    step itself. Events are a projection, not part of the workflow: a batch that cannot be published is logged
    and dropped, and at most `interval` seconds of events are lost when a process dies.
    """

    def __init__(self, transport: Transport, *, interval: float = 0.05, max_batch: int = 500) -> None:
        self.transport = transport
        self.interval = interval
        self.max_batch = max_batch
        self._pending: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._full = asyncio.Event()

    def add(self, event: dict[str, Any]) -> None:
        """Queue an event, given as the values of a `WorkflowEvent`."""
        self._pending.append(event)
        if len(self._pending) >= self.max_batch:
            self._full.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="paigeant-events")

    async def _run(self) -> None:
        while self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), self.interval)
            await self._publish()

    async def _publish(self) -> None:
        batch, self._pending = self._pending, []
        self._full.clear()
        if not batch:
            return
        try:
            await self.transport.publish(EVENTS, to_json(batch))  # the JSON array `decode_events` reads
        except Exception:
            logger.warning("could not publish %d workflow events", len(batch), exc_info=True)

    async def flush(self) -> None:
        """Publish what is waiting, now."""
        if self._task is not None and not self._task.done():
            self._full.set()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._publish()


def _default_dedupe(transport: Transport) -> DedupeStore:
    return transport.dedupe_store() if isinstance(transport, SharedStores) else InMemoryDedupeStore()


def _effective_spec(own: ActivitySpec, wire: ActivitySpec) -> ActivitySpec:
    """The worker's spec, with the workflow's explicit overrides and the union of required scopes."""
    if wire.retry is None and wire.timeout is None and not wire.arguments and not wire.required_scopes:
        return own  # the usual case: nothing overridden
    return own.model_copy(
        update={
            "arguments": {**own.arguments, **wire.arguments},
            "retry": wire.retry or own.retry,
            "timeout": wire.timeout or own.timeout,
            "required_scopes": tuple(dict.fromkeys((*own.required_scopes, *wire.required_scopes))),
        }
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
