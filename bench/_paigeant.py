"""The paigeant side of the benchmarks: three-step workflows through a real `Worker`, timed from inside the steps.

The steps do no work (plain functions, or agents on `FunctionModel`), so what is measured is what paigeant and the
broker add. A `Probe` counts finished workflows and records the gap between one step's end and the next one's
start; each run also records the CPU this process spent (`time.process_time`), which on the in-memory transport is
the whole cost of its hops.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import statistics
import time
import uuid
from collections.abc import Mapping
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
    InMemoryTransport,
    Worker,
    WorkflowDispatcher,
    get_transport,
)
from paigeant_ai._versions import activity_version
from paigeant_ai.activity import Activity
from paigeant_ai.contracts import DEAD_LETTER, EVENTS
from paigeant_ai.transports import Transport

from ._security import security_for
from ._sqlite_raw import remove_files, sqlite_path

RABBITMQ_URL = os.environ.get("PAIGEANT_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("PAIGEANT_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVERS = {"rabbitmq": ("127.0.0.1", 5672), "redis": ("127.0.0.1", 6379)}
NAMES = ["bench-a", "bench-b", "bench-c"]
PROMPT = "Say ok."


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


def percentile_ms(samples: list[float], q: float) -> float:
    """The `q` quantile of `samples` (seconds), in milliseconds; NaN without samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Result:
    """One run of N three-step workflows through a worker."""

    transport: str
    variant: str
    workflows: int
    seconds: float
    cpu_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list[float])
    rss_before: float = 0.0
    rss_after: float = 0.0
    raw_hops_per_second: float | None = None

    @property
    def hops(self) -> int:
        return self.workflows * len(NAMES)

    @property
    def hops_per_second(self) -> float:
        return self.hops / self.seconds

    @property
    def cpu_per_hop_us(self) -> float:
        """CPU microseconds this process spent per hop (all of a hop's cost on the in-memory transport)."""
        return self.cpu_seconds / self.hops * 1e6

    @property
    def cpu_share(self) -> float:
        """The CPU this process got over the run's wall time: about 1 when nothing else competed for a core."""
        return self.cpu_seconds / self.seconds

    def row(self) -> list[str]:
        ratio = f"{self.hops_per_second / self.raw_hops_per_second:.2f}x" if self.raw_hops_per_second else "-"
        return [
            self.transport,
            self.variant,
            f"{self.hops_per_second:,.0f}",
            f"{self.workflows / self.seconds:,.0f}",
            f"{percentile_ms(self.latencies, 0.5):.2f}",
            f"{percentile_ms(self.latencies, 0.99):.2f}",
            ratio,
            f"{self.rss_before:.0f} -> {self.rss_after:.0f}",
        ]


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
        self._moved = asyncio.Event()

    def workflow_done(self) -> None:
        self.done += 1
        self._moved.set()
        if self.done >= self.total:
            self.finished.set()

    async def wait_done(self, workflows: int) -> None:
        """Until `workflows` in all have finished."""
        while self.done < workflows:
            self._moved.clear()
            await self._moved.wait()


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
            self.probe.workflow_done()
        return {**update, "_ended": time.perf_counter()}


async def nothing(ctx: ActivityContext) -> None:
    return None


def reply_ok(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart("ok")])


def bench_agent(name: str) -> Agent[None, str]:
    return Agent(FunctionModel(reply_ok), name=name)


def bench_steps(probe: Probe, *, agents: bool = False) -> list[Activity]:
    """The three steps: functions that do nothing, or agents that answer "ok" through `FunctionModel`."""
    steps: list[Activity] = [
        AgentActivity(bench_agent(name), prompt=PROMPT) if agents else FunctionActivity(nothing, name=name)
        for name in NAMES
    ]
    return [Timed(step, probe, last=i == len(steps) - 1) for i, step in enumerate(steps)]


def variant_name(*, signed: bool, agents: bool, heartbeat: float | None, progress: bool) -> str:
    variant = ("agents" if agents else "functions") + (", signed" if signed else ", unsigned")
    variant += f", beat {heartbeat:g}s" if heartbeat is not None else ""
    return variant + ("" if progress else ", no progress")


async def start_workflows(dispatcher: WorkflowDispatcher, count: int, payload_bytes: int) -> None:
    """Dispatch `count` of the bench's three-step workflows, each with a payload of `payload_bytes`."""
    specs = [ActivitySpec(name=n) for n in NAMES]
    variables = {"blob": "x" * payload_bytes}
    await asyncio.gather(*(dispatcher.dispatch_workflow(specs, variables) for _ in range(count)))


