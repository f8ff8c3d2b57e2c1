"""Workers as real processes on one SQLite file: one killed with SIGKILL mid-run, then every one of them killed and
started again. No workflow may be lost; steps that ran twice are counted through their idempotency key.

Each test has a file of its own in its temporary directory; nothing is shared with other tests.
"""

from __future__ import annotations

import time
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from paigeant_ai import WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER

from . import brokers
from .brokers import Fleet, drained, report, wait_until
from .workflows_for_crash import MIDDLE, STEPS, completed, dispatch, middle_runs, read_records

pytestmark = pytest.mark.slow


def fleet(tmp_path: Path) -> AbstractAsyncContextManager[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes of `tests.sqlite_workflows` on a file in `tmp_path`, a dispatcher and the records
    directory (see `brokers.fleet`)."""
    path = str(tmp_path / "paigeant.sqlite3")
    return brokers.fleet(tmp_path, "sqlite", path, workers="tests.sqlite_workflows", steps=STEPS)


async def every_workflow_completed(dispatcher: WorkflowDispatcher, records: Path, ids: list[str]) -> dict[str, int]:
    """Wait until every workflow of `ids` completed, each middle step ran at most twice, nothing was dead-lettered
    and the queues drained: the middle steps that ran twice, with their counts."""
    await wait_until(lambda: completed(records) >= set(ids), within=90, what=f"all {len(ids)} workflows to complete")
    assert completed(records) == set(ids)
    runs = middle_runs(records)
    assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in ids}  # every middle step ran, under its own key
    twice = {key: count for key, count in runs.items() if count > 1}
    assert all(count == 2 for count in twice.values())
    assert await dispatcher.transport.pending(DEAD_LETTER) == 0
    await drained(dispatcher.transport, STEPS, within=30)
    return twice


async def test_kill_9_a_worker_mid_run_loses_no_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    async with fleet(tmp_path) as (workers, dispatcher, records):
        ids = await dispatch(dispatcher, 200)
        await workers.start("edge_worker")
        victim = await workers.start("middle_worker")
        survivor = await workers.start("middle_worker")

        def victim_runs() -> int:
            return len(read_records(records, "middle").get(victim.pid, []))

        await wait_until(lambda: victim_runs() >= 20, within=60, what="the victim to run 20 middle steps")
        victim.kill()  # SIGKILL: its leases lapse, and the survivor takes what it held
        await victim.wait()
        killed_at = victim_runs()

        twice = await every_workflow_completed(dispatcher, records, ids)
        assert survivor.returncode is None
        assert len(twice) <= 4  # what the victim held (its concurrency) and had not yet recorded as done
        report(
            capsys,
            f"sqlite kill -9: 200/200 workflows completed in {time.monotonic() - started:.1f}s; the victim ran "
            f"{killed_at} middle steps before SIGKILL; {len(twice)} middle steps ran twice",
        )


async def test_kill_9_every_worker_and_restart_resumes_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    async with fleet(tmp_path) as (workers, dispatcher, records):
        ids = await dispatch(dispatcher, 150)
        first_run = [await workers.start(target) for target in ("edge_worker", "middle_worker", "middle_worker")]
        await wait_until(lambda: len(completed(records)) >= 20, within=60, what="20 workflows to complete")
        for process in first_run:
            process.kill()  # SIGKILL every worker, mid-write for all they know
        for process in first_run:
            await process.wait()
        in_flight = len(ids) - len(completed(records))
        assert in_flight > 0

        for target in ("edge_worker", "middle_worker", "middle_worker"):
            await workers.start(target)
        twice = len(await every_workflow_completed(dispatcher, records, ids))
        assert twice <= 8  # at most what the two killed middle workers held
        report(
            capsys,
            f"sqlite kill -9 of every worker: 150/150 workflows completed in {time.monotonic() - started:.1f}s; "
            f"{in_flight} were in flight when every worker died; {twice} middle steps ran twice",
        )
