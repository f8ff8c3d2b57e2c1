"""`paigeant worker --processes N`: a supervisor that keeps N worker processes running, and each one's link to it.

The supervisor never imports the worker's module and never connects to a broker. Each child is a whole
`paigeant worker` process (`python -m paigeant_ai.cli worker <target> --prefork-child i/N:fd`) with its own
connections and event loop, so a child that dies is one crashed worker: its unacked deliveries go back to the
broker, and the supervisor starts another after a short backoff. A child and its supervisor hold one end each of
a socket pair:

- the child says `ready` once it consumes its queues, or why it could not start. A child that ends before it is
  ready failed at startup; a `PaigeantError` then (a bad target, bad settings, a broker it cannot reach) is not
  mended by starting it again, so the supervisor stops the others and exits with that error, once. Any other
  failure is tried again, a few times.
- the child says, when ready, how long its graceful stop may take (its `shutdown_timeout` and `STOP_MARGIN`); a
  child still running that long after the supervisor's SIGTERM is hung, and is killed.
- a thread of the child reads its end until it closes: the supervisor is gone (even after `kill -9`), and the child
  stops gracefully instead of running on, orphaned; a child still there once its stop may be over (its event loop
  is blocked) is killed, so that nothing outlives the supervisor.

Children ignore SIGINT, and run in a process group of their own from the moment they start: a Ctrl-C in a terminal
reaches only the supervisor, which turns it into one graceful stop of every child (SIGTERM). A second SIGTERM or
SIGINT kills them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .exceptions import PaigeantError, UserError
from .settings import Settings

__all__ = (
    "ChildSlot",
    "Supervisor",
    "SupervisorLink",
    "child_command",
    "in_memory_refusal",
    "process_count",
    "run_as_child",
)

logger = logging.getLogger("paigeant_ai.prefork")

FIRST_RESTART_DELAY = 0.5
"""Seconds before a child that died is started again; doubled for each death in a row, up to `MAX_RESTART_DELAY`."""
MAX_RESTART_DELAY = 10.0
STABLE_AFTER = 30.0
"""Seconds a child must have run for its death to start the backoff over."""
STARTUP_ATTEMPTS = 3
"""Starts in a row that end before the child is ready, after which the supervisor gives up."""
LINK_DRAIN = 1.0
"""Seconds to read what a child that exited still said: a grandchild may hold its end open."""
STOP_MARGIN = 15.0
"""Seconds a worker's graceful stop may take beyond its `shutdown_timeout` (events to flush, connections to close)."""
UNREADY_STOP_WITHIN = 30.0 + STOP_MARGIN
"""Seconds a child that never said it was ready gets to stop: a worker's default `shutdown_timeout` and the margin."""


@dataclass(frozen=True, slots=True)
class ChildSlot:
    """Which of the supervisor's children a worker process is: `index` of `count`, counted from 1."""

    index: int
    count: int

    @property
    def label(self) -> str:
        return f"worker {self.index}/{self.count}"

    def option(self, fd: int) -> str:
        """The value of `--prefork-child` that tells a child which it is and where its link is."""
        return f"{self.index}/{self.count}:{fd}"


def in_memory_refusal(processes: int) -> str:
    """Why a worker on the in-memory transport cannot run as several processes, and what to do instead."""
    return (
        f"the in-memory transport lives in one process, so {processes} processes would not share its queues: "
        "run --processes 1, or run on a broker: --transport redis|rabbitmq (or PAIGEANT_TRANSPORT)"
    )


def process_count(given: int | None) -> int:
    """How many worker processes to run: `--processes` when given, else `PAIGEANT_PROCESSES`, at least 1.

    Raises:
        UserError: Fewer than one.
    """
    processes = Settings.from_env().processes if given is None else given
    if processes < 1:
        source = "--processes" if given is not None else "PAIGEANT_PROCESSES"
        raise UserError(f"{source} must be at least 1, got {processes}")
    return processes


def child_command(target: str, options: Sequence[str]) -> list[str]:
    """The command line of each child: `paigeant worker <target> <options>`, in a Python process of its own.

    The broker's URL is not on it (`ps` would show a password): a child inherits the `PAIGEANT_*` environment.
    """
    return [sys.executable, "-m", "paigeant_ai.cli", "worker", target, *options]


# -- the child's side --------------------------------------------------------------------------------------------


