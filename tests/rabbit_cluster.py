"""A three-node RabbitMQ cluster of a test's own, on this machine, beside (never touching) the shared broker.

Each node has its own name (`paigeant-<token>-c<n>@localhost`), AMQP and distribution ports (free ones, picked at
run time), data and log folders and config file under the test's temporary folder, and no plugins. The nodes share
an Erlang cookie of their own (in the `HOME` the cluster gives every node and every `rabbitmqctl` call) and an
`epmd` of their own on a free port, so neither the shared node's cookie nor its `epmd` is ever used. `stop()` kills
every process the cluster started, the Erlang VMs and that `epmd`, whatever state they are in.

    cluster = RabbitCluster(tmp_path / "cluster")
    cluster.start()          # three nodes, joined: about 20 s on a small machine
    cluster.urls             # one AMQP URL per node
    cluster.kill(1)          # SIGKILL the second node's Erlang VM
    cluster.restart(1)       # start it again (about 5 s); it rejoins the cluster by itself
    cluster.stop()

Its methods block (an async test calls them through `asyncio.to_thread`), so one cluster can serve every test of a
module. The `rabbit_cluster` fixture of `tests/test_rabbitmq_cluster.py` wraps it. Without `rabbitmq-server`
installed the tests skip locally, and fail in CI.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ("RabbitCluster", "require_rabbitmq_server")

_SBIN = Path("/usr/lib/rabbitmq/bin")  # Debian's scripts that do not switch to the `rabbitmq` user first
START_TIMEOUT = 90.0


def rabbitmq_command(name: str) -> str | None:
    """The path of RabbitMQ's `name` script (`rabbitmq-server`, `rabbitmqctl`), or None when it is not here.

    `PAIGEANT_TEST_RABBITMQ_SBIN` names the folder that holds them; else Debian's own folder, else `PATH`.
    """
    folder = os.environ.get("PAIGEANT_TEST_RABBITMQ_SBIN")
    if folder:
        return str(Path(folder) / name) if (Path(folder) / name).exists() else None
    if (_SBIN / name).exists():
        return str(_SBIN / name)
    return shutil.which(name)


def require_rabbitmq_server() -> None:
    """Skip when RabbitMQ's server and `rabbitmqctl` are not installed here; fail in CI, where they must be."""
    missing = [name for name in ("rabbitmq-server", "rabbitmqctl", "epmd") if _which(name) is None]
    if missing:
        message = f"{', '.join(missing)} not found; the RabbitMQ cluster tests start three nodes of their own"
        if os.environ.get("CI"):
            pytest.fail(f"{message}. CI must provide RabbitMQ's server (set PAIGEANT_TEST_RABBITMQ_SBIN).")
        pytest.skip(message)


def _which(name: str) -> str | None:
    return shutil.which(name) if name == "epmd" else rabbitmq_command(name)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Node:
    """One node: its name, ports and folder, and the `rabbitmq-server` process running it (if any)."""

    name: str
    amqp_port: int
    dist_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    def beam_pid(self) -> int | None:
        """The pid of the node's Erlang VM (`beam.smp`), as the node wrote it once it booted."""
        with suppress(OSError, ValueError):
            return int((self.folder / "node.pid").read_text().strip())
        return None

    def log(self) -> str:
        """The tail of the node's logs, for a failing test."""
        texts = [path.read_text(errors="replace")[-2000:] for path in sorted(self.folder.glob("log/*.log"))]
        return f"--- {self.name}\n" + "\n".join(texts)


