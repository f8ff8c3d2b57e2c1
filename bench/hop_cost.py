"""CPU per signed hop, by stage: signing the next hop, verifying the received one, and checking its plan.

The middle hop of a three-step workflow (payload 512 bytes) is signed and verified many times in one process, with
and without the signed plan it carries since plans were added, and with one signed revision logged. The plan
check is timed twice: "cold" verifies the plan's signature (the first hop of a workflow a worker sees), "warm"
finds it verified already (every later hop of that workflow on the same worker).

    uv run python -m bench.hop_cost                 # 3,000 rounds each
    uv run python -m bench.hop_cost --rounds 10000
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable

from paigeant_ai import ActivitySpec, PaigeantMessage, Revision
from paigeant_ai._plan import PlanCheck, new_plan, revise_route
from paigeant_ai._sealing import seal
from paigeant_ai.security import MessageSigner, generate_key

MAX_BYTES = 1024 * 1024
NAMES = ["bench-a", "bench-b", "bench-c"]


def middle_hop(*, plan: bool, revised: bool, signer: MessageSigner) -> PaigeantMessage:
    """The hop to the second step, as the first step's worker makes it."""
    message = PaigeantMessage.new([ActivitySpec(name=name) for name in NAMES], {"blob": "x" * 512})
    if plan:
        message.plan = new_plan(message, signer)
    if revised:
        remaining = [ActivitySpec(name="bench-b"), ActivitySpec(name="bench-x"), ActivitySpec(name="bench-c")]
        revise_route(message, [Revision(step=0, activity="bench-a", action="add", remaining=remaining)], signer)
    message.routing_slip.mark_complete("bench-a")
    return message.next_hop()


def per_call(rounds: int, func: Callable[[int], object]) -> float:
    """Microseconds per call of `func(i)`, best of three runs."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(rounds):
            func(i)
        best = min(best, (time.perf_counter() - start) / rounds * 1e6)
    return best


async def per_await(rounds: int, func: Callable[[int], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(rounds):
            await func(i)
        best = min(best, (time.perf_counter() - start) / rounds * 1e6)
    return best


async def measure(rounds: int, *, plan: bool, revised: bool) -> list[str]:
    signer = MessageSigner(generate_key("bench-1"))
    hop = middle_hop(plan=plan, revised=revised, signer=signer)
    body = seal(hop, signer, max_bytes=MAX_BYTES, trace=False)
    spec = hop.routing_slip.itinerary[0]

    sign = per_call(rounds, lambda _: seal(hop.next_hop(), signer, max_bytes=MAX_BYTES, trace=False))
    parse = per_call(rounds, lambda _: PaigeantMessage.from_json(body))

    async def verify(i: int) -> None:
        message = PaigeantMessage.from_json(body)
        message.message_id = f"m-{i}-{time.perf_counter_ns()}"  # never a replay (the signature covers `body`)
        await signer.verify(message, spec, body)

    verified = await per_await(rounds, verify)
    variant = "with plan" + (", 1 revision" if revised else "") if plan else "no plan (before)"
    check = ("-", "-")
    if plan:
        parsed, warm_check = PaigeantMessage.from_json(body), PlanCheck()
        cold = per_call(rounds, lambda _: PlanCheck().check(parsed, "bench-1", None, signer))
        warm = per_call(rounds, lambda _: warm_check.check(parsed, "bench-1", None, signer))
        check = (f"{cold:,.0f}", f"{warm:,.0f}")
    return [variant, f"{len(body):,}", f"{sign:,.0f}", f"{parse:,.0f}", f"{verified:,.0f}", *check]


async def bench(rounds: int) -> None:
    header = ["hop", "bytes", "sign µs", "parse µs", "verify µs", "plan check cold µs", "plan check warm µs"]
    rows = [header]
    for plan, revised in [(False, False), (True, False), (True, True)]:
        rows.append(await measure(rounds, plan=plan, revised=revised))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for n, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3000, help="calls timed per measurement (default 3,000)")
    asyncio.run(bench(parser.parse_args().rounds))


if __name__ == "__main__":
    main()
