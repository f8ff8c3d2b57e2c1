"""Spans keyed on the correlation ID: one trace per workflow, its hops side by side under the dispatch.

    paigeant.dispatch                 the workflow's root (a child of whatever span dispatched it)
      paigeant.hop fetch              each hop a child of the root, linked to the span that sent it
        paigeant.activity fetch
      paigeant.hop summarize          link: hop fetch; pydantic-ai's spans below its activity span
      paigeant.resume summarize       link: the hop that parked, and the caller (the request that answered)
      paigeant.hop summarize          link: the resume

The message's `headers`, inside the signed bytes (`paigeant_ai._sealing`), carry `traceparent` (and
`tracestate`): the workflow's root, written by the dispatcher and kept by every hop; `paigeant-link`: the span that
sent the message (a hop, a retry, a resume, a replay) as a W3C `traceparent` value; `baggage`: the correlation ID,
so that the spans made inside an activity carry it too (with Logfire).

Trust: the headers a broker delivers are never read, nor is the body before its signature checks out. A hop's span
starts, in the workflow's trace, when the worker calls `continue_trace` with the verified message (decoding and
verification come before it); a refused message gets a span in a trace of its own. Whoever can write to the broker
cannot graft spans onto a workflow's trace.

Attributes follow the OpenTelemetry messaging conventions (`messaging.system`, `messaging.operation.type` and
`.name`, `messaging.destination.name`, `messaging.message.id`, `messaging.message.conversation_id` = the
correlation ID) beside the `paigeant.*` ones. `paigeant.attempt` is the message's `attempt` as on the wire: 0 for
the first try, n for the n-th retry (span titles say "retry n").

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
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ._usage import Usage, sum_usage
from .approval import ParkWorkflow
from .exceptions import EndWorkflow, RetryActivity

if TYPE_CHECKING:
    from ._events import WorkflowEvent
    from .activity import ActivityContext
    from .contracts import PaigeantMessage
    from .transports.base import Delivery

__all__ = (
    "CORRELATION_ID",
    "LINK_HEADER",
    "TRACER_NAME",
    "activity_span",
    "continue_trace",
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
LINK_HEADER = "paigeant-link"
"""The message header with the span that sent the message, as a W3C `traceparent` value."""

# The wire format fixes W3C trace context and baggage, whatever global propagator the application set: every
# process of a workflow must read what the others wrote. (Using these directly also keeps clear of Logfire's
# warning wrapper around the global propagator, meant for context arriving from third parties.)
_TRACE_CONTEXT = TraceContextTextMapPropagator()
_BAGGAGE = W3CBaggagePropagator()
_PROPAGATOR = CompositePropagator([_TRACE_CONTEXT, _BAGGAGE])
_TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage", LINK_HEADER})

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
    "in_doubt": "in_doubt",
    "budget_exhausted": "budget_exhausted",
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


# -- what travels in the message ----------------------------------------------------------------------------


def inject_context(headers: Mapping[str, str], correlation_id: str) -> dict[str, str]:
    """`headers` for a message sent from the current span, with `correlation_id` as baggage.

    The workflow's root (`traceparent`) is kept when `headers` carry one, and the current span becomes the link
    (`LINK_HEADER`) of the hop that receives the message; with no root yet (the dispatch, or a workflow
    dispatched while tracing was off), the current span becomes the root.
    """
    if not tracing_enabled():
        return dict(headers)
    carrier = {key: value for key, value in headers.items() if key not in _TRACE_HEADERS}
    current = baggage.set_baggage(CORRELATION_ID, correlation_id)
    sender = trace.get_current_span(current).get_span_context()
    root = _span_context(headers.get("traceparent"))
    if root is None:
        _PROPAGATOR.inject(carrier, context=current)
        return carrier
    carrier["traceparent"] = headers["traceparent"]
    if "tracestate" in headers:
        carrier["tracestate"] = headers["tracestate"]
    _BAGGAGE.inject(carrier, context=current)
    if sender.is_valid and sender.span_id != root.span_id:
        carrier[LINK_HEADER] = _traceparent(sender)
    return carrier


def extract_context(headers: Mapping[str, str]) -> context.Context:
    """The workflow's root span and the baggage that `headers` carry, in a context of their own."""
    return _PROPAGATOR.extract(headers, context=context.Context())


