"""`WorkflowDispatcher`: builds the first message of a workflow and publishes it to its first step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from .activity import Activity
from .contracts import ActivitySpec, PaigeantMessage, WorkflowEvent
from .exceptions import MessageTooLarge, UserError
from .settings import Settings
from .transports.base import Transport

if TYPE_CHECKING:
    from .worker import MessageSecurity

__all__ = ("WorkflowDispatcher",)


class EventSink(Protocol):
    async def __call__(self, event: WorkflowEvent, /) -> None: ...


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
        on_event: Called with the `dispatched` event of each workflow.
        security: Signs the first message of each workflow; `None` sends it unsigned.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        max_message_bytes: int | None = None,
        ttl: float | None = None,
        on_event: EventSink | None = None,
        security: MessageSecurity | None = None,
    ) -> None:
        self.transport = transport
        self.max_message_bytes = max_message_bytes or Settings.from_env().max_message_bytes
        self.ttl = ttl
        self._on_event = on_event
        self.security = security

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
            UserError: No activities, an invalid name, or variables that are not JSON.
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
        body = self.encode(message)
        await self.transport.publish(specs[0].name, body, headers=dict(message.headers))
        if self._on_event is not None:
            await self._on_event(
                WorkflowEvent(
                    kind="dispatched",
                    correlation_id=message.correlation_id,
                    activity=message.routing_slip.current,
                    step=0,
                    message_id=message.message_id,
                )
            )
        return message.correlation_id

    def encode(self, message: PaigeantMessage) -> bytes:
        """The bytes of `message`, checked against the size limit."""
        if self.security is not None:
            self.security.sign(message)
        body = message.to_json()
        if len(body) > self.max_message_bytes:
            raise MessageTooLarge(
                f"the workflow's first message is {len(body)} bytes, over the limit of {self.max_message_bytes}; "
                "keep large data out of the variables and pass a reference to it instead"
            )
        return body
