"""`paigeant worker --processes 2` on Redis and RabbitMQ, as real processes: a supervisor and its two worker
processes serve workflows, stop gracefully on SIGTERM, start a child again after `kill -9`, and do not outlive a
supervisor that was killed.

The workflows are the three steps of the crash tests (`tests.workflows_for_crash`, `tests.redis_workflows` on
Redis): the supervisor runs the slow middle step, a plain worker process the first and last. Which process ran a
step is recorded by pid, and the registry tells the live workers' pids.
"""

from __future__ import annotations

import asyncio
import os
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from paigeant_ai import WorkflowDispatcher, read_registry
from paigeant_ai.contracts import DEAD_LETTER

from . import brokers
from .brokers import RABBITMQ_URL, REDIS_URL, Fleet, drained, wait_until
from .workflows_for_crash import MIDDLE, STEPS, completed, dispatch, middle_runs, read_records

pytestmark = pytest.mark.slow

STARTUP = 90
"""Seconds a process may take to start: a worker process imports pydantic-ai, slow on a busy machine."""


@pytest.fixture(
    params=[pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)]
)
def broker(request: pytest.FixtureRequest) -> str:
    return request.param


def fleet(tmp_path: Path, broker: str) -> AbstractAsyncContextManager[tuple[Fleet, WorkflowDispatcher, Path]]:
    if broker == "redis":
        return brokers.fleet(tmp_path, "redis", REDIS_URL, workers="tests.redis_workflows", steps=STEPS)
    return brokers.fleet(tmp_path, "rabbitmq", RABBITMQ_URL, workers="tests.workflows_for_crash", steps=STEPS)


async def supervise(workers: Fleet, processes: int = 2) -> asyncio.subprocess.Process:
    """Start `paigeant worker tests.redis_workflows:middle_worker --processes N`."""
    workers.env["PAIGEANT_REGISTRY_HEARTBEAT"] = "0.5"  # a killed child lapses from the registry soon
    return await workers.start("middle_worker", "--processes", str(processes))


def parent_of(pid: int) -> int | None:
    """The parent of a running process; None once it has exited (a zombie no one reaped has exited too)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except FileNotFoundError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[1])


async def children(dispatcher: WorkflowDispatcher, supervisor: int, *, count: int = 2) -> set[int]:
    """The pids of the supervisor's children that serve the middle step, once `count` of them do."""
    found: set[int] = set()

    async def look() -> None:
        registry = await read_registry(dispatcher.transport, dispatcher.security)
        workers = registry.workers(MIDDLE) if registry is not None else []
        found.clear()
        found.update(record.pid for record in workers if parent_of(record.pid) == supervisor)

    for _ in range(STARTUP * 10):
        await look()
        if len(found) >= count:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {sorted(found)} of {count} children of {supervisor} serve {MIDDLE}")


async def serves_middle(dispatcher: WorkflowDispatcher) -> bool:
    registry = await read_registry(dispatcher.transport, dispatcher.security)
    return registry is not None and registry.serves(MIDDLE)


def supervisor_log(workers: Fleet, process: asyncio.subprocess.Process) -> str:
    return workers.log_of("middle_worker", workers.processes.index(process)).read_text()


async def test_two_processes_serve_a_batch_and_a_sigterm_stops_both_gracefully(tmp_path: Path, broker: str) -> None:
    async with fleet(tmp_path, broker) as (workers, dispatcher, records):
        await workers.start("edge_worker")
        supervisor = await supervise(workers)
        pids = await children(dispatcher, supervisor.pid)
        ids = await dispatch(dispatcher, 40)

        def runs_of(pid: int) -> int:
            return len(read_records(records, "middle").get(pid, []))

        await wait_until(lambda: all(runs_of(pid) >= 3 for pid in pids), within=60, what="both children to run steps")
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), 30) == 0
        assert all(parent_of(pid) is None for pid in pids)
        assert not await serves_middle(dispatcher)  # each child withdrew from the registry as it stopped
        log = supervisor_log(workers, supervisor)
        assert "worker 1/2 stopped: " in log
        assert "worker 2/2 stopped: " in log
        assert log.endswith("supervisor stopped: 2 worker processes stopped\n")

        second = await supervise(workers)  # what the first left in the stream, taken over
        await children(dispatcher, second.pid)
        await wait_until(lambda: completed(records) >= set(ids), within=60, what="all 40 workflows to complete")
        assert completed(records) == set(ids)
        runs = middle_runs(records)
        assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in ids}
        assert set(runs.values()) == {1}  # a graceful stop finishes what it runs: no step ran twice
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0


@pytest.mark.parametrize(
    ("sig", "ended"), [(signal.SIGKILL, "was killed by SIGKILL"), (signal.SIGTERM, "exited with code 0")]
)
async def test_a_child_killed_mid_run_is_started_again_and_every_workflow_completes(
    tmp_path: Path, broker: str, sig: signal.Signals, ended: str
) -> None:
    """Killed, or stopped on its own by someone's SIGTERM: either way the supervisor starts another."""
    async with fleet(tmp_path, broker) as (workers, dispatcher, records):
        await workers.start("edge_worker")
        supervisor = await supervise(workers)
        victim, survivor = sorted(await children(dispatcher, supervisor.pid))
        ids = await dispatch(dispatcher, 60)

        def victim_runs() -> int:
            return len(read_records(records, "middle").get(victim, []))

        await wait_until(lambda: victim_runs() >= 5, within=60, what="the victim to run 5 middle steps")
        os.kill(victim, sig)
        await wait_until(lambda: parent_of(victim) is None, within=30, what="the victim to end")
        replaced = await children(dispatcher, supervisor.pid)  # its successor advertises
        await wait_until(lambda: completed(records) >= set(ids), within=90, what="all 60 workflows to complete")

        assert survivor in replaced
        assert victim not in replaced
        assert supervisor.returncode is None
        assert completed(records) == set(ids)
        assert set(middle_runs(records)) == {f"{cid}:1:{MIDDLE}" for cid in ids}
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        await drained(dispatcher.transport, STEPS, within=30)
        assert f"(pid {victim}) {ended}; starting another in 0.5s" in supervisor_log(workers, supervisor)
        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.wait(), 30) == 0
        assert "supervisor stopped: 2 worker processes stopped, 1 restarted on the way" in supervisor_log(
            workers, supervisor
        )


async def test_the_children_of_a_killed_supervisor_stop_gracefully(tmp_path: Path, broker: str) -> None:
    async with fleet(tmp_path, broker) as (workers, dispatcher, _):
        supervisor = await supervise(workers)
        pids = await children(dispatcher, supervisor.pid)
        supervisor.kill()
        await supervisor.wait()

        await wait_until(lambda: all(parent_of(pid) is None for pid in pids), within=15, what="the children to exit")
        assert not await serves_middle(dispatcher)  # they withdrew from the registry: a graceful stop
        log = supervisor_log(workers, supervisor)
        assert log.count("the supervisor is gone: stopping gracefully") == 2
        assert "worker 1/2 stopped: " in log
        assert "worker 2/2 stopped: " in log
