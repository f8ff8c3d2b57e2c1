"""The queue statements: each function runs inside the transaction of one turn of the database's thread.

A row of `messages` is one message at one address. It is *ready* once `visible_at` has passed and nobody holds a
lease on it (`lease_until` unset or passed); a consumer claims ready rows by setting its lease, and counts the
delivery. Ack deletes the row; `retry_later` clears the lease and moves `visible_at`; a lapsed lease makes the row
ready again, so a dead process's deliveries come back with their count one higher.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

__all__ = (
    "Row",
    "ack",
    "claim_ready",
    "dump_headers",
    "give_back",
    "insert",
    "load_headers",
    "move",
    "next_ready",
    "renew",
)


@dataclass(frozen=True, slots=True)
class Row:
    """A claimed row: its id, bytes, headers and how often it was delivered, this delivery included."""

    id: int
    body: bytes
    headers: str
    delivery_count: int


def dump_headers(headers: Mapping[str, str] | None) -> str:
    return json.dumps(dict(headers or {}), ensure_ascii=False, separators=(",", ":"))


def load_headers(raw: str) -> dict[str, str]:
    """The headers of a row; `{}` for text someone wrote by hand that is not a JSON object of strings."""
    try:
        loaded = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(loaded, dict):
        return {}
    return {str(k): str(v) for k, v in cast("dict[object, object]", loaded).items()}


def insert(
    db: sqlite3.Connection, ns: str, address: str, body: bytes, headers: str, delay: float, keep: int | None
) -> None:
    """Add a message; at a capped address (`keep` rows at most), drop the oldest beyond the cap."""
    now = time.time()
    db.execute(
        "INSERT INTO messages (ns, address, body, headers, visible_at, created) VALUES (?, ?, ?, ?, ?, ?)",
        (ns, address, body, headers, now + max(0.0, delay), now),
    )
    if keep is not None:
        db.execute(
            "DELETE FROM messages WHERE ns = ? AND address = ? AND lease_owner IS NULL AND id <= "
            "(SELECT id FROM messages WHERE ns = ? AND address = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (ns, address, ns, address, keep),
        )


def claim_ready(db: sqlite3.Connection, ns: str, address: str, owner: str, *, room: int, lease: float) -> list[Row]:
    """Lease up to `room` ready rows to `owner` for `lease` seconds, oldest first, each delivered once more."""
    now = time.time()
    found = db.execute(
        "UPDATE messages SET lease_owner = ?, lease_until = ?, delivery_count = delivery_count + 1 WHERE id IN "
        "(SELECT id FROM messages WHERE ns = ? AND address = ? AND visible_at <= ? "
        "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY id LIMIT ?) "
        "RETURNING id, body, headers, delivery_count",
        (owner, now + lease, ns, address, now, now, room),
    ).fetchall()
    return sorted((Row(*row) for row in found), key=lambda row: row.id)


def next_ready(db: sqlite3.Connection, ns: str, address: str) -> float | None:
    """Seconds until a row at `address` may be ready (0 if one is now); None if the address has no rows."""
    found = db.execute(
        "SELECT min(max(visible_at, coalesce(lease_until, 0))) FROM messages WHERE ns = ? AND address = ?",
        (ns, address),
    ).fetchone()[0]
    return None if found is None else max(0.0, found - time.time())


def renew(db: sqlite3.Connection, owner: str, ids: Sequence[int], lease: float) -> set[int]:
    """Extend `owner`'s leases of `ids`: the ids it still holds (the others were settled or taken over)."""
    kept: set[int] = set()
    until = time.time() + lease
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        marks = ",".join("?" * len(chunk))
        rows = db.execute(
            f"UPDATE messages SET lease_until = ? WHERE lease_owner = ? AND id IN ({marks}) RETURNING id",
            (until, owner, *chunk),
        ).fetchall()
        kept.update(row[0] for row in rows)
    return kept


def ack(db: sqlite3.Connection, row_id: int, owner: str, delivery_count: int) -> bool | None:
    """Delete the row `row_id` that `owner` holds as its `delivery_count`th delivery: True. False, and nothing
    changed, if a later delivery holds it (its lease lapsed and a consumer, maybe `owner` again, took it); None if
    the row is gone (settled already)."""
    held = db.execute(
        "DELETE FROM messages WHERE id = ? AND lease_owner = ? AND delivery_count = ?", (row_id, owner, delivery_count)
    )
    if held.rowcount:
        return True
    return False if db.execute("SELECT 1 FROM messages WHERE id = ?", (row_id,)).fetchone() else None


def give_back(db: sqlite3.Connection, owner: str, handed_out: Sequence[int] | None) -> None:
    """Clear `owner`'s leases: its rows are ready again. Given what it `handed_out`, its other rows were never
    delivered (buffered, or leased by a request whose answer it no longer waited for): they do not count as
    delivered. Without it (None), every count stays."""
    if handed_out is not None:
        marks = ",".join("?" * len(handed_out))
        db.execute(
            "UPDATE messages SET delivery_count = max(0, delivery_count - 1) "
            f"WHERE lease_owner = ? AND id NOT IN ({marks})",
            (owner, *handed_out),
        )
    db.execute("UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,))


def move(
    db: sqlite3.Connection,
    row_id: int,
    owner: str,
    delivery_count: int,
    ns: str,
    address: str,
    body: bytes,
    headers: str,
    keep: int,
) -> bool:
    """Delete the row `row_id` that `owner` holds as its `delivery_count`th delivery and add its message at
    `address` (the dead letters), in one transaction; False, and nothing changed, if that delivery no longer holds
    it (its lease lapsed, and another consumer, or `owner` again, took it)."""
    held = db.execute(
        "DELETE FROM messages WHERE id = ? AND lease_owner = ? AND delivery_count = ?", (row_id, owner, delivery_count)
    )
    if not held.rowcount:
        return False
    insert(db, ns, address, body, headers, 0.0, keep)
    return True
