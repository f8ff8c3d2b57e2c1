"""At-most-once steps: a step found started and not finished is reconciled or parked `in_doubt`, never re-run
blindly, on every transport.

A copy that "finds a start record" is the broker's redelivery after a crash: the test writes the record a crashed
worker would have left, signed as that worker signs it, then runs the workers (the crash itself, with real worker
processes, is in `tests/test_at_most_once_processes.py`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from joserfc.jwk import Key
from pydantic_ai import DeferredToolResults, RunContext
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RunUsage

from paigeant_ai import (
    ActivityContext,
    FunctionActivity,
    InMemoryTransport,
    InMemoryWaitingStore,
    PaigeantToolset,
    PlannerAgentDeps,
    Ran,
    RetryActivity,
    RetryPolicy,
    RunAgain,
    UserError,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai._in_doubt import DECISION_TYPE, DoubtDecision, SignedDecision, StartRecord
from paigeant_ai.catalog import ActivityCatalog
from paigeant_ai.security import MessageSigner, TrustPolicy, generate_key
from paigeant_ai.store import InMemoryWorkflowStore, WorkflowStatus
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER, SharedClaims
from paigeant_ai.transports.rabbitmq import RabbitMQTransport
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport

from .brokers import RABBITMQ_URL, REDIS_URL, ROOT, dead_letters, delete_redis_namespace, redis_command_line

ORDERS, SHOP, DESK = generate_key("orders-1"), generate_key("shop-1"), generate_key("desk-1")
STRANGER = generate_key("stranger-1")
POLICY = TrustPolicy.load(
    {
        "keys": {
            "orders-1": {"may": ["start", "approve", "cancel"], "send_to": "*"},
            "shop-1": {"send_to": "*"},
            "desk-1": {"send_to": "*"},
        }
    }
)


def signer(key: Key, transport: Transport | None = None) -> MessageSigner:
    cache = RedisReplayCache(transport) if isinstance(transport, RedisTransport) else None
    return MessageSigner(key, [ORDERS, SHOP, DESK], policy=POLICY, replay_cache=cache)


@pytest.fixture
async def shared(transport: Transport) -> AsyncIterator[RedisTransport | None]:
    """The store a RabbitMQ worker's replicas share (Redis); none on the other transports."""
    if transport.name != "rabbitmq":
        yield None
        return
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    store = RedisTransport(REDIS_URL, namespace=namespace)
    await store.connect()
    try:
        yield store
    finally:
        await store.disconnect()
        await delete_redis_namespace(namespace)


@dataclass
class Payments:
    """A payment workflow, `pay` then `ship`; `paid` counts each payment that really happened."""

    transport: Transport
    shared: RedisTransport | None
    fail_first: bool = False
    after_paying: BaseException | None = None
    """What the first attempt raises once it has paid (the provider's reply lost, a hang past the timeout)."""
    paid: list[str] = field(default_factory=list[str])
    store: InMemoryWorkflowStore = field(default_factory=InMemoryWorkflowStore)
    waiting: InMemoryWaitingStore = field(default_factory=InMemoryWaitingStore)

    def __post_init__(self) -> None:
        self.dispatcher = WorkflowDispatcher(
            self.transport, security=signer(ORDERS), on_event=self.store.apply, waiting_store=self.waiting
        )

    def pay(self, reconcile: Callable[[ActivityContext], Any] | None = None) -> FunctionActivity:
        @activity(
            at_most_once=True, reconcile=reconcile, retry=RetryPolicy(max_attempts=3, initial_interval=0.01), timeout=1
        )
        async def pay(ctx: ActivityContext) -> dict[str, Any]:
            if self.fail_first and ctx.attempt == 0:
                raise RetryActivity("the provider declined before charging: try again", delay=0.01)
            self.paid.append(ctx.correlation_id)
            if self.after_paying is not None and ctx.attempt == 0:
                if isinstance(self.after_paying, TimeoutError):
                    await asyncio.sleep(5)  # past the step's timeout: the worker cuts it short
                raise self.after_paying
            return {"charge": f"ch-{ctx.correlation_id[:8]}"}

        return pay

    def worker(self, reconcile: Callable[[ActivityContext], Any] | None = None) -> Worker:
        async def ship(ctx: ActivityContext) -> dict[str, Any]:
            return {"shipped": ctx.payload["charge"]}

        return Worker(
            self.transport,
            [self.pay(reconcile), FunctionActivity(ship, name="ship")],
            security=signer(SHOP, self.shared or self.transport),
            on_event=self.store.apply,
            waiting_store=self.waiting,
            shared_store=self.shared,
        )

    async def started_before(self, worker: Worker, cid: str, *, key: Key = SHOP, raw: str | None = None) -> None:
        """Leave the start record of `pay` a crashed worker would have left (signed with `key`), or `raw`."""
        idempotency_key = f"{cid}:0:pay"
        record = StartRecord(
            correlation_id=cid, activity="pay", step=0, idempotency_key=idempotency_key, attempt=0, worker="gone:1"
        )
        claims = worker.at_most_once.claims
        assert isinstance(claims, SharedClaims)
        value = raw if raw is not None else record.sign(signer(key)).encode()
        assert await claims.claim(StartRecord.key(idempotency_key, 0), value, ttl=60) is None

    async def status(self, cid: str) -> WorkflowStatus:
        status = await self.store.get(cid)
        assert status is not None
        return status


