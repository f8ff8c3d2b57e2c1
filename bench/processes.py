"""Hops per second of `paigeant worker --processes N` on Redis or SQLite: one worker process beside two, in one run.

Each run starts `paigeant worker bench.processes:worker --processes N` as its own process, waits until its N
worker processes are on the registry, dispatches signed three-step workflows whose steps each spin the CPU for
`--work-ms` (as a step that parses, renders or scores would), then lets their first steps run (a file they wait
for) and times them until the last one's third step has counted itself (a byte appended to another file). It also
reads the CPU the worker processes used (from /proc), per hop. Runs alternate (1, 2, 1, 2, ...) so that what else
the machine does weighs on both alike. On SQLite every process shares one file in the temporary folder.

    uv run python -m bench.processes                      # Redis: 1 and 2 processes, 2 rounds, 600 workflows each
    uv run python -m bench.processes --processes 1,2,4 --rounds 3 --workflows 1000 --work-ms 2
    uv run python -m bench.processes --transport sqlite --work-ms 0 --concurrency 50 --workflows 1500
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    Worker,
    WorkflowDispatcher,
    activity,
    get_transport,
    read_registry,
)
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import Transport

from ._paigeant import REDIS_URL, cleanup, make_transport, server_up
from ._sqlite_raw import sqlite_path
from .throughput import print_table

NAMES = ["bench-a", "bench-b", "bench-c"]
ROOT = Path(__file__).resolve().parent.parent
_go: list[bool] = []
"""Not empty once this process has seen the go file."""


# -- the worker every process runs ------------------------------------------------------------------------------


def spin(milliseconds: float) -> None:
    """Use the CPU for `milliseconds` of this process's CPU time: the step's own work."""
    until = time.process_time() + milliseconds / 1000
    while time.process_time() < until:
        pass


def work_ms() -> float:
    return float(os.environ.get("PAIGEANT_BENCH_WORK_MS", "1"))


@activity(name=NAMES[0])
async def first(ctx: ActivityContext) -> None:
    await wait_for_go()
    spin(work_ms())


@activity(name=NAMES[1])
async def second(ctx: ActivityContext) -> None:
    spin(work_ms())


def _count(path: Path) -> int:
    """The size of the file at `path`; -1 while there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


