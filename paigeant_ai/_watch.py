"""Watching one workflow: its events, as they happen, from its progress stream (a transport's `ProgressStreams`).

Every entry of the stream is a batch of events signed like a batch on `events`, or the workflow's part of a batch
of several workflows with its proof against that batch's one signature; each is checked with
`authenticate_progress` against the trusted keys, and one that does not hold (unsigned, an unknown key, altered, a
proof that leads elsewhere, not events at all) is logged and skipped, as is an event of another workflow. Events
are yielded once each (the same event written twice, after a crash, is yielded once) and in the order of
`store.event_order` among those that arrive together: whatever the stream holds when a read returns, and what
arrives within `linger` seconds after. An event that arrives later than that, with an earlier order key, is
yielded when it arrives.

The watch ends after the event that brings the workflow to a final state (`store.FINAL_STATES`), with what the
stream already holds beside it; a parked workflow (`waiting`, `in_doubt`) is not final.

The offset of each yielded event is opaque text: the stream position before which every entry was yielded, the
digests of the events yielded from the entries after it, and those of the latest events, so that a watch resumed
from it yields exactly what came after, even a late duplicate of a recent event.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pydantic import ValidationError
from pydantic_core import to_json

from ._escape import escape_control
from ._event_auth import authenticate_progress
from ._events import WorkflowEvent
from .exceptions import SecurityError, TransportError, UnknownWorkflow, UserError
from .store import FINAL_STATES, event_order, project
from .transports.base import ProgressEntry, ProgressReader, ProgressStreams, Transport

if TYPE_CHECKING:
    from .security import MessageSecurity

__all__ = ("WatchedEvent", "watch_workflow")

logger = logging.getLogger("paigeant_ai.watch")

_REOPENS = 5
"""Times in a row a watch opens its reader again after the broker connection failed, before it gives up."""
_RECENT = 32
"""Digests of the latest yielded events an offset keeps, to tell a late duplicate of one of them."""


@dataclass(frozen=True, slots=True)
class WatchedEvent:
    """One event of a watched workflow, and the offset to resume watching after it.

    Attributes:
        event: What happened.
        offset: Opaque text; `watch(correlation_id, after=offset)` yields what comes after this event.
    """

    event: WorkflowEvent
    offset: str


@dataclass(slots=True)
class _Cursor:
    position: str | None = None
    """Every entry up to this one was yielded in full."""
    seen: list[str] = field(default_factory=list[str])
    """The digests of the events yielded from entries after `position`."""
    recent: list[str] = field(default_factory=list[str])
    ended: bool = False

    def encode(self) -> str:
        raw = json.dumps({"p": self.position, "s": self.seen, "r": self.recent[-_RECENT:], "e": self.ended})
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, offset: str | None) -> _Cursor:
        if offset is None:
            return cls()
        try:
            raw = json.loads(base64.urlsafe_b64decode(offset + "=" * (-len(offset) % 4)))
            position = raw["p"]
            texts = [*raw["s"], *raw["r"]]
            if (position is not None and not isinstance(position, str)) or not all(isinstance(t, str) for t in texts):
                raise TypeError
            return cls(position, list(raw["s"]), list(raw["r"]), raw.get("e") is True)
        except (ValueError, TypeError, KeyError) as exc:
            raise UserError(
                f"{offset[:40]!r} is not a watch offset: pass the `offset` of an event a watch yielded, or None"
            ) from exc


def _digest(event: WorkflowEvent) -> str:
    return base64.urlsafe_b64encode(hashlib.blake2b(to_json(event), digest_size=9).digest()).decode()


async def watch_workflow(
    transport: Transport,
    security: MessageSecurity,
    correlation_id: str,
    *,
    after: str | None = None,
    poll: float = 1.0,
    linger: float = 0.1,
    start_within: float | None = None,
) -> AsyncIterator[WatchedEvent]:
    """Every event of one workflow, in order, from its start (or `after` an offset) until it ends.

    With `start_within`, a watch from the start that finds no event of the workflow within that many seconds
    raises `UnknownWorkflow` rather than waiting on (for an ID never dispatched, or mistyped).

    Raises:
        UserError: The transport keeps no progress streams, `after` is no offset, or `start_within` is negative.
        UnknownWorkflow: No event of the workflow within `start_within` seconds.
        TransportError: The broker could not be read, six times in a row.
    """
    if not isinstance(transport, ProgressStreams):
        raise UserError(
            f"the {transport.name} transport keeps no progress streams: watch workflows on the in-memory, Redis or "
            "RabbitMQ transport"
        )
    if start_within is not None and not start_within >= 0:
        raise UserError(f"start_within is seconds, at least 0 (or None to wait on), got {start_within!r}")
    cursor = _Cursor.decode(after)
    if cursor.ended:
        return
    loop = asyncio.get_running_loop()
    give_up = None if start_within is None or after is not None else loop.time() + start_within
    known = set(cursor.seen) | set(cursor.recent)
    history: list[WorkflowEvent] = []
    read = _Reading(transport, correlation_id, cursor.position)
    try:
        while True:
            if history:
                give_up = None  # the workflow started: wait on for the rest
            wait = poll if give_up is None else max(0.0, min(poll, give_up - loop.time()))
            entries = await read.together(wait, linger)
            if give_up is not None and not entries and not history and loop.time() >= give_up:
                raise UnknownWorkflow(
                    f"no event of workflow {correlation_id!r} in {start_within:g} seconds: check the ID (a workflow "
                    "the progress stream no longer keeps, or not yet dispatched, has none)",
                    correlation_id=correlation_id,
                )
            if not entries:
                continue
            fresh: list[tuple[WorkflowEvent, str]] = []
            for entry in entries:
                for event in _verified(security, correlation_id, entry):
                    digest = _digest(event)
                    if digest not in known:
                        known.add(digest)
                        fresh.append((event, digest))
            fresh.sort(key=lambda item: event_order(item[0]))
            history.extend(event for event, _ in fresh if event.kind != "agent_output")  # what tells the state
            status = project(correlation_id, history) if fresh else None
            ended = status is not None and status.state in FINAL_STATES
            for index, (event, digest) in enumerate(fresh):
                cursor.seen.append(digest)
                cursor.recent = [*cursor.recent[-_RECENT + 1 :], digest]
                last = index == len(fresh) - 1
                if last:
                    cursor.position, cursor.seen, cursor.ended = entries[-1].position, [], ended
                yield WatchedEvent(event, cursor.encode())
            if not fresh:
                cursor.position = entries[-1].position
            if ended:
                return
    finally:
        await read.close()


class _Reading:
    """A reader of the stream that opens again after the entry it last returned when the broker connection fails
    (up to `_REOPENS` times in a row)."""

    def __init__(self, transport: ProgressStreams, correlation_id: str, after: str | None) -> None:
        self.transport = transport
        self.correlation_id = correlation_id
        self.after = after
        self.reader: ProgressReader | None = None

    async def together(self, poll: float, linger: float) -> list[ProgressEntry]:
        """What the stream holds now, or the first entries within `poll` seconds, with what follows within
        `linger`."""
        entries = await self._read(poll)
        if not entries:
            return []
        for _ in range(20):
            more = await self._read(linger)
            if not more:
                break
            entries.extend(more)
        return entries

    async def _read(self, wait: float) -> list[ProgressEntry]:
        for attempt in range(_REOPENS + 1):
            try:
                if self.reader is None:
                    self.reader = await self.transport.read_progress(self.correlation_id, after=self.after)
                entries = await self.reader.read(wait)
            except TransportError:
                await self.close()
                if attempt == _REOPENS:
                    raise
                logger.warning("reading the progress of %s failed; reading on", escape_control(self.correlation_id))
                await asyncio.sleep(min(2.0**attempt, 10.0))
                continue
            if entries:
                self.after = entries[-1].position
            return entries
        return []  # pragma: no cover - the loop returns or raises

    async def close(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None:
            await reader.aclose()


def _verified(security: MessageSecurity, correlation_id: str, entry: ProgressEntry) -> list[WorkflowEvent]:
    """The events of `entry` that belong to the workflow, once its signature holds; [] (logged) if it does not."""
    try:
        events = authenticate_progress(security, correlation_id, entry.body, entry.headers)
    except SecurityError as exc:
        logger.warning(
            "skipping an entry of the progress of %s: %s", escape_control(correlation_id), escape_control(str(exc))
        )
        return []
    except (ValidationError, ValueError):
        logger.warning("skipping an entry of the progress of %s: not a batch of events", escape_control(correlation_id))
        return []
    mine = [event for event in events if event.correlation_id == correlation_id]
    if len(mine) < len(events):
        logger.warning(
            "skipping %d events of other workflows in the progress of %s",
            len(events) - len(mine),
            escape_control(correlation_id),
        )
    return mine
