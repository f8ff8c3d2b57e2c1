"""The live activity registry: workers advertise what they serve, signed; catalogs, planners and dispatchers read it."""

from __future__ import annotations

import asyncio
import os
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from joserfc.jwk import OKPKey
from pydantic import BaseModel
from pydantic_ai.messages import ModelResponse, TextPart

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    ActivitySpec,
    DispatchedWorkflow,
    InMemoryTransport,
    MessageSigner,
    NoWorker,
    Parallel,
    PlannerAgentDeps,
    UserError,
    Worker,
    WorkflowDispatcher,
    activity,
    create_planner_agent,
    dispatched_workflows,
    read_registry,
)
from paigeant_ai._registry import AdvertisedActivity, LiveRegistry, WorkerRecord
from paigeant_ai._stalls import judged_by_registry
from paigeant_ai._versions import activity_version
from paigeant_ai.exceptions import TransportError
from paigeant_ai.store import WorkflowStatus
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import Advertising
from paigeant_ai.transports.memory import InMemoryRegistryBoard
from paigeant_ai.transports.redis import RedisTransport
from paigeant_ai.trust import TrustPolicy

from .brokers import make_transport, wait_until
from .scripted import Script, call, tool_returns


class Customer(BaseModel):
    customer_id: str


@activity(name="validate-customer", description="Checks the e-mail address and makes a customer ID")
async def validate_customer(ctx: ActivityContext) -> Customer:
    return Customer(customer_id=f"c-{ctx.payload['email']}")


validate_customer.version = "2.1.0"  # pyright: ignore[reportAttributeAccessIssue]


@activity(name="send-welcome", description="Sends the welcome e-mail")
async def send_welcome(ctx: ActivityContext) -> dict[str, Any]:
    return {"welcomed": ctx.payload["customer_id"]}


def signer() -> MessageSigner:
    key = OKPKey.generate_key("Ed25519", parameters={"kid": "workers"})
    return MessageSigner(key)


async def live_names(transport: Transport, security: MessageSigner) -> list[str]:
    registry = await read_registry(transport, security)
    assert registry is not None
    return registry.names


