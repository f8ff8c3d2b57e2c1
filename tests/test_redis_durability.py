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
import json
import os
import shutil
import signal
import socket
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
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports.redis import RedisTransport

from .conftest import REDIS_URL
from .test_transport_redis import delete_namespace, require_redis
from .workflows_for_crash import MIDDLE, STEPS, read_records

pytestmark = [pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WORKERS = "tests.redis_workflows"


@dataclass
class Fleet:
    """Worker processes started with `python -m paigeant_ai.cli worker`, each logging to a file of its own."""

    env: dict[str, str]
    logs: Path
    processes: list[asyncio.subprocess.Process] = field(default_factory=list[asyncio.subprocess.Process])

    async def start(self, target: str) -> asyncio.subprocess.Process:
        """Start `python -m paigeant_ai.cli worker <target>`; a bare attribute is one of `tests.redis_workflows`."""
        target = target if ":" in target else f"{WORKERS}:{target}"
        log = self.log_of(target.rpartition(":")[2], len(self.processes))
        fd = os.open(log, os.O_WRONLY | os.O_CREAT)
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "paigeant_ai.cli",
                "worker",
                target,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
            )
        finally:
            os.close(fd)
        self.processes.append(process)
        return process

    def log_of(self, name: str, number: int) -> Path:
        return self.logs / f"{name}-{number}.log"

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
async def fleet(tmp_path: Path, url: str) -> AsyncGenerator[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes, a dispatcher and the records directory, all in a namespace of their own on `url`."""
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    records, logs = tmp_path / "records", tmp_path / "logs"
    records.mkdir()
    logs.mkdir(exist_ok=True)
    key = generate_key("redis-durability-test")  # every process signs and verifies, as in production
    env = {
        **os.environ,
        "PAIGEANT_SIGNING_KEY": json.dumps(key.as_dict(private=True)),
        "PAIGEANT_TRUSTED_KEYS": json.dumps({"keys": [key.as_dict(private=False)]}),
        "PAIGEANT_TRANSPORT": "redis",
        "PAIGEANT_REDIS_URL": url,
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_TEST_RECORDS": str(records),
        "PAIGEANT_TEST_STEP_SECONDS": "0.2",
        "PAIGEANT_TEST_VISIBILITY_TIMEOUT": "2",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PAIGEANT_ALLOW_UNSIGNED", None)
    workers = Fleet(env, logs)
    transport = RedisTransport(url, namespace=namespace)
    try:
        await transport.connect()
        yield workers, WorkflowDispatcher(transport, security=MessageSigner(key)), records
    except BaseException:
        print(workers.output())
        raise
    finally:
        await workers.stop()
        await transport.disconnect()
        if url == REDIS_URL:
            await delete_namespace(namespace)


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
    require_redis()
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
        assert all([await transport.pending(step) == 0 for step in STEPS])
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
    require_redis()
    steps = {
        "validate_worker": "validate-customer-data",
        "account_worker": "create-customer-account",
        "payment_worker": "setup-payment-method",
        "welcome_worker": "send-welcome-email",
    }
    async with fleet(tmp_path, REDIS_URL) as (workers, _, _):
        for target in steps:
            await workers.start(f"examples.onboarding:{target}")
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
