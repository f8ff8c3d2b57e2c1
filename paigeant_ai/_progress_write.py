"""Writing signed batches of events into the workflows' progress streams (a transport's `ProgressStreams`).

Each entry is one workflow's share of a batch. A batch of one workflow, the usual case, goes in as it was
published, with the same signature (`paigeant-events+jws`). A batch of several is split, and its parts signed
together, once: one signature over a Merkle tree of the parts, and each part with its proof (see
`paigeant_ai._progress_proof`). Either way `authenticate_progress` checks an entry on its own.

A worker's writes go in the background, one at a time in the order they were given, so that a hop never waits
on them; at most the writes still queued are lost when its process dies. A write that fails is logged and
dropped: the progress stream is a view, never the workflow. So are the oldest of the writes queued past
`MAX_QUEUED`, should the broker take them slower than they come.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic_core import to_json

from ._escape import escape_control
from ._merkle import MAX_LEAVES
from ._progress_proof import sign_parts
from .transports.base import ProgressStreams, Transport

if TYPE_CHECKING:
    from .security import MessageSecurity

__all__ = ("ProgressWriter",)

logger = logging.getLogger("paigeant_ai.events")

_Entry = tuple[str, bytes, dict[str, str]]
MAX_QUEUED = 10_000
"""Entries a process holds for the progress streams at most while the broker is slow; past it the oldest go."""
_AT_ONCE = 500


class ProgressWriter:
    """Appends batches of events to the progress streams of their workflows, when the transport has them.

    Args:
        transport: Where the streams are; a transport without `ProgressStreams` makes every call a no-op.
        security: Signs the parts of a batch of several workflows (a batch of one workflow keeps its own
            signature); None, or unsigned, leaves them unsigned, as their batch is.
    """

    def __init__(self, transport: Transport, security: MessageSecurity | None) -> None:
        self.streams = transport if isinstance(transport, ProgressStreams) else None
        self.security = security
        self._queued: deque[_Entry] = deque()
        self._task: asyncio.Task[None] | None = None

    def add(self, events: Sequence[dict[str, Any]], body: bytes, headers: dict[str, str] | None) -> None:
        """Queue a batch (its events' values, its body and the headers that sign it) to be written in the
        background, after those queued before."""
        if self.streams is None:
            return
        self._queued.extend(self._entries(events, body, headers))
        if len(self._queued) > MAX_QUEUED:
            dropped = len(self._queued) - MAX_QUEUED
            for _ in range(dropped):
                self._queued.popleft()
            logger.warning(
                "dropped %d entries for the progress streams: the broker takes them slower than they come", dropped
            )
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="paigeant-progress")

    async def write(self, events: Sequence[dict[str, Any]], body: bytes, headers: dict[str, str] | None) -> None:
        """Write a batch now, after what is queued; a failure is logged."""
        if self.streams is None:
            return
        await self.flush()
        for entry in self._entries(events, body, headers):
            await self._append(entry)

    async def flush(self) -> None:
        """Return once everything queued is written (or failed)."""
        while self._task is not None and not self._task.done():
            await asyncio.gather(self._task, return_exceptions=True)

    def _entries(self, events: Sequence[dict[str, Any]], body: bytes, headers: dict[str, str] | None) -> list[_Entry]:
        by_workflow: dict[str, list[dict[str, Any]]] = {}
        for values in events:
            correlation_id = values.get("correlation_id")
            if isinstance(correlation_id, str) and correlation_id:
                by_workflow.setdefault(correlation_id, []).append(values)
        if len(by_workflow) == 1 and len(next(iter(by_workflow.values()))) == len(events):
            return [(next(iter(by_workflow)), body, dict(headers or {}))]
        parts = [(correlation_id, to_json(part)) for correlation_id, part in by_workflow.items()]
        entries: list[_Entry] = []
        for start in range(0, len(parts), MAX_LEAVES):
            entries.extend(self._signed(parts[start : start + MAX_LEAVES], signed=bool(headers)))
        return entries

    def _signed(self, parts: list[tuple[str, bytes]], *, signed: bool) -> list[_Entry]:
        """`parts` with the headers that sign them all at once; unsigned when their batch is."""
        if not signed or self.security is None:
            return [(correlation_id, body, {}) for correlation_id, body in parts]
        signatures = sign_parts(self.security, parts)
        return [(correlation_id, body, own) for (correlation_id, body), own in zip(parts, signatures, strict=True)]

    async def _drain(self) -> None:
        while self._queued:
            # Everything queued goes out at once, in order (one pipeline on Redis, pipelined confirms on RabbitMQ).
            entries = [self._queued.popleft() for _ in range(min(len(self._queued), _AT_ONCE))]
            await asyncio.gather(*(self._append(entry) for entry in entries))

    async def _append(self, entry: _Entry) -> None:
        assert self.streams is not None
        correlation_id, body, headers = entry
        try:
            await self.streams.append_progress(correlation_id, body, headers)
        except Exception:
            logger.warning("could not write the progress of %s", escape_control(correlation_id), exc_info=True)
