"""Steps longer than the broker's ack deadline (see `paigeant_ai._long_steps`), in one process.

An in-memory broker that declares an ack deadline, as RabbitMQ does, stands in for the real one (the processes on
real brokers are in `tests/test_long_steps_processes.py`): handing a running step back, watch copies and what each
finds, deliveries waiting for a slot, the start-up warning, and RabbitMQ's own timeout per consumer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Mapping

import pytest

from paigeant_ai import ActivityContext, ActivitySpec, PaigeantMessage, Worker, WorkflowDispatcher, activity
from paigeant_ai._long_steps import WATCH_HEADER, long_steps_warning, watch_marker, watch_sequence
from paigeant_ai._plan import new_plan
from paigeant_ai._sealing import seal
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import TransportError, UserError
from paigeant_ai.security import InMemoryReplayCache, MessageSigner, generate_key
from paigeant_ai.settings import Settings
from paigeant_ai.transports.base import REASON_HEADER, AckDeadline, Delivery
from paigeant_ai.transports.memory import InMemoryTransport
from paigeant_ai.transports.rabbitmq import RabbitMQTransport
from paigeant_ai.transports.rabbitmq._timeouts import broker_version, per_consumer_timeout
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport
from paigeant_ai.worker import InMemoryDedupeStore

from .brokers import REDIS_URL, dead_letters, delete_redis_namespace, require_redis

KEY = generate_key("orders-1")
STEP = "long-step"


class DeadlineTransport(InMemoryTransport):
    """An in-memory broker whose consumers must hand back what they hold after `after` seconds, as on RabbitMQ.

    Attributes:
        acks: Every ack asked for: the address, whether the delivery was a watch copy, its delivery tag.
        published: Every publish to a step: the address, its headers, its delay.
    """

    def __init__(self, *, after: float = 0.2, lease: float = 0.3) -> None:
        super().__init__(namespace=f"test-{uuid.uuid4().hex[:8]}")
        self.after = after
        self.lease = lease
        self.acks: list[tuple[str, bool, int]] = []
        self.published: list[tuple[str, dict[str, str], float]] = []
        self.bodies: list[bytes] = []

    def forget_published(self) -> None:
        self.published.clear()
        self.bodies.clear()

    def detach_after(self, longest_step: float) -> float | None:
        return self.after

    async def retry_later(self, delivery: Delivery, delay: float) -> None:
        self.published.append((delivery.address, dict(delivery.headers), delay))
        self.bodies.append(delivery.body)
        await super().retry_later(delivery, delay)

    async def ack(self, delivery: Delivery) -> None:
        self.acks.append((delivery.address, WATCH_HEADER in delivery.headers, delivery.handle[1]))
        await super().ack(delivery)

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        if address == STEP:
            self.published.append((address, dict(headers or {}), delay))
            self.bodies.append(body)
        await super().publish(address, body, headers=headers, delay=delay)


def test_the_test_broker_declares_an_ack_deadline() -> None:
    assert isinstance(DeadlineTransport(), AckDeadline)
    assert not isinstance(InMemoryTransport(), AckDeadline)


def signer() -> MessageSigner:
    return MessageSigner(KEY)


def sequences(transport: DeadlineTransport) -> list[tuple[int | None, float]]:
    """The sequence of the watch marker of each copy published to the step, if it holds, and its delay."""
    return [
        (watch_sequence(signer(), Delivery(address=STEP, body=body, headers=headers)), delay)
        for (_, headers, delay), body in zip(transport.published, transport.bodies, strict=True)
    ]


def long_step(runs: list[str], seconds: float) -> object:
    @activity(name=STEP, timeout=30)
    async def step(ctx: ActivityContext) -> None:
        runs.append(ctx.idempotency_key)
        await asyncio.sleep(seconds)

    return step


# -- a running step, handed back -------------------------------------------------------------------------------


async def test_a_step_running_past_the_deadline_is_handed_back_once_and_runs_once() -> None:
    transport, runs = DeadlineTransport(after=0.2, lease=0.3), list[str]()
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP])
        transport.forget_published()
        worker = Worker(transport, [long_step(runs, 0.8)], security=signer())  # pyright: ignore[reportArgumentType]
        await worker.run(burst=True)
        assert await dead_letters(transport) == []

    assert len(runs) == 1
    assert worker.stats.completed_workflows == 1
    originals = [tag for address, watch, tag in transport.acks if address == STEP and not watch]
    assert len(originals) == len(set(originals)) == 1  # acked when handed back; its settling acked nothing more
    watch_copies = sequences(transport)
    assert watch_copies[0] == (0, 0.3)  # the first watch copy, signed, delayed one lease
    assert len(watch_copies) >= 2  # sent on at least once while the step still ran


async def test_a_short_step_is_not_handed_back() -> None:
    transport, runs = DeadlineTransport(after=5.0), list[str]()
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP])
        transport.forget_published()
        worker = Worker(transport, [long_step(runs, 0.01)], security=signer())  # pyright: ignore[reportArgumentType]
        await worker.run(burst=True)
    assert len(runs) == 1
    assert transport.published == []


async def test_a_delivery_waiting_for_a_slot_is_handed_back_and_runs_later() -> None:
    transport, runs = DeadlineTransport(after=0.2, lease=0.3), list[str]()
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=signer())
        ids = [await dispatcher.dispatch_workflow([STEP]) for _ in range(2)]
        transport.forget_published()
        worker = Worker(transport, [long_step(runs, 0.7)], security=signer(), concurrency=1)  # pyright: ignore[reportArgumentType]
        await worker.run(burst=True)
        assert await dead_letters(transport) == []
    assert sorted(runs) == sorted(f"{cid}:0:{STEP}" for cid in ids)  # each ran, once
    handed_back = [headers for _, headers, delay in transport.published if delay == 0]
    assert handed_back  # the second waited past the deadline behind the first, and went back to the broker
    assert worker.stats.completed_workflows == 2


# -- a watch copy ----------------------------------------------------------------------------------------------


def first_hop() -> tuple[PaigeantMessage, bytes]:
    message = PaigeantMessage.new([ActivitySpec(name=STEP)], {}, correlation_id=str(uuid.uuid4()))
    message.plan = new_plan(message, signer())
    return message, seal(message, signer(), max_bytes=1 << 20)


async def deliver(
    transport: DeadlineTransport, body: bytes, *, watch: bool = True, redelivered: bool = False
) -> Delivery:
    """The delivery of `body` on the step's queue, as a watch copy by default, as the broker's redelivery if asked."""
    await transport.publish(STEP, body, headers={WATCH_HEADER: watch_marker(signer(), body)} if watch else {})
    consumer = await transport.consume(STEP)
    delivery = await anext(consumer)
    if redelivered:
        await transport.retry_later(delivery, 0)
        delivery = await anext(consumer)
        assert delivery.redelivered
    transport.forget_published()
    return delivery


async def watched(claim: str) -> tuple[list[str], DeadlineTransport, Worker]:
    """A watch copy processed by a worker, its hop's claim as `claim` says: what ran, the broker, the worker."""
    transport, runs = DeadlineTransport(), list[str]()
    async with transport:
        worker = Worker(transport, [long_step(runs, 0.01)], security=signer())  # pyright: ignore[reportArgumentType]
        message, body = first_hop()
        digest = worker.security.authenticate(message, worker.activities[STEP].spec, body).digest
        if claim in ("running", "lapsed", "hostile"):
            lease = 0.01 if claim == "lapsed" else 60.0
            await worker.security.claim(message, digest, redelivered=False, lease=lease)
            await asyncio.sleep(0.05)
        elif claim == "settled":
            await worker.security.settled(message, digest)
        delivery = await deliver(transport, body, redelivered=claim == "hostile")
        await worker.process(delivery)
        assert await dead_letters(transport) == []
    return runs, transport, worker


