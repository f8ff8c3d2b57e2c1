"""Workers as real processes on Redis Streams: one killed with SIGKILL mid-run, then Redis itself killed and
restarted under running workers. No workflow may be lost; steps that ran twice are counted through their
idempotency key.

The crash test uses the shared Redis (DB 15) in a namespace of its own. The shared Redis keeps nothing on disk,
so the restart test starts a private `redis-server` (append-only file, `appendfsync always`, a free port, a
temporary folder), kills it with SIGKILL and starts it again on the same files. Both stop their processes and
clean up, even when they fail.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from paigeant_ai import WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER

from . import brokers
from .brokers import REDIS_URL, ROOT, Fleet, drained, report, wait_until, wait_until_advertised
from .workflows_for_crash import MIDDLE, STEPS, completed, dispatch, middle_runs, read_records

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def fleet(tmp_path: Path, url: str) -> AbstractAsyncContextManager[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes of `tests.redis_workflows` on `url`, a dispatcher and the records directory (see
    `brokers.fleet`)."""
    return brokers.fleet(tmp_path, "redis", url, workers="tests.redis_workflows", steps=STEPS)


async def test_kill_9_a_worker_mid_run_loses_no_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    async with fleet(tmp_path, REDIS_URL) as (workers, dispatcher, records):
        ids = await dispatch(dispatcher, 200)
        await workers.start("edge_worker")
        victim = await workers.start("middle_worker")
        survivor = await workers.start("middle_worker")

        def victim_runs() -> int:
            return len(read_records(records, "middle").get(victim.pid, []))

        await wait_until(lambda: victim_runs() >= 20, within=30, what="the victim to run 20 middle steps")
        victim.kill()  # SIGKILL: its leases lapse, and the survivor claims what it held
        await victim.wait()
        killed_at = victim_runs()

        await wait_until(lambda: completed(records) >= set(ids), within=45, what="all 200 workflows to complete")
        assert completed(records) == set(ids)
        assert survivor.returncode is None
        runs = middle_runs(records)
        assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in ids}  # every middle step ran, under its own key
        twice = {key: count for key, count in runs.items() if count > 1}
        assert all(count == 2 for count in twice.values())
        assert len(twice) <= 4  # what the victim held (its prefetch) and had not yet recorded as done
        transport = dispatcher.transport
        assert await transport.pending(DEAD_LETTER) == 0
        await drained(transport, STEPS, within=30)
        report(
            capsys,
            f"redis kill -9: 200/200 workflows completed in {time.monotonic() - started:.1f}s; the victim ran "
            f"{killed_at} middle steps before SIGKILL; {len(twice)} middle steps ran twice: {sorted(twice)}",
        )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class PrivateRedis:
    """A `redis-server` of this test's own that keeps its data in an append-only file, fsynced on every write."""

    folder: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        executable = shutil.which("redis-server")
        if executable is None:
            if os.environ.get("CI"):
                pytest.fail("redis-server is not installed; CI must provide it")
            pytest.skip("redis-server is not installed")
        self.process = await asyncio.create_subprocess_exec(
            *(executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder)),
            *("--appendonly", "yes", "--appendfsync", "always", "--save", ""),
            *("--logfile", str(self.folder / "redis.log")),
            stdin=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"redis-server did not start:\n{self.log()}") from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                return

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text()[-3000:] if path.exists() else ""


async def test_workers_ride_out_a_redis_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    (tmp_path / "redis").mkdir()
    server = PrivateRedis(tmp_path / "redis")
    await server.start()
    try:
        async with fleet(tmp_path, server.url) as (workers, dispatcher, records):
            before = await dispatch(dispatcher, 100)
            await workers.start("edge_worker")
            await workers.start("middle_worker")
            await workers.start("middle_worker")
            await wait_until(lambda: len(completed(records)) >= 20, within=30, what="20 workflows to complete")
            in_flight = len(before) - len(completed(records))
            await server.kill()  # SIGKILL: only what the append-only file has survives
            stopped = time.monotonic()
            await asyncio.sleep(1)
            await server.start()
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
                f"redis restart: 150/150 workflows completed in {time.monotonic() - started:.1f}s; {in_flight} were "
                f"in flight when Redis was killed and down for {down:.1f}s; {twice} middle steps ran twice",
            )
    except BaseException:
        print(server.log())
        raise
    finally:
        await server.kill()


async def test_onboarding_runs_across_worker_processes(tmp_path: Path) -> None:
    steps = {
        "validate_worker": "validate-customer-data",
        "account_worker": "create-customer-account",
        "payment_worker": "setup-payment-method",
        "welcome_worker": "send-welcome-email",
    }
    async with fleet(tmp_path, REDIS_URL) as (workers, ready, _):
        for target in steps:
            await workers.start(f"examples.onboarding:{target}")
        await wait_until_advertised(ready, steps.values(), within=60)  # else a dispatch may find some of them live
        dispatcher = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "examples.onboarding", "--dispatch-only"),
            cwd=ROOT,
            env=workers.env,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(dispatcher.communicate(), 60)
        assert dispatcher.returncode == 0
        assert out.decode().startswith("dispatched onboarding workflow ")
        welcome = workers.log_of("welcome_worker", 3)
        await wait_until(
            lambda: "completed; final payload" in welcome.read_text(), within=60, what="the workflow to complete"
        )
        for number, (target, step) in enumerate(steps.items()):
            assert f" done    step {number} {step} " in workers.log_of(target, number).read_text()
        assert " retry   step 2 setup-payment-method" in workers.log_of("payment_worker", 2).read_text()
        assert '"welcome_email": "Welcome aboard! Your premium account is ready."' in welcome.read_text()
