"""Where a watch ends: only where the workflow is really over, never at a stop its compensations still follow, nor
where it waits for a person (issue 18)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic_core import to_json

from paigeant_ai import InMemoryTransport, WatchedEvent, WorkflowDispatcher
from paigeant_ai._events import EVENTS_SIGNATURE_HEADER, EVENTS_SIGNATURE_TYPE, WorkflowEvent
from paigeant_ai._watch import watch_workflow
from paigeant_ai.exceptions import UnknownWorkflow, UserError
from paigeant_ai.transports import Transport

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


async def test_a_watch_of_an_id_never_dispatched_gives_up_when_asked_to(transport: Transport) -> None:
    dispatcher = WorkflowDispatcher(transport, security=signer(KEYS.orders))
    started = asyncio.get_running_loop().time()
    with pytest.raises(UnknownWorkflow, match=r"no event of workflow 'never-sent' in 0\.5 seconds: check the ID"):
        await asyncio.wait_for(anext(dispatcher.watch("never-sent", start_within=0.5)), 10)
    assert asyncio.get_running_loop().time() - started < 5
    with pytest.raises(UserError, match="start_within is seconds"):
        await anext(dispatcher.watch("never-sent", start_within=float("nan")))


async def test_a_watch_that_may_give_up_follows_a_workflow_that_started_to_its_end() -> None:
    async with InMemoryTransport() as transport:
        shop = Shop(transport)
        cid = await shop.dispatcher.dispatch_workflow(["reserve", "ship"])
        watching = asyncio.create_task(_kinds_of(shop.dispatcher.watch(cid, start_within=0.2)))
        await asyncio.sleep(0.4)  # longer than start_within: the workflow's first event is there, so it waits on
        await shop.worker().run(burst=True)
        kinds = await asyncio.wait_for(watching, 10)
        assert kinds[0] == "dispatched"
        assert kinds[-1] == "completed"


async def _kinds_of(watch: AsyncIterator[WatchedEvent]) -> list[str]:
    return [item.event.kind async for item in watch]


@pytest.mark.parametrize("parked", ["waiting", "in_doubt", "budget_exhausted"])
async def test_a_parked_workflow_has_not_ended_and_its_watch_waits_until_it_does(parked: str) -> None:
    async with InMemoryTransport() as transport:
        cid = f"parked-{uuid.uuid4().hex}"
        security = signer(KEYS.orders)

        async def append(*events: dict[str, Any]) -> None:
            body = to_json(list(events))
            signature = security.sign_bytes(body, typ=EVENTS_SIGNATURE_TYPE) or ""
            await transport.append_progress(cid, body, {EVENTS_SIGNATURE_HEADER: signature})

        step = {"correlation_id": cid, "activity": "one", "step": 0}
        await append(
            {"kind": "step_started", **step, "at": "2026-12-01T10:00:00Z"},
            {"kind": parked, **step, "detail": "a person decides", "at": "2026-12-01T10:00:01Z"},
        )
        watching = asyncio.create_task(_kinds_of(watch_workflow(transport, security, cid, poll=0.05)))
        await asyncio.sleep(0.5)
        assert not watching.done(), f"a workflow parked as {parked} has not ended"
        await append(
            {"kind": "resumed", **step, "at": "2026-12-01T10:00:02Z"},
            {"kind": "completed", **step, "payload": {}, "at": "2026-12-01T10:00:03Z"},
        )
        assert await asyncio.wait_for(watching, 10) == ["step_started", parked, "resumed", "completed"]
