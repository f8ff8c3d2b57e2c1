"""A worker process killed for good: its workflow shows `stalled` within two heartbeats (real brokers, processes)."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import pytest

from paigeant_ai import InMemoryWorkflowStore, WorkflowProjector
from paigeant_ai.store import WorkflowStatus, mark_stalled

from .brokers import RABBITMQ_URL, REDIS_URL, fleet, wait_until_advertised

HEARTBEAT = 0.5


@pytest.mark.slow
@pytest.mark.parametrize(
    "broker",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
)
async def test_a_workflow_whose_worker_was_killed_shows_stalled_within_two_heartbeats(
    tmp_path: Path, broker: Literal["redis", "rabbitmq"]
) -> None:
    url = REDIS_URL if broker == "redis" else RABBITMQ_URL
    async with fleet(tmp_path, broker, url, workers="tests.registry_workers", steps=["registry-slow", "@registry"]) as (
        workers,
        dispatcher,
        _,
    ):
        workers.env["PAIGEANT_REGISTRY_HEARTBEAT"] = str(HEARTBEAT)
        process = await workers.start("slow_worker")
        transport, security = dispatcher.transport, dispatcher.security

        await wait_until_advertised(dispatcher, ["registry-slow"], within=30)
        store = InMemoryWorkflowStore()
        projector = WorkflowProjector(transport, store, security=security)
        projecting = asyncio.create_task(projector.run())
        try:
            correlation_id = await dispatcher.dispatch_workflow(["registry-slow"], {})
            statuses: list[WorkflowStatus] = []

            async def running() -> bool:
                status = await store.get(correlation_id)
                statuses[:] = [status] if status is not None else []
                return status is not None and status.state == "running"

            deadline = time.monotonic() + 30
            while not await running():
                assert time.monotonic() < deadline, f"the step never started\n{workers.output()}"
                await asyncio.sleep(0.1)
            [marked] = await mark_stalled(statuses, transport, security=security)
            assert marked.state == "running"

            process.send_signal(signal.SIGKILL)
            await process.wait()
            killed = time.monotonic()
            while (marked := (await mark_stalled(statuses, transport, security=security))[0]).state != "stalled":
                assert time.monotonic() - killed < 4 * HEARTBEAT + 5, "the workflow never showed stalled"
                await asyncio.sleep(0.05)
            took = time.monotonic() - killed
            assert took <= 2 * HEARTBEAT + 1.5, f"stalled only {took:.2f}s after the kill"
            assert marked.stalled is not None
            assert marked.stalled.startswith("no worker serves 'registry-slow' (last seen ")
            last_seen = datetime.strptime(marked.stalled[-24:-5], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
            assert abs((datetime.now(UTC) - last_seen).total_seconds()) < 10
        finally:
            projector.stop()
            await projecting