def _span_context(traceparent: str | None) -> trace.SpanContext | None:
    """The span a W3C `traceparent` value names, if it is a valid one."""
    if traceparent is None:
        return None
    span = trace.get_current_span(_TRACE_CONTEXT.extract({"traceparent": traceparent}, context=context.Context()))
    found = span.get_span_context()
    return found if found.is_valid else None


def _traceparent(span: trace.SpanContext) -> str:
    return f"00-{span.trace_id:032x}-{span.span_id:016x}-{int(span.trace_flags):02x}"


def _sender_links(headers: Mapping[str, str]) -> list[Link]:
    sender = _span_context(headers.get(LINK_HEADER))
    return [Link(sender, {"paigeant.link": "sender"})] if sender is not None else []


def _workflow_parent(headers: Mapping[str, str], correlation_id: str, fallback: context.Context) -> context.Context:
    """The context a span of the workflow starts in: its root, or `fallback` when the message carries none."""
    parent = extract_context(headers)
    if not trace.get_current_span(parent).get_span_context().is_valid:
        parent = fallback
    return baggage.set_baggage(CORRELATION_ID, correlation_id, parent)


def _message_attributes(message: PaigeantMessage) -> dict[str, Any]:
    return {
        CORRELATION_ID: message.correlation_id,
        "paigeant.activity": message.routing_slip.current or "",
        "paigeant.step": message.step,
        "paigeant.attempt": message.attempt,
        "paigeant.message_id": message.message_id,
    }


def _messaging_attributes(message: PaigeantMessage) -> dict[str, Any]:
    return {
        **_message_attributes(message),
        "messaging.message.id": message.message_id,
        "messaging.message.conversation_id": message.correlation_id,
    }


# -- producers: the dispatch, a resume, a dead-letter replay -------------------------------------------------


@contextmanager
def dispatch_span(message: PaigeantMessage, transport: str) -> Generator[trace.Span]:
    """The producer span of a new workflow, its trace's root; seal the first message inside it."""
    text = f"dispatch workflow {message.correlation_id} to {message.routing_slip.current}"
    with _producer_span("dispatch", message, transport, text, context.get_current(), []) as span:
        yield span


@contextmanager
def replay_span(
    message: PaigeantMessage, transport: str, *, operation: Literal["replay", "resume", "cancel"] = "replay"
) -> Generator[trace.Span]:
    """The producer span of a step sent again (a dead letter replayed, a waiting step resumed, or a waiting
    workflow's first compensation once it is cancelled); seal it inside.

    The span is a sibling of the workflow's hops, linked to the span that sent `message` before (the hop that
    parked or faulted) and to the caller's current span (the request that answered an approval, the command
    that replays a dead letter); the hop it sends links to it.
    """
    caller = trace.get_current_span().get_span_context()
    links = _sender_links(message.headers)
    if caller.is_valid:
        links.append(Link(caller, {"paigeant.link": "caller"}))
    parent = _workflow_parent(message.headers, message.correlation_id, context.get_current())
    text = f"{operation} {message.routing_slip.current} of workflow {message.correlation_id}"
    with _producer_span(operation, message, transport, text, parent, links) as span:
        yield span


