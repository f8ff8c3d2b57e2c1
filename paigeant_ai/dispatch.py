"""`WorkflowDispatcher`: builds the first message of a workflow and publishes it to its first step."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from pydantic import ValidationError

from . import observability
from ._events import EventCallback, EventReporter
from ._principal import principal_of
from ._sealing import seal
from .activity import Activity
from .contracts import RESERVED_ADDRESSES, ActivitySpec, PaigeantMessage
from .exceptions import NoWorker, UserError, WorkflowExists
from .security import MessageSecurity, MessageSigner
from .settings import Settings
from .transports.base import ConsumerWatch, SharedClaims, Transport

if TYPE_CHECKING:
    from pydantic_ai import DeferredToolResults

    from .approval import ApprovalAnswer, WaitingStore

__all__ = ("WorkflowDispatcher",)

logger = logging.getLogger("paigeant_ai.dispatch")


EventSink = EventCallback
"""A callback for events, sync or async."""

REMEMBERED_DISPATCHES = 10_000
"""Correlation IDs a dispatcher remembers in memory, with what it dispatched under them."""
CLAIM_TTL = 7 * 24 * 3600.0
_PENDING = "pending:"
"""The mark of a claim whose dispatch has not confirmed that its first message was sent."""
"""Seconds a shared claim on a correlation ID lasts, at least (longer for workflows with a longer `ttl`)."""


def to_spec(item: ActivitySpec | Activity | str) -> ActivitySpec:
    """The spec the routing slip carries for `item`: a spec, an activity's spec, or a bare name."""
    if isinstance(item, ActivitySpec):
        return item
    if isinstance(item, str):
        try:
            return ActivitySpec(name=item)
        except ValidationError as exc:
            raise UserError(f"invalid activity name {item!r}: {exc.errors(include_url=False)[0]['msg']}") from None
    spec = getattr(item, "spec", None)
    if isinstance(spec, ActivitySpec):
        # Only the name and description travel: the worker that runs the activity owns its retry and timeout.
        return ActivitySpec(name=spec.name, description=spec.description, required_scopes=spec.required_scopes)
    raise UserError(f"{item!r} is not an activity: pass ActivitySpec objects, activities or names")


def _specs(activities: object) -> list[ActivitySpec]:
    if isinstance(activities, str):
        raise UserError(f"activities must be a list of steps, not one string: write [{activities!r}]")
    if not isinstance(activities, Sequence) or isinstance(activities, bytes | bytearray):
        raise UserError(
            f"activities must be a list of steps (ActivitySpec objects, activities or names), "
            f"not {type(activities).__name__}"
        )
    return [to_spec(item) for item in cast("Sequence[ActivitySpec | Activity | str]", activities)]  # each checked


def _variables(variables: object) -> Mapping[str, Any] | None:
    if variables is None:
        return None
    if not isinstance(variables, Mapping):
        raise UserError(
            "variables must be a mapping of names to JSON values, like {'order_id': 42}, "
            f"not {type(variables).__name__}"
        )
    for key in cast("Mapping[object, object]", variables):
        if not isinstance(key, str):
            raise UserError(f"variable names must be strings: {key!r} is {type(key).__name__}; write {str(key)!r}")
    return cast("Mapping[str, Any]", variables)


