"""Parallel groups on their way through workers: the fan-out, the join, and a group that fails.

- Fan-out (`fan_out`): the step before a group (or the dispatcher, for a group that starts a workflow) sends one hop
  per branch, each to its activity's queue; the slip's `branch` says which branch a hop is, and its id is derived
  from the group's step and the branch key, so each branch is claimed, retried and deduplicated on its own.
- Join (`complete_branch`): a branch that completes stores its signed `BranchResult` in the join store (see
  `paigeant_ai._join`), atomically with a count. The worker whose store brings the count to the number of branches
  (the count, not "it added the last new field": a redelivered last branch joins again a join lost to a crash),
  and finds a result for every branch, verifies every one, merges each branch's output into the payload under its
  key, logs the group as one entry (each branch's log inside it) and publishes one continuation. The
  continuation's id is derived like every hop's, so a second joiner's copy is skipped as a duplicate. The group
  is forgotten once its continuation is safe.
- Failure (`stop_group`): a branch that fails for good (its retries and fallbacks spent), or is stopped by a cancel
  or the workflow's deadline, marks its group failed, atomically; the first one to do so takes the compensations of
  the branches that completed into its slip, and the workflow unwinds from there (latest first). A branch that
  completes after its group failed is not joined: its own compensation runs (`undo_late_branch`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ._budget_probe import first_branches, next_wave, wave_done
from ._escape import escape_control
from ._group_marks import GroupMark, read_mark
from ._hop import EXPIRY_GRACE, Hop
from ._join import NO_JOIN_STORE, BranchResult, JoinStore
from ._ledger import by_model, take_usage, workflow_usage
from ._outcome import Advance, End, Reject
from ._plan import begin_unwinding
from ._sealing import seal
from ._usage import sum_usage
from ._wire import utcnow
from .contracts import ActivityLogEntry, ActivitySpec, Compensation, PaigeantMessage, RoutingSlip, Unwinding
from .exceptions import SecurityError

logger = logging.getLogger("paigeant_ai.worker")

if TYPE_CHECKING:
    from ._settle import SettleDeps

__all__ = (
    "Joined",
    "branch_hops",
    "branch_refusal",
    "complete_branch",
    "describe_fan_out",
    "fan_out",
    "fans_out",
    "parks_alone",
    "refuse_without_join",
    "stop_group",
)

JOIN_TTL = timedelta(days=7)
"""How long a failed group of a workflow without a deadline is kept (for its late branches). Its results are kept
until it is joined: however long a branch takes, or waits for approval, its siblings' results are still there."""


@dataclass(frozen=True, slots=True)
class Joined:
    """A group whose branches all completed: the continuation to send, and the group's log entry."""

    message: PaigeantMessage
    entry: ActivityLogEntry
    group: str


def fans_out(message: PaigeantMessage) -> bool:
    """Whether `message`'s next step is a parallel group, to be sent as one hop per branch."""
    slip = message.routing_slip
    first = slip.itinerary[0] if slip.itinerary else None
    return first is not None and bool(first.branches) and slip.branch is None and slip.unwinding is None


def branch_hops(message: PaigeantMessage) -> list[PaigeantMessage]:
    """The first hop of each branch of the group `message` has reached, unsigned."""
    slip = message.routing_slip
    hops: list[PaigeantMessage] = []
    for spec in slip.itinerary[0].branches:
        branch = slip.model_copy(update={"branch": spec.branch_key, "current": spec.name})
        hops.append(message.model_copy(update={"routing_slip": branch}).next_hop())
    return hops


async def fan_out(message: PaigeantMessage, deps: SettleDeps) -> str:
    """Send the first hop of each branch of the group `message` has reached, each confirmed by the transport; what
    its `fanned_out` event says (reported by the caller, after the step that led to the group)."""
    hops = first_branches(message, branch_hops(message))  # the first alone, under a budget with no estimate
    await _send_all(hops, deps)
    return describe_fan_out(hops)


def describe_fan_out(hops: list[PaigeantMessage]) -> str:
    """What a `fanned_out` event says: the branches sent, by key and activity."""
    sent = ", ".join(f"{hop.routing_slip.branch} ({hop.routing_slip.current})" for hop in hops)
    return f"{len(hops)} branches: {sent}"


def refuse_without_join(hop: Hop, joins: JoinStore | None) -> Hop | Reject:
    """The hop, unless it is a branch's and this worker has no join store to meet the other branches in."""
    if hop.message.routing_slip.branch is not None and joins is None:
        return Reject(NO_JOIN_STORE)
    return hop


