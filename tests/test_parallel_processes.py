"""Parallel groups run by real worker processes: 200 workflows of a 5-branch group on RabbitMQ and Redis (and by
one worker on the in-memory transport), a branch worker SIGKILLed mid-run, and RabbitMQ restarted mid-run (which
restarts the broker every test shares: like the other restart tests, it runs in the full CI only).

Every verdict comes from what the worker processes recorded (`tests.parallel_workers`): the step after the group
records whether its payload holds each branch's output under its key. Each test runs in a namespace of its own and
stops its processes and deletes its queues and keys, even when it fails.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal

import pytest

from paigeant_ai import InMemoryTransport, Worker, WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER

from . import brokers
from .brokers import RABBITMQ_URL, REDIS_URL, Fleet, delete_redis_namespace, report, require_rabbitmqctl, wait_until
from .parallel_workers import ADDRESSES, BRANCH_STEPS, ROUTE, end, start
from .test_rabbitmq_durability import rabbitmqctl
from .test_redis_durability import PrivateRedis
from .workflows_for_crash import read_records

Broker = Literal["rabbitmq", "redis"]

BROKERS = [
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("redis", marks=pytest.mark.redis),
]


@asynccontextmanager
async def parallel_fleet(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> AsyncGenerator[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes of `tests.parallel_workers` (see `brokers.fleet`); on RabbitMQ they, and the dispatcher,
    share the test Redis as their store, in the fleet's namespace, deleted afterwards."""
    url = RABBITMQ_URL if broker == "rabbitmq" else REDIS_URL
    if broker == "rabbitmq":
        monkeypatch.setenv("PAIGEANT_SHARED_STORE_URL", REDIS_URL)
    async with brokers.fleet(tmp_path, broker, url, workers="tests.parallel_workers", steps=ADDRESSES) as made:
        workers, dispatcher, records = made
        namespace = workers.env["PAIGEANT_NAMESPACE"]
        if broker == "rabbitmq":
            workers.env["PAIGEANT_SHARED_STORE_URL"] = REDIS_URL
        try:
            yield workers, dispatcher, records
        finally:
            if broker == "rabbitmq":
                await delete_redis_namespace(namespace)


def verdicts(records: Path) -> Counter[str]:
    """How often each workflow's last step ran, and what it found: `<cid> ok` or `<cid> bad ...`."""
    return Counter(line for lines in read_records(records, "last").values() for line in lines)


def finished(records: Path) -> set[str]:
    return {line.split(" ", 1)[0] for line in verdicts(records)}


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
async def test_200_workflows_of_a_5_branch_group_complete_with_their_merged_payload(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    async with parallel_fleet(tmp_path, broker, monkeypatch) as (workers, dispatcher, records):
        await workers.start("fan_worker")
        await workers.start("fan_worker")
        ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(ROUTE, {"n": n}) for n in range(200))))
        await wait_until(lambda: finished(records) >= set(ids), within=180, what="200 workflows to finish")
        await brokers.drained(dispatcher.transport, ADDRESSES[:-1], within=30)

        assert verdicts(records) == Counter(f"{cid} ok" for cid in ids), "each joined once, with every branch's output"
        branches = Counter(line for lines in read_records(records, "branch").values() for line in lines)
        assert len(branches) == 1000
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(capsys, f"{broker}: 200 workflows x 5 branches joined in {time.monotonic() - started:.1f}s")


@pytest.mark.slow
async def test_200_workflows_of_a_5_branch_group_complete_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAIGEANT_TEST_RECORDS", str(tmp_path))
    started = time.monotonic()
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport)
        ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(ROUTE, {"n": n}) for n in range(200))))
        worker = Worker(transport, [start, *BRANCH_STEPS, end], concurrency=40)
        await worker.run(burst=True)
    assert verdicts(tmp_path) == Counter(f"{cid} ok" for cid in ids)
    report(capsys, f"inmemory: 200 workflows x 5 branches joined in {time.monotonic() - started:.1f}s")