@pytest.fixture
def payments(transport: Transport, shared: RedisTransport | None) -> Payments:
    return Payments(transport, shared)


async def test_a_step_with_no_start_record_runs_once_and_leaves_none(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await worker.run(burst=True)

    assert payments.paid == [cid]
    status = await payments.status(cid)
    assert status.state == "completed"
    assert status.payload == {"charge": f"ch-{cid[:8]}", "shipped": f"ch-{cid[:8]}"}
    claims = worker.at_most_once.claims
    assert claims is not None
    assert await claims.claim(StartRecord.key(f"{cid}:0:pay", 0), "probe", ttl=1) is None, "released once settled"


async def test_the_reconcile_hook_that_finds_the_effect_completes_the_step_without_running_it(
    payments: Payments,
) -> None:
    looked_for: list[str] = []

    def reconcile(ctx: ActivityContext) -> Ran:
        looked_for.append(ctx.idempotency_key)
        return Ran({"charge": "ch-found"})

    worker = payments.worker(reconcile)
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)

    assert payments.paid == [], "the step did not run again"
    assert looked_for == [f"{cid}:0:pay"]
    status = await payments.status(cid)
    assert status.state == "completed"
    assert status.payload == {"charge": "ch-found", "shipped": "ch-found"}
    assert [event.detail for event in status.events if event.kind == "reconciled"] == [
        "step 'pay' reconciled: completed without running it again"
    ]


async def test_the_reconcile_hook_that_finds_nothing_runs_the_step(payments: Payments) -> None:
    async def reconcile(ctx: ActivityContext) -> RunAgain:
        return RunAgain()

    worker = payments.worker(reconcile)
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)

    assert payments.paid == [cid]
    assert (await payments.status(cid)).state == "completed"


async def test_without_a_hook_the_workflow_parks_in_doubt_with_step_key_and_start(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)

    assert payments.paid == []
    status = await payments.status(cid)
    assert status.state == "in_doubt"
    assert status.current_activity == "pay"
    assert status.waiting_for is not None
    assert f"key {cid}:0:pay" in status.waiting_for
    assert "started on gone:1 since 20" in status.waiting_for
    assert f"paigeant resume {cid} --ran OUTPUT_JSON" in status.waiting_for
    assert [step.state for step in status.steps] == ["in_doubt"]
    parked = await payments.dispatcher.parked(cid)
    assert parked.in_doubt is not None
    assert parked.in_doubt.idempotency_key == f"{cid}:0:pay"
    assert parked.in_doubt.started_at is not None
    assert parked.in_doubt.started_by == "gone:1"


