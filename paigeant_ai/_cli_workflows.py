"""`paigeant status`, `paigeant workflows` and `paigeant dead-letters`: where workflows are and why they failed.

`status` and `workflows` read a `RedisWorkflowStore` (`PAIGEANT_REDIS_URL`). Unless told `--no-sync`, they first
apply the events waiting on the transport's `events` address (`PAIGEANT_TRANSPORT`), so the store is current
even when no projector runs, and afterwards ask the transport which workflows wait at a step nobody consumes
(`stalled`). `dead-letters` reads the dead-letter queue without losing any letter: each one is
taken, noted and put back at the end of the queue (a broker-neutral way to browse), except the one replayed.
A workflow or a letter is named by its whole ID or by a prefix only it starts with, as `[6e5c217c]` in the logs.
These commands run once: they give up on a broker they cannot reach in a second or two, where a worker retries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from . import observability
from ._events import EventReporter
from ._sealing import seal
from .contracts import DEAD_LETTER, PaigeantMessage, WorkflowEvent
from .exceptions import InvalidMessage, SecurityError, UserError
from .security import MessageSecurity, MessageSigner
from .settings import Settings
from .store import WorkflowProjector, WorkflowStatus, mark_stalled
from .transports import IN_MEMORY_NAMES, Transport, get_transport
from .transports.base import REASON_HEADER, SOURCE_HEADER, Delivery

if TYPE_CHECKING:
    from .transports.redis import RedisWorkflowStore

__all__ = ("COMMANDS", "add_commands", "command_transport", "run_command")

COMMANDS = frozenset({"status", "workflows", "dead-letters"})

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
    _store_arguments(status)

    workflows = commands.add_parser(
        "workflows", parents=parents, help="the most recently updated workflows and their state"
    )
    workflows.add_argument("--limit", type=int, default=20, help="how many to show (default 20)")
    _store_arguments(workflows)

    letters = commands.add_parser(
        "dead-letters", parents=parents, help="list the dead-letter queue with reasons, or replay one"
    )
    letters.add_argument("--limit", type=int, default=50, help="how many letters to show (default 50)")
    letters.add_argument(
        "--replay",
        metavar="ID",
        help="send this letter back to its step (once its cause is fixed): its message ID or its workflow's, "
        "or a prefix only it starts with",
    )


def _store_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--redis-url", help="the Redis of the workflow store (default PAIGEANT_REDIS_URL)")
    parser.add_argument("--no-sync", action="store_true", help="read the store as it is, without applying new events")


async def run_command(args: argparse.Namespace) -> int:
    """Run one of `COMMANDS`; the exit code."""
    if getattr(args, "limit", 1) < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.command == "dead-letters":
        return await _dead_letters(args.transport, limit=args.limit, replay=args.replay)
    store = _workflow_store(args.redis_url)
    store.transport.reconnect_attempts = _COMMAND_RECONNECTS
    async with store.transport:
        if not args.no_sync:
            await _sync(store, args.transport)
        if args.command == "status":
            status = await find_status(store, args.correlation_id)
            if status is not None and not args.no_sync:
                [status] = await _with_stalls([status], args.transport)
            return _print_status(status, args.correlation_id, as_json=args.json)
        statuses = list(await store.list(limit=args.limit))
        if not args.no_sync:
            statuses = await _with_stalls(statuses, args.transport)
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


def _workflow_store(url: str | None) -> RedisWorkflowStore:
    """The store `status` and `workflows` read, with a connection of its own.

    Raises:
        UserError: The `redis` extra is not installed.
    """
    try:
        from .transports.redis import RedisWorkflowStore
    except ImportError as exc:
        raise UserError(f'the Redis workflow store needs its extra: pip install "paigeant-ai[redis]" ({exc})') from exc
    return RedisWorkflowStore.from_url(url)


async def _sync(store: RedisWorkflowStore, transport_name: str | None) -> None:
    chosen = (transport_name or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        return  # in-memory events live and die in their own process
    async with command_transport(chosen) as transport:
        await WorkflowProjector(transport, store).run(burst=True)


async def _with_stalls(statuses: list[WorkflowStatus], transport_name: str | None) -> list[WorkflowStatus]:
    """`statuses`, the workflows whose current step nobody has consumed for a while marked `stalled`."""
    chosen = (transport_name or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES or not any(status.state in ("pending", "running") for status in statuses):
        return statuses
    async with command_transport(chosen) as transport:
        return await mark_stalled(statuses, transport, after=Settings.from_env().stall_after)


# -- IDs by prefix -----------------------------------------------------------------------------------------------


async def find_status(store: RedisWorkflowStore, given: str) -> WorkflowStatus | None:
    """The status of the workflow `given` names: its correlation ID, or a prefix of it no other one starts with.

    Raises:
        UserError: Several workflows start with `given`.
    """
    status = await store.get(given)
    if status is not None or not given:
        return status
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", given) + "*"  # a glob that matches `given` literally
    client = store.transport.client
    with store.transport.errors("looking for workflows by prefix"):
        found = [member.decode() async for member, _ in client.zscan_iter(store.index_key, match=pattern)]
        if len(found) > 1:  # the index may still name workflows whose history expired
            found = [found_id for found_id in found if await client.exists(store.events_key(found_id))]
    if len(found) > 1:
        raise UserError(_ambiguous(given, "workflows", sorted(found)))
    return await store.get(found[0]) if found else None


def _ambiguous(given: str, what: str, candidates: Sequence[str]) -> str:
    shown = ", ".join(candidates[:5])
    more = f" and {len(candidates) - 5} more" if len(candidates) > 5 else ""
    return f"{given!r} is the start of {len(candidates)} {what}: {shown}{more}; give more of the ID"


# -- status ------------------------------------------------------------------------------------------------------


def _print_status(status: WorkflowStatus | None, correlation_id: str, *, as_json: bool) -> int:
    if status is None:
        print(f"no workflow {correlation_id!r} in the store (unknown, expired, or its events not yet applied)")
        return 1
    print(status.model_dump_json(indent=2) if as_json else render_status(status))
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
    if status.failure:
        lines.append(f"  failed: {status.failure}")
    if status.stalled:
        lines.append(f"  stalled: {status.stalled}")
    if status.ended:
        lines.append(f"  ended early: {status.ended}")
    if status.waiting_for:
        waiting = status.waiting_for
        lines.append(f"  {waiting}" if waiting.startswith("waiting") else f"  waiting for: {waiting}")
    if status.current_activity is not None:
        lines.append(f"  current step: {status.current_step} {status.current_activity}")
    if status.remaining and status.state != "completed":
        lines.append(f"  still to run: {', '.join(status.remaining)}")
    if status.steps:
        lines.append("  steps:")
        width = max(len(step.activity) for step in status.steps)
        for step in status.steps:
            took = f"{step.duration:.3f}s" if step.duration is not None else ""
            lines.append(
                f"    {step.step:>3} {step.activity:<{width}}  {step.state:<9} {_attempts(step.attempts):<11} {took}"
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
    return "\n".join(line.rstrip() for line in lines)


def _describe(event: WorkflowEvent) -> str:
    where = f" step {event.step}" if event.step is not None else ""
    where += f" {event.activity}" if event.activity else ""
    text = f"{event.kind:<15}{where}"
    if event.kind in ("step_started", "step_completed") and event.attempt:
        text += f" (attempt {event.attempt + 1})"
    if event.duration is not None:
        text += f" in {event.duration:.3f}s"
    if event.detail:
        text += f": {event.detail}"
    return text


def _print_workflows(statuses: list[WorkflowStatus], *, as_json: bool) -> int:
    if as_json:
        print(json.dumps([status.model_dump(mode="json", exclude={"events"}) for status in statuses], indent=2))
        return 0
    if not statuses:
        print("no workflows in the store")
        return 0
    width = max(len("CORRELATION ID"), *(len(status.correlation_id) for status in statuses))
    print(f"{'STATE':<10} {'UPDATED (UTC)':<19}  {'CORRELATION ID':<{width}}  STEP / REASON")
    for status in statuses:
        where = f"{status.current_step} {status.current_activity}" if status.current_activity else ""
        note = status.stalled or status.failure or status.waiting_for or where or "-"
        if len(note) > 80:
            note = note[:77] + "..."
        print(f"{status.state:<10} {status.updated_at:%Y-%m-%d %H:%M:%S}  {status.correlation_id:<{width}}  {note}")
    return 0


# -- dead letters ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class DeadLetter:
    """One letter of the dead-letter queue."""

    delivery: Delivery
    message: PaigeantMessage | None
    problem: str | None
    """Why the body is not a paigeant message, if it is not."""

    @property
    def reason(self) -> str:
        return self.delivery.headers.get(REASON_HEADER, "(no reason recorded)")

    @property
    def source(self) -> str:
        return self.delivery.headers.get(SOURCE_HEADER, "?")


def _letter(delivery: Delivery) -> DeadLetter:
    try:
        return DeadLetter(delivery, PaigeantMessage.from_json(delivery.body), None)
    except InvalidMessage as exc:
        return DeadLetter(delivery, None, str(exc))


async def browse_dead_letters(transport: Transport, visit: Callable[[DeadLetter], Awaitable[bool]]) -> int:
    """Show each letter waiting in the dead-letter queue to `visit`, oldest first; the number seen.

    A letter `visit` returns True for is put back at the end of the queue; the others are removed (after
    `visit` has done what it does with them). Letters arriving meanwhile wait for the next browse.
    """
    total = await transport.pending(DEAD_LETTER)
    seen = 0
    if total == 0:
        return 0
    async with await transport.consume(DEAD_LETTER, prefetch=min(total, 100)) as consumer:
        while seen < total:
            try:
                delivery = await asyncio.wait_for(anext(consumer), timeout=2.0)
            except (TimeoutError, StopAsyncIteration):
                break  # the rest is held by another consumer
            seen += 1
            if await visit(_letter(delivery)):
                await transport.publish(DEAD_LETTER, delivery.body, headers=delivery.headers)
            await transport.ack(delivery)
    return seen


async def replay_dead_letter(transport: Transport, letter: DeadLetter, signer: MessageSecurity) -> PaigeantMessage:
    """Send a letter back to the step it failed at, as one more attempt, signed by `signer`.

    Raises:
        UserError: The letter is not a paigeant message, or its workflow has no step left.
    """
    message = letter.message
    if message is None or message.routing_slip.current is None:
        raise UserError(f"this letter cannot be replayed: {letter.problem or 'its workflow has no step left'}")
    reason = letter.delivery.headers.get(REASON_HEADER, "")
    if reason.startswith("security check failed"):
        raise UserError(f"this letter was refused by a security check and is never replayed: {reason}")
    if isinstance(signer, MessageSigner):
        try:  # re-signing vouches for the letter: only one a trusted key signed as it is gets that
            signer.check_signature(message, letter.delivery.body)
        except SecurityError as exc:
            raise UserError(f"this letter cannot be replayed: {exc}") from None
    replay = message.next_hop(attempt=message.attempt + 1)
    with observability.replay_span(replay, transport.name):
        body = seal(replay, signer, max_bytes=Settings.from_env().max_message_bytes)
        await transport.publish(message.routing_slip.current, body, headers=dict(replay.headers))
    await EventReporter(transport, batched=False, on_span=False).report(
        "replayed", replay, detail="from the dead-letter queue"
    )
    return replay


async def _dead_letters(transport_name: str | None, *, limit: int, replay: str | None) -> int:
    chosen = (transport_name or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "the in-memory transport's dead letters live in the process that made them; "
            "use --transport rabbitmq or redis (or PAIGEANT_TRANSPORT)"
        )
    async with command_transport(chosen) as transport:
        if replay is not None:
            return await _replay(transport, replay)
        shown: list[DeadLetter] = []

        async def note(letter: DeadLetter) -> bool:
            if len(shown) < limit:
                shown.append(letter)
            return True

        total = await browse_dead_letters(transport, note)
    if not total:
        print("the dead-letter queue is empty")
        return 0
    more = f" (showing the oldest {len(shown)})" if total > len(shown) else ""
    print(f"{total} dead letter{'s' if total != 1 else ''} on {chosen}{more}:")
    for letter in shown:
        print()
        print("  " + _letter_heading(letter))
        print(f"    reason: {letter.reason}")
    print()
    print("replay one once its cause is fixed: paigeant dead-letters --replay <message id>")
    return 0


def _letter_heading(letter: DeadLetter) -> str:
    message = letter.message
    if message is None:
        return f"(not a paigeant message: {letter.problem}) from {letter.source}"
    step = f"step {message.step} {message.routing_slip.current}" if message.routing_slip.current else "no step left"
    return (
        f"message {message.message_id}  workflow {message.correlation_id}  {step}  "
        f"attempt {message.attempt + 1}  from {letter.source}"
    )


async def _dead_letter_id(transport: Transport, given: str) -> str | None:
    """The message ID of the one letter `given` names: its message ID, or a prefix of its message ID or of its
    workflow's correlation ID that no other letter starts with.

    Raises:
        UserError: `given` is empty, or several letters start with it.
    """
    if not given:
        raise UserError("--replay needs the message ID of a letter (or its workflow's), or a prefix of it")
    candidates: dict[str, str] = {}  # message id: its letter's heading

    async def note(letter: DeadLetter) -> bool:
        message = letter.message
        if message is not None and (message.message_id.startswith(given) or message.correlation_id.startswith(given)):
            candidates[message.message_id] = f"message {message.message_id} (workflow {message.correlation_id})"
        return True

    await browse_dead_letters(transport, note)
    if given in candidates:
        return given
    if len(candidates) > 1:
        raise UserError(_ambiguous(given, "dead letters", list(candidates.values())))
    return next(iter(candidates), None)


async def _replay(transport: Transport, given: str) -> int:
    from .security import MessageSigner

    signer = MessageSigner.from_settings(transport)
    signer.ensure_ready()  # the replay is signed with this process's key, which the workers must trust
    message_id = await _dead_letter_id(transport, given)
    if message_id is None:
        print(f"no dead letter with message id {given!r}, nor one whose message or workflow ID starts with it")
        return 1
    replayed: list[tuple[DeadLetter, PaigeantMessage]] = []

    async def replay_match(letter: DeadLetter) -> bool:
        if replayed or letter.message is None or letter.message.message_id != message_id:
            return True
        replayed.append((letter, await replay_dead_letter(transport, letter, signer)))
        return False

    await browse_dead_letters(transport, replay_match)
    if not replayed:
        print(f"no dead letter with message id {message_id!r}: another process took it meanwhile")
        return 1
    letter, message = replayed[0]
    print(
        f"replayed workflow {message.correlation_id} to step {message.step} {message.routing_slip.current} "
        f"as message {message.message_id} (attempt {message.attempt + 1})"
    )
    print(f"  it had failed: {letter.reason}")
    return 0
