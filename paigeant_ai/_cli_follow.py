"""`paigeant status ID --follow`: a workflow's events as they happen, from its start until it ends.

It reads the workflow's progress stream on the transport (`PAIGEANT_TRANSPORT`), and shows only events a trusted
key (`PAIGEANT_TRUSTED_KEYS`) signed. A workflow with nothing in its stream for `FIND_WITHIN` seconds is looked up
in the workflow store, as `status` does, which takes a prefix of its ID; one the store does not know either is
reported, with exit code 1, rather than waited for. Each line is one event; with `--json`, one JSON object a
line, with the `offset` that `--after` takes to go on after it. The exit code is 0 when the workflow
completed, 1 when it ended otherwise (or when resumed after its last event).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator

from ._cli_workflows import (
    _describe,  # pyright: ignore[reportPrivateUsage]
    command_store,
    command_transport,
    find_status,
    sync_store,
)
from ._escape import escape_control, escape_json
from ._events import WorkflowEvent
from ._projector import _verifier  # pyright: ignore[reportPrivateUsage]
from ._watch import WatchedEvent, watch_workflow
from .exceptions import TransportError, UnknownWorkflow, UserError
from .settings import Settings
from .store import FINAL_STATES, WorkflowStatus, project
from .transports import IN_MEMORY_NAMES, Transport

__all__ = ("ENDED_WITHIN", "FIND_WITHIN", "follow")

FIND_WITHIN = 3.0
"""Seconds `--follow` waits for a workflow's first event before it looks the ID up in the workflow store."""
ENDED_WITHIN = 30.0
"""Seconds `--follow` waits for the first event of a workflow the store says ended (its stream may have expired)."""


async def follow(args: argparse.Namespace) -> int:
    """Print the events of `args.correlation_id` until its workflow ends; the exit code."""
    chosen = (args.transport or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "--follow reads a broker, and in-memory workflows live in their own process: "
            "give --transport sqlite|redis|rabbitmq (or PAIGEANT_TRANSPORT)"
        )
    correlation_id: str = args.correlation_id
    seen: list[WorkflowEvent] = []
    async with command_transport(chosen) as transport:
        verifier = _verifier(transport)

        async def print_events(of: str, start_within: float | None) -> None:
            watch = watch_workflow(transport, verifier, of, after=args.after, start_within=start_within)
            await _print_events(watch, seen, as_json=args.json)

        try:
            await print_events(correlation_id, FIND_WITHIN)
        except UnknownWorkflow:
            found = await _in_store(args, transport)
            if found is None:
                print(_not_followed(correlation_id, in_store=False))
                return 1
            correlation_id = found.correlation_id
            # A workflow the store knows is there; a RabbitMQ stream may take longer than `FIND_WITHIN` to reach its
            # first event. One that ended may have outlived its stream: that one is not waited for long.
            try:
                await print_events(correlation_id, ENDED_WITHIN if found.state in FINAL_STATES else None)
            except UnknownWorkflow:
                print(_not_followed(correlation_id, in_store=True))
                return 1
    status = project(correlation_id, seen)
    return 0 if status is not None and status.state == "completed" else 1


def _not_followed(correlation_id: str, *, in_store: bool) -> str:
    if in_store:
        return (
            f"workflow {correlation_id!r} has nothing left in its progress stream: "
            f"paigeant status {correlation_id} tells where it is"
        )
    return (
        f"no workflow {correlation_id!r}: nothing in its progress stream, and not in the store (unknown, expired, "
        "or not dispatched yet)"
    )


async def _print_events(watch: AsyncIterator[WatchedEvent], seen: list[WorkflowEvent], *, as_json: bool) -> None:
    async for watched in watch:
        event = watched.event
        seen.append(event)
        if as_json:
            line = {"offset": watched.offset, "event": event.model_dump(mode="json")}
            print(escape_json(json.dumps(line, ensure_ascii=False)), flush=True)
        else:
            print(escape_control(f"{event.at:%H:%M:%S.%f}"[:-3] + f"  {_describe(event)}"), flush=True)


async def _in_store(args: argparse.Namespace, transport: Transport) -> WorkflowStatus | None:
    """The status of the workflow the store knows by `args.correlation_id` (its ID or a prefix), or None.

    Raises:
        UserError: Several workflows start with it.
    """
    try:
        async with command_store(transport, args.redis_url) as store:
            if not args.no_sync:
                await sync_store(store, transport)
            status = await find_status(store, args.correlation_id)
    except TransportError:
        return None  # no store to ask: the ID is all there is
    return status
