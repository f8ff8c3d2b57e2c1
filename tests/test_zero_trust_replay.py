"""Replays across replicas and over time, dead-letter replay, delivery counts, and slots held by forged copies.

Each `test_attack_*` does what an attacker who can read and write the broker does, shows it refused with its own
reason (the gated step did not run again), and a valid workflow beside it completes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from joserfc.jwk import Key

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    InMemoryWaitingStore,
    PaigeantMessage,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
)
from paigeant_ai._cli_dead_letters import DeadLetter, browse_dead_letters, replay_dead_letter
from paigeant_ai._plan import new_plan
from paigeant_ai._sealing import seal
from paigeant_ai._shared_store import PER_PROCESS_WARNING
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import NonRetryableError
from paigeant_ai.security import InMemoryReplayCache, MessageSigner, generate_key
from paigeant_ai.store import InMemoryWorkflowStore
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER, SOURCE_HEADER, Delivery, SharedStores
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport
from paigeant_ai.transports.sqlite import SQLiteReplayCache, SQLiteTransport
from paigeant_ai.worker import InMemoryDedupeStore

from . import replay_workers
from .brokers import REDIS_URL, dead_letters, delete_redis_namespace, fleet, require_redis, wait_until

KEY = generate_key("orders-1")
OPS = generate_key("ops-1")
"""The key `paigeant dead-letters --replay` signs with; the workers trust it."""


@asynccontextmanager
async def shared_store(transport: Transport) -> AsyncGenerator[SharedStores]:
    """What every replica of a test shares: the transport itself on Redis, else a Redis (as for RabbitMQ)."""
    if isinstance(transport, RedisTransport):
        yield transport
        return
    require_redis()
    namespace = getattr(transport, "namespace", f"paigeant-test-{uuid.uuid4().hex[:12]}")
    async with RedisTransport(REDIS_URL, namespace=namespace) as store:
        try:
            yield store
        finally:
            await delete_redis_namespace(namespace)


def replica(transport: Transport, activities: list[object], store: SharedStores, **options: object) -> Worker:
    """A worker of the service that signs with `KEY`, on the replay cache and dedupe store of `store`."""
    signer = MessageSigner(KEY, replay_cache=store.replay_cache())
    return Worker(transport, activities, security=signer, dedupe=store.dedupe_store(), **options)  # pyright: ignore[reportArgumentType]


def hop(step: str, variables: dict[str, object] | None = None) -> tuple[PaigeantMessage, bytes]:
    """The first hop of a one-step workflow, signed by `KEY`: what an attacker captures from the broker."""
    message = PaigeantMessage.new([ActivitySpec(name=step)], variables or {}, correlation_id=str(uuid.uuid4()))
    message.plan = new_plan(message, MessageSigner(KEY))
    return message, seal(message, MessageSigner(KEY), max_bytes=1 << 20)


def reasons(letters: list[Delivery]) -> list[str]:
    return [letter.headers.get(REASON_HEADER, "") for letter in letters]


# -- a copy published while the original runs ------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["redis", "rabbitmq"], indirect=True)
async def test_attack_copy_published_while_the_original_runs(transport: Transport) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    @activity(name="charge")
    async def charge(ctx: ActivityContext) -> dict[str, bool]:
        ran.append(ctx.correlation_id)
        started.set()
        if ctx.payload.get("slow"):
            await release.wait()
        return {"charged": True}

    captured, body = hop("charge", {"slow": True})
    async with shared_store(transport) as store:
        one = replica(transport, [charge], store, concurrency=1)
        two = replica(transport, [charge], store, concurrency=1)
        async with one, two:
            await transport.publish("charge", body)
            await asyncio.wait_for(started.wait(), 10)
            await transport.publish("charge", body)  # the copy: one replica is busy, the other takes it
            await wait_until(lambda: one.stats.rejected + two.stats.rejected == 1, within=10, what="the refusal")
            _, valid = hop("charge")
            release.set()
            await transport.publish("charge", valid)
            await wait_until(lambda: len(ran) == 2, within=10, what="the valid workflow")
            await wait_until(
                lambda: one.stats.completed_workflows + two.stats.completed_workflows == 2,
                within=10,
                what="both workflows",
            )
        assert ran.count(captured.correlation_id) == 1, "the step ran once"
        await letters_waiting(transport)
        [letter] = await dead_letters(transport)
        assert reasons([letter]) == [
            f"security check failed: replayed: message {captured.message_id!r} is being processed"
        ]


# -- a hop after the in-process cache is full ------------------------------------------------------------------


async def test_attack_hop_replayed_after_the_in_process_cache_is_full(transport: Transport) -> None:
    ran: list[str] = []

    @activity(name="ship")
    async def ship(ctx: ActivityContext) -> None:
        ran.append(ctx.correlation_id)

    signer = MessageSigner(KEY, replay_cache=InMemoryReplayCache(max_entries=3))
    worker = Worker(transport, [ship], security=signer, dedupe=InMemoryDedupeStore(max_keys=3))
    captured, body = hop("ship")
    await transport.publish("ship", body)
    await worker.run(burst=True)
    for _ in range(4):  # later hops push it out of both caches
        await asyncio.sleep(0.01)
        await transport.publish("ship", hop("ship")[1])
    await worker.run(burst=True)
    assert len(ran) == 5

    await transport.publish("ship", body)  # the replay
    _, valid = hop("ship")
    await transport.publish("ship", valid)
    await worker.run(burst=True)
    assert ran.count(captured.correlation_id) == 1, "the evicted hop did not run again"
    assert len(ran) == 6, "the valid workflow ran"
    await letters_waiting(transport)
    [reason] = reasons(await dead_letters(transport))
    assert reason.startswith(f"security check failed: message {captured.message_id!r} was made before hops")
    assert "PAIGEANT_SHARED_STORE_URL" in reason
    assert signer.refused["replay_horizon"] == 1


# -- dead-letter replay ----------------------------------------------------------------------------------------


async def letters_waiting(transport: Transport, count: int = 1) -> None:
    """Wait until the broker counts `count` letters in the dead-letter queue (a quorum queue may count late)."""
    deadline = time.monotonic() + 10
    while await transport.pending(DEAD_LETTER) < count:
        assert time.monotonic() < deadline, "the dead letter did not arrive"
        await asyncio.sleep(0.05)


async def replay_all(transport: Transport) -> list[PaigeantMessage]:
    """What `paigeant dead-letters --replay` does, for every letter in the queue."""
    await letters_waiting(transport)
    operator = MessageSigner(OPS, [KEY])  # it trusts the services whose letters it replays
    sent: list[PaigeantMessage] = []

    async def replay(letter: DeadLetter) -> bool:
        sent.append(await replay_dead_letter(transport, letter, operator))
        return False

    await browse_dead_letters(transport, replay)
    return sent


async def test_attack_captured_hop_injected_into_the_dead_letter_queue_with_a_benign_reason(
    transport: Transport,
) -> None:
    ran: list[str] = []

    @activity(name="refund")
    async def refund(ctx: ActivityContext) -> None:
        ran.append(ctx.correlation_id)

    captured, body = hop("refund", {"amount": 100})
    async with shared_store_or_memory(transport) as store:
        worker = replica(transport, [refund], store)
        await transport.publish("refund", body)
        await worker.run(burst=True)
        # The attacker puts the captured hop in the dead-letter queue, saying it merely timed out.
        benign = {REASON_HEADER: "step 'refund' failed: TimeoutError", SOURCE_HEADER: "refund"}
        await transport.publish(DEAD_LETTER, body, headers=benign)
        [sent] = await replay_all(transport)  # the operator replays what looks like a harmless failure
        assert sent.message_id == captured.message_id, "sent back as it arrived, with its identity"
        _, valid = hop("refund")
        await transport.publish("refund", valid)
        await worker.run(burst=True)
    assert ran.count(captured.correlation_id) == 1, "the refund ran once"
    assert len(ran) == 2, "the valid workflow ran"
    await letters_waiting(transport)
    assert reasons(await dead_letters(transport)) == [
        f"security check failed: replayed: message {captured.message_id!r} was already processed"
    ]


async def test_attack_the_same_dead_letter_replayed_twice(transport: Transport) -> None:
    attempts: list[int] = []
    fixed = False

    @activity(name="create-account")
    async def create_account(ctx: ActivityContext) -> dict[str, bool]:
        if not fixed:
            raise NonRetryableError("address refused")
        attempts.append(ctx.attempt)
        return {"created": True}

    async with shared_store_or_memory(transport) as store:
        signer = MessageSigner(KEY, [OPS], replay_cache=store.replay_cache())
        worker = Worker(transport, [create_account], security=signer, dedupe=store.dedupe_store())
        await transport.publish("create-account", hop("create-account")[1])
        await worker.run(burst=True)
        letters: list[Delivery] = []

        async def keep(letter: DeadLetter) -> bool:  # the attacker reads the letter off the broker
            letters.append(letter.delivery)
            return True

        await letters_waiting(transport)
        await browse_dead_letters(transport, keep)
        [captured] = letters
        fixed = True
        [first] = await replay_all(transport)
        await worker.run(burst=True)
        await transport.publish(DEAD_LETTER, captured.body, headers=captured.headers)  # put back by the attacker
        [second] = await replay_all(transport)
        assert second.message_id == first.message_id, "the same letter makes the same replay"
        _, valid = hop("create-account")
        await transport.publish("create-account", valid)
        await worker.run(burst=True)
    assert attempts == [1, 0], "the replay ran once, and the valid workflow ran"
    # The second replay is the first hop again: refused as a replay, or, when tracing gave it other trace headers
    # (other signed content under the same id), skipped as the same hop made anew.
    refusals = reasons(await dead_letters(transport))
    refused = [f"security check failed: replayed: message {first.message_id!r} was already processed"]
    assert (refusals, worker.stats.duplicates) in ((refused, 0), ([], 1)), "the second replay was recognised"


@asynccontextmanager
async def shared_store_or_memory(transport: Transport) -> AsyncGenerator[SharedStores]:
    """The shared store on a broker; in memory, the process itself is every replica."""
    if transport.process_local:
        yield _MemoryStores()
        return
    async with shared_store(transport) as store:
        yield store


class _MemoryStores:
    def __init__(self) -> None:
        self.replays, self.done = InMemoryReplayCache(), InMemoryDedupeStore()

    def replay_cache(self) -> InMemoryReplayCache:
        return self.replays

    def dedupe_store(self) -> InMemoryDedupeStore:
        return self.done

    def waiting_store(self) -> InMemoryWaitingStore:
        return InMemoryWaitingStore()

    def workflow_store(self) -> InMemoryWorkflowStore:
        return InMemoryWorkflowStore()


# -- delivery counts a publisher sets --------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["redis", "rabbitmq"], indirect=True)
async def test_attack_delivery_count_set_by_the_publisher(transport: Transport) -> None:
    ran: list[str] = []

    @activity(name="deliver")
    async def deliver(ctx: ActivityContext) -> None:
        ran.append(ctx.correlation_id)

    captured, body = hop("deliver")
    async with shared_store(transport) as store:
        worker = replica(transport, [deliver], store)
        await transport.publish("deliver", body)
        await worker.run(burst=True)
        # The replay claims to have been delivered 100 times (poison: dead-lettered with a harmless reason, to be
        # replayed later) or once before (a redelivery: skipped quietly instead of refused).
        for count in (100, 1):
            await publish_with_count(transport, "deliver", body, count)
        _, valid = hop("deliver")
        await transport.publish("deliver", valid)
        await worker.run(burst=True)
    assert ran.count(captured.correlation_id) == 1
    assert len(ran) == 2, "the valid workflow ran"
    refused = f"security check failed: replayed: message {captured.message_id!r} was already processed"
    await letters_waiting(transport, 2)
    assert reasons(await dead_letters(transport)) == [refused, refused], (
        "refused as replays, neither poison nor skipped"
    )
    assert worker.stats.duplicates == 0


async def publish_with_count(transport: Transport, address: str, body: bytes, count: int) -> None:
    """Publish `body` as the broker's client would, with a delivery count of the publisher's making."""
    if isinstance(transport, RedisTransport):
        fields = {"body": body, "headers": "{}", "deliveries": str(count)}
        await transport.client.xadd(transport.stream_key(address), fields)  # pyright: ignore[reportAttributeAccessIssue]
        return
    import aio_pika

    from paigeant_ai.transports.rabbitmq import RabbitMQTransport

    from .brokers import RABBITMQ_URL

    assert isinstance(transport, RabbitMQTransport)
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        queue = transport.queue_name(address)
        message = aio_pika.Message(body, headers={"x-delivery-count": count}, delivery_mode=2)
        await channel.default_exchange.publish(message, routing_key=queue)


# -- forged copies holding slots -------------------------------------------------------------------------------


@pytest.mark.parametrize("copies", ["forged", "replayed"])
async def test_attack_copies_of_a_running_step_hold_slots(transport: Transport, copies: str) -> None:
    release = asyncio.Event()
    finished: dict[str, float] = {}

    @activity(name="book")
    async def book(ctx: ActivityContext) -> None:
        if ctx.payload.get("slow"):
            await release.wait()
        finished[ctx.correlation_id] = time.monotonic()

    running, body = hop("book", {"slow": True, "amount": 10})
    if copies == "forged":  # the same step's key, content changed: a bad signature
        copy = body.replace(b'"amount":10', b'"amount":99')
        assert copy != body
        expected = "bad signature: the message was altered after key 'orders-1' signed it"
    else:  # exactly the running hop, captured off the broker: its signature holds
        copy, expected = body, "is being processed"
    worker = Worker(transport, [book], security=MessageSigner(KEY), concurrency=4)
    async with worker:
        await transport.publish("book", body)
        await wait_until(
            lambda: worker.stats.completed_steps == 0 and len(worker._running_keys) == 1,
            within=10,
            what="the slow step",
        )  # pyright: ignore[reportPrivateUsage]
        for _ in range(6):
            await transport.publish("book", copy)
        valid, valid_body = hop("book")
        await transport.publish("book", valid_body)
        await wait_until(
            lambda: valid.correlation_id in finished, within=10, what="the valid step, beside the slow one"
        )
        assert running.correlation_id not in finished, "the valid step did not wait for the slow one"
        assert worker.stats.rejected == 6
        release.set()
        await wait_until(lambda: running.correlation_id in finished, within=10, what="the slow step")
    await letters_waiting(transport, 6)
    letters = reasons(await dead_letters(transport))
    assert len(letters) == 6
    assert all(expected in r for r in letters), letters


# -- replicas in processes of their own, on RabbitMQ -----------------------------------------------------------


async def test_attack_hop_and_resume_replayed_to_a_second_worker_process_on_rabbitmq(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    require_redis()
    steps = [replay_workers.PAY, replay_workers.TRANSFER]
    async with fleet(tmp_path, "rabbitmq", _rabbitmq_url(), workers="tests.replay_workers", steps=steps) as (
        processes,
        dispatcher,
        records,
    ):
        namespace = processes.env["PAIGEANT_NAMESPACE"]
        processes.env["PAIGEANT_SHARED_STORE_URL"] = REDIS_URL
        transport = dispatcher.transport
        try:
            # A transfer parks for approval (in this process), is approved, and the resume hop is captured.
            waiting = InMemoryWaitingStore()
            dispatcher.waiting_store = waiting
            async with RedisTransport(REDIS_URL, namespace=namespace) as store:
                parking = Worker(
                    transport,
                    [replay_workers.transfer],
                    security=MessageSigner(dispatcher_key(dispatcher), replay_cache=store.replay_cache()),
                    waiting_store=waiting,
                )
                cid = await dispatcher.dispatch_workflow([replay_workers.TRANSFER])
                await parking.run(burst=True)
            sent: list[bytes] = []
            encode = dispatcher.encode
            dispatcher.encode = lambda message: sent.append(encode(message)) or sent[-1]  # pyright: ignore[reportAttributeAccessIssue]
            await dispatcher.resume(cid, approve_all=True, approver="ops@example.com")
            [resume] = sent
            message = PaigeantMessage.new([ActivitySpec(name=replay_workers.PAY)], correlation_id=str(uuid.uuid4()))
            message.plan = new_plan(message, dispatcher.security)
            pay = dispatcher.encode(message)
            await transport.publish(replay_workers.PAY, pay)

            first = await processes.start("worker")  # the first replica runs both
            await wait_until(
                lambda: bool(replay_workers.runs(records, "pay") and replay_workers.runs(records, "transfer")),
                within=30,
                what="the first replica to run both hops",
            )
            await asyncio.sleep(0.5)  # its acks reach the broker
            first.terminate()
            await first.wait()

            await processes.start("worker")  # the second replica gets the replays
            await transport.publish(replay_workers.PAY, pay)
            await transport.publish(replay_workers.TRANSFER, resume)
            fresh = PaigeantMessage.new([ActivitySpec(name=replay_workers.PAY)], correlation_id=str(uuid.uuid4()))
            fresh.plan = new_plan(fresh, dispatcher.security)
            valid = dispatcher.encode(fresh)
            await transport.publish(replay_workers.PAY, valid)
            await wait_until(lambda: len(replay_workers.runs(records, "pay")) == 2, within=30, what="the valid hop")
            letters: list[Delivery] = []
            deadline = time.monotonic() + 30
            while len(letters) < 2 and time.monotonic() < deadline:
                letters += await dead_letters(transport)
                await asyncio.sleep(0.2)
            assert replay_workers.runs(records, "transfer") == ["0"], "the approved transfer ran once"
            assert replay_workers.runs(records, "pay").count(f"{message.correlation_id}:0:{replay_workers.PAY}") == 1
            assert sorted(reasons(letters)) == sorted(
                f"security check failed: replayed: message {PaigeantMessage.from_json(raw).message_id!r} "
                "was already processed"
                for raw in (pay, resume)
            )
        finally:
            await delete_redis_namespace(namespace)


def test_a_rabbitmq_worker_without_a_shared_store_says_what_is_not_protected(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .brokers import RABBITMQ_URL, require_rabbitmq

    require_rabbitmq()
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(KEY.as_dict(private=True)))
    monkeypatch.delenv("PAIGEANT_SHARED_STORE_URL", raising=False)

    async def start(**options: object) -> None:
        from paigeant_ai import get_transport

        namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
        async with get_transport("rabbitmq", url=RABBITMQ_URL, namespace=namespace) as transport:
            try:
                await Worker(transport, [replay_workers.pay], **options).run(burst=True)  # pyright: ignore[reportArgumentType]
            finally:
                from .brokers import delete_rabbitmq_addresses

                await delete_rabbitmq_addresses(namespace, [replay_workers.PAY, DEAD_LETTER, "events", "@progress"])
                await delete_redis_namespace(namespace)

    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        asyncio.run(start())
    assert PER_PROCESS_WARNING in caplog.text
    assert "a hop replayed to another replica (another worker process on the same queues) runs again" in caplog.text
    caplog.clear()
    require_redis()
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        asyncio.run(start(shared_store=REDIS_URL))
    assert PER_PROCESS_WARNING not in caplog.text


def dispatcher_key(dispatcher: WorkflowDispatcher) -> Key:
    """The key of the fleet's signer, which its worker processes trust."""
    security = dispatcher.security
    assert isinstance(security, MessageSigner)
    assert security.signing_key is not None
    return security.signing_key