def branch_refusal(hop: Hop, outcome: Advance | End) -> str | None:
    """Why a branch's outcome cannot stand, if it cannot: a branch neither ends nor revises its workflow."""
    if isinstance(outcome, End):
        return f"a branch of a parallel group cannot end its workflow ({outcome.reason})"
    if hop.ctx is not None and hop.ctx.revisions:
        return "a branch of a parallel group cannot revise its workflow's route; revise it from a step after the group"
    return None


async def parks_alone(hop: Hop, deps: SettleDeps) -> str | None:
    """Why a branch cannot park (wait for approval, or be in doubt), if it cannot: one branch of a group parks at a
    time, as a workflow has one parked step; a second branch that would park fails its group instead."""
    message = hop.message
    key = message.routing_slip.branch
    if key is None or deps.joins is None:
        return None
    group, group_id = _group_of(message)
    holder = await deps.joins.hold_wait(group_id, key, ttl=_ttl(message))
    if holder == key:
        return None
    return (
        f"branch {key!r} of {group.name!r} would wait while branch {holder!r} waits, and only one branch of a group "
        "may wait at a time: approve or resolve that one first, or move one of the two steps out of the group"
    )


def _group_of(message: PaigeantMessage) -> tuple[ActivitySpec, str]:
    slip = message.routing_slip
    return slip.itinerary[0], f"{message.correlation_id}/{slip.step}"


def _ttl(message: PaigeantMessage) -> float:
    if message.expires_at is None:
        return JOIN_TTL.total_seconds()
    left = message.expires_at - utcnow() + EXPIRY_GRACE
    return max(left.total_seconds(), 60.0)


def _result(hop: Hop, outcome: Advance, ran_on: str | None) -> BranchResult:
    message = hop.message
    slip = message.routing_slip
    key = slip.branch
    assert key is not None
    entry = ActivityLogEntry(
        name=hop.spec.name,
        step=slip.step,
        attempt=message.attempt,
        started_at=hop.started,
        finished_at=utcnow(),
        output_keys=[key],
        approvals=hop.approvals,
        branch=key,
        usage=take_usage(hop),
        version=hop.version,
    )
    compensation = None
    if hop.spec.compensate is not None:
        compensation = Compensation(
            step=slip.step,
            activity=hop.spec.name,
            compensate=hop.spec.compensate,
            idempotency_key=message.idempotency_key,
            output=outcome.update,
            branch=key,
            transport=ran_on,
        )
    entries = [*(logged for logged in slip.completed if logged.branch == key), entry]
    return BranchResult(
        correlation_id=message.correlation_id,
        step=slip.step,
        key=key,
        entries=entries,
        output=outcome.update,
        compensation=compensation,
    )


async def complete_branch(hop: Hop, outcome: Advance, deps: SettleDeps) -> Joined | None:
    """Store the result of a branch that completed; the group's continuation if this result completes the group.

    A branch whose group failed meanwhile is undone instead (its compensation is sent), never joined.

    Raises:
        SecurityError: A result in the join store does not verify (code `branch_result`).
    """
    joins = deps.joins
    assert joins is not None  # a branch's hop is refused by a worker without a join store
    message = hop.message
    group, group_id = _group_of(message)
    result = _result(hop, outcome, deps.routes.own_name).sign(deps.security)  # undone where it ran
    if message.resume is not None or message.budget_extensions:  # resumed: it may have held its group's wait
        await joins.release_wait(group_id, result.key)
    keep = _ttl(message) if message.expires_at is not None else 0.0
    count, mark = await joins.add(group_id, result.key, result.model_dump_json().encode(), ttl=keep)
    failed = read_mark(mark, deps.security, correlation_id=message.correlation_id, step=message.step)
    if failed is not None and failed.key == result.key:  # it failed the group, then its worker died: redelivered
        await _unwind_again(hop, deps)
        return None
    if failed is not None:
        await _undo_late_branch(hop, result, deps)
        return None
    entry = result.entries[-1]
    fields: dict[str, Any] = {
        "activity": entry.name,
        "attempt": entry.attempt,
        "detail": f"branch {result.key!r} of {group.name!r}",
    }
    if entry.usage:  # its slip no longer carries it: the totals so far are its slip's and its own
        used = [workflow_usage(message), *entry.usage]
        fields["usage"] = sum_usage(usage for usage in used if not usage.is_empty)
    if hop.record is not None:
        fields["record"] = hop.record
    await deps.reporter.report("step_completed", message, duration=entry.duration, at=entry.finished_at, **fields)
    deps.stats.completed_steps += 1
    records = await joins.records(group_id) if count < len(group.branches) else {}
    if records and wave_done(message, records):  # under a budget: the branches it pays for next (see `_budget_probe`)
        ran = [
            _load(records[spec.branch_key], spec, message, deps)
            for spec in group.branches
            if spec.branch_key in records
        ]
        await _send_all(next_wave(message, ran), deps)
    if count < len(group.branches):  # more than that: someone wrote other fields, which are not joined
        return None
    records = await joins.records(group_id)
    if any(spec.branch_key not in records for spec in group.branches):
        return None  # not every branch is there yet: the last one to store its result joins the group
    continuation, joined = _join(message, group, _verified(records, message, group, deps))
    keys = ", ".join(joined.output_keys)
    detail = f"{len(group.branches)} branches merged: {keys}"
    await deps.reporter.report("joined", continuation, step=joined.step, activity=group.name, detail=detail)
    return Joined(continuation, joined, group_id)


