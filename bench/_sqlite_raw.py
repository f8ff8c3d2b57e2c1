"""The SQLite side of `bench.throughput`: where each run's file goes, and the raw relay it is compared with.

The raw relay moves messages of the same size through three queues in one table with bare `sqlite3`, the same
pragmas as the transport (WAL, `synchronous=FULL`), one transaction per hop: take the oldest row of a queue, delete
it, insert it into the next queue, commit. It runs on one thread, which is all SQLite lets write at once.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path

__all__ = ("raw_sqlite", "remove_files", "sqlite_path")

_FOLDER = Path(tempfile.gettempdir())


def sqlite_path(namespace: str) -> Path:
    """The file of one bench run (on the temporary folder's disk)."""
    return _FOLDER / f"{namespace}.sqlite3"


def remove_files(path: Path) -> None:
    """Delete the file of a run and its WAL files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _relay(path: Path, workflows: int, size: int) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("CREATE TABLE q (id INTEGER PRIMARY KEY AUTOINCREMENT, queue INTEGER NOT NULL, body BLOB)")
        db.execute("CREATE INDEX q_by_queue ON q (queue, id)")
        body = b"x" * size
        db.execute("BEGIN")
        db.executemany("INSERT INTO q (queue, body) VALUES (0, ?)", [(body,)] * workflows)
        db.execute("COMMIT")
        started = time.perf_counter()
        for _ in range(workflows):
            for queue in range(3):
                db.execute("BEGIN IMMEDIATE")
                row_id, found = db.execute(
                    "SELECT id, body FROM q WHERE queue = ? ORDER BY id LIMIT 1", (queue,)
                ).fetchone()
                db.execute("DELETE FROM q WHERE id = ?", (row_id,))
                if queue < 2:
                    db.execute("INSERT INTO q (queue, body) VALUES (?, ?)", (queue + 1, found))
                db.execute("COMMIT")
        return workflows * 3 / (time.perf_counter() - started)
    finally:
        db.close()
        remove_files(path)


async def raw_sqlite(workflows: int, concurrency: int, size: int) -> float:
    """Hops per second of the raw relay (`concurrency` is not used: one thread writes)."""
    return await asyncio.to_thread(_relay, sqlite_path(f"bench-raw-{time.time_ns()}"), workflows, size)
