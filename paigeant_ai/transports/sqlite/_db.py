"""`Database`: one SQLite connection on a thread of its own, whose queued work commits in one transaction per turn.

Why a thread of its own rather than `asyncio.to_thread`: a `sqlite3` connection belongs to the thread that uses it,
and the default executor is shared with whatever else the application runs there. Here one thread owns the one
connection, so no lock is needed, calls run in the order they were asked for, and the event loop never waits on
the disk. The thread takes everything queued since its last turn and runs it in one `BEGIN IMMEDIATE` transaction,
each call in a savepoint of its own (a failing call is rolled back alone): many steps publishing and acking at once
cost one commit, one fsync, instead of one each. A turn of reads only runs without the write lock, so idle
consumers that poll never keep writers of other processes waiting.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ...exceptions import TransportError, UserError
from ._schema import create_or_check

__all__ = ("Database", "translate")

logger = logging.getLogger("paigeant_ai.transports.sqlite")

_T = TypeVar("_T")
_BUSY_TIMEOUT_MS = 30_000
"""How long a transaction waits for another process's write lock before it fails (a batch holds it for
milliseconds; only a stuck process makes anyone wait this long)."""
_OLDEST_SQLITE = (3, 35)
"""The oldest SQLite the statements run on (`UPDATE ... RETURNING` came in 3.35)."""
_FIRST_NAP = 0.0002
_LONGEST_NAP = 0.005
"""The first and the longest pause, in seconds, of a wait for another process's write lock (see `_begin`)."""
_MOST_PER_TURN = 500
"""Most calls one transaction runs, so that no process holds the write lock for long."""


@dataclass(slots=True)
class _Call:
    run: Callable[[sqlite3.Connection], Any]
    write: bool
    doing: str
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def translate(path: Path, doing: str, exc: sqlite3.Error) -> TransportError:
    """The `TransportError` for `exc`, raised while `doing` something, naming the file and, where known, the fix."""
    name = getattr(exc, "sqlite_errorname", "")
    if name.startswith("SQLITE_FULL"):
        hint = "the disk is full: free space on it; nothing was written"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")):
        hint = "the file or its directory cannot be written: fix its permissions or set PAIGEANT_SQLITE_PATH"
    elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        hint = f"another process held the write lock for over {_BUSY_TIMEOUT_MS // 1000}s"
    else:
        hint = str(exc)
    return TransportError(f"SQLite at {path} failed while {doing}: {hint} ({name or type(exc).__name__}: {exc})")


