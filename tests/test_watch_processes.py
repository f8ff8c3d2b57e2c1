"""Watching a workflow run by worker processes on a real broker: a watch started after step two of five yields
every event from the start, in order, and ends when the workflow completes (issue 18)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import pytest

from paigeant_ai import WatchedEvent

from . import brokers
from .brokers import RABBITMQ_URL, REDIS_URL, wait_until
from .watch_workers import STEPS
from .workflows_for_crash import read_records


@pytest.mark.parametrize(
    "broker",
    [pytest.param("rabbitmq", marks=pytest.mark.rabbitmq), pytest.param("redis", marks=pytest.mark.redis)],
)
async def test_a_watch_started_after_step_two_yields_everything_in_order_until_completion(
    tmp_path: Path, broker: Literal["rabbitmq", "redis"]
) -> None:
    url = RABBITMQ_URL if broker == "rabbitmq" else REDIS_URL
    steps = list(STEPS)
    async with brokers.fleet(tmp_path, broker, url, workers="tests.watch_workers", steps=steps) as (
        workers,
        dispatcher,
        records,
    ):
        await workers.start("five_steps_worker")
        cid = await dispatcher.dispatch_workflow(list(STEPS))
        await wait_until(lambda: bool(read_records(records, "three-started")), within=60, what="step three to start")
        watched: list[WatchedEvent] = []

        async def collect() -> None:
            async for item in dispatcher.watch(cid):
                watched.append(item)

        watching = asyncio.create_task(collect())
        await wait_until(lambda: len(watched) >= 6, within=30, what="the events before step three")
        assert not watching.done()
        (records / "gate").touch()
        await asyncio.wait_for(watching, 60)

    kinds = [(item.event.kind, item.event.activity) for item in watched]
    expected = [pair for name in STEPS for pair in (("step_started", name), ("step_completed", name))]
    assert [kind for kind in kinds if kind[0] != "dispatched"] == [*expected, ("completed", "w-five")]
    assert kinds.count(("dispatched", "w-one")) == 1
    assert len({item.offset for item in watched}) == len(watched)
