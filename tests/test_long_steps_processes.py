"""Steps longer than the broker's ack timeout, on real brokers and real worker processes: each runs once.

RabbitMQ takes back a delivery held unacked past its `consumer_timeout` (checked on every channel's tick). These
tests lower both on the shared test broker, for new channels only, and restore them afterwards, even on failure:
the timeout only while the workers open their channels, the tick for the test's length.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from paigeant_ai.contracts import DEAD_LETTER

from . import brokers
from .brokers import (
    RABBITMQ_URL,
    REDIS_URL,
    report,
    require_rabbitmqctl,
    require_redis,
    wait_until,
    wait_until_advertised,
)
from .long_steps_workers import LONG, STEPS, dispatch, long_runs, runs_by_process
from .workflows_for_crash import completed

pytestmark = pytest.mark.slow

CONSUMER_TIMEOUT = 10  # seconds, on the broker, for the workers' channels
STEP_SECONDS = 25  # two and a half times that


# -- the broker's settings, lowered for a moment ---------------------------------------------------------------


async def _rabbitmqctl_eval(expression: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "rabbitmqctl", "eval", expression, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl eval {expression!r} failed: {err.decode()}"
    return out.decode().strip()


async def get_rabbit_env(name: str) -> int | None:
    """The `rabbit` application's setting `name` (an integer), None when unset."""
    found = re.fullmatch(r"\{ok,(\d+)\}", await _rabbitmqctl_eval(f"application:get_env(rabbit, {name})."))
    return int(found.group(1)) if found else None


async def set_rabbit_env(name: str, value: int | None) -> None:
    if value is None:
        await _rabbitmqctl_eval(f"application:unset_env(rabbit, {name}).")
    else:
        await _rabbitmqctl_eval(f"application:set_env(rabbit, {name}, {value}).")
    assert await get_rabbit_env(name) == value, f"the broker's {name} did not change"


@asynccontextmanager
async def rabbit_env(name: str, value: int) -> AsyncGenerator[None]:
    """The broker's setting `name` at `value` (channels opened meanwhile keep it), restored on the way out."""
    original = await get_rabbit_env(name)
    try:
        await set_rabbit_env(name, value)
        yield
    finally:
        await set_rabbit_env(name, original)