async def _send_all(hops: list[PaigeantMessage], deps: SettleDeps) -> None:
    for hop in hops:
        deps.routes.stamp(hop, deps.transport)  # a group runs where it was reached
        body = seal(hop, deps.security, max_bytes=deps.max_message_bytes)
        await deps.transport.publish(hop.routing_slip.current or "", body, headers=dict(hop.headers))


def _verified(
    records: dict[str, bytes], message: PaigeantMessage, group: ActivitySpec, deps: SettleDeps
) -> list[BranchResult]:
    """The results of every branch of `group`, each verified, in the group's order."""
    return [_load(records[spec.branch_key], spec, message, deps) for spec in group.branches]


def _load(raw: bytes, spec: ActivitySpec, message: PaigeantMessage, deps: SettleDeps) -> BranchResult:
    """The stored result of branch `spec` of `message`'s group, once its signature, its place and what ran it hold.

    Raises:
        SecurityError: It does not verify, or names an activity that cannot run that branch.
    """
    result = BranchResult.load(
        raw, deps.security, correlation_id=message.correlation_id, step=message.step, key=spec.branch_key
    )
    if result.entries[-1].name not in spec.alternatives:
        raise SecurityError(
            f"branch_result: branch {spec.branch_key!r} says {result.entries[-1].name!r} ran it, which it cannot",
            code="branch_result",
        )
    return result


def _by_completion(results: list[BranchResult]) -> list[Compensation]:
    done = sorted(results, key=lambda result: (result.entries[-1].finished_at, result.key))
    return [result.compensation for result in done if result.compensation is not None]


def _join(
    message: PaigeantMessage, group: ActivitySpec, results: list[BranchResult]
) -> tuple[PaigeantMessage, ActivityLogEntry]:
    """The continuation after `group`, built from the hop that joined it and the results of its branches alone
    (so any joiner builds the same), and the group's log entry."""
    slip = message.routing_slip
    entries = [entry for result in results for entry in result.entries]
    joined = ActivityLogEntry(
        name=group.name,
        step=slip.step,
        started_at=min(entry.started_at for entry in entries),
        finished_at=max(entry.finished_at for entry in entries),
        output_keys=[result.key for result in results],
        branches=entries,
    )
    completed = [*(entry for entry in slip.completed if entry.branch is None), joined]
    itinerary = slip.itinerary[1:]
    continued = slip.model_copy(
        update={
            "itinerary": itinerary,
            "completed": completed,
            "current": itinerary[0].name if itinerary else None,
            "compensations": [*slip.compensations, *_by_completion(results)],
            "branch": None,
        }
    )
    payload = {**message.payload, **{result.key: result.output for result in results}}
    continuation = message.model_copy(update={"routing_slip": continued, "payload": payload, "resume": None})
    return continuation, joined


async def stop_group(hop: Hop, deps: SettleDeps) -> bool:
    """Mark the group of a branch that stops the workflow (it failed for good, or was cancelled or expired) failed;
    whether this branch is the one that failed it, in which case the compensations of the branches that completed
    join its slip's, to be undone with the steps before the group. False: the group had failed already, so its
    workflow is being undone, and nothing more is done here. A stored result that does not verify is logged and
    left out: the other branches are undone.

    Raises:
        SecurityError: The group's failure mark does not verify, even once replaced (code `group_mark`).
    """
    joins = deps.joins
    assert joins is not None
    message = hop.message
    slip = message.routing_slip
    group, _ = _group_of(message)
    assert slip.branch is not None
    failer, records = await _failer(hop, deps)
    if failer != slip.branch:
        return False
    results = _loadable(records, message, group, deps)
    slip.compensations.extend(_by_completion(results))
    _carry_branches_usage(slip, [result for result in results if result.key != slip.branch])
    return True


def _carry_branches_usage(slip: RoutingSlip, results: list[BranchResult]) -> None:
    """Carry in the slip that undoes a group what its branches that completed used (their entries are not joined):
    the next entry or compensation record it logs keeps it, so the totals count it."""
    used = (usage for result in results for entry in result.entries for usage in entry.usage)
    slip.carried_usage = by_model([*slip.carried_usage, *used])


