"""Steering workflows run by real worker processes on RabbitMQ and on Redis (and by one worker on the in-memory
transport): cancel half of 50 running workflows, SIGKILL a worker while compensations run, cancel before any
worker of the current step runs, and a faulted order undone in reverse, seen by `paigeant status` and one trace.

Every count comes from what the worker processes recorded (`tests.steering_workers`), never from this process's
memory; final states come from the workers' events, applied by a `WorkflowProjector` (or `paigeant status`). Each
test runs in a namespace of its own, and stops its processes and deletes its queues and keys, even when it fails.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pytest
from logfire.testing import CaptureLogfire

from paigeant_ai import InMemoryTransport, Worker, WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.observability import CORRELATION_ID
from paigeant_ai.store import FINAL_STATES, InMemoryWorkflowStore, WorkflowProjector, WorkflowStatus

from . import brokers
from .brokers import RABBITMQ_URL, REDIS_URL, ROOT, Fleet, delete_redis_namespace, report, require_redis, wait_until
from .steering_workers import BOOKING, ORDER, SAGA, addresses, counted, effects, lines

Broker = Literal["rabbitmq", "redis"]

BROKERS = [  # real processes for several seconds each: `slow`, as every process test
    pytest.param("rabbitmq", marks=[pytest.mark.rabbitmq, pytest.mark.slow]),
    pytest.param("redis", marks=[pytest.mark.redis, pytest.mark.slow]),
]


def steering_fleet(
    tmp_path: Path, broker: Broker
) -> AbstractAsyncContextManager[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes of `tests.steering_workers`, a dispatcher and the records directory (see `brokers.fleet`)."""
    url = RABBITMQ_URL if broker == "rabbitmq" else REDIS_URL
    steps = addresses(BOOKING, SAGA, ORDER)
    return brokers.fleet(tmp_path, broker, url, workers="tests.steering_workers", steps=steps)


@asynccontextmanager
async def projected(dispatcher: WorkflowDispatcher) -> AsyncGenerator[InMemoryWorkflowStore]:
    """A store fed, while the block runs, with the events every process publishes on the dispatcher's transport."""
    store = InMemoryWorkflowStore()
    projector = WorkflowProjector(dispatcher.transport, store, security=dispatcher.security)
    running = asyncio.create_task(projector.run())
    try:
        yield store
    finally:
        projector.stop()
        await running
    assert not projector.refused, f"events were refused: {dict(projector.refused)}"


async def final(
    store: InMemoryWorkflowStore,
    ids: Iterable[str],
    *,
    within: float,
    until: Callable[[WorkflowStatus], bool] = lambda status: True,
) -> dict[str, WorkflowStatus]:
    """The status of each workflow of `ids` once all of them ended and `until` holds for each; fails naming the
    ones that did not.

    A final state can show before every event is in: a compensation's worker may report the end of the undoing
    before the worker that stopped the workflow has sent its batch (why it stopped), so tests wait for that too.
    """
    deadline = time.monotonic() + within
    while True:
        statuses = {cid: await store.get(cid) for cid in ids}
        open_ = {
            cid: history(status) if status else None
            for cid, status in statuses.items()
            if status is None or status.state not in FINAL_STATES or not until(status)
        }
        if not open_:
            return {cid: status for cid, status in statuses.items() if status is not None}
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s; {len(open_)} workflows not ended as told: {open_}")
        await asyncio.sleep(0.2)


def history(status: WorkflowStatus) -> list[str]:
    """A workflow's events, in a line each: what a failing assertion shows."""
    return [
        f"{e.at:%H:%M:%S.%f} {e.kind} {e.step} {e.activity} {e.undoes or ''} {e.detail or ''}" for e in status.events
    ]


def told(records: Path, kind: str) -> dict[str, list[str]]:
    """What each compensation of `kind` was told (`cause by step key`), by workflow."""
    found: dict[str, list[str]] = {}
    for line in lines(records, kind):
        cid, _, rest = line.partition(" ")
        found.setdefault(cid, []).append(rest)
    return found


