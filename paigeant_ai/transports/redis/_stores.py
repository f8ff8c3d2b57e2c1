"""The stores every process on a Redis shares, on the connection and namespace of a `RedisTransport`.

`RedisTransport` hands them out as its shared stores (`SharedStores`), so a worker, a signer or `get_*_store`
on Redis uses them by default; build them yourself to share them from another transport's processes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, cast

from pydantic import ValidationError

from ..._events import WorkflowEvent
from ..._replay import ClaimState, RenewState
from ..._wire import FROM_WIRE
from ...approval import ParkedStep, loadable
from ...exceptions import UserError
from ...store import DEFAULT_MAX_EVENTS, WorkflowStatus, check_store_limits, event_order, project, with_owner
from . import _lua as lua
from ._layout import workflow_key
from ._wire import ms

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ("RedisDedupeStore", "RedisReplayCache", "RedisWaitingStore", "RedisWorkflowStore")

logger = logging.getLogger("paigeant_ai.transports.redis")

_PARK = """
-- KEYS: a parked workflow. ARGV: its record, its message id. Replaces what was parked there.
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'message_id', ARGV[2])
return 1
"""

_RECORD_EVENT = """
-- KEYS: a workflow's events, its owner. ARGV: the event, its score, most events kept, ms to keep them, the owner
-- named by a `dispatched` event (or ''), when it was dispatched (micros).
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[3]) - 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], 'LT', ARGV[6], ARGV[5])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 1, -1)  -- only the earliest dispatch names the owner
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

_INDEX = """
-- KEYS: an index (a sorted set). ARGV: the member, its score (kept if higher), most members kept.
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[3]) - 1)
return 1
"""


class RedisDedupeStore:
    """Remembers completed steps in Redis, for every worker that shares it (`SET NX` with an expiry).

    Pass it to `Worker(..., dedupe=RedisDedupeStore(transport))` so that a step redelivered to another process
    after a crash is skipped if it already completed.

    Args:
        transport: The Redis transport whose connection and namespace it uses.
        ttl: Seconds a completed step is remembered; longer than any redelivery can take.
    """

    def __init__(self, transport: RedisTransport, *, ttl: float = 7 * 24 * 3600.0) -> None:
        if ttl <= 0:
            raise UserError("ttl must be a positive number of seconds")
        self.transport = transport
        self.ttl = ttl

    def key(self, idempotency_key: str) -> str:
        """The Redis key of `idempotency_key`."""
        return f"{self.transport.namespace}:done:{idempotency_key}"

    async def is_done(self, key: str) -> bool:
        with self.transport.errors("checking a step's completion"):
            return bool(await self.transport.pipelined("EXISTS", self.key(key)))

    async def mark_done(self, key: str) -> None:
        with self.transport.errors("recording a step's completion"):
            await self.transport.pipelined("SET", self.key(key), b"1", "NX", "PX", ms(self.ttl))


class RedisReplayCache:
    """Hops claimed and settled, in Redis, shared by every worker on it: a `ReplayCache`.

    Each hop is one key, `<namespace>:replay:<message id>`, claimed when the hop starts and marked settled when
    it is settled, each change one atomic script (see `paigeant_ai._replay` for what each state means).

    Args:
        transport: A `RedisTransport` whose connection and namespace the cache uses.
    """

    def __init__(self, transport: RedisTransport) -> None:
        self.transport = transport

    def key(self, message_id: str) -> str:
        """The Redis key of `message_id`."""
        return f"{self.transport.namespace}:replay:{message_id}"

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
        with self.transport.errors("claiming a message"):
            state = await self.transport.scripts.claim_hop(
                keys=[self.key(message_id)], args=[digest, int(redelivered), ms(lease), ms(ttl), holder or "-"]
            )
        return cast("ClaimState", state.decode() if isinstance(state, bytes) else state)

    async def renew(self, message_id: str, digest: str, lease: float, holder: str = "") -> RenewState:
        with self.transport.errors("renewing a claim"):
            found = await self.transport.scripts.renew_hop(
                keys=[self.key(message_id)], args=[digest, ms(lease), holder or "-"]
            )
        return "renewed" if found == 1 else "taken" if found == -1 else "gone"

    async def settle(self, message_id: str, digest: str, ttl: float) -> None:
        with self.transport.errors("recording a settled message"):
            await self.transport.scripts.settle_hop(keys=[self.key(message_id)], args=[digest, ms(ttl)])


