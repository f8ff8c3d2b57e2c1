"""The stage that keeps an at-most-once step from running twice blindly, and the resume that settles a doubt.

Before such a step runs, `AtMostOnce.run` writes its signed `StartRecord` where every replica sees it (the
transport's `SharedClaims`: this process for the in-memory transport, Redis on Redis, the shared store on
RabbitMQ), under the step's idempotency key and attempt, and waits for the store to confirm it. A copy that finds a
record (the broker's redelivery after a crash, a takeover, a replayed retry) does not run the step: the activity's
`reconcile` hook says whether it ran (`Ran(output)`: the step completes with that output) or not (`RunAgain()`: it
runs); without a hook, when the hook fails, or when the record does not verify, the workflow parks `in_doubt`
until a person answers `WorkflowDispatcher.resume(cid, in_doubt=Ran(output) | RunAgain())`, with a key that holds
`approve`. A step that raised is not in doubt: its retry is another attempt, with a record of its own.

Once the step settled (its successor safe, its key done) its record is released; one left by a crash expires.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from pydantic_ai import DeferredToolResults
from pydantic_core import PydanticSerializationError, to_jsonable_python

from . import observability
from ._escape import escape_control
from ._hop import Hop
from ._in_doubt import DECISION_TYPE, DoubtDecision, InDoubt, Ran, RunAgain, SignedDecision, StartRecord, StepInDoubt
from ._outcome import Fault, Outcome, Park, Retry, completed, describe
from ._wire import FROM_WIRE
from .activity import DEFAULT_TIMEOUT, Activity, ActivityContext, to_payload_update
from .approval import ParkedStep
from .exceptions import NonRetryableError, RetryActivity, SecurityError, TransportError, UserError
from .security import own_kid
from .transports.base import SharedClaims, SharedStores, Transport

if TYPE_CHECKING:
    from ._events import EventReporter
    from .approval import WaitingStore
    from .dispatch import WorkflowDispatcher
    from .security import MessageSecurity

__all__ = ("START_RECORD_TTL", "AtMostOnce", "check_decision", "resume_in_doubt")

logger = logging.getLogger("paigeant_ai.worker")

START_RECORD_TTL = 7 * 24 * 3600.0
"""Seconds a start record outlives a crash: a copy redelivered later than that runs as if none was found."""

NO_SHARED_STORE = (
    "activities {names} are at-most-once, and on {transport} this worker could not tell a crashed replica's step "
    "from a new one: point every replica at one Redis with PAIGEANT_SHARED_STORE_URL=redis://... "
    "(or Worker(shared_store=...))"
)


class AtMostOnce:
    """The worker's stage for at-most-once steps (see the module's docstring); other steps pass through.

    Args:
        claims: Where start records are kept; None when the worker runs no at-most-once step.
        security: Signs and verifies start records.
        reporter: Reports `reconciled` and `in_doubt` steps.
    """

    def __init__(self, claims: SharedClaims | None, security: MessageSecurity, reporter: EventReporter) -> None:
        self.claims = claims
        self.security = security
        self.reporter = reporter
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.ttl = START_RECORD_TTL
        self._held: dict[int, tuple[str, str]] = {}
        """The record each running hop holds (by `id(hop)`), released once the hop settled."""

    @classmethod
    def for_worker(
        cls,
        transport: Transport,
        shared: SharedStores | None,
        activities: Mapping[str, Activity],
        security: MessageSecurity,
        reporter: EventReporter,
        waiting_store: WaitingStore | None,
    ) -> tuple[AtMostOnce, WaitingStore | None]:
        """The stage of a worker on `transport` with `shared` stores, and the waiting store the worker parks in:
        `waiting_store`, else, with at-most-once steps, the shared store's.

        Raises:
            UserError: An activity is at-most-once and no store every replica shares can keep start records, or
                no waiting store can hold the steps in doubt.
        """
        names = [name for name, act in activities.items() if act.spec.at_most_once]
        if not names:
            return cls(None, security, reporter), waiting_store
        claims = shared if isinstance(shared, SharedClaims) else None
        if claims is None and transport.process_local and isinstance(transport, SharedClaims):
            claims = transport  # nothing outside this process runs its steps
        if claims is None:
            raise UserError(NO_SHARED_STORE.format(names=", ".join(map(repr, names)), transport=transport.name))
        if waiting_store is None and shared is not None:
            waiting_store = shared.waiting_store()
        if waiting_store is None:
            raise UserError(
                f"activities {', '.join(map(repr, names))} are at-most-once and park in doubt after a crash: pass "
                "Worker(waiting_store=...), the store the dispatcher that resumes them reads"
            )
        return cls(claims, security, reporter), waiting_store

    async def run(self, hop: Hop, run: Callable[[Hop], Awaitable[Outcome]], max_bytes: int) -> Outcome:
        """What the step of `hop` comes to: run by `run` once its start record is safe, reconciled, or in doubt."""
        if self.claims is None or not hop.activity.spec.at_most_once:
            return await run(hop)
        decision = _decision_of(hop)
        if decision is not None:
            hop.message.resume = None  # settled as a fresh step from here: a failure retries as any step does
            if decision.decision == "ran":
                return await self._reconciled(hop, Ran(decision.output), "declared run", max_bytes)
            # Run again: as a fresh copy, under a start record of its own (the one in doubt went when it parked), so
            # that a crash of this run is in doubt too.
        key = StartRecord.key(hop.message.idempotency_key, hop.message.attempt)
        found = await self._claim(hop, key)
        if found is None:
            return await self._run_once(hop, run, max_bytes)
        try:
            started = StartRecord.verified(
                found, self.security, idempotency_key=hop.message.idempotency_key, attempt=hop.message.attempt
            )
        except SecurityError as exc:
            return self._in_doubt(hop, None, str(exc))
        return await self._reconcile(hop, key, (found, started), run, max_bytes)

    async def settled(self, hop: Hop) -> None:
        """Release the start record `hop` held, now that the step settled; one that cannot be released expires."""
        held = self._held.pop(id(hop), None)
        if held is None or self.claims is None:
            return
        try:
            await self.claims.release(*held)
        except TransportError:
            logger.warning("could not release the start record %s; it expires", escape_control(held[0]), exc_info=True)

    def forget(self, hop: Hop) -> None:
        """Drop what `hop` held without releasing it (it did not settle: its record stays for the next copy)."""
        self._held.pop(id(hop), None)

    async def _claim(self, hop: Hop, key: str) -> str | None:
        """Write the step's start record under `key` unless one is there; None once it is written, else the one
        found (either is released once the hop settled: a doubt lives on in the parked record)."""
        assert self.claims is not None
        record = self._record(hop)
        found = await self.claims.claim(key, record, ttl=self.ttl)
        self._held[id(hop)] = (key, record if found is None else found)
        return found

    async def _run_once(self, hop: Hop, run: Callable[[Hop], Awaitable[Outcome]], max_bytes: int) -> Outcome:
        """Run the step under its start record. A failure that leaves open whether it had its effect (a timeout,
        or any error but `RetryActivity` and `NonRetryableError`, by which the activity says it did not) is not
        retried blindly: the reconcile hook says whether it ran, else the step is in doubt."""
        outcome = await run(hop)
        if not isinstance(outcome, Retry | Fault) or not _may_have_run(hop.raised):
            return outcome
        answer = await self._ask(hop)
        if isinstance(answer, Ran):
            return await self._reconciled(hop, answer, "reconciled", max_bytes)
        if isinstance(answer, RunAgain):
            return outcome  # the hook found it did not run: retried (or failed) as any step
        held = self._held.get(id(hop))
        started = _own_record(held[1], hop, self.security) if held is not None else None
        return self._in_doubt(hop, started, f"it failed after it started ({outcome.reason}), and {answer}")

    async def _ask(self, hop: Hop) -> Ran | RunAgain | str:
        """The activity's reconcile hook's answer to whether the step ran; else why there is none."""
        reconcile = getattr(hop.activity, "reconcile", None)
        if reconcile is None:
            return "it has no reconcile hook"
        ctx = ActivityContext(message=hop.message, spec=hop.spec, obo_claims=hop.claims)
        try:
            async with asyncio.timeout(hop.spec.timeout or DEFAULT_TIMEOUT):
                answer: Any = reconcile(ctx)
                if inspect.isawaitable(answer):
                    answer = await answer
        except Exception as exc:
            return f"its reconcile hook failed: {describe(exc)}"
        if isinstance(answer, Ran | RunAgain):
            return answer
        return f"its reconcile hook returned {type(answer).__name__}, not Ran(output) or RunAgain()"

    async def _reconcile(
        self,
        hop: Hop,
        key: str,
        found: tuple[str, StartRecord],
        run: Callable[[Hop], Awaitable[Outcome]],
        max_bytes: int,
    ) -> Outcome:
        """Ask the activity's hook whether the step whose start record was `found` ran; act on the answer."""
        raw, started = found
        answer = await self._ask(hop)
        if isinstance(answer, Ran):
            return await self._reconciled(hop, answer, "reconciled", max_bytes)
        if not isinstance(answer, RunAgain):
            return self._in_doubt(hop, started, f"a copy of it started and did not finish, and {answer}")
        logger.info("step %s of %s reconciled as not run; running it", hop.spec.name, _cid(hop))
        assert self.claims is not None
        await self.claims.release(key, raw)  # that very record only: a newer one is another copy's
        if await self._claim(hop, key) is not None:
            return self._in_doubt(hop, None, "another copy of the step started it while this one reconciled it")
        return await self._run_once(hop, run, max_bytes)

    async def _reconciled(self, hop: Hop, answer: Ran, how: str, max_bytes: int) -> Outcome:
        """The step completes with `answer.output`, without running."""
        output_key = getattr(hop.activity, "output_key", hop.spec.name)
        try:
            update = to_payload_update(answer.output, output_key if isinstance(output_key, str) else "", hop.spec.name)
        except Exception as exc:
            return Fault(f"its {how} output is not a step output: {describe(exc)}")
        outcome = completed(update, hop.spec, len(hop.delivery.body), max_bytes)
        detail = f"step {hop.spec.name!r} {how}: completed without running it again"
        logger.info("%s of %s", detail, _cid(hop))
        await self.reporter.report("reconciled", hop.message, detail=detail)
        return outcome

    def _in_doubt(self, hop: Hop, started: StartRecord | None, reason: str) -> Park:
        doubt = InDoubt(
            idempotency_key=hop.message.idempotency_key,
            attempt=hop.message.attempt,
            started_at=started.started_at if started is not None else None,
            started_by=started.worker if started is not None else None,
            reason=reason,
        )
        logger.warning("step %s of %s is in doubt: %s", hop.spec.name, _cid(hop), escape_control(reason))
        return Park(StepInDoubt(doubt))

    def _record(self, hop: Hop) -> str:
        message = hop.message
        record = StartRecord(
            correlation_id=message.correlation_id,
            activity=message.routing_slip.current or hop.spec.name,
            step=message.step,
            idempotency_key=message.idempotency_key,
            attempt=message.attempt,
            worker=self.worker,
        )
        return record.sign(self.security).encode()