class SupervisorLink:
    """A child's end of its socket pair with the supervisor: what it says to it, and how it notices it is gone."""

    def __init__(self, slot: ChildSlot, sock: socket.socket) -> None:
        self.slot = slot
        self.is_ready = False
        self._sock = sock

    @classmethod
    def from_option(cls, value: str) -> SupervisorLink:
        """The link a `--prefork-child i/N:fd` option names; from now on this process ignores SIGINT.

        Raises:
            UserError: The value is not of that form (the option is the supervisor's, not for people).
        """
        try:
            where, _, fd = value.partition(":")
            index, _, count = where.partition("/")
            slot, sock = ChildSlot(int(index), int(count)), socket.socket(fileno=int(fd))
        except (ValueError, OSError):
            raise UserError(f"--prefork-child {value!r} is not the supervisor's; run --processes N instead") from None
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor turns the terminal's Ctrl-C into a SIGTERM
        sock.set_inheritable(False)  # a process this worker starts must not keep the supervisor's link open
        sock.setblocking(False)
        return cls(slot, sock)

    def ready(self, stop_within: float) -> None:
        """Tell the supervisor this worker consumes its queues: from now on its death is a crash, not a startup;
        and that its graceful stop takes at most `stop_within` seconds: after that, it is hung."""
        self._send({"ready": True, "stop_within": stop_within})
        self.is_ready = True

    def failed(self, reason: str, *, fatal: bool) -> None:
        """Tell the supervisor why this worker could not start; `fatal` when starting it again cannot help."""
        self._send({"failed": reason[:2000], "fatal": fatal})

    def stop_when_gone(self, stop: Callable[[], None], stop_within: float) -> None:
        """Call `stop` in the running event loop once the supervisor's end closes (it exited or was killed), and
        kill this process if it is still there `stop_within` seconds later.

        A thread watches, not the event loop: a step that blocks the loop must not keep an orphan alive.
        """
        loop = asyncio.get_running_loop()
        watched = self._sock.dup()  # its own descriptor: closing the link when the worker ends does not touch it
        watched.setblocking(True)

        def watch() -> None:
            with contextlib.suppress(OSError):
                while watched.recv(64):  # the supervisor never writes: only its end closing ends this
                    pass
            logger.warning("the supervisor is gone: stopping gracefully")
            with contextlib.suppress(RuntimeError):  # the loop is closed: this process is ending anyway
                loop.call_soon_threadsafe(stop)
            time.sleep(stop_within)
            logger.error("still running %gs after the supervisor went: killing this worker process", stop_within)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch, name=f"paigeant-{self.slot.label}-link", daemon=True).start()

    def close(self) -> None:
        self._sock.close()

    def _send(self, message: dict[str, object]) -> None:
        with contextlib.suppress(OSError):  # a supervisor that is gone hears nothing, and this worker stops anyway
            self._sock.send(json.dumps(message).encode() + b"\n")


def run_as_child(link: SupervisorLink, run: Callable[[], int]) -> int:
    """Run the worker as the supervisor's child: an error before it is ready goes to the supervisor, which says it
    once for all its children, instead of to stderr."""
    try:
        return run()
    except PaigeantError as exc:
        if link.is_ready:
            raise
        link.failed(str(exc), fatal=True)
        return 2
    except Exception as exc:
        if not link.is_ready:
            link.failed(f"{type(exc).__name__}: {exc}", fatal=False)
        raise
    finally:
        link.close()


# -- the supervisor ----------------------------------------------------------------------------------------------


