"""The contract every transport keeps. Each transport's test module subclasses `TransportContract`
and provides the `transport` fixture (connected, in a namespace of its own)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from paigeant_ai import ActivitySpec, PaigeantMessage
from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports import Consumer, Delivery, Transport
from paigeant_ai.transports.base import REASON_HEADER, SOURCE_HEADER

WAIT = 10.0


async def receive(consumer: Consumer, within: float = WAIT) -> Delivery:
    return await asyncio.wait_for(anext(consumer), within)


async def receive_nothing(consumer: Consumer, within: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(anext(consumer), within)


def address() -> str:
    return f"contract-{uuid.uuid4().hex[:10]}"


class TransportContract:
    """Subclasses provide `transport` and, for `test_requires_connect`, `new_transport`."""

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:  # pragma: no cover - overridden
        raise NotImplementedError
        yield  # noqa: PT022 - subclasses yield a connected transport and clean up after it

    def new_transport(self) -> Transport:  # pragma: no cover - overridden
        raise NotImplementedError

    async def test_publish_then_consume_keeps_body_and_headers(self, transport: Transport) -> None:
        where = address()
        body = b'{"binary": "\\u00e9"}\x00\xff'
        await transport.publish(where, body, headers={"traceparent": "00-abc-def-01", "x-name": "café"})
        async with await transport.consume(where) as consumer:
            delivery = await receive(consumer)
            assert delivery.body == body
            assert delivery.headers["traceparent"] == "00-abc-def-01"
            assert delivery.headers["x-name"] == "café"
            assert delivery.address == where
            assert delivery.delivery_count == 1
            assert not delivery.redelivered
            await transport.ack(delivery)

    async def test_a_message_arrives_as_the_bytes_it_was_published_as(self, transport: Transport) -> None:
        where = address()
        message = PaigeantMessage.new([ActivitySpec(name=where)], {"n": 1})
        await transport.publish(where, message.to_json())
        async with await transport.consume(where) as consumer:
            delivery = await receive(consumer)
            assert PaigeantMessage.from_json(delivery.body) == message
            await transport.ack(delivery)

    async def test_one_consumer_receives_in_publish_order(self, transport: Transport) -> None:
        where = address()
        for i in range(5):
            await transport.publish(where, str(i).encode())
        async with await transport.consume(where, prefetch=10) as consumer:
            received = [await receive(consumer) for _ in range(5)]
            assert [d.body for d in received] == [b"0", b"1", b"2", b"3", b"4"]
            for delivery in received:
                await transport.ack(delivery)

    async def test_acked_is_never_delivered_again(self, transport: Transport) -> None:
        where = address()
        await transport.publish(where, b"once")
        async with await transport.consume(where) as consumer:
            await transport.ack(await receive(consumer))
        async with await transport.consume(where) as consumer:
            await receive_nothing(consumer)
        assert await transport.pending(where) == 0

    async def test_unacked_is_redelivered_when_the_consumer_closes(self, transport: Transport) -> None:
        where = address()
        await transport.publish(where, b"work")
        consumer = await transport.consume(where)
        await receive(consumer)
        await consumer.aclose()
        async with await transport.consume(where) as again:
            second = await receive(again)
            assert second.body == b"work"
            assert second.delivery_count >= 2
            assert second.redelivered
            await transport.ack(second)

    async def test_prefetch_bounds_unacked_deliveries(self, transport: Transport) -> None:
        where = address()
        for i in range(4):
            await transport.publish(where, str(i).encode())
        async with await transport.consume(where, prefetch=2) as consumer:
            first = await receive(consumer)
            second = await receive(consumer)
            await receive_nothing(consumer)
            await transport.ack(first)
            third = await receive(consumer)
            assert [first.body, second.body, third.body] == [b"0", b"1", b"2"]
            await transport.ack(second)
            await transport.ack(third)
            await transport.ack(await receive(consumer))

    async def test_competing_consumers_share_the_work(self, transport: Transport) -> None:
        where = address()
        bodies = {str(i).encode() for i in range(20)}
        for body in sorted(bodies):
            await transport.publish(where, body)
        seen: list[bytes] = []

        async def drain(consumer: Consumer) -> None:
            while True:
                try:
                    delivery = await receive(consumer, within=1.0)
                except TimeoutError:
                    return
                seen.append(delivery.body)
                await asyncio.sleep(0.01)
                await transport.ack(delivery)

        async with (
            await transport.consume(where, prefetch=1) as a,
            await transport.consume(where, prefetch=1) as b,
        ):
            await asyncio.gather(drain(a), drain(b))
        assert sorted(seen) == sorted(bodies)

    async def test_delayed_publish_appears_after_the_delay(self, transport: Transport) -> None:
        where = address()
        await transport.publish(where, b"later", delay=1.0)
        assert await transport.pending(where) == 1
        async with await transport.consume(where) as consumer:
            await receive_nothing(consumer, within=0.3)
            delivery = await receive(consumer)
            assert delivery.body == b"later"
            await transport.ack(delivery)

    async def test_retry_later_delivers_the_same_message_again(self, transport: Transport) -> None:
        where = address()
        await transport.publish(where, b"flaky", headers={"k": "v"})
        async with await transport.consume(where) as consumer:
            first = await receive(consumer)
            await transport.retry_later(first, 0.5)
            again = await receive(consumer)
            assert again.body == b"flaky"
            assert again.headers["k"] == "v"
            await transport.ack(again)
        assert await transport.pending(where) == 0

    async def test_a_delivery_given_back_comes_again_at_once_as_a_redelivery(self, transport: Transport) -> None:
        where = address()
        await transport.publish(where, b"unsettled", headers={"k": "v"})
        async with await transport.consume(where) as consumer:
            first = await receive(consumer)
            assert not first.redelivered
            await transport.give_back(first)
            again = await receive(consumer)
            assert (again.body, again.headers["k"], again.redelivered) == (b"unsettled", "v", True)
            await transport.give_back(first)  # given back already: nothing more happens
            await transport.ack(again)
            await receive_nothing(consumer)
        assert await transport.pending(where) == 0

    async def test_dead_letter_keeps_the_reason_and_settles(self, transport: Transport) -> None:
        where = address()
        await transport.publish(where, b"poison", headers={"k": "v"})
        async with await transport.consume(where) as consumer:
            await transport.dead_letter(await receive(consumer), "bad input: not JSON")
            await receive_nothing(consumer)
        async with await transport.consume("dead-letter") as dead:
            while True:
                letter = await receive(dead)
                await transport.ack(letter)
                if letter.headers.get(SOURCE_HEADER) == where:
                    break
        assert letter.body == b"poison"
        assert letter.headers[REASON_HEADER] == "bad input: not JSON"
        assert letter.headers["k"] == "v"
        assert await transport.pending(where) == 0

    async def test_pending_counts_waiting_messages(self, transport: Transport) -> None:
        where = address()
        assert await transport.pending(where) == 0
        await transport.publish(where, b"a")
        await transport.publish(where, b"b")
        assert await transport.pending(where) == 2
        async with await transport.consume(where) as consumer:
            for _ in range(2):
                await transport.ack(await receive(consumer))
        assert await transport.pending(where) == 0

    async def test_requires_connect(self) -> None:
        transport = self.new_transport()
        with pytest.raises(TransportError, match="connect"):
            await transport.publish(address(), b"x")

    async def test_context_manager_connects_and_disconnects(self) -> None:
        where = address()
        transport = self.new_transport()
        async with transport:
            await transport.publish(where, b"kept")
        async with transport, await transport.consume(where) as consumer:
            delivery = await receive(consumer)
            assert delivery.body == b"kept"
            await transport.ack(delivery)