def _may_have_run(raised: BaseException | None) -> bool:
    """Whether a step that raised `raised` may have had its effect: unless the activity said it did not."""
    return raised is not None and not isinstance(raised, RetryActivity | NonRetryableError)


def _own_record(raw: str, hop: Hop, security: MessageSecurity) -> StartRecord | None:
    try:
        return StartRecord.verified(
            raw, security, idempotency_key=hop.message.idempotency_key, attempt=hop.message.attempt
        )
    except SecurityError:
        return None


def _cid(hop: Hop) -> str:
    return escape_control(hop.message.correlation_id)


def _decision_of(hop: Hop) -> DoubtDecision | None:
    """The decision a resume of an in-doubt step carries (verified when the hop was authorized), if it is one."""
    resume = hop.message.resume
    if resume is None or resume.parked is None or resume.parked.get("in_doubt") is None or not resume.approvals:
        return None
    return SignedDecision.model_validate(resume.approvals[0], context=FROM_WIRE).decision


# -- the worker's check of the resume ----------------------------------------------------------------------------


def check_decision(parked: ParkedStep, raw: list[dict[str, Any]], security: MessageSecurity) -> list[str]:
    """Verify the decision a resume of the in-doubt `parked` carries; its line for the audit trail.

    Raises:
        SecurityError: There is not exactly one, it is not signed by a key that may approve, or it is for another
            parked step.
    """
    if len(raw) != 1:
        raise SecurityError("a resume of an in-doubt step carries one decision", code="resume_answers")
    try:
        item = SignedDecision.model_validate(raw[0], context=FROM_WIRE)
    except ValidationError:
        raise SecurityError("the decision on the in-doubt step is malformed", code="approval_invalid") from None
    what = f"the decision on in-doubt step {parked.activity!r}"
    try:
        kid = security.verify_bytes(item.proof, item.signed_bytes(), typ=DECISION_TYPE)
        security.policy.require(kid, "approve", "settle in-doubt steps")
    except SecurityError as exc:
        raise SecurityError(f"{what} is refused: {exc}", code=exc.code) from None
    decision = item.decision
    if (decision.correlation_id, decision.step, decision.activity, decision.parked_digest) != (
        parked.correlation_id,
        parked.step,
        parked.activity,
        parked.digest,
    ):
        raise SecurityError(f"{what} is for another parked step", code="approval_mismatch")
    named = decision.approver or kid or "unknown"
    who = f"{named} (key {kid})" if kid is not None and named != kid else named
    line = decision.describe(who)
    logger.info("workflow %s: %s", escape_control(parked.correlation_id), escape_control(line))
    return [line]


