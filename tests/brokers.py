"""The test brokers, in one place: where they are, the three transports, clean-up, and worker processes.

- `conftest.transport` is the fixture that runs a test on every transport (the broker ones marked `redis` /
  `rabbitmq`; SQLite on a file of its own in the temporary folder), each in a namespace of its own that is deleted
  afterwards; a module with a `transport` fixture of its
  own keeps it. `dead_letters()` reads what any of them dead-lettered.
- `delete_redis_namespace()`, `delete_queues()`, `delete_rabbitmq_addresses()` and `delete_rabbitmq_namespace()` are
  the clean-up helpers every test that leaves something on a broker shares.
- `fleet()` starts `paigeant worker` processes on a real broker for the crash tests, with what they share.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import pytest

from paigeant_ai import InMemoryTransport, WorkflowDispatcher, get_transport, read_registry
from paigeant_ai.contracts import DEAD_LETTER, EVENTS
from paigeant_ai.exceptions import TransportError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import Delivery

PROGRESS_STREAM = "@progress"
"""The address of RabbitMQ's progress stream, shared by every workflow of a namespace (deleted with it)."""

# The brokers the tests use; point them elsewhere with these two variables (see the README's Development section).
RABBITMQ_URL = os.environ.get("PAIGEANT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PAIGEANT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")

ROOT = Path(__file__).resolve().parent.parent


# -- is the broker there ---------------------------------------------------------------------------------------


def require_redis() -> None:
    """Skip unless the Redis of `PAIGEANT_TEST_REDIS_URL` answers (fail in CI)."""
    parts = urlsplit(REDIS_URL)
    require_server("Redis", parts.hostname or "127.0.0.1", parts.port or 6379)


def require_rabbitmq() -> None:
    """Skip unless the RabbitMQ of `PAIGEANT_TEST_RABBITMQ_URL` answers (fail in CI)."""
    parts = urlsplit(RABBITMQ_URL)
    require_server("RabbitMQ", parts.hostname or "127.0.0.1", parts.port or 5672)


def require_server(name: str, host: str, port: int) -> None:
    """Skip when a broker is absent locally; fail in CI, where it must be there."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError as exc:
        message = f"{name} is not reachable on {host}:{port} ({exc}); start it to run this test"
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI must provide it (.ci/run starts it).")
        pytest.skip(message)


def require_rabbitmqctl() -> None:
    """Skip when `rabbitmqctl` cannot manage the broker here; fail in CI, where it must."""
    if shutil.which("rabbitmqctl") is None:
        message = "rabbitmqctl is not on PATH; this test manages the broker with it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


# -- the three transports --------------------------------------------------------------------------------------


TRANSPORTS = [
    "inmemory",
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
]


def make_transport(name: str, namespace: str) -> Transport:
    """A transport of kind `name` on the test brokers, in `namespace`."""
    if name == "inmemory":
        return InMemoryTransport()
    if name == "sqlite":
        return get_transport("sqlite", path=sqlite_path(namespace), namespace=namespace)
    if name == "redis":
        require_redis()
        return get_transport("redis", url=REDIS_URL, namespace=namespace)
    require_rabbitmq()
    return get_transport("rabbitmq", url=RABBITMQ_URL, namespace=namespace)


async def dead_letters(transport: Transport) -> list[Delivery]:
    """Every message dead-lettered on `transport` so far, acknowledged (each transport's `pending` counts the
    deliveries this process holds, so the count tells when all of them are in hand)."""
    letters: list[Delivery] = []
    async with await transport.consume(DEAD_LETTER, prefetch=1000) as consumer:
        while await transport.pending(DEAD_LETTER) > len(letters):
            letters.append(await asyncio.wait_for(anext(consumer), 5))
        for letter in letters:
            await transport.ack(letter)
    return letters


# -- clean-up --------------------------------------------------------------------------------------------------


async def clean(transport: Transport, namespace: str) -> None:
    """Delete what `transport` left on its broker in `namespace`."""
    if transport.name == "sqlite":
        delete_sqlite_files(namespace)
    elif transport.name == "redis":
        await delete_redis_namespace(namespace)
    elif transport.name == "rabbitmq":
        await delete_queues(getattr(transport, "_declared", set[str]()))


def sqlite_path(namespace: str) -> Path:
    """The file of a test's SQLite transport: one per namespace, in the temporary folder."""
    return Path(tempfile.gettempdir()) / f"{namespace}.sqlite3"