async def test_a_watch_copy_of_a_running_step_is_sent_on_one_lease_later() -> None:
    runs, transport, _ = await watched("running")
    assert runs == []
    assert sequences(transport) == [(1, 0.3)]


async def test_a_watch_copy_of_a_settled_step_is_skipped() -> None:
    runs, transport, worker = await watched("settled")
    assert runs == []
    assert transport.published == []
    assert worker.stats.duplicates == 1


async def test_a_watch_copy_whose_claim_lapsed_takes_the_step_over() -> None:
    runs, _, worker = await watched("lapsed")
    assert len(runs) == 1
    assert worker.stats.completed_workflows == 1


async def test_a_watch_copy_of_a_step_nobody_claimed_runs_it() -> None:
    runs, _, _ = await watched("nothing")
    assert len(runs) == 1


async def test_attack_a_watch_header_on_a_redelivered_copy_cannot_take_over_a_live_claim() -> None:
    """Whoever can write to the broker adds the header to a copy that even comes back redelivered: it is claimed as
    a fresh copy, finds the claim live, and only produces one follow-up copy; the step does not run again."""
    runs, transport, _ = await watched("hostile")
    assert runs == []
    assert len(transport.published) == 1


# -- at start --------------------------------------------------------------------------------------------------


async def test_a_worker_without_a_shared_store_names_its_long_steps_and_the_fix(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @activity(name="quick-step", timeout=10)
    async def quick(ctx: ActivityContext) -> None: ...

    transport, runs = DeadlineTransport(after=10.0), list[str]()
    worker = Worker(transport, [long_step(runs, 0), quick], security=signer())  # pyright: ignore[reportArgumentType]
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        worker._long_steps.start(worker.activities)  # pyright: ignore[reportPrivateUsage]
    assert [record.getMessage() for record in caplog.records] == [long_steps_warning([STEP], 10.0)]
    warning = caplog.records[0].getMessage()
    assert "steps long-step may run longer than 10s" in warning
    assert "PAIGEANT_SHARED_STORE_URL=redis://" in warning
    assert "quick-step" not in warning

    caplog.clear()
    shared = MessageSigner(KEY, replay_cache=RedisReplayCache(RedisTransport(REDIS_URL)))
    worker = Worker(transport, [long_step(runs, 0)], security=shared)  # pyright: ignore[reportArgumentType]
    worker._long_steps.start(worker.activities)  # pyright: ignore[reportPrivateUsage]
    assert caplog.records == []


# -- RabbitMQ's timeout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("announced", "version", "own_timeout"),
    [
        (b"3.10.8", (3, 10, 8), False),
        ("3.11.14", (3, 11, 14), False),
        (b"3.11.15", (3, 11, 15), True),
        (b"3.12.0", (3, 12, 0), True),
        (b"4.1.0-rc.1", (4, 1, 0), True),
        (b"unknown", None, False),
        (None, None, False),
    ],
)
def test_the_broker_version_decides_whether_a_consumer_asks_for_its_own_timeout(
    announced: object, version: tuple[int, int, int] | None, own_timeout: bool
) -> None:
    properties = {"version": announced} if announced is not None else {}
    assert broker_version(properties) == version
    assert per_consumer_timeout(version) is own_timeout


