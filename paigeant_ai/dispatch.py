"""`WorkflowDispatcher`: builds the first message of a workflow and publishes it to its first step."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from . import observability
from ._sealing import seal
from .activity import Activity
from .contracts import EVENTS, ActivitySpec, PaigeantMessage, WorkflowEvent
from .exceptions import UserError
from .security import MessageSigner
from .settings import Settings
from .transports.base import Transport

if TYPE_CHECKING:
    from pydantic_ai import DeferredToolResults

    from .approval import ApprovalAnswer, WaitingStore
    from .worker import MessageSecurity

__all__ = ("WorkflowDispatcher",)

logger = logging.getLogger("paigeant_ai.dispatch")


EventSink = Callable[[WorkflowEvent], Awaitable[None] | None]
"""A callback for events, sync or async."""


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
    ) -> None:
        self.transport = transport
        self.waiting_store = waiting_store
        self.max_message_bytes = max_message_bytes or Settings.from_env().max_message_bytes
        self.ttl = ttl
        self._on_event = on_event
        self.publish_events = publish_events
        self.security: MessageSecurity = (
            security if security is not None else MessageSigner.from_settings(transport, allow_unsigned=allow_unsigned)
        )

    async def dispatch_workflow(
        self,
        activities: Sequence[ActivitySpec | Activity | str],
        variables: Mapping[str, Any] | None = None,
        *,
        obo_token: str | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Start a workflow and return its correlation ID.

        Args:
            activities: The steps, in order: `ActivitySpec`s, activities or names.
            variables: The workflow's initial payload (JSON values).
            obo_token: The user's on-behalf-of token, carried with every hop.
            correlation_id: Use this id instead of a new one (it must be unique).

        Raises:
            UserError: No activities, an invalid name, variables that are not JSON, or no key to sign with.
            MessageTooLarge: The first message would exceed `max_message_bytes`.
        """
        specs = [to_spec(item) for item in activities]
        expires_at = datetime.now(UTC) + timedelta(seconds=self.ttl) if self.ttl else None
        try:
            message = PaigeantMessage.new(
                specs, variables, correlation_id=correlation_id, obo_token=obo_token, expires_at=expires_at
            )
        except ValidationError as exc:
            raise UserError(f"cannot dispatch: {exc.errors(include_url=False)[0]['msg']}") from None
        with observability.dispatch_span(message, self.transport.name):
            body = self.encode(message)
            await self.transport.publish(specs[0].name, body, headers=dict(message.headers))
        event = WorkflowEvent(
            kind="dispatched",
            correlation_id=message.correlation_id,
            activity=message.routing_slip.current,
            step=0,
            message_id=message.message_id,
            remaining=[spec.name for spec in specs],
        )
        if self.publish_events:
            try:
                await self.transport.publish(EVENTS, event.model_dump_json().encode())
            except Exception:
                logger.warning("could not publish the dispatched event of %s", event.correlation_id, exc_info=True)
        await self._report(event)
        return message.correlation_id

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
        event = WorkflowEvent(
            kind="resumed",
            correlation_id=correlation_id,
            activity=parked.activity,
            step=parked.step,
            attempt=message.attempt,
            message_id=message.message_id,
            detail="answered " + ", ".join(sorted({*answers.approvals, *answers.calls})),
            remaining=[spec.name for spec in message.routing_slip.itinerary],
        )
        if self.publish_events:
            try:
                await self.transport.publish(EVENTS, event.model_dump_json().encode())
            except Exception:
                logger.warning("could not publish the resumed event of %s", correlation_id, exc_info=True)
        await self._report(event)

    async def _report(self, event: WorkflowEvent) -> None:
        """Give `event` to the `on_event` callback, sync or async; its failure does not undo the dispatch."""
        if self._on_event is None:
            return
        try:
            result = self._on_event(event)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("the on_event callback failed for the %s event of %s", event.kind, event.correlation_id)

    def encode(self, message: PaigeantMessage) -> bytes:
        """The bytes of `message`: with the current trace context, signed, and checked against the size limit."""
        return seal(message, self.security, max_bytes=self.max_message_bytes)
