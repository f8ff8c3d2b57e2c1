"""The tables of the SQLite transport, versioned with `PRAGMA user_version` and created on first use.

Every table starts with `ns`, the namespace, so several namespaces can share one file. Times are Unix seconds
(`time.time()`): every process on the machine reads the same clock.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ...exceptions import TransportError

__all__ = ("SCHEMA_VERSION", "create_or_check")

SCHEMA_VERSION = 1
"""The version of the tables this code reads and writes."""

_TABLES = """
CREATE TABLE messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL,
    address TEXT NOT NULL,
    body BLOB NOT NULL,
    headers TEXT NOT NULL,
    visible_at REAL NOT NULL,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    created REAL NOT NULL
);
CREATE INDEX messages_by_address ON messages (ns, address, id);
CREATE INDEX messages_by_owner ON messages (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE consumers (
    ns TEXT NOT NULL, address TEXT NOT NULL, name TEXT NOT NULL, seen REAL NOT NULL, closed INTEGER NOT NULL,
    PRIMARY KEY (ns, address, name)
);
CREATE TABLE claims (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL,
    PRIMARY KEY (ns, key)
);
CREATE TABLE waiting (
    ns TEXT NOT NULL, correlation_id TEXT NOT NULL, message_id TEXT NOT NULL, record BLOB NOT NULL,
    parked_at REAL NOT NULL,
    PRIMARY KEY (ns, correlation_id)
);
CREATE TABLE workflows (
    ns TEXT NOT NULL, correlation_id TEXT NOT NULL, updated INTEGER NOT NULL, expires REAL NOT NULL,
    owner TEXT, owner_at INTEGER,
    PRIMARY KEY (ns, correlation_id)
);
CREATE INDEX workflows_by_update ON workflows (ns, updated);
CREATE TABLE workflow_events (
    ns TEXT NOT NULL, correlation_id TEXT NOT NULL, event TEXT NOT NULL, score INTEGER NOT NULL,
    PRIMARY KEY (ns, correlation_id, event)
);
CREATE INDEX workflow_events_by_score ON workflow_events (ns, correlation_id, score);
CREATE TABLE cancels (
    ns TEXT NOT NULL, correlation_id TEXT NOT NULL, seq INTEGER NOT NULL, record BLOB NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (ns, correlation_id, seq)
);
CREATE TABLE registry (
    ns TEXT NOT NULL, worker_id TEXT NOT NULL, record BLOB NOT NULL, until REAL NOT NULL,
    PRIMARY KEY (ns, worker_id)
);
CREATE TABLE progress (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ns TEXT NOT NULL, correlation_id TEXT NOT NULL, body BLOB NOT NULL, headers TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX progress_by_workflow ON progress (ns, correlation_id, id);
CREATE TABLE joins (
    ns TEXT NOT NULL, grp TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL,
    PRIMARY KEY (ns, grp, field)
);
CREATE TABLE join_groups (
    ns TEXT NOT NULL, grp TEXT NOT NULL, expires REAL,
    PRIMARY KEY (ns, grp)
);
"""


def create_or_check(connection: sqlite3.Connection, path: Path) -> None:
    """Create the tables in a new file; check that an existing one holds the version this code knows.

    Raises:
        TransportError: The file was written by a newer paigeant-ai (or is not one of its files).
    """
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        found = connection.execute("SELECT count(*) FROM sqlite_schema WHERE name = 'messages'").fetchone()[0]
        if not found:  # a new file (another process may have created it since: the transaction says for sure)
            for statement in _TABLES.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
    if version != SCHEMA_VERSION:
        raise TransportError(
            f"SQLite at {path} holds schema version {version}, and this paigeant-ai knows version {SCHEMA_VERSION}: "
            "it was written by a newer paigeant-ai (upgrade this one), or it is not a paigeant-ai file "
            "(set PAIGEANT_SQLITE_PATH to another path)"
        )