def test_on_rabbitmq_3_10_deliveries_are_handed_back_at_half_the_brokers_timeout() -> None:
    transport = RabbitMQTransport(consumer_timeout=600, lease=20)
    transport.server_version = (3, 10, 8)
    assert transport.detach_after(longest_step=3600) == 300
    assert transport.consume_arguments() is None
    assert transport.lease == 20
    assert RabbitMQTransport(consumer_timeout=2).detach_after(10) == 3.0  # never sooner than a few seconds


def test_on_a_newer_rabbitmq_a_consumer_asks_for_a_timeout_past_its_longest_step() -> None:
    transport = RabbitMQTransport(consumer_timeout=600)
    transport.server_version = (3, 12, 1)
    after = transport.detach_after(longest_step=3600)
    assert transport.consume_arguments() == {"x-consumer-timeout": (2 * 3600 + 60) * 1000}
    assert after == 3630  # past the longest step: no running step is handed back


def test_the_timeout_and_the_lease_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT", "900")
    monkeypatch.setenv("PAIGEANT_STEP_LEASE", "15")
    settings = Settings.from_env()
    assert (settings.rabbitmq_consumer_timeout, settings.step_lease) == (900, 15)
    transport = RabbitMQTransport()
    assert (transport.consumer_timeout, transport.lease) == (900, 15)
    with pytest.raises(UserError, match="consumer_timeout must be a positive number"):
        RabbitMQTransport(consumer_timeout=0)
    monkeypatch.setenv("PAIGEANT_STEP_LEASE", "soon")
    with pytest.raises(UserError, match="PAIGEANT_STEP_LEASE='soon' is not a positive number of seconds"):
        Settings.from_env()


