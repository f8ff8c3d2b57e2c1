"""The progress streams are bounded as documented (docs/cost-and-progress.md#progress): in memory by entries,
workflows and time; on Redis and SQLite by entries and an expiry after the last entry; on RabbitMQ by age and size
(issue 18)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelPreconditionFailed

from paigeant_ai.transports._memory_progress import MemoryProgress
from paigeant_ai.transports.rabbitmq import RabbitMQTransport
from paigeant_ai.transports.rabbitmq._progress import PROGRESS_STREAM, progress_stream_arguments
from paigeant_ai.transports.redis import RedisTransport
from paigeant_ai.transports.redis import _progress as redis_progress
from paigeant_ai.transports.redis._progress import PROGRESS_RETENTION, progress_key
from paigeant_ai.transports.sqlite import SQLiteTransport
from paigeant_ai.transports.sqlite import _progress as sqlite_progress
from paigeant_ai.transports.sqlite._sweep import sweep

from .brokers import RABBITMQ_URL, REDIS_URL, delete_queues, delete_redis_namespace, require_rabbitmq, require_redis


async def read_all(progress: MemoryProgress, correlation_id: str) -> list[bytes]:
    return [entry.body for entry in await progress.reader(correlation_id, None).read(0)]


async def test_in_memory_a_stream_keeps_its_latest_entries_of_the_latest_workflows_for_a_while() -> None:
    progress = MemoryProgress(max_entries=3, max_workflows=2, retention=0.2)
    for n in range(5):
        progress.append("wf-1", f"e{n}".encode(), {})
    assert await read_all(progress, "wf-1") == [b"e2", b"e3", b"e4"]  # the latest max_entries

    progress.append("wf-2", b"a", {})
    progress.append("wf-3", b"b", {})
    assert await read_all(progress, "wf-1") == []  # the oldest workflow went past max_workflows
    assert await read_all(progress, "wf-3") == [b"b"]

    await asyncio.sleep(0.3)
    assert await read_all(progress, "wf-3") == []  # forgotten `retention` seconds after its last entry


@pytest.mark.redis
async def test_on_redis_a_stream_expires_a_week_after_its_last_entry() -> None:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
            await transport.append_progress("wf-1", b"[]", {})
            ttl = await transport.client.pttl(progress_key(transport, "wf-1"))  # pyright: ignore[reportUnknownMemberType]
            assert PROGRESS_RETENTION * 1000 - 60_000 < ttl <= PROGRESS_RETENTION * 1000
    finally:
        await delete_redis_namespace(namespace)


@pytest.mark.redis
async def test_on_redis_a_stream_keeps_about_its_latest_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    require_redis()
    monkeypatch.setattr(redis_progress, "PROGRESS_MAX_ENTRIES", 200)
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
            await transport.append_progress("wf-short", b"first", {})
            await asyncio.gather(*(transport.append_progress("wf-long", f"e{n}".encode(), {}) for n in range(1000)))
            key = progress_key(transport, "wf-long")
            length = await transport.client.xlen(key)  # pyright: ignore[reportUnknownMemberType]
            assert 200 <= length <= 300  # trimmed whole nodes at a time (`MAXLEN ~`): about the cap, never fewer
            entries = [entry async for entry in _bodies(transport, "wf-long")]
            assert entries[-1] == b"e999"  # the newest are kept
            assert [entry async for entry in _bodies(transport, "wf-short")] == [b"first"]  # each trimmed alone
    finally:
        await delete_redis_namespace(namespace)


async def test_on_sqlite_a_stream_keeps_its_own_latest_entries_whatever_other_workflows_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_progress, "PROGRESS_MAX_ENTRIES", 5)
    async with SQLiteTransport(tmp_path / "progress.db", namespace="retention") as transport:
        await transport.append_progress("wf-parked", b"dispatched", {})
        await transport.append_progress("wf-parked", b"waiting", {})
        for n in range(20):  # a busy machine: other workflows append meanwhile, far past the cap in all
            await transport.append_progress("wf-busy", f"e{n}".encode(), {})
        await transport.append_progress("wf-parked", b"resumed", {})
        # A workflow that waited keeps every entry it has, however many others were appended meanwhile.
        assert [entry async for entry in _bodies(transport, "wf-parked")] == [b"dispatched", b"waiting", b"resumed"]
        # One past its cap keeps its latest.
        assert [entry async for entry in _bodies(transport, "wf-busy")] == [f"e{n}".encode() for n in range(15, 20)]


async def test_on_sqlite_the_sweep_forgets_a_stream_past_its_retention_though_nothing_is_appended_since(
    tmp_path: Path,
) -> None:
    async with SQLiteTransport(tmp_path / "progress.db", namespace="retention") as transport:
        await transport.append_progress("wf-old", b"long ago", {})
        await transport.append_progress("wf-new", b"just now", {})
        week_ago = time.time() - sqlite_progress.PROGRESS_RETENTION - 60
        await transport.db.call(
            lambda db: db.execute("UPDATE progress SET created = ? WHERE correlation_id = 'wf-old'", (week_ago,)),
            doing="ageing a stream",
        )
        # No append comes after: a quiet machine. The transport's own sweep (once a minute) forgets it.
        await transport.db.call(lambda db: sweep(db, "retention"), doing="sweeping")
        assert [entry async for entry in _bodies(transport, "wf-old")] == []
        assert [entry async for entry in _bodies(transport, "wf-new")] == [b"just now"]


async def _bodies(transport: RedisTransport | SQLiteTransport, correlation_id: str) -> AsyncIterator[bytes]:
    """Every entry of a workflow's stream, as it is now."""
    reader = await transport.read_progress(correlation_id)
    try:
        while entries := await reader.read(0):
            for entry in entries:
                yield entry.body
    finally:
        await reader.aclose()


@pytest.mark.rabbitmq
async def test_on_rabbitmq_the_stream_is_declared_with_its_age_and_size_limits() -> None:
    require_rabbitmq()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    name = f"{namespace}.{PROGRESS_STREAM}"
    try:
        async with RabbitMQTransport(RABBITMQ_URL, namespace=namespace) as transport:
            await transport.append_progress("wf-1", b"[]", {})
        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            # RabbitMQ refuses to declare a queue again with other arguments: the same ones are what it holds.
            channel = await connection.channel()
            await channel.declare_queue(name, durable=True, arguments=progress_stream_arguments())
            assert progress_stream_arguments()["x-max-age"] == "24h"
            channel = await connection.channel()
            with pytest.raises(ChannelPreconditionFailed, match="x-max-age"):
                await channel.declare_queue(
                    name, durable=True, arguments={**progress_stream_arguments(), "x-max-age": "48h"}
                )
    finally:
        await delete_queues([name])
