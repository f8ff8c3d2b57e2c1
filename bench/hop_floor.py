"""The least CPU any hop can cost in this design, with none of the worker around it.

A hop must at least parse and validate the message it received, log the step in the slip, write the successor
message, and hand it to a queue; a signed hop also verifies one signature and makes one. This times exactly those
operations, in a bare loop over a real three-step message from the dispatcher (no events, no dedupe, no settling,
no activity), so the figures are a floor the worker's own per-hop CPU can approach but not go under.

    uv run python -m bench.hop_floor
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Callable

from paigeant_ai import ActivitySpec, WorkflowDispatcher
from paigeant_ai.contracts import PaigeantMessage
from paigeant_ai.transports.memory import InMemoryTransport

from ._paigeant import NAMES
from ._signatures import sign_and_verify_cpu


async def first_message() -> bytes:
    """The body the dispatcher publishes for the bench's three-step workflow (a 512-byte payload)."""
    transport = InMemoryTransport(namespace=f"floor-{uuid.uuid4().hex[:8]}")
    async with transport:
        await WorkflowDispatcher(transport).dispatch_workflow(
            [ActivitySpec(name=n) for n in NAMES], {"blob": "x" * 512}
        )
        async with await transport.consume(NAMES[0]) as consumer:
            delivery = await anext(consumer)
            await transport.ack(delivery)
            return delivery.body


def per_call_us(rounds: int, step: Callable[[], object]) -> float:
    started = time.process_time()
    for _ in range(rounds):
        step()
    return (time.process_time() - started) / rounds * 1e6


def floor_table(body: bytes, rounds: int) -> list[tuple[str, float]]:
    """Microseconds of CPU of each operation a hop cannot skip, and their sum."""
    message = PaigeantMessage.model_validate_json(body)
    queue: asyncio.Queue[bytes] = asyncio.Queue()

    def parse_and_log() -> None:  # a parsed message is the hop's own: the step is logged in place
        PaigeantMessage.model_validate_json(body).routing_slip.mark_complete(NAMES[0])

    def queue_round() -> None:
        queue.put_nowait(body)
        queue.get_nowait()

    parse = per_call_us(rounds, lambda: PaigeantMessage.model_validate_json(body))
    log = max(per_call_us(rounds, parse_and_log) - parse, 0.0)
    dump = per_call_us(rounds, message.model_dump_json)
    hand = per_call_us(rounds, queue_round)
    crypto = min(sign_and_verify_cpu(len(body), rounds // 4).values())
    unsigned = parse + log + dump + hand
    return [
        ("parse and validate the message (pydantic)", parse),
        ("log the step in the slip", log),
        ("write the successor message (pydantic)", dump),
        ("put on and take off an asyncio queue", hand),
        ("unsigned floor (sum)", unsigned),
        ("Ed25519 sign + verify, fastest library", crypto),
        ("signed floor (sum)", unsigned + crypto),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20_000, help="calls of each operation (default 20,000)")
    args = parser.parse_args()
    body = asyncio.run(first_message())
    print(f"The floor of one hop: best of 3 runs, message of {len(body):,} bytes")
    runs = [floor_table(body, args.rounds) for _ in range(3)]
    for index, (label, _) in enumerate(runs[0]):
        best = min(run[index][1] for run in runs)
        print(f"  {label:<45} {best:8.1f} us   ({1e6 / best:>9,.0f} per second of one core)")


if __name__ == "__main__":
    main()