@contextmanager
def _producer_span(
    operation: str, message: PaigeantMessage, transport: str, text: str, parent: context.Context, links: list[Link]
) -> Generator[trace.Span]:
    if not tracing_enabled():
        yield trace.INVALID_SPAN
        return
    attributes = {
        **_messaging_attributes(message),
        "paigeant.itinerary": [spec.name for spec in message.routing_slip.itinerary],
        "messaging.system": transport,
        "messaging.operation.type": "send",
        "messaging.operation.name": operation,
        "messaging.destination.name": message.routing_slip.current or "",
        "logfire.msg": text,
    }
    token = context.attach(baggage.set_baggage(CORRELATION_ID, message.correlation_id, parent))
    try:
        with _tracer.start_as_current_span(
            f"paigeant.{operation}", kind=SpanKind.PRODUCER, attributes=attributes, links=links
        ) as span:
            yield span
            span.set_attribute("paigeant.outcome", "sent")
    finally:
        context.detach(token)


# -- consumers: one hop ---------------------------------------------------------------------------------------


class _Hop:
    """The span of one hop: started once the message is trusted, completed by the events the worker reports."""

    def __init__(self, delivery: Delivery, transport: str, outer: context.Context) -> None:
        self.address = delivery.address
        self.outer = outer
        self.span: trace.Span | None = None
        self.outcome: str | None = None
        self.status: Status | None = None
        self.described = False
        self.attributes: dict[str, Any] = {
            "paigeant.activity": delivery.address,
            "paigeant.delivery_count": delivery.delivery_count,
            "messaging.system": transport,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": delivery.address,
            "messaging.message.body.size": len(delivery.body),
            "logfire.msg": f"hop {delivery.address}",
        }

    def start(self, parent: context.Context, links: list[Link]) -> trace.Span:
        self.span = _tracer.start_span(
            "paigeant.hop", context=parent, kind=SpanKind.CONSUMER, attributes=self.attributes, links=links
        )
        return self.span

    def set(self, attributes: Mapping[str, Any]) -> None:
        self.attributes.update(attributes)
        if self.span is not None:
            self.span.set_attributes(attributes)

    def record(self, event: WorkflowEvent) -> None:
        if event.correlation_id is not None:
            self.set({CORRELATION_ID: event.correlation_id})
        if event.message_id is not None and not self.described:
            self.described = True
            self.set({"paigeant.attempt": event.attempt, "paigeant.message_id": event.message_id})
            if event.step is not None:
                self.set({"paigeant.step": event.step})
        outcome = _OUTCOMES.get(event.kind)
        if outcome is None:
            return
        if self.outcome is None or event.kind in ("completed", "faulted"):
            self.outcome = outcome
            self.set({"paigeant.outcome": outcome})
        if event.kind in ("completed", "faulted"):
            self.set({"paigeant.workflow_outcome": event.kind})
        if event.usage is not None:
            self.set(usage_attributes(event.usage, "paigeant.workflow.usage."))
        if event.detail is not None and event.kind in (
            "step_retried",
            "faulted",
            "rejected",
            "waiting",
            "in_doubt",
            "budget_exhausted",
        ):
            self.set({"paigeant.reason": event.detail[:2000]})
        if event.kind in ("faulted", "rejected"):
            self.status = Status(StatusCode.ERROR, event.detail or event.kind)

    def finish(self, error: BaseException | None) -> None:
        # A hop never trusted (a refused message) gets its span now, outside any workflow's trace.
        span = self.span or self.start(self.outer, [])
        if isinstance(error, Exception):
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        elif self.status is not None:
            span.set_status(self.status)
        span.set_attribute("logfire.msg", f"hop {self.address}: {self.outcome or 'unsettled'}")
        span.end()


_current_hop: contextvars.ContextVar[_Hop | None] = contextvars.ContextVar("paigeant_hop", default=None)
_hop_tracing: contextvars.ContextVar[bool | None] = contextvars.ContextVar("paigeant_hop_tracing", default=None)