class RedisWaitingStore:
    """A `WaitingStore` in Redis, shared by every process that points at it.

    Each parked workflow is a hash `<namespace>:{w:<correlation_id>}:waiting` (its JSON and the id of its message);
    the sorted set `<namespace>:waiting` indexes them by when they parked. Nothing is deleted on its own: a parked
    workflow waits until it is resumed (which is refused once its workflow expired: see `WorkflowDispatcher(ttl=...)`).
    A record holds no bearer token; it is signed by the worker that parked it, and whoever can write to this Redis
    can change it, so it is verified before anything acts on it (`ParkedStep.verify`).

    Args:
        transport: A `RedisTransport` whose connection and namespace the store uses.
    """

    def __init__(self, transport: RedisTransport) -> None:
        self.transport = transport

    @property
    def index_key(self) -> str:
        """The sorted set of parked workflows, scored by when they parked."""
        return f"{self.transport.namespace}:waiting"

    def key(self, correlation_id: str) -> str:
        """The hash of one parked workflow."""
        return workflow_key(self.transport.namespace, correlation_id, "waiting")

    async def put(self, parked: ParkedStep) -> None:
        cid = parked.correlation_id
        with self.transport.errors(f"parking workflow {cid!r}"):
            # The record, then the index (another slot on a cluster): an index entry always has its record, but
            # for one whose removal stopped half-way, which `waiting()` skips.
            await self.transport.client.eval(
                _PARK, 1, self.key(cid), parked.model_dump_json(), parked.message.message_id
            )
            await self.transport.client.zadd(self.index_key, {cid: parked.parked_at.timestamp()})

    async def get(self, correlation_id: str) -> ParkedStep | None:
        with self.transport.errors(f"reading parked workflow {correlation_id!r}"):
            raw = await self.transport.client.hget(self.key(correlation_id), "record")
        return ParkedStep.load(raw) if raw is not None else None

    async def remove(self, parked: ParkedStep) -> bool:
        cid = parked.correlation_id
        with self.transport.errors(f"removing parked workflow {cid!r}"):
            removed = await self.transport.client.eval(lua.REMOVE_PARKED, 1, self.key(cid), parked.message.message_id)
            if removed:
                await self.transport.client.zrem(self.index_key, cid)
        return bool(removed)

    async def waiting(self) -> list[ParkedStep]:
        with self.transport.errors("listing parked workflows"):
            ids = [raw_id.decode() for raw_id in await self.transport.client.zrange(self.index_key, 0, -1)]
            records: list[tuple[str, bytes]] = []
            for correlation_id in ids:
                raw = await self.transport.client.hget(self.key(correlation_id), "record")
                if raw is not None:
                    records.append((correlation_id, raw))
        return loadable(records)


