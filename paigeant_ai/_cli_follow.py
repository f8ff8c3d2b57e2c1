"""`paigeant status ID --follow`: a workflow's events as they happen, from its start until it ends.

It reads the workflow's progress stream on the transport (`PAIGEANT_TRANSPORT`), not the workflow store, and
shows only events a trusted key (`PAIGEANT_TRUSTED_KEYS`) signed. Each line is one event; with `--json`, one JSON
object a line, with the `offset` that `--after` takes to go on after it. The exit code is 0 when the workflow
completed, 1 when it ended otherwise (or when resumed after its last event).
"""

from __future__ import annotations

import argparse
import json

from ._cli_workflows import _describe, command_transport  # pyright: ignore[reportPrivateUsage]
from ._escape import escape_control, escape_json
from ._events import WorkflowEvent
from ._projector import _verifier  # pyright: ignore[reportPrivateUsage]
from ._watch import watch_workflow
from .exceptions import UserError
from .settings import Settings
from .store import project
from .transports import IN_MEMORY_NAMES

__all__ = ("follow",)


async def follow(args: argparse.Namespace) -> int:
    """Print the events of `args.correlation_id` until its workflow ends; the exit code."""
    chosen = (args.transport or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "--follow reads a broker, and in-memory workflows live in their own process: "
            "give --transport redis|rabbitmq (or PAIGEANT_TRANSPORT)"
        )
    correlation_id: str = args.correlation_id
    seen: list[WorkflowEvent] = []
    async with command_transport(chosen) as transport:
        verifier = _verifier(transport)
        async for watched in watch_workflow(transport, verifier, correlation_id, after=args.after):
            event = watched.event
            seen.append(event)
            if args.json:
                line = {"offset": watched.offset, "event": event.model_dump(mode="json")}
                print(escape_json(json.dumps(line, ensure_ascii=False)), flush=True)
            else:
                print(escape_control(f"{event.at:%H:%M:%S.%f}"[:-3] + f"  {_describe(event)}"), flush=True)
    status = project(correlation_id, seen)
    return 0 if status is not None and status.state == "completed" else 1