@dataclass
class RabbitCluster:
    """Three (or `size`) RabbitMQ nodes under `folder`, joined into one cluster."""

    folder: Path
    size: int = 3
    token: str = field(default_factory=lambda: secrets.token_hex(3))
    nodes: list[Node] = field(default_factory=list[Node])
    epmd_port: int = 0
    _epmd: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / ".erlang.cookie").write_text(secrets.token_hex(16))
        (self.folder / ".erlang.cookie").chmod(0o400)
        (self.folder / "enabled_plugins").write_text("[].\n")
        (self.folder / "rabbitmq-env.conf").write_text("")
        self.epmd_port = free_port()
        for number in range(1, self.size + 1):
            folder = self.folder / f"c{number}"
            (folder / "log").mkdir(parents=True, exist_ok=True)
            node = Node(f"paigeant-{self.token}-c{number}@localhost", free_port(), free_port(), folder)
            (folder / "rabbitmq.conf").write_text(
                f"listeners.tcp.default = 127.0.0.1:{node.amqp_port}\n"
                "log.console = false\n"
                "log.file.level = info\n"
                "disk_free_limit.absolute = 50MB\n"
            )
            self.nodes.append(node)

    @property
    def urls(self) -> list[str]:
        """One AMQP URL per node, in node order."""
        return [node.url for node in self.nodes]

    def env(self, node: Node | None = None) -> dict[str, str]:
        """The environment of a node's server, or of `rabbitmqctl`: this cluster's cookie, epmd and files only."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_")) and key != "HOME"
        }
        env.update(
            HOME=str(self.folder),  # where the cookie is, for the nodes and for rabbitmqctl
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_CONF_ENV_FILE=str(self.folder / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.folder / "enabled_plugins"),
        )
        if node is not None:
            env.update(
                RABBITMQ_NODENAME=node.name,
                RABBITMQ_NODE_PORT=str(node.amqp_port),
                RABBITMQ_DIST_PORT=str(node.dist_port),
                RABBITMQ_CONFIG_FILE=str(node.folder / "rabbitmq.conf"),
                RABBITMQ_MNESIA_BASE=str(node.folder / "mnesia"),
                RABBITMQ_LOG_BASE=str(node.folder / "log"),
                RABBITMQ_PID_FILE=str(node.folder / "node.pid"),
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            )
        return env

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start every node and join the others to the first; on any failure, stop what was started."""
        try:
            self._start_epmd()
            for node in self.nodes:
                self._spawn(node)  # they boot side by side
            first = self.nodes[0]
            for node in self.nodes:
                self._await_startup(node)
            for node in self.nodes[1:]:
                self.ctl(node, "stop_app")
                self.ctl(node, "join_cluster", first.name)
                self.ctl(node, "start_app")
            self.ctl(first, "await_online_nodes", str(self.size), timeout=START_TIMEOUT)
        except BaseException:
            print(self.logs())
            self.stop()
            raise

    def _start_epmd(self) -> None:
        epmd = shutil.which("epmd") or "epmd"
        self._epmd = subprocess.Popen(
            [epmd, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=self.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        for _ in range(50):
            with suppress(OSError):
                socket.create_connection(("127.0.0.1", self.epmd_port), timeout=1).close()
                return
            time.sleep(0.1)
        raise RuntimeError(f"epmd did not listen on port {self.epmd_port}")

    def _spawn(self, node: Node) -> None:
        (node.folder / "node.pid").unlink(missing_ok=True)
        with open(node.folder / "log" / "server.out", "ab") as out:
            node.process = subprocess.Popen(
                [rabbitmq_command("rabbitmq-server") or "rabbitmq-server"],
                env=self.env(node),
                cwd=node.folder,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,  # its own process group: `stop()` kills the script, the VM and its helpers
            )

    def _await_startup(self, node: Node) -> None:
        """Wait until the node has booted; `rabbitmqctl await_startup` fails until the VM registered with epmd."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.ctl(node, "await_startup", timeout=max(1.0, deadline - time.monotonic()))
                return
            except RuntimeError:
                if time.monotonic() > deadline or node.process is None or node.process.poll() is not None:
                    raise
            time.sleep(0.5)

    def kill(self, index: int) -> None:
        """SIGKILL the Erlang VM of node `index` (no clean stop: its connections drop as the sockets close)."""
        node = self.nodes[index]
        pid = node.beam_pid()
        assert pid is not None, f"{node.name} has not written its pid"
        os.kill(pid, signal.SIGKILL)
        if node.process is not None:
            node.process.wait(30)  # the script around the VM ends with it, and reaps it
            node.process = None

    def restart(self, index: int) -> None:
        """Start node `index` again on its data folder; return once it has rejoined the cluster (by itself)."""
        node = self.nodes[index]
        self._spawn(node)
        self._await_startup(node)
        self.ctl(node, "await_online_nodes", str(self.size), timeout=START_TIMEOUT)

    def stop(self) -> None:
        """Kill every process this cluster started: each node's process group, then its epmd."""
        for node in self.nodes:
            pid = node.beam_pid()
            if pid is not None and _is_beam(pid):
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process, node.process = node.process, None
            if process is not None:
                with suppress(subprocess.TimeoutExpired):
                    process.wait(5)  # the script reaps its VM as it ends
                with suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # what is left of the group: helpers, a VM not yet booted
                process.wait()
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            with suppress(ProcessLookupError):
                os.killpg(epmd.pid, signal.SIGKILL)
            epmd.wait()

    # -- rabbitmqctl -----------------------------------------------------------------------------------------

    def ctl(self, node: Node, *args: str, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl -n <node> <args>` with this cluster's cookie and epmd; its output. Fails loudly."""
        command = rabbitmq_command("rabbitmqctl") or "rabbitmqctl"
        extra = ("--timeout", str(int(timeout))) if args and args[0] in ("await_startup", "await_online_nodes") else ()
        try:
            done = subprocess.run(
                [command, "-n", node.name, *args, *extra],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} did not answer in {timeout + 30:g}s"
            ) from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} failed: {done.stderr.decode()}{done.stdout.decode()}"
            )
        return done.stdout.decode()

    def logs(self) -> str:
        return "\n".join(node.log() for node in self.nodes)


def _is_beam(pid: int) -> bool:
    """True if `pid` is an Erlang VM (a pid file can outlive its process, and the pid be reused)."""
    with suppress(OSError):
        return Path(f"/proc/{pid}/comm").read_text().strip().startswith("beam")
    return False