def _loadable(
    records: dict[str, bytes], message: PaigeantMessage, group: ActivitySpec, deps: SettleDeps
) -> list[BranchResult]:
    """The results of `group`'s branches in `records` that verify; each one that does not is logged and left out
    (that branch is not undone), so one bad record does not keep the others from being undone."""
    results: list[BranchResult] = []
    for spec in group.branches:
        if spec.branch_key not in records:
            continue
        try:
            results.append(_load(records[spec.branch_key], spec, message, deps))
        except SecurityError as exc:
            logger.warning(
                "workflow %s: %s; branch %r is not undone, the other branches are",
                escape_control(message.correlation_id),
                escape_control(str(exc)),
                spec.branch_key,
            )
    return results


async def _failer(hop: Hop, deps: SettleDeps) -> tuple[str, dict[str, bytes]]:
    """Mark the group of `hop`'s branch failed by it, unless a branch did already: the branch that failed it, and
    the results stored before the group was marked (a result stored after is undone by its own branch).

    A mark in the store that does not verify is never believed: this branch's own takes its place.

    Raises:
        SecurityError: The mark in the store still does not verify once replaced (code `group_mark`).
    """
    joins = deps.joins
    assert joins is not None
    message = hop.message
    slip = message.routing_slip
    assert slip.branch is not None
    _, group_id = _group_of(message)
    mine = GroupMark(correlation_id=message.correlation_id, step=slip.step, key=slip.branch).sign(deps.security)
    stored, records = await joins.fail(group_id, mine.to_bytes(), ttl=_ttl(message))
    mark = read_mark(stored, deps.security, correlation_id=message.correlation_id, step=slip.step)
    if mark is None:
        stored, records = await joins.replace_mark(group_id, stored, mine.to_bytes())
        mark = read_mark(stored, deps.security, correlation_id=message.correlation_id, step=slip.step)
    if mark is None:
        raise SecurityError(f"group_mark: the failure mark of group {group_id} does not verify", code="group_mark")
    return mark.key, records


async def _unwind_again(hop: Hop, deps: SettleDeps) -> None:
    """Undo the group of a branch that failed it before, whose worker died before it sent the undoing, and which
    completed once redelivered: the undoing is sent now, with every branch that completed (this one too)."""
    joins = deps.joins
    assert joins is not None
    message = hop.message
    slip = message.routing_slip
    group, group_id = _group_of(message)
    results = _loadable(await joins.records(group_id), message, group, deps)
    reason = f"branch {slip.branch!r} of {group.name!r} failed its group before; its group is undone"
    # It did complete: its row says so, and why it was not joined.
    await deps.reporter.report("step_completed", message, activity=hop.spec.name, detail=reason)
    slip.compensations.extend(_by_completion(results))
    slip.completed = [entry for entry in slip.completed if entry.branch is None]
    _carry_branches_usage(slip, results)
    if begin_unwinding(message, Unwinding(cause="faulted", reason=reason, step=slip.step, activity=hop.spec.name)):
        first = message.next_hop()
        transport = deps.routes.send_to(first)  # where the undone step ran
        body = seal(first, deps.security, max_bytes=deps.max_message_bytes)
        await transport.publish(first.routing_slip.current or "", body, headers=dict(first.headers))


async def _undo_late_branch(hop: Hop, result: BranchResult, deps: SettleDeps) -> None:
    """Undo a branch that completed after its group failed: its own compensation runs, if it has one.

    The steps before the group are undone by the unwinding its failure started; so this slip marks them undone
    and carries only the late branch's compensation to run.
    """
    message = hop.message
    slip = message.routing_slip
    group, _ = _group_of(message)
    reason = f"branch {result.key!r} of {group.name!r} completed after its group had failed"
    # It did complete: its row says so, and why it was not joined.
    await deps.reporter.report("step_completed", message, activity=hop.spec.name, detail=reason)
    if result.compensation is None:
        return
    now = utcnow()
    slip.compensations = [
        *(record.model_copy(update={"compensated_at": record.compensated_at or now}) for record in slip.compensations),
        result.compensation,
    ]
    slip.completed = [entry for entry in slip.completed if entry.branch is None]
    unwinding = Unwinding(
        cause="faulted", reason=reason, step=slip.step, activity=hop.spec.name, late_branch=result.key
    )
    begin_unwinding(message, unwinding)
    first = message.next_hop()
    transport = deps.routes.send_to(first)  # where the undone branch ran
    body = seal(first, deps.security, max_bytes=deps.max_message_bytes)
    await transport.publish(first.routing_slip.current or "", body, headers=dict(first.headers))
