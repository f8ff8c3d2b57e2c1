"""Everything SQLite: `SQLiteTransport`, a durable transport in one file, and the stores its processes share.

Standard library `sqlite3` only: no server, no extra. What it keeps in the file (every row carries its namespace):

- `messages`: one row per message, every address in the one table. A consumer leases ready rows (its lease is
  `visibility_timeout`, renewed every third of it while the step runs); ack deletes the row, `retry_later` makes
  it visible later, a lapsed lease (a dead process) makes it ready again with its delivery count one higher; past
  `max_deliveries` it moves to `dead-letter` with the reason. `events` and `dead-letter` keep `trim_length` rows.
- `consumers`: each consumer's heartbeat, for `consumers()`.
- `claims`: keys with an expiry: dispatchers' claims, completed steps (`done:`), the replay cache (`replay:`),
  at-most-once start records, a parallel group's wait.
- `waiting`, `workflows` and `workflow_events`, `cancels`, `registry`, `progress`, `joins` and `join_groups`: the
  shared stores, boards and streams.

Durability: WAL mode; `synchronous=FULL` by default, so what `publish` returned for is on disk (a power cut loses
nothing acknowledged); `synchronous="normal"` trades the last commits before a power cut for speed. Several
processes write to the file at once: each transaction takes the write lock up front (`BEGIN IMMEDIATE`) and waits
up to 30 s for it (`busy_timeout`). The schema is versioned (`PRAGMA user_version`).

The modules: `_transport.py` (the transport), `_consumer.py` (its consumers), `_db.py` (the connection's thread),
`_schema.py` (the tables), `_queue.py` (the queue's statements), `_stores.py` (the shared stores), `_boards.py`
(the cancel and registry boards), `_progress.py` (progress streams).
"""

from ._schema import SCHEMA_VERSION
from ._stores import SQLiteDedupeStore, SQLiteJoinStore, SQLiteReplayCache, SQLiteWaitingStore, SQLiteWorkflowStore
from ._transport import SQLiteTransport

__all__ = (
    "SCHEMA_VERSION",
    "SQLiteDedupeStore",
    "SQLiteJoinStore",
    "SQLiteReplayCache",
    "SQLiteTransport",
    "SQLiteWaitingStore",
    "SQLiteWorkflowStore",
)
