"""The transport contract, and what only RabbitMQ does, against the real broker on 127.0.0.1:5672."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from paigeant_ai.exceptions import TransportError, UserError
from paigeant_ai.transports import Transport, get_transport
from paigeant_ai.transports.base import REASON_HEADER, SOURCE_HEADER, redact_url
from paigeant_ai.transports.rabbitmq import RabbitMQTransport

from .brokers import RABBITMQ_URL, delete_queues, require_rabbitmq, require_rabbitmqctl
from .transport_contract import TransportContract, address, receive, receive_nothing

pytestmark = pytest.mark.rabbitmq


async def force_close(transport: RabbitMQTransport) -> None:
    """Have the broker close the transport's connection, as a broker restart or a network fault would."""
    listing = await asyncio.to_thread(
        subprocess.run,
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "client_properties"],
        capture_output=True,
        text=True,
        check=True,
    )
    pids = [line.split("\t")[0] for line in listing.stdout.splitlines() if transport.connection_name in line]
    assert len(pids) == 1, listing.stdout
    await asyncio.to_thread(
        subprocess.run, ["rabbitmqctl", "close_connection", pids[0], "test"], capture_output=True, check=True
    )


class TestRabbitMQContract(TransportContract):
    @pytest.fixture(autouse=True)
    async def isolated(self) -> AsyncIterator[str]:
        """A namespace for this test alone; its queues are deleted afterwards."""
        require_rabbitmq()
        self.namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
        self.made: list[RabbitMQTransport] = []
        yield self.namespace
        await delete_queues(set[str]().union(*(transport._declared for transport in self.made)))

    @pytest.fixture
    async def transport(self, isolated: str) -> AsyncIterator[Transport]:
        async with self.new_transport() as transport:
            yield transport

    def new_transport(self) -> RabbitMQTransport:
        return self.make()

    def make(self, **options: Any) -> RabbitMQTransport:
        """A transport in this test's namespace, with a short reconnect interval and a connection name of its own."""
        options = {"max_deliveries": 3, "reconnect_interval": 0.2, **options}
        transport = RabbitMQTransport(
            RABBITMQ_URL,
            namespace=self.namespace,
            connection_name=f"{self.namespace}-{len(self.made)}",
            **options,
        )
        self.made.append(transport)
        return transport

    async def test_progress_readers_opened_and_closed_together_keep_the_connection(self) -> None:
        """A reader that closes its channel while entries still arrive must not ack them after `channel.close`: the
        broker reads such an ack after the channel is gone, and closes the whole connection (CHANNEL_ERROR)."""
        ids = [str(uuid.uuid4()) for _ in range(20)]
        async with self.make() as transport:
            for correlation_id in ids:
                for n in range(30):
                    await transport.append_progress(correlation_id, b"x" * 200, {"n": str(n)})
            steady = await transport.read_progress(ids[0])  # open throughout: its channel dies with the connection
            for _ in range(8):
                readers = await asyncio.gather(*(transport.read_progress(correlation_id) for correlation_id in ids))
                await asyncio.sleep(0.01)
                await asyncio.gather(*(reader.aclose() for reader in readers))
            read = 0
            while entries := await steady.read(0.5):
                read += len(entries)
            await steady.aclose()
        assert read == 30

    async def test_get_transport_builds_it(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("PAIGEANT_RABBITMQ_URL", "amqp://someone:secret@rabbit.example:5673/vhost")
        monkeypatch.setenv("PAIGEANT_NAMESPACE", "orders")
        transport = get_transport("rabbitmq")
        assert isinstance(transport, RabbitMQTransport)
        assert transport.url == "amqp://someone:secret@rabbit.example:5673/vhost"
        assert (
            repr(transport) == "RabbitMQTransport('amqp://someone:***@rabbit.example:5673/vhost', namespace='orders')"
        )
        assert get_transport("rabbitmq", url=RABBITMQ_URL).url == RABBITMQ_URL  # pyright: ignore[reportAttributeAccessIssue]

    async def test_unreachable_broker_is_a_transport_error(self) -> None:
        transport = RabbitMQTransport("amqp://guest:guest@127.0.0.1:1/", timeout=2)
        with pytest.raises(TransportError, match=r"cannot connect to RabbitMQ at amqp://guest:\*\*\*@127\.0\.0\.1:1/"):
            await transport.connect()

    async def test_unreachable_nodes_are_each_named(self) -> None:
        transport = RabbitMQTransport("amqp://guest:guest@127.0.0.1:1/, amqp://guest:secret@127.0.0.1:2/", timeout=2)
        assert transport.urls == ("amqp://guest:guest@127.0.0.1:1/", "amqp://guest:secret@127.0.0.1:2/")
        assert repr(transport).startswith("RabbitMQTransport('amqp://guest:***@127.0.0.1:1/,amqp://guest:***@")
        with pytest.raises(TransportError, match=r"any of its nodes \(amqp://guest:\*\*\*@127\.0\.0\.1:1/: .*:2/: "):
            await transport.connect()
        assert transport.node_url is None

    async def test_the_first_node_that_answers_is_used(self) -> None:
        transport = RabbitMQTransport(
            ["amqp://guest:guest@127.0.0.1:1/", RABBITMQ_URL], namespace=self.namespace, timeout=5
        )
        self.made.append(transport)
        async with transport:
            assert transport.node_url == redact_url(RABBITMQ_URL)
            await transport.publish("orders", b"x")
            assert await transport.pending("orders") == 1

    async def test_a_lost_connection_reconnects_to_the_next_node(self) -> None:
        require_rabbitmqctl()
        second = f"{RABBITMQ_URL}?name=second"  # the same broker under another address, as a second node
        transport = self.make()
        transport.urls = (RABBITMQ_URL, second)
        async with transport:
            await transport.publish("orders", b"before")
            await force_close(transport)
            for _ in range(2000):  # the client sees the connection closed
                if transport.node_url == redact_url(second):
                    break
                await asyncio.sleep(0.005)
            assert transport.node_url == redact_url(second)
            await transport.publish("orders", b"after")  # waits for the reconnect, to the second address
            async with await transport.consume("orders") as consumer:
                assert {(await receive(consumer)).body, (await receive(consumer)).body} == {b"before", b"after"}

    def test_nodes_come_as_a_list_or_separated_by_commas(self) -> None:
        nodes = ["amqp://a:1/", "amqp://b:2/"]
        assert RabbitMQTransport(nodes).urls == RabbitMQTransport(" amqp://a:1/,amqp://b:2/ ").urls == tuple(nodes)
        with pytest.raises(UserError, match="PAIGEANT_RABBITMQ_URL"):
            RabbitMQTransport(" , ")

    async def test_queues_are_durable_quorum_queues(self, transport: RabbitMQTransport) -> None:
        require_rabbitmqctl()
        where = address()
        await transport.publish(where, b"x", delay=0.5)
        listing = await asyncio.to_thread(
            subprocess.run,
            ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "type", "durable", "arguments"],
            capture_output=True,
            text=True,
            check=True,
        )
        queues = {line.split("\t")[0]: line.split("\t")[1:] for line in listing.stdout.splitlines()}
        main = queues[transport.queue_name(where)]
        assert main[:2] == ["quorum", "true"]
        assert '{"x-delivery-limit",2}' in main[2]  # RabbitMQ counts returns: 2 returns, 3 deliveries
        assert f'{{"x-dead-letter-routing-key","{self.namespace}.dead-letter"}}' in main[2]
        delayed = queues[f"{transport.queue_name(where)}@delay-1s"]
        assert delayed[:2] == ["quorum", "true"]
        assert '{"x-dead-letter-strategy","at-least-once"}' in delayed[2]
        assert f'{{"x-dead-letter-routing-key","{transport.queue_name(where)}"}}' in delayed[2]
        assert queues[f"{self.namespace}.dead-letter"][:2] == ["quorum", "true"]
        assert '{"x-max-length",10000}' in queues[f"{self.namespace}.dead-letter"][2]

    async def test_other_queue_arguments_are_reported(self, transport: RabbitMQTransport) -> None:
        where = address()
        await transport.publish(where, b"x")
        other = self.make(max_deliveries=7)
        async with other:
            with pytest.raises(TransportError, match="exists with other arguments"):
                await other.publish(where, b"y")
            await other.publish(address(), b"z")  # the refusal closed a channel; it was opened again

    async def test_poison_message_ends_in_the_dead_letter_queue(self, transport: RabbitMQTransport) -> None:
        where = address()
        await transport.publish(where, b"poison", headers={"k": "v"}, delay=0.1)  # it also carries an expiry
        for attempt in range(1, 4):  # each consumer takes it and goes away without settling it (a crash)
            consumer = await transport.consume(where)
            delivery = await receive(consumer)
            assert delivery.delivery_count == attempt
            await consumer.aclose()
        async with await transport.consume(where) as consumer:
            await receive_nothing(consumer)
        async with await transport.consume("dead-letter") as dead:
            letter = await receive(dead)
            await transport.ack(letter)
        assert letter.body == b"poison"
        assert letter.headers["k"] == "v"
        assert letter.headers[SOURCE_HEADER] == where
        assert "poison message: handed out 3 times" in letter.headers[REASON_HEADER]
        assert "x-death" not in letter.headers

    async def test_long_delays_wait_in_their_own_queue(self, transport: RabbitMQTransport) -> None:
        where = address()
        await transport.publish(where, b"soon", delay=0.3)
        await transport.publish(where, b"later", delay=40)
        assert await transport.pending(where) == 2
        async with await transport.consume(where) as consumer:
            delivery = await receive(consumer, within=3)
            assert delivery.body == b"soon"
            await transport.ack(delivery)
            await receive_nothing(consumer)
        assert await transport.pending(where) == 1

    async def test_a_delay_past_the_broker_limit_is_refused(self, transport: RabbitMQTransport) -> None:
        with pytest.raises(UserError, match="longer than RabbitMQ allows"):
            await transport.publish(address(), b"x", delay=60 * 86400)

    async def test_a_deleted_queue_is_declared_again(self, transport: RabbitMQTransport) -> None:
        where = address()
        await transport.publish(where, b"first")
        async with await aio_pika.connect(RABBITMQ_URL) as connection:
            await (await connection.channel()).queue_delete(transport.queue_name(where))
        await transport.publish(where, b"second")
        async with await transport.consume(where) as consumer:
            delivery = await receive(consumer)
            assert delivery.body == b"second"
            await transport.ack(delivery)

    async def test_a_consumer_outlives_the_deletion_of_its_queue(self, transport: RabbitMQTransport) -> None:
        where = address()
        async with await transport.consume(where) as consumer:
            await transport.publish(where, b"before")
            await transport.ack(await receive(consumer))
            async with await aio_pika.connect(RABBITMQ_URL) as connection:
                await (await connection.channel()).queue_delete(transport.queue_name(where))
            # The broker cancels the consumer once it sees its queue gone (a queue declared again before that keeps a
            # consumer that never receives); the consumer then declares the queue and consumes it again.
            await asyncio.sleep(0.5)
            await transport.publish(where, b"after")
            delivery = await receive(consumer)
            assert delivery.body == b"after"
            await transport.ack(delivery)

    async def test_concurrent_first_publishes_to_an_address(self, transport: RabbitMQTransport) -> None:
        where = address()
        await asyncio.gather(*(transport.publish(where, str(n).encode()) for n in range(20)))
        async with await transport.consume(where, prefetch=20) as consumer:
            received = [await receive(consumer) for _ in range(20)]
            for delivery in received:
                await transport.ack(delivery)
        assert sorted(int(delivery.body) for delivery in received) == list(range(20))

    async def test_cancelled_receive_loses_nothing(self, transport: RabbitMQTransport) -> None:
        where = address()
        async with await transport.consume(where, prefetch=1) as consumer:
            waiting = asyncio.create_task(anext(consumer))
            await asyncio.sleep(0.1)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await transport.publish(where, b"kept")
            delivery = await receive(consumer)
            assert delivery.body == b"kept"
            await transport.ack(delivery)

    async def test_settling_twice_is_harmless(self, transport: RabbitMQTransport) -> None:
        where = address()
        await transport.publish(where, b"x")
        async with await transport.consume(where) as consumer:
            delivery = await receive(consumer)
            await transport.ack(delivery)
            await transport.ack(delivery)
            await transport.retry_later(delivery, 0.1)
            await transport.dead_letter(delivery, "late")
        assert await transport.pending(where) == 0

    async def test_a_delivery_from_elsewhere_is_refused(self, transport: RabbitMQTransport) -> None:
        where = address()
        await transport.publish(where, b"x")
        async with self.new_transport() as other, await other.consume(where) as consumer:
            delivery = await receive(consumer)
            with pytest.raises(TransportError, match="not handed out by this transport"):
                await transport.ack(delivery)
            await other.ack(delivery)

    async def test_consumers_resume_after_the_connection_is_lost(self) -> None:
        require_rabbitmqctl()
        where = address()
        # Reconnecting after a few seconds leaves the time to see the connection down and close a consumer meanwhile,
        # even on a loaded machine.
        async with self.make(reconnect_interval=4.0) as transport:
            await transport.publish(where, b"before")
            async with await transport.consume(where) as consumer:
                held = await receive(consumer)
                gone = await transport.consume(where)
                await force_close(transport)
                for _ in range(2000):
                    if consumer.channel.is_closed:
                        break
                    await asyncio.sleep(0.005)
                assert consumer.channel.is_closed
                await gone.aclose()  # closed while the connection is down: the reconnect must not bring it back
                with pytest.raises(TransportError, match="connection was lost"):
                    await transport.ack(held)
                await transport.publish(where, b"after")  # waits for the reconnect
                received: list[bytes] = []
                for _ in range(2):
                    delivery = await receive(consumer)
                    received.append(delivery.body)
                    if delivery.body == b"before":
                        assert delivery.delivery_count >= 2
                    await transport.ack(delivery)
                assert sorted(received) == [b"after", b"before"]
            assert await transport.pending(where) == 0

    async def test_events_and_dead_letters_keep_the_newest(self) -> None:
        async with self.make(max_length=3) as transport:
            for n in range(5):
                await transport.publish("events", str(n).encode())
            assert await transport.pending("events") == 3
            async with await transport.consume("events") as consumer:
                received = [await receive(consumer) for _ in range(3)]
                assert [delivery.body for delivery in received] == [b"2", b"3", b"4"]
                for delivery in received:
                    await transport.ack(delivery)
