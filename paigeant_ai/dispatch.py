"""`WorkflowDispatcher`: builds the first message of a workflow and publishes it to its first step, and resumes
workflows that wait for input.

How its arguments are checked, what makes a retry the same workflow, and the hint of a `NoWorker` are in
`paigeant_ai._dispatch_checks`; `to_spec` stays importable from here.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Self

from pydantic import ValidationError

from . import observability
from ._approvals import attested, describe, sign_approvals
from ._at_most_once import resume_in_doubt
from ._budget import checked_budget
from ._budget_probe import first_branches
from ._budget_resume import resume_with_budget
from ._cancel import CANCEL_TTL, Cancellation, CancelRequest, sign_cancel, unwind_parked
from ._dispatch_checks import require_workers, specs_of, variables_of, workflow_fingerprint
from ._dispatch_checks import to_spec as to_spec  # importable from here, as it always was
from ._events import EventCallback, EventReporter
from ._fan import branch_hops, describe_fan_out, fans_out
from ._hop import EXPIRY_GRACE
from ._in_doubt import Ran, RunAgain
from ._join import refuse_groups_without_join
from ._live_check import LiveCheck
from ._parallel import Parallel, refuse_shadowed_keys
from ._plan import new_plan, signer_of, token_subject
from ._principal import principal_of
from ._resume_checks import check_before_resume
from ._routes import Routes
from ._sealing import seal
from ._watch import WatchedEvent, watch_workflow
from .activity import Activity
from .approval import verified
from .contracts import ActivitySpec, Budget, PaigeantMessage, RevisionLimits, derive_message_id
from .exceptions import UnknownWorkflow, UserError, WorkflowExists
from .security import MessageSecurity, MessageSigner
from .settings import Settings
from .store import FINAL_STATES
from .transports.base import Advertising, Cancellations, SharedClaims, Transport

if TYPE_CHECKING:
    from pydantic_ai import DeferredToolResults

    from .approval import ApprovalAnswer, ParkedStep, WaitingStore
    from .store import WorkflowStore

__all__ = ("WorkflowDispatcher",)

logger = logging.getLogger("paigeant_ai.dispatch")


EventSink = EventCallback
"""A callback for events, sync or async."""

REMEMBERED_DISPATCHES = 10_000
"""Correlation IDs a dispatcher remembers in memory, with what it dispatched under them."""
CLAIM_TTL = 7 * 24 * 3600.0
"""Seconds a shared claim on a correlation ID lasts, at least (longer for workflows with a longer `ttl`)."""
_PENDING = "pending:"
"""The mark of a claim whose dispatch has not confirmed that its first message was sent."""


class WorkflowDispatcher:
    """Starts workflows: builds the routing slip and publishes the first message.

    Args:
        transport: A connected transport.
        max_message_bytes: The largest message it sends; defaults to `PAIGEANT_MAX_MESSAGE_BYTES` (1 MiB).
        ttl: Seconds after which an unfinished workflow's messages expire, which bounds how long a captured
            message could be replayed; defaults to `PAIGEANT_WORKFLOW_TTL` (7 days). `None` deliberately makes
            workflows that never expire (a warning says so): their hops are remembered for `PAIGEANT_REPLAY_TTL`.
        on_event: Called (sync or async) with the `dispatched` and `resumed` events.
        security: Signs the first message of each workflow; by default a `MessageSigner` with the signing key
            of the `PAIGEANT_*` settings (see `paigeant_ai.security`).
        allow_unsigned: With no signing key configured, send unsigned messages instead of refusing to dispatch
            on a real broker (`PAIGEANT_ALLOW_UNSIGNED=1`).
        publish_events: Also publish the `dispatched` event on the transport's `events` address, for a
            `WorkflowStore`.
        waiting_store: Where workers park the workflows that wait for input; needed by `resume`.
        claims: Where dispatchers claim the correlation IDs they are given, so that every process sees an ID
            in use; by default the transport itself when it can hold claims (Redis; in memory, within the
            process). Without one, only this dispatcher's memory of its latest dispatches tells.
        revision_limits: How far the steps of its workflows may revise their routes (see `RevisionLimits`; the
            defaults when None); signed into each workflow's plan.
        require_live_workers: Refuse a workflow naming an activity that no live worker serves, by the transport's
            registry (see `docs/registry.md`): `None` (the default) once the registry shows any live worker,
            `True` always (the transport must keep a registry), `False` never.
        transports: The transports, by name, that the steps of its workflows may live on (`ActivitySpec.transport`);
            defaults to `PAIGEANT_TRANSPORTS`. A step naming another is refused at dispatch; a cancel is posted on
            every one of them. See `docs/deployment.md`. Those it makes from `PAIGEANT_TRANSPORTS` are its own:
            use it as `async with WorkflowDispatcher(...) as dispatcher:`, or call `aclose()`, to close them.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_message_bytes: int | None = None,
        ttl: float | EllipsisType | None = ...,
        on_event: EventSink | None = None,
        security: MessageSecurity | None = None,
        allow_unsigned: bool | None = None,
        publish_events: bool = True,
        waiting_store: WaitingStore | None = None,
        claims: SharedClaims | None = None,
        revision_limits: RevisionLimits | None = None,
        require_live_workers: bool | None = None,
        transports: Mapping[str, Transport] | None = None,
    ) -> None:
        if require_live_workers and not isinstance(transport, Advertising):
            raise UserError(
                f"the {transport.name} transport keeps no registry of live workers: "
                "leave require_live_workers at None or False"
            )
        self.transport = transport
        self.routes = Routes(transport, transports)
        """Where each workflow's first hop, resumes and cancels go (see `paigeant_ai._routes`)."""
        self.revision_limits = revision_limits
        self.claims = claims if claims is not None else transport if isinstance(transport, SharedClaims) else None
        self._dispatched: OrderedDict[str, str] = OrderedDict()  # correlation ID -> fingerprint, latest last
        self.waiting_store = waiting_store
        self.max_message_bytes = max_message_bytes or Settings.from_env().max_message_bytes
        self.ttl: float | None = Settings.from_env().workflow_ttl if isinstance(ttl, EllipsisType) else ttl
        if self.ttl is None:
            logger.warning(
                "workflows dispatched here never expire (ttl=None): a captured message stays usable for as long as "
                "the replay cache remembers it (PAIGEANT_REPLAY_TTL); give them a ttl to bound that"
            )
        elif self.ttl <= 0:
            raise UserError("ttl must be a positive number of seconds (or None for never)")
        self.security: MessageSecurity = (
            security if security is not None else MessageSigner.from_settings(transport, allow_unsigned=allow_unsigned)
        )
        if isinstance(self.security, MessageSigner):
            self.security.warn_if_unsigned("steps, and the workflows it dispatches")
        self.reporter = EventReporter(
            transport, on_event, publish=publish_events, batched=False, on_span=False, security=self.security
        )
        self.live_workers = LiveCheck(transport, self.security, when=require_live_workers)
        """Refuses a route naming an activity no live worker serves (see `paigeant_ai._live_check`)."""

    async def __aenter__(self) -> Self:
        await self.routes.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the transports it made from `PAIGEANT_TRANSPORTS`; not `transport` nor those given in
        `transports=`, which their owner closes. It may be used again afterwards: it connects them anew."""
        await self.routes.disconnect()

    async def dispatch_workflow(
        self,
        activities: Sequence[ActivitySpec | Activity | Parallel | str],
        variables: Mapping[str, Any] | None = None,
        *,
        obo_token: str | None = None,
        correlation_id: str | None = None,
        require_workers: bool = False,
        revision_limits: RevisionLimits | None = None,
        principal: str | None = None,
        budget: Budget | None = None,
    ) -> str:
        """Start a workflow and return its correlation ID.

        Args:
            activities: The steps, in order: a list of `ActivitySpec`s, activities or names, and `Parallel`
                groups of them (their branches run at the same time; see `Parallel`).
            variables: The workflow's initial payload: a mapping of names to JSON values.
            obo_token: The user's on-behalf-of token, carried with every hop.
            correlation_id: Use this ID instead of a new one. Dispatching the same activities, variables and
                token under it again is a safe retry: it returns the ID and starts nothing.
            require_workers: Refuse to dispatch unless a worker consumes the first step now, and every fallback
                and compensation the steps name (where the transport can tell; see `ConsumerWatch`).
            revision_limits: How far this workflow's steps may revise its route; the dispatcher's by default.
                Mark steps no revision may remove with `ActivitySpec(mandatory=True)`.
            principal: Who owns the workflow (`WorkflowStatus.owner`, what the planner's `get_workflow_status`
                checks); by default the subject (`sub`) of `obo_token`, validated when tokens are checked.
            budget: What the whole workflow may use (tokens, requests, tool calls, cost, wall time), carried in
                its signed plan and enforced before every step (see `Budget`).

        Raises:
            UserError: Activities or variables of the wrong shape, no activities, an invalid name, a parallel group
                past its limits (or, on RabbitMQ, without `PAIGEANT_SHARED_STORE_URL`), variables
                that are not JSON, no key to sign with, or a key the trust policy does not let start workflows.
            TokenError: Tokens are checked and `obo_token` fails the check (only without `principal`).
            WorkflowExists: `correlation_id` is in use by a workflow with other activities, variables or token.
            NoWorker: With `require_workers`, no worker consumes the first step, or a fallback or compensation a
                step names; or the registry shows no live worker for an activity the route names (see
                `require_live_workers`).
            MessageTooLarge: The first message would exceed `max_message_bytes`.
        """
        message = self._first_message(activities, variables, obo_token, correlation_id)
        owner = principal if principal is not None else principal_of(obo_token, self.security)
        plan = new_plan(
            message, self.security, revision_limits or self.revision_limits, owner=owner, budget=checked_budget(budget)
        )
        # Unsigned, a plan would protect nothing; it still carries a budget, which is then kept, not enforced.
        message.plan = plan if plan.signature is not None or budget is not None else None
        fingerprint = workflow_fingerprint(message) if correlation_id is not None else None
        held = await self._claim(message.correlation_id, fingerprint) if fingerprint is not None else None
        if held is not None and held == fingerprint:
            return message.correlation_id  # the same workflow, dispatched already
        # Ours now, or claimed by a dispatch of the same workflow that may not have got through (it failed, or is
        # still sending): send it (again). Its first hop has the same message ID, so a worker runs it once.
        try:
            await self.routes.connect()
            if require_workers:
                await self._require_workers(message.routing_slip.itinerary)
            await self.live_workers.require(message.routing_slip.itinerary)  # workers post on their home's registry
            # After the worker checks: a route no worker serves is told so, with what is served, before the join
            # store it would need besides.
            refuse_groups_without_join(self.transport, message.routing_slip.itinerary)
            with observability.dispatch_span(message, self.transport.name):
                for first in first_branches(message, branch_hops(message)) if fans_out(message) else [message]:
                    transport = self.routes.send_to(first)
                    body = self.encode(first)
                    await transport.publish(first.routing_slip.current or "", body, headers=dict(first.headers))
        except BaseException:
            if fingerprint is not None and held is None:
                await self._release(message.correlation_id, fingerprint)  # so that a corrected retry is not refused
            raise
        if fingerprint is not None:
            await self._confirm(message.correlation_id, fingerprint)
        await self.reporter.report("dispatched", message, owner=owner, deadline=message.expires_at)
        if fans_out(message):
            await self.reporter.report(
                "fanned_out", message, detail=describe_fan_out(first_branches(message, branch_hops(message)))
            )
        return message.correlation_id

    def _first_message(
        self, activities: object, variables: object, obo_token: str | None, correlation_id: object
    ) -> PaigeantMessage:
        """The first message of a workflow, every argument checked, each mistake told in one sentence."""
        specs = specs_of(activities)
        self.routes.check_route(specs)
        refuse_shadowed_keys(specs, variables_of(variables))
        if correlation_id is not None and (not isinstance(correlation_id, str) or not correlation_id):
            raise UserError(
                f"correlation_id must be a non-empty string (or None for a new one), not {correlation_id!r}"
            )
        expires_at = datetime.now(UTC) + timedelta(seconds=self.ttl) if self.ttl else None
        try:
            return PaigeantMessage.new(
                specs,
                variables_of(variables),
                correlation_id=correlation_id,
                obo_token=obo_token,
                expires_at=expires_at,
            )
        except ValidationError as exc:
            raise UserError(f"cannot dispatch: {exc.errors(include_url=False)[0]['msg']}") from None

    async def _claim(self, correlation_id: str, fingerprint: str) -> str | None:
        """Claim `correlation_id` for a workflow with `fingerprint`, as being sent.

        Returns:
            None when this call claimed it; `fingerprint` when that workflow was dispatched already; the pending
            mark of `fingerprint` when a dispatch of that workflow claimed it but never confirmed that it was sent.

        Raises:
            WorkflowExists: Another workflow has it.
        """
        pending = _PENDING + fingerprint
        held = self._dispatched.get(correlation_id)
        if held is None and self.claims is not None:
            held = await self.claims.claim(_claim_key(correlation_id), pending, ttl=max(CLAIM_TTL, self.ttl or 0))
        if held is not None and held not in (fingerprint, pending):
            raise WorkflowExists(
                f"workflow {correlation_id!r} was already dispatched with other activities, variables or token; "
                "pass a new correlation_id to start another workflow",
                correlation_id=correlation_id,
            )
        self._remember(correlation_id, held or pending)
        return held

    async def _confirm(self, correlation_id: str, fingerprint: str) -> None:
        """Mark the claim of `correlation_id` as sent; a failure leaves it pending, so a retry sends it again."""
        self._remember(correlation_id, fingerprint)
        if self.claims is None:
            return
        key, ttl = _claim_key(correlation_id), max(CLAIM_TTL, self.ttl or 0)
        try:
            await self.claims.release(key, _PENDING + fingerprint)
            await self.claims.claim(key, fingerprint, ttl=ttl)
        except Exception:
            logger.warning("could not mark %s as dispatched; a retry will send it again", correlation_id, exc_info=True)

    def _remember(self, correlation_id: str, value: str) -> None:
        self._dispatched[correlation_id] = value
        self._dispatched.move_to_end(correlation_id)
        while len(self._dispatched) > REMEMBERED_DISPATCHES:
            self._dispatched.popitem(last=False)

    async def _release(self, correlation_id: str, fingerprint: str) -> None:
        """Forget the claim of a dispatch that failed; a failure to do so is logged, not raised over the first."""
        if self._dispatched.get(correlation_id) == _PENDING + fingerprint:
            del self._dispatched[correlation_id]
        if self.claims is None:
            return
        try:
            await self.claims.release(_claim_key(correlation_id), _PENDING + fingerprint)
        except Exception:
            logger.warning("could not release the claim on %s after a failed dispatch", correlation_id, exc_info=True)

    async def _require_workers(self, itinerary: Sequence[ActivitySpec]) -> None:
        """Raise `NoWorker` unless something consumes the first step now, and every fallback and compensation the
        route names (see `paigeant_ai._dispatch_checks.require_workers`), each on the transport its step lives on."""
        for transport, specs in self.routes.placed(itinerary):
            await require_workers(transport, specs)

    async def waiting(self) -> list[ParkedStep]:
        """Every parked workflow whose record verifies, oldest first: what an approver may review.

        A record that fails `ParkedStep.verify` (altered or fabricated in the store) is left out, with the
        reason logged as a warning.
        """
        return [parked for parked in await self._store().waiting() if verified(parked, self.security)]

    async def parked(self, correlation_id: str) -> ParkedStep:
        """The verified parked record of a workflow that waits for input.

        Raises:
            UserError: There is no waiting store, or the workflow does not wait.
            SecurityError: The record is refused: altered, fabricated, or signed by a key that may not send to
                its step.
        """
        parked = await self._store().get(correlation_id)
        if parked is None:
            raise UserError(f"workflow {correlation_id!r} is not waiting for input")
        parked.verify(self.security)
        return parked

    async def resume(
        self,
        correlation_id: str,
        results: DeferredToolResults | None = None,
        *,
        approvals: Mapping[str, ApprovalAnswer] | None = None,
        calls: Mapping[str, Any] | None = None,
        approve_all: bool = False,
        approver: str | None = None,
        approver_token: str | None = None,
        obo_token: str | None = None,
        in_doubt: Ran | RunAgain | None = None,
        budget: Budget | None = None,
    ) -> None:
        """Continue a workflow that waits for input, at the step where it stopped.

        Answer every tool call the step waits for (`(await dispatcher.parked(correlation_id)).pending`), by tool
        call ID: approvals as `True`, `False`, `ToolApproved(override_args=...)` or `ToolDenied("why")`; results
        of deferred calls as values; or a ready `DeferredToolResults`. The step's agent continues its
        conversation with them: a denial reaches it as the tool's result, and the agent decides what follows.

        Each answer to an approval request is signed as an approval of that exact call (its arguments, the
        override ones when given) by `approver`: this service's key attests it, and must hold `approve` in the
        trust policy; or pass `approver_token`, the approver's token with scope `paigeant:approve`, which the
        worker validates (the approver is then its `sub`). The worker refuses a resume whose answers are not
        what was approved.

        Args:
            correlation_id: The workflow.
            results: Ready answers, merged with `approvals` and `calls`.
            approvals: Answers to approval requests, by tool call ID.
            calls: Results of deferred calls, by tool call ID.
            approve_all: Approve every approval request not answered otherwise.
            approver: Who decides the approval requests, as this service attests it.
            approver_token: The approver's own token, with scope `paigeant:approve`.
            obo_token: A fresh on-behalf-of token of the workflow's user (the parked record keeps none); needed
                when the workflow carried one.
            in_doubt: For a workflow parked `in_doubt` (an at-most-once step that may have run): `Ran(output)`,
                the step did run and completes with `output`; or `RunAgain()`, it runs now. Signed as the
                decision of `approver` by this service's key, which must hold `approve` in the trust policy.
            budget: For a workflow parked `budget_exhausted`: the amounts to add to its budget's limits
                (`Budget(tokens=5000)`), granted by `approver`, signed by this service's key, which must hold
                `approve`; the step then runs again.

        Whatever the worker would refuse and can be checked here is checked before anything is sent (see
        `paigeant_ai._resume_checks`); the parked record stays in the waiting store until a worker has claimed the
        resume, so a resume the worker refuses leaves the workflow waiting.

        Raises:
            UserError: There is no waiting store, the workflow does not wait, an answer is missing or names no
                pending call, approvals are answered without an approver, the workflow needs a fresh token, or
                a token would be refused by the worker (the approver's: invalid, expired, without
                `paigeant:approve`, of another subject than `approver`; the fresh `obo_token`: invalid, of another
                user than the workflow's, or given for a workflow that ran without one).
            SecurityError: The parked record is refused (see `parked`).
        """
        parked = await self.parked(correlation_id)
        expires_at = parked.message.expires_at
        if expires_at is not None and expires_at < datetime.now(UTC):
            raise UserError(
                f"workflow {correlation_id!r} expired at {expires_at.isoformat()} while it waited; it stays parked "
                "and cannot be resumed (dispatch workflows that wait for people with a longer ttl)"
            )
        if parked.budget_exhausted is not None or budget is not None:
            await resume_with_budget(self, parked, budget, approver=approver, obo_token=obo_token)
            return
        if parked.in_doubt is not None or in_doubt is not None:
            if parked.in_doubt is not None and (results is not None or approvals or calls or approve_all):
                raise UserError(
                    f"workflow {correlation_id!r} is in doubt, not waiting for tool calls: resume it with in_doubt= "
                    "alone (Ran(output) or RunAgain())"
                )
            if approver_token is not None:
                raise UserError(
                    "a doubt is settled by this dispatcher's key, which must hold `approve` in the trust policy; "
                    "approver_token is not taken for it: drop approver_token and pass approver='who decided'"
                )
            check_before_resume(parked, self.security, approver=approver, approver_token=None, obo_token=obo_token)
            await resume_in_doubt(self, parked, in_doubt, approver=approver, obo_token=obo_token)
            return
        answers = parked.build_results(results, approvals=approvals, calls=calls, approve_all=approve_all)
        if parked.obo_required and obo_token is None:
            raise UserError(
                f"workflow {correlation_id!r} runs on behalf of a user and its parked record keeps no token: "
                "pass obo_token=<a fresh token of that user>"
            )
        check_before_resume(
            parked, self.security, approver=approver, approver_token=approver_token, obo_token=obo_token
        )
        signed = sign_approvals(parked, answers, self.security, approver=approver, approver_token=approver_token)
        message = parked.resume_message(answers, [item.model_dump(mode="json") for item in signed], obo_token=obo_token)
        with observability.replay_span(message, self.transport.name, operation="resume"):
            transport = await self.parked_on(parked, message)
            await transport.publish(parked.activity, self.encode(message), headers=dict(message.headers))
        # The record stays parked until a worker has checked and claimed the resume (`_resume_checks`).
        audit = describe([(item.approval, attested(item)) for item in signed])
        others = sorted(answers.calls)
        detail = "; ".join([*audit, *([f"answered {', '.join(others)}"] if others else [])])
        await self.reporter.report("resumed", message, detail=detail or "resumed")

    async def cancel(
        self,
        correlation_id: str,
        reason: str = "",
        *,
        by: str | None = None,
        token: str | None = None,
        store: WorkflowStore | None = None,
    ) -> Cancellation:
        """Cancel a workflow, wherever it is: no further step starts, a step running now is interrupted (its
        activity's task is cancelled, so an agent's run stops mid-way), a workflow waiting for input is released,
        and then the compensations of its completed steps run. It ends `cancelled`, with who and why.

        The cancel is a signed request posted on the transport's cancel board (see `paigeant_ai._cancel`), which
        every worker reads before it starts a step, including workers started later. A worker acts on it only if
        this dispatcher's key may `cancel` under the trust policy, or `token` is the workflow's initiator's or
        owner's own token.

        Args:
            correlation_id: The workflow.
            reason: Why, for its status and its compensations (`ctx.unwinding.reason`).
            by: Who cancels it, as this service attests it; by default the subject of `token`.
            token: The requester's own token, needed when this dispatcher's key may not cancel by itself.
            store: The workflow store to check first (as `paigeant cancel` does): a finished workflow is then
                left alone, and an ID it does not know is refused. Without it, a workflow this dispatcher did not
                start or find waiting is cancelled on trust.

        Returns:
            What was done (see `Cancellation`): `requested`, `cancelled` (it waited for input), or `finished`
            (it had ended already: nothing changed).

        Raises:
            UserError: The ID is not a string, or this dispatcher's key may not cancel and no token is given.
            UnknownWorkflow: `store` does not know the workflow, nor does this dispatcher.
        """
        if not isinstance(correlation_id, str) or not correlation_id or len(correlation_id) > 200:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise UserError(
                f"correlation_id must be a workflow's ID (a string of 1 to 200 characters), not {correlation_id!r}"
            )
        parked = await self._parked_or_none(correlation_id)
        if store is not None and parked is None:
            status = await store.get(correlation_id)
            if status is not None and status.state in FINAL_STATES:
                detail = f"workflow {correlation_id!r} had already ended {status.state}; nothing was cancelled"
                return Cancellation(correlation_id, "finished", detail)
            if status is not None and status.state == "compensating":
                detail = f"workflow {correlation_id!r} has stopped already and is being undone; nothing was cancelled"
                return Cancellation(correlation_id, "finished", detail)
            if status is None and correlation_id not in self._dispatched:
                raise UnknownWorkflow(
                    f"no workflow {correlation_id!r} is known: check the ID (`paigeant workflows` lists them)",
                    correlation_id=correlation_id,
                )
        request = self._cancel_request(correlation_id, reason, by, token)
        ttl = min((self.ttl or CLAIM_TTL) + EXPIRY_GRACE.total_seconds(), CANCEL_TTL)
        await self._post_cancel(correlation_id, request.to_bytes(), ttl)
        await self.reporter.report(
            "cancel_requested", None, correlation_id=correlation_id, by=request.by, detail=reason or None
        )
        if parked is not None and parked.message.routing_slip.unwinding is not None:
            # A compensation waits for input: the workflow is being undone already, and releasing it would drop
            # that compensation (its hop ran once). It stays parked until it is resumed; the cancel changes nothing.
            detail = (
                f"workflow {correlation_id!r} is being undone already; its compensation {parked.activity!r} waits "
                "for input (resume it)"
            )
            return Cancellation(correlation_id, "requested", detail)
        if parked is not None and await self._store().remove(parked):
            if parked.message.routing_slip.branch is not None:
                return await self._cancel_parked_branch(parked)
            return await self._cancel_parked(parked, request)
        detail = (
            f"workflow {correlation_id!r} will stop before its next step, and a step of it running now is interrupted"
        )
        return Cancellation(correlation_id, "requested", detail)

    async def parked_on(self, parked: ParkedStep, *hops: PaigeantMessage) -> Transport:
        """The transport a resume or cancel of `parked` goes to: the one it parked on (see `Routes.parked_on`);
        each of `hops` (unsigned) is stamped as sent there."""
        await self.routes.connect()
        transport = self.routes.parked_on(parked)
        for hop in hops:
            self.routes.stamp(hop, transport)
        return transport

    async def _post_cancel(self, correlation_id: str, record: bytes, ttl: float) -> None:
        """Post the cancel on the board of every transport a step may live on, each confirmed: a worker reads its
        own transport's board, so a cancel missing from one would let that transport's steps run on."""
        if not isinstance(self.transport, Cancellations):
            raise UserError(f"{self.transport.name} has no cancel board: workflows on it cannot be cancelled")
        await self.routes.connect()
        for transport in self.routes.transports():
            if not isinstance(transport, Cancellations):
                raise UserError(
                    f"the {transport.name} transport has no cancel board: a workflow with steps on it could not be "
                    "cancelled there; configure only transports with cancel boards in PAIGEANT_TRANSPORTS"
                )
            board = transport.cancel_board()
            await board.open()
            await board.post(correlation_id, record, ttl=ttl)

    def _cancel_request(self, correlation_id: str, reason: str, by: str | None, token: str | None) -> CancelRequest:
        request = sign_cancel(
            CancelRequest(correlation_id=correlation_id, reason=reason, by=by or token_subject(token), token=token),
            self.security,
        )
        kid = signer_of(request.signature) if request.signature is not None else None
        if kid is not None and token is None and not self.security.policy.allows(kid, "cancel"):
            raise UserError(
                f"this dispatcher's key {kid!r} may not cancel workflows under the trust policy: pass token=<the "
                "token of the workflow's initiator or owner>, or grant the key 'cancel' (PAIGEANT_TRUST_POLICY_FILE)"
            )
        return request

    async def _parked_or_none(self, correlation_id: str) -> ParkedStep | None:
        if self.waiting_store is None:
            return None
        parked = await self.waiting_store.get(correlation_id)
        return parked if parked is not None and verified(parked, self.security) else None

    async def _cancel_parked(self, parked: ParkedStep, request: CancelRequest) -> Cancellation:
        """Release a workflow that waited for input, and start its compensations."""
        message = parked.message.model_copy(deep=True)
        step = message.routing_slip.current
        pending = unwind_parked(message, request)
        # Reported before the first compensation is sent: a store must know why the workflow stopped before a
        # worker reports that its compensations ended. Both are dated alike, `compensating` first: a reader between
        # the two (a watch) sees a workflow being undone, never one that seems to have ended; the store orders them
        # by rank (the cause, then the undoing).
        at = datetime.now(UTC)
        if pending:
            undo = ", ".join(f"{record.activity} (by {record.compensate})" for record in reversed(pending))
            await self.reporter.report(
                "compensating", message, activity=step, step=message.routing_slip.step, detail=f"undoing {undo}", at=at
            )
        await self.reporter.report("cancelled", message, activity=step, by=request.by, detail=request.summary, at=at)
        if pending:
            with observability.replay_span(message, self.transport.name, operation="cancel"):
                hop = message.next_hop()
                await self.routes.connect()
                transport = self.routes.send_to(hop)  # where the undone step ran
                await transport.publish(hop.routing_slip.current or "", self.encode(hop), headers=dict(hop.headers))
        detail = f"workflow {parked.correlation_id!r} waited at {step!r}; it was released" + (
            " and its compensations started" if pending else ", with nothing to undo"
        )
        return Cancellation(parked.correlation_id, "cancelled", detail)

    async def _cancel_parked_branch(self, parked: ParkedStep) -> Cancellation:
        """Release a branch of a parallel group that waited for input: its hop is sent again, so that a worker, which
        holds the group's join store, finds the cancel posted and stops the group (undoing the branches that
        completed) as it does for a running branch."""
        hop = parked.message.model_copy(update={"resume": None}).next_hop(attempt=parked.message.attempt)
        name = f"{parked.activity}#cancel-{parked.digest[:32]}"  # not the parked hop's id, which ran already
        hop.message_id = derive_message_id(parked.correlation_id, parked.step, name, hop.attempt)
        transport = await self.parked_on(parked, hop)  # the branch's transport, where its group's join store is
        await transport.publish(hop.routing_slip.current or "", self.encode(hop), headers=dict(hop.headers))
        detail = (
            f"workflow {parked.correlation_id!r} waited at branch {parked.message.routing_slip.branch!r}; it was "
            "released, and a worker stops its group and undoes what completed"
        )
        return Cancellation(parked.correlation_id, "cancelled", detail)

    def watch(
        self, correlation_id: str, *, after: str | None = None, start_within: float | None = None
    ) -> AsyncIterator[WatchedEvent]:
        """Every event of a workflow, in order, from its start until it ends, as it happens.

        ```python
        async for watched in dispatcher.watch(correlation_id):
            print(watched.event.kind, watched.event.activity)
        ```

        Each event comes from the transport's progress stream (see `ProgressStreams`), checked against the trusted
        keys of this dispatcher's `security`: what does not verify is logged and skipped. A watch started late
        catches up from the workflow's first event the stream still keeps; one given `after=watched.offset`
        yields only what came after that event. A watch of an ID nothing was dispatched under waits for its first
        event; give `start_within=seconds` to have it raise `UnknownWorkflow` after that long without one. See the
        "Progress" section of docs/cost-and-progress.md.

        Raises:
            UserError: The transport keeps no progress streams, or `after` is no offset a watch yielded.
            UnknownWorkflow: No event of the workflow within `start_within` seconds.
            TransportError: The broker could not be read, six times in a row (a watch reads on after a failed
                read, from the entry it last read).
        """
        return watch_workflow(self.transport, self.security, correlation_id, after=after, start_within=start_within)

    def _store(self) -> WaitingStore:
        if self.waiting_store is None:
            raise UserError("resume needs the store workers park workflows in: WorkflowDispatcher(waiting_store=...)")
        return self.waiting_store

    @property
    def publish_events(self) -> bool:
        """Whether events are published on the transport's `events` address."""
        return self.reporter.publish

    def encode(self, message: PaigeantMessage) -> bytes:
        """The bytes of `message`: with the current trace context, signed, and checked against the size limit."""
        return seal(message, self.security, max_bytes=self.max_message_bytes)


def _claim_key(correlation_id: str) -> str:
    return f"dispatched:{correlation_id}"
