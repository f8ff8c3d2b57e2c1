"""`paigeant status`, `workflows` and `dead-letters` against the real Redis (DB 15): events, store and replays."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from inline_snapshot import snapshot
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    NonRetryableError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    WorkflowStatus,
    activity,
)
from paigeant_ai._cli_workflows import render_status
from paigeant_ai._events import EventKind
from paigeant_ai.approval import InMemoryWaitingStore
from paigeant_ai.cli import main
from paigeant_ai.security import generate_key
from paigeant_ai.transports.redis import RedisTransport

from .brokers import REDIS_URL, delete_redis_namespace, redis_command_line
from .scripted import refunder

pytestmark = pytest.mark.redis


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = redis_command_line(monkeypatch)
    yield name
    asyncio.run(delete_redis_namespace(name))


def normalized(text: str) -> str:
    """`text` without what changes from run to run: times, durations, message ids, the digests of code."""
    text = re.sub(r"0\+[0-9a-f]{8}\b", "0+<digest>", text)
    text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "<date>", text)
    text = re.sub(r"\d\d:\d\d:\d\d\.\d{3}", "<time>", text)
    text = re.sub(r"\d+\.\d{3}s", "<s>", text)
    return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", text)


FIXED = False


@activity(name="check-customer")
async def check_customer(ctx: ActivityContext) -> dict[str, str]:
    return {"customer": "known"}


@activity(name="create-account")
async def create_account(ctx: ActivityContext) -> dict[str, str]:
    if not FIXED and ctx.payload.get("email") == "bad@example.com":
        raise NonRetryableError("refused")
    return {"account": "acct-1"}


async def run_three_workflows(namespace: str) -> None:
    steps = [check_customer, create_account]
    refund = refunder()
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        dispatcher = WorkflowDispatcher(transport)
        await dispatcher.dispatch_workflow(steps, {"email": "good@example.com"}, correlation_id="wf-completed")
        await dispatcher.dispatch_workflow(steps, {"email": "bad@example.com"}, correlation_id="wf-failed")
        await dispatcher.dispatch_workflow([refund, check_customer], correlation_id="wf-waiting")
        worker = Worker(transport, [*steps, refund], waiting_store=InMemoryWaitingStore())
        await worker.run(burst=True)


async def run_worker(namespace: str) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        await Worker(transport, [check_customer, create_account]).run(burst=True)


def test_status_of_a_completed_a_failed_and_a_waiting_workflow(
    namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(run_three_workflows(namespace))

    assert main(["status", "wf-completed"]) == 0
    assert normalized(capsys.readouterr().out) == snapshot("""\
workflow wf-completed: completed
  started <date> UTC, last event <s> later
  deadline: <date> UTC
  steps:
      0 check-customer  completed 1 attempt   <s>  version 0+<digest>
      1 create-account  completed 1 attempt   <s>  version 0+<digest>
  timeline:
    <time> +<s>  dispatched          step 0 check-customer
    <time> +<s>  step_started        step 0 check-customer
    <time> +<s>  step_completed      step 0 check-customer in <s>
    <time> +<s>  step_started        step 1 create-account
    <time> +<s>  step_completed      step 1 create-account in <s>
    <time> +<s>  completed           step 1 create-account
  final payload:
    {
      "account": "acct-1",
      "customer": "known",
      "email": "good@example.com"
    }
""")

    assert main(["status", "wf-failed"]) == 0
    assert normalized(capsys.readouterr().out) == snapshot("""\
workflow wf-failed: faulted
  started <date> UTC, last event <s> later
  deadline: <date> UTC
  failed: step 'create-account' failed: NonRetryableError: refused
  still to run: create-account
  steps:
      0 check-customer  completed 1 attempt   <s>  version 0+<digest>
      1 create-account  failed    1 attempt     version 0+<digest>
        NonRetryableError: refused
  timeline:
    <time> +<s>  dispatched          step 0 check-customer
    <time> +<s>  step_started        step 0 check-customer
    <time> +<s>  step_completed      step 0 check-customer in <s>
    <time> +<s>  step_started        step 1 create-account
    <time> +<s>  step_failed         step 1 create-account: NonRetryableError: refused
    <time> +<s>  faulted             step 1 create-account: step 'create-account' failed: NonRetryableError: refused
