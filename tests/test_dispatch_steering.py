"""`require_workers` checks the fallbacks and compensations a route names; a compensation nobody serves shows as
`stalled`. On every transport (the `transport` fixture of `conftest`)."""

from __future__ import annotations

import asyncio

import pytest

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    NonRetryableError,
    NoWorker,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai.store import InMemoryWorkflowStore, mark_stalled
from paigeant_ai.transports import Transport

ROUTE = [
    ActivitySpec(name="reserve-stock", compensate="release-stock"),
    ActivitySpec(name="charge-card", fallbacks=("charge-backup",)),
]


async def test_a_compensation_or_fallback_nobody_serves_is_refused_at_dispatch(transport: Transport) -> None:
    dispatcher = WorkflowDispatcher(transport, allow_unsigned=True)
    async with await transport.consume("reserve-stock"), await transport.consume("charge-card"):
        with pytest.raises(NoWorker) as raised:
            await dispatcher.dispatch_workflow(ROUTE, require_workers=True)
        assert str(raised.value).startswith(
            "no worker consumes 'release-stock', the compensation of step 0 'reserve-stock': start a worker for it, "
            "or fix its name"
        )
        assert raised.value.activity == "release-stock"

        async with await transport.consume("release-stock"):
            with pytest.raises(NoWorker) as raised:
                await dispatcher.dispatch_workflow(ROUTE, require_workers=True)
            assert str(raised.value).startswith(
                "no worker consumes 'charge-backup', the fallback of step 1 'charge-card': start a worker for it, or "
                "fix its name"
            )
            assert await transport.pending("reserve-stock") == 0  # nothing was sent

            async with await transport.consume("charge-backup"):
                await dispatcher.dispatch_workflow(ROUTE, require_workers=True)
    # The consumer held the hop unacked; the broker puts it back once that consumer is gone, a moment later.
    for _ in range(50):
        if await transport.pending("reserve-stock") == 1:
            break
        await asyncio.sleep(0.1)
    assert await transport.pending("reserve-stock") == 1


async def test_the_first_step_is_still_named_as_before(transport: Transport) -> None:
    dispatcher = WorkflowDispatcher(transport, allow_unsigned=True)
    with pytest.raises(NoWorker) as raised:
        await dispatcher.dispatch_workflow(ROUTE, require_workers=True)
    assert str(raised.value).startswith(
        "no worker consumes 'reserve-stock': start a worker for it, or fix the step's name"
    )


@activity(name="reserve-stock", compensate="release-stock")
async def reserve(ctx: ActivityContext) -> dict[str, str]:
    return {"reservation": "r-1"}


@activity(name="charge-card")
async def charge(ctx: ActivityContext) -> None:
    raise NonRetryableError("card declined")


@activity(name="release-stock")
async def release(ctx: ActivityContext) -> None:
    return None


async def test_a_workflow_whose_compensation_nobody_serves_is_stalled_while_compensating(
    transport: Transport,
) -> None:
    store = InMemoryWorkflowStore()
    dispatcher = WorkflowDispatcher(transport, allow_unsigned=True, on_event=store.apply)
    correlation_id = await dispatcher.dispatch_workflow([reserve, charge])
    await Worker(transport, [reserve, charge], allow_unsigned=True, on_event=store.apply).run(burst=True)

    status = await store.get(correlation_id)
    assert status is not None
    assert (status.state, status.current_activity) == ("compensating", "release-stock")
    [marked] = await mark_stalled([status], transport, after=0)
    assert marked.state == "stalled"
    assert marked.stalled is not None
    assert marked.stalled.startswith("no worker consumes 'release-stock' for ")

    await Worker(transport, [release], allow_unsigned=True, on_event=store.apply).run(burst=True)
    status = await store.get(correlation_id)
    assert status is not None
    assert status.state == "compensated"
    [marked] = await mark_stalled([status], transport, after=0)
    assert marked.state == "compensated"
