"""Private Redis servers for the cluster tests: a three-master Redis Cluster with a replica each, and a Sentinel set.

Every server is a `redis-server` of the test's own, on a free port (never 6379), keeping its files in a temporary
folder, with `appendonly yes` and `appendfsync always` (each write on disk before Redis answers). Both context
managers kill every process they started (SIGKILL) and delete the folder when they leave, even when the test fails.
Without `redis-server` / `redis-cli` the tests skip (and fail in CI, where they must be installed).

    with redis_cluster(tmp_path) as cluster:      # 3 masters + 3 replicas, slots spread by `redis-cli --cluster`
        cluster.url                               # redis+cluster://127.0.0.1:<port>,...
        cluster.fail_over_master_of(key)          # SIGKILL the master of `key`'s slot; wait for its replica

    with sentinel_set(tmp_path) as sentinels:     # one master, one replica, three sentinels
        sentinels.url                             # redis+sentinel://127.0.0.1:<port>,.../paigeant
        sentinels.fail_over()                     # SIGKILL the master; wait until the sentinels promote the replica
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Generator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

MASTER_NAME = "paigeant"
"""The name the sentinels know the master by."""
REPLICA_EACH = ("--cluster-replicas", "1", "--cluster-yes")
DURABLE = ("--appendonly", "yes", "--appendfsync", "always", "--save", "", "--repl-diskless-sync-delay", "0")
"""Every write on disk before its reply; a replica's full sync starts at once (not 5 s later, the default)."""
RESYNC_WITHIN = 90
"""Seconds a killed master, started again, may take to be its successor's replica in sync: on a loaded two-core
machine a full sync, with worker processes retrying every write meanwhile, has taken over 30 s."""


def require_redis_binaries() -> None:
    """Skip when `redis-server` or `redis-cli` is missing; fail in CI, where they must be installed."""
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        message = f"{' and '.join(missing)} not on PATH; the Redis Cluster and Sentinel tests start their own servers"
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI must install redis-server.")
        pytest.skip(message)


def free_ports(count: int) -> list[int]:
    """`count` ports nobody listens on now, none of them 6379, each with its cluster bus port (+10000) free too."""
    found: list[int] = []
    while len(found) < count:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        taken = {*found, *(other + 10000 for other in found), *(other - 10000 for other in found)}
        if port == 6379 or port + 10000 > 65535 or port in taken or port + 10000 in taken or not _free(port + 10000):
            continue
        found.append(port)
    return found


def _free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cli(port: int, *args: str, timeout: float = 10) -> str:
    """`redis-cli -p <port> <args>`'s output."""
    done = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stdout


def wait_for(condition: Callable[[], bool], *, within: float, what: str) -> None:
    """Poll `condition()` every 0.1 s; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Servers:
    """Redis processes of one test, by port; `kill` is SIGKILL."""

    folder: Path
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict[int, "subprocess.Popen[bytes]"])
    options: dict[int, tuple[str, ...]] = field(default_factory=dict[int, tuple[str, ...]])

    def start(self, port: int, *options: str) -> None:
        """Start a server on `port` (again, with the options and files it had, if it ran before)."""
        options = self.options.setdefault(port, options)
        data = self.folder / str(port)
        data.mkdir(exist_ok=True)
        log = open(data / "redis.log", "ab")  # noqa: SIM115 - the process keeps writing to it
        try:
            self.processes[port] = subprocess.Popen(
                ["redis-server", *options, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the tests reaches them only through `stop_all`
            )
        finally:
            log.close()
        wait_for(lambda: cli(port, "PING").strip() == "PONG", within=10, what=f"redis-server on port {port}")

    def kill(self, port: int) -> None:
        process = self.processes[port]
        with suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for port in list(self.processes):
            self.kill(port)

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.parent.name}\n{path.read_text(errors='replace')[-2000:]}"
            for path in sorted(self.folder.glob("*/redis.log"))
        )


@dataclass
class Cluster:
    servers: Servers
    masters: list[int]
    replicas: list[int]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.masters)

    def master_of(self, key: str) -> int | None:
        """The port of the master that now holds `key`'s slot (`None` while none does, in a failover)."""
        slot = int(cli(self.live()[0], "CLUSTER", "KEYSLOT", key).strip())
        for line in cli(self.live()[0], "CLUSTER", "NODES").splitlines():
            words = line.split()
            if "master" in words[2] and "fail" not in words[2] and _serves(words[8:], slot):
                return int(words[1].split(":")[1].split("@")[0])
        return None

    def live(self) -> list[int]:
        return [port for port, process in self.servers.processes.items() if process.poll() is None]

    def fail_over_master_of(self, key: str) -> int:
        """SIGKILL the master of `key`'s slot and wait until its replica took over; then start the killed server
        again, and wait until it is the new master's replica, in sync. The killed port."""
        victim = self.master_of(key)
        assert victim is not None, f"no master serves {key!r}"
        self.servers.kill(victim)
        wait_for(
            lambda: self.master_of(key) not in (victim, None) and self.healthy(),
            within=30,
            what="the replica's promotion",
        )
        self.servers.start(victim)  # on its files: it knows the cluster, and joins it as the new master's replica
        in_sync = f"the killed master {victim} to be a replica in sync"
        wait_for(lambda: _in_sync(victim), within=RESYNC_WITHIN, what=in_sync)
        return victim

    def healthy(self) -> bool:
        return all("cluster_state:ok" in cli(port, "CLUSTER", "INFO") for port in self.live())