@pytest.mark.slow
@pytest.mark.parametrize("broker", BROKERS)
async def test_a_branch_worker_killed_mid_run_loses_no_workflow(
    broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with parallel_fleet(tmp_path, broker, monkeypatch) as (workers, dispatcher, records):
        workers.env["PAIGEANT_TEST_STEP_SECONDS"] = "0.3"
        await workers.start("ends_worker")
        victim = await workers.start("branch_worker")
        await workers.start("branch_worker")
        ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(ROUTE, {"n": n}) for n in range(60))))

        def victim_ran() -> int:
            return len(read_records(records, "branch").get(victim.pid or 0, []))

        await wait_until(lambda: victim_ran() >= 20, within=60, what="the victim to run branches")
        victim.kill()  # SIGKILL mid-run: the branches it held go back to the broker
        await victim.wait()
        await workers.start("branch_worker")
        await wait_until(lambda: finished(records) >= set(ids), within=120, what="every workflow to finish")
        await brokers.drained(dispatcher.transport, ADDRESSES[:-1], within=30)

        found = verdicts(records)
        assert {line.split(" ", 1)[0] for line in found} == set(ids)
        assert all(line.endswith(" ok") for line in found), [line for line in found if not line.endswith(" ok")]
        assert all(count == 1 for count in found.values()), "the step after the group ran once per workflow"
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(capsys, f"{broker} kill -9 of a branch worker: 60/60 joined ({victim_ran()} branches ran on the victim)")


@pytest.mark.slow
@pytest.mark.rabbitmq
async def test_groups_ride_out_a_rabbitmq_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Restarts the RabbitMQ every test shares (as `tests/test_rabbitmq_durability.py` does): the full CI runs it."""
    require_rabbitmqctl()
    async with parallel_fleet(tmp_path, "rabbitmq", monkeypatch) as (workers, dispatcher, records):
        workers.env["PAIGEANT_TEST_STEP_SECONDS"] = "0.2"
        await workers.start("fan_worker")
        await workers.start("fan_worker")
        ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(ROUTE, {"n": n}) for n in range(40))))
        await wait_until(lambda: len(finished(records)) >= 5, within=60, what="the first workflows to finish")
        try:
            await rabbitmqctl("stop_app")
            await asyncio.sleep(2)
        finally:
            await rabbitmqctl("start_app")
        await wait_until(lambda: finished(records) >= set(ids), within=180, what="every workflow to finish")

        found = verdicts(records)
        assert {line.split(" ", 1)[0] for line in found} == set(ids)
        assert all(line.endswith(" ok") for line in found), [line for line in found if not line.endswith(" ok")]
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(capsys, f"rabbitmq restarted mid-run: {len(ids)}/{len(ids)} workflows joined")


@pytest.mark.slow
@pytest.mark.redis
async def test_groups_ride_out_a_redis_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Redis killed (SIGKILL) mid-run and started again: a server of the test's own, so nothing else is disturbed;
    its append-only file, fsynced on every write, keeps the queues and the joins' results."""
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")
    await server.start()
    try:
        fleet = brokers.fleet(tmp_path, "redis", server.url, workers="tests.parallel_workers", steps=ADDRESSES)
        async with fleet as (workers, dispatcher, records):
            workers.env["PAIGEANT_TEST_STEP_SECONDS"] = "0.5"
            await workers.start("fan_worker")
            await workers.start("fan_worker")
            ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(ROUTE, {"n": n}) for n in range(100))))
            await wait_until(lambda: len(finished(records)) >= 5, within=60, what="the first workflows to finish")
            in_flight = len(ids) - len(finished(records))
            assert in_flight > 0, "Redis is killed while workflows run"
            await server.kill()
            await asyncio.sleep(1)
            await server.start()
            await wait_until(lambda: finished(records) >= set(ids), within=180, what="every workflow to finish")

            found = verdicts(records)
            assert {line.split(" ", 1)[0] for line in found} == set(ids)
            assert all(line.endswith(" ok") for line in found), [line for line in found if not line.endswith(" ok")]
            assert await dispatcher.transport.pending(DEAD_LETTER) == 0
            assert all(process.returncode is None for process in workers.processes)
            report(capsys, f"redis killed mid-run: {len(ids)}/{len(ids)} workflows joined ({in_flight} in flight)")
    except BaseException:
        print(server.log())
        raise
    finally:
        await server.kill()
