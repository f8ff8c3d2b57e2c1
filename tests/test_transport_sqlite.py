"""The transport contract, and what only the SQLite transport does, on a file in the test's temporary directory."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from paigeant_ai import ActivityContext, FunctionActivity, Worker
from paigeant_ai.cli import worker_banner
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import TransportError, UserError
from paigeant_ai.transports import Transport, get_transport
from paigeant_ai.transports.base import (
    REASON_HEADER,
    SOURCE_HEADER,
    Advertising,
    Cancellations,
    ConsumerWatch,
    ProgressStreams,
    SharedClaims,
    SharedStores,
)
from paigeant_ai.transports.sqlite import SCHEMA_VERSION, SQLiteTransport
from paigeant_ai.transports.sqlite._sweep import sweep

from .brokers import ROOT
from .transport_contract import TransportContract, address, receive, receive_nothing


class TestSQLiteContract(TransportContract):
    @pytest.fixture(autouse=True)
    def _path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "paigeant.sqlite3"

    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        async with self.new_transport() as transport:
            yield transport

    def new_transport(self) -> SQLiteTransport:
        return SQLiteTransport(self.path)


def test_get_transport_builds_it_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "SQLite")
    monkeypatch.setenv("PAIGEANT_SQLITE_PATH", str(tmp_path / "work.db"))
    monkeypatch.setenv("PAIGEANT_NAMESPACE", "orders")
    transport = get_transport()
    assert isinstance(transport, SQLiteTransport)
    assert (transport.path, transport.namespace) == (tmp_path / "work.db", "orders")


def test_the_default_file_is_in_the_working_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PAIGEANT_SQLITE_PATH", raising=False)
    monkeypatch.chdir(tmp_path)
    assert SQLiteTransport().path == tmp_path / "paigeant.sqlite3"


def test_settings_are_checked() -> None:
    with pytest.raises(UserError, match="visibility_timeout"):
        SQLiteTransport(visibility_timeout=0)
    with pytest.raises(UserError, match="max_deliveries"):
        SQLiteTransport(max_deliveries=0)
    with pytest.raises(UserError, match="synchronous"):
        SQLiteTransport(synchronous="off")  # pyright: ignore[reportArgumentType]


def test_it_declares_every_capability_redis_declares() -> None:
    transport = SQLiteTransport("unused.sqlite3")
    for capability in (ConsumerWatch, SharedClaims, SharedStores, Cancellations, Advertising, ProgressStreams):
        assert isinstance(transport, capability), capability.__name__
    assert callable(transport.join_store)
    assert not transport.process_local


async def test_the_file_is_in_wal_mode_with_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    async with SQLiteTransport(path) as transport:
        await transport.publish("a", b"x")
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_a_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "newer.sqlite3"
    async with SQLiteTransport(path):
        pass
    with sqlite3.connect(path) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(TransportError, match=r"schema version 2.*written by a newer paigeant-ai"):
        await SQLiteTransport(path).connect()


def make_read_only(folder: Path, path: Path, *, writable: bool = False) -> None:
    path.chmod(stat.S_IRUSR | (stat.S_IWUSR if writable else 0))
    folder.chmod(stat.S_IRWXU if writable else stat.S_IRUSR | stat.S_IXUSR)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only files")
async def test_a_read_only_file_is_a_transport_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "ro.sqlite3"
    async with SQLiteTransport(path) as transport:
        await transport.publish("a", b"x")
    make_read_only(tmp_path, path)
    try:
        with pytest.raises(TransportError, match=rf"SQLite at {path}.*cannot be written"):
            async with SQLiteTransport(path) as transport:
                await transport.publish("a", b"y")
    finally:
        make_read_only(tmp_path, path, writable=True)


async def test_a_file_that_cannot_be_opened_fails_connect_clearly(tmp_path: Path) -> None:
    path = tmp_path / "no-such-folder" / "x.sqlite3"  # a typo in PAIGEANT_SQLITE_PATH: connect fails, never hangs
    for _ in range(3):
        transport = SQLiteTransport(path)
        with pytest.raises(TransportError, match=rf"SQLite at {path} failed while opening the database: the file"):
            await asyncio.wait_for(transport.connect(), 10)
        assert not transport.db.opened


async def test_an_sqlite_older_than_it_needs_is_refused_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))  # Ubuntu 20.04's, which has no RETURNING
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    transport = SQLiteTransport(tmp_path / "old.sqlite3")
    with pytest.raises(UserError, match=r"needs SQLite 3\.35 or newer; this Python's sqlite3 uses 3\.31\.1"):
        await transport.connect()
    assert not transport.db.opened
    assert not (tmp_path / "old.sqlite3").exists()


async def test_a_file_that_may_not_be_written_fails_the_publish_clearly(tmp_path: Path) -> None:
    path = tmp_path / "query-only.sqlite3"
    async with SQLiteTransport(path) as transport:
        await asyncio.sleep(0)  # the sweep a transport starts with goes first
        await transport.db.call(lambda db: None, write=False, doing="waiting for the first sweep")
        await transport.db.call(lambda db: db.execute("PRAGMA query_only = 1"), doing="making it read-only")
        with pytest.raises(TransportError, match=rf"SQLite at {path} failed while publishing to 'a': the file"):
            await transport.publish("a", b"y")
        assert await transport.pending("a") == 0


async def test_a_full_disk_fails_the_publish_and_keeps_nothing_half_written(tmp_path: Path) -> None:
    path = tmp_path / "full.sqlite3"
    async with SQLiteTransport(path) as transport:
        await transport.publish("a", b"small")

        def cap(db: sqlite3.Connection) -> None:  # a file that may not grow: what a full disk does
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            db.execute(f"PRAGMA max_page_count = {pages}")

        await transport.db.call(cap, doing="capping the file")
        with pytest.raises(TransportError, match=rf"SQLite at {path}.*disk is full"):
            await transport.publish("a", os.urandom(1_000_000))
        assert await transport.pending("a") == 1
        async with await transport.consume("a") as consumer:
            assert (await receive(consumer)).body == b"small"


async def test_a_dead_processes_deliveries_come_back_counted(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    async with SQLiteTransport(path, visibility_timeout=0.5) as transport:
        where = address()
        await transport.publish(where, b"first")
        # Another process leased it and died: its lease is never renewed.
        with sqlite3.connect(path) as raw:
            raw.execute("UPDATE messages SET lease_owner = 'dead', lease_until = 0, delivery_count = 1")
        async with await transport.consume(where) as consumer:
            delivery = await receive(consumer)
            assert (delivery.body, delivery.delivery_count, delivery.redelivered) == (b"first", 2, True)
            await transport.ack(delivery)
        assert await transport.pending(where) == 0


async def test_a_live_consumer_keeps_what_it_holds(tmp_path: Path) -> None:
    path = tmp_path / "lease.sqlite3"
    async with (
        SQLiteTransport(path, visibility_timeout=0.3) as one,
        SQLiteTransport(path, visibility_timeout=0.3) as other,
    ):
        where = address()
        await one.publish(where, b"long step")
        async with await one.consume(where) as slow:
            delivery = await receive(slow)
            async with await other.consume(where) as idle:
                # The step runs for several visibility timeouts; its lease is renewed, so nobody else takes it.
                await receive_nothing(idle, within=1.5)
            await one.ack(delivery)


async def test_too_many_deliveries_dead_letter_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "poison.sqlite3"
    async with SQLiteTransport(path, max_deliveries=2) as transport:
        where = address()
        await transport.publish(where, b"crashes its worker")
        for _ in range(2):
            consumer = await transport.consume(where)
            await receive(consumer)
            await consumer.aclose()  # as if its process died: delivered again
        async with await transport.consume(where) as consumer:
            await receive_nothing(consumer)
        async with await transport.consume("dead-letter") as dead:
            letter = await receive(dead)
        assert letter.body == b"crashes its worker"
        assert letter.headers[SOURCE_HEADER] == where
        assert "delivered 3 times" in letter.headers[REASON_HEADER]
        assert await transport.pending(where) == 0


async def test_another_processes_publish_is_found_by_polling(tmp_path: Path) -> None:
    path = tmp_path / "poll.sqlite3"
    async with SQLiteTransport(path, poll_interval=0.05) as worker, SQLiteTransport(path) as dispatcher:
        where = address()
        async with await worker.consume(where) as consumer:
            await asyncio.sleep(0.3)  # idle: the consumer polls at its longest interval
            await dispatcher.publish(where, b"from elsewhere")
            assert (await receive(consumer, within=1.0)).body == b"from elsewhere"


async def test_events_and_dead_letters_stay_bounded(tmp_path: Path) -> None:
    async with SQLiteTransport(tmp_path / "cap.sqlite3", trim_length=5) as transport:
        for i in range(20):
            await transport.publish("events", str(i).encode())
        assert await transport.pending("events") == 5
        async with await transport.consume("events") as consumer:
            assert (await receive(consumer)).body == b"15"


async def test_namespaces_share_a_file_apart(tmp_path: Path) -> None:
    path = tmp_path / "ns.sqlite3"
    async with SQLiteTransport(path, namespace="a") as a, SQLiteTransport(path, namespace="b") as b:
        await a.publish("step", b"for a")
        assert (await a.pending("step"), await b.pending("step")) == (1, 0)
        assert await a.claim("k", "one", ttl=60) is None
        assert await b.claim("k", "two", ttl=60) is None
        assert await a.claim("k", "three", ttl=60) == "one"


async def test_claims_are_claimed_once_until_released_or_expired(tmp_path: Path) -> None:
    async with SQLiteTransport(tmp_path / "claims.sqlite3") as transport:
        assert await transport.claim("dispatched:x", "me", ttl=60) is None
        assert await transport.claim("dispatched:x", "you", ttl=60) == "me"
        await transport.release("dispatched:x", "you")
        assert await transport.claim("dispatched:x", "you", ttl=60) == "me"
        await transport.release("dispatched:x", "me")
        assert await transport.claim("dispatched:x", "you", ttl=0.1) is None
        await asyncio.sleep(0.2)
        assert await transport.claim("dispatched:x", "them", ttl=60) is None


async def test_the_replay_cache_keeps_redis_semantics(tmp_path: Path) -> None:
    async with SQLiteTransport(tmp_path / "replay.sqlite3") as transport:
        cache = transport.replay_cache()

        async def claim(message_id: str, digest: str, holder: str, *, redelivered: bool, lease: float = 60.0) -> str:
            return await cache.claim(
                message_id, digest, sent_at=0.0, redelivered=redelivered, lease=lease, ttl=600.0, holder=holder
            )

        assert await claim("m", "d", "h1", redelivered=False) == "claimed"
        assert await claim("m", "d", "h2", redelivered=False) == "running"
        assert await claim("m", "other", "h2", redelivered=False) == "duplicate"
        assert await cache.renew("m", "d", 60.0, "h2") == "taken"
        assert await cache.renew("m", "d", 60.0, "h1") == "renewed"
        # A renewed claim is not taken over by a redelivery: its worker handed the delivery back.
        assert await claim("m", "d", "h3", redelivered=True) == "running"
        await cache.settle("m", "d", 600.0)
        assert await claim("m", "d", "h3", redelivered=True) == "settled"
        assert await cache.renew("m", "d", 60.0, "h1") == "gone"
        assert await claim("n", "d", "a", redelivered=False, lease=0.01) == "claimed"
        await asyncio.sleep(0.05)
        assert await claim("n", "d", "b", redelivered=False) == "claimed"  # its lease lapsed
        assert await claim("o", "d", "a", redelivered=False) == "claimed"
        assert await claim("o", "d", "b", redelivered=True) == "claimed"  # a running claim's redelivery takes it


async def test_dedupe_and_join_stores(tmp_path: Path) -> None:
    async with SQLiteTransport(tmp_path / "stores.sqlite3") as transport:
        dedupe = transport.dedupe_store()
        assert not await dedupe.is_done("k")
        await dedupe.mark_done("k")
        assert await dedupe.is_done("k")
        joins = transport.join_store()
        assert await joins.add("g", "a", b"ra", ttl=0) == (1, None)
        assert await joins.add("g", "b", b"rb", ttl=0) == (2, None)
        assert await joins.fail("g", b"mark", ttl=60) == (b"mark", {"a": b"ra", "b": b"rb"})
        assert await joins.fail("g", b"later", ttl=60) == (b"mark", {"a": b"ra", "b": b"rb"})
        assert (await joins.replace_mark("g", b"mark", b"new"))[0] == b"new"
        assert await joins.add("g", "c", b"rc", ttl=0) == (3, b"new")
        assert await joins.hold_wait("g", "a", ttl=60) == "a"
        assert await joins.hold_wait("g", "b", ttl=60) == "a"
        await joins.release_wait("g", "a")
        assert await joins.hold_wait("g", "b", ttl=60) == "b"
        await joins.delete("g")
        assert await joins.records("g") == {}
        assert await joins.hold_wait("g", "c", ttl=60) == "c"


async def test_boards_and_progress_are_shared_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "boards.sqlite3"
    async with SQLiteTransport(path) as one, SQLiteTransport(path) as other:
        await one.cancel_board().post("wf", b"cancel", ttl=60)
        await one.cancel_board().post("wf", b"cancel", ttl=120)
        assert await other.cancel_board().records("wf") == [b"cancel"]
        assert await other.cancel_board().cancelled_among(["wf", "other"]) == {"wf": [b"cancel"]}
        await one.registry_board().post("w1", b"record", ttl=60)
        await one.registry_board().post("w1", b"newer", ttl=60)
        assert await other.registry_board().records() == [b"newer"]
        reader = await other.read_progress("wf")
        assert await reader.read(0.05) == []
        await one.append_progress("wf", b"batch", {"k": "v"})
        [entry] = await reader.read(1.0)
        assert (entry.body, entry.headers) == (b"batch", {"k": "v"})
        later = await other.read_progress("wf", after=entry.position)
        assert await later.read(0.05) == []


async def test_consumers_are_watched_through_their_heartbeats(tmp_path: Path) -> None:
    path = tmp_path / "watch.sqlite3"
    async with SQLiteTransport(path) as one, SQLiteTransport(path) as other:
        assert await other.consumers("step") == 0
        assert await other.last_consumed("step") is None
        async with await one.consume("step"):
            assert await other.consumers("step") == 1
            assert await other.consumed_addresses() == ["step"]
        assert await other.consumers("step") == 0
        assert await other.last_consumed("step") is not None


async def test_the_waiting_store_round_trips_records(tmp_path: Path) -> None:
    async with SQLiteTransport(tmp_path / "wait.sqlite3") as transport:
        store = transport.waiting_store()
        assert await store.waiting() == []
        assert await store.get("nobody") is None
        with sqlite3.connect(transport.path) as raw:
            raw.execute("INSERT INTO waiting VALUES ('paigeant', 'wf', 'm', x'00', 0)")
        assert await store.waiting() == []  # not a parked record: left out, with a logged reason


def test_the_onboarding_example_runs_durably_on_sqlite(tmp_path: Path) -> None:
    env = {**os.environ, "PAIGEANT_SQLITE_PATH": str(tmp_path / "onboarding.sqlite3")}
    for name in ("PAIGEANT_TRANSPORT", "PAIGEANT_SIGNING_KEY", "PAIGEANT_SIGNING_KEY_FILE", "PAIGEANT_ALLOW_UNSIGNED"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "examples.onboarding", "--transport", "sqlite"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "on the sqlite transport" in result.stdout
    assert '"welcome_email": "Welcome aboard! Your premium account is ready."' in result.stdout
    with sqlite3.connect(tmp_path / "onboarding.sqlite3") as raw:
        assert raw.execute("SELECT count(*) FROM messages WHERE address != 'events'").fetchone()[0] == 0


def onboarding(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """The onboarding example on SQLite in `tmp_path`, its output read line by line."""
    env = {**os.environ, "PAIGEANT_SQLITE_PATH": str(tmp_path / "onboarding.sqlite3")}
    for name in ("PAIGEANT_TRANSPORT", "PAIGEANT_SIGNING_KEY", "PAIGEANT_SIGNING_KEY_FILE", "PAIGEANT_ALLOW_UNSIGNED"):
        env.pop(name, None)
    command = [sys.executable, "-u", "-m", "examples.onboarding", "--transport", "sqlite", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_the_onboarding_example_killed_mid_step_finishes_the_same_workflow_when_started_again(tmp_path: Path) -> None:
    with onboarding(tmp_path, "--pause", "2") as first:
        assert first.stdout is not None
        try:
            started = first.stdout.readline()
            assert started.startswith("dispatched onboarding workflow "), started
            while "done    step 0" not in (line := first.stdout.readline()):  # step 1 now runs, for 2 s
                assert line, "the first run ended before its second step"
        finally:
            first.kill()
    correlation_id = started.split()[3]
    with onboarding(tmp_path) as again:
        out, _ = again.communicate(timeout=180)
    assert again.returncode == 0, out
    assert out.startswith("resuming what an earlier run left unfinished"), out
    assert "rejected" not in out
    assert "dispatched" not in out
    assert f"workflow {correlation_id} completed" in out
    with sqlite3.connect(tmp_path / "onboarding.sqlite3") as raw:
        left = raw.execute("SELECT address FROM messages WHERE address != 'events'").fetchall()
    assert left == []


async def test_expired_rows_are_swept(tmp_path: Path) -> None:
    async with SQLiteTransport(tmp_path / "sweep.sqlite3") as transport:
        assert await transport.claim("short", "v", ttl=0.05) is None
        assert await transport.claim("long", "v", ttl=60) is None
        await asyncio.sleep(0.1)
        await transport.db.call(lambda db: sweep(db, transport.namespace), doing="sweeping")
        with sqlite3.connect(transport.path) as raw:
            assert [key for (key,) in raw.execute("SELECT key FROM claims")] == ["long"]


def test_the_worker_banner_names_the_file(tmp_path: Path) -> None:
    transport = SQLiteTransport(tmp_path / "banner.sqlite3")
    banner = worker_banner(Worker(transport, [FunctionActivity(nothing, name="step")]), "app:worker")
    assert f"  transport    sqlite {tmp_path / 'banner.sqlite3'}" in banner.splitlines()


async def nothing(ctx: ActivityContext) -> None:
    return None


async def test_a_lapsed_holder_cannot_take_back_what_another_consumer_holds(tmp_path: Path) -> None:
    path = tmp_path / "lapsed.sqlite3"
    async with SQLiteTransport(path, visibility_timeout=60) as stalled, SQLiteTransport(path) as other:
        where = address()
        await stalled.publish(where, b"work")
        async with await stalled.consume(where, prefetch=1) as first:  # no room to take it again itself
            late = await receive(first)
            with sqlite3.connect(path) as raw:  # its lease lapsed while its process was stopped
                raw.execute("UPDATE messages SET lease_until = 0")
            async with await other.consume(where) as second:
                taken = await receive(second)
                await stalled.retry_later(late, 0)
                await receive_nothing(first, within=0.5)  # not handed out again while `second` holds it
                with sqlite3.connect(path) as raw:
                    assert raw.execute("SELECT lease_owner FROM messages").fetchall() == [(second.name,)]
                await other.ack(taken)
        assert await other.pending(where) == 0


async def test_a_lapsed_holder_cannot_dead_letter_what_another_consumer_holds(tmp_path: Path) -> None:
    path = tmp_path / "lapsed-dead.sqlite3"
    async with SQLiteTransport(path, visibility_timeout=60) as stalled, SQLiteTransport(path) as other:
        where = address()
        await stalled.publish(where, b"work")
        async with await stalled.consume(where, prefetch=1) as first:
            late = await receive(first)
            with sqlite3.connect(path) as raw:  # its lease lapsed while its process was stopped
                raw.execute("UPDATE messages SET lease_until = 0")
            async with await other.consume(where) as second:
                taken = await receive(second)
                await stalled.dead_letter(late, "failed after its lease lapsed")
                assert await other.pending(DEAD_LETTER) == 0  # `second` decides what becomes of it
                await other.retry_later(taken, 0)  # so the step is tried again, not lost
                assert await other.pending(where) == 1


async def test_a_write_waits_for_another_processs_write_lock_and_goes_through_once_it_is_free(tmp_path: Path) -> None:
    path = tmp_path / "busy.sqlite3"
    async with SQLiteTransport(path) as transport:
        locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")  # another process writes for a while
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, locker.execute, "ROLLBACK")
        started = loop.time()
        await transport.publish("step", b"waited")
        waited = loop.time() - started
        locker.close()
        assert 0.3 <= waited < 2.0  # it waited for the lock, and took it soon after it was free
        assert await transport.pending("step") == 1
