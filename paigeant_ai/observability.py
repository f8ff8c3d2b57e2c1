"""Spans keyed on the correlation ID, and W3C trace context carried in message headers.

Every workflow is one trace. The dispatcher opens a producer span and writes its context into the message's
headers (`traceparent`, and `baggage` with the correlation ID); each worker continues that context in a consumer
span for its hop, runs the activity in a child span with the correlation ID attached as baggage (so the spans a
pydantic-ai agent makes inside it have it too, with Logfire), and writes the hop's context into the next message.

Only the OpenTelemetry API is used: the library never configures a tracer provider. Call `logfire.configure()`
(or set up the OpenTelemetry SDK) in the application and the spans go wherever it sends them; without that they
cost next to nothing. No payload, token or signature is ever put on a span.
"""

from __future__ import annotations

import contextvars
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from opentelemetry import baggage, context, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .approval import ParkWorkflow
from .exceptions import EndWorkflow, RetryActivity

if TYPE_CHECKING:
    from .activity import ActivityContext
    from .contracts import PaigeantMessage, WorkflowEvent
    from .transports.base import Delivery

__all__ = (
    "CORRELATION_ID",
    "TRACER_NAME",
    "activity_span",
    "dispatch_span",
    "extract_context",
    "hop_span",
    "inject_context",
    "record_event",
    "replay_span",
    "tracing_enabled",
)

TRACER_NAME = "paigeant_ai"
CORRELATION_ID = "correlation_id"
"""The attribute and baggage key of the workflow's correlation ID, the same on every span."""

# The wire format fixes W3C trace context and baggage, whatever global propagator the application set: every
# process of a workflow must read what the others wrote. (Using these directly also keeps clear of Logfire's
# warning wrapper around the global propagator, meant for context arriving from third parties.)
_PROPAGATOR = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
_TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})

_tracer = trace.get_tracer(TRACER_NAME)

_OUTCOMES: dict[str, str] = {
    "step_completed": "completed",
    "completed": "completed",
    "step_retried": "retried",
    "step_failed": "faulted",
    "faulted": "faulted",
    "rejected": "rejected",
    "step_skipped": "skipped",
    "waiting": "waiting",
}
"""The outcome of a hop, by the event that settled it."""


def tracing_enabled() -> bool:
    """False until the application sets a tracer provider (`logfire.configure()` or the OpenTelemetry SDK).

    Until then every span would be a no-op, so the hot path skips building them and their attributes. Inside a
    hop the answer of the hop's start is used: looking the provider up reads the environment each time.
    """
    during_hop = _hop_tracing.get()
    if during_hop is not None:
        return during_hop
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def inject_context(headers: Mapping[str, str], correlation_id: str) -> dict[str, str]:
    """`headers` with the current trace context and `correlation_id` as baggage, replacing any older ones."""
    if not tracing_enabled():
        return dict(headers)
    carrier = {key: value for key, value in headers.items() if key not in _TRACE_HEADERS}
    _PROPAGATOR.inject(carrier, context=baggage.set_baggage(CORRELATION_ID, correlation_id))
    return carrier


def extract_context(headers: Mapping[str, str]) -> context.Context:
    """The trace context and baggage that `headers` carry, in a context of their own."""
    return _PROPAGATOR.extract(headers, context=context.Context())


def _message_attributes(message: PaigeantMessage) -> dict[str, Any]:
    return {
        CORRELATION_ID: message.correlation_id,
        "paigeant.activity": message.routing_slip.current or "",
        "paigeant.step": message.step,
        "paigeant.attempt": message.attempt,
        "paigeant.message_id": message.message_id,
    }


@contextmanager
def _correlation_baggage(correlation_id: str) -> Generator[None]:
    token = context.attach(baggage.set_baggage(CORRELATION_ID, correlation_id))
    try:
        yield
    finally:
        context.detach(token)


@contextmanager
def dispatch_span(message: PaigeantMessage, transport: str) -> Generator[trace.Span]:
    """The producer span of a new workflow; inject its context into the first message inside it."""
    text = f"dispatch workflow {message.correlation_id} to {message.routing_slip.current}"
    with _producer_span("paigeant.dispatch", message, transport, text) as span:
        yield span


@contextmanager
def replay_span(
    message: PaigeantMessage, transport: str, *, operation: Literal["replay", "resume"] = "replay"
) -> Generator[trace.Span]:
    """The producer span of a step sent again (a dead letter replayed, a waiting step resumed), in the trace of
    the hop it continues when its headers carry one."""
    token = context.attach(extract_context(message.headers))
    try:
        text = f"{operation} {message.routing_slip.current} of workflow {message.correlation_id}"
        with _producer_span(f"paigeant.{operation}", message, transport, text) as span:
            yield span
    finally:
        context.detach(token)


