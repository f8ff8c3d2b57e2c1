"""Where compensation, fallbacks, cancellation and deadlines meet the rest: each test shows a defect found in review.

In memory, with the signed workers and keys of `tests/test_steering.py`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from joserfc import jwt

from paigeant_ai import ActivityContext, ActivitySpec, EndWorkflow, FunctionActivity, RetryPolicy, Worker
from paigeant_ai._events import WorkflowEvent
from paigeant_ai.approval import APPROVE_SCOPE
from paigeant_ai.contracts import PaigeantMessage, Unwinding
from paigeant_ai.exceptions import NoWorker, TransportError
from paigeant_ai.security import MessageSigner, TokenValidator
from paigeant_ai.store import InMemoryWorkflowStore
from paigeant_ai.transports import InMemoryTransport
from paigeant_ai.transports.base import Delivery

from .scripted import refunder
from .test_steering import AUDIENCE, ISSUER, KEYS, ORDER, POLICY, Shop, _tampered, _true  # pyright: ignore[reportPrivateUsage]


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


# -- (e) the status, projected from events that arrive out of order across processes ------------------------------


async def test_a_compensating_event_stamped_after_the_undoing_ended_leaves_the_workflow_ended() -> None:
    """The worker whose step faulted reports `faulted` and `compensating` after its ack; a second worker, whose clock
    is a little behind, may have run the compensation and reported `compensated` with an earlier time by then."""
    cid, t0 = "order-skewed", datetime(2026, 1, 1, tzinfo=UTC)

    def at(ms: int, kind: Any, **fields: Any) -> WorkflowEvent:
        return WorkflowEvent(kind=kind, correlation_id=cid, at=t0 + timedelta(milliseconds=ms), **fields)

    events = [
        at(0, "dispatched", remaining=["reserve", "ship"]),
        at(1, "step_started", activity="reserve", step=0),
        at(2, "step_completed", activity="reserve", step=0, remaining=["ship"]),
        at(3, "step_started", activity="ship", step=1),
        # the second worker (40 ms behind) runs the compensation as soon as it is published, before the ack
        at(10 - 40, "step_started", activity="release", step=0, undoes="reserve", remaining=["release"]),
        at(12 - 40, "step_completed", activity="release", step=0, undoes="reserve", remaining=[]),
        at(13 - 40, "compensated", detail="undid reserve (by release); faulted: ship is down", payload={}),
        # the first worker, after its ack
        at(20, "step_failed", activity="ship", step=1, detail="ship is down"),
        at(21, "faulted", activity="ship", step=1, detail="step 'ship' failed: ship is down"),
        at(22, "compensating", activity="ship", step=1, detail="undoing reserve (by release)"),
    ]
    for order in (events, list(reversed(events))):
        store = InMemoryWorkflowStore()
        for event in order:
            await store.apply(event)
        status = await store.get(cid)
        assert status is not None
        assert status.state == "compensated", "the undoing ended: the workflow never looks like it still runs"


def _approver(digest: str, subject: str = "alice") -> str:
    """An approver's token bound to one decision (the desk's key may not approve by itself)."""
    now = int(datetime.now(UTC).timestamp())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 600}
    claims["scope"] = APPROVE_SCOPE
    claims["authorization_details"] = [{"type": "paigeant_approval", "digest": digest}]
    return jwt.encode({"alg": "ES256", "kid": KEYS.issuer.kid}, claims, KEYS.issuer, algorithms=["ES256"])


# -- (d)(c) a compensation that waits for input, and a cancel while it waits ---------------------------------------


async def test_a_cancel_while_a_compensation_waits_for_input_does_not_strand_the_undoing(
    memory: InMemoryTransport,
) -> None:
    shop = Shop(memory, fail={"ship"})
    worker = shop.worker(refunder(), shop.step("hold", compensate="refund-order"))
    cid = await shop.dispatcher.dispatch_workflow(["hold", "ship"])
    await worker.run(burst=True)
    assert (await shop.status(cid)).state == "waiting", "the compensation waits for its refund to be approved"

    await shop.dispatcher.cancel(cid, "never mind", by="alice")
    await worker.run(burst=True)
    parked = await shop.waiting.get(cid)
    assert parked is not None, "the undoing still waits for the refund's approval"
    await shop.dispatcher.resume(cid, approve_all=True, approver_token=_approver(parked.decision_digest("call-1")))
    await worker.run(burst=True)

    status = await shop.ended(cid, "compensated")
    assert status.payload is not None
    assert status.payload["refund_order"] == "refunded"


# -- (b) a crash after a failed step was handed on, before its ack ------------------------------------------------


class _LosesOneAck(InMemoryTransport):
    """Loses the ack of the first delivery from `address`: the worker died right after it settled that hop."""

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address, self.lost = address, False

    async def ack(self, delivery: Delivery) -> None:
        if delivery.address == self.address and not self.lost:
            self.lost = True
            raise TransportError("the connection dropped before the ack")
        await super().ack(delivery)


@pytest.mark.parametrize("handed_to", ["fallback", "compensations"])
async def test_a_redelivered_step_that_was_handed_on_does_not_run_again(handed_to: str) -> None:
    """A step failed for good and its fallback (or the workflow's compensations) was sent; then its worker died
    before the ack. The broker hands the step out again: it must not run a second time beside what it was handed to
    (the card charged by the main and the backup provider both, or a workflow both undone and going on)."""
    async with _LosesOneAck("charge") as memory:
        shop = Shop(memory)
        flaky = shop.step("charge", compensate="refund", fallbacks=("charge-backup",))
        worker = shop.worker()

        async def charge_once_down(ctx: ActivityContext) -> Any:
            if not shop.order(ctx.correlation_id).count("charge"):
                shop.fail.add("charge")  # down the first time only
            try:
                return await flaky.run(ctx)
            finally:
                shop.fail.discard("charge")

        worker.activities["charge"] = FunctionActivity(
            charge_once_down, name="charge", retry=RetryPolicy(max_attempts=1)
        )
        spec = ActivitySpec(name="charge", fallbacks=("charge-backup",) if handed_to == "fallback" else ())
        cid = await shop.dispatcher.dispatch_workflow(["reserve", spec, "ship"])
        async with worker:  # the hop's ack is lost; stopping the worker gives the delivery back to the broker
            await shop.until(_true(lambda: "charge" in shop.order(cid) and memory.lost), "charge to fail")
            await asyncio.sleep(0.3)
        await worker.run(burst=True)

    assert shop.order(cid).count("charge") == 1, "the redelivered step was recognised as handed on"
    if handed_to == "fallback":
        assert shop.order(cid) == ["reserve", "charge", "charge-backup", "ship"]
        await shop.ended(cid, "completed")
    else:
        assert shop.order(cid) == ["reserve", "charge"]
        assert shop.undid(cid) == ["release"]
        await shop.ended(cid, "compensated")


# -- (a) a key that may only send hops drops a step's compensation from the log -----------------------------------


def _drop_the_compensation_log(hop: PaigeantMessage) -> None:
    hop.routing_slip.compensations.clear()


async def test_a_compensation_log_that_leaves_out_a_planned_compensation_is_refused(memory: InMemoryTransport) -> None:
    shop = Shop(memory, fail={"ship"})
    reasons = await _tampered(memory, _drop_the_compensation_log, shop)

    assert len(reasons) == 1, "the tampered hop is refused (the genuine one faults at ship and is undone)"
    assert reasons[0].startswith("security check failed: plan: ")
    assert "'reserve'" in reasons[0]
    assert "release" in reasons[0]


# -- (d) a compensation no worker serves, with workers required ---------------------------------------------------


async def test_require_workers_names_a_compensation_no_worker_serves(memory: InMemoryTransport) -> None:
    shop = Shop(memory)
    async with shop.worker():
        await asyncio.sleep(0.05)  # its consumers are up
        with pytest.raises(NoWorker, match="no worker consumes 'release-by-hand'"):
            await shop.dispatcher.dispatch_workflow(
                [ActivitySpec(name="reserve", compensate="release-by-hand"), "ship"], require_workers=True
            )


# -- (d) a workflow that faults because its user's token expired --------------------------------------------------


async def test_a_workflow_that_faults_for_an_expired_token_is_still_undone(memory: InMemoryTransport) -> None:
    shop = Shop(memory)
    strict = TokenValidator({"keys": [KEYS.issuer.as_dict(private=False)]}, issuer=ISSUER, audience=AUDIENCE, leeway=0)
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 2}
    token = jwt.encode({"alg": "ES256", "kid": KEYS.issuer.kid}, claims, KEYS.issuer, algorithms=["ES256"])
    keys = [KEYS.orders, KEYS.shop, KEYS.desk]
    first = Worker(
        memory,
        [shop.step("reserve", compensate="release")],
        security=MessageSigner(KEYS.shop, keys, tokens=strict, policy=POLICY),
        on_event=shop.store.apply,
    )
    cid = await shop.dispatcher.dispatch_workflow(["reserve", "charge"], obo_token=token)
    await first.run(burst=True)
    assert shop.order(cid) == ["reserve"]
    await asyncio.sleep(3.5)  # past the whole second its expiry is checked against: expired before the next step

    worker = shop.worker()
    worker.security = MessageSigner(KEYS.shop, keys, tokens=strict, policy=POLICY)
    await worker.run(burst=True)

    assert shop.order(cid) == ["reserve"], "charge is refused: the token expired"
    assert shop.undid(cid) == ["release"], "the reservation is released all the same"
    await shop.ended(cid, "compensated")


def _unwind_as_expired(hop: PaigeantMessage) -> None:
    hop.routing_slip.unwind(Unwinding(cause="expired", reason="its deadline passed", step=1))


async def test_an_expired_unwinding_before_the_deadline_is_refused(memory: InMemoryTransport) -> None:
    shop = Shop(memory)
    reasons = await _tampered(memory, _unwind_as_expired, shop)

    assert len(reasons) == 1
    assert reasons[0].startswith("security check failed: ")
    assert "deadline" in reasons[0]
    assert shop.undone == [], "nothing was undone on the attacker's word"
