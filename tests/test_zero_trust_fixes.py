"""A parked workflow is never lost to a refused resume, a faulted resume is replayed by parking it again, and a
workflow's owner is the one signed into its plan and kept by the status store.

The scene is the payments workflow of `tests/test_zero_trust_approvals.py` (a `pay` step whose tool needs
approval, then `notify`), with its least-privilege keys. Each test runs on the three transports.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic_ai import RunContext
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RunUsage

from paigeant_ai import (
    ActivityCatalog,
    InMemoryWorkflowStore,
    NonRetryableError,
    PaigeantMessage,
    PaigeantToolset,
    PlannerAgentDeps,
    UserError,
    WorkflowDispatcher,
    WorkflowEvent,
    WorkflowStore,
)
from paigeant_ai._cli_dead_letters import DeadLetter, replay_dead_letter
from paigeant_ai.approval import APPROVE_SCOPE
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER, SharedStores
from paigeant_ai.transports.redis import RedisTransport, RedisWorkflowStore

from .brokers import dead_letters
from .test_zero_trust_approvals import (
    ASKED,
    DESK,
    INTRUDER,
    ORDERS,
    PAYMENTS,
    REPORTS,
    Bank,
    approval_of,
    signer,
    token,
)

# -- a resume the worker would refuse is refused before it is sent ---------------------------------------------


async def test_resume_checks_at_the_dispatcher_what_the_worker_would_refuse(transport: Transport) -> None:
    bank = Bank(transport)
    alices, plain = await bank.park(obo_token=token("alice")), await bank.park()
    desk = bank.dispatcher(DESK)
    approve = {"pay-1": True}

    with pytest.raises(UserError, match=r"the approver's token is refused \(the on-behalf-of token has expired\)"):
        await desk.resume(plain, approvals=approve, approver_token=token("ana", scope=APPROVE_SCOPE, expires_in=-5))
    with pytest.raises(UserError, match=r"the approver's token lacks the scope 'paigeant:approve'"):
        await desk.resume(plain, approvals=approve, approver_token=token("ana"))
    with pytest.raises(UserError, match=r"approver='bob' is not the subject of the approver's token \('ana'\)"):
        await desk.resume(plain, approvals=approve, approver="bob", approver_token=token("ana", scope=APPROVE_SCOPE))
    with pytest.raises(UserError, match=r"it ran without an on-behalf-of token.*resume it without obo_token"):
        await desk.resume(plain, approvals=approve, approver="ana", obo_token=token("alice"))
    with pytest.raises(UserError, match=r"belongs to 'mallory', but the workflow runs on behalf of 'alice'"):
        await desk.resume(alices, approvals=approve, approver="ana", obo_token=token("mallory"))
    with pytest.raises(UserError, match=r"the fresh obo_token is refused \(the on-behalf-of token has expired\)"):
        await desk.resume(alices, approvals=approve, approver="ana", obo_token=token("alice", expires_in=-5))
    unchecked = WorkflowDispatcher(transport, security=signer(DESK, transport), waiting_store=bank.store)
    with pytest.raises(UserError, match=r"belongs to 'mallory'"):  # read as the token says, as the worker reads it
        await unchecked.resume(alices, approvals=approve, approver="ana", obo_token=token("mallory"))

    assert await transport.pending("pay") == 0  # nothing was sent
    assert sorted(p.correlation_id for p in await desk.waiting()) == sorted([alices, plain])
    await desk.resume(plain, approvals=approve, approver_token=token("ana", scope=APPROVE_SCOPE))
    await desk.resume(alices, approvals=approve, approver="ana", obo_token=token("alice"))
    await bank.run()
    assert bank.paid == [ASKED, ASKED]
    assert bank.completed(alices)
    assert bank.completed(plain)
    assert await desk.waiting() == []  # each record left the store when a worker claimed its resume


async def test_a_resume_the_worker_refuses_leaves_the_workflow_parked(transport: Transport) -> None:
    bank = Bank(transport)
    cid = await bank.park()
    parked = await bank.dispatcher(DESK).parked(cid)
    # The approver's token is valid when the dispatcher checks it, and expired when the worker does.
    bound = parked.decision_digest("pay-1")
    await bank.dispatcher().resume(
        cid, approvals={"pay-1": True}, approver_token=token("ana", scope=APPROVE_SCOPE, expires_in=1, bound_to=bound)
    )
    await asyncio.sleep(2.1)  # `exp` is a whole second, checked against whole seconds: past it only after 2
    await bank.run()

    assert bank.paid == []
    [reason] = await bank.reasons()
    assert "the approver's token: the on-behalf-of token has expired" in reason
    [still] = await bank.dispatcher().waiting()  # the record is where it was: the workflow can be resumed again
    assert still.digest == parked.digest
    ana = token("ana", scope=APPROVE_SCOPE, bound_to=bound)
    await bank.dispatcher().resume(cid, approvals={"pay-1": True}, approver_token=ana)
    await bank.run()
    assert bank.paid == [ASKED]
    assert bank.completed(cid)
    assert await bank.dispatcher().waiting() == []


async def test_attack_a_resume_without_approve_leaves_the_workflow_parked(transport: Transport) -> None:
    bank = Bank(transport)
    cid = await bank.park()
    parked = await bank.dispatcher(DESK).parked(cid)
    # A trusted key that may feed `pay` but not approve resumes it with an approval of its own making.
    await bank.publish_resume(parked, True, approval_of(parked, ASKED))
    await bank.run()

    assert bank.paid == []
    [reason] = await bank.reasons()
    assert "may not approve tool calls" in reason
    [still] = await bank.dispatcher().waiting()  # the genuine record, untouched
    assert still.digest == parked.digest
    await bank.approve(cid)
    assert bank.paid == [ASKED]
    assert bank.completed(cid)
    assert await bank.dispatcher().waiting() == []


async def test_attack_a_forged_resume_makes_no_parked_record_up(transport: Transport) -> None:
    bank = Bank(transport)
    cid = await bank.park()
    parked = await bank.dispatcher(DESK).parked(cid)
    made_up = parked.model_copy(update={"correlation_id": "made-up", "proof": None})
    made_up.message = parked.message.model_copy(update={"correlation_id": "made-up"})
    made_up.sign(signer(INTRUDER, transport))  # the intruder's own signature: it may send to `pay`, not park there
    await bank.publish_resume(made_up, True, approval_of(made_up, ASKED), key=DESK)
    await bank.run()

    assert bank.paid == []
    assert len(await bank.reasons()) == 1
    assert await bank.store.get("made-up") is None  # a refused resume never puts anything in the store
    assert [p.correlation_id for p in await bank.dispatcher().waiting()] == [cid]


# -- a faulted resume, replayed from the dead-letter queue, waits for new answers ------------------------------


async def faulted_resume(bank: Bank) -> tuple[str, DeadLetter]:
    """A workflow whose approved payment failed for good, and the dead letter of its resume."""
    from .test_zero_trust_approvals import payer

    bank.pay = payer(bank.paid, [NonRetryableError("the bank is down")])
    cid = await bank.park()
    await bank.approve(cid)
    [letter] = await dead_letters(bank.transport)
    message = PaigeantMessage.from_json(letter.body)
    assert message.resume is not None
    assert "the bank is down" in letter.headers.get(REASON_HEADER, "")
    return cid, DeadLetter(letter, message, None)


async def test_a_faulted_resumed_step_is_replayed_by_parking_it_again(transport: Transport) -> None:
    bank = Bank(transport)
    cid, letter = await faulted_resume(bank)
    assert await bank.dispatcher().waiting() == []
    operator = signer(PAYMENTS, transport)

    if isinstance(transport, SharedStores):  # Redis: the store its processes share
        again = await replay_dead_letter(transport, letter, operator)
    else:  # the transport's waiting store is each process's own: the letter stays unless a store is given
        with pytest.raises(UserError, match=r"in each process's memory: it stays in the dead-letter queue"):
            await replay_dead_letter(transport, letter, operator)
        again = await replay_dead_letter(transport, letter, operator, waiting_store=bank.store)

    assert again.correlation_id == cid
    [parked] = await bank.dispatcher().waiting()  # verifies: signed anew by the replaying key
    assert parked.correlation_id == cid
    assert [call.tool_call_id for call in parked.pending] == ["pay-1"]
    with pytest.raises(UserError, match=r"waits for input already: resume it rather than replay this letter"):
        await replay_dead_letter(transport, letter, operator, waiting_store=bank.store)
    await bank.approve(cid)  # a person decides again: the answers of the first resume were used once
    assert bank.paid == [ASKED]
    assert bank.completed(cid)


async def test_attack_a_resume_letter_replayed_by_a_key_that_may_not_send_to_its_step(transport: Transport) -> None:
    bank = Bank(transport)
    _, letter = await faulted_resume(bank)
    with pytest.raises(UserError, match=r"key 'reports-1': .* does not let it send to 'pay'; grant it send_to"):
        await replay_dead_letter(transport, letter, signer(REPORTS, transport), waiting_store=bank.store)
    assert await bank.dispatcher().waiting() == []


async def test_attack_a_resume_letter_with_an_altered_parked_record_is_not_parked(transport: Transport) -> None:
    bank = Bank(transport)
    cid, letter = await faulted_resume(bank)
    assert letter.message is not None
    assert letter.message.resume is not None
    assert letter.message.resume.parked is not None
    forged = letter.message.model_copy(deep=True)
    assert forged.resume is not None
    raw = json.dumps(forged.resume.parked).replace('"acct-1"', '"attacker"')
    forged.resume.parked = json.loads(raw)
    intruder = signer(INTRUDER, transport)  # a trusted key that may send to `pay`: the letter's signature holds
    await bank.send(forged, intruder)
    await bank.run()
    [refused] = await dead_letters(transport)
    copy = DeadLetter(refused, PaigeantMessage.from_json(refused.body), None)

    with pytest.raises(UserError, match=r"its parked record is refused: the parked record of workflow .* is refused"):
        await replay_dead_letter(transport, copy, signer(PAYMENTS, transport), waiting_store=bank.store)
    assert await bank.store.get(cid) is None
    await replay_dead_letter(transport, letter, signer(PAYMENTS, transport), waiting_store=bank.store)
    await bank.approve(cid)
    assert bank.paid == [ASKED]  # to acct-1, as approved


# -- a workflow's owner --------------------------------------------------------------------------------------


def planner_ctx(dispatcher: WorkflowDispatcher, principal: str | None) -> RunContext[Any]:
    deps = PlannerAgentDeps(dispatcher, principal=principal)
    return RunContext[Any](deps=deps, model=TestModel(), usage=RunUsage())


async def test_a_parked_workflows_owner_is_the_principal_it_was_dispatched_for(transport: Transport) -> None:
    bank = Bank(transport)
    cid = await bank.park(obo_token=token("alice"), principal="tenant-a:alice")
    dispatcher = bank.dispatcher()
    plan = (await dispatcher.parked(cid)).message.plan
    assert plan is not None
    assert plan.owner == "tenant-a:alice"  # signed into the plan
    planner = PaigeantToolset(ActivityCatalog([bank.pay]), dispatcher=dispatcher, require_workers=False)

    assert (await planner.get_workflow_status(planner_ctx(dispatcher, "tenant-a:alice"), cid))["state"] == "waiting"
    # the subject of the token is not the owner when a principal was given; nor is a caller without one
    assert (await planner.get_workflow_status(planner_ctx(dispatcher, "alice"), cid))["state"] == "unknown"
    assert (await planner.get_workflow_status(planner_ctx(dispatcher, None), cid))["state"] == "unknown"


async def test_a_workflow_without_an_owner_is_nobodys(transport: Transport) -> None:
    bank = Bank(transport)
    cid = await bank.park()  # neither token nor principal
    dispatcher = bank.dispatcher()
    planner = PaigeantToolset(ActivityCatalog([bank.pay]), dispatcher=dispatcher, require_workers=False)
    for caller in (None, "alice"):
        assert (await planner.get_workflow_status(planner_ctx(dispatcher, caller), cid))["state"] == "unknown"


def small_store(transport: Transport) -> WorkflowStore:
    if isinstance(transport, RedisTransport):
        return RedisWorkflowStore(transport, max_events=5)
    return InMemoryWorkflowStore(max_events=5)


async def test_attack_a_workflows_owner_outlives_its_trimmed_dispatched_event(transport: Transport) -> None:
    store = small_store(transport)
    dispatcher = WorkflowDispatcher(transport, security=signer(ORDERS, transport), on_event=store.apply)
    cid = await dispatcher.dispatch_workflow(["pay"], principal="tenant-a:alice")
    first = await store.get(cid)
    assert first is not None
    [dispatched] = first.events
    for step in range(10):  # a long workflow (or a stolen worker key) pushes the dispatched event out
        await store.apply(
            WorkflowEvent(
                kind="step_started", correlation_id=cid, at=dispatched.at.replace(year=2100), step=step, activity="pay"
            )
        )
    status = await store.get(cid)
    assert status is not None
    assert "dispatched" not in [event.kind for event in status.events]
    assert status.owner == "tenant-a:alice"

    planner = PaigeantToolset(ActivityCatalog([]), dispatcher=dispatcher, store=store, require_workers=False)
    assert (await planner.get_workflow_status(planner_ctx(dispatcher, "tenant-a:alice"), cid))["state"] == "running"
    assert (await planner.get_workflow_status(planner_ctx(dispatcher, None), cid))["state"] == "unknown"