def delete_sqlite_files(namespace: str) -> None:
    """Delete the file of `namespace`'s SQLite transport and its WAL files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{sqlite_path(namespace)}{suffix}").unlink(missing_ok=True)


async def delete_redis_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Delete every key of the namespace: its streams (`ns.*`) and its other keys (`ns:*`)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}[.:]*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


async def delete_queues(names: Iterable[str]) -> None:
    """Delete the queues (a missing one is not an error), waiting up to 30 seconds for a broker that restarts."""
    import aio_pika

    for attempt in range(30):
        try:
            connection = await aio_pika.connect(RABBITMQ_URL)
        except ConnectionError:
            if attempt == 29:
                raise
            await asyncio.sleep(1)
            continue
        async with connection:
            channel = await connection.channel()
            for name in sorted(names):
                await channel.queue_delete(name)
        return


async def delete_rabbitmq_addresses(namespace: str, addresses: Iterable[str]) -> None:
    """Delete the queues of `addresses` in `namespace`, with their delay queues, whoever declared them."""
    from paigeant_ai.transports.rabbitmq import DELAY_BUCKETS

    queues = [f"{namespace}.{address}" for address in addresses]
    await delete_queues([*queues, *(f"{queue}@delay-{bucket}" for queue in queues for bucket, _ in DELAY_BUCKETS)])


async def delete_rabbitmq_namespace(namespace: str) -> None:
    """Delete every queue of `namespace` that `rabbitmqctl` lists (without it, they stay, harmless, under their
    unique namespace)."""
    if shutil.which("rabbitmqctl") is None:
        return
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name"],
        capture_output=True,
        text=True,
        check=False,
    )
    names = [name for name in listing.stdout.split() if name.startswith(f"{namespace}.")]
    if names:
        await delete_queues(names)


# -- worker processes, for the crash tests ---------------------------------------------------------------------


@dataclass
class Fleet:
    """Worker processes started with `python -m paigeant_ai.cli worker`, each logging to a file of its own."""

    env: dict[str, str]
    logs: Path
    workers: str
    """The module whose attributes a bare target names."""
    processes: list[asyncio.subprocess.Process] = field(default_factory=list[asyncio.subprocess.Process])

    async def start(self, target: str, *options: str) -> asyncio.subprocess.Process:
        """Start `python -m paigeant_ai.cli worker <target> <options>`; a bare attribute is one of `self.workers`."""
        target = target if ":" in target else f"{self.workers}:{target}"
        fd = os.open(self.log_of(target.rpartition(":")[2], len(self.processes)), os.O_WRONLY | os.O_CREAT)
        try:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "paigeant_ai.cli", "worker", target, *options),
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
async def fleet(
    tmp_path: Path, broker: Literal["rabbitmq", "redis", "sqlite"], url: str, *, workers: str, steps: Iterable[str]
) -> AsyncGenerator[tuple[Fleet, WorkflowDispatcher, Path]]:
    """Worker processes, a dispatcher and the records directory, all in a namespace of their own on `url` (on
    SQLite, `url` is the file's path).

    Every process signs and verifies, as in production. Afterwards the processes are stopped and the namespace is
    deleted (on RabbitMQ, the queues of `steps` and of the dead letters and events; on Redis, every key; but only on
    the shared test servers: a server of a test's own goes with it), even when the test fails.
    """
    if url == RABBITMQ_URL:
        require_rabbitmq()
    elif url == REDIS_URL:
        require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    records, logs = tmp_path / "records", tmp_path / "logs"
    records.mkdir()
    logs.mkdir(exist_ok=True)
    key = generate_key(f"{broker}-durability-test")
    env = {
        **os.environ,
        "PAIGEANT_SIGNING_KEY": json.dumps(key.as_dict(private=True)),
        "PAIGEANT_TRUSTED_KEYS": json.dumps({"keys": [key.as_dict(private=False)]}),
        "PAIGEANT_TRANSPORT": broker,
        f"PAIGEANT_{broker.upper()}_{'PATH' if broker == 'sqlite' else 'URL'}": url,
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_TEST_RECORDS": str(records),
        "PAIGEANT_TEST_STEP_SECONDS": "0.2",
        "PAIGEANT_TEST_VISIBILITY_TIMEOUT": "2",  # for `tests.redis_workflows`: a dead worker's steps return soon
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("PAIGEANT_ALLOW_UNSIGNED", None)
    processes = Fleet(env, logs, workers)
    where = {"path": url} if broker == "sqlite" else {"url": url}
    transport = get_transport(broker, **where, namespace=namespace)
    try:
        await transport.connect()
        yield processes, WorkflowDispatcher(transport, security=MessageSigner(key)), records
    except BaseException:
        print(processes.output())
        raise
    finally:
        await processes.stop()
        await transport.disconnect()
        if url == RABBITMQ_URL:
            await delete_rabbitmq_addresses(namespace, [*steps, DEAD_LETTER, EVENTS, PROGRESS_STREAM])
        elif url == REDIS_URL:
            await delete_redis_namespace(namespace)


async def wait_until(condition: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll `condition` every 0.1 s; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        await asyncio.sleep(0.1)


async def wait_until_advertised(dispatcher: WorkflowDispatcher, steps: Iterable[str], *, within: float) -> None:
    """Wait until live workers on the dispatcher's registry serve every one of `steps`: worker processes started
    together get ready in any order, and a dispatch meanwhile is refused once some of them are live."""
    wanted = set(steps)
    deadline = time.monotonic() + within
    while not wanted <= set(live := await read_live(dispatcher)):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for workers of {sorted(wanted - set(live))}")
        await asyncio.sleep(0.1)


async def read_live(dispatcher: WorkflowDispatcher) -> list[str]:
    """The activities live workers serve, by the dispatcher's registry (verified with its keys)."""
    registry = await read_registry(dispatcher.transport, dispatcher.security)
    return registry.names if registry is not None else []


async def drained(transport: Transport, addresses: Iterable[str], *, within: float) -> None:
    """Wait until nothing is pending on `addresses`: a copy of a step run twice is still skipped and acked after
    its workflow completed. Fail naming what is left after `within` seconds.

    A count that fails is asked again until then: after a failover, the test's own client may still hold a
    connection the old master closed, and the worker processes, not this client, are what the tests check."""
    deadline = time.monotonic() + within
    while left := await _pending(transport, addresses):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s with messages still pending: {left}")
        await asyncio.sleep(0.1)


async def _pending(transport: Transport, addresses: Iterable[str]) -> dict[str, int | str]:
    left: dict[str, int | str] = {}
    for address in addresses:
        try:
            if n := await transport.pending(address):
                left[address] = n
        except TransportError as exc:
            left[address] = f"not counted: {exc}"
    return left


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    """Print `text` past pytest's capture: what a crash test measured."""
    with capsys.disabled():
        print(f"\n{text}")


def redis_command_line(monkeypatch: pytest.MonkeyPatch, **more: str) -> str:
    """Point the `paigeant` commands of this test at the test Redis, unsigned, in a new namespace (returned).

    `more` sets other `PAIGEANT_*` variables, by their names without the prefix (`STALL_AFTER="0"`).
    """
    require_redis()
    name = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    settings = {"NAMESPACE": name, "REDIS_URL": REDIS_URL, "TRANSPORT": "redis", "ALLOW_UNSIGNED": "1", **more}
    for key, value in settings.items():
        monkeypatch.setenv(f"PAIGEANT_{key}", value)
    return name
