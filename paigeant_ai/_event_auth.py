"""Signed events: the signature a batch of events travels with, and its check before a store applies it.

Each message on the `events` address (a JSON array of `WorkflowEvent`s) is signed as a whole, once: a detached
JWS of type `paigeant-events+jws` over the exact body, in the header `x-paigeant-events-signature`. Whoever
applies events from the broker (`WorkflowProjector`) checks it against the trusted keys first, so a batch that
is unsigned, signed by an unknown key, or altered changes no status.

What a signer may report: any trusted key may report what happens to a step or a workflow (the worker that ran
it); only a key the trust policy grants `start` may report a `dispatched` event, the one that names the
workflow's owner (see `WorkflowStatus.owner`). So a stolen worker key can still forge the progress or outcome
of a workflow, never who owns it.

An entry of a workflow's progress stream is either such a batch (all of it the workflow's events) or the
workflow's part of a batch of several workflows, proved against one signature over the whole batch (see
`paigeant_ai._progress_proof`); `authenticate_progress` checks both, and the same rule on `dispatched`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ._events import EVENTS_SIGNATURE_HEADER, EVENTS_SIGNATURE_TYPE, WorkflowEvent, decode_events, events_headers
from ._progress_proof import is_proved_part, verify_part
from .exceptions import SecurityError

if TYPE_CHECKING:
    from .security import MessageSecurity

__all__ = (
    "EVENTS_SIGNATURE_HEADER",
    "EVENTS_SIGNATURE_TYPE",
    "authenticate_events",
    "authenticate_progress",
    "events_headers",
)


def authenticate_events(security: MessageSecurity, body: bytes, headers: Mapping[str, str]) -> list[WorkflowEvent]:
    """The events of a batch read from the `events` address, once its signature and signer are checked.

    Raises:
        SecurityError: Unsigned, signed by a key that is not trusted, altered, or a `dispatched` event signed by
            a key without the `start` permission. Nothing of the batch may be applied.
        ValidationError: The body is not a batch of events.
    """
    signer = security.verify_bytes(headers.get(EVENTS_SIGNATURE_HEADER), body, typ=EVENTS_SIGNATURE_TYPE)
    events = decode_events(body)
    _check_reporter(security, signer, events)
    return events


def authenticate_progress(
    security: MessageSecurity, correlation_id: str, body: bytes, headers: Mapping[str, str]
) -> list[WorkflowEvent]:
    """The events of an entry of `correlation_id`'s progress stream, once its signature and signer are checked.

    A part of a batch signed once must hold the workflow's events and nothing else, since the writer put only
    those in it; an entry signed as a batch on `events` is returned whole (the caller keeps the workflow's own).

    Raises:
        SecurityError: As `authenticate_events`; or a part whose proof does not hold, or with another workflow's
            events.
        ValidationError: The body is not a batch of events.
    """
    if not is_proved_part(headers):
        return authenticate_events(security, body, headers)
    signer = verify_part(security, correlation_id, body, headers)
    events = decode_events(body)
    if any(event.correlation_id != correlation_id for event in events):
        raise SecurityError(
            f"a progress part of workflow {correlation_id!r} holds events of another workflow", code="progress_part"
        )
    _check_reporter(security, signer, events)
    return events


def _check_reporter(security: MessageSecurity, signer: str | None, events: list[WorkflowEvent]) -> None:
    """Refuse a `dispatched` event signed by a key the trust policy does not grant `start`: only a dispatcher
    may name a workflow's owner."""
    if signer is None or security.policy.allows(signer, "start"):
        return
    for event in events:
        if event.kind == "dispatched":
            raise SecurityError(
                f"key {signer!r} may not report the dispatch of a workflow: the trust policy does not grant it 'start'",
                code="not_allowed",
            )
