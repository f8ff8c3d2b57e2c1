"""A worker for the registry's process test, run as a process of its own:

    python -m paigeant_ai.cli worker tests.registry_workers:slow_worker

The environment picks the broker, the namespace, the keys and the heartbeat (`PAIGEANT_REGISTRY_HEARTBEAT`).
Its one step, `registry-slow`, takes an hour: a workflow stays at it while the test kills the worker.
"""

from __future__ import annotations

import asyncio

from paigeant_ai import ActivityContext, Worker, activity, get_transport


@activity(name="registry-slow")
async def slow(ctx: ActivityContext) -> dict[str, str]:
    await asyncio.sleep(3600)
    return {"slow": "done"}


slow.version = "1.4.2"  # pyright: ignore[reportAttributeAccessIssue]


def slow_worker() -> Worker:
    return Worker(get_transport(), [slow], concurrency=2, shutdown_timeout=1)
