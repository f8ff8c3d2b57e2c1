"""Throughput, hop latency and memory of paigeant-ai workers, side by side with a raw broker relay.

For each transport it runs N three-step workflows whose steps do no work through a real `Worker` (plain
functions, signed and unsigned, and once with an `AgentActivity` on `FunctionModel`; the signed functions once
more with the registry's heartbeat at 50 ms, to show it costs the hops nothing), and, in the same run, a
raw relay: messages of the same size pushed through three queues with the bare client (aio-pika with persistent
messages, publisher confirms and acks; redis-py XADD / XREADGROUP / XACK), no paigeant code. The ratio
paigeant / raw shows how close the library comes to the broker's own limit.

    uv run python -m bench.throughput                       # every transport whose server is up, defaults
    uv run python -m bench.throughput --transports inmemory --workflows 5000
    uv run python -m bench.throughput --soak                # 100,000 hops through one worker, RSS growth
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    FunctionActivity,
    PaigeantMessage,
    Worker,
    WorkflowDispatcher,
    get_transport,
)
from paigeant_ai.activity import Activity
from paigeant_ai.contracts import EVENTS
from paigeant_ai.transports import Transport

from ._security import security_for
from ._sqlite_raw import raw_sqlite, remove_files, sqlite_path

RABBITMQ_URL = os.environ.get("PAIGEANT_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PAIGEANT_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVERS = {"rabbitmq": ("127.0.0.1", 5672), "redis": ("127.0.0.1", 6379)}


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def server_up(name: str) -> bool:
    if name not in SERVERS:
        return True
    try:
        socket.create_connection(SERVERS[name], timeout=1).close()
    except OSError:
        return False
    return True


@dataclass
class Result:
    transport: str
    variant: str
    workflows: int
    seconds: float
    latencies: list[float] = field(default_factory=list[float])
    rss_before: float = 0.0
    rss_after: float = 0.0
    raw_hops_per_second: float | None = None

    @property
    def hops_per_second(self) -> float:
        return self.workflows * 3 / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    def row(self) -> list[str]:
        ratio = f"{self.hops_per_second / self.raw_hops_per_second:.2f}x" if self.raw_hops_per_second else "-"
        return [
            self.transport,
            self.variant,
            f"{self.hops_per_second:,.0f}",
            f"{self.workflows / self.seconds:,.0f}",
            f"{self.percentile(0.5):.2f}",
            f"{self.percentile(0.99):.2f}",
            ratio,
            f"{self.rss_before:.0f} -> {self.rss_after:.0f}",
        ]


HEADER = ["transport", "variant", "hops/s", "workflows/s", "p50 hop ms", "p99 hop ms", "vs raw", "RSS MB"]


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(HEADER, widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


# -- paigeant ------------------------------------------------------------------------------------------------


def make_transport(name: str, namespace: str) -> Transport:
    if name == "rabbitmq":
        return get_transport(name, url=RABBITMQ_URL, namespace=namespace)
    if name == "redis":
        return get_transport(name, url=REDIS_URL, namespace=namespace)
    if name == "sqlite":
        return get_transport(name, path=sqlite_path(namespace), namespace=namespace)
    return get_transport(name, namespace=namespace)


class Probe:
    """Counts finished workflows and the gap between one step's end and the next one's start."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.finished = asyncio.Event()
        self.latencies: list[float] = []


class Timed:
    """An activity that reports to a `Probe` around the real one."""

    def __init__(self, inner: Activity, probe: Probe, *, last: bool = False) -> None:
        self.inner = inner
        self.spec = inner.spec
        self.probe = probe
        self.last = last

    async def run(self, ctx: ActivityContext) -> dict[str, Any]:
        ended = ctx.payload.get("_ended")
        if isinstance(ended, float):
            self.probe.latencies.append(time.perf_counter() - ended)
        update = await self.inner.run(ctx) or {}
        if self.last:
            self.probe.done += 1
            if self.probe.done >= self.probe.total:
                self.probe.finished.set()
        return {**update, "_ended": time.perf_counter()}