# -- the resuming side -------------------------------------------------------------------------------------------


async def resume_in_doubt(
    dispatcher: WorkflowDispatcher,
    parked: ParkedStep,
    answer: Ran | RunAgain | None,
    *,
    approver: str | None,
    obo_token: str | None,
) -> None:
    """Publish the resume of the in-doubt `parked` with the signed `answer` (see `WorkflowDispatcher.resume`).

    Raises:
        UserError: The workflow is not in doubt, or no answer, approver or fresh token is given, or this service's
            key may not approve.
    """
    cid = parked.correlation_id
    if parked.in_doubt is None or answer is None:
        state = "waits for tool calls, not" if parked.in_doubt is None else "is in doubt and needs"
        raise UserError(
            f"workflow {cid!r} {state} an answer on whether its step ran: "
            + (
                "resume it with approvals or calls"
                if parked.in_doubt is None
                else "pass in_doubt=Ran(output) or in_doubt=RunAgain()"
            )
        )
    security = dispatcher.security
    kid = own_kid(security)
    if approver is None:
        raise UserError(f"resuming in-doubt workflow {cid!r}: say who decides with approver='<their identity>'")
    if kid is not None and not security.policy.allows(kid, "approve"):
        raise UserError(
            f"this service's key {kid!r} may not settle in-doubt steps: grant it 'approve' in the trust policy"
        )
    if parked.obo_required and obo_token is None:
        raise UserError(
            f"workflow {cid!r} runs on behalf of a user and its parked record keeps no token: pass obo_token=<a fresh "
            "token of that user>"
        )
    decision = DoubtDecision(
        correlation_id=cid,
        step=parked.step,
        activity=parked.activity,
        parked_digest=parked.digest,
        decision="ran" if isinstance(answer, Ran) else "run_again",
        output=_json_output(answer),
        approver=approver,
    )
    item = SignedDecision(decision=decision)
    item.proof = security.sign_bytes(item.signed_bytes(), typ=DECISION_TYPE)
    message = parked.resume_message(DeferredToolResults(), [item.model_dump(mode="json")], obo_token=obo_token)
    with observability.replay_span(message, dispatcher.transport.name, operation="resume"):
        transport = await dispatcher.parked_on(parked, message)  # where the step parked
        await transport.publish(parked.activity, dispatcher.encode(message), headers=dict(message.headers))
    await dispatcher.reporter.report("resumed", message, detail=decision.describe(approver))


def _json_output(answer: Ran | RunAgain) -> Any:
    if not isinstance(answer, Ran):
        return None
    try:
        output = to_jsonable_python(answer.output)
        json.dumps(output, allow_nan=False)
    except PydanticSerializationError as exc:
        raise UserError(f"Ran(output) must be JSON: a mapping, a pydantic model or a JSON value ({exc})") from None
    except ValueError:
        raise UserError("Ran(output) must be finite JSON: replace NaN and infinity (JSON has neither)") from None
    return output
