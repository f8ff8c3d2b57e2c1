"""The progress streams of a `SQLiteTransport`: rows of `progress`, one stream per workflow, positions its row ids.

A stream keeps its last `PROGRESS_MAX_ENTRIES` entries, and is forgotten `PROGRESS_RETENTION` seconds after its
last entry (by the transport's sweep, once a minute: see `_sweep`). A reader in the process that appends is woken
at once; one in another process looks again every `_POLL` seconds while it waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..base import ProgressEntry
from . import _queue as q

if TYPE_CHECKING:
    from ._transport import SQLiteTransport

__all__ = ("PROGRESS_MAX_ENTRIES", "PROGRESS_RETENTION", "SQLiteProgressReader", "append_progress")

PROGRESS_MAX_ENTRIES = 10_000
"""How many entries a workflow's stream keeps (the oldest are dropped)."""
PROGRESS_RETENTION = 7 * 24 * 3600.0
"""Seconds a workflow's stream is kept after its last entry."""
_READ_COUNT = 500
_POLL = 0.1


def _append(db: sqlite3.Connection, ns: str, cid: str, body: bytes, headers: str) -> None:
    now = time.time()
    added = db.execute(
        "INSERT INTO progress (ns, correlation_id, body, headers, created) VALUES (?, ?, ?, ?, ?) RETURNING id",
        (ns, cid, body, headers, now),
    ).fetchone()[0]
    if added > PROGRESS_MAX_ENTRIES:  # else no stream can hold more than its cap yet
        # Row ids count the entries of every workflow: the cap counts this workflow's own, the newest kept.
        db.execute(
            "DELETE FROM progress WHERE ns = ? AND correlation_id = ? AND id <= (SELECT id FROM progress "
            "WHERE ns = ? AND correlation_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (ns, cid, ns, cid, PROGRESS_MAX_ENTRIES),
        )


async def append_progress(
    transport: SQLiteTransport, correlation_id: str, body: bytes, headers: Mapping[str, str]
) -> None:
    ns, header_json = transport.namespace, q.dump_headers(headers)
    await transport.db.call(
        lambda db: _append(db, ns, correlation_id, body, header_json),
        doing=f"appending to the progress of {correlation_id!r}",
    )
    transport.progress_arrived.set()
    transport.progress_arrived.clear()


class SQLiteProgressReader:
    """Reads one workflow's stream forward, polling while it waits."""

    def __init__(self, transport: SQLiteTransport, correlation_id: str, after: str | None) -> None:
        self.transport = transport
        self.correlation_id = correlation_id
        self._after = int(after) if after and after.isdigit() else 0
        self._closed = False

    async def read(self, wait: float) -> list[ProgressEntry]:
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, wait)
        while not self._closed:
            found = await self._read_now()
            left = until - loop.time()
            if found or left <= 0:
                return found
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(_POLL, left)):
                    await self.transport.progress_arrived.wait()
        return []

    async def _read_now(self) -> list[ProgressEntry]:
        ns, cid, after = self.transport.namespace, self.correlation_id, self._after
        rows = await self.transport.db.call(
            lambda db: db.execute(
                "SELECT id, body, headers FROM progress WHERE ns = ? AND correlation_id = ? AND id > ? "
                "ORDER BY id LIMIT ?",
                (ns, cid, after, _READ_COUNT),
            ).fetchall(),
            write=False,
            doing=f"reading the progress of {cid!r}",
        )
        if rows:
            self._after = rows[-1][0]
        return [ProgressEntry(str(row_id), bytes(body), q.load_headers(headers)) for row_id, body, headers in rows]

    async def aclose(self) -> None:
        self._closed = True
