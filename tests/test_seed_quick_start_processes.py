"""The seed's quick start and planner, written as the seed shows them (`tests.seed_quick_start`), dispatch workflows
that complete with worker processes running: on RabbitMQ and on Redis, signed, the planner planning from the live
registry (the seed passes it no catalog)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Literal

import pytest

from paigeant_ai import InMemoryWorkflowStore, WorkflowProjector

from .brokers import RABBITMQ_URL, REDIS_URL, ROOT, fleet, wait_until_advertised

STEPS = ["validate-customer-data", "create-customer-account", "setup-payment-method", "send-welcome-email"]


async def run_seed_script(env: dict[str, str]) -> list[str]:
    """Run `python -m tests.seed_quick_start` as a user runs a script; its output lines."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "tests.seed_quick_start"),
        cwd=ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize(
    "broker",
    [pytest.param("redis", marks=pytest.mark.redis), pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)],
)
async def test_the_seed_quick_start_and_planner_dispatch_workflows_that_complete(
    tmp_path: Path, broker: Literal["redis", "rabbitmq"]
) -> None:
    url = REDIS_URL if broker == "redis" else RABBITMQ_URL
    async with fleet(tmp_path, broker, url, workers="examples.onboarding", steps=STEPS) as (workers, dispatcher, _):
        await workers.start("worker")
        await wait_until_advertised(dispatcher, STEPS, within=60)
        store = InMemoryWorkflowStore()
        projector = WorkflowProjector(dispatcher.transport, store, security=dispatcher.security)
        projecting = asyncio.create_task(projector.run())
        try:
            lines = await run_seed_script(workers.env)
            assert [line.split(": ")[0] for line in lines] == ["Workflow dispatched", "Planner dispatched"]
            dispatched = [line.split(": ")[1] for line in lines]
            deadline = asyncio.get_running_loop().time() + 60
            while [status.state if status else None for status in [await store.get(cid) for cid in dispatched]] != [
                "completed",
                "completed",
            ]:
                assert asyncio.get_running_loop().time() < deadline, f"not all completed\n{workers.output()}"
                await asyncio.sleep(0.1)
            for cid, email in zip(dispatched, ["new.customer@example.com", "john@example.com"], strict=True):
                status = await store.get(cid)
                assert status is not None
                assert [step.activity for step in status.steps] == STEPS
                assert status.payload is not None
                assert status.payload["customer_email"] == email
                assert status.payload["welcome_email"] == "Welcome aboard! Your premium account is ready."
        finally:
            projector.stop()
            await projecting
