"""`paigeant status`, `paigeant workflows` and `paigeant dead-letters`: where workflows are and why they failed.

`status` and `workflows` read the transport's own workflow store when it has one (SQLite: in its file; Redis), else
(RabbitMQ) a `RedisWorkflowStore` (`--redis-url`, `PAIGEANT_REDIS_URL`). Unless told `--no-sync`, they first
apply the events waiting on the transport's `events` address (`PAIGEANT_TRANSPORT`), so the store is current
even when no projector runs, and afterwards ask the transport which workflows wait at a step nobody consumes
(`stalled`). `dead-letters` reads the dead-letter queue without losing any letter: each one is
taken, noted and put back at the end of the queue (a broker-neutral way to browse), except the one replayed.
A workflow or a letter is named by its whole ID or by a prefix only it starts with, as `[6e5c217c]` in the logs.
These commands run once: they give up on a broker they cannot reach in a second or two, where a worker retries.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, get_args, runtime_checkable

from ._escape import escape_control, escape_json
from ._events import EventKind, WorkflowEvent
from ._ledger import describe_usage
from ._stalls import WAITING_STATES
from .exceptions import UserError
from .settings import Settings
from .store import WorkflowProjector, WorkflowStatus, WorkflowStore, mark_stalled
from .transports import IN_MEMORY_NAMES, Transport, get_transport
from .transports.base import SharedStores

if TYPE_CHECKING:
    from .transports.redis import RedisWorkflowStore

__all__ = (
    "COMMANDS",
    "add_commands",
    "ambiguous",
    "command_store",
    "command_transport",
    "find_status",
    "render_status",
    "run_command",
    "store_arguments",
    "sync_store",
    "workflow_store",
)

COMMANDS = frozenset({"status", "workflows"})

REDIS_URL_HELP = "on RabbitMQ: the Redis of the workflow store (default PAIGEANT_REDIS_URL)"
"""`--redis-url`: SQLite and Redis keep their workflow store themselves."""

_COMMAND_RECONNECTS = 1
"""Retries of a Redis command by a command that runs once (a worker's transport keeps retrying for a while)."""


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add the subcommands to the `paigeant` parser; `common` holds the options every broker command takes."""
    parents = list(common)
    status = commands.add_parser(
        "status", parents=parents, help="where one workflow is, what happened to it and why it failed"
    )
    status.add_argument("correlation_id", help="the workflow's correlation ID, or a prefix only it starts with")
    store_arguments(status)
    status.add_argument(
        "--follow",
        action="store_true",
        help="print the workflow's events as they happen, from its start until it ends (on a broker)",
    )
    status.add_argument("--after", help="with --follow: go on after this offset (from a --json line)")

    workflows = commands.add_parser(
        "workflows", parents=parents, help="the most recently updated workflows and their state"
    )
    workflows.add_argument("--limit", type=int, default=20, help="how many to show (default 20)")
    store_arguments(workflows)


def store_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a command that reads the workflow store."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--redis-url", help=REDIS_URL_HELP)
    parser.add_argument("--no-sync", action="store_true", help="read the store as it is, without applying new events")


async def run_command(args: argparse.Namespace) -> int:
    """Run one of `COMMANDS`; the exit code."""
    if getattr(args, "limit", 1) < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if getattr(args, "follow", False):
        from ._cli_follow import follow

        return await follow(args)
    if getattr(args, "after", None) is not None:
        raise UserError("--after goes with --follow: paigeant status ID --follow --after OFFSET")
    chosen = (args.transport or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "in-memory workflows live in the process that runs them: ask its WorkflowStore there, "
            "or run workflows on sqlite, redis or rabbitmq (--transport or PAIGEANT_TRANSPORT)"
        )
    async with command_transport(chosen) as transport, command_store(transport, args.redis_url) as store:
        if not args.no_sync:
            await sync_store(store, transport)
        if args.command == "status":
            status = await find_status(store, args.correlation_id)
            if status is not None and not args.no_sync:
                [status] = await _with_stalls([status], transport)
            return _print_status(status, args.correlation_id, as_json=args.json)
        statuses = list(await store.list(limit=args.limit))
        if not args.no_sync:
            statuses = await _with_stalls(statuses, transport)
        return _print_workflows(statuses, as_json=args.json)


@asynccontextmanager
async def command_transport(name: str | None = None) -> AsyncGenerator[Transport]:
    """A connected transport for a command that runs once: it gives up on a broker it cannot reach in a second
    or two, where a worker's transport keeps trying."""
    chosen = (name or Settings.from_env().transport).strip().lower()
    options: dict[str, float] = {}
    if chosen == "redis":
        options["reconnect_attempts"] = _COMMAND_RECONNECTS
    elif chosen == "rabbitmq":
        options["timeout"] = 10.0
    async with get_transport(chosen, **options) as transport:
        yield transport


@asynccontextmanager
async def command_store(transport: Transport, redis_url: str | None) -> AsyncGenerator[WorkflowStore]:
    """The workflow store of a command on the connected `transport`: the transport's own when it has one (SQLite,
    Redis), else the Redis store at `redis_url` (`PAIGEANT_REDIS_URL`), connected for the command.

    Raises:
        UserError: The transport has no store of its own and the `redis` extra is not installed.
    """
    if isinstance(transport, SharedStores):
        yield transport.workflow_store()
        return
    store = workflow_store(redis_url)
    store.transport.reconnect_attempts = _COMMAND_RECONNECTS
    async with store.transport:
        yield store


def workflow_store(url: str | None) -> RedisWorkflowStore:
    """A Redis workflow store with a connection of its own, for a transport that keeps none (RabbitMQ).

    Raises:
        UserError: The `redis` extra is not installed.
    """
    try:
        from .transports.redis import RedisWorkflowStore
    except ImportError as exc:
        raise UserError(f'the Redis workflow store needs its extra: pip install "paigeant-ai[redis]" ({exc})') from exc
    return RedisWorkflowStore.from_url(url)


async def sync_store(store: WorkflowStore, transport: Transport) -> None:
    """Apply the events waiting on the connected `transport`'s `events` address to `store`, so that it is current."""
    await WorkflowProjector(transport, store).run(burst=True)


async def _with_stalls(statuses: list[WorkflowStatus], transport: Transport) -> list[WorkflowStatus]:
    """`statuses`, the workflows whose current step nobody has consumed for a while marked `stalled`."""
    if not any(status.state in WAITING_STATES for status in statuses):
        return statuses
    return await mark_stalled(statuses, transport, after=Settings.from_env().stall_after)


# -- IDs by prefix -----------------------------------------------------------------------------------------------


@runtime_checkable
class _ByPrefix(Protocol):
    """A workflow store that finds workflows by the start of their ID (the SQLite, Redis and in-memory ones)."""

    async def ids_starting_with(self, prefix: str) -> list[str]: ...


async def find_status(store: WorkflowStore, given: str) -> WorkflowStatus | None:
    """The status of the workflow `given` names: its correlation ID, or a prefix of it no other one starts with
    (on a store that finds IDs by prefix; on another, the whole ID only).

    Raises:
        UserError: Several workflows start with `given`.
    """
    status = await store.get(given)
    if status is not None or not given or not isinstance(store, _ByPrefix):
        return status
    found = await store.ids_starting_with(given)
    if len(found) > 1:
        raise UserError(ambiguous(given, "workflows", found))
    return await store.get(found[0]) if found else None


def ambiguous(given: str, what: str, candidates: Sequence[str]) -> str:
    shown = ", ".join(candidates[:5])
    more = f" and {len(candidates) - 5} more" if len(candidates) > 5 else ""
    return f"{given!r} is the start of {len(candidates)} {what}: {shown}{more}; give more of the ID"


# -- status ------------------------------------------------------------------------------------------------------


def _print_status(status: WorkflowStatus | None, correlation_id: str, *, as_json: bool) -> int:
    if status is None:
        print(f"no workflow {correlation_id!r} in the store (unknown, expired, or its events not yet applied)")
        return 1
    print(escape_json(status.model_dump_json(indent=2)) if as_json else render_status(status))
    return 0


def _clock(at: datetime) -> str:
    return at.strftime("%H:%M:%S.%f")[:-3]


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def render_status(status: WorkflowStatus) -> str:
    """A readable timeline of one workflow."""
    elapsed = (status.updated_at - status.started_at).total_seconds()
    lines = [
        f"workflow {status.correlation_id}: {status.state}",
        f"  started {status.started_at:%Y-%m-%d %H:%M:%S} UTC, last event {elapsed:.3f}s later",
    ]
    if status.deadline is not None:
        lines.append(f"  deadline: {status.deadline:%Y-%m-%d %H:%M:%S} UTC")
    if status.cancelled:
        lines.append(f"  cancelled: {status.cancelled}")
    if status.failure:
        lines.append(f"  failed: {status.failure}")
    if status.compensation:
        lines.append(f"  compensation: {status.compensation}")
    if status.stalled:
        lines.append(f"  stalled: {status.stalled}")
    if status.ended:
        lines.append(f"  ended early: {status.ended}")
    if status.waiting_for:
        waiting = status.waiting_for
        lines.append(f"  {waiting}" if waiting.startswith(("waiting", "in doubt")) else f"  waiting for: {waiting}")
    if status.usage is not None:
        lines.append(f"  usage: {describe_usage(status.usage)}")
    if status.current_activity is not None:
        lines.append(f"  current step: {status.current_step} {status.current_activity}")
    if status.remaining and status.state != "completed":
        lines.append(f"  still to run: {', '.join(status.remaining)}")
    if status.steps:
        lines.append("  steps:")
        width = max(len(step.activity) for step in status.steps)
        for step in status.steps:
            took = f"{step.duration:.3f}s" if step.duration is not None else ""
            if step.timeout is not None and step.state in ("running", "retrying"):
                took = f"timeout {step.timeout:g}s"
            undoes = f"  undoes {step.undoes}" if step.undoes else ""
            undoes += f"  branch {step.branch}" if step.branch else ""
            undoes += f"  version {step.version}" if step.version else ""
            lines.append(
                f"    {step.step:>3} {step.activity:<{width}}  {step.state:<9} {_attempts(step.attempts):<11} {took}"
                f"{undoes}"
            )
            if step.error and step.state in ("failed", "retrying"):
                lines.append(f"        {step.error}")
            elif step.error and step.state == "completed":
                lines.append(f"        (earlier attempt: {step.error})")
    lines.append("  timeline:")
    for event in status.events:
        offset = (event.at - status.started_at).total_seconds()
        lines.append(f"    {_clock(event.at)} +{offset:.3f}s  {_describe(event)}")
    if status.payload is not None:
        payload = json.dumps(status.payload, indent=2, sort_keys=True, ensure_ascii=False)
        lines.append("  final payload:")
        lines.extend(f"    {line}" for line in payload.splitlines())
    return "\n".join(escape_control(line.rstrip()) for line in lines)  # what workflows said is shown, never obeyed


_KIND_WIDTH = max(len(kind) for kind in get_args(EventKind))
"""The width of the timeline's kind column: the longest kind (`compensation_failed`), so every row lines up."""


def _describe(event: WorkflowEvent) -> str:
    where = f" step {event.step}" if event.step is not None else ""
    where += f" {event.activity}" if event.activity else ""
    where += f" [branch {event.branch}]" if event.branch else ""
    text = f"{event.kind:<{_KIND_WIDTH}}{where}"
    if event.kind in ("step_started", "step_completed") and event.attempt:
        text += f" (attempt {event.attempt + 1})"
    if event.undoes:
        text += f" undoing {event.undoes}"
    if event.by:
        text += f" by {event.by}"
    if event.duration is not None:
        text += f" in {event.duration:.3f}s"
    if event.detail:
        text += f": {event.detail}"
    return text


def _print_workflows(statuses: list[WorkflowStatus], *, as_json: bool) -> int:
    if as_json:
        listing = [status.model_dump(mode="json", exclude={"events"}) for status in statuses]
        print(escape_json(json.dumps(listing, indent=2)))
        return 0
    if not statuses:
        print("no workflows in the store")
        return 0
    width = max(len("CORRELATION ID"), *(len(status.correlation_id) for status in statuses))
    states = max(10, *(len(status.state) for status in statuses))
    print(f"{'STATE':<{states}} {'UPDATED (UTC)':<19}  {'CORRELATION ID':<{width}}  STEP / REASON")
    for status in statuses:
        where = f"{status.current_step} {status.current_activity}" if status.current_activity else ""
        note = status.stalled or status.cancelled or status.failure or status.waiting_for or where or "-"
        if len(note) > 80:
            note = note[:77] + "..."
        line = (
            f"{status.state:<{states}} {status.updated_at:%Y-%m-%d %H:%M:%S}  {status.correlation_id:<{width}}  {note}"
        )
        print(escape_control(line))
    return 0
