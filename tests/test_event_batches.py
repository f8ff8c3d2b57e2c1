"""A worker's batched events reach `events` in the order they were reported: an event published at once (the
`completed` event) never overtakes a batch still on its way to the broker, whoever sends that batch (issue 18)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from paigeant_ai import InMemoryTransport
from paigeant_ai._events import EventReporter, decode_events
from paigeant_ai.contracts import EVENTS


class SlowBroker(InMemoryTransport):
    """Holds every batch with a `step_completed` event until `let_through` is set, and records what arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.let_through = asyncio.Event()
        self.holding = asyncio.Event()
        self.started_sent = asyncio.Event()
        self.arrived: list[list[str]] = []

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        kinds = [event.kind for event in decode_events(body)] if address == EVENTS else []
        if "step_completed" in kinds:
            self.holding.set()
            await self.let_through.wait()
        self.arrived.append(kinds)
        await super().publish(address, body, headers=headers, delay=delay)
        if kinds == ["step_started"]:
            self.started_sent.set()


async def test_the_completed_event_waits_for_a_batch_that_a_flush_is_still_sending() -> None:
    async with SlowBroker() as broker:
        reporter = EventReporter(broker)
        await reporter.report("step_started", None, correlation_id="wf-1", activity="one", step=0)
        flushing = asyncio.create_task(reporter.flush())
        await broker.started_sent.wait()
        # The background batch is sent and its task ends; this event comes before the flush goes on, so the
        # flush takes it and sends it itself.
        await reporter.report("step_completed", None, correlation_id="wf-1", activity="one", step=0)
        await broker.holding.wait()
        assert not flushing.done()  # the flush, not the background task, carries the held batch

        completing = asyncio.create_task(reporter.report("completed", None, now=True, correlation_id="wf-1"))
        await asyncio.sleep(0.05)
        assert broker.arrived == [["step_started"]]  # the completed event did not go ahead of the held batch
        broker.let_through.set()
        await asyncio.gather(completing, flushing)
        await reporter.flush()
        stream = await (await broker.read_progress("wf-1")).read(0)

    assert broker.arrived == [["step_started"], ["step_completed"], ["completed"]]
    # The workflow's progress stream, which `watch` reads, has them in the same order.
    assert [[event.kind for event in decode_events(entry.body)] for entry in stream] == broker.arrived