async def test_a_person_saying_it_ran_continues_with_the_given_output(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    await payments.dispatcher.resume(cid, in_doubt=Ran({"charge": "ch-by-hand"}), approver="ops@example.com")
    await worker.run(burst=True)

    assert payments.paid == [], "the step never ran twice"
    status = await payments.status(cid)
    assert status.state == "completed"
    assert status.payload == {"charge": "ch-by-hand", "shipped": "ch-by-hand"}
    assert await payments.waiting.waiting() == []
    resumed = [event.detail for event in status.events if event.kind == "resumed"]
    assert len(resumed) == 1
    assert (resumed[0] or "").startswith("in-doubt step 'pay' declared run by ops@example.com (output sha256 ")


async def test_a_person_saying_run_it_again_runs_it(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    await payments.dispatcher.resume(cid, in_doubt=RunAgain(), approver="ops@example.com")
    await worker.run(burst=True)

    assert payments.paid == [cid]
    assert (await payments.status(cid)).state == "completed"


async def test_a_run_again_that_crashed_in_turn_is_in_doubt_again(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    await payments.dispatcher.resume(cid, in_doubt=RunAgain(), approver="ops@example.com")
    await payments.started_before(worker, cid)  # what the resumed run leaves when its worker dies mid-way
    await worker.run(burst=True)

    assert payments.paid == []
    assert (await payments.status(cid)).state == "in_doubt"
    assert (await payments.dispatcher.parked(cid)).in_doubt is not None


async def test_a_forged_start_record_parks_in_doubt_with_the_reason(payments: Payments) -> None:
    worker = payments.worker(lambda ctx: Ran({"charge": "never asked"}))
    forged = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    garbage = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, forged, key=STRANGER)
    await payments.started_before(worker, garbage, raw='{"not": "a record"}')
    await worker.run(burst=True)

    assert payments.paid == []
    forged_status, garbage_status = await payments.status(forged), await payments.status(garbage)
    assert forged_status.state == garbage_status.state == "in_doubt"
    assert forged_status.waiting_for is not None
    assert "its start record does not verify" in forged_status.waiting_for
    assert garbage_status.waiting_for is not None
    assert "its start record is not a start record" in garbage_status.waiting_for


async def test_an_at_most_once_step_that_raised_is_retried_normally(payments: Payments) -> None:
    payments.fail_first = True
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await worker.run(burst=True)

    assert payments.paid == [cid]
    status = await payments.status(cid)
    assert status.state == "completed"
    assert [step.attempts for step in status.steps] == [2, 1]


async def test_a_reconcile_hook_that_fails_parks_in_doubt_with_its_error(payments: Payments) -> None:
    def reconcile(ctx: ActivityContext) -> Ran:
        raise ConnectionError("the provider's search is down")

    worker = payments.worker(reconcile)
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)

    assert payments.paid == []
    status = await payments.status(cid)
    assert status.state == "in_doubt"
    assert status.waiting_for is not None
    assert "its reconcile hook failed: ConnectionError: the provider's search is down" in status.waiting_for


@pytest.mark.parametrize(
    "failure",
    [ConnectionError("the provider hung up after charging"), TimeoutError()],
    ids=["error-after-effect", "timeout-after-effect"],
)
async def test_a_step_that_fails_after_it_may_have_run_is_in_doubt_not_retried(
    payments: Payments, failure: BaseException
) -> None:
    payments.after_paying = failure
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await worker.run(burst=True)

    assert payments.paid == [cid], "paid once: the failure after the effect was not retried blindly"
    status = await payments.status(cid)
    assert status.state == "in_doubt"
    assert status.waiting_for is not None
    assert "it failed after it started" in status.waiting_for
    assert "it has no reconcile hook" in status.waiting_for
    doubt = (await payments.dispatcher.parked(cid)).in_doubt
    assert doubt is not None
    assert doubt.started_at is not None, "its own start record says since when"


async def test_a_step_that_fails_after_it_may_have_run_asks_the_reconcile_hook(payments: Payments) -> None:
    payments.after_paying = ConnectionError("the provider hung up after charging")

    def reconcile(ctx: ActivityContext) -> Ran | RunAgain:
        charged = ctx.correlation_id in payments.paid
        return Ran({"charge": "ch-found"}) if charged else RunAgain()

    worker = payments.worker(reconcile)
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await worker.run(burst=True)

    assert payments.paid == [cid]
    status = await payments.status(cid)
    assert status.state == "completed"
    assert status.payload == {"charge": "ch-found", "shipped": "ch-found"}


async def test_a_resume_that_comes_after_its_step_completed_changes_nothing_and_clears_the_doubt(
    payments: Payments,
) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    assert (await payments.status(cid)).state == "in_doubt"
    # Meanwhile the first copy, only stalled, finished: its successor ran and its key is done.
    await worker.dedupe.mark_done(f"{cid}:0:pay")
    await payments.dispatcher.resume(cid, in_doubt=RunAgain(), approver="ops@example.com")
    await worker.run(burst=True)

    assert payments.paid == [], "the late decision ran nothing"
    assert await payments.waiting.waiting() == [], "and its parked record is gone"


def test_ran_output_with_nan_is_refused_with_the_fix() -> None:
    from paigeant_ai._at_most_once import _json_output  # pyright: ignore[reportPrivateUsage]

    with pytest.raises(UserError, match="finite JSON"):
        _json_output(Ran({"amount": float("nan")}))


async def test_a_doubt_is_not_settled_with_an_approver_token(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)

    with pytest.raises(UserError, match="approver_token is not taken"):
        await payments.dispatcher.resume(cid, in_doubt=RunAgain(), approver_token="a.token.here")


async def test_a_step_run_again_by_a_person_that_raises_is_retried_normally(payments: Payments) -> None:
    payments.fail_first = True
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    await payments.dispatcher.resume(cid, in_doubt=RunAgain(), approver="ops@example.com")
    await worker.run(burst=True)

    assert payments.paid == [cid], "its first run raised, its retry paid"
    status = await payments.status(cid)
    assert status.state == "completed"
    assert await payments.waiting.waiting() == []


async def test_only_a_key_that_may_approve_settles_a_doubt(payments: Payments) -> None:
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    desk = WorkflowDispatcher(payments.transport, security=signer(DESK), waiting_store=payments.waiting)

    with pytest.raises(UserError, match="may not settle in-doubt steps: grant it 'approve'"):
        await desk.resume(cid, in_doubt=RunAgain(), approver="someone")
    with pytest.raises(UserError, match=r"pass in_doubt=Ran\(output\) or in_doubt=RunAgain\(\)"):
        await payments.dispatcher.resume(cid, approver="ops@example.com")
    with pytest.raises(UserError, match="not waiting for tool calls: resume it with in_doubt= alone"):
        await payments.dispatcher.resume(cid, in_doubt=RunAgain(), approve_all=True, approver="ops@example.com")
    assert payments.paid == []
    assert await dead_letters(payments.transport) == []


def test_a_rabbitmq_worker_without_a_shared_store_refuses_at_most_once_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PAIGEANT_SHARED_STORE_URL", raising=False)
    transport = RabbitMQTransport(RABBITMQ_URL, namespace="paigeant-test-unused")
    payments = Payments(transport, None)
    with pytest.raises(UserError, match="could not tell a crashed replica's step from a new one") as refused:
        payments.worker()
    assert "PAIGEANT_SHARED_STORE_URL=redis://" in str(refused.value)


def test_the_catalog_says_a_step_runs_at_most_once() -> None:
    payments = Payments(InMemoryTransport(), None)
    entry = ActivityCatalog([payments.pay()]).get("pay")
    assert entry is not None
    assert entry.model_dump()["at_most_once"] is True


def test_reconcile_needs_at_most_once() -> None:
    with pytest.raises(UserError, match="add at_most_once=True"):
        activity(reconcile=lambda ctx: RunAgain())(lambda ctx: None)


# -- the planner, a forged decision, and the command line (in-memory and Redis) ----------------------------------


async def test_the_planner_reports_a_workflow_in_doubt_and_how_to_settle_it() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    payments = Payments(transport, None)
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"], principal="tenant-a:alice")
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    planner = PaigeantToolset(ActivityCatalog([payments.pay()]), dispatcher=payments.dispatcher, require_workers=False)
    ctx = RunContext[Any](
        deps=PlannerAgentDeps(payments.dispatcher, principal="tenant-a:alice"), model=TestModel(), usage=RunUsage()
    )

    answer = await planner.get_workflow_status(ctx, cid)
    assert (answer["state"], answer["current_activity"]) == ("in_doubt", "pay")
    assert isinstance(answer["in_doubt"], str)
    assert answer["in_doubt"].startswith(f"in doubt: step 'pay' (key {cid}:0:pay, attempt 0) started on gone:1 since")


async def test_a_decision_signed_by_a_key_that_may_not_approve_is_refused_and_the_doubt_stays() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    payments = Payments(transport, None)
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)
    parked = await payments.dispatcher.parked(cid)
    decision = DoubtDecision(
        correlation_id=cid, step=0, activity="pay", parked_digest=parked.digest, decision="ran", output={"x": 1}
    )
    forged = SignedDecision(decision=decision)
    forged.proof = signer(DESK).sign_bytes(forged.signed_bytes(), typ=DECISION_TYPE)
    message = parked.resume_message(DeferredToolResults(), [forged.model_dump(mode="json")])
    await transport.publish("pay", payments.dispatcher.encode(message), headers=dict(message.headers))
    await worker.run(burst=True)

    assert payments.paid == []
    [letter] = await dead_letters(transport)
    assert "key 'desk-1' may not settle in-doubt steps" in letter.headers[REASON_HEADER]
    assert (await payments.dispatcher.parked(cid)).in_doubt is not None, "still in doubt, for a genuine decision"


