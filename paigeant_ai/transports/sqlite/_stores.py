"""The stores every process on one SQLite file shares, on the connection and namespace of a `SQLiteTransport`.

Each change that Redis makes in one script is one call here, run in one transaction (`BEGIN IMMEDIATE`, see
`_db.py`): what it reads is what it changes, whatever other processes do meanwhile. What is stored is opaque
or signed, and verified by whoever acts on it, as on Redis.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

from pydantic import ValidationError

from ..._events import WorkflowEvent
from ..._replay import ClaimState, RenewState
from ..._wire import FROM_WIRE
from ...approval import ParkedStep, loadable
from ...exceptions import UserError
from ...store import DEFAULT_MAX_EVENTS, WorkflowStatus, check_store_limits, event_order, project, with_owner

if TYPE_CHECKING:
    from ._transport import SQLiteTransport

__all__ = (
    "SQLiteDedupeStore",
    "SQLiteJoinStore",
    "SQLiteReplayCache",
    "SQLiteWaitingStore",
    "SQLiteWorkflowStore",
    "claim_key",
    "release_key",
)

logger = logging.getLogger("paigeant_ai.transports.sqlite")


# -- keys with an expiry (claims, completed steps, replay entries, a group's wait) --------------------------------


def read_key(db: sqlite3.Connection, ns: str, key: str) -> bytes | None:
    """The value of `key`, unless it expired."""
    row = db.execute(
        "SELECT value FROM claims WHERE ns = ? AND key = ? AND (expires IS NULL OR expires > ?)", (ns, key, time.time())
    ).fetchone()
    return None if row is None else bytes(row[0])


def write_key(db: sqlite3.Connection, ns: str, key: str, value: bytes, ttl: float | None) -> None:
    """Set `key` to `value`, kept `ttl` seconds (None: its expiry unchanged)."""
    if ttl is None:
        db.execute("UPDATE claims SET value = ? WHERE ns = ? AND key = ?", (value, ns, key))
    else:
        db.execute(
            "INSERT OR REPLACE INTO claims (ns, key, value, expires) VALUES (?, ?, ?, ?)",
            (ns, key, value, time.time() + ttl),
        )


def claim_key(db: sqlite3.Connection, ns: str, key: str, value: bytes, ttl: float) -> bytes | None:
    """Set `key` to `value` for `ttl` seconds unless it holds a value: None if this call set it, else that value."""
    held = read_key(db, ns, key)
    if held is None:
        write_key(db, ns, key, value, ttl)
    return held


def release_key(db: sqlite3.Connection, ns: str, key: str, value: bytes) -> None:
    db.execute("DELETE FROM claims WHERE ns = ? AND key = ? AND value = ?", (ns, key, value))


class SQLiteDedupeStore:
    """Remembers completed steps in the SQLite file, for every worker that shares it.

    Args:
        transport: The SQLite transport whose file and namespace it uses.
        ttl: Seconds a completed step is remembered; longer than any redelivery can take.
    """

    def __init__(self, transport: SQLiteTransport, *, ttl: float = 7 * 24 * 3600.0) -> None:
        if ttl <= 0:
            raise UserError("ttl must be a positive number of seconds")
        self.transport = transport
        self.ttl = ttl

    async def is_done(self, key: str) -> bool:
        ns = self.transport.namespace
        found = await self.transport.db.call(
            lambda db: read_key(db, ns, f"done:{key}"), write=False, doing="checking a step's completion"
        )
        return found is not None

    async def mark_done(self, key: str) -> None:
        ns, ttl = self.transport.namespace, self.ttl
        await self.transport.db.call(
            lambda db: claim_key(db, ns, f"done:{key}", b"1", ttl), doing="recording a step's completion"
        )


# -- the replay cache: each entry `<r|h|s> <lease end> <digest> <holder>`, as on Redis ------------------------------


def _entry(state: str, lease_end: float, digest: str, holder: str) -> bytes:
    return f"{state} {lease_end!r} {digest} {holder}".encode()


def _parse(raw: bytes) -> tuple[str, float, str, str]:
    state, lease_end, digest, holder = [*raw.decode(errors="replace").split(" "), "", "", "", ""][:4]
    try:
        return state, float(lease_end), digest, holder
    except ValueError:
        return state, 0.0, digest, holder


def _claim_hop(
    db: sqlite3.Connection, ns: str, key: str, digest: str, redelivered: bool, lease: float, ttl: float, holder: str
) -> ClaimState:
    now = time.time()
    running = _entry("r", now + lease, digest, holder)
    raw = read_key(db, ns, key)
    if raw is None:
        write_key(db, ns, key, running, ttl)
        return "claimed"
    state, lease_end, held_digest, held_by = _parse(raw)
    if held_digest != digest:
        return "duplicate"
    if state == "s":
        return "settled"
    if holder != "-" and held_by == holder:  # its own claim, asked again
        return "claimed"
    if (redelivered and state == "r") or lease_end < now:
        write_key(db, ns, key, running, None)
        return "claimed"
    return "running"


def _renew_hop(db: sqlite3.Connection, ns: str, key: str, digest: str, lease: float, holder: str) -> RenewState:
    raw = read_key(db, ns, key)
    if raw is None:
        return "gone"
    state, _, held_digest, held_by = _parse(raw)
    if state == "s" or held_digest != digest:
        return "gone"
    if held_by != holder:
        return "taken"
    write_key(db, ns, key, _entry("h", time.time() + lease, digest, holder), None)
    return "renewed"


def _settle_hop(db: sqlite3.Connection, ns: str, key: str, digest: str, ttl: float) -> None:
    raw = read_key(db, ns, key)
    if raw is not None and _parse(raw)[2] != digest:
        return
    write_key(db, ns, key, _entry("s", 0, digest, ""), ttl)


class SQLiteReplayCache:
    """Hops claimed and settled, in the SQLite file, shared by every worker on it: a `ReplayCache`.

    Each hop is one key, `replay:<message id>`, claimed when the hop starts and marked settled when it is settled,
    each change one transaction (see `paigeant_ai._replay` for what each state means).
    """

    def __init__(self, transport: SQLiteTransport) -> None:
        self.transport = transport

    async def claim(
        self,
        message_id: str,
        digest: str,
        *,
        sent_at: float,
        redelivered: bool,
        lease: float,
        ttl: float,
        holder: str = "",
    ) -> ClaimState:
        ns, key, who = self.transport.namespace, f"replay:{message_id}", holder or "-"
        return await self.transport.db.call(
            lambda db: _claim_hop(db, ns, key, digest, redelivered, lease, ttl, who), doing="claiming a message"
        )

    async def renew(self, message_id: str, digest: str, lease: float, holder: str = "") -> RenewState:
        ns, key, who = self.transport.namespace, f"replay:{message_id}", holder or "-"
        return await self.transport.db.call(
            lambda db: _renew_hop(db, ns, key, digest, lease, who), doing="renewing a claim"
        )

    async def settle(self, message_id: str, digest: str, ttl: float) -> None:
        ns, key = self.transport.namespace, f"replay:{message_id}"
        await self.transport.db.call(
            lambda db: _settle_hop(db, ns, key, digest, ttl), doing="recording a settled message"
        )


# -- parked workflows ----------------------------------------------------------------------------------------------


class SQLiteWaitingStore:
    """A `WaitingStore` in the SQLite file: one row per parked workflow, kept until it is resumed.

    A record holds no bearer token; it is signed by the worker that parked it, and whoever can write to the file
    can change it, so it is verified before anything acts on it (`ParkedStep.verify`).
    """

    def __init__(self, transport: SQLiteTransport) -> None:
        self.transport = transport

    async def put(self, parked: ParkedStep) -> None:
        row = (
            self.transport.namespace,
            parked.correlation_id,
            parked.message.message_id,
            parked.model_dump_json().encode(),
            parked.parked_at.timestamp(),
        )
        await self.transport.db.call(
            lambda db: db.execute("INSERT OR REPLACE INTO waiting VALUES (?, ?, ?, ?, ?)", row),
            doing=f"parking workflow {parked.correlation_id!r}",
        )

    async def get(self, correlation_id: str) -> ParkedStep | None:
        ns = self.transport.namespace
        row = await self.transport.db.call(
            lambda db: db.execute(
                "SELECT record FROM waiting WHERE ns = ? AND correlation_id = ?", (ns, correlation_id)
            ).fetchone(),
            write=False,
            doing=f"reading parked workflow {correlation_id!r}",
        )
        return ParkedStep.load(bytes(row[0])) if row is not None else None

    async def remove(self, parked: ParkedStep) -> bool:
        key = (self.transport.namespace, parked.correlation_id, parked.message.message_id)
        removed = await self.transport.db.call(
            lambda db: (
                db.execute("DELETE FROM waiting WHERE ns = ? AND correlation_id = ? AND message_id = ?", key).rowcount
            ),
            doing=f"removing parked workflow {parked.correlation_id!r}",
        )
        return bool(removed)

    async def waiting(self) -> list[ParkedStep]:
        ns = self.transport.namespace
        rows = await self.transport.db.call(
            lambda db: db.execute(
                "SELECT correlation_id, record FROM waiting WHERE ns = ? ORDER BY parked_at", (ns,)
            ).fetchall(),
            write=False,
            doing="listing parked workflows",
        )
        return loadable((cid, bytes(record)) for cid, record in rows)


# -- workflow status -----------------------------------------------------------------------------------------------


class SQLiteWorkflowStore:
    """A workflow store in the SQLite file, shared by every process on it.

    Each workflow's events are rows (identical events are one), kept for `ttl` seconds after its last event, at
    most `max_events` (the oldest go); the index keeps the `max_workflows` updated last.
    """

    def __init__(
        self,
        transport: SQLiteTransport,
        *,
        ttl: float = 7 * 24 * 3600.0,
        max_workflows: int = 100_000,
        max_events: int = DEFAULT_MAX_EVENTS,
    ) -> None:
        check_store_limits(max_workflows=max_workflows, max_events=max_events, ttl=ttl)
        self.transport = transport
        self.ttl = ttl
        self.max_workflows = max_workflows
        self.max_events = max_events

    async def apply(self, event: WorkflowEvent) -> None:
        cid = event.correlation_id
        if cid is None:
            return
        at, rank = event_order(event)
        micros = round(at.timestamp() * 1_000_000)
        owner = event.owner if event.kind == "dispatched" else None
        text = event.model_dump_json()
        await self.transport.db.call(
            lambda db: self._apply(db, cid, text, micros, micros * 4 + rank, owner),
            doing=f"recording an event of workflow {cid!r}",
        )

    def _apply(self, db: sqlite3.Connection, cid: str, text: str, micros: int, score: int, owner: str | None) -> None:
        ns = self.transport.namespace
        db.execute("INSERT OR REPLACE INTO workflow_events VALUES (?, ?, ?, ?)", (ns, cid, text, score))
        db.execute(
            "DELETE FROM workflow_events WHERE ns = ? AND correlation_id = ? AND event IN (SELECT event FROM "
            "workflow_events WHERE ns = ? AND correlation_id = ? ORDER BY score DESC LIMIT -1 OFFSET ?)",
            (ns, cid, ns, cid, self.max_events),
        )
        db.execute(
            "INSERT INTO workflows (ns, correlation_id, updated, expires) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (ns, correlation_id) DO UPDATE SET updated = max(updated, excluded.updated), "
            "expires = excluded.expires",
            (ns, cid, micros, time.time() + self.ttl),
        )
        if owner is not None:  # only the earliest dispatch names the owner
            db.execute(
                "UPDATE workflows SET owner = ?, owner_at = ? WHERE ns = ? AND correlation_id = ? "
                "AND (owner_at IS NULL OR owner_at > ?)",
                (owner, micros, ns, cid, micros),
            )

    async def get(self, correlation_id: str) -> WorkflowStatus | None:
        ns, now = self.transport.namespace, time.time()
        found = await self.transport.db.call(
            lambda db: _events_and_owner(db, ns, correlation_id, now),
            write=False,
            doing=f"reading workflow {correlation_id!r}",
        )
        if found is None:
            return None
        events, owner = found
        return with_owner(project(correlation_id, _parse_events(events)), owner)

    async def list(self, *, limit: int = 20) -> Sequence[WorkflowStatus]:
        ns, now, size = self.transport.namespace, time.time(), self.max_workflows
        rows = await self.transport.db.call(
            lambda db: db.execute(
                "SELECT correlation_id FROM (SELECT correlation_id, expires, updated FROM workflows WHERE ns = ? "
                "ORDER BY updated DESC LIMIT ?) WHERE expires > ? LIMIT ?",
                (ns, size, now, max(1, limit)),
            ).fetchall(),
            write=False,
            doing="listing workflows",
        )
        found: list[WorkflowStatus] = []
        for (correlation_id,) in rows:
            status = await self.get(correlation_id)
            if status is not None:
                found.append(status)
        return found

    async def ids_starting_with(self, prefix: str) -> list[str]:
        """The correlation IDs of the kept workflows that start with `prefix`, sorted."""
        ns, now = self.transport.namespace, time.time()
        rows = await self.transport.db.call(  # a range on the key, then an exact comparison: no wildcard to escape
            lambda db: db.execute(
                "SELECT correlation_id FROM workflows WHERE ns = ? AND correlation_id >= ? "
                "AND substr(correlation_id, 1, ?) = ? AND expires > ? ORDER BY correlation_id",
                (ns, prefix, len(prefix), prefix, now),
            ).fetchall(),
            write=False,
            doing="looking for workflows by prefix",
        )
        return [cast(str, correlation_id) for (correlation_id,) in rows]


def _events_and_owner(
    db: sqlite3.Connection, ns: str, cid: str, now: float
) -> tuple[list[str], tuple[datetime, str] | None] | None:
    row = db.execute(
        "SELECT owner, owner_at FROM workflows WHERE ns = ? AND correlation_id = ? AND expires > ?", (ns, cid, now)
    ).fetchone()
    if row is None:
        return None
    events = [
        text
        for (text,) in db.execute(
            "SELECT event FROM workflow_events WHERE ns = ? AND correlation_id = ? ORDER BY score", (ns, cid)
        )
    ]
    owner = (datetime.fromtimestamp(row[1] / 1e6, UTC), cast(str, row[0])) if row[0] is not None else None
    return events, owner


def _parse_events(raw: list[str]) -> list[WorkflowEvent]:
    events: list[WorkflowEvent] = []
    for item in raw:
        try:
            events.append(WorkflowEvent.model_validate_json(item, context=FROM_WIRE))
        except ValidationError:
            logger.warning("ignoring a stored event that is not a valid WorkflowEvent")
    return events


# -- parallel groups -----------------------------------------------------------------------------------------------


class SQLiteJoinStore:
    """The results of parallel groups' branches in the SQLite file (a `JoinStore`, see `paigeant_ai._join`).

    A group's rows in `joins` are its results (`r:<branch key>`) and, once a branch failed it, `failed` (a signed
    `GroupMark`); `join_groups` holds when the group may be forgotten; its wait is the key `join-wait:<group>`.
    """

    def __init__(self, transport: SQLiteTransport) -> None:
        self.transport = transport

    async def add(self, group: str, key: str, record: bytes, *, ttl: float) -> tuple[int, bytes | None]:
        ns = self.transport.namespace
        return await self.transport.db.call(
            lambda db: _add(db, ns, group, f"r:{key}", record, ttl), doing=f"storing a branch's result of {group!r}"
        )

    async def records(self, group: str) -> dict[str, bytes]:
        ns = self.transport.namespace
        fields = await self.transport.db.call(
            lambda db: _fields(db, ns, group),
            doing=f"reading a group's results of {group!r}",  # may forget it
        )
        return _results(fields)

    async def fail(self, group: str, mark: bytes, *, ttl: float) -> tuple[bytes, dict[str, bytes]]:
        ns = self.transport.namespace
        fields = await self.transport.db.call(
            lambda db: _fail(db, ns, group, mark, ttl), doing=f"marking group {group!r} failed"
        )
        return fields.get("failed", mark), _results(fields)

    async def replace_mark(self, group: str, old: bytes, new: bytes) -> tuple[bytes, dict[str, bytes]]:
        ns = self.transport.namespace
        fields = await self.transport.db.call(
            lambda db: _replace(db, ns, group, old, new), doing=f"marking group {group!r} failed"
        )
        return fields.get("failed", new), _results(fields)

    async def delete(self, group: str) -> None:
        ns = self.transport.namespace
        await self.transport.db.call(lambda db: _forget(db, ns, group), doing=f"forgetting joined group {group!r}")

    async def hold_wait(self, group: str, key: str, *, ttl: float) -> str:
        ns = self.transport.namespace
        held = await self.transport.db.call(
            lambda db: claim_key(db, ns, f"join-wait:{group}", key.encode(), ttl), doing=f"holding {group!r}'s wait"
        )
        return key if held is None else held.decode(errors="replace")

    async def release_wait(self, group: str, key: str) -> None:
        ns = self.transport.namespace
        await self.transport.db.call(
            lambda db: release_key(db, ns, f"join-wait:{group}", key.encode()), doing=f"releasing {group!r}'s wait"
        )


def _fields(db: sqlite3.Connection, ns: str, group: str) -> dict[str, bytes]:
    expiry = db.execute("SELECT expires FROM join_groups WHERE ns = ? AND grp = ?", (ns, group)).fetchone()
    if expiry is not None and expiry[0] is not None and expiry[0] <= time.time():
        _forget(db, ns, group)
        return {}
    rows = db.execute("SELECT field, value FROM joins WHERE ns = ? AND grp = ?", (ns, group))
    return {field: bytes(value) for field, value in rows}


def _keep(db: sqlite3.Connection, ns: str, group: str, ttl: float) -> None:
    expires = time.time() + ttl if ttl > 0 else None  # 0: until the group is joined or fails
    db.execute("INSERT OR REPLACE INTO join_groups VALUES (?, ?, ?)", (ns, group, expires))


def _add(
    db: sqlite3.Connection, ns: str, group: str, field: str, record: bytes, ttl: float
) -> tuple[int, bytes | None]:
    _fields(db, ns, group)  # forgets the group if it expired
    db.execute("INSERT OR REPLACE INTO joins VALUES (?, ?, ?, ?)", (ns, group, field, record))
    _keep(db, ns, group, ttl)
    fields = _fields(db, ns, group)
    failed = fields.get("failed")
    return len(fields) - (failed is not None), failed


def _fail(db: sqlite3.Connection, ns: str, group: str, mark: bytes, ttl: float) -> dict[str, bytes]:
    _fields(db, ns, group)
    db.execute("INSERT OR IGNORE INTO joins VALUES (?, ?, 'failed', ?)", (ns, group, mark))
    _keep(db, ns, group, ttl)
    return _fields(db, ns, group)


def _replace(db: sqlite3.Connection, ns: str, group: str, old: bytes, new: bytes) -> dict[str, bytes]:
    db.execute(
        "UPDATE joins SET value = ? WHERE ns = ? AND grp = ? AND field = 'failed' AND value = ?", (new, ns, group, old)
    )
    return _fields(db, ns, group)


def _forget(db: sqlite3.Connection, ns: str, group: str) -> None:
    db.execute("DELETE FROM joins WHERE ns = ? AND grp = ?", (ns, group))
    db.execute("DELETE FROM join_groups WHERE ns = ? AND grp = ?", (ns, group))
    db.execute("DELETE FROM claims WHERE ns = ? AND key = ?", (ns, f"join-wait:{group}"))


def _results(fields: dict[str, bytes]) -> dict[str, bytes]:
    return {name[2:]: value for name, value in fields.items() if name.startswith("r:")}
