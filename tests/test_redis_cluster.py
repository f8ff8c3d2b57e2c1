"""The Redis transport and its stores on a Redis Cluster and behind Sentinel, on servers of this module's own.

A three-master cluster (one replica each) and a Sentinel set (a master, a replica, three sentinels) start once for
the module (`tests/redis_cluster.py`: free ports, a temporary folder, `appendonly yes` with `appendfsync always`,
every process killed at the end). On them run the transport contract, the worker's behaviour, parallel groups,
parked workflows and the registry (the suites of the other modules, with this module's `transport`), and two
failovers under worker processes: a cluster master killed with SIGKILL while its replica takes over, and the
Sentinel-managed master killed while the sentinels promote the replica.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports import Transport
from paigeant_ai.transports.redis import RedisTransport
from paigeant_ai.transports.redis._connect import open_client
from paigeant_ai.transports.redis._pipeline import PipelinedCluster, PipelinedRedis

from . import brokers
from .brokers import drained, report, wait_until, wait_until_advertised
from .redis_cluster import Cluster, SentinelSet, cli, redis_cluster, sentinel_set
from .test_approval_redis import (  # the suite of parked workflows, on this module's `transport`
    test_a_workflow_parked_in_redis_is_resumed_by_a_new_worker,
    test_removing_a_parking_keeps_a_newer_one,
)
from .test_parallel import (  # parallel groups: their joins, on this module's `transport`
    joinable,
    test_a_branch_that_fails_for_good_undoes_the_steps_before_and_the_branches_that_completed,
    test_a_group_runs_its_branches_and_merges_their_outputs_under_their_keys,
)
from .test_worker import (  # the worker's behaviour, on this module's `transport`
    test_a_redelivered_completed_step_is_not_run_again,
    test_a_worker_stopped_mid_step_leaves_the_message_for_redelivery,
    test_a_workflow_runs_every_step_in_order,
    test_bad_messages_go_to_the_dead_letter_queue_and_the_worker_keeps_going,
    test_retry_exhausted_faults_and_dead_letters,
    test_retry_then_success,
)
from .transport_contract import TransportContract, receive
from .workflows_for_crash import MIDDLE, STEPS, completed, dispatch, middle_runs, read_records

__all__ = (  # the suites of the other modules, run here on this module's `transport`
    "joinable",
    "test_a_branch_that_fails_for_good_undoes_the_steps_before_and_the_branches_that_completed",
    "test_a_group_runs_its_branches_and_merges_their_outputs_under_their_keys",
    "test_a_redelivered_completed_step_is_not_run_again",
    "test_a_worker_stopped_mid_step_leaves_the_message_for_redelivery",
    "test_a_workflow_parked_in_redis_is_resumed_by_a_new_worker",
    "test_a_workflow_runs_every_step_in_order",
    "test_bad_messages_go_to_the_dead_letter_queue_and_the_worker_keeps_going",
    "test_removing_a_parking_keeps_a_newer_one",
    "test_retry_exhausted_faults_and_dead_letters",
    "test_retry_then_success",
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("signed_with_one_key")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    with sentinel_set(tmp_path_factory.mktemp("sentinel")) as started:
        yield started


def new_namespace() -> str:
    return f"paigeant-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["cluster", "sentinel"])
async def transport(request: pytest.FixtureRequest) -> AsyncIterator[RedisTransport]:
    """A transport on the cluster and one through the sentinels, each in a namespace of its own (the servers go
    with the module, and what the tests leave with them)."""
    servers: Cluster | SentinelSet = request.getfixturevalue("cluster" if request.param == "cluster" else "sentinels")
    async with RedisTransport(servers.url, namespace=new_namespace(), poll_interval=0.05) as made:
        yield made


class TestClusterContract(TransportContract):
    @pytest.fixture(autouse=True)
    def _url(self, cluster: Cluster) -> None:
        self.url = cluster.url

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        async with self.new_transport() as made:
            yield made

    def new_transport(self) -> RedisTransport:
        return RedisTransport(self.url, namespace=new_namespace())


async def test_each_address_keeps_its_keys_in_one_slot_and_addresses_spread_over_the_masters(
    cluster: Cluster,
) -> None:
    async with RedisTransport(cluster.url, namespace=new_namespace()) as transport:
        assert transport.cluster
        masters: set[int] = set()
        for n in range(12):
            address = f"activity-{n}"
            keys = [
                transport.stream_key(address),
                f"{transport.stream_key(address)}@deliveries",
                transport.delayed_key(address),
                transport.consumers_key(address),
            ]
            slots = {cli(cluster.masters[0], "CLUSTER", "KEYSLOT", key).strip() for key in keys}
            assert len(slots) == 1, keys
            await transport.publish(address, b"x")
            masters.add(cluster.master_of(transport.stream_key(address)) or 0)
        assert len(masters) > 1


async def test_the_consumed_addresses_are_found_on_every_master(cluster: Cluster) -> None:
    async with RedisTransport(cluster.url, namespace=new_namespace()) as transport:
        addresses = [f"served-{n}" for n in range(6)]
        consumers = [await transport.consume(address) for address in addresses]
        try:
            assert await transport.consumed_addresses() == sorted(addresses)
        finally:
            for consumer in consumers:
                await consumer.aclose()


async def test_the_url_gives_the_nodes_the_credentials_and_the_master() -> None:
    cluster = open_client(
        "redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001/", max_connections=5, retry_attempts=1
    )
    assert isinstance(cluster, PipelinedCluster)
    assert [(node.host, node.port) for node in cluster.nodes_manager.startup_nodes.values()] == [
        ("10.0.0.1", 7000),
        ("10.0.0.2", 7001),
    ]
    assert cluster.get_connection_kwargs()["password"] == "s@cret"
    await cluster.aclose()
    master = open_client(
        "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/orders/2", max_connections=5, retry_attempts=1
    )
    assert isinstance(master, PipelinedRedis)
    assert [sentinel.get_connection_kwargs()["port"] for sentinel in master.sentinels] == [26379, 26379]
    kwargs = master.get_connection_kwargs()
    assert (kwargs["db"], kwargs["password"]) == (2, "pw")
    await master.aclose()


@pytest.mark.parametrize("url", ["redis+cluster://", "redis+cluster://127.0.0.1:x", "redis+sentinel://127.0.0.1:1"])
async def test_a_cluster_or_sentinel_url_without_what_it_needs_is_refused_with_the_fix(url: str) -> None:
    from paigeant_ai.exceptions import UserError

    with pytest.raises(UserError, match="PAIGEANT_REDIS_URL"):
        await RedisTransport(url).connect()


@pytest.mark.parametrize("servers", ["cluster", "sentinels"])
async def test_a_publish_waits_for_the_replicas_it_asks_for_and_fails_without_them(
    servers: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(servers).url
    namespace = new_namespace()
    async with RedisTransport(url, namespace=namespace, min_replicas_acked=1) as transport:
        await transport.publish("replicated", b"on two nodes")
        async with await transport.consume("replicated") as consumer:
            assert (await receive(consumer)).body == b"on two nodes"
    # Every master has one replica: asking for two, the publish fails (and the worker would send it again).
    async with RedisTransport(url, namespace=namespace, min_replicas_acked=2, replica_ack_timeout=0.2) as transport:
        with pytest.raises(TransportError, match="reached 1 replicas, not the 2 of min_replicas_acked"):
            await transport.publish("replicated", b"short of replicas")


# -- failover under worker processes ---------------------------------------------------------------------------


async def run_through_a_failover(
    tmp_path: Path, url: str, fail_over: Callable[[], int], capsys: pytest.CaptureFixture[str], what: str, rerun: int
) -> None:
    """Dispatch 60 three-step workflows to worker processes on `url`, `fail_over()` once the middle steps run (the
    killed master comes back as the new master's replica, so that publishes find a replica again), and check that
    every workflow completes, each middle step ran, at most `rerun` of them again, nothing dead-lettered.

    The workers publish with `min_replicas_acked=1`: a step is acknowledged only once its successor is on the
    replica too, so the replica that takes over has every step not yet acknowledged (without it, replication is
    asynchronous and the failover may lose the last writes, `appendfsync always` or not)."""
    async with brokers.fleet(tmp_path, "redis", url, workers="tests.redis_workflows", steps=STEPS) as fleet:
        workers, dispatcher, records = fleet
        await workers.start("edge_worker")
        await workers.start("middle_worker")
        await workers.start("middle_worker")
        await wait_until_advertised(dispatcher, STEPS, within=60)
        ids = await dispatch(dispatcher, 60)
        await wait_until(lambda: len(middle_runs(records)) >= 10, within=60, what="10 middle steps to run")
        killed = await asyncio.to_thread(fail_over)
        await wait_until(lambda: completed(records) >= set(ids), within=90, what="all 60 workflows to complete")
        runs = middle_runs(records)
        assert set(runs) == {f"{cid}:1:{MIDDLE}" for cid in ids}
        twice = {key: count for key, count in runs.items() if count > 1}
        assert len(twice) <= rerun, twice
        assert max(runs.values()) <= 4, twice
        assert await dispatcher.transport.pending(DEAD_LETTER) == 0
        await drained(dispatcher.transport, STEPS, within=60)
        lines = sum(len(lines) for lines in read_records(records, "last").values())
        again = sum(runs.values()) - len(runs)
        report(capsys, f"{what}: killed {killed}; 60/60 completed ({lines} last steps), {again} middle steps run again")


@pytest.fixture
def replicated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker processes of `tests.redis_workflows` publish with `min_replicas_acked=1`."""
    monkeypatch.setenv("PAIGEANT_TEST_MIN_REPLICAS_ACKED", "1")


@pytest.mark.usefixtures("replicated")
async def test_a_cluster_master_killed_mid_run_loses_no_workflow(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    probe = RedisTransport(cluster.url, namespace="probe")  # only for the name of the middle step's stream
    stream = probe.stream_key(MIDDLE)

    def fail_over() -> int:
        return cluster.fail_over_master_of(stream)

    # Only the streams of the killed master stop for the failover: the steps in flight on them may run again.
    await run_through_a_failover(tmp_path, cluster.url, fail_over, capsys, "redis cluster failover", rerun=8)


@pytest.mark.usefixtures("replicated")
async def test_the_sentinel_master_killed_mid_run_loses_no_workflow(
    sentinels: SentinelSet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every write fails while the sentinels notice (1 s), promote the replica and the killed master comes back as
    # its replica (a publish waits for one): each step that ends meanwhile is handed back and may run again, more
    # than once if the outage outlasts its first pauses.
    await run_through_a_failover(
        tmp_path, sentinels.url, sentinels.fail_over, capsys, "redis sentinel failover", rerun=40
    )