# -- renewing a claim ------------------------------------------------------------------------------------------


async def renewals(cache: InMemoryReplayCache | RedisReplayCache) -> list[object]:
    found: list[object] = []
    await cache.claim("m-1", "d-1", sent_at=0, redelivered=False, lease=0.05, ttl=60)
    found.append(await cache.renew("m-1", "d-1", 60))
    await asyncio.sleep(0.1)
    found.append(await cache.claim("m-1", "d-1", sent_at=0, redelivered=False, lease=1, ttl=60))  # still live
    found.append(await cache.renew("m-1", "other", 60))
    found.append(await cache.renew("m-2", "d-1", 60))
    await cache.settle("m-1", "d-1", 60)
    found.append(await cache.renew("m-1", "d-1", 60))
    return found


async def test_a_renewed_claim_stays_running_until_settled() -> None:
    assert await renewals(InMemoryReplayCache()) == ["renewed", "running", "gone", "gone", "gone"]


@pytest.mark.redis
async def test_a_renewed_claim_stays_running_until_settled_in_redis() -> None:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as store:
            assert await renewals(RedisReplayCache(store)) == ["renewed", "running", "gone", "gone", "gone"]
    finally:
        await delete_redis_namespace(namespace)


async def test_a_detached_hop_that_faults_unsealable_still_leaves_its_copy_on_the_dead_letter_queue() -> None:
    from paigeant_ai._hop import Hop, admit
    from paigeant_ai._long_steps import hand_over

    transport = DeadlineTransport()
    async with transport:
        worker = Worker(transport, [long_step([], 0)], security=signer())  # pyright: ignore[reportArgumentType]
        _, body = first_hop()
        delivery = await deliver(transport, body, watch=False)
        hop = admit(delivery, worker.activities, 1 << 20)
        assert isinstance(hop, Hop)
        await transport.ack(delivery)  # handed back while it ran
        hop.detached = True
        await hand_over(transport, hop, "could not seal the fault's copy")
        letters = await dead_letters(transport)
        assert [letter.body for letter in letters] == [body]
        assert len([ack for ack in transport.acks if ack[0] == STEP]) == 1
        assert await transport.pending(DEAD_LETTER) == 0


class BrokenDedupe(InMemoryDedupeStore):
    """A dedupe store that fails as a step is recorded done: a failure of the worker itself."""

    async def mark_done(self, key: str) -> None:
        raise RuntimeError("the dedupe store is down")


async def test_a_handed_back_step_the_worker_fails_on_is_dead_lettered_and_not_run_again() -> None:
    transport, runs = DeadlineTransport(after=0.2, lease=0.3), list[str]()
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP])
        worker = Worker(transport, [long_step(runs, 0.5)], security=signer(), dedupe=BrokenDedupe())  # pyright: ignore[reportArgumentType]
        await worker.run(burst=True)
        letters = await dead_letters(transport)
    assert len(runs) == 1  # its watch copies found it settled
    assert [letter.headers[REASON_HEADER] for letter in letters] == [
        "the worker failed on this message: RuntimeError: the dedupe store is down"
    ]


