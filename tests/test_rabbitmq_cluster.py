"""RabbitMQ as a three-node cluster of the tests' own (`tests/rabbit_cluster.py`), never the shared broker: quorum
queues replicated on every node, and transports and worker processes that fail over when the node they are
connected to is killed with SIGKILL, then started again.

One cluster serves the module (it takes about 20 seconds to start); a test that kills a node starts it again
before it ends. Everything runs in a namespace of its own, and the cluster is killed afterwards, even on failure.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from paigeant_ai import WorkflowDispatcher
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports.base import redact_url
from paigeant_ai.transports.rabbitmq import RabbitMQTransport

from . import brokers
from .brokers import report, wait_until, wait_until_advertised
from .rabbit_cluster import RabbitCluster, require_rabbitmq_server
from .transport_contract import receive
from .workflows_for_crash import MIDDLE, STEPS, completed, middle_runs, read_records

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


def connected_node(cluster: RabbitCluster, connection_name: str) -> int | None:
    """The index of the node that holds the connection named `connection_name` (a pattern), as the cluster lists
    it; None when it has none."""
    for index, node in enumerate(cluster.nodes):
        if not _running(cluster, index):
            continue
        listing = cluster.ctl(node, "list_connections", "-q", "--no-table-headers", "port", "client_properties")
        for line in listing.splitlines():
            if re.search(connection_name, line):
                port = int(line.split("\t")[0])
                return next(i for i, each in enumerate(cluster.nodes) if each.amqp_port == port)
        return None  # every node lists the connections of the whole cluster
    return None


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
    name = f"paigeant failover {uuid.uuid4().hex[:8]}"  # also the pattern that finds it
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
            assert now_on in (0, 2)
            assert sender.node_url == redact_url(cluster.urls[now_on])
            async with await sender.consume("orders") as consumer:
                bodies = {(await receive(consumer)).body, (await receive(consumer)).body}
                while await sender.pending("orders") > 2:  # an unconfirmed "after" may have been enqueued too
                    bodies.add((await receive(consumer)).body)
            assert bodies == {b"after", b"before"}, "the message confirmed before its node died is there"
        finally:
            await asyncio.to_thread(cluster.restart, 1)
        assert await asyncio.to_thread(quorum_members, cluster, queue) == sorted(node.name for node in cluster.nodes)


def starting_at(cluster: RabbitCluster, first: int) -> str:
    """`PAIGEANT_RABBITMQ_URL` for a process that connects to node `first`, then fails over to the next ones."""
    urls = cluster.urls
    return ",".join(urls[first:] + urls[:first])


def of_process(pid: int) -> str:
    """The pattern of the connection name of a `paigeant worker` process (see `RabbitMQTransport`)."""
    return rf"paigeant \S+ pid {pid}\b"


async def test_workers_ride_out_the_sigkill_of_their_node_and_lose_no_workflow(
    rabbit_cluster: RabbitCluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = rabbit_cluster
    started = time.monotonic()
    fleet = brokers.fleet(
        tmp_path, "rabbitmq", starting_at(cluster, 0), workers="tests.workflows_for_crash", steps=STEPS
    )
    async with fleet as (workers, dispatcher, records):
        workers.env["PAIGEANT_TEST_STEP_SECONDS"] = "0.4"
        workers.env["PAIGEANT_RABBITMQ_URL"] = starting_at(cluster, 1)
        victim = await workers.start("middle_worker")  # on the second node, the one killed
        await wait_until_advertised(dispatcher, [MIDDLE], within=60)  # it declared the middle queue: it leads there
        workers.env["PAIGEANT_RABBITMQ_URL"] = starting_at(cluster, 2)
        await workers.start("middle_worker")
        workers.env["PAIGEANT_RABBITMQ_URL"] = starting_at(cluster, 0)
        await workers.start("edge_worker")
        await wait_until_advertised(dispatcher, STEPS, within=60)
        assert await asyncio.to_thread(connected_node, cluster, of_process(victim.pid)) == 1
        before = await dispatch_at_once(dispatcher, 150)

        def victim_runs() -> int:
            return len(read_records(records, "middle").get(victim.pid, []))

        await wait_until(lambda: victim_runs() >= 4, within=60, what="the victim to run 4 middle steps")
        leaders = await asyncio.to_thread(queue_leaders, cluster, workers.env["PAIGEANT_NAMESPACE"])
        assert MIDDLE in leaders.get(cluster.nodes[1].name, []), "the killed node leads the queue its worker consumes"
        await asyncio.to_thread(cluster.kill, 1)
        killed_at, in_flight = time.monotonic(), len(before) - len(completed(records))
        assert in_flight > 0, "the node is killed while workflows run"
        try:
            during = await dispatch_at_once(dispatcher, 30)  # a node is down: the cluster takes workflows all the same
            await wait_until(
                lambda: connected_node(cluster, of_process(victim.pid)) in (0, 2),
                within=30,
                what="the victim's worker to reconnect to another node",
            )
            moved = time.monotonic() - killed_at
        finally:
            await asyncio.to_thread(cluster.restart, 1)
        after = await dispatch_at_once(dispatcher, 20)

        everything = {*before, *during, *after}
        await wait_until(lambda: completed(records) >= everything, within=120, what="all 200 workflows to complete")
        await brokers.drained(dispatcher.transport, STEPS, within=30)

        assert completed(records) == everything
        assert all(process.returncode is None for process in workers.processes), "no worker died with the node"
        runs = middle_runs(records)
        assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in everything}  # every middle step ran, under its key
        twice = {key: count for key, count in runs.items() if count > 1}
        # What ran twice: the middle steps the victim held (its prefetch, 4) when its connection died, and the
        # few whose successor's publish was not confirmed while the queues elected their new leaders.
        assert len(twice) <= 12, twice
        assert all(count <= 3 for count in twice.values()), twice
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        report(
            capsys,
            f"node SIGKILLed: {len(everything)}/{len(everything)} workflows completed in "
            f"{time.monotonic() - started:.1f}s; {in_flight} were in flight; the victim's worker was on another node "
            f"{moved:.1f}s later; {len(twice)} middle steps ran more than once; the killed node led "
            f"{sorted(leaders[cluster.nodes[1].name])}",
        )


async def dispatch_at_once(dispatcher: WorkflowDispatcher, count: int) -> list[str]:
    """Dispatch `count` workflows of `tests.workflows_for_crash` concurrently; their correlation IDs."""
    return list(await asyncio.gather(*(dispatcher.dispatch_workflow(list(STEPS), {"n": n}) for n in range(count))))


def queue_leaders(cluster: RabbitCluster, namespace: str) -> dict[str, list[str]]:
    """The queues of `namespace`, by the node that leads each."""
    listing = cluster.ctl(cluster.nodes[0], "list_queues", "-q", "--no-table-headers", "name", "leader")
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, _, leader = line.partition("\t")
        if name.startswith(f"{namespace}."):
            found.setdefault(leader.strip(), []).append(name.removeprefix(f"{namespace}."))
    return found