@contextmanager
def _producer_span(name: str, message: PaigeantMessage, transport: str, text: str) -> Generator[trace.Span]:
    if not tracing_enabled():
        yield trace.INVALID_SPAN
        return
    attributes = {
        **_message_attributes(message),
        "paigeant.itinerary": [spec.name for spec in message.routing_slip.itinerary],
        "messaging.system": transport,
        "messaging.operation.type": "send",
        "messaging.destination.name": message.routing_slip.current or "",
        "logfire.msg": text,
    }
    with (
        _correlation_baggage(message.correlation_id),
        _tracer.start_as_current_span(name, kind=SpanKind.PRODUCER, attributes=attributes) as span,
    ):
        yield span
        span.set_attribute("paigeant.outcome", "sent")


class _Hop:
    """The span of one hop, completed by the events the worker reports while it runs."""

    def __init__(self, span: trace.Span, address: str) -> None:
        self.span = span
        self.address = address
        self.outcome: str | None = None
        self.described = False

    def record(self, event: WorkflowEvent) -> None:
        span = self.span
        if event.correlation_id is not None:
            span.set_attribute(CORRELATION_ID, event.correlation_id)
        if event.message_id is not None and not self.described:
            self.described = True
            span.set_attributes({"paigeant.attempt": event.attempt, "paigeant.message_id": event.message_id})
            if event.step is not None:
                span.set_attribute("paigeant.step", event.step)
        outcome = _OUTCOMES.get(event.kind)
        if outcome is None:
            return
        if self.outcome is None or event.kind in ("completed", "faulted"):
            self.outcome = outcome
            span.set_attribute("paigeant.outcome", outcome)
        if event.kind in ("completed", "faulted"):
            span.set_attribute("paigeant.workflow_outcome", event.kind)
        if event.detail is not None and event.kind in ("step_retried", "faulted", "rejected", "waiting"):
            span.set_attribute("paigeant.reason", event.detail[:2000])
        if event.kind in ("faulted", "rejected"):
            span.set_status(Status(StatusCode.ERROR, event.detail or event.kind))

    def finish(self) -> None:
        self.span.set_attribute("logfire.msg", f"hop {self.address}: {self.outcome or 'unsettled'}")


_current_hop: contextvars.ContextVar[_Hop | None] = contextvars.ContextVar("paigeant_hop", default=None)
_hop_tracing: contextvars.ContextVar[bool | None] = contextvars.ContextVar("paigeant_hop_tracing", default=None)


@contextmanager
def hop_span(delivery: Delivery, transport: str) -> Generator[None]:
    """The consumer span of one hop, continuing the trace context the delivery carries.

    `record_event` fills in what the hop was (correlation ID, step, attempt, message ID) and how it ended.
    """
    if not tracing_enabled():
        disabled = _hop_tracing.set(False)
        try:
            yield
        finally:
            _hop_tracing.reset(disabled)
        return
    attributes = {
        "paigeant.activity": delivery.address,
        "paigeant.delivery_count": delivery.delivery_count,
        "messaging.system": transport,
        "messaging.operation.type": "process",
        "messaging.destination.name": delivery.address,
        "logfire.msg": f"hop {delivery.address}",
    }
    parent = extract_context(delivery.headers)
    correlation_id = baggage.get_baggage(CORRELATION_ID, parent)
    if isinstance(correlation_id, str):
        attributes[CORRELATION_ID] = correlation_id
    token = context.attach(parent)
    try:
        with _tracer.start_as_current_span("paigeant.hop", kind=SpanKind.CONSUMER, attributes=attributes) as span:
            hop = _Hop(span, delivery.address)
            reset = _current_hop.set(hop)
            try:
                yield
            finally:
                _current_hop.reset(reset)
                hop.finish()
    finally:
        context.detach(token)


def record_event(event: WorkflowEvent) -> None:
    """Note `event` on the span of the hop that produced it, if any."""
    hop = _current_hop.get()
    if hop is not None:
        hop.record(event)


@contextmanager
def activity_span(ctx: ActivityContext) -> Generator[None]:
    """The span of one attempt of an activity, with the correlation ID as baggage for the spans inside it."""
    if not tracing_enabled():
        yield
        return
    attributes = {**_message_attributes(ctx.message), "paigeant.activity": ctx.spec.name}
    attributes["logfire.msg"] = f"activity {ctx.spec.name} (step {ctx.step}, attempt {ctx.attempt + 1})"
    with (
        _correlation_baggage(ctx.correlation_id),
        _tracer.start_as_current_span(
            "paigeant.activity", attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span,
    ):
        try:
            yield
        except EndWorkflow as exc:
            span.set_attributes({"paigeant.outcome": "ended", "paigeant.reason": exc.reason[:2000]})
            raise
        except ParkWorkflow as exc:
            span.set_attributes({"paigeant.outcome": "waiting", "paigeant.reason": str(exc)[:2000]})
            raise
        except BaseException as exc:
            span.set_attribute("paigeant.outcome", _failure_outcome(exc))
            if isinstance(exc, Exception):
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        span.set_attribute("paigeant.outcome", "completed")


def _failure_outcome(exc: BaseException) -> str:
    if isinstance(exc, RetryActivity):
        return "retry"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, Exception):
        return "failed"
    return "cancelled"
