"""The progress streams of an `InMemoryTransport`: one bounded list per workflow, in this process's memory.

Each workflow keeps its latest `max_entries` entries; the latest `max_workflows` workflows are kept, and a
workflow's stream is forgotten `retention` seconds after its last entry. Positions count up across the transport.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from .base import ProgressEntry

__all__ = ("MemoryProgress",)


@dataclass(slots=True)
class _Stream:
    entries: list[ProgressEntry] = field(default_factory=list[ProgressEntry])
    last: float = 0.0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryProgress:
    """The streams, and readers over them."""

    def __init__(self, *, max_entries: int, max_workflows: int, retention: float) -> None:
        self.max_entries = max_entries
        self.max_workflows = max_workflows
        self.retention = retention
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._positions = itertools.count(1)

    def append(self, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> None:
        stream = self._stream(correlation_id)
        stream.entries.append(ProgressEntry(str(next(self._positions)), body, dict(headers)))
        del stream.entries[: max(0, len(stream.entries) - self.max_entries)]
        stream.last = time.monotonic()
        self._streams.move_to_end(correlation_id)
        while len(self._streams) > self.max_workflows:
            self._streams.popitem(last=False)
        stream.arrived.set()

    def reader(self, correlation_id: str, after: str | None) -> MemoryProgressReader:
        return MemoryProgressReader(self, correlation_id, _position(after))

    def _stream(self, correlation_id: str) -> _Stream:
        stream = self._streams.get(correlation_id)
        if stream is not None and time.monotonic() - stream.last > self.retention and stream.entries:
            stream.entries.clear()
        if stream is None:
            stream = self._streams[correlation_id] = _Stream()
        return stream


class MemoryProgressReader:
    """Reads one workflow's stream in memory."""

    def __init__(self, progress: MemoryProgress, correlation_id: str, after: int) -> None:
        self._progress = progress
        self._correlation_id = correlation_id
        self._after = after
        self._closed = False

    async def read(self, wait: float) -> list[ProgressEntry]:
        deadline = asyncio.get_running_loop().time() + wait
        while not self._closed:
            stream = self._progress._stream(self._correlation_id)
            found = [entry for entry in stream.entries if int(entry.position) > self._after]
            if found:
                self._after = int(found[-1].position)
                return found
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return []
            stream.arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await stream.arrived.wait()
            except TimeoutError:
                return []
        return []

    async def aclose(self) -> None:
        self._closed = True


def _position(after: str | None) -> int:
    if after is None:
        return 0
    try:
        return int(after)
    except ValueError:
        return 0