async def nothing(ctx: ActivityContext) -> None:
    return None


def reply_ok(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart("ok")])


NAMES = ["bench-a", "bench-b", "bench-c"]


def bench_steps(probe: Probe, *, agent: bool = False) -> list[Activity]:
    first = FunctionActivity(nothing, name=NAMES[0])
    second = FunctionActivity(nothing, name=NAMES[1])
    third: Activity = (
        AgentActivity(Agent(FunctionModel(reply_ok), name=NAMES[2]), prompt="Say ok.")
        if agent
        else FunctionActivity(nothing, name=NAMES[2])
    )
    return [Timed(first, probe), Timed(second, probe), Timed(third, probe, last=True)]


async def run_paigeant(
    transport_name: str,
    workflows: int,
    concurrency: int,
    payload_bytes: int,
    *,
    signed: bool,
    agent: bool,
    heartbeat: float | None = None,
    progress: bool = True,
) -> Result:
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    transport = make_transport(transport_name, namespace)
    probe = Probe(workflows)
    steps = bench_steps(probe, agent=agent)
    security = security_for(transport, signed)
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security)
        specs = [ActivitySpec(name=n) for n in NAMES]
        blob = "x" * payload_bytes
        await asyncio.gather(*(dispatcher.dispatch_workflow(specs, {"blob": blob}) for _ in range(workflows)))
        gc.collect()
        worker = Worker(transport, steps, concurrency=concurrency, security=security, registry_heartbeat=heartbeat)
        if not progress:
            worker.reporter.progress.streams = None  # every write to the progress streams becomes a no-op
        rss_before = rss_mb()
        started = time.perf_counter()
        running = asyncio.create_task(worker.run())
        await probe.finished.wait()
        seconds = time.perf_counter() - started
        worker.stop()
        await running
        gc.collect()
        rss_after = rss_mb()
    await cleanup(transport)
    variant = ("agent" if agent else "functions") + (", signed" if signed else ", unsigned")
    variant += f", beat {heartbeat:g}s" if heartbeat is not None else ""
    variant += "" if progress else ", no progress"
    return Result(transport_name, variant, workflows, seconds, probe.latencies, rss_before, rss_after)


async def cleanup(transport: Transport) -> None:
    """Delete what a run left in the broker: its queues, streams and keys (its namespace is its own).

    Called once the transport is closed, so that no consumer of it declares a queue again.
    """
    namespace = getattr(transport, "namespace", "")
    if transport.name == "sqlite":
        remove_files(sqlite_path(namespace))
    elif transport.name == "redis":
        import redis.asyncio as redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(match=f"{namespace}*", count=1000)]
        for start in range(0, len(keys), 1000):
            await client.unlink(*keys[start : start + 1000])
        await client.aclose()
    elif transport.name == "rabbitmq":
        import aio_pika

        from paigeant_ai.transports.rabbitmq import DELAY_BUCKETS

        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            for address in [*NAMES, EVENTS, "dead-letter"]:
                for suffix in ["", *(f"@delay-{bucket}" for bucket, _ in DELAY_BUCKETS)]:
                    channel = await connection.channel()  # a failed delete closes its channel
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.queue_delete(f"{namespace}.{address}{suffix}")
                    with contextlib.suppress(aio_pika.exceptions.AMQPError):
                        await channel.close()


def message_size(payload_bytes: int) -> int:
    """The size of a paigeant message at its middle hop, for the raw relay to send the same."""
    specs = [ActivitySpec(name=n) for n in NAMES]
    message = PaigeantMessage.new(specs, {"blob": "x" * payload_bytes, "_ended": time.perf_counter()})
    message.routing_slip.mark_complete("bench-a")
    return len(message.next_hop().to_json()) + 120  # and about what a signature adds


# -- raw relays ----------------------------------------------------------------------------------------------


