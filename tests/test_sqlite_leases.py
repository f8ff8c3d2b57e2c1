"""Leases of the SQLite transport: what a consumer holds, renews and lets go, across processes on one file."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports.base import Consumer, Delivery
from paigeant_ai.transports.sqlite import SQLiteTransport, _db
from paigeant_ai.transports.sqlite import _queue as q

from .transport_contract import address, receive


async def first_of(*consumers: Consumer, within: float) -> Delivery:
    """The first delivery any of `consumers` hands out within `within` seconds."""
    pending = {asyncio.ensure_future(anext(consumer)) for consumer in consumers}
    try:
        done, pending = await asyncio.wait(pending, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            raise TimeoutError
        return done.pop().result()
    finally:
        for task in pending:
            task.cancel()


async def test_a_delivery_that_could_not_be_settled_nor_handed_back_comes_back_after_its_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's last resort after a failed settle is that the broker takes the delivery back by itself: a
    consumer must stop renewing the lease of a delivery whose settling failed, or it is held until the process ends."""
    monkeypatch.setattr(_db, "_BUSY_TIMEOUT_MS", 100)  # another process's write lock fails a call quickly
    path = tmp_path / "stuck.sqlite3"
    async with SQLiteTransport(path, visibility_timeout=1.0) as worker, SQLiteTransport(path) as other:
        where = address()
        await worker.publish(where, b"step")
        async with await worker.consume(where) as consumer:
            delivery = await receive(consumer)
            locker = sqlite3.connect(path, isolation_level=None)
            locker.execute("BEGIN IMMEDIATE")  # another process holds the write lock a while
            with pytest.raises(TransportError):
                await worker.ack(delivery)
            with pytest.raises(TransportError):
                await worker.give_back(delivery)
            locker.execute("ROLLBACK")
            locker.close()
            async with await other.consume(where) as second:
                again = await first_of(consumer, second, within=5.0)  # either may take it back
                assert (again.body, again.delivery_count) == (b"step", 2)


async def test_a_lapsed_delivery_cannot_take_back_its_redelivery_to_the_same_consumer(tmp_path: Path) -> None:
    """A delivery whose lease lapsed, taken again by the same consumer, is a new delivery: settling the old one
    (acknowledging it, handing it back, dead-lettering it) must leave the new one alone, as it does one another
    consumer took."""
    path = tmp_path / "same.sqlite3"
    async with SQLiteTransport(path, visibility_timeout=60) as transport:
        where = address()
        await transport.publish(where, b"work")
        async with await transport.consume(where, prefetch=2) as consumer:
            late = await receive(consumer)
            with sqlite3.connect(path) as raw:  # its lease lapsed (renewals failed while the file was busy)
                raw.execute("UPDATE messages SET lease_until = 0")
            transport._wake(where)  # pyright: ignore[reportPrivateUsage]
            again = await receive(consumer)
            assert (again.body, again.delivery_count) == (b"work", 2)
            await transport.ack(late)
            await transport.retry_later(late, 0)
            await transport.dead_letter(late, "failed after its lease lapsed")
            with sqlite3.connect(path) as raw:  # still leased to the redelivery, which is running: not a third one
                held = raw.execute("SELECT address, lease_until > 0, delivery_count FROM messages").fetchall()
            assert held == [(where, 1, 2)]
            assert await transport.pending(DEAD_LETTER) == 0
            await transport.ack(again)
        assert await transport.pending(where) == 0


async def test_rows_a_closing_consumer_leased_but_never_handed_out_do_not_count_as_delivered(tmp_path: Path) -> None:
    """A consumer that closes while a request for more rows is on the database's thread never sees that answer:
    the rows it leased were not delivered, so closing must not leave them counted, or restarts alone would push a
    message towards `max_deliveries` and the dead letters."""
    path = tmp_path / "closing.sqlite3"
    async with SQLiteTransport(path) as transport:
        where = address()
        for body in (b"handed out", b"leased unseen"):
            await transport.publish(where, body)
        consumer = await transport.consume(where, prefetch=1)  # leases one row at a time
        handed = await receive(consumer)
        assert handed.body == b"handed out"
        # The answer to a lease request that the closing consumer's fetch task no longer waits for:
        await transport.db.call(
            lambda db: q.claim_ready(db, transport.namespace, where, consumer.name, room=1, lease=30.0),
            doing="leasing as the consumer's last request did",
        )
        await consumer.aclose()
        counts = await transport.db.call(
            lambda db: dict(db.execute("SELECT body, delivery_count FROM messages").fetchall()),
            write=False,
            doing="reading the counts",
        )
        # The delivery it handed out and never settled counts; the row it leased and never saw does not.
        assert counts == {b"handed out": 1, b"leased unseen": 0}