async def test_an_unsigned_worker_hands_nothing_back_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    worker = Worker(DeadlineTransport(after=10.0), [long_step([], 0)], security=MessageSigner(unsigned=True))  # pyright: ignore[reportArgumentType]
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.worker"):
        worker._long_steps.start(worker.activities)  # pyright: ignore[reportPrivateUsage]
    assert worker._long_steps.detach_after is None  # pyright: ignore[reportPrivateUsage]
    assert "runs unsigned, without claims: steps long-step still running after 10s are not handed back" in caplog.text


# -- a hand-back that fails ------------------------------------------------------------------------------------


class FailingHandBack(DeadlineTransport):
    """A broker on which the first watch copy is not confirmed (`fail="publish"`), or the first ack of a delivery
    handed back fails (`fail="ack"`); it records, for each ack of the step's original delivery, whether the step
    was still running then."""

    def __init__(self, fail: str, running: asyncio.Event) -> None:
        super().__init__(after=0.2, lease=0.3)
        self.fail, self.failed, self.running = fail, False, running
        self.acked_while_running: list[bool] = []

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        if self.fail == "publish" and address == STEP and WATCH_HEADER in (headers or {}) and not self.failed:
            self.failed = True
            raise TransportError("publish not confirmed")
        await super().publish(address, body, headers=headers, delay=delay)

    async def ack(self, delivery: Delivery) -> None:
        if delivery.address == STEP and WATCH_HEADER not in delivery.headers:
            watched = any(WATCH_HEADER in headers for _, headers, _ in self.published)
            if self.fail == "ack" and watched and not self.failed:
                self.failed = True
                raise TransportError("channel closed")
            self.acked_while_running.append(self.running.is_set())
        await super().ack(delivery)


def flagged_step(runs: list[str], seconds: float, running: asyncio.Event) -> object:
    @activity(name=STEP, timeout=30)
    async def step(ctx: ActivityContext) -> None:
        runs.append(ctx.idempotency_key)
        running.set()
        await asyncio.sleep(seconds)
        running.clear()

    return step


async def test_a_watch_copy_not_confirmed_is_published_again_and_the_delivery_handed_back() -> None:
    running, runs = asyncio.Event(), list[str]()
    transport = FailingHandBack("publish", running)
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP])
        transport.forget_published()
        worker = Worker(transport, [flagged_step(runs, 1.0, running)], security=signer())  # pyright: ignore[reportArgumentType]
        await worker.run(burst=True)
        assert await dead_letters(transport) == []
    assert transport.failed
    assert len(runs) == 1
    assert transport.acked_while_running == [True]  # handed back while it ran, once the copy was confirmed


async def test_a_failed_ack_after_the_watch_copy_still_renews_the_claim_and_the_step_runs_once() -> None:
    running, runs = asyncio.Event(), list[str]()
    transport = FailingHandBack("ack", running)
    cache, dedupe = InMemoryReplayCache(), InMemoryDedupeStore()
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP])
        transport.forget_published()
        workers = [
            Worker(
                transport,
                [flagged_step(runs, 1.2, running)],  # pyright: ignore[reportArgumentType]
                security=MessageSigner(KEY, replay_cache=cache),
                dedupe=dedupe,
                concurrency=1,
            )
            for _ in range(2)
        ]
        await asyncio.gather(*(worker.run(burst=True) for worker in workers))
        assert await dead_letters(transport) == []
    assert transport.failed
    assert len(runs) == 1  # the claim was renewed: the watch copy, on the other replica, did not take it over
    assert sum(worker.stats.completed_workflows for worker in workers) == 1