""")

    assert main(["status", "wf-waiting", "--no-sync"]) == 0
    assert normalized(capsys.readouterr().out) == snapshot("""\
workflow wf-waiting: waiting
  started <date> UTC, last event <s> later
  deadline: <date> UTC
  waiting for approval of refund (call-1)
  usage: 1 request, 53 input + 4 output tokens (function:model:)
  current step: 0 refund-order
  still to run: refund-order, check-customer
  steps:
      0 refund-order  waiting   1 attempt     version 0+<digest>
  timeline:
    <time> +<s>  dispatched          step 0 refund-order
    <time> +<s>  step_started        step 0 refund-order
    <time> +<s>  waiting             step 0 refund-order: waiting for approval of refund (call-1)
""")

    assert main(["workflows"]) == 0
    header, *rows = normalized(capsys.readouterr().out).splitlines()
    assert header == snapshot("STATE      UPDATED (UTC)        CORRELATION ID  STEP / REASON")
    assert sorted(rows) == snapshot(
        [
            "completed  <date>  wf-completed    -",
            "faulted    <date>  wf-failed       step 'create-account' failed: NonRetryableError: refused",
            "waiting    <date>  wf-waiting      waiting for approval of refund (call-1)",
        ]
    )  # the two that ran side by side may finish in either order

    assert main(["status", "wf-nope"]) == 1
    assert "no workflow 'wf-nope' in the store" in capsys.readouterr().out


def test_the_timeline_lines_up_a_failed_compensation_with_the_other_events() -> None:
    start = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    happened: list[tuple[EventKind, int, str, str | None]] = [
        ("dispatched", 0, "reserve", None),
        ("step_completed", 0, "reserve", None),
        ("step_failed", 1, "charge", None),
        ("faulted", 1, "charge", None),
        ("compensating", 1, "charge", None),
        ("step_failed", 0, "release", "reserve"),
        ("compensation_failed", 0, "release", "reserve"),
    ]
    events = [
        WorkflowEvent(kind=kind, correlation_id="w-1", step=step, activity=name, undoes=undoes, at=start)
        for kind, step, name, undoes in happened
    ]
    status = WorkflowStatus(
        correlation_id="w-1", state="compensation_failed", started_at=start, updated_at=start, events=events
    )
    rows = render_status(status).split("  timeline:\n")[1].splitlines()
    assert rows == snapshot(
        [
            "    12:00:00.000 +0.000s  dispatched          step 0 reserve",
            "    12:00:00.000 +0.000s  step_completed      step 0 reserve",
            "    12:00:00.000 +0.000s  step_failed         step 1 charge",
            "    12:00:00.000 +0.000s  faulted             step 1 charge",
            "    12:00:00.000 +0.000s  compensating        step 1 charge",
            "    12:00:00.000 +0.000s  step_failed         step 0 release undoing reserve",
            "    12:00:00.000 +0.000s  compensation_failed step 0 release undoing reserve",
        ]
    )
    assert len({row.index(" step ") for row in rows}) == 1, "every row's step starts in the same column"


def test_status_as_json_has_no_token(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    async def run() -> None:
        async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
            await WorkflowDispatcher(transport).dispatch_workflow(
                [check_customer], obo_token="secret-obo-token", correlation_id="wf-json"
            )
            await Worker(transport, [check_customer]).run(burst=True)

    asyncio.run(run())
    assert main(["status", "wf-json", "--json"]) == 0
    out = capsys.readouterr().out
    status = json.loads(out)
    assert status["state"] == "completed"
    assert [event["kind"] for event in status["events"]] == [
        "dispatched",
        "step_started",
        "step_completed",
        "completed",
    ]
    assert "secret-obo-token" not in out

    assert main(["workflows", "--json", "--no-sync"]) == 0
    assert [row["correlation_id"] for row in json.loads(capsys.readouterr().out)] == ["wf-json"]


def test_dead_letters_are_listed_with_reasons_and_replayed_after_the_fix(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(run_three_workflows(namespace))

    assert main(["dead-letters"]) == 0
    listing = capsys.readouterr().out
    assert normalized(listing) == snapshot("""\
