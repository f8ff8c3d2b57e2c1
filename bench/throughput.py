"""Throughput, hop latency, CPU and memory of paigeant-ai workers, each beside a baseline measured in the same run.

For each transport it runs N three-step workflows whose steps do no work through a real `Worker` (plain
functions, unsigned and signed; three `AgentActivity` steps on `FunctionModel`; the signed functions once more with
the registry's heartbeat at 50 ms, to show it costs the hops nothing), and, in the same run, the baselines:

- a raw relay: messages of a signed hop's size pushed through three queues with the bare client and the same
  guarantees (`bench/_relays.py`), no paigeant code; "vs raw" is paigeant's hop rate over the relay's;
- a bare `agent.run` loop on the same `FunctionModel`, at the same concurrency, beside the agent steps;
- one Ed25519 sign + verify with each implementation installed, beside the CPU a signed hop adds in memory;
- one workflow at a time (concurrency 1), the gap a signed hop adds between two steps, beside the raw relay's
  own one-at-a-time hop;
- a soak per transport, in a process of its own: RSS growth over 100,000 hops after a warm-up.

It ends with one line per performance target: PASS, FAIL or SKIP, the measurement, the limit and its baseline
(`bench/_targets.py`).

    uv run python -m bench.throughput                       # every transport whose server is up; a few minutes
    uv run python -m bench.throughput --markdown            # the targets as the README's table
    uv run python -m bench.throughput --transports inmemory --workflows 5000 --no-soak
    uv run python -m bench.throughput --soak                # only the soaks: 100,000 hops per transport
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from ._paigeant import (
    RABBITMQ_URL,
    REDIS_URL,
    SERVERS,
    Result,
    bare_agent_runs,
    middle_hop_bytes,
    percentile_ms,
    run_one_at_a_time,
    run_paigeant,
    server_up,
)
from ._relays import relays, run_relay
from ._signatures import sign_and_verify_cpu
from ._soak import soak, soak_in_process
from ._targets import Latency, Measurements, checks, print_checks

HEADER = ["transport", "variant", "hops/s", "workflows/s", "p50 hop ms", "p99 hop ms", "vs raw", "RSS MB"]
LATENCY_HEADER = ["transport", "signed hop p50 ms", "p99 ms", "raw relay hop p50 ms", "p99 ms"]
RELAYS = relays(RABBITMQ_URL, REDIS_URL)


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def print_progress(result: Result) -> None:
    print(f"  {result.transport:9} {result.variant:30} {result.hops_per_second:>10,.0f} hops/s", flush=True)


# -- the runs ------------------------------------------------------------------------------------------------


async def throughput_rows(name: str, args: argparse.Namespace, size: int, m: Measurements) -> list[list[str]]:
    """The raw relay, then paigeant's variants on one transport, loaded with `--workflows` workflows each."""
    raw = (await run_relay(RELAYS[name], args.workflows, args.concurrency, size, one_at_a_time=False)).hops_per_second
    print(f"  {name:9} {'raw relay':30} {raw:>10,.0f} hops/s", flush=True)
    m.raw[name] = raw
    rows = [[name, f"raw relay ({size:,} B)", f"{raw:,.0f}", f"{raw / 3:,.0f}", "-", "-", "1.00x", "-"]]
    for signed in (False, True):
        result = await run_paigeant(name, args.workflows, args.concurrency, args.payload_bytes, signed=signed)
        m.rates[(name, signed)] = result.hops_per_second
        if name == "inmemory":
            record_round(result, signed, m)
        rows.append(with_raw(result, raw))
    rows += await agent_rows(name, args, raw, m)
    # The registry's heartbeat runs beside the hops, never in them: at 200 times its default rate (a signed post
    # every 50 ms instead of every 10 s) the signed functions row should not move.
    beat = await run_paigeant(name, args.workflows, args.concurrency, args.payload_bytes, signed=True, heartbeat=0.05)
    return [*rows, with_raw(beat, raw)]


