"""CPU per signed hop: the Ed25519 calls alone, each stage of a hop, and whole hops through a worker.

Everything is CPU time (`time.process_time`), best of several runs, all in one process, so that other work on the
machine weighs on every number alike. Four tables:

1. raw Ed25519: one signature and one verification over the middle hop's signing input, with each implementation
   at hand (libsodium through PyNaCl, which paigeant signs with; OpenSSL through `cryptography`, joserfc's own).
2. by stage: the middle hop of a three-step workflow (payload 512 bytes), signed and verified many times, with and
   without the signed plan it carries, and with one signed revision logged. The plan check is timed "cold" (the
   first hop of a workflow a worker sees: the plan's signature is verified) and "warm" (every later hop).
3. whole hops: three-step workflows run through a `Worker` on the in-memory transport, unsigned, signed with
   joserfc's own algorithms (OpenSSL, as before libsodium) and signed as paigeant does, runs alternating; CPU
   per hop, and the signatures made and verified per hop (the hop's, its plan's, its events' and progress').
4. the target: a signed hop costs no more than an unsigned one and 1.25 x (the fastest sign + verify).

    uv run python -m bench.hop_cost                 # 3,000 rounds, 1,000 workflows a run
    uv run python -m bench.hop_cost --rounds 10000 --workflows 1500
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import SigningKey

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    FunctionActivity,
    PaigeantMessage,
    Revision,
    Worker,
    WorkflowDispatcher,
    get_transport,
)
from paigeant_ai._plan import PlanCheck, new_plan, revise_route
from paigeant_ai._sealing import seal, signing_input
from paigeant_ai.security import MessageSigner, generate_key

from ._security import counted, joserfc_ed25519, security_for

MAX_BYTES = 1024 * 1024
NAMES = ["bench-a", "bench-b", "bench-c"]
MARGIN = 1.25
"""How much of one Ed25519 sign and verify a signed hop may cost over an unsigned one."""


def print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    print()


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
    """CPU microseconds per call of `func(i)`, best of three runs."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for i in range(rounds):
            func(i)
        best = min(best, (time.process_time() - start) / rounds * 1e6)
    return best


async def per_await(rounds: int, func: Callable[[int], Awaitable[object]]) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for i in range(rounds):
            await func(i)
        best = min(best, (time.process_time() - start) / rounds * 1e6)
    return best


# -- 1. raw Ed25519 ------------------------------------------------------------------------------------------


def raw_ed25519(rounds: int) -> tuple[float, float]:
    """Print one sign and one verify per implementation over a hop's signing input; return the fastest pair."""
    signer = MessageSigner(generate_key("bench-1"))
    body = seal(middle_hop(plan=True, revised=False, signer=signer), signer, max_bytes=MAX_BYTES, trace=False)
    data = signing_input(body, PaigeantMessage.from_json(body).security.jws_signature or "")
    openssl = Ed25519PrivateKey.generate()
    openssl_public, openssl_signature = openssl.public_key(), openssl.sign(data)
    sodium = SigningKey.generate()
    sodium_public, sodium_signature = sodium.verify_key, sodium.sign(data).signature
    measured = {
        "libsodium (PyNaCl)": (
            per_call(rounds, lambda _: sodium.sign(data)),
            per_call(rounds, lambda _: sodium_public.verify(data, sodium_signature)),
        ),
        "OpenSSL (cryptography)": (
            per_call(rounds, lambda _: openssl.sign(data)),
            per_call(rounds, lambda _: openssl_public.verify(openssl_signature, data)),
        ),
    }
    rows = [["Ed25519 over a hop", "bytes", "sign µs", "verify µs", "sign + verify µs"]]
    for name, (sign, verify) in measured.items():
        rows.append([name, f"{len(data):,}", f"{sign:,.1f}", f"{verify:,.1f}", f"{sign + verify:,.1f}"])
    print_table(rows)
    return min(measured.values(), key=sum)


# -- 2. by stage ---------------------------------------------------------------------------------------------


async def by_stage(rounds: int, *, plan: bool, revised: bool) -> list[str]:
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
    variant = "with plan" + (", 1 revision" if revised else "") if plan else "no plan"
    check = ("-", "-")
    if plan:
        parsed, warm_check = PaigeantMessage.from_json(body), PlanCheck()
        cold = per_call(rounds, lambda _: PlanCheck().check(parsed, "bench-1", None, signer))
        warm = per_call(rounds, lambda _: warm_check.check(parsed, "bench-1", None, signer))
        check = (f"{cold:,.0f}", f"{warm:,.0f}")
    return [variant, f"{len(body):,}", f"{sign:,.0f}", f"{parse:,.0f}", f"{verified:,.0f}", *check]