class RedisWorkflowStore:
    """A store in Redis, shared by every process that points at it.

    Each workflow's events are a sorted set (identical events are one member), kept for `ttl` seconds after
    its last event; a sorted set indexes the workflows by their last update, capped at `max_workflows`.

    Args:
        transport: A `RedisTransport` whose connection and namespace the store uses.
        ttl: Seconds a workflow's history is kept after its last event.
        max_workflows: How many workflows the index keeps.
        max_events: Events kept per workflow.
    """

    def __init__(
        self,
        transport: RedisTransport,
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

    @classmethod
    def from_url(cls, url: str | None = None, **options: float) -> RedisWorkflowStore:
        """A store with a connection of its own (`await store.transport.connect()` before use)."""
        from ._transport import RedisTransport  # which imports this module

        return cls(RedisTransport(url), **options)  # pyright: ignore[reportArgumentType]

    @property
    def index_key(self) -> str:
        """The sorted set of every workflow, scored by its last update."""
        return f"{self.transport.namespace}:workflows"

    def events_key(self, correlation_id: str) -> str:
        """The sorted set of one workflow's events."""
        return workflow_key(self.transport.namespace, correlation_id, "events")

    def owner_key(self, correlation_id: str) -> str:
        """The workflow's owner, kept apart from its events so that trimming them never loses it: a sorted set
        of one member, the owner of its earliest `dispatched` event, scored by when it was dispatched."""
        return workflow_key(self.transport.namespace, correlation_id, "owner")

    async def apply(self, event: WorkflowEvent) -> None:
        correlation_id = event.correlation_id
        if correlation_id is None:
            return
        key = self.events_key(correlation_id)
        at, rank = event_order(event)
        micros = round(at.timestamp() * 1_000_000)
        owner = event.owner if event.kind == "dispatched" and event.owner is not None else ""
        keep = round(self.ttl * 1000)
        with self.transport.errors(f"recording an event of workflow {correlation_id!r}"):
            # The workflow's keys in one script, then the index (another slot on a cluster), which `list()` reads
            # knowing that a workflow it names may have expired.
            await self.transport.client.eval(
                _RECORD_EVENT,
                2,
                key,
                self.owner_key(correlation_id),
                event.model_dump_json(),
                micros * 4 + rank,
                self.max_events,
                keep,
                owner,
                micros,
            )
            await self.transport.client.eval(_INDEX, 1, self.index_key, correlation_id, micros, self.max_workflows)

    async def get(self, correlation_id: str) -> WorkflowStatus | None:
        with self.transport.errors(f"reading workflow {correlation_id!r}"):
            raw = await self.transport.client.zrange(self.events_key(correlation_id), 0, -1)
            owners = await self.transport.client.zrange(self.owner_key(correlation_id), 0, 0)
            micros = await self.transport.client.zscore(self.owner_key(correlation_id), owners[0]) if owners else None
        owner = (datetime.fromtimestamp(micros / 1e6, UTC), owners[0].decode()) if owners and micros else None
        return with_owner(project(correlation_id, _parse_events(raw)), owner)

    async def list(self, *, limit: int = 20) -> Sequence[WorkflowStatus]:
        with self.transport.errors("listing workflows"):
            ids = await self.transport.client.zrevrange(self.index_key, 0, max(0, limit - 1))
        found: list[WorkflowStatus] = []
        expired: list[bytes] = []
        for raw_id in ids:
            correlation_id = raw_id.decode()
            status = await self.get(correlation_id)
            if status is None:
                expired.append(raw_id)
            else:
                found.append(status)
        if expired:
            with self.transport.errors("forgetting expired workflows"):
                await self.transport.client.zrem(self.index_key, *expired)
        return found

    async def ids_starting_with(self, prefix: str) -> list[str]:
        """The correlation IDs of the kept workflows that start with `prefix`, sorted."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"  # a glob that matches `prefix` literally
        client = self.transport.client
        with self.transport.errors("looking for workflows by prefix"):
            found = [member.decode() async for member, _ in client.zscan_iter(self.index_key, match=pattern)]
            if len(found) > 1:  # the index may still name workflows whose history expired
                found = [found_id for found_id in found if await client.exists(self.events_key(found_id))]
        return sorted(found)


def _parse_events(raw: Iterable[bytes]) -> list[WorkflowEvent]:
    events: list[WorkflowEvent] = []
    for item in raw:
        try:
            events.append(WorkflowEvent.model_validate_json(item, context=FROM_WIRE))
        except ValidationError:
            logger.warning("ignoring a stored event that is not a valid WorkflowEvent")
    return events
