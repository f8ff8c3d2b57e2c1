"""Workers as real processes on the real RabbitMQ: one killed with SIGKILL mid-run, then the broker restarted
under running workers. No workflow may be lost; steps that ran twice are counted through their idempotency key.

Each test runs in a namespace of its own, stops its processes and deletes its queues, even when it fails.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from paigeant_ai import WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER

from . import brokers
from .brokers import RABBITMQ_URL, Fleet, report, require_rabbitmqctl, wait_until
from .workflows_for_crash import MIDDLE, STEPS, completed, dispatch, middle_runs, read_records

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def fleet(tmp_path: Path) -> AbstractAsyncContextManager[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes of `tests.workflows_for_crash`, a dispatcher and the records directory (see `brokers.fleet`)."""
    return brokers.fleet(tmp_path, "rabbitmq", RABBITMQ_URL, workers="tests.workflows_for_crash", steps=STEPS)


async def test_kill_9_a_worker_mid_run_loses_no_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    async with fleet(tmp_path) as (workers, dispatcher, records):
        ids = await dispatch(dispatcher, 200)
        await workers.start("edge_worker")
        victim = await workers.start("middle_worker")
        survivor = await workers.start("middle_worker")

        def victim_runs() -> int:
            return len(read_records(records, "middle").get(victim.pid, []))

        await wait_until(lambda: victim_runs() >= 20, within=20, what="the victim to run 20 middle steps")
        victim.kill()  # SIGKILL: no cleanup, its unacked deliveries return to the queue
        await victim.wait()
        killed_at = victim_runs()

        await wait_until(lambda: completed(records) >= set(ids), within=45, what="all 200 workflows to complete")
        assert completed(records) == set(ids)
        assert survivor.returncode is None
        runs = middle_runs(records)
        assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in ids}  # every middle step ran, under its own key
        twice = {key: count for key, count in runs.items() if count > 1}
        assert all(count == 2 for count in twice.values())
        assert len(twice) <= 4  # at most what the victim held unacked when it died: its prefetch
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(
            capsys,
            f"kill -9: 200/200 workflows completed in {time.monotonic() - started:.1f}s; the victim ran "
            f"{killed_at} middle steps before SIGKILL; {len(twice)} middle steps ran twice: {sorted(twice)}",
        )


async def rabbitmqctl(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {err.decode()}"


async def test_workers_reconnect_after_a_broker_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_rabbitmqctl()
    started = time.monotonic()
    async with fleet(tmp_path) as (workers, dispatcher, records):
        before = await dispatch(dispatcher, 100)
        await workers.start("edge_worker")
        await workers.start("middle_worker")
        await workers.start("middle_worker")
        await wait_until(lambda: len(completed(records)) >= 20, within=20, what="20 workflows to complete")
        in_flight = len(before) - len(completed(records))
        try:
            await rabbitmqctl("stop_app")
            stopped = time.monotonic()
            await asyncio.sleep(1)
        finally:
            await rabbitmqctl("start_app")
        down = time.monotonic() - stopped
        after = await dispatch(dispatcher, 50)  # the same transport: it reconnected by itself

        everything = set(before) | set(after)
        await wait_until(lambda: completed(records) >= everything, within=45, what="all 150 workflows to complete")
        assert completed(records) == everything
        assert all(process.returncode is None for process in workers.processes)
        runs = middle_runs(records)
        assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in everything}
        twice = sum(1 for count in runs.values() if count > 1)
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(
            capsys,
            f"broker restart: 150/150 workflows completed in {time.monotonic() - started:.1f}s; "
            f"{in_flight} were in flight when RabbitMQ stopped for {down:.1f}s; {twice} middle steps ran twice",
        )