# -- 1. cancel 25 of 50 while their slow step runs ---------------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
async def test_cancel_25_of_50_running_workflows(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    async with steering_fleet(tmp_path, broker) as (workers, dispatcher, records), projected(dispatcher) as store:
        workers.env["PAIGEANT_TEST_STEP_SECONDS"] = "2"
        ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(list(BOOKING), {"n": n}) for n in range(50))))
        await workers.start("booking_worker")
        await workers.start("booking_worker")
        await wait_until(
            lambda: len(counted(records, "wait-started")) == 50, within=30, what="every workflow's step 2 to start"
        )
        # The 25 that started last have the most of their 2 seconds left when the cancels land.
        by_start = sorted(lines(records, "wait-started"), key=lambda line: float(line.split()[1]))
        doomed = [line.split()[0] for line in by_start[25:]]
        answers = await asyncio.gather(*(dispatcher.cancel(cid, "the customer withdrew", by="alice") for cid in doomed))
        assert {answer.state for answer in answers} == {"requested"}
        statuses = await final(store, ids, within=40, until=lambda status: status.state != "compensated")

        assert_cancelled_half(records, statuses, doomed, spared=set(ids) - set(doomed))
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(capsys, f"{broker}: 25 of 50 cancelled mid-step, 25 completed, in {time.monotonic() - started:.1f}s")


def assert_cancelled_half(
    records: Path, statuses: dict[str, WorkflowStatus], doomed: list[str], spared: set[str]
) -> None:
    """The cancelled workflows stopped in step 2 and were undone once; the others completed, undone never."""
    once = dict.fromkeys(doomed, 1)
    assert counted(records, "wait-cancelled") == once  # their running step 2 saw the cancellation
    assert not set(counted(records, "wait-finished")) & set(doomed)
    assert not set(counted(records, "finish")) & set(doomed)  # step 3 never started
    assert counted(records, "unbook") == once  # step 1 undone exactly once each
    assert all(what == ["cancelled alice 0"] for what in _without_keys(told(records, "unbook")).values())
    for cid in doomed:
        assert statuses[cid].state == "cancelled"
        said = statuses[cid].cancelled or ""
        assert "alice" in said
        assert "the customer withdrew" in said
    assert counted(records, "finish") == dict.fromkeys(spared, 1)
    assert {statuses[cid].state for cid in spared} == {"completed"}
    assert all(statuses[cid].compensation is None for cid in spared)


def _without_keys(found: dict[str, list[str]]) -> dict[str, list[str]]:
    """`cause by step`, without the idempotency key that ends each line."""
    return {cid: [what.rpartition(" ")[0] for what in whats] for cid, whats in found.items()}


async def test_cancel_25_of_50_running_workflows_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_TEST_RECORDS", str(tmp_path))
    monkeypatch.setenv("PAIGEANT_TEST_STEP_SECONDS", "2")
    store = InMemoryWorkflowStore()
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport)
        worker = Worker(transport, list(BOOKING), concurrency=60, on_event=store.apply)
        async with worker:
            ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(list(BOOKING)) for _ in range(50))))
            await wait_until(
                lambda: len(counted(tmp_path, "wait-started")) == 50, within=20, what="every workflow's step 2"
            )
            by_start = sorted(lines(tmp_path, "wait-started"), key=lambda line: float(line.split()[1]))
            doomed = [line.split()[0] for line in by_start[25:]]  # as on the brokers: the most of 2 s left
            answers = [await dispatcher.cancel(cid, "the customer withdrew", by="alice") for cid in doomed]
            assert {answer.state for answer in answers} == {"requested"}
            statuses = await final(store, ids, within=30, until=lambda status: status.state != "compensated")
        assert_cancelled_half(tmp_path, statuses, doomed, spared=set(ids) - set(doomed))
        assert (worker.stats.cancelled, worker.stats.compensated) == (25, 25)


