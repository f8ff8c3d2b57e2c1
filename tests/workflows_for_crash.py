"""Three-step workflows for the crash and broker-restart tests; each worker runs as its own process:

    python -m paigeant_ai.cli worker tests.workflows_for_crash:middle_worker

(on Redis, the workers of `tests.redis_workflows` run the same steps).

The environment picks the broker and the namespace (`PAIGEANT_TRANSPORT=rabbitmq`, `PAIGEANT_NAMESPACE`), the
directory where runs are recorded (`PAIGEANT_TEST_RECORDS`) and how long the middle step takes
(`PAIGEANT_TEST_STEP_SECONDS`). Each process appends to its own files, one line per run: the middle step's
idempotency key, so a step that ran twice shows up as a repeated key, and the id of each workflow that
reached its last step.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

from paigeant_ai import ActivityContext, Worker, WorkflowDispatcher, activity, get_transport

FIRST, MIDDLE, LAST = "crash-first", "crash-middle", "crash-last"
STEPS = (FIRST, MIDDLE, LAST)


def record(kind: str, line: str) -> None:
    """Append `line` to this process's `<kind>-<pid>.log` (O_APPEND: a line is never torn by a kill)."""
    path = Path(os.environ["PAIGEANT_TEST_RECORDS"]) / f"{kind}-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def read_records(directory: Path, kind: str) -> dict[int, list[str]]:
    """The lines each process recorded, by process id."""
    found: dict[int, list[str]] = {}
    for path in directory.glob(f"{kind}-*.log"):
        found[int(path.stem.rpartition("-")[2])] = path.read_text().splitlines()
    return found


def completed(records: Path) -> set[str]:
    """The workflows that reached their last step, by correlation ID."""
    return {line for lines in read_records(records, "last").values() for line in lines}


def middle_runs(records: Path) -> Counter[str]:
    """How many times each middle step ran, by idempotency key."""
    return Counter(line for lines in read_records(records, "middle").values() for line in lines)


async def dispatch(dispatcher: WorkflowDispatcher, count: int) -> list[str]:
    """Dispatch `count` of these workflows; their correlation IDs."""
    return [await dispatcher.dispatch_workflow(list(STEPS), {"n": n}) for n in range(count)]


@activity(name=FIRST)
async def first(ctx: ActivityContext) -> dict[str, int]:
    return {"first_pid": os.getpid()}


@activity(name=MIDDLE)
async def middle(ctx: ActivityContext) -> dict[str, int]:
    record("middle", ctx.idempotency_key)
    await asyncio.sleep(float(os.environ.get("PAIGEANT_TEST_STEP_SECONDS", "0.2")))
    return {"middle_pid": os.getpid()}


@activity(name=LAST)
async def last(ctx: ActivityContext) -> None:
    record("last", ctx.correlation_id)


def middle_worker() -> Worker:
    """The slow middle step; run two of these to have competing consumers."""
    return Worker(get_transport(), [middle], concurrency=4, shutdown_timeout=5)


def edge_worker() -> Worker:
    """The quick first and last steps."""
    return Worker(get_transport(), [first, last], concurrency=20, shutdown_timeout=5)