1 dead letter on redis:

  message <id>  workflow wf-failed  step 1 create-account  attempt 1  from create-account
    reason: step 'create-account' failed: NonRetryableError: refused

replay one once its cause is fixed: paigeant dead-letters --replay <message id>
""")
    assert main(["dead-letters"]) == 0  # browsing twice shows the same letters
    assert capsys.readouterr().out == listing

    message_id = re.search(r"message (\S+)  workflow wf-failed", listing)
    assert message_id is not None
    monkeypatch.setattr(f"{__name__}.FIXED", True)
    assert main(["dead-letters", "--replay", message_id[1]]) == 0
    assert normalized(capsys.readouterr().out) == snapshot("""\
replayed workflow wf-failed to step 1 create-account as message <id> (attempt 2)
  it had failed: step 'create-account' failed: NonRetryableError: refused
""")
    assert main(["dead-letters", "--replay", message_id[1]]) == 1
    assert "no dead letter with message id" in capsys.readouterr().out

    asyncio.run(run_worker(namespace))
    assert main(["status", "wf-failed"]) == 0
    assert normalized(capsys.readouterr().out) == snapshot("""\
workflow wf-failed: completed
  started <date> UTC, last event <s> later
  deadline: <date> UTC
  steps:
      0 check-customer  completed 1 attempt   <s>  version 0+<digest>
      1 create-account  completed 2 attempts  <s>  version 0+<digest>
        (earlier attempt: NonRetryableError: refused)
  timeline:
    <time> +<s>  dispatched          step 0 check-customer
    <time> +<s>  step_started        step 0 check-customer
    <time> +<s>  step_completed      step 0 check-customer in <s>
    <time> +<s>  step_started        step 1 create-account
    <time> +<s>  step_failed         step 1 create-account: NonRetryableError: refused
    <time> +<s>  faulted             step 1 create-account: step 'create-account' failed: NonRetryableError: refused
    <time> +<s>  replayed            step 1 create-account: from the dead-letter queue
    <time> +<s>  step_started        step 1 create-account (attempt 2)
    <time> +<s>  step_completed      step 1 create-account (attempt 2) in <s>
    <time> +<s>  completed           step 1 create-account
  final payload:
    {
      "account": "acct-1",
      "customer": "known",
      "email": "bad@example.com"
    }
