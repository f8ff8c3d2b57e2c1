"""Several processes writing one SQLite file at once: how many operations fail with "database is locked".

Each process publishes `--messages` messages to one shared address while consuming and acknowledging from it, as
workers on one machine do; every call that fails is counted. Run it with more processes than cores to put the
file's write lock under pressure:

    uv run python -m bench.sqlite_writers --processes 4 --messages 2000
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import tempfile
import time
from pathlib import Path

from paigeant_ai.exceptions import TransportError
from paigeant_ai.transports.sqlite import SQLiteTransport

from ._sqlite_raw import remove_files


async def _work(path: Path, messages: int) -> tuple[int, int, int]:
    """(published, acknowledged, failed calls) of one process."""
    failed = published = acked = 0
    async with SQLiteTransport(path, poll_interval=0.05) as transport:
        consumer = await transport.consume("work", prefetch=50)

        async def publish_all() -> None:
            nonlocal published, failed
            for n in range(messages):
                try:
                    await transport.publish("work", str(n).encode())
                    published += 1
                except TransportError:
                    failed += 1

        async def ack_until_quiet() -> None:
            nonlocal acked, failed
            while True:
                try:
                    delivery = await asyncio.wait_for(anext(consumer), 3.0)
                    await transport.ack(delivery)
                    acked += 1
                except TimeoutError:
                    return
                except TransportError:
                    failed += 1

        await asyncio.gather(publish_all(), ack_until_quiet())
        await consumer.aclose()
    return published, acked, failed


def _process(path: str, messages: int, results: multiprocessing.Queue[tuple[int, int, int, float]]) -> None:
    started = time.process_time()
    published, acked, failed = asyncio.run(_work(Path(path), messages))
    results.put((published, acked, failed, time.process_time() - started))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--messages", type=int, default=2000, help="messages each process publishes")
    args = parser.parse_args()
    path = Path(tempfile.gettempdir()) / f"bench-writers-{time.time_ns()}.sqlite3"
    asyncio.run(_create(path))
    results: multiprocessing.Queue[tuple[int, int, int, float]] = multiprocessing.Queue()
    workers = [
        multiprocessing.Process(target=_process, args=(str(path), args.messages, results))
        for _ in range(args.processes)
    ]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    totals = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started - 3.0  # each process waits 3 s for quiet before it stops
    remove_files(path)
    published, acked, failed = (sum(t[i] for t in totals) for i in range(3))
    cpu = sum(t[3] for t in totals)
    operations = published + acked
    print(f"{args.processes} processes on one file, {args.messages} messages each")
    print(f"  published {published:,}, acknowledged {acked:,}, failed calls {failed}")
    print(f"  {operations / seconds:,.0f} operations/s, {cpu / operations * 1e6:,.0f} us CPU per operation")


async def _create(path: Path) -> None:
    async with SQLiteTransport(path):
        pass


if __name__ == "__main__":
    main()
