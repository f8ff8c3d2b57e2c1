"""Workers for the rolling deploy test, run as processes of their own:

    python -m paigeant_ai.cli worker tests.rolling_workers:worker

`PAIGEANT_TEST_RELEASE` (1 or 2) is the release the process runs: its activities have version `<release>.0.0`, and
release 2 stands for the next release of the wire, adding a new top-level field and a new field in the slip to
every message it sends. `PAIGEANT_TEST_ACTIVITIES` (comma-separated) limits the activities it runs. The last step
records, for each workflow, what its message carries: the versions in its log and the fields a newer release added.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from paigeant_ai import ActivityContext, Worker, activity, get_transport
from paigeant_ai.activity import FunctionActivity

from .workflows_for_crash import record

STEPS = ("roll-a", "roll-b", "roll-c")
RELEASE_ENV = "PAIGEANT_TEST_RELEASE"
ACTIVITIES_ENV = "PAIGEANT_TEST_ACTIVITIES"
CONCURRENCY_ENV = "PAIGEANT_TEST_CONCURRENCY"


def release() -> int:
    return int(os.environ.get(RELEASE_ENV, "1"))


def _next_release_fields(ctx: ActivityContext) -> None:
    """What release 2 adds to the message it sends on (a field it declares, which release 1 does not know)."""
    extra, slip_extra = ctx.message.__pydantic_extra__, ctx.message.routing_slip.__pydantic_extra__
    assert extra is not None
    assert slip_extra is not None
    extra.setdefault("release_train", {"since": "2.0.0"})
    slip_extra.setdefault("lane", "blue")


def _step(name: str) -> FunctionActivity:
    async def run(ctx: ActivityContext) -> dict[str, int]:
        await asyncio.sleep(float(os.environ.get("PAIGEANT_TEST_STEP_SECONDS", "0.05")))
        if name == STEPS[-1]:
            message = ctx.message
            seen: dict[str, Any] = {
                "cid": message.correlation_id,
                "versions": [[entry.name, entry.version] for entry in message.routing_slip.completed],
                "extra": message.model_extra,
                "slip_extra": message.routing_slip.model_extra,
                "last": f"{release()}.0.0",
            }
            record("final", json.dumps(seen, sort_keys=True))
        if release() >= 2:
            _next_release_fields(ctx)
        return {name.replace("-", "_"): release()}

    return activity(name=name, version=f"{release()}.0.0")(run)


def finals(directory: Path) -> dict[str, dict[str, Any]]:
    """What the last step recorded, by workflow (a step run twice records the same)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("final-*.log")):
        for line in path.read_text().splitlines():
            seen = json.loads(line)
            found[seen["cid"]] = seen
    return found


def worker() -> Worker:
    names = os.environ.get(ACTIVITIES_ENV, ",".join(STEPS)).split(",")
    concurrency = int(os.environ.get(CONCURRENCY_ENV, "8"))
    return Worker(get_transport(), [_step(name) for name in names], concurrency=concurrency, shutdown_timeout=10)
