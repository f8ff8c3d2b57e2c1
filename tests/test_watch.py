"""Watching a workflow's progress: every event from its start, in order, until it ends, resumable from an offset,
and only what a trusted key signed (issue 18)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic_core import to_json

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    NonRetryableError,
    RetryPolicy,
    WatchedEvent,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai._events import EVENTS_SIGNATURE_HEADER, EVENTS_SIGNATURE_TYPE
from paigeant_ai.exceptions import TransportError, UserError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import ProgressStreams, Transport
from paigeant_ai.transports.base import TransportBase

from .brokers import wait_until

KEY = generate_key("watch-test-1")
MALLORY = generate_key("mallory-1")
STEPS = ["one", "two", "three", "four", "five"]


def signer() -> MessageSigner:
    return MessageSigner(KEY, [KEY])


class Gated:
    """Five steps; the third waits until the test opens its gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.at_three = asyncio.Event()

    def activities(self) -> list[object]:
        async def three(ctx: ActivityContext) -> dict[str, int]:
            self.at_three.set()
            await self.gate.wait()
            return {"three": 3}

        def plain(name: str) -> object:
            async def run(ctx: ActivityContext) -> dict[str, str]:
                return {name: "done"}

            return activity(name=name)(run)

        return [plain("one"), plain("two"), activity(name="three")(three), plain("four"), plain("five")]


@asynccontextmanager
async def _worker(transport: Transport, gated: Gated) -> AsyncGenerator[Worker]:
    worker = Worker(transport, gated.activities(), security=signer())  # pyright: ignore[reportArgumentType]
    running = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)


async def _collect(watch: AsyncIterator[WatchedEvent], into: list[WatchedEvent], stop_after: int | None = None) -> None:
    async for watched in watch:
        into.append(watched)
        if stop_after is not None and len(into) >= stop_after:
            return


def _kinds(watched: list[WatchedEvent]) -> list[tuple[str, str | None]]:
    return [(item.event.kind, item.event.activity) for item in watched]


EXPECTED = [
    ("dispatched", "one"),
    *[pair for name in STEPS for pair in (("step_started", name), ("step_completed", name))],
    ("completed", "five"),
]


async def test_a_late_watch_yields_every_event_from_the_start_in_order_and_ends_at_completion(
    transport: Transport,
) -> None:
    gated = Gated()
    dispatcher = WorkflowDispatcher(transport, security=signer())
    async with _worker(transport, gated):
        cid = await dispatcher.dispatch_workflow(STEPS)
        await asyncio.wait_for(gated.at_three.wait(), 30)
        watched: list[WatchedEvent] = []
        watching = asyncio.create_task(_collect(dispatcher.watch(cid), watched))
        await wait_until(lambda: len(watched) >= 6, within=30, what="the events before step three")
        assert not watching.done()
        gated.gate.set()
        await asyncio.wait_for(watching, 30)
        kinds = _kinds(watched)
        assert [kind for kind in kinds if kind[0] != "dispatched"] == EXPECTED[1:]
        # The dispatcher reports `dispatched` once the first step is sent: a fast worker's first event may precede it.
        assert kinds.count(("dispatched", "one")) == 1
        assert watched[-1].event.kind == "completed"
        assert watched[-1].event.payload is not None
        assert watched[-1].event.payload["three"] == 3


async def test_a_watch_resumed_from_its_last_offset_misses_nothing_and_repeats_nothing(transport: Transport) -> None:
    gated = Gated()
    dispatcher = WorkflowDispatcher(transport, security=signer())
    async with _worker(transport, gated):
        cid = await dispatcher.dispatch_workflow(STEPS)
        await asyncio.wait_for(gated.at_three.wait(), 30)
        first: list[WatchedEvent] = []
        await asyncio.wait_for(_collect(dispatcher.watch(cid), first, stop_after=3), 30)  # then disconnects
        gated.gate.set()
        rest: list[WatchedEvent] = []
        await asyncio.wait_for(_collect(dispatcher.watch(cid, after=first[-1].offset), rest), 30)
        whole: list[WatchedEvent] = []
        await asyncio.wait_for(_collect(dispatcher.watch(cid), whole), 30)
        assert _kinds(first + rest) == _kinds(whole)
        assert sorted(_kinds(whole)) == sorted(EXPECTED)
        # Resumed from the very end, a watch ends at once.
        again: list[WatchedEvent] = []
        await asyncio.wait_for(_collect(dispatcher.watch(cid, after=whole[-1].offset), again), 10)
        assert again == []


