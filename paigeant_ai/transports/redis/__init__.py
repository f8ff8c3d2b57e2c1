"""Everything Redis: `RedisTransport` (Redis Streams) and the stores every process on a Redis shares.

What it keeps in Redis, for the namespace `paigeant` (every key carries the hash tag of what it belongs to, so
that each script and transaction stays in one slot of a Redis Cluster: see `_layout.py`):

- `paigeant:{q:<address>}`: a stream with one consumer group, `workers`. Every `consume()` is a named consumer of
  that group, reading in batches. An entry is acknowledged (`XACK`) only when it is settled.
- `paigeant:{q:<address>}:delayed`: a sorted set of messages due later (delayed publishes and `retry_later`). The
  consumers of the address move due messages into the stream, atomically, so several workers can share it.
- `paigeant:{q:<address>}:consumers`: when each consumer of the address was last seen (its heartbeat), for
  `consumers()`: who serves a step, and since when nobody does.
- `paigeant:dispatched:<correlation id>`: the claims of dispatchers on correlation IDs (`claim()`).
- `paigeant:{w:<correlation id>}:cancel`: the cancel records of a workflow (`cancel_board()`); `...:progress`, its
  progress stream; `...:events` and `...:owner`, its history (`RedisWorkflowStore`); `...:waiting`, its parked step.
- `paigeant:done:<key>`, `paigeant:replay:<message id>`, `paigeant:waiting` and `paigeant:workflows` (the indexes of
  parked and of all workflows): the shared stores (`RedisDedupeStore`, `RedisReplayCache`, `RedisWaitingStore`,
  `RedisWorkflowStore`).
- `paigeant:{j:<group>}`: the results of a parallel group's branches (`join_store()`); `paigeant:{registry}`: the
  registry (`registry_board()`).

The URL picks one server (`redis://`), a Redis Cluster (`redis+cluster://`) or the master that Sentinels name
(`redis+sentinel://`): see `_connect.py`.

A consumer holds a lease on what it took: it renews the idle time of its entries every third of
`visibility_timeout`. When a process dies, its leases lapse and a live consumer claims the entries; an entry
delivered more than `max_deliveries` times is moved to `dead-letter` with the reason. Settled entries beyond
`trim_length` are trimmed by the consumers, after every `trim_length / 10` settlements, at least every second
while they settle and when they close; an entry that is not yet delivered or not yet acknowledged is never
trimmed. `events` and `dead-letter` are capped at `trim_length` entries.

Every quick command, the stores' included, goes out in one shared pipeline at a time: see `_pipeline.py` for
what it batches, why, and what must not change.

The modules: `_transport.py` (the transport), `_consumer.py` (its consumers), `_pipeline.py` (the shared
pipeline), `_lua.py` (the scripts), `_stores.py` (the shared stores), `_cancel_board.py` (the cancel board),
`_wire.py` (entries and times), `_types.py` (redis-py's calls, typed once), `_layout.py` (the key names),
`_connect.py` (one server, a cluster or Sentinel).
"""

try:
    import redis.asyncio  # noqa: F401  # pyright: ignore[reportUnusedImport]
except ImportError as _exc:  # pragma: no cover - depends on the environment
    raise ImportError('the Redis transport needs redis-py: pip install "paigeant-ai[redis]"') from _exc

from ._stores import RedisDedupeStore, RedisReplayCache, RedisWaitingStore, RedisWorkflowStore
from ._transport import RedisTransport
from ._wire import GROUP

__all__ = (
    "GROUP",
    "RedisDedupeStore",
    "RedisReplayCache",
    "RedisTransport",
    "RedisWaitingStore",
    "RedisWorkflowStore",
)