class Database:
    """One connection to the file at `path`, used only by the thread this object starts (see the module)."""

    def __init__(self, path: Path, *, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._failed: TransportError | None = None

    async def open(self) -> None:
        """Start the thread, open the file (creating its schema on first use) and check it.

        Raises:
            UserError: Python's `sqlite3` uses an SQLite older than the statements need.
            TransportError: The file cannot be opened, or holds another schema version.
        """
        _check_sqlite_version()
        self._thread = threading.Thread(target=self._serve, name=f"paigeant-sqlite {self.path.name}", daemon=True)
        self._thread.start()
        try:
            await self.call(self._configure, doing="opening the database")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish what was asked, close the connection and stop the thread."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._calls.put(None)
        await asyncio.to_thread(thread.join)

    @property
    def opened(self) -> bool:
        return self._thread is not None

    async def call(self, run: Callable[[sqlite3.Connection], _T], *, write: bool = True, doing: str) -> _T:
        """Run `run(connection)` on the database's thread, in the next transaction, and return what it returns.

        Raises:
            TransportError: The database is closed, or SQLite failed (the message names the file and the fix).
        """
        if self._thread is None:
            raise TransportError("the SQLite transport is not connected: call `await transport.connect()` first")
        if self._failed is not None:
            raise self._failed
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._calls.put(_Call(run, write, doing, future, loop))
        return await future

    # -- on the database's thread --------------------------------------------------------------------------------

    def _configure(self, connection: sqlite3.Connection) -> None:
        create_or_check(connection, self.path)

    def _serve(self) -> None:
        try:
            connection = self._connect()
        except sqlite3.Error as exc:
            self._refuse_until_closed(translate(self.path, "opening the database", exc))
            return
        turn: list[_Call] | None = None
        try:
            while (turn := self._next_turn()) is not None:
                self._run_turn(connection, turn)
        except Exception as exc:  # a bug, not SQLite: fail what waits rather than leave it waiting for ever
            logger.exception("the SQLite thread of %s stopped", self.path)
            failed = TransportError(f"the SQLite thread of {self.path} stopped: {exc!r}")
            self._fail_all(failed, turn or [])
            self._refuse_until_closed(failed)
        finally:
            connection.close()

    def _refuse_until_closed(self, error: TransportError) -> None:
        """Fail every call with `error` until the database closes: a call asked just as the thread failed is
        answered too, rather than left waiting for a thread that stopped."""
        self._failed = error
        while (turn := self._next_turn()) is not None:
            self._fail_all(error, turn)

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {self.synchronous}")
        connection.execute("PRAGMA foreign_keys = OFF")
        return connection

    def _next_turn(self) -> list[_Call] | None:
        """The calls queued now (waiting for the first); None once the database is closing and nothing is left."""
        first = self._calls.get()
        if first is None:
            return None
        turn = [first]
        while len(turn) < _MOST_PER_TURN:
            try:
                more = self._calls.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._calls.put(None)  # close after this turn
                break
            turn.append(more)
        return turn

    def _run_turn(self, connection: sqlite3.Connection, turn: list[_Call]) -> None:
        """Run `turn` in one transaction. A call that fails the whole transaction (a full disk) fails alone: the
        others run again in the next one."""
        turn = [call for call in turn if not call.future.cancelled()]  # nobody waits for them: not run
        while turn:
            outcomes: list[tuple[_Call, bool, Any]] = []
            try:
                _begin(connection, write=any(call.write for call in turn))
                for call in turn:
                    outcomes.append(self._run_one(connection, call))
                connection.execute("COMMIT")
            except _TurnFailed as failed:
                if connection.in_transaction:
                    connection.rollback()
                _resolve_all([(failed.call, False, translate(self.path, failed.call.doing, failed.cause))])
                turn = [call for call in turn if call is not failed.call]
                continue
            except sqlite3.Error as exc:  # BEGIN or COMMIT: nothing of the turn was written
                if connection.in_transaction:
                    connection.rollback()
                others = f" (in a transaction with {len(turn) - 1} more calls)" if len(turn) > 1 else ""
                self._fail_all(translate(self.path, turn[0].doing + others, exc), turn)
                return
            _resolve_all(outcomes)
            return

    def _run_one(self, connection: sqlite3.Connection, call: _Call) -> tuple[_Call, bool, Any]:
        connection.execute("SAVEPOINT call")
        try:
            value = call.run(connection)
        except sqlite3.Error as exc:
            if _fatal(exc) or not connection.in_transaction:  # SQLite rolled the whole transaction back
                raise _TurnFailed(call, exc) from exc
            connection.execute("ROLLBACK TO call")
            connection.execute("RELEASE call")
            return call, False, translate(self.path, call.doing, exc)
        except Exception as exc:
            connection.execute("ROLLBACK TO call")
            connection.execute("RELEASE call")
            return call, False, exc
        connection.execute("RELEASE call")
        return call, True, value

    def _fail_all(self, error: TransportError, turn: list[_Call]) -> None:
        _resolve_all([(call, False, error) for call in turn])


def _check_sqlite_version() -> None:
    if sqlite3.sqlite_version_info < _OLDEST_SQLITE:
        oldest, found = ".".join(map(str, _OLDEST_SQLITE)), sqlite3.sqlite_version
        raise UserError(
            f"the SQLite transport needs SQLite {oldest} or newer; this Python's sqlite3 uses {found}: "
            "run a Python built with a newer SQLite (`uv python install` gives one), or use another transport"
        )


class _TurnFailed(Exception):
    """A call failed in a way that ends its whole transaction: every call of the turn fails with it."""

    def __init__(self, call: _Call, cause: sqlite3.Error) -> None:
        super().__init__(str(cause))
        self.call = call
        self.cause = cause


def _fatal(exc: sqlite3.Error) -> bool:
    """True for an error that fails the whole transaction (a full disk, a read-only file), not one call."""
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith(("SQLITE_FULL", "SQLITE_READONLY", "SQLITE_IOERR", "SQLITE_BUSY", "SQLITE_CORRUPT"))


def _begin(connection: sqlite3.Connection, *, write: bool) -> None:
    """Begin a transaction; one that writes takes the write lock now, waiting while another process holds it.

    SQLite's own wait sleeps 1 ms at first, then ever longer (2, 5, 10, ... 100 ms), while another process holds
    the lock for about a millisecond a turn, so worker processes on one file slept through much of their time: two
    made 1.04 times the hops a second of one, four 1.10 times (`bench/processes.py`). Here the wait starts at
    0.2 ms and grows by half each time up to 5 ms, until the busy timeout: two made 1.28 times, four 1.36 times.
    """
    if not write:
        connection.execute("BEGIN")
        return
    nap, deadline = _FIRST_NAP, time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    connection.execute("PRAGMA busy_timeout = 0")
    try:
        while True:
            try:
                connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if not _busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(nap)
            nap = min(nap * 1.5, _LONGEST_NAP)
    finally:
        connection.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")


def _busy(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorname", "").startswith("SQLITE_BUSY")


def _resolve_all(outcomes: list[tuple[_Call, bool, Any]]) -> None:
    """Answer calls (a turn's, or those that failed), waking each event loop once for all of them."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Call, bool, Any]]] = {}
    for outcome in outcomes:
        by_loop.setdefault(outcome[0].loop, []).append(outcome)
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_answer, answers)
        except RuntimeError:  # its event loop closed: nobody waits for them any more
            logger.debug("a turn's event loop closed before its answers")


def _answer(answers: list[tuple[_Call, bool, Any]]) -> None:
    for call, ok, value in answers:
        if call.future.done():
            continue
        if ok:
            call.future.set_result(value)
        else:
            call.future.set_exception(value)