def _fingerprint(message: PaigeantMessage) -> str:
    """What makes two dispatches the same workflow: its activities, variables and token (hashed)."""
    content = {
        "activities": [spec.model_dump(mode="json") for spec in message.routing_slip.itinerary],
        "variables": message.payload,
        "obo_token": message.security.obo_token,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _hint(activity: str, served: list[str] | None) -> str:
    """What the transport knows of the steps that are served, for the `NoWorker` message."""
    if served is None:
        return ""
    if not served:
        return " (no worker consumes any step on this transport now)"
    close = difflib.get_close_matches(activity, served, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f" ({guess}workers consume: {', '.join(served)})"


class WorkflowDispatcher:
    """Starts workflows: builds the routing slip and publishes the first message.

    Args:
        transport: A connected transport.
        max_message_bytes: The largest message it sends; defaults to `PAIGEANT_MAX_MESSAGE_BYTES` (1 MiB).
        ttl: Seconds after which an unfinished workflow's messages expire; `None` for never.
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
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_message_bytes: int | None = None,
        ttl: float | None = None,
        on_event: EventSink | None = None,
        security: MessageSecurity | None = None,
        allow_unsigned: bool | None = None,
        publish_events: bool = True,
        waiting_store: WaitingStore | None = None,
        claims: SharedClaims | None = None,
    ) -> None:
        self.transport = transport
        self.claims = claims if claims is not None else transport if isinstance(transport, SharedClaims) else None
        self._dispatched: OrderedDict[str, str] = OrderedDict()  # correlation ID -> fingerprint, latest last
        self.waiting_store = waiting_store
        self.max_message_bytes = max_message_bytes or Settings.from_env().max_message_bytes
        self.ttl = ttl
        self.security: MessageSecurity = (
            security if security is not None else MessageSigner.from_settings(transport, allow_unsigned=allow_unsigned)
        )
        if isinstance(self.security, MessageSigner):
            self.security.warn_if_unsigned("steps, and the workflows it dispatches")
        self.reporter = EventReporter(
            transport, on_event, publish=publish_events, batched=False, on_span=False, security=self.security
        )

    async def dispatch_workflow(
        self,
        activities: Sequence[ActivitySpec | Activity | str],
        variables: Mapping[str, Any] | None = None,
        *,
        obo_token: str | None = None,
        correlation_id: str | None = None,
        require_workers: bool = False,
        principal: str | None = None,
    ) -> str:
        """Start a workflow and return its correlation ID.

        Args:
            activities: The steps, in order: a list of `ActivitySpec`s, activities or names.
            variables: The workflow's initial payload: a mapping of names to JSON values.
            obo_token: The user's on-behalf-of token, carried with every hop.
            correlation_id: Use this ID instead of a new one. Dispatching the same activities, variables and
                token under it again is a safe retry: it returns the ID and starts nothing.
            require_workers: Refuse to dispatch unless a worker consumes the first step now (where the
                transport can tell; see `ConsumerWatch`).
            principal: Who owns the workflow (`WorkflowStatus.owner`, what the planner's `get_workflow_status`
                checks); by default the subject (`sub`) of `obo_token`, validated when tokens are checked.

        Raises:
            UserError: Activities or variables of the wrong shape, no activities, an invalid name, variables
                that are not JSON, or no key to sign with.
            TokenError: Tokens are checked and `obo_token` fails the check (only without `principal`).
            WorkflowExists: `correlation_id` is in use by a workflow with other activities, variables or token.
            NoWorker: With `require_workers`, no worker consumes the first step.
            MessageTooLarge: The first message would exceed `max_message_bytes`.
        """
        message = self._first_message(activities, variables, obo_token, correlation_id)
        owner = principal if principal is not None else principal_of(obo_token, self.security)
        fingerprint = _fingerprint(message) if correlation_id is not None else None
        held = await self._claim(message.correlation_id, fingerprint) if fingerprint is not None else None
        if held is not None and held == fingerprint:
            return message.correlation_id  # the same workflow, dispatched already
        # Ours now, or claimed by a dispatch of the same workflow that may not have got through (it failed, or is
        # still sending): send it (again). Its first hop has the same message ID, so a worker runs it once.
        try:
            if require_workers:
                await self._require_workers(message.routing_slip.itinerary[0].name)
            with observability.dispatch_span(message, self.transport.name):
                body = self.encode(message)
                await self.transport.publish(
                    message.routing_slip.itinerary[0].name, body, headers=dict(message.headers)
                )
        except BaseException:
            if fingerprint is not None and held is None:
                await self._release(message.correlation_id, fingerprint)  # so that a corrected retry is not refused
            raise
        if fingerprint is not None:
            await self._confirm(message.correlation_id, fingerprint)
        await self.reporter.report("dispatched", message, owner=owner)
        return message.correlation_id

    def _first_message(
        self, activities: object, variables: object, obo_token: str | None, correlation_id: object
    ) -> PaigeantMessage:
        """The first message of a workflow, every argument checked, each mistake told in one sentence."""
        specs = _specs(activities)
        if correlation_id is not None and (not isinstance(correlation_id, str) or not correlation_id):
            raise UserError(
                f"correlation_id must be a non-empty string (or None for a new one), not {correlation_id!r}"
            )
        expires_at = datetime.now(UTC) + timedelta(seconds=self.ttl) if self.ttl else None
        try:
            return PaigeantMessage.new(
                specs, _variables(variables), correlation_id=correlation_id, obo_token=obo_token, expires_at=expires_at
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

    async def _require_workers(self, activity: str) -> None:
        """Raise `NoWorker` unless something consumes `activity` now, or the transport cannot tell."""
        transport = self.transport
        if not isinstance(transport, ConsumerWatch) or (count := await transport.consumers(activity)) is None:
            logger.warning("%s cannot tell whether a worker consumes %r; dispatching anyway", transport.name, activity)
            return
        if count > 0:
            return
        consumed = await transport.consumed_addresses()
        served = None if consumed is None else [name for name in consumed if name not in RESERVED_ADDRESSES]
        raise NoWorker(
            f"no worker consumes {activity!r}: start a worker for it, or fix the step's name{_hint(activity, served)}",
            activity=activity,
            served=served,
        )

    async def resume(
        self,
        correlation_id: str,
        results: DeferredToolResults | None = None,
        *,
        approvals: Mapping[str, ApprovalAnswer] | None = None,
        calls: Mapping[str, Any] | None = None,
        approve_all: bool = False,
    ) -> None:
        """Continue a workflow that waits for input, at the step where it stopped.

        Answer every tool call the step waits for (`(await waiting_store.get(correlation_id)).pending`), by tool
        call ID: approvals as `True`, `False`, `ToolApproved(override_args=...)` or `ToolDenied("why")`; results
        of deferred calls as values; or a ready `DeferredToolResults`. The step's agent continues its
        conversation with them: a denial reaches it as the tool's result, and the agent decides what follows.

        Raises:
            UserError: There is no waiting store, the workflow does not wait, or an answer is missing or names
                no pending call.
        """
        if self.waiting_store is None:
            raise UserError("resume needs the store workers park workflows in: WorkflowDispatcher(waiting_store=...)")
        parked = await self.waiting_store.get(correlation_id)
        if parked is None:
            raise UserError(f"workflow {correlation_id!r} is not waiting for input")
        expires_at = parked.message.expires_at
        if expires_at is not None and expires_at < datetime.now(UTC):
            raise UserError(
                f"workflow {correlation_id!r} expired at {expires_at.isoformat()} while it waited; it stays parked "
                "and cannot be resumed (dispatch workflows that wait for people with a longer ttl)"
            )
        answers = parked.build_results(results, approvals=approvals, calls=calls, approve_all=approve_all)
        message = parked.resume_message(answers)
        with observability.replay_span(message, self.transport.name, operation="resume"):
            await self.transport.publish(parked.activity, self.encode(message), headers=dict(message.headers))
        await self.waiting_store.remove(parked)
        detail = "answered " + ", ".join(sorted({*answers.approvals, *answers.calls}))
        await self.reporter.report("resumed", message, detail=detail)

    @property
    def publish_events(self) -> bool:
        """Whether events are published on the transport's `events` address."""
        return self.reporter.publish

    def encode(self, message: PaigeantMessage) -> bytes:
        """The bytes of `message`: with the current trace context, signed, and checked against the size limit."""
        return seal(message, self.security, max_bytes=self.max_message_bytes)


def _claim_key(correlation_id: str) -> str:
    return f"dispatched:{correlation_id}"