# -- 3. whole hops -------------------------------------------------------------------------------------------


async def nothing(ctx: ActivityContext) -> None:
    return None


async def whole_hops(workflows: int, *, signed: bool) -> tuple[float, tuple[float, float]]:
    """CPU microseconds per hop of `workflows` three-step workflows through one in-memory worker, and the
    signatures made and verified on the way (dispatching them is not counted)."""
    transport = get_transport("inmemory", namespace=f"bench-{time.perf_counter_ns()}")
    security = counted(security_for(transport, signed))
    done = asyncio.Event()
    finished = 0

    async def last(ctx: ActivityContext) -> None:
        nonlocal finished
        finished += 1
        if finished >= workflows:
            done.set()

    steps = [FunctionActivity(nothing, name=NAMES[0]), FunctionActivity(nothing, name=NAMES[1])]
    steps.append(FunctionActivity(last, name=NAMES[2]))
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security.signer)
        specs = [ActivitySpec(name=name) for name in NAMES]
        await asyncio.gather(*(dispatcher.dispatch_workflow(specs, {"blob": "x" * 512}) for _ in range(workflows)))
        gc.collect()
        worker = Worker(transport, steps, concurrency=50, security=security.signer)
        security.reset()
        start = time.process_time()
        running = asyncio.create_task(worker.run())
        await done.wait()
        await worker.reporter.flush()  # the events and progress entries of these hops are signed too
        cpu = time.process_time() - start
        worker.stop()
        await running
    return cpu / (3 * workflows) * 1e6, security.per(3 * workflows)


VARIANTS = ["unsigned", "signed, OpenSSL (joserfc, before)", "signed, libsodium"]


async def whole_hop_run(workflows: int, variant: str) -> tuple[float, tuple[float, float]]:
    if variant == VARIANTS[1]:
        with joserfc_ed25519():
            return await whole_hops(workflows, signed=True)
    return await whole_hops(workflows, signed=variant != VARIANTS[0])


async def whole_hop_table(workflows: int, runs: int) -> tuple[float, float]:
    """Print CPU per hop of each variant (runs alternating); return the best signed (libsodium) and unsigned."""
    cpu: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    made: dict[str, tuple[float, float]] = {}
    for _ in range(runs):
        for variant in VARIANTS:
            per_hop, made[variant] = await whole_hop_run(workflows, variant)
            cpu[variant].append(per_hop)
    rows = [["whole hop (in-memory worker)", "CPU µs per hop, best", "all runs", "signed per hop", "verified per hop"]]
    for variant in VARIANTS:
        runs_shown = ", ".join(f"{value:,.0f}" for value in cpu[variant])
        made_per_hop, verified_per_hop = made[variant]
        rows.append(
            [variant, f"{min(cpu[variant]):,.0f}", runs_shown, f"{made_per_hop:.2f}", f"{verified_per_hop:.2f}"]
        )
    print_table(rows)
    return min(cpu[VARIANTS[2]]), min(cpu[VARIANTS[0]])


# -- 4. the target -------------------------------------------------------------------------------------------


def target_line(signed: float, unsigned: float, sign: float, verify: float) -> str:
    limit = unsigned + MARGIN * (sign + verify)
    verdict = "PASS" if signed <= limit else "FAIL"
    return (
        f"signed <= unsigned + {MARGIN} x crypto: {verdict} ({signed:,.0f} µs vs {limit:,.0f} µs = "
        f"{unsigned:,.0f} + {MARGIN} x ({sign:,.1f} + {verify:,.1f}))"
    )


async def bench(rounds: int, workflows: int, runs: int) -> None:
    sign, verify = raw_ed25519(rounds)
    stages = [["hop", "bytes", "sign µs", "parse µs", "verify µs", "plan check cold µs", "plan check warm µs"]]
    for plan, revised in [(False, False), (True, False), (True, True)]:
        stages.append(await by_stage(rounds, plan=plan, revised=revised))
    print_table(stages)
    signed, unsigned = await whole_hop_table(workflows, runs)
    print(target_line(signed, unsigned, sign, verify))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3000, help="calls timed per measurement (default 3,000)")
    parser.add_argument("--workflows", type=int, default=1000, help="workflows per whole-hop run (default 1,000)")
    parser.add_argument("--runs", type=int, default=3, help="whole-hop runs, signed and unsigned each (default 3)")
    args = parser.parse_args()
    asyncio.run(bench(args.rounds, args.workflows, args.runs))


if __name__ == "__main__":
    main()
