"""Within wire version 1, a worker keeps and forwards the fields a newer sender added; Python construction stays
strict; a newer wire version is refused with the fix."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import Field, ValidationError

from paigeant_ai import ActivityContext, ActivitySpec, PaigeantMessage, Worker, WorkflowDispatcher, WorkflowEvent
from paigeant_ai import activity as activity_decorator
from paigeant_ai._events import decode_events
from paigeant_ai._plan import PLAN_TYPE, _plan_bytes, spec_digest  # pyright: ignore[reportPrivateUsage]
from paigeant_ai._sealing import seal
from paigeant_ai._wire import FROM_WIRE
from paigeant_ai.contracts import RoutingSlip
from paigeant_ai.exceptions import InvalidMessage, SecurityError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import InMemoryTransport

KEY = generate_key("wire-1")


def _newer(message: PaigeantMessage) -> dict[str, Any]:
    """`message` as a newer release would send it: new fields at the top, in the slip, in a log entry, in security."""
    raw = json.loads(message.to_json())
    raw["release"] = {"train": "2026.12", "flags": [1, 2]}
    raw["routing_slip"]["lane"] = "blue"
    raw["security"]["channel"] = "mtls"
    for entry in raw["routing_slip"]["completed"]:
        entry["host"] = "node-7"
    return raw


def test_unknown_fields_read_from_the_wire_are_kept_at_every_depth_and_encoded_unchanged() -> None:
    message = PaigeantMessage.new([ActivitySpec(name="a"), ActivitySpec(name="b")], {"x": 1})
    raw = _newer(message)
    body = json.dumps(raw, separators=(",", ":")).encode()
    parsed = PaigeantMessage.from_json(body)
    assert parsed.model_extra == {"release": {"train": "2026.12", "flags": [1, 2]}}
    assert parsed.routing_slip.model_extra == {"lane": "blue"}
    assert parsed.security.model_extra == {"channel": "mtls"}
    assert json.loads(parsed.to_json()) == raw
    assert parsed.to_json().endswith(b'"channel":"mtls","jws_signature":null}}')  # the signature stays last
    hop = parsed.next_hop(attempt=1)
    assert hop.model_extra == parsed.model_extra
    assert hop.security.model_extra == {"channel": "mtls"}


def test_a_spec_a_newer_release_extends_has_the_same_digest_on_an_older_worker() -> None:
    class NewerSpec(ActivitySpec):
        priority: int = 0  # a newer release declares its new fields after the existing ones

    newer = NewerSpec(name="charge", priority=3)
    older = ActivitySpec.model_validate_json(newer.model_dump_json(), context={"paigeant_wire": True})
    assert older.model_extra == {"priority": 3}
    assert older.model_dump_json() == newer.model_dump_json()
    assert spec_digest(older) == spec_digest(newer)


def test_a_newer_release_reads_an_older_spec_and_encodes_it_as_the_older_worker_did() -> None:
    class NewerSpec(ActivitySpec):
        priority: int = Field(default=0, exclude_if=lambda value: value == 0)  # new, optional, left out at its default

    older = ActivitySpec(name="charge", version="~=2.1", compensate="refund")
    newer = NewerSpec.model_validate_json(older.model_dump_json(), context=FROM_WIRE)
    assert newer.priority == 0
    assert newer.model_dump_json() == older.model_dump_json()
    assert spec_digest(newer) == spec_digest(older)  # the older dispatcher's signed plan still holds


def test_a_misspelt_field_built_in_python_still_raises() -> None:
    with pytest.raises(ValidationError, match="unknown field 'verison' for ActivitySpec: check its spelling"):
        ActivitySpec(name="a", verison="1")  # pyright: ignore[reportCallIssue]
    with pytest.raises(ValidationError, match="unknown field 'typo' for ActivitySpec"):
        RoutingSlip(itinerary=[{"name": "a", "typo": 1}])  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValidationError, match="unknown field 'surprise'"):
        PaigeantMessage.model_validate(
            {"message_id": "m", "correlation_id": "c", "routing_slip": {"itinerary": []}, "surprise": 1}
        )


@pytest.mark.parametrize("version", [2, 7])
def test_a_newer_wire_version_is_refused_with_the_fix(version: int) -> None:
    raw = json.loads(PaigeantMessage.new([ActivitySpec(name="a")]).to_json())
    raw["v"] = version
    with pytest.raises(InvalidMessage, match=f"wire version {version} is newer than this worker reads"):
        PaigeantMessage.from_json(json.dumps(raw))


async def test_a_worker_forwards_a_newer_message_with_its_unknown_fields_and_its_signatures_hold() -> None:
    async with InMemoryTransport() as transport:
        await _forward_newer(transport)


async def _forward_newer(transport: InMemoryTransport) -> None:
    seen: list[PaigeantMessage] = []

    @activity_decorator(name="a")
    async def first(ctx: ActivityContext) -> dict[str, int]:
        return {"a": 1}

    @activity_decorator(name="b")
    async def second(ctx: ActivityContext) -> dict[str, int]:
        seen.append(ctx.message.model_copy(deep=True))
        return {"b": 2}

    events: list[WorkflowEvent] = []
    dispatcher = WorkflowDispatcher(transport, security=MessageSigner(KEY))
    correlation_id = await dispatcher.dispatch_workflow(["a", "b"], {"x": 1})
    async with await transport.consume("a") as deliveries:  # re-sent as a newer dispatcher would send it
        delivery = await anext(deliveries)
        await transport.ack(delivery)
    newer = PaigeantMessage.from_json(json.dumps(_newer(PaigeantMessage.from_json(delivery.body))))
    await transport.publish("a", seal(newer, MessageSigner(KEY), max_bytes=1_000_000))

    worker = Worker(transport, [first, second], security=MessageSigner(KEY), on_event=events.append)
    await worker.run(burst=True)

    assert [event.kind for event in events if event.kind in ("completed", "rejected", "faulted")] == ["completed"]
    assert events[-1].correlation_id == correlation_id
    (last,) = seen
    assert last.model_extra == {"release": {"train": "2026.12", "flags": [1, 2]}}
    assert last.routing_slip.model_extra == {"lane": "blue"}
    assert last.security.model_extra == {"channel": "mtls"}


async def _run_newer_plan(*, tamper: bool) -> list[WorkflowEvent]:
    """A workflow whose plan and second step carry fields a newer dispatcher added, signed by it (then, with
    `tamper`, one more plan field added on the way, under no signature)."""
    security = MessageSigner(KEY)
    events: list[WorkflowEvent] = []

    @activity_decorator(name="a")
    async def first(ctx: ActivityContext) -> None:
        return None

    @activity_decorator(name="b")
    async def second(ctx: ActivityContext) -> None:
        return None

    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport, security=security).dispatch_workflow(["a", "b"], {})
        async with await transport.consume("a") as deliveries:
            delivery = await anext(deliveries)
            await transport.ack(delivery)
        raw = json.loads(delivery.body)
        raw["routing_slip"]["itinerary"][1]["priority"] = 3
        raw["plan"]["region"] = "eu"
        message = PaigeantMessage.from_json(json.dumps(raw))
        plan = message.plan
        assert plan is not None
        plan.steps[1] = plan.steps[1].model_copy(update={"digest": spec_digest(message.routing_slip.itinerary[1])})
        plan.signature = security.sign_bytes(_plan_bytes(plan), typ=PLAN_TYPE)
        if tamper:
            assert plan.__pydantic_extra__ is not None
            plan.__pydantic_extra__["region"] = "us"
        await transport.publish("a", seal(message, security, max_bytes=1_000_000))
        await Worker(transport, [first, second], security=security, on_event=events.append).run(burst=True)
    return events


async def test_a_plan_and_a_step_with_fields_a_newer_dispatcher_added_verify_and_run() -> None:
    events = await _run_newer_plan(tamper=False)
    kinds = [event.kind for event in events]
    assert kinds.count("step_completed") == 2
    assert kinds[-1] == "completed"
    assert "rejected" not in kinds


async def test_a_field_added_to_a_signed_plan_on_the_way_is_refused() -> None:
    events = await _run_newer_plan(tamper=True)
    rejected = [event for event in events if event.kind == "rejected"]
    assert len(rejected) == 1
    assert "plan" in (rejected[0].detail or "")
    assert "completed" not in [event.kind for event in events]


def test_an_event_from_a_newer_worker_keeps_its_new_fields() -> None:
    event = WorkflowEvent(kind="step_started", correlation_id="c-1", activity="a", step=0)
    raw = {**json.loads(event.model_dump_json()), "heartbeat": 3}
    (decoded,) = decode_events(json.dumps([raw]).encode())
    assert decoded.model_extra == {"heartbeat": 3}
    assert json.loads(decoded.model_dump_json()) == raw


def test_a_parked_record_and_its_answers_with_fields_a_newer_worker_added_load_and_verify() -> None:
    from paigeant_ai._approvals import SignedApproval
    from paigeant_ai._in_doubt import SignedDecision, StartRecord
    from paigeant_ai.approval import ParkedStep

    signer = MessageSigner(KEY)
    message = PaigeantMessage.from_json(json.dumps(_newer(PaigeantMessage.new([ActivitySpec(name="a")], {}))))
    parked = ParkedStep(correlation_id=message.correlation_id, activity="a", step=0, message=message).sign(signer)
    raw = json.loads(parked.model_dump_json())
    raw["parked_by"] = "node-7"
    record = json.dumps(raw)
    loaded = ParkedStep.load(record)
    assert loaded.message.model_extra == {"release": {"train": "2026.12", "flags": [1, 2]}}
    assert loaded.model_extra == {"parked_by": "node-7"}
    with pytest.raises(SecurityError, match=r"parked record .* is refused"):  # signed over what was written
        loaded.verify(signer)
    assert ParkedStep.model_validate(json.loads(parked.model_dump_json()), context=FROM_WIRE).digest == parked.digest

    start = {"correlation_id": "c", "activity": "a", "step": 0, "idempotency_key": "k", "attempt": 0, "worker": "w"}
    start_record = StartRecord.model_validate({**start, "host": "node-7"}, context=FROM_WIRE).sign(signer)
    assert StartRecord.verified(start_record.encode(), signer, idempotency_key="k", attempt=0).model_extra == {
        "host": "node-7"
    }
    approval = {"correlation_id": "c", "step": 0, "activity": "a", "tool_call_id": "t", "tool_name": "n"}
    approval |= {"args_digest": "d", "parked_digest": "p", "decision": "approved", "reason": "fine"}
    assert SignedApproval.model_validate({"approval": approval}, context=FROM_WIRE).approval.model_extra == {
        "reason": "fine"
    }
    decision = {"correlation_id": "c", "step": 0, "activity": "a", "parked_digest": "p", "decision": "ran"}
    signed = SignedDecision.model_validate({"decision": {**decision, "note": "x"}, "ticket": 7}, context=FROM_WIRE)
    assert signed.model_extra == {"ticket": 7}
    with pytest.raises(ValidationError, match="unknown field 'ticket'"):  # built in Python: still strict
        SignedDecision.model_validate({"decision": decision, "ticket": 7})