""")
    assert main(["dead-letters"]) == 0
    assert capsys.readouterr().out == "the dead-letter queue is empty\n"


def test_dead_letters_need_a_real_broker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dead-letters", "--transport", "inmemory"]) == 2
    assert "live in the process that made them" in capsys.readouterr().err


async def test_a_letter_no_trusted_key_signed_is_never_replayed_whatever_its_reason_says() -> None:
    from paigeant_ai import ActivitySpec, InMemoryTransport, PaigeantMessage, UserError
    from paigeant_ai._cli_dead_letters import DeadLetter, replay_dead_letter
    from paigeant_ai.security import MessageSigner, generate_key
    from paigeant_ai.transports.base import REASON_HEADER, Delivery

    signer = MessageSigner(generate_key("ops-1"))
    forged = PaigeantMessage.new([ActivitySpec(name="pay")], {"amount": 1_000_000, "to": "mallory"})
    async with InMemoryTransport() as transport:
        refused = Delivery("dead-letter", forged.to_json(), {REASON_HEADER: "security check failed: not signed"})
        with pytest.raises(UserError, match="cannot be replayed: the message is not signed"):
            await replay_dead_letter(transport, DeadLetter(refused, forged, None), signer)
        unsigned = Delivery("dead-letter", forged.to_json(), {REASON_HEADER: "step 'pay' failed: boom"})
        with pytest.raises(UserError, match="cannot be replayed: the message is not signed"):
            await replay_dead_letter(transport, DeadLetter(unsigned, forged, None), signer)
        assert await transport.pending("pay") == 0


async def run_workflows(namespace: str, *emails_by_id: tuple[str, str]) -> None:
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        dispatcher = WorkflowDispatcher(transport)
        for correlation_id, email in emails_by_id:
            await dispatcher.dispatch_workflow(
                [check_customer, create_account], {"email": email}, correlation_id=correlation_id
            )
        await Worker(transport, [check_customer, create_account]).run(burst=True)


def test_a_workflow_is_found_by_a_prefix_of_its_id(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(
        run_workflows(
            namespace,
            ("6e5c217c-0001", "good@example.com"),
            ("6e5c9999-0002", "good@example.com"),
            ("a*[x]-0003", "good@example.com"),
        )
    )
    assert main(["status", "6e5c217c"]) == 0
    assert capsys.readouterr().out.startswith("workflow 6e5c217c-0001: completed\n")

    assert main(["status", "6e5c", "--no-sync"]) == 2
    assert capsys.readouterr().err == (
        "paigeant: '6e5c' is the start of 2 workflows: 6e5c217c-0001, 6e5c9999-0002; give more of the ID\n"
    )
    assert main(["status", "a*[", "--no-sync"]) == 0  # glob characters are taken as they are
    assert capsys.readouterr().out.startswith("workflow a*[x]-0003: completed\n")
    assert main(["status", "a?", "--no-sync"]) == 1
    assert capsys.readouterr().out == (
        "no workflow 'a?' in the store (unknown, expired, or its events not yet applied)\n"
    )


def test_a_dead_letter_is_replayed_by_a_prefix_of_its_id_or_its_workflow(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(run_workflows(namespace, ("0bad0001-wf", "bad@example.com"), ("0bad0002-wf", "bad@example.com")))
    assert main(["dead-letters"]) == 0
    listing = capsys.readouterr().out
    ids = dict(re.findall(r"message (\S+)  workflow (\S+)", listing))
    assert sorted(ids.values()) == ["0bad0001-wf", "0bad0002-wf"]
    by_workflow = {correlation_id: message_id for message_id, correlation_id in ids.items()}

    assert main(["dead-letters", "--replay", "0bad"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paigeant: '0bad' is the start of 2 dead letters: message ")
    assert err.count("\n") == 1
    assert all(f"message {m} (workflow {c})" in err for m, c in ids.items())

    monkeypatch.setattr(f"{__name__}.FIXED", True)
    assert main(["dead-letters", "--replay", "0bad0001"]) == 0  # by its workflow
    assert capsys.readouterr().out.startswith("replayed workflow 0bad0001-wf to step 1 create-account")
    assert main(["dead-letters", "--replay", by_workflow["0bad0002-wf"][:8]]) == 0  # by its message
    assert capsys.readouterr().out.startswith("replayed workflow 0bad0002-wf to step 1 create-account")
    assert main(["dead-letters", "--replay", "0bad"]) == 1
    assert capsys.readouterr().out == (
        "no dead letter with message id '0bad', nor one whose message or workflow ID starts with it\n"
    )


async def test_cancelling_a_projector_leaves_nothing_behind_and_loses_no_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from paigeant_ai import InMemoryTransport, WorkflowEvent
    from paigeant_ai._events import events_headers
    from paigeant_ai.contracts import EVENTS
    from paigeant_ai.security import MessageSigner
    from paigeant_ai.store import InMemoryWorkflowStore, WorkflowProjector

    def event(correlation_id: str) -> tuple[bytes, dict[str, str] | None]:
        """An event's body and the headers that sign it with the process's own key, whose events it trusts."""
        body = WorkflowEvent(kind="dispatched", correlation_id=correlation_id).model_dump_json().encode()
        return body, events_headers(MessageSigner.from_settings(transport), body)

    class NotingStore(InMemoryWorkflowStore):
        def __init__(self) -> None:
            super().__init__()
            self.applied = asyncio.Event()

        async def apply(self, event: WorkflowEvent) -> None:
            await super().apply(event)
            self.applied.set()

    async with InMemoryTransport() as transport:
        store = NotingStore()
        running = asyncio.create_task(WorkflowProjector(transport, store).run())
        body, headers = event("wf-1")
        await transport.publish(EVENTS, body, headers=headers)
        await store.applied.wait()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        body, headers = event("wf-2")
        await transport.publish(EVENTS, body, headers=headers)
        await asyncio.sleep(0.05)
        assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()] == []

        await WorkflowProjector(transport, store).run(burst=True)  # the next one applies what came after
        assert sorted(status.correlation_id for status in await store.list()) == ["wf-1", "wf-2"]
    gc.collect()
    assert "never retrieved" not in caplog.text


def test_status_as_json_has_the_workflows_usage(namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("ok")], usage=RequestUsage(input_tokens=53, output_tokens=4))

    step = AgentActivity(Agent(FunctionModel(answer, model_name="answerer"), name="answer"))

    async def run() -> None:
        async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
            await WorkflowDispatcher(transport).dispatch_workflow([step], correlation_id="wf-usage")
            await Worker(transport, [step]).run(burst=True)

    asyncio.run(run())
    assert main(["status", "wf-usage", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "completed"
    assert status["usage"] == {"model": "answerer", "requests": 1, "input_tokens": 53, "output_tokens": 4}


def test_status_follow_prints_every_event_until_the_workflow_ends_and_goes_on_after_an_offset(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = generate_key("follow-test-1")
    name = redis_command_line(
        monkeypatch,
        SIGNING_KEY=json.dumps(key.as_dict(private=True)),
        TRUSTED_KEYS=json.dumps({"keys": [key.as_dict(private=False)]}),
    )
    monkeypatch.delenv("PAIGEANT_ALLOW_UNSIGNED")

    async def run() -> None:
        async with RedisTransport(REDIS_URL, namespace=name) as transport:
            dispatcher = WorkflowDispatcher(transport)
            steps = [check_customer, create_account]
            await dispatcher.dispatch_workflow(steps, {"email": "good@example.com"}, correlation_id="wf-follow")
            await Worker(transport, steps).run(burst=True)

    try:
        asyncio.run(run())
        assert main(["status", "wf-follow", "--follow"]) == 0
        lines = normalized(capsys.readouterr().out).splitlines()
        assert sorted(lines) == sorted(
            [
                "<time>  dispatched          step 0 check-customer",
                "<time>  step_started        step 0 check-customer",
                "<time>  step_completed      step 0 check-customer in <s>",
                "<time>  step_started        step 1 create-account",
                "<time>  step_completed      step 1 create-account in <s>",
                "<time>  completed           step 1 create-account",
            ]
        )
        assert lines[-1] == "<time>  completed           step 1 create-account"

        assert main(["status", "wf-follow", "--follow", "--json"]) == 0
        every = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert len(every) == 6
        assert main(["status", "wf-follow", "--follow", "--json", "--after", every[2]["offset"]]) == 0
        rest = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [item["event"] for item in rest] == [item["event"] for item in every[3:]]

        assert main(["status", "wf-fol", "--follow"]) == 0, "a prefix names the workflow, as for status"
        assert normalized(capsys.readouterr().out).splitlines()[-1] == lines[-1]
        assert main(["status", "wf-nobody", "--follow"]) == 1, "an unknown ID is reported, not waited for"
        assert (
            "no workflow 'wf-nobody': nothing in its progress stream, and not in the store" in capsys.readouterr().out
        )
    finally:
        asyncio.run(delete_redis_namespace(name))