async def agent_rows(name: str, args: argparse.Namespace, raw: float, m: Measurements) -> list[list[str]]:
    """A bare `agent.run` loop, then as many agent steps through paigeant (three per workflow), signed."""
    workflows = max(100, args.workflows // 4)
    bare = await bare_agent_runs(workflows * 3, args.concurrency)
    print(f"  {name:9} {'bare agent.run loop':30} {bare:>10,.0f} runs/s", flush=True)
    result = await run_paigeant(name, workflows, args.concurrency, args.payload_bytes, signed=True, agents=True)
    m.bare_agent[name], m.agent_steps[name] = bare, result.hops_per_second
    bare_row = [name, "bare agent.run loop (runs/s)", f"{bare:,.0f}", "-", "-", "-", "-", "-"]
    return [bare_row, with_raw(result, raw)]


def with_raw(result: Result, raw: float) -> list[str]:
    result.raw_hops_per_second = raw
    print_progress(result)
    return result.row()


def record_round(result: Result, signed: bool, m: Measurements) -> None:
    """Keep what an in-memory run of the functions says about the CPU of a hop."""
    m.hop_cpu_us.setdefault(signed, []).append(result.cpu_per_hop_us)
    m.cpu_shares.append(result.cpu_share)
    if not signed:
        m.unsigned_rates.append(result.hops_per_second)


async def more_cpu_rounds(args: argparse.Namespace, m: Measurements) -> None:
    """The in-memory functions again, unsigned and signed alternately, for `--rounds` rounds in all."""
    for _ in range(args.rounds - 1):
        for signed in (False, True):
            result = await run_paigeant("inmemory", args.workflows, args.concurrency, args.payload_bytes, signed=signed)
            record_round(result, signed, m)
            print(f"  cpu round {result.variant:30} {result.cpu_per_hop_us:>10,.0f} µs/hop", flush=True)


async def latency_rows(name: str, args: argparse.Namespace, size: int, m: Measurements) -> list[str]:
    """Signed workflows one at a time, and the raw relay one message at a time: the gap each hop adds."""
    gaps = await run_one_at_a_time(name, args.latency_workflows, args.payload_bytes)
    raw = await run_relay(RELAYS[name], args.latency_workflows, 1, size, one_at_a_time=True)
    m.latency[name] = Latency(gaps, raw.gaps)
    cells = [percentile_ms(samples, q) for samples in (gaps, raw.gaps) for q in (0.5, 0.99)]
    print(f"  {name:9} {'one at a time, signed':30} {cells[0]:>10.2f} ms p50", flush=True)
    return [name, *(f"{cell:.3f}" for cell in cells)]


# -- main ----------------------------------------------------------------------------------------------------


async def measure(args: argparse.Namespace, transports: list[str]) -> Measurements:
    m = Measurements(transports)
    size = await middle_hop_bytes(args.payload_bytes, signed=True)
    unsigned_size = await middle_hop_bytes(args.payload_bytes, signed=False)
    rows: list[list[str]] = []
    for name in transports:
        rows += await throughput_rows(name, args, size, m)
    if "inmemory" in transports:
        await more_cpu_rounds(args, m)
        m.sign_verify_us = sign_and_verify_cpu(size, args.sign_rounds)
    latency = [await latency_rows(name, args, size, m) for name in transports]
    print()
    print(
        f"{args.workflows} three-step workflows per run, concurrency {args.concurrency}, payload {args.payload_bytes} B"
        f" (a middle hop is {size:,} B signed, {unsigned_size:,} B unsigned), {os.cpu_count()} cores"
    )
    print_table(HEADER, rows)
    print()
    print(f"{args.latency_workflows} signed workflows one at a time (concurrency 1): the gap between two steps")
    print_table(LATENCY_HEADER, latency)
    return m


def soak_all(args: argparse.Namespace, m: Measurements) -> None:
    print()
    for name in m.transports:
        run = soak_in_process(name, args.hops, args.warmup_hops, args.concurrency, args.payload_bytes)
        if run is not None:
            m.growth_mb[name] = (run.hops, run.growth_mb)


def print_noise(m: Measurements, load_before: float, seconds: float) -> None:
    """What else the machine did meanwhile: the load average, and the share of a core this process got."""
    print(
        f"{seconds / 60:.1f} minutes; load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, "
        f"on {os.cpu_count()} cores"
    )
    if m.cpu_shares:
        shares = sorted(m.cpu_shares)
        print(
            f"this process got {statistics.median(shares):.2f} of a core in the in-memory runs "
            f"({shares[0]:.2f}-{shares[-1]:.2f}; about 1 when nothing else competes for it)"
        )


async def bench(args: argparse.Namespace) -> None:
    load_before, started = os.getloadavg()[0], time.perf_counter()
    transports = [name for name in args.transports if server_up(name)]
    for name in sorted(set(args.transports) - set(transports)):
        print(f"skipping {name}: no server on {SERVERS[name][0]}:{SERVERS[name][1]}")
    m = await measure(args, transports)
    if not args.no_soak:
        soak_all(args, m)
    print()
    print_noise(m, load_before, time.perf_counter() - started)
    print_checks(checks(m), markdown=args.markdown)


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--rounds", type=int, default=3, help="in-memory rounds, unsigned and signed (default 3)")
    parser.add_argument("--sign-rounds", type=int, default=2000, help="bare sign + verify calls timed (default 2000)")
    parser.add_argument(
        "--latency-workflows", type=int, default=300, help="workflows run one at a time per transport (default 300)"
    )
    parser.add_argument("--soak", action="store_true", help="only the soak: --hops hops per transport, RSS growth")
    parser.add_argument("--no-soak", action="store_true", help="everything but the soak (target 6 is skipped)")
    parser.add_argument(
        "--hops", type=int, default=100_000, help="hops of the soak after its warm-up (default 100,000)"
    )
    parser.add_argument("--warmup-hops", type=int, default=15_000, help="hops before the soak's first sample")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the targets as a markdown table (the README's)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.soak:
        for name in args.transports:
            if server_up(name):
                asyncio.run(soak(name, args.hops, args.warmup_hops, args.concurrency, args.payload_bytes))
        return
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
