"""Workers for the replay tests that run as processes of their own:

    python -m paigeant_ai.cli worker tests.replay_workers:worker

The environment picks the broker, the namespace and the shared store (`PAIGEANT_SHARED_STORE_URL`, or none), and
the directory where each run of a step is recorded (`PAIGEANT_TEST_RECORDS`): one line per run, so a step that ran
twice shows up as a repeated line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic_ai import Agent, FunctionToolset
from pydantic_ai.models.test import TestModel

from paigeant_ai import ActivityContext, AgentActivity, Worker, activity, get_transport

from .workflows_for_crash import record

PAY, TRANSFER = "replay-pay", "replay-transfer"


def runs(directory: Path, kind: str) -> list[str]:
    """Every line any process recorded for `kind`."""
    return [line for path in sorted(directory.glob(f"{kind}-*.log")) for line in path.read_text().splitlines()]


@activity(name=PAY)
async def pay(ctx: ActivityContext) -> dict[str, int]:
    record("pay", ctx.idempotency_key)
    return {"paid_by": os.getpid()}


_tools = FunctionToolset[Any](id="bank")


@_tools.tool_plain(requires_approval=True)
def transfer_money(amount: int) -> str:
    """Transfer money (a person approves it first)."""
    record("transfer", str(amount))
    return f"transferred {amount}"


transfer = AgentActivity(
    Agent(TestModel(call_tools=["transfer_money"]), toolsets=[_tools], name=TRANSFER),
    name=TRANSFER,
)


def worker() -> Worker:
    return Worker(get_transport(), [pay, transfer], concurrency=2, shutdown_timeout=5)