# -- 2. SIGKILL a worker while compensations run ----------------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_worker_killed_while_compensations_run_loses_none(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    async with steering_fleet(tmp_path, broker) as (workers, dispatcher, records), projected(dispatcher) as store:
        workers.env["PAIGEANT_TEST_UNDO_SECONDS"] = "0.5"
        victim = await workers.start("saga_worker")
        await workers.start("saga_worker")
        ids = list(await asyncio.gather(*(dispatcher.dispatch_workflow(list(SAGA), {"n": n}) for n in range(30))))

        def in_flight(kind: str) -> Counter[str]:
            """The compensations the victim started and did not finish."""
            runs = Counter(f"{kind} {line}" for line in _victims(records, f"{kind}-started", victim.pid))
            return runs - Counter(f"{kind} {line}" for line in _victims(records, f"{kind}-finished", victim.pid))

        def undoing_now() -> bool:
            return sum((in_flight("release") + in_flight("refund")).values()) >= 2

        await wait_until(undoing_now, within=30, what="the victim to run compensations")
        victim.kill()  # SIGKILL, mid-compensation: what it held goes back to the broker
        await victim.wait()
        cut_short = in_flight("release") + in_flight("refund")
        await workers.start("saga_worker")
        statuses = await final(store, ids, within=60, until=lambda status: status.failure is not None)

        assert {status.state for status in statuses.values()} == {"compensated"}
        unexplained = [history(s) for s in statuses.values() if "the warehouse burned down" not in (s.failure or "")]
        assert not unexplained, unexplained
        forward = {line.split()[1] for line in lines(records, "forward")}
        assert len(forward) == 60  # two completed steps per workflow, each with its idempotency key
        runs = Counter(line.split()[-1] for kind in ("release", "refund") for line in lines(records, f"{kind}-started"))
        assert set(runs) == forward  # every compensation ran at least once...
        assert effects(records) == forward  # ...and had its effect, keyed on the step it undoes (once: it is a set)
        cut_keys = {line.split()[-1] for line in cut_short}
        assert cut_keys
        assert all(runs[key] >= 2 for key in cut_keys)
        assert {what.split()[0] for found in told(records, "release-finished").values() for what in found} == {
            "faulted"
        }
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(
            capsys,
            f"{broker} kill -9 mid-compensation: 30/30 compensated in {time.monotonic() - started:.1f}s; "
            f"{len(cut_keys)} compensations cut short ran again; {sum(runs.values())} runs for {len(forward)} effects",
        )


def _victims(records: Path, kind: str, pid: int) -> list[str]:
    path = records / f"{kind}-{pid}.log"
    return path.read_text().splitlines() if path.exists() else []


# -- 3. a cancel that waits for a worker ------------------------------------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_cancel_sent_while_no_worker_runs_takes_effect_when_one_starts(broker: Broker, tmp_path: Path) -> None:
    async with steering_fleet(tmp_path, broker) as (workers, dispatcher, records), projected(dispatcher) as store:
        unstarted = await dispatcher.dispatch_workflow(list(BOOKING))
        answer = await dispatcher.cancel(unstarted, "ordered twice", by="bob")
        assert answer.state == "requested"
        await workers.start("book_worker")  # no worker ran anything before the cancel
        # Step 2 has no worker yet, deliberately: the live-worker check would refuse the workflow.
        unchecked = WorkflowDispatcher(dispatcher.transport, security=dispatcher.security, require_live_workers=False)
        halfway = await unchecked.dispatch_workflow(list(BOOKING))
        await wait_until(lambda: halfway in counted(records, "book"), within=30, what="step 1 to run")
        answer = await dispatcher.cancel(halfway, "ordered twice", by="bob")  # step 2 has no worker yet
        assert answer.state == "requested"
        await workers.start("wait_worker")
        statuses = await final(store, [unstarted, halfway], within=30, until=lambda status: status.state == "cancelled")

        assert statuses[unstarted].state == statuses[halfway].state == "cancelled", [
            history(status) for status in statuses.values()
        ]
        assert all("bob" in (status.cancelled or "") for status in statuses.values())
        assert unstarted not in counted(records, "book")  # its first step never ran
        assert not counted(records, "wait-started")
        assert not counted(records, "finish")
        assert counted(records, "unbook") == {halfway: 1}  # the one completed step, undone once
        assert _without_keys(told(records, "unbook")) == {halfway: ["cancelled bob 0"]}


