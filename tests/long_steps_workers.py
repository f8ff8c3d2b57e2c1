"""Workflows whose middle step outlasts the broker's ack timeout; each worker runs as its own process:

    python -m paigeant_ai.cli worker tests.long_steps_workers:long_worker

The first and last steps are those of `tests.workflows_for_crash` (its `edge_worker` runs them). The middle step
sleeps `PAIGEANT_TEST_STEP_SECONDS` and records its idempotency key in `PAIGEANT_TEST_RECORDS`, one line per run,
so a step that ran twice shows up as a repeated key. The environment picks the broker, the namespace, the shared
store, the broker's consumer timeout and the lease (`PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT`, `PAIGEANT_STEP_LEASE`).
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

from paigeant_ai import ActivityContext, Worker, WorkflowDispatcher, activity, get_transport
from paigeant_ai.transports.redis import RedisTransport

from .workflows_for_crash import FIRST, LAST, first, last, read_records, record

LONG = "long-middle"
STEPS = (FIRST, LONG, LAST)


def long_runs(records: Path) -> Counter[str]:
    """How many times each long step ran, by idempotency key."""
    return Counter(line for lines in read_records(records, "long").values() for line in lines)


def runs_by_process(records: Path) -> dict[int, list[str]]:
    """The long steps each process started, by process id."""
    return read_records(records, "long")


async def dispatch(dispatcher: WorkflowDispatcher, count: int) -> list[str]:
    """Dispatch `count` of these workflows; their correlation IDs."""
    return [await dispatcher.dispatch_workflow(list(STEPS), {"n": n}) for n in range(count)]


@activity(name=LONG, timeout=300)
async def long_middle(ctx: ActivityContext) -> dict[str, int]:
    record("long", ctx.idempotency_key)
    await asyncio.sleep(float(os.environ.get("PAIGEANT_TEST_STEP_SECONDS", "1")))
    return {"long_pid": os.getpid()}


def long_worker() -> Worker:
    """The long middle step, `PAIGEANT_TEST_CONCURRENCY` at a time; run two of these to have competing consumers."""
    concurrency = int(os.environ.get("PAIGEANT_TEST_CONCURRENCY", "2"))
    return Worker(get_transport(), [long_middle], concurrency=concurrency, shutdown_timeout=2)


def redis_long_worker() -> Worker:
    """The long middle step on Redis Streams, whose lease (`visibility_timeout`) is shorter than the step."""
    transport = RedisTransport(visibility_timeout=float(os.environ.get("PAIGEANT_TEST_VISIBILITY_TIMEOUT", "2")))
    return Worker(transport, [long_middle], concurrency=2, shutdown_timeout=2)


def redis_edge_worker() -> Worker:
    """The quick first and last steps, on Redis Streams."""
    return Worker(RedisTransport(), [first, last], concurrency=20, shutdown_timeout=2)
