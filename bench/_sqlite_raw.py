"""The SQLite side of the bench: where each run's file goes, and the raw relay the transport is compared with.

The raw relay moves messages of a hop's size through three queues in one table with bare `sqlite3`, with the
transport's pragmas (WAL, `synchronous=FULL`) and one transaction per hop: take the oldest message of the furthest
queue that has one, delete it, insert it into the next queue, commit. One thread runs every statement, as the
transport's one connection does; a hop's gap runs from the start of the transaction that publishes it to the end
of the one that takes it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._relays import Flow, Relay

__all__ = ("remove_files", "sqlite_path", "sqlite_relay")

_FOLDER = Path(tempfile.gettempdir())
STAGES = 3


def sqlite_path(namespace: str) -> Path:
    """The file of one bench run (on the temporary folder's disk)."""
    return _FOLDER / f"{namespace}.sqlite3"


def remove_files(path: Path) -> None:
    """Delete the file of a run and its WAL files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


class SQLiteRelay:
    """Three queues in one table, moved by one thread, a transaction a hop."""

    def __init__(self, size: int) -> None:
        self.path = sqlite_path(f"bench-raw-{time.time_ns()}")
        self.body = b"x" * size
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bench-sqlite")
        self.db: sqlite3.Connection | None = None
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def _call(self, func: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.pool, func, *args)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY AUTOINCREMENT, queue INTEGER NOT NULL, body BLOB)")
        db.execute("CREATE INDEX q_by_queue ON q (queue, id)")
        self.db = db

    def _insert(self, count: int) -> None:
        assert self.db is not None
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO q (queue, body) VALUES (0, ?)", [(self.body,)] * count)
        self.db.execute("COMMIT")

    def _hop(self) -> int | None:
        """Move the oldest message of the furthest queue on; which queue it left (None: all are empty)."""
        db = self.db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT id, queue, body FROM q ORDER BY queue DESC, id LIMIT 1").fetchone()
            if row is None:
                return None
            row_id, queue, body = row
            db.execute("DELETE FROM q WHERE id = ?", (row_id,))
            if queue < STAGES - 1:
                db.execute("INSERT INTO q (queue, body) VALUES (?, ?)", (queue + 1, body))
            return int(queue)
        finally:
            db.execute("COMMIT")

    async def send(self, count: int) -> None:
        if self.db is None:
            await self._call(self._open)
        await self._call(self._insert, count)
        self.wake.set()

    async def start(self, flow: Flow, concurrency: int) -> None:
        if self.db is None:
            await self._call(self._open)

        async def move() -> None:
            while True:
                began = time.perf_counter()
                queue = await self._call(self._hop)
                if queue is None:
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                flow.received(queue)
                if queue < STAGES - 1:
                    flow.sending(at=began)
                else:
                    flow.finished()

        self.task = asyncio.create_task(move())

    async def aclose(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.db is not None:
            await self._call(self.db.close)
        self.pool.shutdown()
        remove_files(self.path)


async def sqlite_relay(size: int) -> Relay:
    return SQLiteRelay(size)