# -- 4. a faulted order, undone in reverse: its status and its one trace ------------------------------------------


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_faulted_order_is_undone_in_reverse_in_status_and_one_trace(
    broker: Broker, tmp_path: Path, capfire: CaptureLogfire
) -> None:
    require_redis()  # `paigeant status` reads the Redis workflow store, on either transport
    async with steering_fleet(tmp_path, broker) as (workers, dispatcher, records):
        namespace = workers.env["PAIGEANT_NAMESPACE"]
        try:
            workers.env["PAIGEANT_TEST_SPAN_FILE"] = str(tmp_path / "spans")
            workers.env["PAIGEANT_REDIS_URL"] = REDIS_URL
            await workers.start("order_payment_worker")
            await workers.start("order_shipping_worker")
            cid = await dispatcher.dispatch_workflow(list(ORDER), {"order": "o-1"})

            text = await status_until(workers.env, cid, "compensated", within=60)
            assert f"workflow {cid}: compensated" in text
            assert "failed: " in text
            assert "no carrier delivers to the moon" in text
            undone = [line.split() for line in text.splitlines() if " undoes " in line]  # the steps, by index
            assert [(row[1], row[2], row[3], row[row.index("undoes") + 1]) for row in undone] == [
                ("order-reserve.compensate", "completed", "1", "order-reserve"),
                ("order-charge.compensate", "completed", "1", "order-charge"),
            ]
            timeline = [line.split() for line in text.splitlines() if " undoing " in line]  # as they happened
            assert [row[4:6] for row in timeline if row[2] == "step_completed"] == [
                ["1", "order-charge.compensate"],
                ["0", "order-reserve.compensate"],
            ]
            # In the order they ran (one process appends them to one file), each once.
            assert [[*line.split()[0:3], line.split()[4]] for line in lines(records, "order-undo")] == [
                ["refund", cid, "faulted", "1"],
                ["release", cid, "faulted", "0"],
            ]
            assert not lines(records, "order-notify")

            spans = await spans_of(tmp_path, cid, within=20)
            [dispatch] = [
                span for span in capfire.exporter.exported_spans_as_dict() if span["name"] == "paigeant.dispatch"
            ]
            assert {span["trace_id"] for span in spans} == {f"{dispatch['context']['trace_id']:032x}"}
        finally:
            if broker == "rabbitmq":
                await delete_redis_namespace(namespace)  # the workflow store (on Redis, the fleet deletes it)


UNDONE_ACTIVITIES = {
    "order-reserve",
    "order-charge",
    "order-ship",
    "order-charge.compensate",
    "order-reserve.compensate",
}


async def status_until(env: dict[str, str], cid: str, state: str, *, within: float) -> str:
    """The text of `paigeant status <cid>` once its first line says `state`."""
    deadline = time.monotonic() + within
    while True:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "paigeant_ai.cli", "status", cid),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        text = out.decode()
        if process.returncode == 0 and text.startswith(f"workflow {cid}: {state}\n"):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"`paigeant status` did not say {state} in {within:g}s:\n{text}{err.decode()}")
        await asyncio.sleep(0.5)


async def spans_of(folder: Path, cid: str, *, within: float) -> list[dict[str, Any]]:
    """The spans the worker processes exported for workflow `cid`, once those of every step and compensation
    are there."""
    deadline = time.monotonic() + within
    while True:
        spans = [
            span
            for path in folder.glob("spans.*")  # noqa: ASYNC240 - a few small files, read while processes run
            for span in map(json.loads, path.read_text().splitlines())
            if span["attributes"].get(CORRELATION_ID) == cid
        ]
        ran = {span["attributes"].get("paigeant.activity") for span in spans if span["name"] == "paigeant.activity"}
        if ran >= UNDONE_ACTIVITIES and len({span["pid"] for span in spans}) == 2:
            return spans
        if time.monotonic() > deadline:
            raise AssertionError(f"the spans of {sorted(UNDONE_ACTIVITIES)} did not all arrive; got {sorted(ran)}")
        await asyncio.sleep(0.2)