def _serves(ranges: list[str], slot: int) -> bool:
    for text in ranges:
        if text.startswith("["):
            continue  # a slot being migrated
        low, _, high = text.partition("-")
        if int(low) <= slot <= int(high or low):
            return True
    return False


@contextmanager
def redis_cluster(tmp_path: Path) -> Generator[Cluster]:
    """Three masters and a replica for each, `redis-cli --cluster create`d; killed and deleted on exit."""
    require_redis_binaries()
    servers = Servers(tmp_path / "redis-cluster")
    servers.folder.mkdir()
    ports = free_ports(6)
    try:
        for port in ports:
            servers.start(
                port,
                *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                *("--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"),
                *DURABLE,
            )
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports), *REPLICA_EACH],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        cluster = Cluster(servers, masters=[], replicas=[])
        wait_for(cluster.healthy, within=30, what="the cluster to cover every slot")
        wait_for(lambda: cli(ports[0], "CLUSTER", "NODES").count("slave") == 3, within=30, what="three replicas")
        for line in cli(ports[0], "CLUSTER", "NODES").splitlines():
            words = line.split()
            port = int(words[1].split(":")[1].split("@")[0])
            (cluster.masters if "master" in words[2] else cluster.replicas).append(port)
        wait_for(
            lambda: all("master_link_status:up" in cli(port, "INFO", "replication") for port in cluster.replicas),
            within=30,
            what="every replica to be in sync",
        )
        yield cluster
    except BaseException:
        print(servers.logs())
        raise
    finally:
        servers.stop_all()
        shutil.rmtree(servers.folder, ignore_errors=True)


@dataclass
class SentinelSet:
    servers: Servers
    redis_ports: list[int]
    sentinel_ports: list[int]

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports) + f"/{MASTER_NAME}"

    def master(self) -> int:
        """The port of the master, as the first live sentinel names it."""
        reply = cli(self.sentinel_ports[0], "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME).split()
        return int(reply[1])

    def fail_over(self) -> int:
        """SIGKILL the master and wait until the sentinels promoted the replica; then start the killed server again
        and wait until the sentinels made it the new master's replica, in sync. The killed port."""
        victim = self.master()
        self.servers.kill(victim)
        (replica,) = (port for port in self.redis_ports if port != victim)
        wait_for(
            lambda: self.master() == replica and "role:master" in cli(replica, "INFO", "replication"),
            within=30,
            what="the sentinels to promote the replica",
        )
        self.servers.start(victim)
        # The sentinels make it the new master's replica once it has said for a while that it is a master; an
        # orchestrator that restarts it would do so at once, as this does, and spare the publishes that wait.
        wait_for(lambda: cli(victim, "PING").strip() == "PONG", within=30, what=f"the killed master {victim} to start")
        cli(victim, "REPLICAOF", "127.0.0.1", str(replica))
        in_sync = f"the killed master {victim} to be a replica in sync"
        wait_for(lambda: _in_sync(victim), within=RESYNC_WITHIN, what=in_sync)
        return victim


@contextmanager
def sentinel_set(tmp_path: Path) -> Generator[SentinelSet]:
    """A master, its replica and three sentinels watching them (quorum 2); killed and deleted on exit."""
    require_redis_binaries()
    servers = Servers(tmp_path / "redis-sentinel")
    servers.folder.mkdir()
    master, replica, *sentinels = free_ports(5)
    try:
        servers.start(master, *DURABLE)
        servers.start(replica, "--replicaof", "127.0.0.1", str(master), *DURABLE)
        wait_for(lambda: "master_link_status:up" in cli(replica, "INFO", "replication"), within=30, what="the replica")
        for port in sentinels:
            config = servers.folder / f"sentinel-{port}.conf"  # a sentinel rewrites its own file
            config.write_text(
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {MASTER_NAME} 5000\n"
                f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            )
            servers.start(port, str(config), "--sentinel")
        found = SentinelSet(servers, [master, replica], sentinels)
        wait_for(
            lambda: (
                all("num-other-sentinels" in cli(p, "SENTINEL", "MASTER", MASTER_NAME) for p in sentinels)
                and all(_knows_others(p) for p in sentinels)
            ),
            within=30,
            what="the sentinels to find each other",
        )
        yield found
    except BaseException:
        print(servers.logs())
        raise
    finally:
        servers.stop_all()
        shutil.rmtree(servers.folder, ignore_errors=True)


def _in_sync(port: int) -> bool:
    info = cli(port, "INFO", "replication")
    return "role:slave" in info and "master_link_status:up" in info


def _knows_others(port: int) -> bool:
    words = cli(port, "SENTINEL", "MASTER", MASTER_NAME).split()
    return "num-other-sentinels" in words and words[words.index("num-other-sentinels") + 1] == "2"
