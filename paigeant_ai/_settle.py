"""The last stage of a hop: act on its `Outcome`, and settle the delivery.

The worker's one invariant lives here, in `settle`, and nowhere else: nothing is acked before its successor is
safe with the broker. What "successor" means depends on the outcome (see `paigeant_ai._outcome`):

- `Advance`: the next step's message, or, for the last step, the workflow's `completed` event (the only home of
  its result); then the step is remembered in the dedupe store.
- `End`: the `completed` event.
- `Park`: the parked record, in the waiting store.
- `Retry`: the next attempt's message, published with its delay; for a resumed step, the parked record it was
  resumed from, signed anew (its answers are used once: it waits for new ones).
- `Fault`: the step's next fallback, if it has one; else, with completed steps to undo, the first compensation
  (the workflow unwinds: see `RoutingSlip.unwind`); else the copy with the reason, on the dead-letter queue. A
  compensation that fails for good leaves the workflow `compensation_failed`, its copy on the dead-letter queue.
- `Halt`: the first compensation, if the workflow has completed steps to undo; else none.
- `Skip`: none; the hop already ran.
- `Reject`: the delivery itself, moved to the dead-letter queue as it arrived (`Transport.dead_letter`).

Each is published and confirmed by the transport before the ack. A crash in between leaves the delivery with the
broker, which hands it out again: the step may run a second time (which `ctx.idempotency_key` and the dedupe store
are for), but nothing is lost.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic_ai import ConversationTypeAdapter

from . import observability
from ._budget import BudgetExhausted
from ._dedupe import DedupeStore
from ._escape import escape_control
from ._events import EventReporter
from ._fan import branch_refusal, complete_branch, fan_out, fans_out, parks_alone, stop_group
from ._hop import Hop
from ._in_doubt import StepInDoubt
from ._join import JoinStore
from ._ledger import carry_usage, take_usage
from ._long_steps import hand_over
from ._outcome import Advance, End, Fault, Halt, Outcome, Park, Reject, Retry, Skip
from ._plan import begin_unwinding, revise_route
from ._routes import Routes, step_address
from ._sealing import NonFiniteNumber, seal, too_large, unsigned_body
from ._step_record import StepRecord
from ._wire import FROM_WIRE
from .approval import ParkedStep, WaitingStore
from .contracts import DEAD_LETTER, ActivityLogEntry, Compensation, PaigeantMessage, RetryPolicy, Unwinding
from .exceptions import MessageTooLarge, ParkWorkflow, SecurityError, UnknownTransport
from .security import MessageSecurity
from .transports.base import REASON_HEADER, SOURCE_HEADER, Delivery, Transport

__all__ = ("INTERRUPTED", "SettleDeps", "WorkerStats", "refuse", "settle")

INTERRUPTED = "interrupted: "
"""How the `step_failed` of a step stopped while it ran (a cancel, a deadline) begins: it did not fault."""

logger = logging.getLogger("paigeant_ai.worker")


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
    fell_back: int = 0
    compensated: int = 0
    cancelled: int = 0
    expired: int = 0


@dataclass(frozen=True, slots=True)
class _FellBack:
    """A failed step handed on to its next fallback."""

    reason: str
    to: str


@dataclass(frozen=True, slots=True)
class _Stopped:
    """A workflow stopped (faulted, cancelled, expired) with `pending` completed steps to undo, oldest first."""

    unwinding: Unwinding
    pending: list[Compensation]
    failed: str | None
    """Why the step that was running failed, when one was (it is logged as failed)."""
    branch: str | None = None
    """The branch of a parallel group the stopping hop ran, if it did (its slip is no branch's once unwinding)."""


_Settled = Outcome | _FellBack | _Stopped


class SettleDeps(Protocol):
    """What settling needs of the worker."""

    @property
    def transport(self) -> Transport: ...
    @property
    def security(self) -> MessageSecurity: ...
    @property
    def dedupe(self) -> DedupeStore: ...
    @property
    def waiting_store(self) -> WaitingStore | None: ...
    @property
    def reporter(self) -> EventReporter: ...
    @property
    def stats(self) -> WorkerStats: ...
    @property
    def rng(self) -> random.Random: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def joins(self) -> JoinStore | None: ...
    @property
    def routes(self) -> Routes: ...


async def settle(hop: Hop, outcome: Outcome, deps: SettleDeps) -> None:
    """Make the successor of `hop` safe with the broker, then ack the delivery, then report how it ended.

    The one place a hop's delivery is acked: the successor of every outcome (see the module's docstring) is
    confirmed by the transport first, so a crash at any point loses nothing.
    """
    if isinstance(outcome, Reject):
        await refuse(hop.delivery, outcome, deps)
        return
    settled, as_arrived = await _secure_successor(hop, outcome, deps)
    # The ack; or, when the fault's copy could not be sealed, the bytes as they arrived are the copy, moved and settled
    # at once. A delivery handed back while its step ran was acked then (see `paigeant_ai._long_steps`).
    await hand_over(deps.transport, hop, as_arrived)
    await deps.security.settled(hop.message, hop.digest)  # now even the broker's redelivery of it is skipped
    await _report(hop, settled, deps)


async def refuse(delivery: Delivery, outcome: Reject, deps: SettleDeps) -> None:
    """Dead-letter a delivery nothing of which is trusted, as it arrived."""
    deps.stats.rejected += 1
    reason = escape_control(outcome.reason)  # it quotes what the message said: never let it forge a log line
    logger.warning("dead-lettering a message from %s: %s", delivery.address, reason)
    await deps.transport.dead_letter(delivery, reason)
    # Nothing in a refused message is trusted: its event names no workflow, so it cannot change one's status.
    await deps.reporter.report("rejected", None, detail=reason, activity=delivery.address)


async def _secure_successor(hop: Hop, outcome: Outcome, deps: SettleDeps) -> tuple[_Settled, str | None]:
    """Publish what follows `hop`; the outcome as settled, and the reason to dead-letter the delivery as it arrived
    (None: ack it). An outcome whose successor cannot be sent becomes a `Fault`."""
    match outcome:
        case Advance() | End() if hop.message.routing_slip.branch is not None:
            if (refused := branch_refusal(hop, outcome)) is not None:
                return await _secure_successor(hop, Fault(refused, fallback=False), deps)
            try:
                assert isinstance(outcome, Advance)  # a branch's End was refused above
                await _complete_branch(hop, outcome, deps)
            except SecurityError as exc:  # a result in the join store that does not verify: nothing is joined
                deps.stats.rejected += 1
                return Reject(f"security check failed: {exc}"), f"security check failed: {exc}"
            except (MessageTooLarge, NonFiniteNumber, UnknownTransport) as exc:  # nothing of the join was sent
                return await _secure_successor(hop, Fault(str(exc), fallback=False), deps)
        case Advance() | End():
            try:
                await _complete_step(hop, outcome, deps)
            except (MessageTooLarge, NonFiniteNumber) as exc:  # the exact checks of the seal: nothing was sent
                return await _secure_successor(hop, Fault(str(exc)), deps)
            except SecurityError as exc:  # revisions this worker may not sign, or past the plan's limits
                return await _secure_successor(hop, Fault(str(exc)), deps)
            except UnknownTransport as exc:  # the next step lives on a transport this worker does not know
                return await _secure_successor(hop, Fault(str(exc), fallback=False), deps)
        case Park():
            store = deps.waiting_store
            if store is None:
                reason = f"the step is {outcome.signal}, but the worker has no waiting store"
                reason += " (pass Worker(waiting_store=...))"
                return await _secure_successor(hop, Fault(reason), deps)
            if (refused := await parks_alone(hop, deps)) is not None:
                return await _secure_successor(hop, Fault(refused, fallback=False), deps)
            try:
                return replace(outcome, detail=await _park(hop, outcome, store, deps)), None
            except SecurityError as exc:  # its revisions cannot be signed or are past the plan's limits
                return await _secure_successor(hop, Fault(str(exc)), deps)
        case Retry() if hop.message.resume is not None and hop.message.resume.parked is not None:
            # An approval is used once: a resumed step that fails waits for its answers again, rather than run the
            # approved calls a second time on the strength of the same answers.
            store = deps.waiting_store
            if store is None:
                return await _secure_successor(hop, Fault(f"{outcome.reason} (a resumed step is not retried)"), deps)
            return await _park_again(hop, outcome, store, deps), None
        case Retry():
            try:
                return await _publish_retry(hop, outcome, deps), None
            except (MessageTooLarge, NonFiniteNumber) as exc:  # the retry cannot be sent: nothing was
                return await _secure_successor(hop, Fault(str(exc)), deps)
        case Fault() if hop.message.routing_slip.unwinding is not None:  # a compensation failed for good
            return outcome, await _publish_fault(hop, outcome, deps)
        case Fault():
            # Once the step is handed on (to its fallback, or to the compensations), the broker's redelivery of it
            # must not run it again beside them: it is remembered as done, under its key before the slip moves on.
            slip, key = hop.message.routing_slip, hop.message.idempotency_key
            if outcome.fallback and (
                to := slip.fall_back(attempt=hop.message.attempt, started_at=hop.started, error=outcome.reason)
            ):
                slip.completed[-1].usage = take_usage(hop)
                slip.completed[-1].version = hop.version  # the failure `fall_back` logged
                await _report_fanned_out(hop.message, await _publish_hop(hop.message, deps), deps)
                await deps.dedupe.mark_done(key)
                return _FellBack(outcome.reason, to), None
            if slip.branch is not None and not await _first_to_stop(hop, deps):
                await deps.dedupe.mark_done(key)
                return Skip(f"its parallel group failed already ({outcome.reason})"), None
            if any(record.compensated_at is None for record in slip.compensations):
                cause = Unwinding(
                    cause="faulted", reason=_fault_detail(hop, outcome), step=slip.step, activity=hop.spec.name
                )
                stopped = await _stop(hop, cause, deps, failed=outcome.reason)
                await deps.dedupe.mark_done(key)
                return stopped, None
            return outcome, await _publish_fault(hop, outcome, deps)
        case Halt():
            slip = hop.message.routing_slip
            if slip.branch is not None and not await _first_to_stop(hop, deps):
                return Skip(f"its parallel group stopped already ({outcome.reason})"), None
            cause = Unwinding(
                cause=outcome.cause,
                reason=outcome.reason,
                step=slip.step,
                activity=slip.current,
                by=outcome.by,
                cancel=outcome.cancel,
            )
            failed = f"{INTERRUPTED}{outcome.reason}" if hop.interrupt is not None else None
            return await _stop(hop, cause, deps, failed=failed), None
        case Skip() | Reject():
            pass
    return outcome, None


async def _stop(hop: Hop, unwinding: Unwinding, deps: SettleDeps, *, failed: str | None) -> _Stopped:
    """Stop the workflow of `hop` for `unwinding.cause` and send its first compensation, if it has steps to undo."""
    message = hop.message
    slip = message.routing_slip
    if failed is not None:
        entry = slip.mark_failed(hop.spec.name, attempt=message.attempt, started_at=hop.started, error=failed)
        entry.usage = take_usage(hop)
        entry.version = hop.version
    branch = slip.branch
    pending = begin_unwinding(message, unwinding)  # undoing has a window of its own, past the workflow's deadline
    stopped = _Stopped(unwinding, pending, failed, branch)
    if pending:
        # Published before the first compensation is: another worker may run that and report its end before this
        # hop is settled, and a store must already know why the workflow stopped.
        await _report_stopped(hop, stopped, deps)
        await _report_fanned_out(message, await _publish_hop(message, deps), deps)
    return stopped


async def _first_to_stop(hop: Hop, deps: SettleDeps) -> bool:
    """For a branch that stops its workflow: whether it is the first of its group to (see `_fan.stop_group`)."""
    try:
        return await stop_group(hop, deps)
    except SecurityError as exc:  # its failure mark does not verify even once replaced: undo what this slip knows
        logger.warning("%s; the branches that completed are not undone", escape_control(str(exc)))
        return True


async def _complete_branch(hop: Hop, outcome: Advance, deps: SettleDeps) -> None:
    """Store a completed branch's result; if it completes its group, send the continuation, then forget the group."""
    key = hop.message.idempotency_key  # the branch's, before its slip changes
    joined = await complete_branch(hop, outcome, deps)
    if joined is not None:
        fanned = await _publish_next(joined.message, deps)
        if joined.message.routing_slip.is_complete:
            await _report_step_done(joined.message, joined.entry, deps)
        await _report_fanned_out(joined.message, fanned, deps)
        assert deps.joins is not None
        await deps.joins.delete(joined.group)
    await deps.dedupe.mark_done(key)


async def _publish_hop(message: PaigeantMessage, deps: SettleDeps) -> str | None:
    """Publish `message` as the first attempt of its slip's current step (one hop per branch for a group); for a
    group, what its `fanned_out` event says, for `_report_fanned_out` once what led to the group is reported."""
    if fans_out(message):
        return await fan_out(message, deps)
    hop = message.next_hop()
    transport = deps.routes.send_to(hop)  # the next step's own transport, confirmed there before the ack here
    body = seal(hop, deps.security, max_bytes=deps.max_message_bytes)
    await transport.publish(hop.routing_slip.current or "", body, headers=dict(hop.headers))
    return None


async def _report_fanned_out(message: PaigeantMessage, fanned: str | None, deps: SettleDeps) -> None:
    """Report that the group `message` reached fanned out (`fanned`: what `_publish_hop` said of it), if it did."""
    if fanned is not None:
        await deps.reporter.report("fanned_out", message, detail=fanned)


async def _complete_step(hop: Hop, outcome: Advance | End, deps: SettleDeps) -> None:
    """Log the step in the slip and send on what follows it; report it, and remember it as done."""
    message, key = hop.message, hop.message.idempotency_key  # the key of this step, before the slip moves on
    ran_on = deps.routes.own_name or step_address(message.routing_slip)  # where its compensation goes
    keys, fanned = list(outcome.update), None
    if isinstance(outcome, End) and message.routing_slip.unwinding is None:  # a compensation cannot end the undoing
        message.payload.update(outcome.update)
        entry = message.routing_slip.mark_ended(
            hop.spec.name, attempt=message.attempt, started_at=hop.started, reason=outcome.reason, output_keys=keys
        )
        entry.usage = take_usage(hop)
        entry.version = hop.version
    else:
        undoing = message.routing_slip.undoing
        if undoing is None:
            await _apply_revisions(hop, deps)  # the slip it leaves is a new one
        slip = message.routing_slip
        message.resume = None  # the step is done; the next one starts afresh
        message.payload.update(outcome.update)
        entry = slip.mark_complete(hop.spec.name, attempt=message.attempt, started_at=hop.started, output_keys=keys)
        entry.usage = take_usage(hop)
        if undoing is not None:
            undoing.usage = entry.usage  # a compensation's entry is not logged: its record keeps what it used
        entry.approvals = hop.approvals  # who approved what this step ran, in the signed log
        entry.version = hop.version
        if undoing is None and hop.spec.compensate is not None:
            slip.compensations.append(
                Compensation(
                    step=entry.step,
                    activity=entry.name,
                    compensate=hop.spec.compensate,
                    idempotency_key=key,
                    output=outcome.update,
                    transport=ran_on,
                )
            )
        fanned = await _publish_next(message, deps)
    await _report_step_done(message, entry, deps, hop.record)  # the step, then the group it led to, if one
    await _report_fanned_out(message, fanned, deps)
    await deps.dedupe.mark_done(key)


async def _publish_next(message: PaigeantMessage, deps: SettleDeps) -> str | None:
    if message.routing_slip.is_complete:
        # A finished workflow's result goes out in its `completed` event: it must be one a hop could carry.
        size = len(unsigned_body(message))
        if size > deps.max_message_bytes:
            raise too_large(size, deps.max_message_bytes)
        return None
    return await _publish_hop(message, deps)


async def _report_step_done(
    message: PaigeantMessage, entry: ActivityLogEntry, deps: SettleDeps, record: StepRecord | None = None
) -> None:
    """Report the completed step (with what its agent saw and produced, `record`); a workflow's last step reports
    its result, safely published before the ack, so that a crash in between runs the last step again rather than
    losing the result."""
    slip = message.routing_slip
    finished = slip.is_complete
    fields: dict[str, Any] = {"activity": entry.name, "step": entry.step, "attempt": entry.attempt}
    if entry.version is not None:
        fields["version"] = entry.version
    if slip.unwinding is not None:
        deps.stats.compensated += 1
        undone = next(record for record in slip.compensations if record.step == entry.step)
        fields["undoes"] = undone.activity
        await deps.reporter.report("step_completed", message, duration=entry.duration, at=entry.finished_at, **fields)
        if finished and slip.unwinding.late_branch is None:  # a late branch's undoing ends with its one step
            detail = f"{_undone(slip.compensations)}; {slip.unwinding.cause}: {slip.unwinding.reason}"
            await deps.reporter.report("compensated", message, detail=detail, payload=dict(message.payload), now=True)
        return
    deps.stats.completed_steps += 1  # counted first, so that a callback reading the stats sees this step
    deps.stats.completed_workflows += finished
    if record is not None:
        fields["record"] = record
    await deps.reporter.report("step_completed", message, duration=entry.duration, at=entry.finished_at, **fields)
    if finished:
        detail = entry.error if entry.outcome == "ended" else None
        fields.pop("record", None)  # the step's event has it
        await deps.reporter.report(
            "completed", message, detail=detail, payload=dict(message.payload), now=True, **fields
        )


async def _apply_revisions(hop: Hop, deps: SettleDeps) -> None:
    """Log the route changes the step made in the slip, signed and checked against the workflow's plan, so the
    message goes to the revised next step."""
    if hop.ctx is not None and hop.ctx.revisions:
        revise_route(hop.message, hop.ctx.revisions, deps.security)
        for revision in hop.ctx.revisions:
            await deps.reporter.report("revised", hop.message, detail=revision.summary)


async def _park(hop: Hop, outcome: Park, store: WaitingStore, deps: SettleDeps) -> str:
    """Store the step with what it waits for (`WorkflowDispatcher.resume` publishes it again); what it waits for."""
    await _apply_revisions(hop, deps)
    carry_usage(hop)  # the resumed run's entry takes it on
    subject = hop.claims.get("sub") if hop.claims is not None else None
    parked = ParkedStep.from_signal(
        hop.message, outcome.signal, obo_subject=subject if isinstance(subject, str) else None
    )
    parked.transport = deps.routes.own_name  # a resume or a cancel sends it back here, where it ran
    # The resume, however late, continues this hop's trace.
    parked.message.headers = observability.inject_context(parked.message.headers, hop.message.correlation_id)
    await store.put(parked.sign(deps.security))  # signed at rest: nothing acts on it unless it verifies
    return parked.describe()


async def _park_again(hop: Hop, outcome: Retry, store: WaitingStore, deps: SettleDeps) -> Park:
    """Park a resumed step that failed where it waited before: the record it was resumed from, signed anew, so that
    it needs new answers (and its resume a new id); how it is parked."""
    resume = hop.message.resume
    assert resume is not None
    assert resume.parked is not None
    previous = ParkedStep.model_validate(resume.parked, context=FROM_WIRE)  # verified when the hop was authorized
    parked = previous.model_copy(update={"parked_at": datetime.now(UTC), "proof": None})
    carry_usage(hop)  # what the failed run used is carried with the earlier runs', for the step's entry
    parked.message.routing_slip.carried_usage = hop.message.routing_slip.carried_usage
    await store.put(parked.sign(deps.security))
    detail = f"{parked.describe()} again: the resumed step failed ({outcome.reason}) and its answers are used once"
    return Park(ParkWorkflow(ConversationTypeAdapter.validate_python(parked.conversation)), detail=detail)


async def _publish_retry(hop: Hop, outcome: Retry, deps: SettleDeps) -> Retry:
    """Publish the next attempt; the retry with the delay it was given."""
    policy = hop.spec.retry or RetryPolicy()
    delay = policy.delay_before(outcome.attempt, deps.rng) if outcome.delay is None else outcome.delay
    carry_usage(hop)  # the next attempt carries what this one used, for the step's entry
    retry = hop.message.next_hop(attempt=outcome.attempt)
    deps.routes.stamp(retry, deps.transport)  # the step's transport, where it arrived
    body = seal(retry, deps.security, max_bytes=deps.max_message_bytes)
    await deps.transport.publish(hop.delivery.address, body, headers=dict(retry.headers), delay=delay)
    return replace(outcome, delay=delay)


async def _publish_fault(hop: Hop, outcome: Fault, deps: SettleDeps) -> str | None:
    """Log the failure in the slip and publish the copy for the dead-letter queue; the reason to dead-letter the
    delivery as it arrived instead, when the copy cannot be sent."""
    message = hop.message
    entry = message.routing_slip.mark_failed(
        hop.spec.name, attempt=message.attempt, started_at=hop.started, error=outcome.reason
    )
    entry.usage = take_usage(hop)
    entry.version = hop.version
    detail = _fault_detail(hop, outcome)
    headers = {**message.headers, REASON_HEADER: detail[:2000], SOURCE_HEADER: hop.delivery.address}
    copy = message.next_hop(attempt=message.attempt)
    try:
        body = seal(copy, deps.security, max_bytes=deps.max_message_bytes)  # a replay continues this hop's trace
    except (MessageTooLarge, NonFiniteNumber) as exc:
        # The failed step's log entry tipped it over (or it carries what cannot be sent): keep the bytes as they
        # arrived instead, with the reason, so that nothing is lost.
        logger.warning("dead-lettering %s as it arrived: %s", escape_control(message.correlation_id), exc)
        return detail[:2000]
    await deps.transport.publish(DEAD_LETTER, body, headers=headers)
    return None


def _fault_detail(hop: Hop, outcome: Fault) -> str:
    return escape_control(f"step {hop.spec.name!r} failed: {outcome.reason}")


def _undone(records: list[Compensation]) -> str:
    names = ", ".join(f"{record.activity} (by {record.compensate})" for record in reversed(records))
    return f"undid {names}" if names else "nothing to undo"


async def _report(hop: Hop, outcome: _Settled, deps: SettleDeps) -> None:
    """Count and report a settled hop (a completed step was reported before its ack)."""
    message, stats, report = hop.message, deps.stats, deps.reporter.report
    undoing = message.routing_slip.undoing
    match outcome:
        case _FellBack():
            stats.fell_back += 1
            failed = message.routing_slip.completed[-1]
            detail = f"{outcome.reason}; falling back to {outcome.to!r}"
            await report("step_failed", message, activity=failed.name, attempt=failed.attempt, detail=detail)
        case _Stopped() if not outcome.pending:  # with compensations to run, reported before the first was sent
            await _report_stopped(hop, outcome, deps)
        case Fault() if undoing is not None:
            stats.faulted += 1
            detail = _fault_detail(hop, outcome)
            logger.warning("a compensation of %s failed: %s", escape_control(message.correlation_id), detail)
            fields: dict[str, Any] = {"activity": hop.spec.name, "step": undoing.step, "undoes": undoing.activity}
            await report("step_failed", message, detail=outcome.reason, **fields)
            await report("compensation_failed", message, detail=detail, **fields)
        case Park():
            stats.parked += 1
            kind = "in_doubt" if isinstance(outcome.signal, StepInDoubt) else "waiting"
            kind = "budget_exhausted" if isinstance(outcome.signal, BudgetExhausted) else kind
            await report(kind, message, detail=outcome.detail)
        case Retry():
            stats.retried += 1
            delay = outcome.delay or 0.0
            await report(
                "step_retried", message, detail=f"{outcome.reason}; attempt {outcome.attempt + 1} in {delay:.2f}s"
            )
        case Fault():
            stats.faulted += 1
            detail = _fault_detail(hop, outcome)
            logger.warning("workflow %s faulted: %s", escape_control(message.correlation_id), detail)
            await report("step_failed", message, activity=hop.spec.name, detail=outcome.reason)
            await report("faulted", message, activity=hop.spec.name, detail=detail)
        case Skip():
            stats.duplicates += 1
            cid = escape_control(message.correlation_id)
            logger.info("step %s of %s %s; skipping it", hop.delivery.address, cid, outcome.reason)
            await report("step_skipped", message, detail=outcome.reason)
        case Advance() | End() | Reject() | Halt() | _Stopped():
            pass


async def _report_stopped(hop: Hop, stopped: _Stopped, deps: SettleDeps) -> None:
    message, report, unwinding = hop.message, deps.reporter.report, stopped.unwinding
    stats = deps.stats
    # Dated when the workflow stopped, before its first compensation was sent: another worker may run that and
    # report it before these are, and the store orders events by when they happened.
    fields: dict[str, Any] = {"activity": hop.spec.name, "step": unwinding.step, "at": unwinding.at}
    if stopped.failed is not None:
        await report("step_failed", message, detail=stopped.failed, branch=stopped.branch, **fields)
    cid, now = escape_control(message.correlation_id), bool(stopped.pending)
    # With steps to undo, `compensating` goes first: whoever reads the status between the two events sees a workflow
    # being undone, never one that seems to have ended. The store orders them by rank (the cause, then the undoing).
    if stopped.pending:
        undoing = f"undoing {_undone(stopped.pending).removeprefix('undid ')}"
        await report("compensating", message, detail=undoing, now=True, **fields)
    if unwinding.cause == "faulted":
        stats.faulted += 1
        logger.warning("workflow %s faulted: %s", cid, unwinding.reason)
        await report("faulted", message, detail=unwinding.reason, now=now, **fields)
    elif unwinding.cause == "cancelled":
        stats.cancelled += 1
        logger.info("workflow %s %s", cid, escape_control(unwinding.reason))  # the reason says who cancelled it
        await report("cancelled", message, detail=unwinding.reason, by=unwinding.by, now=now, **fields)
    else:
        stats.expired += 1
        logger.info("workflow %s expired: %s", cid, unwinding.reason)
        await report("expired", message, detail=unwinding.reason, now=now, **fields)
