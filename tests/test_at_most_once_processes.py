"""At-most-once steps under real crashes: worker processes on RabbitMQ and on Redis that SIGKILL themselves right
after a payment's effect and before its ack, once in every workflow (50 SIGKILLs on each broker: one step at a time
per worker), restarted until every workflow settled.

Counts come from what the worker processes recorded (`tests.doubt_workers`); a workflow's completion from the
`completed` events the workers published before their acks (applied by a `WorkflowProjector`), and a workflow in
doubt from its parked record in the shared waiting store, verified with the workers' key.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pytest

from paigeant_ai import WorkflowDispatcher
from paigeant_ai.approval import ParkedStep, verified
from paigeant_ai.store import InMemoryWorkflowStore, WorkflowProjector
from paigeant_ai.transports.redis import RedisTransport

from . import brokers
from .brokers import RABBITMQ_URL, REDIS_URL, Fleet, delete_redis_namespace, report
from .doubt_workers import ADDRESSES, CHECKED, NOTE, SHIP, UNCHECKED, payments
from .workflows_for_crash import read_records

Broker = Literal["rabbitmq", "redis"]

BROKERS = [
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("redis", marks=pytest.mark.redis),
]

pytestmark = pytest.mark.slow


@asynccontextmanager
async def doubt_fleet(
    tmp_path: Path, broker: Broker
) -> AsyncGenerator[tuple[Fleet, WorkflowDispatcher, Path, RedisTransport]]:
    """Worker processes, a dispatcher, the records directory and the Redis the workers keep start records in."""
    url = RABBITMQ_URL if broker == "rabbitmq" else REDIS_URL
    async with brokers.fleet(tmp_path, broker, url, workers="tests.doubt_workers", steps=ADDRESSES) as (
        workers,
        dispatcher,
        records,
    ):
        namespace = workers.env["PAIGEANT_NAMESPACE"]
        if broker == "rabbitmq":
            workers.env["PAIGEANT_SHARED_STORE_URL"] = REDIS_URL
        store = RedisTransport(REDIS_URL, namespace=namespace)
        await store.connect()
        try:
            yield workers, dispatcher, records, store
        finally:
            await store.disconnect()
            if broker == "rabbitmq":
                await delete_redis_namespace(namespace)


async def keep_running(workers: Fleet, replicas: int) -> None:
    """Keep `replicas` payment workers of each kind alive (each payment kills its own), until cancelled."""
    kinds: dict[str, list[asyncio.subprocess.Process]] = {"checked_worker": [], "unchecked_worker": []}
    while True:
        for kind, started in kinds.items():
            for _ in range(replicas - sum(process.returncode is None for process in started)):
                started.append(await workers.start(kind))
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_payment_killed_after_its_effect_happens_at_most_once(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    async with doubt_fleet(tmp_path, broker) as (workers, dispatcher, records, redis):
        events = InMemoryWorkflowStore()
        projector = WorkflowProjector(dispatcher.transport, events, security=dispatcher.security)
        projecting = asyncio.create_task(projector.run())
        checked = [await dispatcher.dispatch_workflow([CHECKED, SHIP], {"n": n}) for n in range(25)]
        unchecked = [await dispatcher.dispatch_workflow([UNCHECKED, SHIP], {"n": n}) for n in range(25)]
        notes = [await dispatcher.dispatch_workflow([NOTE, SHIP], {"n": n}) for n in range(20)]
        waiting = redis.waiting_store()
        await workers.start("rest_worker")
        restarting = asyncio.create_task(keep_running(workers, replicas=2))
        try:
            deadline = time.monotonic() + 300
            while True:
                done = {cid for cid in [*checked, *notes] if await _completed(events, cid)}
                parked = {record.correlation_id: record for record in await waiting.waiting()}
                if done == {*checked, *notes} and set(parked) == set(unchecked):
                    break
                assert time.monotonic() < deadline, (
                    f"not settled: {len({*checked, *notes} - done)} to complete, "
                    f"{len(set(unchecked) - set(parked))} to park in doubt"
                )
                await asyncio.sleep(0.3)
        finally:
            restarting.cancel()
            await asyncio.gather(restarting, return_exceptions=True)
            projector.stop()
            await projecting

        paid = payments(records)
        assert max(paid.values()) == 1, f"paid twice: {[cid for cid, n in paid.items() if n > 1]}"
        assert all(paid[cid] == 1 for cid in checked), "a reconciled payment happened once"
        assert all(paid[cid] <= 1 for cid in unchecked)
        for cid in unchecked:
            record: ParkedStep = parked[cid]
            assert verified(record, dispatcher.security)
            assert record.in_doubt is not None
            assert record.in_doubt.idempotency_key == f"{cid}:0:{UNCHECKED}"
        shipped = {line for lines in read_records(records, "ship").values() for line in lines}
        assert shipped >= {*checked, *notes}
        assert not shipped & set(unchecked), "nothing after an in-doubt step runs"
        killed = {path.name for path in (records / "killed").iterdir()}
        assert killed == {*checked, *unchecked}, "every payment's first run was killed after its effect, unacked"
        kills = sum(process.returncode == -signal.SIGKILL for process in workers.processes)
        assert kills == 50, "a SIGKILL after each at-most-once payment's effect, before its ack"
        report(
            capsys,
            f"{broker}: 70 workflows, {kills} workers killed after a payment; 25 reconciled, "
            f"{sum(paid[cid] for cid in unchecked)} of 25 unchecked in doubt after paying, 20 others completed "
            f"in {time.monotonic() - started:.1f}s",
        )


async def _completed(store: InMemoryWorkflowStore, cid: str) -> bool:
    status = await store.get(cid)
    return status is not None and status.state == "completed"
