"""Workers as real processes on the real RabbitMQ: one killed with SIGKILL mid-run, then the broker restarted
under running workers. No workflow may be lost; steps that ran twice are counted through their idempotency key.

Each test runs in a namespace of its own, stops its processes and deletes its queues, even when it fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from paigeant_ai import WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER, EVENTS
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports.rabbitmq import DELAY_BUCKETS, RabbitMQTransport

from .conftest import RABBITMQ_URL, require_rabbitmq
from .test_transport_rabbitmq import delete_queues, require_rabbitmqctl
from .workflows_for_crash import MIDDLE, STEPS, read_records

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WORKERS = "tests.workflows_for_crash"


@dataclass
class Fleet:
    """Worker processes started with `paigeant worker`, each logging to a file of its own."""

    env: dict[str, str]
    logs: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list[asyncio.subprocess.Process])

    async def start(self, target: str) -> asyncio.subprocess.Process:
        log = os.open(self.logs / f"{target.rpartition(':')[2]}-{len(self.processes)}.log", os.O_WRONLY | os.O_CREAT)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "paigeant_ai.cli",
                "worker",
                f"{WORKERS}:{target}",
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            os.close(log)
        self.processes.append(process)
        return process

    async def stop(self) -> None:
        """SIGTERM (graceful) every process still running, SIGKILL what is left after 10 seconds."""
        running = [p for p in self.processes if p.returncode is None]
        for process in running:
            with suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                with suppress(ProcessLookupError):
                    process.kill()
                await process.wait()

    def output(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text()[-3000:]}" for path in sorted(self.logs.glob("*.log")))


@asynccontextmanager
async def fleet(tmp_path: Path) -> AsyncGenerator[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes, a dispatcher and the records directory, all in a namespace of their own."""
    require_rabbitmq()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    records = tmp_path / "records"
    logs = tmp_path / "logs"
    records.mkdir()
    logs.mkdir()
    key = generate_key("durability-test")  # every process signs and verifies, as in production
    env = {
        **os.environ,
        "PAIGEANT_SIGNING_KEY": json.dumps(key.as_dict(private=True)),
        "PAIGEANT_TRUSTED_KEYS": json.dumps({"keys": [key.as_dict(private=False)]}),
        "PAIGEANT_TRANSPORT": "rabbitmq",
        "PAIGEANT_RABBITMQ_URL": RABBITMQ_URL,
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_TEST_RECORDS": str(records),
        "PAIGEANT_TEST_STEP_SECONDS": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    workers = Fleet(env, logs)
    transport = RabbitMQTransport(RABBITMQ_URL, namespace=namespace)
    try:
        await transport.connect()
        yield workers, WorkflowDispatcher(transport, security=MessageSigner(key)), records
    except BaseException:
        print(workers.output())
        raise
    finally:
        await workers.stop()
        await transport.disconnect()
        await delete_namespace(namespace)


async def delete_namespace(namespace: str) -> None:
    queues = [f"{namespace}.{address}" for address in (*STEPS, DEAD_LETTER, EVENTS)]
    await delete_queues([*queues, *(f"{queue}@delay-{bucket}" for queue in queues for bucket, _ in DELAY_BUCKETS)])


async def wait_until(condition: Callable[[], bool], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.1)


def completed(records: Path) -> set[str]:
    return {line for lines in read_records(records, "last").values() for line in lines}


def middle_runs(records: Path) -> Counter[str]:
    return Counter(line for lines in read_records(records, "middle").values() for line in lines)


async def dispatch(dispatcher: WorkflowDispatcher, count: int) -> list[str]:
    return [await dispatcher.dispatch_workflow(list(STEPS), {"n": n}) for n in range(count)]


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


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
