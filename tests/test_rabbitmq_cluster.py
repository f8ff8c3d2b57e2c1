"""RabbitMQ as a three-node cluster of the tests' own (`tests/rabbit_cluster.py`), never the shared broker: quorum
queues replicated on every node, and transports and worker processes that fail over when the node they are
connected to is killed with SIGKILL, then started again.

One cluster serves the module (it takes about 20 seconds to start); a test that kills a node starts it again
before it ends. Everything runs in a namespace of its own, and the cluster is killed afterwards, even on failure.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator

import pytest

from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports.base import redact_url
from paigeant_ai.transports.rabbitmq import RabbitMQTransport

from .rabbit_cluster import RabbitCluster, require_rabbitmq_server
from .transport_contract import receive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rabbit_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitCluster]:
    """Three RabbitMQ nodes joined into one cluster, on free ports, killed when the module is done."""
    require_rabbitmq_server()
    cluster = RabbitCluster(tmp_path_factory.mktemp("rabbit-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def namespace() -> str:
    return f"paigeant-test-{uuid.uuid4().hex[:12]}"


def connected_node(cluster: RabbitCluster, connection_name: str) -> int:
    """The index of the node that holds the connection named `connection_name`, as the cluster lists it."""
    for index, node in enumerate(cluster.nodes):
        if not _running(cluster, index):
            continue
        listing = cluster.ctl(node, "list_connections", "-q", "--no-table-headers", "port", "client_properties")
        for line in listing.splitlines():
            if connection_name in line:
                port = int(line.split("\t")[0])
                return next(i for i, each in enumerate(cluster.nodes) if each.amqp_port == port)
    raise AssertionError(f"no connection named {connection_name!r} on the cluster")


def _running(cluster: RabbitCluster, index: int) -> bool:
    process = cluster.nodes[index].process
    return process is not None and process.poll() is None


def quorum_members(cluster: RabbitCluster, queue: str) -> list[str]:
    """The nodes that hold a replica of the quorum queue `queue`."""
    listing = cluster.ctl(cluster.nodes[0], "list_queues", "-q", "--no-table-headers", "name", "members")
    for line in listing.splitlines():
        name, _, members = line.partition("\t")
        if name == queue:
            return sorted(re.findall(r"paigeant-[\w-]+@localhost", members))
    raise AssertionError(f"no queue {queue!r} on the cluster: {listing}")


async def publish_confirmed(transport: RabbitMQTransport, address: str, body: bytes, *, within: float) -> int:
    """Publish until the broker confirms, as a caller does with a publish that failed; how many attempts failed.

    A publish is not confirmed while its node dies or its queue elects a new leader, and a publish that was not
    confirmed may still have been enqueued."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    failed = 0
    while True:
        try:
            await transport.publish(address, body)
            return failed
        except TransportError:
            failed += 1
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def test_a_transport_fails_over_to_another_node_and_loses_no_confirmed_message(
    rabbit_cluster: RabbitCluster,
) -> None:
    cluster = rabbit_cluster
    urls = [cluster.urls[1], cluster.urls[2], cluster.urls[0]]  # the second node first: it is the one killed
    name = f"paigeant failover {uuid.uuid4().hex[:8]}"
    async with RabbitMQTransport(urls, namespace=namespace(), reconnect_interval=0.5, connection_name=name) as sender:
        assert sender.node_url == redact_url(cluster.urls[1])
        await sender.publish("orders", b"before")
        queue = sender.queue_name("orders")
        assert quorum_members(cluster, queue) == sorted(node.name for node in cluster.nodes), "three replicas"
        assert await asyncio.to_thread(connected_node, cluster, name) == 1

        await asyncio.to_thread(cluster.kill, 1)
        try:
            await publish_confirmed(sender, "orders", b"after", within=30)  # waits for the reconnect
            now_on = await asyncio.to_thread(connected_node, cluster, name)
            assert now_on != 1
            assert sender.node_url == redact_url(cluster.urls[now_on])
            async with await sender.consume("orders") as consumer:
                bodies = {(await receive(consumer)).body, (await receive(consumer)).body}
                while await sender.pending("orders") > 2:  # an unconfirmed "after" may have been enqueued too
                    bodies.add((await receive(consumer)).body)
            assert bodies == {b"after", b"before"}, "the message confirmed before its node died is there"
        finally:
            await asyncio.to_thread(cluster.restart, 1)
        assert await asyncio.to_thread(quorum_members, cluster, queue) == sorted(node.name for node in cluster.nodes)