# -- RabbitMQ --------------------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
async def test_a_step_longer_than_the_consumer_timeout_runs_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Five workflows whose middle step takes 2.5 times the broker's consumer timeout, on two worker processes of
    three slots each: each step runs once, and no worker fails (the broker closes no channel under a step)."""
    require_rabbitmqctl()
    require_redis()
    started = time.monotonic()
    async with (
        brokers.fleet(tmp_path, "rabbitmq", RABBITMQ_URL, workers="tests.long_steps_workers", steps=STEPS) as (
            workers,
            dispatcher,
            records,
        ),
        shared_store_cleaned(workers.env),
        rabbit_env("channel_tick_interval", 1000),
    ):
        workers.env |= {
            "PAIGEANT_SHARED_STORE_URL": REDIS_URL,
            "PAIGEANT_TEST_STEP_SECONDS": str(STEP_SECONDS),
            "PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT": str(CONSUMER_TIMEOUT),
            "PAIGEANT_STEP_LEASE": "4",
            "PAIGEANT_TEST_CONCURRENCY": "3",
        }
        await workers.start("tests.workflows_for_crash:edge_worker")
        async with rabbit_env("consumer_timeout", CONSUMER_TIMEOUT * 1000):
            await workers.start("long_worker")
            await workers.start("long_worker")
            await wait_until_consumed(dispatcher.transport, LONG, 2)
        await wait_until_advertised(dispatcher, STEPS, within=30)  # the edge worker may be ready after them
        ids = await dispatch(dispatcher, 5)

        await wait_until(lambda: completed(records) >= set(ids), within=150, what="all 5 workflows to complete")
        runs = long_runs(records)
        assert set(runs) == {f"{cid}:1:{LONG}" for cid in ids}
        assert {key: count for key, count in runs.items() if count > 1} == {}, "a long step ran twice"
        assert len(runs_by_process(records)) == 2  # both processes ran long steps
        errors = [line for line in workers.output().splitlines() if " ERROR " in line]
        assert errors == [], "a worker failed (the broker closed a channel under a step)"
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(
            capsys,
            f"long steps: 5/5 workflows of a {STEP_SECONDS}s step under a {CONSUMER_TIMEOUT}s consumer timeout "
            f"completed in {time.monotonic() - started:.1f}s, each step run once",
        )


async def wait_until_consumed(transport: object, address: str, count: int) -> None:
    """Wait until the queue of `address` has `count` consumers (their channels are open)."""
    consumers = getattr(transport, "consumers")  # noqa: B009 - RabbitMQ's `ConsumerWatch`
    deadline = time.monotonic() + 30
    while await consumers(address) < count:
        assert time.monotonic() < deadline, f"timed out waiting for {count} consumers of {address}"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def shared_store_cleaned(env: dict[str, str]) -> AsyncGenerator[None]:
    """Delete what the workers kept in the shared store (the test Redis, in their namespace) on the way out."""
    try:
        yield
    finally:
        await brokers.delete_redis_namespace(env["PAIGEANT_NAMESPACE"])


@pytest.mark.rabbitmq
async def test_a_long_step_whose_worker_is_killed_is_taken_over_by_its_watch_copy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The worker running a handed-back step dies (SIGKILL): the broker has nothing to redeliver, and the watch copy
    finds the claim lapsed within about two leases, and the other worker runs the step; the workflow completes.

    The workers are told the broker's timeout is 6 s (they hand deliveries back after 3 s); the broker's own is
    left alone."""
    require_redis()
    lease = 3.0
    async with (
        brokers.fleet(tmp_path, "rabbitmq", RABBITMQ_URL, workers="tests.long_steps_workers", steps=STEPS) as (
            workers,
            dispatcher,
            records,
        ),
        shared_store_cleaned(workers.env),
    ):
        workers.env |= {
            "PAIGEANT_SHARED_STORE_URL": REDIS_URL,
            "PAIGEANT_TEST_STEP_SECONDS": "12",
            "PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT": "6",
            "PAIGEANT_STEP_LEASE": str(lease),
            "PAIGEANT_TEST_CONCURRENCY": "1",
        }
        await workers.start("tests.workflows_for_crash:edge_worker")
        first_worker = await workers.start("long_worker")
        second_worker = await workers.start("long_worker")
        await wait_until_consumed(dispatcher.transport, LONG, 2)
        await wait_until_advertised(dispatcher, STEPS, within=30)  # the edge worker may be ready after them
        [cid] = await dispatch(dispatcher, 1)

        await wait_until(lambda: bool(long_runs(records)), within=30, what="the long step to start")
        [(victim_pid, _)] = runs_by_process(records).items()
        victim, survivor = (
            (first_worker, second_worker) if first_worker.pid == victim_pid else (second_worker, first_worker)
        )
        await asyncio.sleep(3 + lease)  # handed back after 3 s; its claim renewed since
        victim.kill()
        await victim.wait()
        killed = time.monotonic()

        await wait_until(
            lambda: survivor.pid in runs_by_process(records), within=4 * lease + 5, what="the survivor to take over"
        )
        taken_over = time.monotonic() - killed
        await wait_until(lambda: cid in completed(records), within=40, what="the workflow to complete")
        assert runs_by_process(records) == {victim.pid: [f"{cid}:1:{LONG}"], survivor.pid: [f"{cid}:1:{LONG}"]}
        assert survivor.returncode is None
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(capsys, f"long step, worker killed: taken over {taken_over:.1f}s after SIGKILL (lease {lease:g}s)")


# -- Redis -----------------------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_redis_steps_longer_than_the_visibility_timeout_run_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Redis Streams renews the lease of what a consumer holds while its step runs: four steps of three times the
    visibility timeout, on two worker processes, each run once."""
    started = time.monotonic()
    async with brokers.fleet(tmp_path, "redis", REDIS_URL, workers="tests.long_steps_workers", steps=STEPS) as (
        workers,
        dispatcher,
        records,
    ):
        workers.env |= {"PAIGEANT_TEST_VISIBILITY_TIMEOUT": "2", "PAIGEANT_TEST_STEP_SECONDS": "6"}
        await workers.start("redis_edge_worker")
        await workers.start("redis_long_worker")
        await workers.start("redis_long_worker")
        await wait_until_advertised(dispatcher, STEPS, within=30)  # the workers get ready in any order
        ids = await dispatch(dispatcher, 4)

        await wait_until(lambda: completed(records) >= set(ids), within=60, what="all 4 workflows to complete")
        runs = long_runs(records)
        assert runs == {f"{cid}:1:{LONG}": 1 for cid in ids}
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(
            capsys,
            f"redis long steps: 4/4 workflows of a 6s step under a 2s visibility timeout completed in "
            f"{time.monotonic() - started:.1f}s, each step run once",
        )