async def run_paigeant(
    transport_name: str,
    workflows: int,
    concurrency: int,
    payload_bytes: int,
    *,
    signed: bool,
    agents: bool = False,
    heartbeat: float | None = None,
    progress: bool = True,
) -> Result:
    """Queue `workflows` workflows, then time one worker running them all."""
    transport = make_transport(transport_name, f"bench-{uuid.uuid4().hex[:8]}")
    probe = Probe(workflows)
    security = security_for(transport, signed)
    async with transport:
        await start_workflows(WorkflowDispatcher(transport, security=security), workflows, payload_bytes)
        gc.collect()
        steps = bench_steps(probe, agents=agents)
        worker = Worker(transport, steps, concurrency=concurrency, security=security, registry_heartbeat=heartbeat)
        warm_up(steps)
        if not progress:
            worker.reporter.progress.streams = None  # every write to the progress streams becomes a no-op
        rss_before = rss_mb()
        started, cpu_started = time.perf_counter(), time.process_time()
        running = asyncio.create_task(worker.run())
        await probe.finished.wait()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        worker.stop()
        await running
        gc.collect()
        rss_after = rss_mb()
    await cleanup(transport)
    variant = variant_name(signed=signed, agents=agents, heartbeat=heartbeat, progress=progress)
    return Result(transport_name, variant, workflows, seconds, cpu_seconds, probe.latencies, rss_before, rss_after)


async def run_one_at_a_time(transport_name: str, workflows: int, payload_bytes: int) -> list[float]:
    """Signed workflows one after the other through a worker of concurrency 1: the gaps between their steps."""
    transport = make_transport(transport_name, f"bench-{uuid.uuid4().hex[:8]}")
    probe = Probe(workflows)
    security = security_for(transport, True)
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security)
        worker = Worker(transport, bench_steps(probe), concurrency=1, security=security)
        running = asyncio.create_task(worker.run())
        for sent in range(1, workflows + 1):
            await start_workflows(dispatcher, 1, payload_bytes)
            await probe.wait_done(sent)
        worker.stop()
        await running
    await cleanup(transport)
    return probe.latencies


async def bare_agent_runs(runs: int, concurrency: int) -> float:
    """Runs per second of `agent.run` on the steps' `FunctionModel`, `concurrency` at a time, no paigeant."""
    agent = bench_agent("bench-bare")
    remaining = runs

    async def runner() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await agent.run(PROMPT)

    gc.collect()
    started = time.perf_counter()
    await asyncio.gather(*(runner() for _ in range(concurrency)))
    return runs / (time.perf_counter() - started)


class _Recording(InMemoryTransport):
    """An in-memory transport that keeps the size of every message published to each address."""

    def __init__(self, *, namespace: str) -> None:
        super().__init__(namespace=namespace)
        self.sizes: dict[str, list[int]] = {}

    async def publish(
        self, address: str, body: bytes, *, headers: Mapping[str, str] | None = None, delay: float = 0.0
    ) -> None:
        self.sizes.setdefault(address, []).append(len(body))
        await super().publish(address, body, headers=headers, delay=delay)


async def middle_hop_bytes(payload_bytes: int, *, signed: bool) -> int:
    """The size of the hop to the second step, as a worker sends it: what a raw relay's messages should weigh."""
    transport = _Recording(namespace=f"bench-{uuid.uuid4().hex[:8]}")
    probe = Probe(3)
    security = security_for(transport, signed)
    async with transport:
        await start_workflows(WorkflowDispatcher(transport, security=security), probe.total, payload_bytes)
        worker = Worker(transport, bench_steps(probe), concurrency=1, security=security)
        running = asyncio.create_task(worker.run())
        await probe.finished.wait()
        worker.stop()
        await running
    return int(statistics.median(transport.sizes[NAMES[1]]))


def warm_up(steps: list[Activity]) -> None:
    """Find the steps' versions before the clock starts: the first lookup reads every installed distribution's
    metadata (about 200 ms), which a worker process pays once when it starts, not on its hops."""
    for step in steps:
        activity_version(step)


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
        from paigeant_ai.transports.rabbitmq._cancel_board import CANCEL_STREAM
        from paigeant_ai.transports.rabbitmq._progress import PROGRESS_STREAM
        from paigeant_ai.transports.rabbitmq._registry_board import REGISTRY_STREAM

        queues = {f"{namespace}.{stream}" for stream in (CANCEL_STREAM, PROGRESS_STREAM, REGISTRY_STREAM)}
        for address in [*NAMES, EVENTS, DEAD_LETTER]:
            queues.update(
                f"{namespace}.{address}{suffix}" for suffix in ["", *(f"@delay-{b}" for b, _ in DELAY_BUCKETS)]
            )
        connection = await aio_pika.connect(RABBITMQ_URL)
        async with connection:
            for queue in sorted(queues):
                channel = await connection.channel()  # a failed delete closes its channel
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(queue)
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.close()


async def read_events(transport: Transport) -> None:
    """Consume and ack the events, as a projector would, so the broker keeps none."""
    async with await transport.consume(EVENTS, prefetch=100) as consumer:
        async for delivery in consumer:
            await transport.ack(delivery)