@dataclass
class _Child:
    """One started child: its process, and what it said over its link."""

    slot: ChildSlot
    process: asyncio.subprocess.Process
    ready_at: float | None = None
    stop_within: float = UNREADY_STOP_WITHIN
    failure: str | None = None
    fatal: bool = False
    listening: asyncio.Task[None] | None = None

    def how_it_ended(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Supervisor:
    """Runs `count` children of `command` and keeps them running until SIGTERM or SIGINT.

    Args:
        command: The child's command line, to which each child's `--prefork-child` option is added.
        count: How many children run at once.
        target: The worker they run, for what the supervisor says.
    """

    def __init__(self, command: Sequence[str], count: int, target: str) -> None:
        self.command = list(command)
        self.count = count
        self.target = target
        self.restarts = 0
        self._children: dict[int, _Child] = {}
        self._stopping = asyncio.Event()
        self._forced = False
        self._killed_hung = 0
        self._error: str | None = None
        self._announced = False

    async def run(self) -> int:
        """Run the children until a signal stops them (0; 1 after a second signal killed them).

        Raises:
            UserError: A child could not start: its error, or how it failed the last of `STARTUP_ATTEMPTS` times.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            await asyncio.gather(*(self._keep_running(ChildSlot(i, self.count)) for i in range(1, self.count + 1)))
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if self._error is not None:
            raise UserError(self._error)
        how = "killed at once" if self._forced else "stopped"
        restarted = f", {self.restarts} restarted on the way" if self.restarts else ""
        hung = f", {self._killed_hung} killed as hung" if self._killed_hung else ""
        print(f"supervisor stopped: {self.count} worker processes {how}{restarted}{hung}", file=sys.stderr)
        return 1 if self._forced or self._killed_hung else 0

    async def _keep_running(self, slot: ChildSlot) -> None:
        """Start the child of `slot`, and start it again whenever it dies, until the supervisor stops."""
        failed_starts = deaths = 0
        while not self._stopping.is_set():
            child = await self._start(slot)
            await self._wait(child)
            if self._stopping.is_set() or (child.process.returncode == 0 and "--burst" in self.command):
                return  # stopped, or done (`--burst`): nothing to start again
            if child.ready_at is None:
                failed_starts += 1
                if child.fatal or failed_starts >= STARTUP_ATTEMPTS:
                    self._give_up(child, failed_starts)
                    return
            else:
                failed_starts = 0
                deaths = 0 if time.monotonic() - child.ready_at >= STABLE_AFTER else deaths
            delay = min(MAX_RESTART_DELAY, FIRST_RESTART_DELAY * 2**deaths)
            deaths += 1
            logger.warning(
                "%s (pid %d) %s; starting another in %.1fs",
                slot.label,
                child.process.pid,
                child.how_it_ended(),
                delay,
            )
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stopping.wait()

    async def _start(self, slot: ChildSlot) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command,
                *("--prefork-child", slot.option(theirs.fileno())),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,  # not the terminal's: a background process group may not read it
                process_group=0,  # out of the terminal's reach while it imports, before it can ignore SIGINT
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child holds it now: its end closes when the child exits
        child = self._children[slot.index] = _Child(slot, process)
        if self._stopping.is_set():  # a signal came while it was being started
            self._signal(child, signal.SIGKILL if self._forced else signal.SIGTERM)
        child.listening = asyncio.create_task(self._listen(child, ours), name=f"paigeant-{slot.label}")
        return child

    async def _wait(self, child: _Child) -> None:
        """Wait for the child to exit, then for what it said last."""
        await child.process.wait()
        if child.listening is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LINK_DRAIN):
                    await child.listening

    async def _listen(self, child: _Child, sock: socket.socket) -> None:
        """Read what the child says until its end closes."""
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            async for line in reader:
                self._heard(child, line)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _heard(self, child: _Child, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if message.get("ready") is True:
            child.ready_at = time.monotonic()
            if isinstance(within := message.get("stop_within"), int | float) and within > 0:
                child.stop_within = float(within)
            self._announce()
        elif isinstance(reason := message.get("failed"), str):
            child.failure, child.fatal = reason, message.get("fatal") is True

    def _announce(self) -> None:
        """Say once, when every child is ready for the first time, what runs and how to stop it."""
        if self._announced or len(self._children) < self.count:
            return
        if any(child.ready_at is None for child in self._children.values()):
            return
        self._announced = True
        pids = ", ".join(str(self._children[i].process.pid) for i in sorted(self._children))
        print(
            f"paigeant: supervisor {os.getpid()} runs {self.count} worker processes of {self.target} (pids {pids}); "
            "SIGTERM or Ctrl-C stops them gracefully",
            file=sys.stderr,
        )

    def _give_up(self, child: _Child, attempts: int) -> None:
        """Stop the other children and remember why: the supervisor then exits with it."""
        if self._error is None:
            if child.fatal and child.failure is not None:
                self._error = child.failure
            else:
                why = child.failure or child.how_it_ended()
                self._error = f"{child.slot.label} failed {attempts} times as it started: {why}"
        self._stop(signal.SIGTERM)

    def _on_signal(self) -> None:
        if not self._stopping.is_set():
            print(
                f"paigeant: stopping {self.count} worker processes gracefully; a second signal stops them at once",
                file=sys.stderr,
            )
            self._stop(signal.SIGTERM)
        elif not self._forced:
            self._forced = True
            print(
                "paigeant: killing the worker processes; what they held unacked goes back to the broker",
                file=sys.stderr,
            )
            self._stop(signal.SIGKILL)

    def _stop(self, sig: signal.Signals) -> None:
        self._stopping.set()
        for child in self._children.values():
            self._signal(child, sig)

    def _signal(self, child: _Child, sig: signal.Signals) -> None:
        """Send `sig` to a running child; after a SIGTERM, kill it if it has not stopped by its deadline."""
        if child.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(sig)
        if sig == signal.SIGTERM:
            asyncio.get_running_loop().call_later(child.stop_within, self._kill_if_hung, child)

    def _kill_if_hung(self, child: _Child) -> None:
        if child.process.returncode is not None:
            return
        logger.error(
            "%s (pid %d) did not stop within %gs of SIGTERM: killing it; what it held goes back to the broker",
            child.slot.label,
            child.process.pid,
            child.stop_within,
        )
        self._killed_hung += 1
        with contextlib.suppress(ProcessLookupError):
            child.process.kill()