async def redelivered_claims(cache: InMemoryReplayCache | RedisReplayCache) -> list[object]:
    """What the broker's redelivery finds: a running claim (taken over), then one its worker renews (not)."""
    claim = functools.partial(cache.claim, "m-1", "d-1", sent_at=0, lease=60, ttl=60)
    found: list[object] = [await claim(redelivered=False), await claim(redelivered=True)]
    found.append(await cache.renew("m-1", "d-1", 60))  # its worker handed the delivery back and renews the claim
    found.append(await claim(redelivered=True))
    return found


async def test_the_brokers_redelivery_does_not_take_over_a_renewed_claim() -> None:
    assert await redelivered_claims(InMemoryReplayCache()) == ["claimed", "claimed", "renewed", "running"]


@pytest.mark.redis
async def test_the_brokers_redelivery_does_not_take_over_a_renewed_claim_in_redis() -> None:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as store:
            assert await redelivered_claims(RedisReplayCache(store)) == ["claimed", "claimed", "renewed", "running"]
    finally:
        await delete_redis_namespace(namespace)


class SlotHandBackFails(DeadlineTransport):
    """A broker that does not confirm the first publish of a delivery handed back while it waits for a slot."""

    armed, failed = False, False

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        if self.armed and address == STEP and delay == 0 and not self.failed:
            self.failed = True
            raise TransportError("broker unreachable")
        await super().publish(address, body, headers=headers, delay=delay)


async def test_a_delivery_waiting_for_a_slot_that_cannot_be_handed_back_waits_on_and_runs() -> None:
    transport, runs = SlotHandBackFails(after=0.2, lease=0.3), list[str]()
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=signer())
        ids = [await dispatcher.dispatch_workflow([STEP]) for _ in range(2)]
        transport.armed = True
        worker = Worker(transport, [long_step(runs, 0.5)], security=signer(), concurrency=1)  # pyright: ignore[reportArgumentType]
        async with asyncio.timeout(30):  # a delivery neither run nor handed back would hold the queue forever
            await worker.run(burst=True)
        assert await dead_letters(transport) == []
        assert await transport.pending(STEP) == 0
    assert transport.failed
    assert sorted(runs) == sorted(f"{cid}:0:{STEP}" for cid in ids)
    assert worker.stats.completed_workflows == 2


class AckedWhen(DeadlineTransport):
    """A broker that records, for each ack of a broker's redelivery, whether the step was still running then."""

    def __init__(self, running: asyncio.Event) -> None:
        super().__init__(after=0.2, lease=0.3)
        self.running = running
        self.redelivery_acked_while_running: list[bool] = []

    async def ack(self, delivery: Delivery) -> None:
        if delivery.redelivered and WATCH_HEADER not in delivery.headers:
            self.redelivery_acked_while_running.append(self.running.is_set())
        await super().ack(delivery)


async def test_a_redelivery_waiting_for_its_own_step_running_here_is_handed_back_before_the_deadline() -> None:
    running, runs = asyncio.Event(), list[str]()
    transport = AckedWhen(running)
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP])
        consumer = await transport.consume(STEP, prefetch=1)
        delivery = await anext(consumer)
        await transport.publish(STEP, delivery.body)  # a second copy, which runs ...
        await transport.retry_later(delivery, 0)  # ... and the first comes back as the broker's redelivery
        await consumer.aclose()
        worker = Worker(transport, [flagged_step(runs, 1.0, running)], security=signer(), concurrency=2)  # pyright: ignore[reportArgumentType]
        await worker.run(burst=True)
        assert await dead_letters(transport) == []
    assert len(runs) == 1
    assert transport.redelivery_acked_while_running == [True]  # handed back while its copy ran, not held to the end


async def claim_taken_over(cache: InMemoryReplayCache | RedisReplayCache) -> list[object]:
    """What a holder finds renewing a claim the broker's redelivery took over, and what the new holder finds."""
    claim = functools.partial(cache.claim, "m-1", "d-1", sent_at=0, lease=60, ttl=60)
    found: list[object] = [await claim(redelivered=False, holder="first")]
    found.append(await claim(redelivered=True, holder="second"))  # the broker thought the first worker dead
    found.append(await cache.renew("m-1", "d-1", 60, "first"))
    found.append(await cache.renew("m-1", "d-1", 60, "second"))
    return found