async def test_a_running_worker_advertises_its_activities_and_withdraws_them_when_it_stops() -> None:
    transport, security = InMemoryTransport(), signer()
    async with transport:
        worker = Worker(transport, [validate_customer, send_welcome], security=security, concurrency=3)
        async with worker:
            await wait_until(lambda: bool(worker.advertiser._task), within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
            registry = await read_registry(transport, security)
            assert registry is not None
            assert registry.names == ["send-welcome", "validate-customer"]
            [record] = registry.workers("validate-customer")
            assert record.concurrency == 3
            assert record.worker_id == worker.advertiser.worker_id
            versions = {item.name: item.version for item in record.activities}
            assert versions == {"validate-customer": "2.1.0", "send-welcome": activity_version(send_welcome)}  # derived
            catalog = await ActivityCatalog.from_registry(transport, security=security)
            entry = catalog.get("validate-customer")
            assert entry is not None
            assert entry.description == "Checks the e-mail address and makes a customer ID"
            assert entry.produced_variables == ["customer_id"]
        assert await live_names(transport, security) == []
        registry = await read_registry(transport, security)
        assert registry is not None
        assert registry.last_seen("validate-customer") is not None


async def test_a_worker_that_dies_lapses_after_three_heartbeats() -> None:
    transport, security = InMemoryTransport(), signer()
    async with transport:
        worker = Worker(transport, [validate_customer], security=security, registry_heartbeat=0.1)
        running = asyncio.create_task(worker.run())
        await wait_until(lambda: worker.advertiser._task is not None, within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
        assert await live_names(transport, security) == ["validate-customer"]
        worker.advertiser._task.cancel()  # pyright: ignore[reportOptionalMemberAccess, reportPrivateUsage]
        worker.advertiser._task = None  # pyright: ignore[reportPrivateUsage]
        registry = await read_registry(transport, security)  # the heartbeats stopped: the last one is on record
        assert registry is not None
        [record] = registry.live
        while await live_names(transport, security):
            assert datetime.now(UTC) < record.lapses_at + timedelta(seconds=1), "the record never lapsed"
            await asyncio.sleep(0.01)
        assert datetime.now(UTC) >= record.lapses_at  # three heartbeats after the last one, not before
        worker.stop()
        await running


def test_status_shows_a_silent_workers_step_stalled_a_heartbeat_before_dispatch_refuses_it() -> None:
    heartbeat = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    served = AdvertisedActivity(spec=ActivitySpec(name="validate-customer"))
    record = WorkerRecord(worker_id="w-1", interval=10, heartbeat=heartbeat, activities=[served])
    waiting = WorkflowStatus(
        correlation_id="c-1",
        state="running",
        current_activity="validate-customer",
        started_at=heartbeat,
        updated_at=heartbeat,
    )

    def judged(seconds_silent: float) -> tuple[str, bool]:
        registry = LiveRegistry(records=[record], now=heartbeat + timedelta(seconds=seconds_silent))
        [status] = judged_by_registry([waiting], registry)
        assert status is not None
        return status.state, registry.serves("validate-customer")

    assert judged(19.9) == ("running", True)  # a post lost: not yet
    assert judged(20.1) == ("stalled", True)  # two heartbeats of silence: shown stalled; dispatch still goes out
    assert judged(30.1) == ("stalled", False)  # three: the record lapses, and dispatch refuses the step


async def test_a_record_that_does_not_verify_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    transport, security = InMemoryTransport(), signer()
    async with transport:
        board = transport.registry_board()
        forged = WorkerRecord(worker_id="w-forged", interval=10, activities=[]).sign(signer())  # an untrusted key
        tampered = WorkerRecord(worker_id="w-tampered", interval=10).sign(security)
        tampered = tampered.model_copy(update={"concurrency": 99})
        await board.post("w-forged", forged.to_bytes(), ttl=60)
        await board.post("w-tampered", tampered.to_bytes(), ttl=60)
        await board.post("w-garbage", b"not json", ttl=60)
        registry = await read_registry(transport, security)
        assert registry is not None
        assert registry.records == []
    assert "'w-forged' does not verify" in caplog.text
    assert "'w-tampered' does not verify" in caplog.text
    assert "is not a worker record" in caplog.text


async def test_a_hand_written_catalog_merges_with_the_live_one_and_wins_on_a_clash() -> None:
    transport, security = InMemoryTransport(), signer()
    worker = Worker(transport, [validate_customer, send_welcome], security=security)
    async with transport, worker:
        await wait_until(lambda: worker.advertiser._task is not None, within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
        live = await ActivityCatalog.from_registry(transport, security=security, forbidden=["send-welcome"])
        assert live.names == ["validate-customer"]
        hand = ActivityCatalog([ActivitySpec(name="validate-customer", description="by hand")])
        merged = hand | await ActivityCatalog.from_registry(transport, security=security)
        assert sorted(merged.names) == ["send-welcome", "validate-customer"]
        entry = merged.get("validate-customer")
        assert entry is not None
        assert entry.description == "by hand"
        scoped = await ActivityCatalog.from_registry(transport, security=security, scopes=[])
        assert sorted(scoped.names) == ["send-welcome", "validate-customer"]


@activity(
    name="close-account",
    description="Closes the customer's account",
    required_scopes=["customers:write"],
    compensate="reopen-account",
)
async def close_account(ctx: ActivityContext) -> dict[str, bool]:
    return {"closed": True}


async def test_an_entry_carries_scopes_compensation_schemas_and_the_catalog_filters_by_name_and_scope() -> None:
    transport, security = InMemoryTransport(), signer()
    worker = Worker(transport, [validate_customer, send_welcome, close_account], security=security)
    async with transport, worker:
        await wait_until(lambda: worker.advertiser._task is not None, within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
        registry = await read_registry(transport, security)
        assert registry is not None
        [record] = registry.workers("close-account")
        assert (record.host, record.pid) == (socket.gethostname(), os.getpid())
        assert record.heartbeat <= datetime.now(UTC)
        [closing] = [item for item in record.activities if item.name == "close-account"]
        assert closing.spec.required_scopes == ("customers:write",)
        assert closing.spec.compensate == "reopen-account"
        [validating] = [item for item in record.activities if item.name == "validate-customer"]
        assert validating.produces["properties"] == {"customer_id": {"title": "Customer Id", "type": "string"}}
        allowed = await ActivityCatalog.from_registry(transport, security=security, allowed=["close-account", "x"])
        assert allowed.names == ["close-account"]
        reader = await ActivityCatalog.from_registry(transport, security=security, scopes=["customers:read"])
        assert sorted(reader.names) == ["send-welcome", "validate-customer"]
        writer = await ActivityCatalog.from_registry(transport, security=security, scopes=["customers:write"])
        assert sorted(writer.names) == ["close-account", "send-welcome", "validate-customer"]


async def test_the_planner_is_told_what_is_live_when_its_plan_names_a_step_no_live_worker_serves() -> None:
    transport, security = InMemoryTransport(), signer()
    catalog = ActivityCatalog([validate_customer, send_welcome])  # written by hand: names a step nobody runs now
    script = Script(
        [
            call(
                "dispatch_workflow",
                {"activities": ["validate-customer", "send-welcome"], "variables": {"email": "a@b"}},
            ),
            call("dispatch_workflow", {"activities": ["validate-customer"], "variables": {"email": "a@b"}}),
            ModelResponse(parts=[TextPart("Dispatched what runs now.")]),
        ]
    )
    planner = create_planner_agent(model=script.model, catalog=catalog)
    worker = Worker(transport, [validate_customer], security=security)
    async with transport, worker:
        await wait_until(lambda: worker.advertiser._task is not None, within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
        deps = PlannerAgentDeps(workflow_dispatcher=WorkflowDispatcher(transport, security=security))
        result = await planner.run("Onboard a@b", deps=deps)
    [refused, dispatched] = [
        part for part in tool_returns(script.requests[-1]) if part.tool_name == "dispatch_workflow"
    ]
    assert refused.content == (
        "The plan was not dispatched: no live worker serves activity 'send-welcome': start a worker for it, or use "
        "only what is live: validate-customer."
    )
    assert [workflow.activities for workflow in dispatched_workflows(result)] == [["validate-customer"]]
    assert isinstance(dispatched.content, DispatchedWorkflow)


async def test_the_dispatcher_refuses_a_step_no_live_worker_serves_once_any_worker_is_live(
    transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PAIGEANT_SHARED_STORE_URL", raising=False)  # on RabbitMQ, a group has no join store either
    security = signer()
    dispatcher = WorkflowDispatcher(transport, security=security)
    await dispatcher.dispatch_workflow(["nobody-serves-this"], {})  # nobody is live: dispatched anyway
    async with Worker(transport, [validate_customer], security=security) as worker:
        await wait_until(lambda: worker.advertiser._task is not None, within=5, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
        dispatcher.live_workers.fresh_for = 0  # its read that showed nobody live would answer for a second
        with pytest.raises(NoWorker) as refused:
            await dispatcher.dispatch_workflow(
                [ActivitySpec(name="validate-customer", compensate="undo-customer")], {"email": "a@b"}
            )
        assert str(refused.value) == (
            "no live worker serves activity 'undo-customer': start a worker for it, or use only what is live: "
            "validate-customer"
        )
        with pytest.raises(NoWorker, match=r"serves activities 'score-risk', 'manual-review': start"):
            await dispatcher.dispatch_workflow(  # the unserved steps are named before a missing join store
                [Parallel("validate-customer", ActivitySpec(name="score-risk", fallbacks=("manual-review",)))],
                {"email": "a@b"},
            )
        with pytest.raises(NoWorker, match=r"^no worker consumes 'score-risk': start a worker for it"):
            await dispatcher.dispatch_workflow(
                [Parallel("validate-customer", "score-risk")], {"email": "a@b"}, require_workers=True
            )
        unchecked = WorkflowDispatcher(transport, security=security, require_live_workers=False)
        await unchecked.dispatch_workflow(["nobody-serves-this"], {})


async def test_the_planner_without_a_catalog_plans_from_the_registry(transport: Transport) -> None:
    assert isinstance(transport, Advertising)
    security = signer()
    events: list[str] = []
    script = Script(
        [
            call("list_activities", {}),
            call(
                "dispatch_workflow",
                {
                    "activities": ["validate-customer", "send-welcome"],
                    "variables": {"email": "new.customer@example.com"},
                },
            ),
            ModelResponse(parts=[TextPart("Dispatched.")]),
        ]
    )
    planner = create_planner_agent(model=script.model)
    dispatcher = WorkflowDispatcher(transport, security=security, require_live_workers=True)
    worker = Worker(
        transport,
        [validate_customer, send_welcome],
        security=security,
        on_event=lambda event: events.append(event.kind),
    )
    async with worker:
        await wait_until(lambda: worker.advertiser._task is not None, within=10, what="the first heartbeat")  # pyright: ignore[reportPrivateUsage]
        # The seed's call: an application's token, which travels with the workflow (no step here requires scopes).
        deps = PlannerAgentDeps(workflow_dispatcher=dispatcher, user_obo_token="opaque-user-token")
        result = await planner.run("Onboard new.customer@example.com", deps=deps)
        assert result.output == "Dispatched."
        listed = str(script.requests[1][-1])
        assert "validate-customer" in listed
        assert "send-welcome" in listed
        await wait_until(lambda: "completed" in events, within=20, what="the planned workflow to complete")


async def test_a_board_keeps_each_workers_latest_record_until_its_ttl_passes(transport: Transport) -> None:
    assert isinstance(transport, Advertising)
    board = transport.registry_board()
    await board.open()
    await board.post("w-1", b"first", ttl=60)
    await board.post("w-1", b"second", ttl=60)
    await board.post("w-2", b"short-lived", ttl=0.3)
    assert sorted(await board.records()) == [b"second", b"short-lived"]
    await asyncio.sleep(0.5)
    assert await board.records() == [b"second"]
    other = transport.registry_board()  # another board over the same registry
    await other.open()
    assert await other.records() == [b"second"]
    if not transport.process_local:  # another process's transport reads what was posted before it started
        async with make_transport(transport.name, getattr(transport, "namespace", "")) as later:
            assert isinstance(later, Advertising)
            assert await later.registry_board().records() == [b"second"]
    with pytest.raises(UserError, match="at most 262144 bytes"):
        await board.post("w-3", b"x" * (256 * 1024 + 1), ttl=60)
    await board.close()
    await other.close()


class _UnreadableRegistry(InMemoryTransport):
    """A transport whose registry cannot be read now (a broker without streams, say)."""

    def registry_board(self) -> Any:
        board = super().registry_board()

        async def records() -> list[bytes]:
            raise TransportError("the registry stream is missing")

        board.records = records  # pyright: ignore[reportAttributeAccessIssue]
        return board


async def test_a_registry_that_cannot_be_read_does_not_stop_dispatches(caplog: pytest.LogCaptureFixture) -> None:
    transport, security = _UnreadableRegistry(), signer()
    async with transport:
        await WorkflowDispatcher(transport, security=security).dispatch_workflow(["validate-customer"], {})
        assert "the registry cannot be read (the registry stream is missing)" in caplog.text
        strict = WorkflowDispatcher(transport, security=security, require_live_workers=True)
        with pytest.raises(TransportError, match="the registry stream is missing"):
            await strict.dispatch_workflow(["validate-customer"], {})


class FlakyRegistryTransport(InMemoryTransport):
    """An in-memory transport whose registry refuses the first post, as a broker that is briefly away does."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 1

    def registry_board(self) -> InMemoryRegistryBoard:
        transport = self

        class Board(InMemoryRegistryBoard):
            async def post(self, worker_id: str, record: bytes, *, ttl: float) -> None:
                if transport.failures:
                    transport.failures -= 1
                    raise TransportError("the registry is away")
                await super().post(worker_id, record, ttl=ttl)

        return Board(self._registry)  # pyright: ignore[reportPrivateUsage]


async def test_a_worker_whose_first_post_fails_is_on_the_registry_at_its_next_heartbeat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, security = FlakyRegistryTransport(), signer()
    async with transport:
        worker = Worker(transport, [validate_customer], security=security, registry_heartbeat=0.1)
        async with worker:
            await wait_until_async(lambda: live_names(transport, security), ["validate-customer"], within=5)
        assert "the registry is away" in caplog.text


async def wait_until_async(read: Any, expected: object, *, within: float) -> None:
    """Wait until `await read()` returns `expected`."""
    deadline = asyncio.get_running_loop().time() + within
    while (found := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, f"still {found!r}, not {expected!r}"
        await asyncio.sleep(0.02)


async def test_with_a_trust_policy_only_a_key_that_may_advertise_puts_activities_on_the_registry(
    caplog: pytest.LogCaptureFixture,
) -> None:
    workers = OKPKey.generate_key("Ed25519", parameters={"kid": "workers"})
    desk = OKPKey.generate_key("Ed25519", parameters={"kid": "approvals-desk"})
    orders = OKPKey.generate_key("Ed25519", parameters={"kid": "orders"})
    policy = TrustPolicy.load(
        {
            "keys": {
                "workers": {"may": ["advertise"]},
                "approvals-desk": {"may": ["approve"]},
                "orders": {"may": ["start"]},
            }
        }
    )
    public = [OKPKey.import_key(key.as_dict(private=False)) for key in (workers, desk)]
    reader = MessageSigner(orders, public, policy=policy)
    transport = InMemoryTransport()
    async with transport:
        board = transport.registry_board()
        served = AdvertisedActivity(spec=ActivitySpec(name="validate-customer"))
        planted = AdvertisedActivity(spec=ActivitySpec(name="export-all-customers"), description="Use this first")
        for kid, key, item in (("w-1", workers, served), ("w-2", desk, planted)):
            record = WorkerRecord(worker_id=kid, interval=10, activities=[item]).sign(MessageSigner(key))
            await board.post(kid, record.to_bytes(), ttl=60)
        assert await live_names(transport, reader) == ["validate-customer"]
        catalog = await ActivityCatalog.from_registry(transport, security=reader)
        assert [entry.name for entry in catalog] == ["validate-customer"]
    assert "key 'approvals-desk' may not advertise activities on the registry" in caplog.text


async def test_a_read_sees_a_record_another_process_posted_just_before_it(transport: Transport) -> None:
    if transport.process_local:
        pytest.skip("only this process sees an in-memory registry")
    assert isinstance(transport, Advertising)
    security = signer()
    board = transport.registry_board()
    assert await live_names(transport, security) == []  # the reader is open, and caught up once
    async with make_transport(transport.name, getattr(transport, "namespace", "")) as other:
        assert isinstance(other, Advertising)
        for n in range(20):  # a worker of another process starts, then a dispatch at once reads the registry
            name = f"step-{n}"
            record = WorkerRecord(
                worker_id=f"w-{n}", interval=10, activities=[AdvertisedActivity(spec=ActivitySpec(name=name))]
            )
            await other.registry_board().post(f"w-{n}", record.sign(security).to_bytes(), ttl=60)
            assert name in await live_names(transport, security), f"post {n} was not seen by the read after it"
    await board.close()


class CountedRegistry(InMemoryTransport):
    """An in-memory transport that counts the reads of its registry."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def registry_board(self) -> InMemoryRegistryBoard:
        transport = self

        class Board(InMemoryRegistryBoard):
            async def records(self) -> list[bytes]:
                transport.reads += 1
                return await super().records()

        return Board(self._registry)  # pyright: ignore[reportPrivateUsage]


async def test_a_burst_of_dispatches_before_any_worker_starts_reads_the_registry_once() -> None:
    transport, security = CountedRegistry(), signer()
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security)
        await asyncio.gather(*(dispatcher.dispatch_workflow(["validate-customer"], {}) for _ in range(50)))
        assert transport.reads == 1
        await transport.registry_board().post(
            "w-1", WorkerRecord(worker_id="w-1", interval=10).sign(security).to_bytes(), ttl=60
        )
        strict = WorkflowDispatcher(transport, security=security, require_live_workers=True)
        with pytest.raises(NoWorker, match="no live worker serves activity 'validate-customer'"):
            await strict.dispatch_workflow(["validate-customer"], {})


@pytest.mark.redis
async def test_a_redis_reader_skips_a_record_larger_than_a_board_accepts(transport: Transport) -> None:
    if not isinstance(transport, RedisTransport):
        pytest.skip("written straight into the Redis hash")
    board = transport.registry_board()
    await board.post("w-1", b"kept", ttl=60)
    client: Any = transport.client  # written to as an intruder would
    await client.hset(transport.registry_board().keys[0], "w-2", b"x" * (256 * 1024 + 1))
    await client.zadd(transport.registry_board().keys[1], {"w-2": 2**50})
    assert await board.records() == [b"kept"]


async def test_a_heartbeat_period_beyond_a_day_is_refused_by_the_worker_and_ignored_by_readers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, security = InMemoryTransport(), signer()
    async with transport:
        for wrong in (1e300, float("nan"), 0):
            with pytest.raises(UserError, match="the registry heartbeat must be a positive number of seconds up to"):
                Worker(transport, [validate_customer], security=security, registry_heartbeat=wrong)
        record = WorkerRecord(
            worker_id="w-1", interval=10, activities=[AdvertisedActivity(spec=ActivitySpec(name="x"))]
        )
        body = record.sign(security).to_bytes().replace(b'"interval":10.0', b'"interval":1e300')
        await transport.registry_board().post("w-1", body, ttl=60)
        assert await live_names(transport, security) == []
    assert "a registry record is not a worker record and is ignored: interval" in caplog.text