async def raw_inmemory(workflows: int, concurrency: int, size: int) -> float:
    queues = [asyncio.Queue[bytes]() for _ in range(3)]
    done = asyncio.Event()
    count = 0
    body = b"x" * size
    for _ in range(workflows):
        queues[0].put_nowait(body)

    async def hop(i: int) -> None:
        nonlocal count
        while True:
            item = await queues[i].get()
            if i < 2:
                queues[i + 1].put_nowait(item)
            else:
                count += 1
                if count >= workflows:
                    done.set()

    started = time.perf_counter()
    tasks = [asyncio.create_task(hop(i)) for i in range(3) for _ in range(concurrency)]
    await done.wait()
    seconds = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return workflows * 3 / seconds


async def raw_rabbitmq(workflows: int, concurrency: int, size: int) -> float:
    import aio_pika

    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"
    try:
        publisher = await connection.channel(publisher_confirms=True)
        names = [f"{prefix}.{i}" for i in range(3)]
        for name in names:
            await publisher.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        body = b"x" * size
        await asyncio.gather(
            *(
                publisher.default_exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key=names[0]
                )
                for _ in range(workflows)
            )
        )
        done = asyncio.Event()
        count = 0

        def relay(i: int) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]:
            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal count
                if i < 2:
                    await publisher.default_exchange.publish(
                        aio_pika.Message(message.body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                        routing_key=names[i + 1],
                    )
                await message.ack()
                if i == 2:
                    count += 1
                    if count >= workflows:
                        done.set()

            return on_message

        started = time.perf_counter()
        for i, name in enumerate(names):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=concurrency)
            queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            await queue.consume(relay(i))
        await done.wait()
        seconds = time.perf_counter() - started
        admin = await connection.channel()
        for name in names:
            await admin.queue_delete(name)
        return workflows * 3 / seconds
    finally:
        await connection.close()


async def raw_redis(workflows: int, concurrency: int, size: int) -> float:
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"bench-raw-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}.{i}" for i in range(3)]
    try:
        for name in names:
            await client.xgroup_create(name, "g", id="0", mkstream=True)
        body = b"x" * size
        pipe = client.pipeline(transaction=False)
        for _ in range(workflows):
            pipe.xadd(names[0], {"body": body})
        await pipe.execute()
        done = asyncio.Event()
        count = 0

        async def hop(i: int) -> None:
            nonlocal count
            while not done.is_set():
                batches: list[Any] = await client.xreadgroup(
                    "g", f"c{i}", {names[i]: ">"}, count=concurrency, block=100
                )
                for _, entries in batches:
                    relay = client.pipeline(transaction=False)
                    for entry_id, fields in entries:
                        if i < 2:
                            relay.xadd(names[i + 1], fields)
                        relay.xack(names[i], "g", entry_id)
                    await relay.execute()
                    if i == 2:
                        count += len(entries)
                        if count >= workflows:
                            done.set()

        started = time.perf_counter()
        await asyncio.gather(*(hop(i) for i in range(3)))
        seconds = time.perf_counter() - started
        return workflows * 3 / seconds
    finally:
        await client.delete(*names)
        await client.aclose()


RAW: dict[str, Callable[[int, int, int], Awaitable[float]]] = {
    "inmemory": raw_inmemory,
    "rabbitmq": raw_rabbitmq,
    "redis": raw_redis,
    "sqlite": raw_sqlite,
}


# -- soak ----------------------------------------------------------------------------------------------------


