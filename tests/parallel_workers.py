"""Workers for the parallel-group tests that run as processes of their own:

    python -m paigeant_ai.cli worker tests.parallel_workers:fan_worker

The environment picks the broker, the namespace, the shared store (`PAIGEANT_SHARED_STORE_URL`, for RabbitMQ) and
the directory where each run is recorded (`PAIGEANT_TEST_RECORDS`, see `tests.workflows_for_crash.record`); a
branch takes `PAIGEANT_TEST_STEP_SECONDS`.

The workflow: `fan-start`, then a group of five branches (`fan-b0` ... `fan-b4`), then `fan-end`, which records
whether the payload holds each branch's output under its key (`ok`) or not (`bad ...`).
"""

from __future__ import annotations

import asyncio
import os

from paigeant_ai import ActivityContext, FunctionActivity, Parallel, Worker, activity, get_transport
from paigeant_ai.settings import Settings
from paigeant_ai.transports import Transport

from .workflows_for_crash import record

BRANCHES = 5


@activity(name="fan-start")
async def start(ctx: ActivityContext) -> dict[str, str]:
    return {"started": ctx.correlation_id}


def _branch(number: int) -> FunctionActivity:
    async def run(ctx: ActivityContext) -> dict[str, object]:
        record("branch", f"{ctx.correlation_id} {number}")
        await asyncio.sleep(float(os.environ.get("PAIGEANT_TEST_STEP_SECONDS", "0.01")))
        return {"number": number, "of": ctx.correlation_id}

    return FunctionActivity(run, name=f"fan-b{number}")


BRANCH_STEPS = [_branch(number) for number in range(BRANCHES)]


@activity(name="fan-end")
async def end(ctx: ActivityContext) -> None:
    expected = {f"fan-b{n}": {"number": n, "of": ctx.correlation_id} for n in range(BRANCHES)}
    found = {key: ctx.payload.get(key) for key in expected}
    verdict = "ok" if found == expected and ctx.payload.get("started") == ctx.correlation_id else f"bad {found}"
    record("last", f"{ctx.correlation_id} {verdict}")


ROUTE = [start, Parallel(*BRANCH_STEPS), end]
ADDRESSES = ["fan-start", *(step.spec.name for step in BRANCH_STEPS), "fan-end", "@cancellations"]


def _transport() -> Transport:
    if Settings.from_env().transport == "redis":
        from paigeant_ai.transports.redis import RedisTransport

        # A SIGKILLed worker's entries are claimed by another after this many seconds.
        return RedisTransport(visibility_timeout=float(os.environ.get("PAIGEANT_TEST_VISIBILITY_TIMEOUT", "2")))
    return get_transport()


def fan_worker() -> Worker:
    """Every step of the workflow."""
    return Worker(_transport(), [start, *BRANCH_STEPS, end], concurrency=40, shutdown_timeout=5)


def ends_worker() -> Worker:
    """The steps before and after the group."""
    return Worker(_transport(), [start, end], concurrency=40, shutdown_timeout=5)


def branch_worker() -> Worker:
    """The branches only: run two to have one to kill."""
    return Worker(_transport(), BRANCH_STEPS, concurrency=20, shutdown_timeout=5)
