"""One workflow across transports, run by worker processes: Redis -> RabbitMQ -> Redis, the RabbitMQ worker killed.

Each step has a worker process of its own (`tests.hybrid_workers`), on the shared test brokers, in a namespace of
its own that is deleted afterwards; every process signs and verifies. Verdicts come from what the processes recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from paigeant_ai import WatchedEvent, WorkflowDispatcher, get_transport, read_registry
from paigeant_ai.contracts import DEAD_LETTER, EVENTS
from paigeant_ai.security import MessageSigner, generate_key

from .brokers import (
    PROGRESS_STREAM,
    RABBITMQ_URL,
    REDIS_URL,
    Fleet,
    delete_rabbitmq_addresses,
    delete_redis_namespace,
    drained,
    report,
    require_rabbitmq,
    require_redis,
    wait_until,
    wait_until_advertised,
)
from .hybrid_workers import FIRST, LAST, MIDDLE, ROUTE
from .workflows_for_crash import completed, read_records

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.rabbitmq]

WORKFLOWS = 40


def _middle_runs(records: Path) -> Counter[str]:
    return Counter(line for lines in read_records(records, "middle").values() for line in lines)


def _last_runs(records: Path) -> Counter[str]:
    return Counter(line for lines in read_records(records, "last").values() for line in lines)


async def test_redis_rabbitmq_redis_workflows_survive_a_kill_9_of_the_middle_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_redis()
    require_rabbitmq()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    records, logs = tmp_path / "records", tmp_path / "logs"
    records.mkdir()
    logs.mkdir()
    key = generate_key("hybrid-processes-test")
    env = {
        **os.environ,
        "PAIGEANT_SIGNING_KEY": json.dumps(key.as_dict(private=True)),
        "PAIGEANT_TRUSTED_KEYS": json.dumps({"keys": [key.as_dict(private=False)]}),
        "PAIGEANT_TRANSPORTS": f"store={REDIS_URL};ship={RABBITMQ_URL}",
        "PAIGEANT_HOME_TRANSPORT": "store",
        "PAIGEANT_REDIS_URL": REDIS_URL,
        "PAIGEANT_RABBITMQ_URL": RABBITMQ_URL,
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_TEST_RECORDS": str(records),
        "PAIGEANT_TEST_STEP_SECONDS": "0.3",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PAIGEANT_ALLOW_UNSIGNED", None)
    env.pop("PAIGEANT_SHARED_STORE_URL", None)
    workers = Fleet(env, logs, "tests.hybrid_workers")
    redis = get_transport("redis", url=REDIS_URL, namespace=namespace)
    rabbit = get_transport("rabbitmq", url=RABBITMQ_URL, namespace=namespace)
    try:
        await redis.connect()
        await rabbit.connect()
        dispatcher = WorkflowDispatcher(redis, security=MessageSigner(key), transports={"store": redis, "ship": rabbit})
        await workers.start("first_worker")
        doomed = await workers.start("middle_worker")
        await workers.start("last_worker")
        # Every worker advertises on the home transport too, its specs naming its own transport.
        await wait_until_advertised(dispatcher, [FIRST, MIDDLE, LAST], within=90)
        registry = await read_registry(redis, dispatcher.security)
        assert registry is not None
        advertised = {entry.name: entry.spec for entry in registry.entries()}
        route = [advertised[name] for name in (FIRST, MIDDLE, LAST)]  # as a planner builds it from its catalog
        assert route == ROUTE
        ids = [await dispatcher.dispatch_workflow(route, {"n": n}) for n in range(WORKFLOWS)]
        await wait_until(lambda: len(_middle_runs(records)) >= 6, within=60, what="the middle worker to run steps")
        doomed.kill()  # SIGKILL: its unacked steps go back to RabbitMQ
        await doomed.wait()
        killed_after = len(_middle_runs(records))
        await workers.start("middle_worker")
        await wait_until(lambda: completed(records) >= set(ids), within=120, what=f"{WORKFLOWS} workflows to finish")
        await drained(redis, [FIRST, LAST], within=30)
        await drained(rabbit, [MIDDLE], within=30)
        middle, last = _middle_runs(records), _last_runs(records)
        assert set(last) == set(ids)
        assert len(middle) == WORKFLOWS
        again = sum(middle.values()) - WORKFLOWS
        assert again <= 4  # at most what the killed worker held (its concurrency)
        assert sum(last.values()) - WORKFLOWS <= again  # a last step runs twice only if its middle step did
        assert await redis.pending(DEAD_LETTER) == 0
        assert await rabbit.pending(DEAD_LETTER) == 0
        # The events of every step, the RabbitMQ worker's included, are on the home transport (Redis); the last
        # workflow's middle step ran on the worker started after the kill (the killed one's unsent events are lost).
        kinds = [(seen.event.kind, seen.event.activity) async for seen in _until_completed(dispatcher, ids[-1])]
        assert ("step_completed", MIDDLE) in kinds
        assert kinds[-1] == ("completed", LAST)
        banner = workers.log_of("middle_worker", 1).read_text()
        assert "transports   ship (rabbitmq), store (redis); this one is ship, home store" in banner
        report(
            capsys,
            f"hybrid Redis -> RabbitMQ -> Redis: {WORKFLOWS} workflows completed; middle worker killed after "
            f"{killed_after} runs, {again} middle steps ran again, {sum(last.values()) - WORKFLOWS} last steps did",
        )
    except BaseException:
        print(workers.output())
        raise
    finally:
        await workers.stop()
        await redis.disconnect()
        await rabbit.disconnect()
        await delete_rabbitmq_addresses(
            namespace, [MIDDLE, DEAD_LETTER, EVENTS, PROGRESS_STREAM, "@cancellations", "@registry"]
        )
        await delete_redis_namespace(namespace)


async def _until_completed(dispatcher: WorkflowDispatcher, correlation_id: str) -> AsyncIterator[WatchedEvent]:
    async with asyncio.timeout(30):
        async for watched in dispatcher.watch(correlation_id):
            yield watched
            if watched.event.kind == "completed":
                return
