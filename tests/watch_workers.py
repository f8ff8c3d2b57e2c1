"""Workers for the progress tests that run as processes of their own:

    python -m paigeant_ai.cli worker tests.watch_workers:five_steps_worker

The environment picks the broker and the namespace (see `tests.brokers.fleet`). Five steps, `w-one` to `w-five`;
`w-three` records that it started (`PAIGEANT_TEST_RECORDS`) and waits until the file `gate` appears there.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from paigeant_ai import ActivityContext, Worker, activity, get_transport

from .workflows_for_crash import record

STEPS = ("w-one", "w-two", "w-three", "w-four", "w-five")


def _plain(name: str) -> object:
    async def run(ctx: ActivityContext) -> dict[str, str]:
        return {name: "done"}

    return activity(name=name)(run)


@activity(name="w-three")
async def three(ctx: ActivityContext) -> dict[str, str]:
    record("three-started", ctx.correlation_id)
    gate = Path(os.environ["PAIGEANT_TEST_RECORDS"]) / "gate"
    while not gate.exists():  # noqa: ASYNC110 - another process makes the file: no Event can say so
        await asyncio.sleep(0.05)
    return {"w-three": "done"}


def five_steps_worker() -> Worker:
    """Every step of the five."""
    steps = [_plain("w-one"), _plain("w-two"), three, _plain("w-four"), _plain("w-five")]
    return Worker(get_transport(), steps, shutdown_timeout=5)  # pyright: ignore[reportArgumentType]