async def test_a_claim_taken_over_is_renewed_only_by_its_new_holder() -> None:
    assert await claim_taken_over(InMemoryReplayCache()) == ["claimed", "claimed", "taken", "renewed"]


@pytest.mark.redis
async def test_a_claim_taken_over_is_renewed_only_by_its_new_holder_in_redis() -> None:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as store:
            assert await claim_taken_over(RedisReplayCache(store)) == ["claimed", "claimed", "taken", "renewed"]
    finally:
        await delete_redis_namespace(namespace)


# -- the watch marker ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", ["1", "0 not-a-signature", "forged by another key", "genuine for other bytes"])
async def test_attack_a_replay_of_a_settled_hop_with_a_watch_header_that_does_not_hold_is_refused(marker: str) -> None:
    transport, runs = DeadlineTransport(after=5.0, lease=0.3), list[str]()
    async with transport:
        worker = Worker(transport, [long_step(runs, 0.0)], security=signer())  # pyright: ignore[reportArgumentType]
        _, body = first_hop()
        await transport.publish(STEP, body)
        await worker.run(burst=True)
        if marker == "forged by another key":
            marker = watch_marker(MessageSigner(generate_key("intruder")), body)
        elif marker == "genuine for other bytes":
            marker = watch_marker(signer(), first_hop()[1])
        await transport.publish(STEP, body, headers={WATCH_HEADER: marker})  # the replay
        await worker.run(burst=True)
        letters = await dead_letters(transport)
    assert len(runs) == 1
    assert worker.stats.rejected == 1
    assert len(letters) == 1
    assert letters[0].headers[REASON_HEADER].startswith("security check failed: replayed")


async def test_attack_copies_of_a_running_hop_without_a_genuine_watch_marker_are_refused_not_sent_on() -> None:
    transport, runs = DeadlineTransport(after=100.0, lease=0.3), list[str]()
    running = asyncio.Event()
    async with transport:
        worker = Worker(transport, [flagged_step(runs, 1.0, running)], security=signer(), concurrency=2)  # pyright: ignore[reportArgumentType]
        _, body = first_hop()
        await transport.publish(STEP, body)
        task = asyncio.create_task(worker.run(burst=True))
        await running.wait()
        for _ in range(5):
            await transport.publish(STEP, body, headers={WATCH_HEADER: "1"})
        transport.forget_published()
        await task
        letters = await dead_letters(transport)
    assert len(runs) == 1
    assert transport.published == []  # none sent on
    assert len(letters) == 5
    assert all(letter.headers[REASON_HEADER].startswith("security check failed: replayed") for letter in letters)


class SuccessorFailsOnce(DeadlineTransport):
    """A broker that fails the first publish of a step's successor."""

    failed = False

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        if address == "next-step" and not self.failed:
            self.failed = True
            raise TransportError("broker unreachable")
        await super().publish(address, body, headers=headers, delay=delay)


async def test_a_handed_back_step_whose_successor_cannot_be_published_says_its_watch_copy_runs_it_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport, runs = SuccessorFailsOnce(after=0.2, lease=0.3), list[str]()
    async with transport:
        await WorkflowDispatcher(transport, security=signer()).dispatch_workflow([STEP, "next-step"])
        worker = Worker(transport, [long_step(runs, 0.5)], security=signer())  # pyright: ignore[reportArgumentType]
        with caplog.at_level(logging.ERROR, logger="paigeant_ai.worker"):
            async with asyncio.timeout(30):
                await worker.run(burst=True)
    assert transport.failed
    assert "its watch copy runs the step again once its claim lapses" in caplog.text
    assert "it will be delivered again" not in caplog.text
    assert len(runs) == 2  # as it says
