"""Workers of a workflow whose steps live on Redis, then RabbitMQ, then Redis, each run as a process of its own:

    python -m paigeant_ai.cli worker tests.hybrid_workers:middle_worker

The environment names the two transports (`PAIGEANT_TRANSPORTS='store=redis://...;ship=amqp://...'`), the home of
the events (`PAIGEANT_HOME_TRANSPORT=store`), the namespace, the directory where each run is recorded
(`PAIGEANT_TEST_RECORDS`, see `tests.workflows_for_crash.record`) and how long the middle step takes
(`PAIGEANT_TEST_STEP_SECONDS`). The middle step records its idempotency key, the last one the workflow's ID.
"""

from __future__ import annotations

import asyncio
import os

from paigeant_ai import ActivityContext, ActivitySpec, Worker, activity, get_transport
from paigeant_ai.transports import Transport

from .workflows_for_crash import record

FIRST, MIDDLE, LAST = "hybrid-first", "hybrid-middle", "hybrid-last"
ROUTE = [
    ActivitySpec(name=FIRST, transport="store"),
    ActivitySpec(name=MIDDLE, transport="ship"),
    ActivitySpec(name=LAST, transport="store"),
]


@activity(name=FIRST)
async def first(ctx: ActivityContext) -> dict[str, int]:
    return {"first_pid": os.getpid()}


@activity(name=MIDDLE)
async def middle(ctx: ActivityContext) -> dict[str, int]:
    record("middle", ctx.idempotency_key)
    await asyncio.sleep(float(os.environ.get("PAIGEANT_TEST_STEP_SECONDS", "0.2")))
    return {"middle_pid": os.getpid()}


@activity(name=LAST)
async def last(ctx: ActivityContext) -> None:
    record("last", ctx.correlation_id)


def _redis() -> Transport:
    # A stopped worker's entries are claimed by another after this many seconds.
    return get_transport("redis", visibility_timeout=2.0)


def first_worker() -> Worker:
    """The first step, on Redis (its transports and home from the environment)."""
    return Worker(_redis(), [first], concurrency=10, shutdown_timeout=5)


def middle_worker() -> Worker:
    """The slow middle step, on RabbitMQ: the one killed."""
    return Worker(get_transport("rabbitmq"), [middle], concurrency=4, shutdown_timeout=5)


def last_worker() -> Worker:
    """The last step, on Redis again."""
    return Worker(_redis(), [last], concurrency=10, shutdown_timeout=5)
