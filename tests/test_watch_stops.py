"""Where a watch ends: only where the workflow is really over, never at a stop its compensations still follow, nor
where it waits for a person (issue 18)."""

from __future__ import annotations

import asyncio

from paigeant_ai import InMemoryTransport, WatchedEvent, WorkflowDispatcher
from paigeant_ai._events import WorkflowEvent
from paigeant_ai._watch import watch_workflow

from .brokers import wait_until
from .scripted import refunder
from .test_steering import KEYS, Shop, signer


async def test_cancelling_a_waiting_workflow_is_watched_to_the_end_of_its_undoing() -> None:
    async with InMemoryTransport() as transport:
        shop = Shop(transport)
        refund = refunder()
        worker = shop.worker(refund)
        cid = await shop.dispatcher.dispatch_workflow(["reserve", refund, "ship"])
        await worker.run(burst=True)
        watched: list[WatchedEvent] = []
        dispatcher_security = shop.dispatcher.security

        async def watch() -> None:
            # No linger: every read returns what the stream holds at once, as a slow broker would split it.
            async for item in watch_workflow(transport, dispatcher_security, cid, poll=0.05, linger=0):
                watched.append(item)

        watching = asyncio.create_task(watch())
        await wait_until(lambda: any(item.event.kind == "waiting" for item in watched), within=10, what="waiting")
        assert not watching.done(), "a workflow waiting for a person is not over"

        async def slow_broker(event: WorkflowEvent) -> None:
            await shop.store.apply(event)
            await asyncio.sleep(0.3)  # a watch reads between the events the cancel reports

        dispatcher = WorkflowDispatcher(
            transport, security=signer(KEYS.orders), on_event=slow_broker, waiting_store=shop.waiting
        )
        await dispatcher.cancel(cid, "no longer needed", by="alice")
        assert not watching.done(), "the workflow is still being undone"
        await worker.run(burst=True)
        await asyncio.wait_for(watching, 10)

        kinds = [item.event.kind for item in watched]
        assert {"cancelled", "compensating"} <= set(kinds)
        assert kinds[-1] == "compensated"
        assert shop.undid(cid) == ["release"]
        assert (await shop.ended(cid, "cancelled")).state == "cancelled"
