"""Memory over a long run: many hops through one worker, RSS sampled after a warm-up and at the end.

The soak runs in a process of its own per transport (`python -m bench.throughput --soak --transports <one>`), so
that memory the other runs freed, and the allocator keeps, cannot absorb what the soak grows. Workflows are sent
in batches of 1,000 and the next batch waits for the last to be nearly done, so the queues stay short: what grows
is the worker, not a backlog. Hops are unsigned: a signed worker without a shared store keeps an in-memory replay
cache that grows, by design, to 100,000 claimed hops (`InMemoryReplayCache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

from paigeant_ai import Worker, WorkflowDispatcher

from ._paigeant import NAMES, Probe, bench_steps, cleanup, make_transport, read_events, rss_mb, start_workflows
from ._security import security_for

__all__ = ("SoakRun", "soak", "soak_in_process")

BATCH = 1000
SAMPLES = 5
"""RSS samples after the warm-up."""
GROWTH_LINE = re.compile(r"RSS growth over (?P<hops>[\d,]+) hops after warm-up: (?P<growth>[-+][\d.]+) MB")


@dataclass
class SoakRun:
    """What a soak measured: the RSS growth after warm-up, over how many hops."""

    transport: str
    hops: int
    growth_mb: float


async def soak(transport_name: str, hops: int, warmup_hops: int, concurrency: int, payload_bytes: int) -> None:
    """Run `warmup_hops`, then `hops` more, through one worker; print RSS along the way and its growth after warm-up."""
    warm = -(-warmup_hops // len(NAMES))
    total = warm + -(-hops // len(NAMES))
    transport = make_transport(transport_name, f"bench-soak-{uuid.uuid4().hex[:8]}")
    probe = Probe(total)
    security = security_for(transport, False)
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security)
        worker = Worker(transport, bench_steps(probe), concurrency=concurrency, security=security)
        running = asyncio.create_task(worker.run())
        reader = asyncio.create_task(read_events(transport))
        started = time.perf_counter()
        await pump(dispatcher, probe, range(warm), payload_bytes, concurrency)
        samples = [sample(probe)]
        step = -(-(total - warm) // SAMPLES)
        for first in range(warm, total, step):
            await pump(dispatcher, probe, range(first, min(first + step, total)), payload_bytes, concurrency)
            samples.append(sample(probe))
        seconds = time.perf_counter() - started
        worker.stop()
        await running
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
    await cleanup(transport)
    report(transport_name, samples, seconds)


async def pump(
    dispatcher: WorkflowDispatcher, probe: Probe, workflows: range, payload_bytes: int, concurrency: int
) -> None:
    """Send `workflows` in batches, each once the one before is nearly done, so the queues stay short."""
    for sent in range(workflows.start, workflows.stop, BATCH):
        batch = min(BATCH, workflows.stop - sent)
        await start_workflows(dispatcher, batch, payload_bytes)
        await probe.wait_done(max(0, sent + batch - concurrency))
    await probe.wait_done(workflows.stop)


def sample(probe: Probe) -> tuple[int, float]:
    """Hops done so far and the RSS once garbage is collected (the step timings the probe keeps are let go)."""
    probe.latencies.clear()
    gc.collect()
    return probe.done * len(NAMES), rss_mb()


def report(transport_name: str, samples: list[tuple[int, float]], seconds: float) -> None:
    (warm_hops, warm_rss), (total, end_rss) = samples[0], samples[-1]
    print(f"soak on {transport_name}: {total:,} hops in {seconds:.1f}s ({total / seconds:,.0f} hops/s)")
    for done, rss in samples:
        print(f"  after {done:>7,} hops: RSS {rss:.1f} MB")
    print(f"  RSS growth over {total - warm_hops:,} hops after warm-up: {end_rss - warm_rss:+.1f} MB", flush=True)


def soak_in_process(
    transport_name: str, hops: int, warmup_hops: int, concurrency: int, payload_bytes: int
) -> SoakRun | None:
    """Run the soak of one transport in a fresh Python process, show its output, and read its growth."""
    command = [sys.executable, "-m", "bench.throughput", "--soak", "--transports", transport_name]
    command += ["--hops", str(hops), "--warmup-hops", str(warmup_hops)]
    command += ["--concurrency", str(concurrency), "--payload-bytes", str(payload_bytes)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    print(done.stdout, end="", flush=True)
    found = GROWTH_LINE.search(done.stdout)
    if done.returncode != 0 or found is None:
        print(f"soak on {transport_name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", flush=True)
        return None
    return SoakRun(transport_name, int(found["hops"].replace(",", "")), float(found["growth"]))
