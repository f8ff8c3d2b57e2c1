"""A step pinned to a version no worker on the broker runs stays there, however often it is handed back."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from paigeant_ai import ActivityContext, ActivitySpec, Worker, WorkflowDispatcher, WorkflowEvent, activity
from paigeant_ai._hop import Hop
from paigeant_ai.security import MessageSigner, generate_key

from .brokers import clean, dead_letters, make_transport, wait_until

KEY = generate_key("versions-brokers-1")


async def _charge(ctx: ActivityContext) -> dict[str, int]:
    return {"n": 1}


@pytest.mark.parametrize("name", ["redis", "rabbitmq"])
async def test_a_step_waiting_for_its_version_is_never_dead_lettered_for_being_handed_back_often(name: str) -> None:
    namespace = f"pin-{uuid.uuid4().hex[:8]}"
    transport = make_transport(name, namespace)
    try:
        async with transport:
            dispatcher = WorkflowDispatcher(transport, security=MessageSigner(KEY))
            await dispatcher.dispatch_workflow([ActivitySpec(name="charge", version="~=2.1")], {})
            events: list[WorkflowEvent] = []
            charge = activity(name="charge", version="1.9")(_charge)
            worker = Worker(transport, [charge], security=MessageSigner(KEY), on_event=events.append)
            pins = worker._pins  # pyright: ignore[reportPrivateUsage]
            pins.delay, handed, hand_back = 0.02, list[str](), pins.hand_back

            async def counted(hop: Hop, pin: str) -> None:
                handed.append(pin)
                await hand_back(hop, pin)

            pins.hand_back = counted
            running = asyncio.create_task(worker.run())
            await wait_until(lambda: len(handed) > 25, within=30, what="25 hand-backs")
            worker.stop()
            await running
            assert await dead_letters(transport) == []
    finally:
        await clean(transport, namespace)