def _rabbitmq_url() -> str:
    from .brokers import RABBITMQ_URL

    return RABBITMQ_URL


# -- workflows expire by default -------------------------------------------------------------------------------


async def test_workflows_expire_after_a_week_by_default(caplog: pytest.LogCaptureFixture) -> None:
    from paigeant_ai import InMemoryTransport

    events: list[WorkflowEvent] = []
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport, on_event=events.append).dispatch_workflow(["a"])
        [first] = await _messages(transport, "a")
        assert first.expires_at is not None
        left = (first.expires_at - first.created_at).total_seconds()
        assert left == pytest.approx(7 * 24 * 3600, abs=5)
        with caplog.at_level(logging.WARNING, logger="paigeant_ai.dispatch"):
            forever = WorkflowDispatcher(transport, ttl=None)
        assert forever.ttl is None
        assert "never expire (ttl=None)" in caplog.text


async def _messages(transport: Transport, address: str) -> list[PaigeantMessage]:
    found: list[PaigeantMessage] = []
    async with await transport.consume(address) as consumer:
        while await transport.pending(address) > len(found):
            delivery = await asyncio.wait_for(anext(consumer), 5)
            found.append(PaigeantMessage.from_json(delivery.body))
            await transport.ack(delivery)
    return found


# -- the claim, state by state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_hop_is_claimed_as_it_starts_and_each_copy_gets_its_answer(kind: str) -> None:
    async with _cache(kind) as cache:

        async def claim(message_id: str, digest: str = "d1", *, redelivered: bool = False, lease: float = 60) -> str:
            return await cache.claim(
                message_id, digest, sent_at=time.time(), redelivered=redelivered, lease=lease, ttl=60
            )

        assert await claim("m1") == "claimed"
        assert await claim("m1") == "running", "a fresh copy of a running hop is a replay"
        assert await claim("m1", "d2") == "duplicate", "the hop made anew by a trusted upstream"
        assert await claim("m1", redelivered=True) == "claimed", "the broker's redelivery takes over"
        await cache.settle("m1", "d1", 60)
        assert await claim("m1") == "settled"
        assert await claim("m1", redelivered=True) == "settled", "a lost ack: skipped"
        assert await claim("m2", lease=0.001) == "claimed"
        await asyncio.sleep(0.05)
        assert await claim("m2") == "claimed", "its lease lapsed: its worker is gone"


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_a_claim_asked_twice_by_its_holder_is_its_own_not_a_replay(kind: str) -> None:
    """A store's client sends a request again when a dropped connection lost its reply (redis-py resends the
    pipeline once Redis is back): the copy that claimed must not then be refused, and dead-lettered, as a replay."""
    async with _cache(kind) as cache:

        async def claim(holder: str) -> str:
            return await cache.claim(
                "m1", "d1", sent_at=time.time(), redelivered=False, lease=60, ttl=60, holder=holder
            )

        assert await claim("copy-a") == "claimed"
        assert await claim("copy-a") == "claimed", "the same claim, sent again"
        assert await claim("copy-b") == "running", "another copy is still a replay"
        assert await claim("") == "running", "a claim without a holder proves nothing"
        await cache.settle("m1", "d1", 60)
        assert await claim("copy-a") == "settled"


@asynccontextmanager
async def _cache(kind: str) -> AsyncGenerator[InMemoryReplayCache | RedisReplayCache | SQLiteReplayCache]:
    if kind == "memory":
        yield InMemoryReplayCache()
        return
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            async with SQLiteTransport(Path(folder) / "replay.sqlite3") as sqlite:
                yield sqlite.replay_cache()
        return
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    async with RedisTransport(REDIS_URL, namespace=namespace) as redis:
        try:
            yield RedisReplayCache(redis)
        finally:
            await delete_redis_namespace(namespace)
