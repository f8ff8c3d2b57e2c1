"""The cancel board, one contract on all three transports (the real brokers), and what each does alone.

"Another process" is another transport object on the same broker and namespace; in memory it is the same object,
since an in-memory board is this process's alone.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import pytest
import redis.asyncio as aioredis

from paigeant_ai import InMemoryTransport
from paigeant_ai.exceptions import UserError
from paigeant_ai.transports.base import MAX_CANCEL_RECORD_BYTES, MAX_CANCEL_RECORDS, CancelBoard, Cancellations
from paigeant_ai.transports.rabbitmq import RabbitMQTransport
from paigeant_ai.transports.rabbitmq._cancel_board import FOR_HEADER, UNTIL_HEADER
from paigeant_ai.transports.redis import RedisTransport

from .brokers import (
    RABBITMQ_URL,
    REDIS_URL,
    delete_queues,
    delete_redis_namespace,
    require_rabbitmq,
    require_rabbitmqctl,
    require_redis,
)

KINDS = [
    "inmemory",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
]
TTL = 600.0


def cid() -> str:
    return f"wf-{uuid.uuid4().hex}"


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> bool:
    """Poll `check` until it holds or `within` seconds pass (a deadline for a slow machine, not a speed test)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


class Brokers:
    """Connected transports of one kind in one namespace, disconnected and cleaned up after the test."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
        self.made: list[Any] = []
        self._memory: InMemoryTransport | None = None

    async def transport(self, *, connect: bool = True) -> Any:
        """A transport on this namespace: in memory always the same one; on a broker a new object each call."""
        if self.kind == "inmemory":
            if self._memory is None:
                self._memory = InMemoryTransport(namespace=self.namespace)
                self.made.append(self._memory)
            made: Any = self._memory
        elif self.kind == "redis":
            made = RedisTransport(REDIS_URL, namespace=self.namespace)
            self.made.append(made)
        else:
            made = RabbitMQTransport(
                RABBITMQ_URL,
                namespace=self.namespace,
                reconnect_interval=0.2,
                timeout=15.0,
                connection_name=f"{self.namespace}-{len(self.made)}",
            )
            self.made.append(made)
        if connect:
            await made.connect()
        return made

    async def board(self) -> CancelBoard:
        transport = await self.transport()
        assert isinstance(transport, Cancellations)
        board = transport.cancel_board()
        await board.open()
        return board

    async def clean(self) -> None:
        for transport in self.made:
            await transport.disconnect()
        if self.kind == "redis":
            await delete_redis_namespace(self.namespace)
        elif self.kind == "rabbitmq":
            await delete_queues({f"{self.namespace}.@cancellations"})


@pytest.fixture(params=KINDS)
async def brokers(request: pytest.FixtureRequest) -> AsyncIterator[Brokers]:
    if request.param == "redis":
        require_redis()
    elif request.param == "rabbitmq":
        require_rabbitmq()
    made = Brokers(request.param)
    yield made
    await made.clean()


# -- the contract ----------------------------------------------------------------------------------------------


async def test_every_transport_offers_a_board(brokers: Brokers) -> None:
    transport = await brokers.transport()
    assert isinstance(transport, Cancellations)
    assert isinstance(transport.cancel_board(), CancelBoard)
    assert transport.cancel_board() is not transport.cancel_board()


async def test_a_post_is_read_here_and_by_another_process(brokers: Brokers) -> None:
    here, elsewhere = await brokers.board(), await brokers.board()
    workflow = cid()
    assert await here.records(workflow) == []
    await here.post(workflow, b"record-1", ttl=TTL)
    assert await here.records(workflow) == [b"record-1"]  # at once, in the process that posted
    assert await eventually(lambda: _has(elsewhere, workflow, [b"record-1"]))
    assert await elsewhere.records(cid()) == []


async def test_a_board_opened_after_the_post_sees_it(brokers: Brokers) -> None:
    workflow = cid()
    await (await brokers.board()).post(workflow, b"posted-early", ttl=TTL)
    late = await brokers.transport(connect=False)  # a worker started after the cancel
    await late.connect()
    board = late.cancel_board()
    await board.open()
    assert await board.records(workflow) == [b"posted-early"]  # no waiting: opening caught up
    assert await board.cancelled_among([workflow, cid()]) == {workflow: [b"posted-early"]}


async def test_cancelled_among_many_returns_exactly_the_cancelled(brokers: Brokers) -> None:
    board = await brokers.board()
    ids = [cid() for _ in range(500)]
    cancelled = {ids[3]: [b"a"], ids[250]: [b"b", b"c"], ids[499]: [b"d"]}
    for workflow, records in cancelled.items():
        for record in records:
            await board.post(workflow, record, ttl=TTL)
    assert await board.cancelled_among(ids) == cancelled
    assert await (await brokers.board()).cancelled_among(ids) == cancelled
    assert await board.cancelled_among([]) == {}


async def test_records_are_kept_in_order_once_each_up_to_the_cap(
    brokers: Brokers, caplog: pytest.LogCaptureFixture
) -> None:
    board = await brokers.board()
    workflow = cid()
    for n in [0, 1, 0, 2, 1]:
        await board.post(workflow, f"record-{n}".encode(), ttl=TTL)
    assert await board.records(workflow) == [b"record-0", b"record-1", b"record-2"]
    for n in range(3, MAX_CANCEL_RECORDS):
        await board.post(workflow, f"record-{n}".encode(), ttl=TTL)
    with caplog.at_level(logging.WARNING, logger="paigeant_ai.transports"):
        await board.post(workflow, b"one-too-many", ttl=TTL)
    assert "MAX_CANCEL_RECORDS" in caplog.text
    expected = [f"record-{n}".encode() for n in range(MAX_CANCEL_RECORDS)]
    assert await board.records(workflow) == expected
    assert await eventually(lambda: _has_among(brokers, workflow, expected))


async def test_a_record_over_the_limit_or_a_bad_id_is_refused(brokers: Brokers) -> None:
    board = await brokers.board()
    workflow = cid()
    await board.post(workflow, b"x" * MAX_CANCEL_RECORD_BYTES, ttl=TTL)
    with pytest.raises(UserError, match=f"at most {MAX_CANCEL_RECORD_BYTES} bytes"):
        await board.post(workflow, b"x" * (MAX_CANCEL_RECORD_BYTES + 1), ttl=TTL)
    for bad in ["", "w" * 201]:
        with pytest.raises(UserError, match="1 to 200 characters"):
            await board.post(bad, b"record", ttl=TTL)
        assert await board.records(bad) == []
    with pytest.raises(UserError, match="positive number of seconds"):
        await board.post(workflow, b"record", ttl=0)
    assert await board.records(workflow) == [b"x" * MAX_CANCEL_RECORD_BYTES]
    assert await board.cancelled_among(["w" * 201, workflow]) == {workflow: [b"x" * MAX_CANCEL_RECORD_BYTES]}


async def test_a_record_is_gone_after_its_ttl(brokers: Brokers) -> None:
    board, other = await brokers.board(), await brokers.board()
    short, long = cid(), cid()
    await board.post(short, b"brief", ttl=1.0)
    await board.post(long, b"lasting", ttl=TTL)
    assert await board.records(short) == [b"brief"]
    await asyncio.sleep(1.1)
    assert await eventually(lambda: _has(board, short, []), within=5.0)
    assert await eventually(lambda: _has(other, short, []), within=5.0)
    assert await board.cancelled_among([short, long]) == {long: [b"lasting"]}
    assert await eventually(lambda: _has(other, long, [b"lasting"]))


async def _has(board: CancelBoard, workflow: str, records: list[bytes]) -> bool:
    return await board.records(workflow) == records


async def _has_among(brokers: Brokers, workflow: str, records: list[bytes]) -> bool:
    return await (await brokers.board()).cancelled_among([workflow]) == {workflow: records}


# -- Redis -----------------------------------------------------------------------------------------------------


@pytest.fixture
async def redis_brokers() -> AsyncIterator[Brokers]:
    require_redis()
    made = Brokers("redis")
    yield made
    await made.clean()


@pytest.mark.redis
async def test_redis_reads_many_ids_in_one_command(redis_brokers: Brokers, monkeypatch: pytest.MonkeyPatch) -> None:
    transport = await redis_brokers.transport()
    board = transport.cancel_board()
    ids = [cid() for _ in range(500)]
    for workflow in ids[:3]:
        await board.post(workflow, b"record", ttl=TTL)
    await board.records(ids[0])  # the read script is loaded
    client = transport._client
    sent: list[Any] = []
    execute = client.execute_command

    async def counting(*args: Any, **options: Any) -> Any:
        sent.append(args[0])
        return await execute(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    assert await board.cancelled_among(ids) == {workflow: [b"record"] for workflow in ids[:3]}
    assert sent == ["EVALSHA"]


@pytest.mark.redis
async def test_redis_keeps_the_key_as_long_as_its_longest_record(redis_brokers: Brokers) -> None:
    transport = await redis_brokers.transport()
    board = transport.cancel_board()
    workflow = cid()
    key = board.key(workflow)
    await board.post(workflow, b"long", ttl=TTL)
    await board.post(workflow, b"short", ttl=1.0)  # never shortens the expiry
    assert await transport.client.pttl(key) > (TTL - 60) * 1000
    await board.post(workflow, b"long", ttl=2 * TTL)  # the same record again extends it
    assert await transport.client.pttl(key) > (2 * TTL - 60) * 1000
    assert await board.records(workflow) == [b"long", b"short"]


@pytest.mark.redis
async def test_redis_foreign_data_in_a_key_never_breaks_the_board(redis_brokers: Brokers) -> None:
    transport = await redis_brokers.transport()
    board = transport.cancel_board()
    wrong_type, garbage = cid(), cid()
    raw = aioredis.Redis.from_url(REDIS_URL)
    try:
        await raw.set(board.key(wrong_type), b"not a list")
        await raw.execute_command("RPUSH", board.key(garbage), b"\xff\x00garbage")
    finally:
        await raw.aclose()
    assert await board.records(wrong_type) == []
    assert await board.cancelled_among([wrong_type, garbage]) == {garbage: [b"\xff\x00garbage"]}
    await board.post(garbage, b"genuine", ttl=TTL)  # garbage first does not keep a genuine record out
    await board.post(wrong_type, b"genuine", ttl=TTL)  # the foreign value is replaced
    assert await board.cancelled_among([wrong_type, garbage]) == {
        wrong_type: [b"genuine"],
        garbage: [b"\xff\x00garbage", b"genuine"],
    }


# -- RabbitMQ --------------------------------------------------------------------------------------------------


@pytest.fixture
async def rabbitmq_brokers() -> AsyncIterator[Brokers]:
    require_rabbitmq()
    made = Brokers("rabbitmq")
    yield made
    await made.clean()


@pytest.mark.rabbitmq
async def test_rabbitmq_a_post_reaches_a_board_open_already(rabbitmq_brokers: Brokers) -> None:
    reading = await rabbitmq_brokers.board()
    posting = await rabbitmq_brokers.transport()
    workflow = cid()
    await posting.cancel_board().post(workflow, b"from-elsewhere", ttl=TTL)  # posting without opening a board
    assert await eventually(lambda: _has(reading, workflow, [b"from-elsewhere"]))


@pytest.mark.rabbitmq
async def test_rabbitmq_boards_of_one_transport_share_one_reader(rabbitmq_brokers: Brokers) -> None:
    transport = await rabbitmq_brokers.transport()
    first, second = transport.cancel_board(), transport.cancel_board()
    await first.open()
    await second.open()
    assert transport.cancel_reader() is transport.cancel_reader()
    workflow = cid()
    await first.post(workflow, b"shared", ttl=TTL)
    assert await second.records(workflow) == [b"shared"]
    await second.close()
    assert await first.records(workflow) == [b"shared"]
    await transport.disconnect()
    await transport.connect()
    assert await transport.cancel_board().records(workflow) == [b"shared"]  # a new reader, caught up again


@pytest.mark.rabbitmq
async def test_rabbitmq_refuses_a_ttl_longer_than_the_stream_keeps(rabbitmq_brokers: Brokers) -> None:
    board = await rabbitmq_brokers.board()
    with pytest.raises(UserError, match="at most 691200s"):
        await board.post(cid(), b"record", ttl=9 * 24 * 3600.0)


@pytest.mark.rabbitmq
async def test_rabbitmq_foreign_messages_on_the_stream_are_ignored_or_read_as_bytes(
    rabbitmq_brokers: Brokers, caplog: pytest.LogCaptureFixture
) -> None:
    board = await rabbitmq_brokers.board()
    tagged = cid()
    connection = await aio_pika.connect(RABBITMQ_URL)
    async with connection:
        channel = await connection.channel()
        stream = f"{rabbitmq_brokers.namespace}.@cancellations"
        for message in [
            aio_pika.Message(b"no headers at all"),
            aio_pika.Message(b"bad expiry", headers={FOR_HEADER: tagged, UNTIL_HEADER: "soon"}),
            aio_pika.Message(b"\xff\x00garbage", headers={FOR_HEADER: tagged, UNTIL_HEADER: "4102444800"}),
        ]:
            await channel.default_exchange.publish(message, routing_key=stream)
    with caplog.at_level(logging.DEBUG, logger="paigeant_ai.transports.rabbitmq"):
        late = await rabbitmq_brokers.board()
    assert "no cancel record" in caplog.text
    assert await late.records(tagged) == [b"\xff\x00garbage"]
    await late.post(tagged, b"genuine", ttl=TTL)
    assert await late.records(tagged) == [b"\xff\x00garbage", b"genuine"]
    assert await eventually(lambda: _has(board, tagged, [b"\xff\x00garbage", b"genuine"]))


@pytest.mark.rabbitmq
async def test_rabbitmq_the_reader_keeps_reading_after_the_connection_is_lost(rabbitmq_brokers: Brokers) -> None:
    require_rabbitmqctl()
    from .test_transport_rabbitmq import force_close

    reading = await rabbitmq_brokers.board()
    transport = rabbitmq_brokers.made[-1]
    before, after = cid(), cid()
    posting = (await rabbitmq_brokers.transport()).cancel_board()
    await posting.post(before, b"before", ttl=TTL)
    assert await eventually(lambda: _has(reading, before, [b"before"]))
    reader = transport.cancel_reader()
    subscribed = reader._tag
    await force_close(transport)
    await posting.post(after, b"after", ttl=TTL)
    assert await eventually(lambda: _has(reading, after, [b"after"]), within=30.0)
    assert reader._tag not in (None, subscribed)  # it subscribed again on the restored channel
    assert await reading.records(before) == [b"before"]  # read again from the first entry, kept once