@functools.cache
def done_file() -> int:
    """This process's descriptor of the run's done file, opened to append on first use."""
    return os.open(os.environ["PAIGEANT_BENCH_DONE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)


async def wait_for_go() -> None:
    """Wait until the benchmark says go: every worker process is ready and every workflow is dispatched, so that
    neither one process starting before the other nor the dispatch's signing is in the time measured."""
    go = Path(os.environ["PAIGEANT_BENCH_GO"])
    while not _go and _count(go) < 0:  # noqa: ASYNC110 - made by another process: polled
        await asyncio.sleep(0.05)
    _go.append(True)


@activity(name=NAMES[2])
async def third(ctx: ActivityContext) -> None:
    spin(work_ms())
    os.write(done_file(), b".")  # one byte a finished workflow: the file's size is the count


def worker() -> Worker:
    """What `paigeant worker bench.processes:worker` runs in each process: the three steps, signed."""
    return Worker(get_transport(), [first, second, third], shutdown_timeout=5)


# -- one run ----------------------------------------------------------------------------------------------------


@dataclass
class Run:
    processes: int
    workflows: int
    seconds: float
    cpu_seconds: float

    @property
    def hops_per_second(self) -> float:
        return self.workflows * 3 / self.seconds

    @property
    def cpu_ms_per_hop(self) -> float:
        return self.cpu_seconds * 1000 / (self.workflows * 3)

    @property
    def cores_busy(self) -> float:
        """How many cores the worker processes kept busy on average: at most one per process, and what the
        machine's other work leaves them."""
        return self.cpu_seconds / self.seconds


def cpu_seconds(pids: set[int]) -> float:
    """The user and system CPU the processes `pids` used so far."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


async def live_pids(transport: Transport, security: MessageSigner, count: int, *, within: float = 180) -> set[int]:
    """The pids of the `count` worker processes, once all of them are on the registry."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        registry = await read_registry(transport, security)
        if registry is not None and len(pids := {record.pid for record in registry.workers(NAMES[0])}) >= count:
            return pids
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{count} worker processes did not start within {within:g}s")


async def run_once(transport_name: str, processes: int, workflows: int, concurrency: int, work: float) -> Run:
    namespace = f"bench-procs-{uuid.uuid4().hex[:8]}"
    key = generate_key("bench-processes")
    go, done = (sqlite_path(namespace).with_suffix(suffix) for suffix in (".go", ".done"))
    env = {
        **os.environ,
        "PAIGEANT_TRANSPORT": transport_name,
        "PAIGEANT_REDIS_URL": REDIS_URL,
        "PAIGEANT_SQLITE_PATH": str(sqlite_path(namespace)),
        "PAIGEANT_BENCH_GO": str(go),
        "PAIGEANT_BENCH_DONE": str(done),
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_SIGNING_KEY": json.dumps(key.as_dict(private=True)),
        "PAIGEANT_TRUSTED_KEYS": json.dumps({"keys": [key.as_dict(private=False)]}),
        "PAIGEANT_CONCURRENCY": str(concurrency),
        "PAIGEANT_BENCH_WORK_MS": str(work),
    }
    env.pop("PAIGEANT_ALLOW_UNSIGNED", None)
    command = [sys.executable, "-m", "paigeant_ai.cli", "worker", "bench.processes:worker"]
    supervisor = await asyncio.create_subprocess_exec(
        *command, "--processes", str(processes), cwd=ROOT, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    transport = make_transport(transport_name, namespace)  # the file the workers open, on SQLite
    security = MessageSigner(key)
    try:
        async with transport:
            pids = await live_pids(transport, security, processes) | {supervisor.pid}
            dispatcher = WorkflowDispatcher(transport, security=security)
            specs = [ActivitySpec(name=name) for name in NAMES]
            await asyncio.gather(*(dispatcher.dispatch_workflow(specs, {"n": n}) for n in range(workflows)))
            cpu_before, started = cpu_seconds(pids), time.perf_counter()
            go.touch()
            while _count(done) < workflows:  # noqa: ASYNC110 - the worker processes count: polled
                await asyncio.sleep(0.02)
            seconds, cpu = time.perf_counter() - started, cpu_seconds(pids) - cpu_before
    finally:
        supervisor.send_signal(signal.SIGTERM)
        await supervisor.wait()
        for marker in (go, done):
            marker.unlink(missing_ok=True)
    await cleanup(transport)
    return Run(processes, workflows, seconds, cpu)


# -- main -------------------------------------------------------------------------------------------------------


HEADER = [
    "processes",
    "workflows",
    "runs",
    "hops/s (median)",
    "hops/s (range)",
    "vs 1 process",
    "worker CPU ms/hop",
    "cores busy",
]


async def bench(args: argparse.Namespace) -> None:
    runs: dict[int, list[Run]] = {n: [] for n in args.processes}
    load_before = os.getloadavg()
    for round_number in range(args.rounds):
        for processes in args.processes:
            run = await run_once(args.transport, processes, args.workflows, args.concurrency, args.work_ms)
            runs[processes].append(run)
            print(
                f"  round {round_number + 1}: {processes} process(es) {run.hops_per_second:>8,.0f} hops/s, "
                f"{run.cpu_ms_per_hop:.2f} CPU ms/hop, {run.cores_busy:.2f} cores busy",
                flush=True,
            )
    base = median(run.hops_per_second for run in runs[args.processes[0]])
    rows: list[list[str]] = []
    for processes, done in runs.items():
        rates = [run.hops_per_second for run in done]
        rows.append(
            [
                str(processes),
                str(args.workflows),
                str(len(done)),
                f"{median(rates):,.0f}",
                f"{min(rates):,.0f}-{max(rates):,.0f}",
                f"{median(rates) / base:.2f}x",
                f"{median(run.cpu_ms_per_hop for run in done):.2f}",
                f"{median(run.cores_busy for run in done):.2f}",
            ]
        )
    print()
    print(
        f"signed three-step workflows on {args.transport}, {args.work_ms:g} ms of CPU per step, "
        f"concurrency {args.concurrency} per process, {os.cpu_count()} cores; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    )
    print_table(HEADER, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflows", type=int, default=600, help="three-step workflows per run (default 600)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each process count, alternating (default 2)")
    parser.add_argument("--concurrency", type=int, default=20, help="steps each process runs at once (default 20)")
    parser.add_argument("--work-ms", type=float, default=1.0, help="CPU milliseconds each step spins (default 1)")
    parser.add_argument(
        "--processes",
        type=lambda text: [int(n) for n in text.split(",") if n.strip()],
        default=[1, 2],
        help="comma-separated process counts, the first the baseline (default 1,2)",
    )
    parser.add_argument("--transport", choices=["redis", "sqlite"], default="redis", help="default redis")
    args = parser.parse_args()
    if args.transport == "redis" and not server_up("redis"):
        raise SystemExit("no Redis on 127.0.0.1:6379; start it to run this benchmark")
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