async def soak(transport_name: str, hops: int, concurrency: int, payload_bytes: int) -> None:
    """Run `hops` hops through one worker in batches and report how its memory grew."""
    batch = 1000
    workflows = hops // 3
    namespace = f"bench-soak-{uuid.uuid4().hex[:8]}"
    transport = make_transport(transport_name, namespace)
    probe = Probe(workflows)
    steps = bench_steps(probe)
    security = security_for(transport, False)
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security)
        worker = Worker(transport, steps, concurrency=concurrency, security=security)
        running = asyncio.create_task(worker.run())
        reader = asyncio.create_task(read_events(transport))  # as a projector would, so the broker keeps none
        specs = [ActivitySpec(name=n) for n in NAMES]
        blob = "x" * payload_bytes
        samples: list[tuple[int, float]] = []
        started = time.perf_counter()
        for sent in range(0, workflows, batch):
            await asyncio.gather(*(dispatcher.dispatch_workflow(specs, {"blob": blob}) for _ in range(batch)))
            while probe.done < sent + batch - concurrency:  # noqa: ASYNC110 - backpressure: keep queues short
                await asyncio.sleep(0.01)
            if sent in (0, batch * 5) or sent + batch >= workflows:
                probe.latencies.clear()
                gc.collect()
                samples.append((probe.done * 3, rss_mb()))
        await probe.finished.wait()
        seconds = time.perf_counter() - started
        worker.stop()
        await running
        reader.cancel()
        gc.collect()
        samples.append((probe.done * 3, rss_mb()))
    await cleanup(transport)
    warm = samples[1] if len(samples) > 2 else samples[0]
    total = probe.done * 3
    print(f"soak on {transport_name}: {total:,} hops in {seconds:.1f}s ({total / seconds:,.0f} hops/s)")
    for done, rss in samples:
        print(f"  after {done:>7,} hops: RSS {rss:.1f} MB")
    print(f"  RSS growth after warm-up ({warm[0]:,} hops): {samples[-1][1] - warm[1]:+.1f} MB")


async def read_events(transport: Transport) -> None:
    async with await transport.consume(EVENTS, prefetch=100) as consumer:
        async for delivery in consumer:
            await transport.ack(delivery)


# -- main ----------------------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    rows: list[list[str]] = []
    size = message_size(args.payload_bytes)
    for name in args.transports:
        if not server_up(name):
            print(f"skipping {name}: no server on {SERVERS[name][0]}:{SERVERS[name][1]}")
            continue
        raw = await RAW[name](args.workflows, args.concurrency, size)
        rows.append([name, f"raw relay ({size} B)", f"{raw:,.0f}", f"{raw / 3:,.0f}", "-", "-", "1.00x", "-"])
        variants = [(False, False), (True, False), (True, True)]
        for signed, agent in variants:
            n = args.workflows if not agent else max(100, args.workflows // 4)
            result = await run_paigeant(name, n, args.concurrency, args.payload_bytes, signed=signed, agent=agent)
            result.raw_hops_per_second = raw
            rows.append(result.row())
            print_progress(result)
        # The registry's heartbeat runs beside the hops, never in them: at 200 times its default rate (a signed post
        # every 50 ms instead of every 10 s) the signed functions row should not move.
        result = await run_paigeant(
            name, args.workflows, args.concurrency, args.payload_bytes, signed=True, agent=False, heartbeat=0.05
        )
        result.raw_hops_per_second = raw
        rows.append(result.row())
        print_progress(result)
    print()
    print(
        f"{args.workflows} three-step workflows per run, concurrency {args.concurrency}, "
        f"payload {args.payload_bytes} B, {os.cpu_count()} cores"
    )
    print_table(rows)


def print_progress(result: Result) -> None:
    print(f"  {result.transport:9} {result.variant:22} {result.hops_per_second:>10,.0f} hops/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflows", type=int, default=2000, help="three-step workflows per run (default 2000)")
    parser.add_argument("--concurrency", type=int, default=50, help="steps a worker runs at once (default 50)")
    parser.add_argument("--payload-bytes", type=int, default=512, help="size of the workflow's payload (default 512)")
    parser.add_argument(
        "--transports",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        default=["inmemory", "rabbitmq", "redis", "sqlite"],
        help="comma-separated: inmemory,rabbitmq,redis,sqlite (default all)",
    )
    parser.add_argument("--soak", action="store_true", help="run --hops hops through one worker; report RSS growth")
    parser.add_argument("--hops", type=int, default=100_000, help="hops of the soak run (default 100,000)")
    args = parser.parse_args()
    if args.soak:
        for name in args.transports:
            if server_up(name):
                asyncio.run(soak(name, args.hops, args.concurrency, args.payload_bytes))
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
