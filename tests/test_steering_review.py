"""Where compensation, fallbacks, cancellation and deadlines meet the rest: each test shows a defect found in review.

In memory, with the signed workers and keys of `tests/test_steering.py`.
"""

from __future__ import annotations

from typing import Any

import pytest

from paigeant_ai import ActivityContext, EndWorkflow, FunctionActivity, RetryPolicy
from paigeant_ai.contracts import PaigeantMessage, Unwinding
from paigeant_ai.transports import InMemoryTransport

from .test_steering import ORDER, Shop, _tampered  # pyright: ignore[reportPrivateUsage]


@pytest.fixture
async def memory() -> Any:
    async with InMemoryTransport() as transport:
        yield transport


# -- (d) a compensation that ends the workflow early --------------------------------------------------------------


async def test_end_workflow_in_a_compensation_does_not_skip_the_other_compensations(memory: InMemoryTransport) -> None:
    shop = Shop(memory, fail={"ship"})

    async def refund_and_end(ctx: ActivityContext) -> None:
        shop.undone.append(("refund", ctx.correlation_id, ctx.undoing))  # pyright: ignore[reportArgumentType]
        raise EndWorkflow("refunded, nothing more to do", output={"refunded": True})

    worker = shop.worker()
    worker.activities["refund"] = FunctionActivity(refund_and_end, name="refund", retry=RetryPolicy(max_attempts=1))
    cid = await shop.dispatcher.dispatch_workflow(ORDER)
    await worker.run(burst=True)

    assert shop.undid(cid) == ["refund", "release"], "the reservation is released too"
    status = await shop.ended(cid, "compensated")
    assert status.payload is not None
    assert status.payload["refunded"] is True


# -- (a) a key that may only send hops forges a cancellation -----------------------------------------------------


def _unwind_as_cancelled_by_alice(hop: PaigeantMessage) -> None:
    hop.routing_slip.unwind(Unwinding(cause="cancelled", reason="cancelled by alice", by="alice", step=1))


async def test_a_cancelled_unwinding_without_a_cancel_that_holds_is_refused(memory: InMemoryTransport) -> None:
    shop = Shop(memory)
    reasons = await _tampered(memory, _unwind_as_cancelled_by_alice, shop)

    assert len(reasons) == 1
    assert reasons[0].startswith("security check failed: ")
    assert "cancel" in reasons[0]
    assert shop.undone == [], "nothing was undone on the attacker's word"
    [cid] = {cid for _, cid in shop.ran}
    assert (await shop.status(cid)).state != "cancelled"