async def test_a_workflow_in_doubt_can_be_cancelled_instead() -> None:
    transport = InMemoryTransport()
    await transport.connect()
    payments = Payments(transport, None)
    worker = payments.worker()
    cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
    await payments.started_before(worker, cid)
    await worker.run(burst=True)

    done = await payments.dispatcher.cancel(cid, "the customer called: settled by phone", by="ops@example.com")
    await worker.run(burst=True)

    assert done.state == "cancelled"
    assert payments.paid == []
    assert (await payments.status(cid)).state == "cancelled"
    assert await payments.waiting.waiting() == []


async def paigeant(*argv: str) -> tuple[int, str]:
    """Run the `paigeant` command in a process of its own; its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "paigeant_ai.cli", *argv),
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


@pytest.mark.redis
async def test_paigeant_status_shows_a_workflow_in_doubt_and_paigeant_resume_settles_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace = redis_command_line(monkeypatch)
    key = generate_key("ops-1")
    monkeypatch.delenv("PAIGEANT_ALLOW_UNSIGNED")
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(key.as_dict(private=True)))
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", json.dumps({"keys": [key.as_dict(private=False)]}))
    transport = RedisTransport(REDIS_URL, namespace=namespace)
    await transport.connect()
    try:
        payments = Payments(transport, None)
        payments.dispatcher = WorkflowDispatcher(transport, security=MessageSigner(key))
        worker = Worker(
            transport,
            [payments.pay(), activity(name="ship")(lambda ctx: None)],
            security=MessageSigner(key, replay_cache=RedisReplayCache(transport)),
            on_event=payments.store.apply,
        )
        cid = await payments.dispatcher.dispatch_workflow(["pay", "ship"])
        await payments.started_before(worker, cid, key=key)
        await worker.run(burst=True)

        code, out = await paigeant("status", cid, "--json")
        assert code == 0, out
        shown = json.loads(out)
        assert shown["state"] == "in_doubt"
        assert f"paigeant resume {cid} --ran OUTPUT_JSON" in shown["waiting_for"]
        code, out = await paigeant("resume", cid, "--ran", '{"charge": "ch-by-hand"}', "--by", "ops@example.com")
        assert (code, out.strip()) == (0, f"resumed {cid}: its in-doubt step declared run by ops@example.com")
        await worker.run(burst=True)

        assert payments.paid == []
        status = await payments.status(cid)
        assert status.state == "completed"
        assert status.payload == {"charge": "ch-by-hand"}
    finally:
        await transport.disconnect()
        await delete_redis_namespace(namespace)