@contextmanager
def hop_span(delivery: Delivery, transport: str) -> Generator[None]:
    """The consumer span of one hop; it joins the workflow's trace at `continue_trace`.

    The delivery's broker headers are not read: the trace context comes from the verified message only.
    `record_event` fills in what the hop was (correlation ID, step, attempt, message ID) and how it ended.
    """
    if not tracing_enabled():
        disabled = _hop_tracing.set(False)
        try:
            yield
        finally:
            _hop_tracing.reset(disabled)
        return
    outer = context.get_current()
    # Restored at the end, whatever the hop attached in between (`continue_trace` attaches the hop's span).
    token = context.attach(outer)
    hop = _Hop(delivery, transport, outer)
    reset = _current_hop.set(hop)
    error: BaseException | None = None
    try:
        yield
    except BaseException as exc:
        error = exc
        raise
    finally:
        _current_hop.reset(reset)
        context.detach(token)
        hop.finish(error)


def continue_trace(message: PaigeantMessage) -> None:
    """Start the current hop's span in the workflow's trace that `message` carries, and make it current.

    Call it once `message` passed its signature check: the span is a child of the workflow's root with a link to
    the span that sent the message. Nothing happens outside a hop, with tracing off, or when the hop has started.
    """
    hop = _current_hop.get()
    if hop is None or hop.span is not None:
        return
    parent = _workflow_parent(message.headers, message.correlation_id, hop.outer)
    hop.described = True
    hop.set(_messaging_attributes(message))
    span = hop.start(parent, _sender_links(message.headers))
    context.attach(trace.set_span_in_context(span, parent))  # detached by `hop_span`


def record_event(event: WorkflowEvent) -> None:
    """Note `event` on the span of the hop that produced it, if any."""
    hop = _current_hop.get()
    if hop is not None:
        hop.record(event)


# -- the activity ---------------------------------------------------------------------------------------------


@contextmanager
def activity_span(ctx: ActivityContext) -> Generator[None]:
    """The span of one attempt of an activity, with the correlation ID as baggage for the spans inside it."""
    if not tracing_enabled():
        yield
        return
    continue_trace(ctx.message)  # an activity runs only on a verified message; a no-op once the hop started
    attributes = {**_message_attributes(ctx.message), "paigeant.activity": ctx.spec.name}
    retry = f", retry {ctx.attempt}" if ctx.attempt else ""
    attributes["logfire.msg"] = f"activity {ctx.spec.name} (step {ctx.step}{retry})"
    token = context.attach(baggage.set_baggage(CORRELATION_ID, ctx.correlation_id))
    try:
        with _tracer.start_as_current_span(
            "paigeant.activity", attributes=attributes, record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield
            except BaseException as exc:
                _note_failure(span, exc)
                raise
            finally:
                if ctx.usage:
                    span.set_attributes(usage_attributes(sum_usage(ctx.usage)))
            span.set_attribute("paigeant.outcome", "completed")
    finally:
        context.detach(token)


def usage_attributes(usage: Usage, prefix: str = "paigeant.usage.") -> dict[str, Any]:
    """Span attributes for `usage`, each field under `prefix` (`paigeant.usage.input_tokens`; a workflow's totals
    under `paigeant.workflow.usage.`). Not OpenTelemetry's `gen_ai.usage.*`: pydantic-ai's own spans carry those for
    the same calls, and a backend that sums them over a trace would count a step's twice."""
    attributes: dict[str, Any] = {prefix + name: getattr(usage, name) for name in _USAGE_FIELDS}
    if usage.model is not None:
        attributes[prefix + "model"] = usage.model
    return attributes


_USAGE_FIELDS = ("requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "tool_calls")


def _note_failure(span: trace.Span, exc: BaseException) -> None:
    if isinstance(exc, EndWorkflow):
        span.set_attributes({"paigeant.outcome": "ended", "paigeant.reason": exc.reason[:2000]})
    elif isinstance(exc, ParkWorkflow):
        span.set_attributes({"paigeant.outcome": "waiting", "paigeant.reason": str(exc)[:2000]})
    else:
        span.set_attribute("paigeant.outcome", _failure_outcome(exc))
        if isinstance(exc, Exception):
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _failure_outcome(exc: BaseException) -> str:
    if isinstance(exc, RetryActivity):
        return "retry"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, Exception):
        return "failed"
    return "cancelled"
