"""A rolling deploy on RabbitMQ and on Redis, with real worker processes (`tests.rolling_workers`).

Workflows in flight while the workers of release 1 are replaced one by one by workers of release 2, whose
messages carry fields release 1 does not know: all complete, none is dead-lettered, and each log says which
version ran each step. Then release-1 workers take messages a release-2 worker sent: they forward the new fields
unchanged, and the signatures over them hold.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Literal

import pytest

from . import brokers
from .brokers import RABBITMQ_URL, REDIS_URL, Fleet, dead_letters, wait_until
from .rolling_workers import ACTIVITIES_ENV, CONCURRENCY_ENV, RELEASE_ENV, STEPS, finals

pytestmark = pytest.mark.slow

BROKERS = [
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
    pytest.param("redis", marks=pytest.mark.redis),
]
NEWER = {"release_train": {"since": "2.0.0"}}
BANNER = "worker tests.rolling_workers"


async def _start(workers: Fleet, release: int, activities: tuple[str, ...] = STEPS) -> Path:
    """Start a worker of `release`; its log, where its banner says when it is ready."""
    workers.env[RELEASE_ENV] = str(release)
    workers.env[ACTIVITIES_ENV] = ",".join(activities)
    log = workers.log_of("worker", len(workers.processes))
    await workers.start("worker")
    return log


async def _ready(*logs: Path) -> None:
    """Wait for the banner of each: a worker stops gracefully on SIGTERM from then on."""
    for log in logs:
        await wait_until(lambda log=log: log.exists() and BANNER in log.read_text(), within=30, what=log.name)


async def _retire(workers: Fleet, number: int) -> None:
    """Stop worker `number` as a deploy does: SIGTERM, and it finishes what it runs."""
    process = workers.processes[number]
    process.send_signal(signal.SIGTERM)
    assert await process.wait() == 0


@pytest.mark.parametrize("broker", BROKERS)
async def test_a_rolling_deploy_to_a_release_with_new_wire_fields_loses_no_workflow(
    broker: Literal["rabbitmq", "redis"], tmp_path: Path
) -> None:
    url = RABBITMQ_URL if broker == "rabbitmq" else REDIS_URL
    async with brokers.fleet(tmp_path, broker, url, workers="tests.rolling_workers", steps=STEPS) as (
        workers,
        dispatcher,
        records,
    ):
        workers.env["PAIGEANT_TEST_STEP_SECONDS"] = "0.4"
        workers.env[CONCURRENCY_ENV] = "2"
        await _ready(*[await _start(workers, 1) for _ in range(3)])
        rolling: list[str] = []
        for number in range(3):  # one by one, each while a wave of 10 workflows is in flight, however slow the start
            rolling += [await dispatcher.dispatch_workflow(list(STEPS), {"n": n}) for n in range(10)]
            await _retire(workers, number)
            await _ready(await _start(workers, 2))
        await wait_until(lambda: set(rolling) <= set(finals(records)), within=40, what="all 30 workflows")

        for number in range(3, 6):
            await _retire(workers, number)
        await _ready(await _start(workers, 2, ("roll-a",)), await _start(workers, 1, ("roll-b", "roll-c")))
        await brokers.wait_until_advertised(dispatcher, STEPS, within=30)  # a banner comes before the worker's record
        older = [await dispatcher.dispatch_workflow(list(STEPS), {"n": n}) for n in range(5)]
        await wait_until(lambda: set(older) <= set(finals(records)), within=30, what="the 5 workflows")
        assert await dead_letters(dispatcher.transport) == []

    seen = finals(records)
    ran = [version for cid in rolling for _, version in seen[cid]["versions"]] + [seen[cid]["last"] for cid in rolling]
    assert set(ran) == {"1.0.0", "2.0.0"}  # both releases ran steps, and every step's log names its version
    assert any(len({version for _, version in seen[cid]["versions"]}) == 2 for cid in rolling)  # within a workflow
    for cid in rolling:
        newer_before = any(version == "2.0.0" for _, version in seen[cid]["versions"])
        assert (seen[cid]["extra"] == NEWER) is newer_before  # kept by every worker once a newer one added it
        assert (seen[cid]["slip_extra"] == {"lane": "blue"}) is newer_before
    for cid in older:
        assert seen[cid]["versions"] == [["roll-a", "2.0.0"], ["roll-b", "1.0.0"]]
        assert seen[cid]["last"] == "1.0.0"
        assert seen[cid]["extra"] == NEWER
        assert seen[cid]["slip_extra"] == {"lane": "blue"}
    assert "dead-lettering" not in workers.output()
