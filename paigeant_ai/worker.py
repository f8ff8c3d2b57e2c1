"""`Worker`: runs activities, one hop at a time.

A hop goes through five stages, each in one place (see `Worker.process`):

1. admit (`paigeant_ai._hop.admit`): the bytes, their size, the route, the expiry;
2. authenticate (`Worker._authenticate`): the signature and the signer's right to send to the step, without I/O,
   before the hop may wait for anything (a forged copy of a running step never holds a slot);
3. authorize (`Worker._authorize`): the user's token, what the hop carries beyond its own signature (the signed
   plan and revisions, a resume's parked record and approvals), then its claim in the replay cache (see
   `paigeant_ai._replay`); a fresh copy is authorized before it may wait for a copy of its step running here,
   so a replayed copy is refused at once; then the dedupe store;
4. run (`Worker._run`): the activity with its timeout, in its span; what it does becomes an `Outcome`, decided by
   the pure `paigeant_ai._outcome.classify`; an at-most-once step runs only once its start record is safe, and a
   copy that finds one is reconciled or parked in doubt instead (`paigeant_ai._at_most_once`); a step whose
   workflow's budget is spent does not run, and one stopped at the limit its budget left ends the same way
   (`paigeant_ai._budget_gate`);
5. settle (`paigeant_ai._settle.settle`): the outcome's successor is made safe with the broker, then the delivery
   is acked. Nothing is acked before its successor is safe, so a crash at any point loses nothing; a redelivered
   step that already completed is recognised by its idempotency key and not run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from . import observability
from ._advertiser import Advertiser
from ._agent_progress import StepProgress
from ._approvals import check_resume
from ._at_most_once import AtMostOnce
from ._budget_gate import after_step, budget_gate, release_budget_park
from ._budget_resume import check_extensions
from ._cancel import CancelCheck, CancelRequest
from ._dedupe import DedupeStore, InMemoryDedupeStore
from ._escape import escape_control
from ._events import EventCallback, EventReporter
from ._fan import refuse_without_join
from ._hop import Hop, admit
from ._in_order import SettlingWorkflows
from ._join import JoinStore, join_store_for
from ._long_steps import LongSteps, StillRunning
from ._outcome import SIGNALS, Fault, Halt, Outcome, Reject, Skip, classify, completed, describe
from ._pinning import Pins
from ._plan import PlanCheck
from ._resume_checks import release_parked
from ._routes import Routes
from ._settle import WorkerStats, refuse, settle
from ._shared_store import resolve_shared_store, say_what_is_protected
from ._versions import activity_version
from .activity import DEFAULT_TIMEOUT, Activity, ActivityContext, ActivityFunc, as_activity
from .approval import WaitingStore
from .contracts import PaigeantMessage
from .exceptions import DuplicateMessage, ReplayedMessage, SecurityError, TokenError, TransportError, UserError
from .security import MessageSecurity, MessageSigner
from .settings import Settings
from .transports.base import CancelBoard, Cancellations, Consumer, Delivery, SharedStores, Transport

__all__ = ("DedupeStore", "InMemoryDedupeStore", "MessageSecurity", "Worker", "WorkerStats")

logger = logging.getLogger("paigeant_ai.worker")


class Worker:
    """Consumes the queues of its activities and runs each step it receives.

    Args:
        transport: The transport to consume from and publish to.
        activities: The activities this worker runs: `Activity` objects (`AgentActivity`, `@activity`
            functions) or plain functions. Each is consumed from the queue of its name.
        concurrency: How many steps run at once (also the prefetch of each queue).
        max_message_bytes: Larger messages are dead-lettered; defaults to `PAIGEANT_MAX_MESSAGE_BYTES`.
        dedupe: Where completed steps are remembered; by default the shared store's (see `shared_store`), else
            this process's memory.
        security: Verifies every message received and signs every message sent; by default a `MessageSigner`
            with the keys of the `PAIGEANT_*` settings (see `paigeant_ai.security`).
        allow_unsigned: With no keys configured, run without signatures instead of refusing to start on a real
            broker (`PAIGEANT_ALLOW_UNSIGNED=1`). Anyone who can publish to the broker can then forge steps.
        on_event: Called (sync or async) with every `WorkflowEvent` this worker produces.
        publish_events: Also publish every event on the `events` address of its home transport (see `home`;
            capped by each transport), where a `WorkflowProjector` in any process can feed them to a `WorkflowStore`.
        shutdown_timeout: On stop, seconds in-flight steps get to finish before they are cancelled and
            left unacked for redelivery.
        rng: Source of retry jitter (seed it for reproducible tests).
        waiting_store: Where steps that wait for input (an agent's tool that needs approval) are parked until
            `WorkflowDispatcher.resume`; share it with the dispatcher. Without one, such a step faults; a worker
            with at-most-once activities parks the steps in doubt in its shared store's, or refuses to start.
        shared_store: Where every replica keeps the replay cache and the dedupe store, so that a hop replayed to
            another process is refused there too: a Redis URL or a `RedisTransport`. By default the transport
            itself when it offers `SharedStores` (Redis), else `PAIGEANT_SHARED_STORE_URL`; without one (RabbitMQ)
            each process keeps its own, and the worker says at start what that leaves unprotected.
        registry_heartbeat: Seconds between two posts of this worker's record on the transport's registry (see
            `paigeant_ai._registry`); defaults to `PAIGEANT_REGISTRY_HEARTBEAT` (10).
        transports: The transports, by name, that the steps of its workflows may live on (`ActivitySpec.transport`),
            its own among them; the next hop goes to its step's transport. Defaults to `PAIGEANT_TRANSPORTS`.
        home: The name of the transport where it publishes its events, the workflows' home (the dispatcher's);
            defaults to `PAIGEANT_HOME_TRANSPORT`, else `transport`. See `docs/deployment.md`.
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
        shared_store: str | SharedStores | None = None,
        registry_heartbeat: float | None = None,
        transports: Mapping[str, Transport] | None = None,
        home: str | None = None,
    ) -> None:
        if not activities:
            raise UserError("a Worker needs at least one activity")
        settings = Settings.from_env()
        self.transport = transport
        self.routes = Routes(transport, transports, home=home)
        """Where each hop goes: its step's transport (see `paigeant_ai._routes`)."""
        self.activities = _by_name(activities)
        self.concurrency = settings.concurrency if concurrency is None else concurrency
        if self.concurrency < 1:
            raise UserError("concurrency must be at least 1")
        self.max_message_bytes = settings.max_message_bytes if max_message_bytes is None else max_message_bytes
        if self.max_message_bytes < 1:
            raise UserError("max_message_bytes must be positive")
        shared, self._store_connection = resolve_shared_store(transport, shared_store, settings)
        self.dedupe = dedupe or (shared.dedupe_store() if shared is not None else InMemoryDedupeStore())
        self.joins: JoinStore | None = join_store_for(transport, shared)
        """Where the branches of parallel groups meet (see `paigeant_ai._join`); None: this worker refuses them."""
        self.security: MessageSecurity = (
            security
            if security is not None
            else MessageSigner.from_settings(
                transport,
                allow_unsigned=allow_unsigned,
                replay_cache=shared.replay_cache() if shared is not None else None,
            )
        )
        self.reporter = EventReporter(self.routes.home, on_event, publish=publish_events, security=self.security)
        self._pins = Pins(transport, self.reporter)
        self._long_steps = LongSteps(transport, self.security)  # hands back what it holds past the ack deadline
        self.shutdown_timeout = shutdown_timeout
        self.rng = rng or random.Random()
        self.at_most_once, self.waiting_store = AtMostOnce.for_worker(
            transport, shared, self.activities, self.security, self.reporter, waiting_store
        )
        self.stats = WorkerStats()
        self.plans = PlanCheck()
        self.cancels = CancelCheck()
        self.cancel_board: CancelBoard | None = (
            transport.cancel_board() if isinstance(transport, Cancellations) else None
        )
        self.cancel_poll = 0.5
        """Seconds between two looks at the cancel board for the workflows whose steps run here."""
        self.advertiser = Advertiser(
            transport,
            self.activities,
            self.security,
            concurrency=self.concurrency,
            interval=settings.registry_heartbeat if registry_heartbeat is None else registry_heartbeat,
            home=self.routes.home,
            address=self.routes.own_name,
        )
        """Posts this worker's record on the transport's registry (see `paigeant_ai._advertiser`)."""
        self._versions: dict[str, str | None] = {}  # by activity name, see `_version_of`
        self._activity_tasks: dict[str, dict[int, tuple[Hop, asyncio.Task[object]]]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(self.concurrency)  # made anew by run(), after `concurrency` may change
        self._inflight: set[asyncio.Task[None]] = set()
        self._started = 0  # steps started, ever: a drain check sees whether one started while it counted
        self._running_keys: dict[str, asyncio.Event] = {}
        self._settling = SettlingWorkflows()  # a workflow's events in order here (see `paigeant_ai._in_order`)
        self._consumers: list[Consumer] = []
        self._pumps: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        self._running = False
        self._background: asyncio.Task[None] | None = None
        self.consuming = asyncio.Event()
        """Set while `run()` consumes every queue of this worker: it has started (a supervisor waits for it)."""

    @property
    def publish_events(self) -> bool:
        """Whether events are published on the transport's `events` address."""
        return self.reporter.publish

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
        say_what_is_protected(self.transport, self.security)
        self._long_steps.start(self.activities)
        self._running = True
        self._slots = asyncio.Semaphore(self.concurrency)
        try:
            await self.routes.connect()
            if self._store_connection is not None:
                await self._store_connection.connect()
            if self.cancel_board is not None:
                await self.cancel_board.open()  # caught up with every cancel posted so far, before any step runs
                self._watcher = asyncio.create_task(self._watch_cancellations(), name="paigeant-cancellations")
            else:
                logger.warning("%s has no cancel board: workflows cannot be cancelled here", self.transport.name)
            await self._advertise()  # before consuming: whoever sees a consumer of a step sees it advertised
            for name in self.activities:
                consumer = await self.transport.consume(name, prefetch=self.concurrency)
                self._consumers.append(consumer)
                self._pumps.append(asyncio.create_task(self._pump(consumer), name=f"paigeant-consume-{name}"))
            self.consuming.set()
            if burst:
                await self._wait_until_drained()
            else:
                await self._wait_until_stopped()
        finally:
            self.consuming.clear()
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
        quiet_for = getattr(self.transport, "requeue_lag", 1.0)  # a transport that does not say: be patient
        quiet_since: float | None = None
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            self._raise_if_a_consumer_failed()
            if not self._inflight and await self._quiet_through_a_count():
                quiet_since = quiet_since if quiet_since is not None else loop.time()
                if loop.time() - quiet_since >= quiet_for:
                    return
            else:
                quiet_since = None
            await asyncio.sleep(0.02)

    async def _quiet_through_a_count(self) -> bool:
        """Whether every queue is empty and no step started while they were counted.

        The count takes a round trip per queue: a step that starts during it can hand its workflow on to a queue
        counted already, then settle before its own queue is counted, and both would look empty.
        """
        started = self._started
        return await self._all_queues_empty() and not self._inflight and self._started == started

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

    async def _advertise(self) -> None:
        self.advertiser.concurrency = self.concurrency
        try:
            await self.advertiser.start()
        except Exception as exc:  # the registry is for planners and status; the steps run without it
            logger.warning("this worker is not on the registry: %s", exc)

    async def _shutdown(self) -> None:
        await self.advertiser.stop()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
            self._watcher = None
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._pumps.clear()
        if self._inflight:
            _, unfinished = await asyncio.wait(set(self._inflight), timeout=self.shutdown_timeout)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        await self.reporter.flush()
        for consumer in self._consumers:
            try:
                await consumer.aclose()
            except TransportError:
                logger.warning("closing a consumer failed; its deliveries return to the broker", exc_info=True)
        self._consumers.clear()
        if self.cancel_board is not None:
            await self.cancel_board.close()
        if self._store_connection is not None:
            await self._store_connection.disconnect()
        await self.routes.disconnect()

    async def _pump(self, consumer: Consumer) -> None:
        async for delivery in consumer:
            if not await self._long_steps.wait_for_slot(self._slots, delivery):
                continue  # handed back to the broker before its ack deadline
            if self._stop.is_set():
                self._slots.release()
                return
            task = asyncio.create_task(self._handle(delivery))
            self._started += 1
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
            # The broker failed while the hop was settled: the delivery goes back to it now, to be handed out again
            # as its redelivery (or its watch copy runs the step again, for one handed back while it ran).
            logger.exception(
                "could not settle a delivery on %s; %s", delivery.address, self._long_steps.after(delivery)
            )
            await self._long_steps.give_back(delivery, self._stop)
        except Exception as exc:
            # A failure of the worker itself (a store, a callback, a bug): keep the message, with the reason, where
            # an operator can replay it once the cause is fixed, rather than hold it unsettled forever.
            logger.exception("the worker failed on a delivery from %s; dead-lettering it", delivery.address)
            with contextlib.suppress(Exception):
                reason = escape_control(f"the worker failed on this message: {describe(exc)}")
                await self._long_steps.dead_letter(delivery, reason)
        finally:
            self._long_steps.handled(delivery)
            self._slots.release()

    async def process(self, delivery: Delivery) -> None:
        """Process one delivery end to end and settle it (ack, publish onwards, or dead-letter)."""
        with observability.hop_span(delivery, self.transport.name):
            hop = admit(delivery, self.activities, self.max_message_bytes)  # bytes, size, route, expiry
            if not isinstance(hop, Reject) and (misrouted := self.routes.arrival_refusal(hop.message)) is not None:
                hop = Reject(misrouted)  # its step lives on another transport: one signed hop runs on one only
            if not isinstance(hop, Reject):
                hop.version = self._version_of(hop.activity)
                hop = refuse_without_join(hop, self.joins)  # a branch's hop needs a join store
            if not isinstance(hop, Reject):
                hop = self._authenticate(hop)  # the signature and the signer's right to send here; no I/O
            if isinstance(hop, Reject):
                await refuse(delivery, hop, self)  # before it may wait: a forged copy never holds anything up
                return
            await self._settling.wait_for(hop.message.correlation_id)  # an earlier hop of its workflow reports first
            pin = self._pins.missed(hop)  # pinned to versions this worker does not run: for another, unclaimed
            if isinstance(pin, Reject):
                await refuse(delivery, pin, self)
                return
            if pin is not None and await self._waits_for_pin(hop):
                await self._pins.hand_back(hop, pin)
                return
            # A fresh copy is authorized (and claims its id) before it may wait, so a replayed copy of a running
            # step is refused at once; the broker's redelivery waits for a copy running here, then finds it settled.
            redelivered = self._long_steps.redelivered(hop.delivery)
            if redelivered and self._long_steps.holds(hop.message.message_id):  # its ack failed as it was handed back
                await self._settle(hop, Skip("handed back, and running here (redelivery)"))
                return
            outcome = None if redelivered else await self._authorize(hop)  # token, plan, resume, claim
            if isinstance(outcome, Reject):
                await self._settle(hop, outcome)
                return
            if isinstance(outcome, StillRunning):
                await self._long_steps.rearm(hop)  # a watch copy of a step its worker still runs
                return
            key = hop.message.idempotency_key
            if not await self._long_steps.wait_turn(lambda: self._one_copy_at_a_time(key), hop.delivery):
                return  # handed back to the broker before its ack deadline
            try:
                if redelivered:
                    outcome = await self._authorize(hop)
                # A step that completed is skipped, even if its token has expired since (a refused token is a Fault).
                if outcome is None or isinstance(outcome, Fault):
                    outcome = await self._done_or_halted(hop, outcome)  # cancelled, or past its deadline: it stops
                if outcome is None:
                    outcome = budget_gate(hop)  # its budget spent: parked or faulted before the step runs
                if outcome is None or isinstance(outcome, (Halt, Skip)):
                    await release_parked(hop, self.waiting_store)  # a resume that runs, stops or came late: gone
                    await release_budget_park(hop, self.waiting_store)  # so is a workflow given more budget
                if outcome is None:  # an at-most-once step runs once its start record is safe, else is reconciled
                    async with self._long_steps.watch(hop):  # handed back before the broker's ack deadline
                        outcome = await self.at_most_once.run(hop, self._run, self.max_message_bytes)
                    outcome = after_step(hop, outcome)  # stopped at its budget's limit: the budget is exhausted
                await self._settle(hop, outcome)  # the successor made safe, then the ack
                await self.at_most_once.settled(hop)
            finally:
                self.at_most_once.forget(hop)
                self._long_steps.forget(hop)
                self._running_keys.pop(key).set()

    async def _settle(self, hop: Hop, outcome: Outcome) -> None:
        """Settle `hop` (`paigeant_ai._settle.settle`); a hop of its workflow arriving meanwhile starts after."""
        cid = hop.message.correlation_id
        done = self._settling.begin(cid)
        try:
            await settle(hop, outcome, self)
        finally:
            self._settling.end(cid, done)

    async def _done_or_halted(self, hop: Hop, outcome: Outcome | None) -> Outcome | None:
        """Skip for a step that completed already, else `outcome`, else why its workflow stops here (`_halted`).

        A shared dedupe store and the cancel board are asked together: on Redis both reads go out in one round trip,
        before the step runs. Both are only reads, so asking the board of a step that completed changes nothing. An
        in-process store answers at once: asking one after the other spares the two tasks of `gather`.
        """
        key = hop.message.idempotency_key
        if outcome is not None:  # refused: only whether the step ran while it was allowed matters
            done = await self.dedupe.is_done(key)
        elif isinstance(self.dedupe, InMemoryDedupeStore):
            done = await self.dedupe.is_done(key)
            outcome = None if done else await self._halted(hop)
        else:
            done, outcome = await asyncio.gather(self.dedupe.is_done(key), self._halted(hop))
        return Skip("already completed (redelivery)") if done else outcome

    async def _waits_for_pin(self, hop: Hop) -> bool:
        """Whether a hop pinned to versions this worker does not run waits for another: not when its pin is not the
        signed plan's (refused here), its workflow is cancelled (it ends here, on any version), or its step ran
        already (a copy: settled here as one)."""
        try:
            self.plans.check(hop.message, hop.signer, None, self.security)  # the pin is the dispatcher's
        except SecurityError:
            return False
        if await self._cancelled(hop.message):
            return False
        return not await self.dedupe.is_done(hop.message.idempotency_key)

    def _version_of(self, activity: Activity) -> str | None:
        """The version of one of this worker's activities, found once: deriving it digests the activity's code."""
        name = activity.spec.name
        if name not in self._versions:
            self._versions[name] = activity_version(activity)
        return self._versions[name]

    def _authenticate(self, hop: Hop) -> Hop | Reject:
        """The hop, once its signature holds and its signer may send to the step; else why it is refused."""
        try:
            authenticated = self.security.authenticate(hop.message, hop.spec, hop.delivery.body)
        except SecurityError as exc:
            return Reject(f"security check failed: {exc}")
        hop.signer, hop.digest = authenticated.signer, authenticated.digest
        return hop

    async def _one_copy_at_a_time(self, key: str) -> None:
        """A second copy of a step in flight here waits for the first, then finds it done (or runs it)."""
        while (running := self._running_keys.get(key)) is not None:
            await running.wait()
        self._running_keys[key] = asyncio.Event()

    async def _authorize(self, hop: Hop) -> Outcome | None:
        """None when the authenticated hop may run, as far as its token, what it carries and its claim go (its
        token's claims then in `hop.claims`); else how it ends. The dedupe store is asked once it may run.

        Everything signed beyond the hop's own signature (the plan, a resume's parked record and approvals) is
        checked before the hop claims its id: a hop refused for what it carries must not block the genuine one.
        """
        refused: TokenError | None = None
        try:
            hop.claims = self.security.check_token(hop.message, hop.spec)
        except TokenError as exc:
            refused = exc  # unless the step ran while the token was still valid, the workflow faults
            if exc.code == "token_expired" and hop.message.routing_slip.unwinding is not None:
                # Undoing what was done on the user's behalf does not wait for a fresh token: a compensation runs
                # on the authority its workflow was started with, once the token was genuine (checked above).
                refused = None
        try:  # the plan, its revisions, and whose token this is: the hop's signer vouches only for the hop
            self.plans.check(hop.message, hop.signer, hop.claims, self.security)
            hop.approvals = check_resume(hop, self.security)  # a resume: its parked record and approvals
            self._check_cancelled(hop)  # an undoing for a cancel: the signed cancel request it carries
            check_extensions(hop.message, hop.signer, self.security)  # more budget: each grant signed
        except SecurityError as exc:
            return Reject(f"security check failed: {exc}")
        lease = self._long_steps.claim_lease(hop.spec)
        redelivered = self._long_steps.redelivered(hop.delivery)
        try:
            await self.security.claim(hop.message, hop.digest, redelivered=redelivered, lease=lease, holder=hop.holder)
        except DuplicateMessage:
            observability.continue_trace(hop.message)  # the signature held: only the hop is old
            # Not an attack: the hop produced again, and signed, by an upstream step that re-ran after a crash.
            return Skip("already settled (duplicate)")
        except ReplayedMessage as exc:
            if self._long_steps.is_watch_copy(hop.delivery):  # see `paigeant_ai._long_steps`
                return StillRunning("its worker runs it") if exc.running else Skip("already settled (watched)")
            # The broker's own redelivery of a hop settled here (its ack was lost) ran once; any other copy is a
            # replay, refused in a trace of its own: whoever replays old hops adds nothing to a workflow's trace.
            if not redelivered:
                return Reject(f"security check failed: {exc}")
            observability.continue_trace(hop.message)
            return Skip("handed back, and watched (redelivery)" if exc.running else "already settled (duplicate)")
        except SecurityError as exc:
            return Reject(f"security check failed: {exc}")
        observability.continue_trace(hop.message)  # signed as it is: its trace context is trusted from here on
        return Fault(str(refused), fallback=False) if refused is not None else None

    def _check_cancelled(self, hop: Hop) -> None:
        """A workflow undone because it was cancelled carries the cancel request that holds for it, as it names who.

        Raises:
            SecurityError: Code `cancel`: it carries none, or one that does not hold or names someone else.
        """
        unwinding = hop.message.routing_slip.unwinding
        if hop.signer is None or unwinding is None or unwinding.cause != "cancelled":
            return
        records = [unwinding.cancel.encode()] if unwinding.cancel is not None else []
        request = self.cancels.holding(records, hop.message, self.security)
        if request is None or request.by != unwinding.by:
            raise SecurityError(
                "cancel: the workflow is undone as cancelled, but carries no cancel request that holds for it",
                code="cancel",
            )

    async def _halted(self, hop: Hop) -> Halt | None:
        """Why the workflow of an authorized hop stops here, if it does: cancelled (a cancel request on the board
        holds), or past its deadline. A compensation always runs: undoing goes on whatever happens."""
        message = hop.message
        if message.routing_slip.unwinding is not None:
            return None
        if hop.expired and message.expires_at is not None:
            deadline = message.expires_at.isoformat()
            return Halt("expired", f"its deadline {deadline} passed before step {message.routing_slip.current!r} ran")
        request = await self._cancelled(message)
        if request is None:
            return None
        return Halt("cancelled", request.summary, by=request.by, cancel=request.to_bytes().decode())

    async def _cancelled(self, message: PaigeantMessage) -> CancelRequest | None:
        """The cancel request on the board that holds for the workflow of `message`, if one does."""
        if self.cancel_board is None:
            return None
        records = await self.cancel_board.records(message.correlation_id)
        return self.cancels.holding(records, message, self.security) if records else None

    async def _watch_cancellations(self) -> None:
        """Interrupt the running steps of cancelled workflows: their activity's task is cancelled mid-way."""
        board = self.cancel_board
        assert board is not None
        while True:
            await asyncio.sleep(self.cancel_poll)
            if not self._activity_tasks:
                continue
            try:
                found = await board.cancelled_among(list(self._activity_tasks))
            except TransportError:
                logger.warning("could not read the cancel board; trying again", exc_info=True)
                continue
            for correlation_id, records in found.items():
                for hop, task in list(self._activity_tasks.get(correlation_id, {}).values()):
                    if hop.interrupt is not None or hop.message.routing_slip.unwinding is not None:
                        continue
                    request = self.cancels.holding(records, hop.message, self.security)
                    if request is not None:
                        cancel = request.to_bytes().decode()
                        hop.interrupt = Halt("cancelled", request.summary, by=request.by, cancel=cancel)
                        task.cancel(f"workflow cancelled: {request.summary}")

    async def _run(self, hop: Hop) -> Outcome:
        """Run the step with its timeout, in its span; what it did, as an outcome.

        The activity runs in a task of its own, which a cancel of its workflow interrupts; the step's timeout is
        cut short to the workflow's deadline, which then ends the workflow `expired`.
        """
        hop.ctx = ctx = ActivityContext(
            message=hop.message, spec=hop.spec, obo_claims=hop.claims, progress=StepProgress(self.reporter, hop.message)
        )
        hop.started = datetime.now(UTC)
        message = hop.message
        timeout = hop.spec.timeout or DEFAULT_TIMEOUT
        undoing = message.routing_slip.undoing
        if message.expires_at is not None and undoing is None:
            left = (message.expires_at - hop.started).total_seconds()
            if left < timeout:
                timeout, hop.deadline_bound = max(left, 0.001), True
        fields: dict[str, Any] = {"step": undoing.step, "undoes": undoing.activity} if undoing is not None else {}
        fields["version"] = hop.version
        await self.reporter.report("step_started", message, timeout=timeout, **fields)
        cid = message.correlation_id
        try:
            with observability.activity_span(ctx):
                running: asyncio.Task[object] = asyncio.ensure_future(hop.activity.run(ctx))
                self._activity_tasks.setdefault(cid, {})[id(hop)] = (hop, running)
                try:
                    async with asyncio.timeout(timeout):
                        output = await running
                finally:
                    self._forget_activity(cid, hop)
        except TimeoutError as exc:
            if hop.deadline_bound and not str(exc):
                deadline = message.expires_at.isoformat() if message.expires_at else ""
                return Halt("expired", f"its deadline {deadline} passed while step {hop.spec.name!r} ran")
            return self._failed(hop, exc)
        except Exception as exc:
            return self._failed(hop, exc)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the worker is stopping: leave the delivery unacked for another worker
            if hop.interrupt is not None:
                return hop.interrupt  # its workflow was cancelled
            return classify(exc, hop.spec, hop.message.attempt)
        return completed(output, hop.spec, len(hop.delivery.body), self.max_message_bytes)

    def _forget_activity(self, correlation_id: str, hop: Hop) -> None:
        running = self._activity_tasks.get(correlation_id)
        if running is not None:
            running.pop(id(hop), None)
            if not running:
                del self._activity_tasks[correlation_id]

    def _failed(self, hop: Hop, exc: Exception) -> Outcome:
        """What a step that raised `exc` comes to, logged unless it is a signal."""
        hop.raised = exc
        if not isinstance(exc, SIGNALS):
            cid, why = escape_control(hop.message.correlation_id), escape_control(describe(exc))
            logger.warning("step %s of %s failed: %s", hop.spec.name, cid, why)
        return classify(exc, hop.spec, hop.message.attempt)


def _by_name(activities: Sequence[Activity | ActivityFunc]) -> dict[str, Activity]:
    """The activities by name, with the compensations they bring (`activity(compensate=<a function>)`)."""
    by_name: dict[str, Activity] = {}
    for item in activities:
        act = as_activity(item)
        if act.spec.name in by_name:
            raise UserError(f"two activities are named {act.spec.name!r}; activity names must be unique")
        by_name[act.spec.name] = act
    for act in list(by_name.values()):
        compensation = getattr(act, "compensation", None)
        if isinstance(compensation, Activity) and by_name.setdefault(compensation.spec.name, compensation) is not (
            compensation
        ):
            raise UserError(
                f"the compensation of {act.spec.name!r} is named {compensation.spec.name!r}, like another activity; "
                "activity names must be unique"
            )
    return by_name
