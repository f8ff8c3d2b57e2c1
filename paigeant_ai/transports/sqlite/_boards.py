"""The cancel board and the registry board of a `SQLiteTransport`: rows of opaque bytes, read by every process.

A board never parses a record and never raises on foreign data it finds (readers verify each record): a row that
someone wrote by hand and that is too large is not read.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from .._cancel_book import check_post, readable_id, warn_full
from ..base import MAX_CANCEL_RECORD_BYTES, MAX_CANCEL_RECORDS, MAX_REGISTRY_RECORD_BYTES, check_registry_post

if TYPE_CHECKING:
    from ._transport import SQLiteTransport

__all__ = ("SQLiteCancelBoard", "SQLiteRegistryBoard")

_IDS_PER_QUERY = 500
"""Most correlation IDs one query of `cancelled_among` names (SQLite bounds the parameters of a statement)."""


def _post_cancel(db: sqlite3.Connection, ns: str, cid: str, record: bytes, ttl: float) -> bool:
    """Add `record` (the same bytes again: keep the later expiry); False if the ID has its most records already."""
    now = time.time()
    db.execute("DELETE FROM cancels WHERE ns = ? AND correlation_id = ? AND expires <= ?", (ns, cid, now))
    known = db.execute(
        "UPDATE cancels SET expires = max(expires, ?) WHERE ns = ? AND correlation_id = ? AND record = ?",
        (now + ttl, ns, cid, record),
    ).rowcount
    if known:
        return True
    count, last = db.execute(
        "SELECT count(*), max(seq) FROM cancels WHERE ns = ? AND correlation_id = ?", (ns, cid)
    ).fetchone()
    if count >= MAX_CANCEL_RECORDS:
        return False
    db.execute("INSERT INTO cancels VALUES (?, ?, ?, ?, ?)", (ns, cid, (last or 0) + 1, record, now + ttl))
    return True


def _read_cancels(db: sqlite3.Connection, ns: str, ids: list[str]) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    now = time.time()
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start : start + _IDS_PER_QUERY]
        rows = db.execute(
            f"SELECT correlation_id, record FROM cancels WHERE ns = ? AND expires > ? "
            f"AND correlation_id IN ({','.join('?' * len(chunk))}) ORDER BY correlation_id, seq",
            (ns, now, *chunk),
        )
        for cid, record in rows:
            records = found.setdefault(cid, [])
            if len(records) < MAX_CANCEL_RECORDS and len(record) <= MAX_CANCEL_RECORD_BYTES:
                records.append(bytes(record))
    return {cid: records for cid, records in found.items() if records}


class SQLiteCancelBoard:
    """The cancel board of a `SQLiteTransport`, shared by every process on the same file and namespace."""

    def __init__(self, transport: SQLiteTransport) -> None:
        self.transport = transport

    async def post(self, correlation_id: str, record: bytes, *, ttl: float) -> None:
        check_post(correlation_id, record, ttl)
        ns = self.transport.namespace
        added = await self.transport.db.call(
            lambda db: _post_cancel(db, ns, correlation_id, record, ttl),
            doing=f"posting a cancel record for {correlation_id!r}",
        )
        if not added:
            warn_full(correlation_id)

    async def records(self, correlation_id: str) -> list[bytes]:
        if not readable_id(correlation_id):
            return []
        return (await self.cancelled_among([correlation_id])).get(correlation_id, [])

    async def cancelled_among(self, correlation_ids: Collection[str]) -> dict[str, list[bytes]]:
        ids = list(dict.fromkeys(cid for cid in correlation_ids if readable_id(cid)))
        if not ids:
            return {}
        ns = self.transport.namespace
        return await self.transport.db.call(
            lambda db: _read_cancels(db, ns, ids), write=False, doing="reading the cancel records"
        )

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None


class SQLiteRegistryBoard:
    """The registry board of a `SQLiteTransport`: each worker's latest record, kept until its ttl has passed."""

    def __init__(self, transport: SQLiteTransport) -> None:
        self.transport = transport

    async def post(self, worker_id: str, record: bytes, *, ttl: float) -> None:
        check_registry_post(worker_id, record, ttl)
        row = (self.transport.namespace, worker_id, record, time.time() + ttl)
        await self.transport.db.call(
            lambda db: db.execute("INSERT OR REPLACE INTO registry VALUES (?, ?, ?, ?)", row),
            doing=f"posting the registry record of {worker_id!r}",
        )

    async def records(self) -> list[bytes]:
        ns, now = self.transport.namespace, time.time()
        rows = await self.transport.db.call(
            lambda db: db.execute("SELECT record FROM registry WHERE ns = ? AND until > ?", (ns, now)).fetchall(),
            write=False,
            doing="reading the registry",
        )
        return [bytes(record) for (record,) in rows if len(record) <= MAX_REGISTRY_RECORD_BYTES]

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None