async def test_forged_entries_in_the_stream_are_never_yielded(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    assert isinstance(transport, ProgressStreams)
    gated = Gated()
    gated.gate.set()
    dispatcher = WorkflowDispatcher(transport, security=signer())
    cid = f"forged-{uuid.uuid4().hex}"
    forged = to_json([{"kind": "completed", "correlation_id": cid, "payload": {"refund": "acct-666"}}])
    mallory = MessageSigner(MALLORY, [MALLORY]).sign_bytes(forged, typ=EVENTS_SIGNATURE_TYPE)
    assert mallory is not None
    await transport.append_progress(cid, forged, {})  # unsigned
    await transport.append_progress(cid, forged, {EVENTS_SIGNATURE_HEADER: mallory})  # an untrusted key
    await transport.append_progress(cid, b"not json", {})
    async with _worker(transport, gated):
        with caplog.at_level(logging.WARNING, logger="paigeant_ai.watch"):
            await dispatcher.dispatch_workflow(STEPS, correlation_id=cid)
            watched: list[WatchedEvent] = []
            await asyncio.wait_for(_collect(dispatcher.watch(cid), watched), 30)
    assert sorted(_kinds(watched)) == sorted(EXPECTED)
    assert all(item.event.payload is None or "refund" not in item.event.payload for item in watched)
    assert caplog.text.count("skipping an entry of the progress") >= 3


async def test_a_bad_offset_or_a_transport_without_streams_is_a_user_error(transport: Transport) -> None:
    dispatcher = WorkflowDispatcher(transport, security=signer())
    with pytest.raises(UserError, match="not a watch offset"):
        await anext(dispatcher.watch("x", after="garbage!"))

    class Bare(TransportBase):
        name = "bare"

    with pytest.raises(UserError, match="keeps no progress streams"):
        await anext(WorkflowDispatcher(Bare(), security=signer()).watch("x"))  # pyright: ignore[reportArgumentType]


async def test_a_faulted_workflow_is_watched_to_the_end_of_its_undoing() -> None:
    @activity(name="reserve", compensate="release")
    async def reserve(ctx: ActivityContext) -> dict[str, str]:
        return {"reserved": "yes"}

    @activity(name="release")
    async def release(ctx: ActivityContext) -> dict[str, str]:
        await asyncio.sleep(0.3)  # the undoing outlasts the fault's own events
        return {"released": "yes"}

    @activity(name="charge", retry=RetryPolicy(max_attempts=1))
    async def charge(ctx: ActivityContext) -> dict[str, str]:
        raise NonRetryableError("card declined")

    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport, security=signer())
        worker = Worker(transport, [reserve, release, charge], security=signer())
        running = asyncio.create_task(worker.run())
        try:
            cid = await dispatcher.dispatch_workflow(["reserve", "charge"])
            watched: list[WatchedEvent] = []
            await asyncio.wait_for(_collect(dispatcher.watch(cid), watched), 30)
        finally:
            worker.stop()
            await asyncio.wait_for(running, 30)
    kinds = [item.event.kind for item in watched]
    assert "faulted" in kinds
    assert kinds[-1] == "compensated"
    assert ("step_completed", "release") in _kinds(watched)


async def test_the_same_entry_written_twice_is_yielded_once() -> None:
    async with InMemoryTransport() as transport:
        cid = f"twice-{uuid.uuid4().hex}"
        events = [
            {"kind": "step_started", "correlation_id": cid, "activity": "one", "step": 0, "at": "2026-12-01T10:00:00Z"},
            {
                "kind": "completed",
                "correlation_id": cid,
                "activity": "one",
                "payload": {},
                "at": "2026-12-01T10:00:01Z",
            },
        ]
        body = to_json(events)
        headers = {EVENTS_SIGNATURE_HEADER: signer().sign_bytes(body, typ=EVENTS_SIGNATURE_TYPE) or ""}
        await transport.append_progress(cid, body, headers)
        await transport.append_progress(cid, body, headers)  # a batch published again after a crash
        dispatcher = WorkflowDispatcher(transport, security=signer())
        watched: list[WatchedEvent] = []
        await asyncio.wait_for(_collect(dispatcher.watch(cid), watched), 10)
    assert _kinds(watched) == [("step_started", "one"), ("completed", "one")]


class _FailingOnce(InMemoryTransport):
    """An in-memory transport whose first progress reader loses its connection at its second read."""

    failed = False

    async def read_progress(self, correlation_id: str, *, after: str | None = None) -> Any:
        reader = await super().read_progress(correlation_id, after=after)
        if self.failed:
            return reader
        transport, reads = self, [0]
        real_read = reader.read

        async def read(wait: float) -> Any:
            reads[0] += 1
            if reads[0] == 2:
                transport.failed = True
                raise TransportError("the connection to the broker was lost")
            return await real_read(wait)

        reader.read = read  # type: ignore[method-assign]
        return reader


async def test_a_watch_reads_on_after_a_failed_read_missing_and_repeating_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gated = Gated()
    gated.gate.set()
    async with _FailingOnce() as transport:
        dispatcher = WorkflowDispatcher(transport, security=signer())
        async with _worker(transport, gated):
            cid = await dispatcher.dispatch_workflow(STEPS)
            watched: list[WatchedEvent] = []
            await asyncio.wait_for(_collect(dispatcher.watch(cid), watched), 30)
    assert transport.failed
    assert sorted(_kinds(watched)) == sorted(EXPECTED)
    assert "failed; reading on" in caplog.text
