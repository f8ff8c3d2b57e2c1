"""CPU per hop of an in-memory worker, and of an agent step beside a bare `agent.run`, with an optional profile.

Three-step workflows of plain functions (unsigned) run through a real `Worker` on the in-memory transport; the
CPU this process spends (`time.process_time`) is divided by the hops. An agent step is then timed against the
same `Agent` on the same `FunctionModel` called in a bare `agent.run` loop, in the same run. Other processes on
the machine do not count against process time, but a busy machine still adds noise: each figure is the best of
`--repeat` runs.

    uv run python -m bench.profile_hop                      # 3,000 workflows, best of 3
    uv run python -m bench.profile_hop --profile hop        # and the top frames of the unsigned hop (cProfile)
    uv run python -m bench.profile_hop --profile agent      # the top frames of the agent step
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import pstats
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.models.function import FunctionModel

from paigeant_ai import ActivityContext, ActivitySpec, AgentActivity, FunctionActivity, Worker, WorkflowDispatcher
from paigeant_ai.activity import Activity
from paigeant_ai.transports.memory import InMemoryTransport

from ._paigeant import NAMES, nothing, reply_ok
from ._security import security_for


class Counted:
    """Wraps the last step: stops the worker once every workflow reached it."""

    def __init__(self, inner: Activity, total: int, done: asyncio.Event) -> None:
        self.inner, self.spec, self.total, self.done, self.seen = inner, inner.spec, total, done, 0

    async def run(self, ctx: ActivityContext) -> object:
        output = await self.inner.run(ctx)
        self.seen += 1
        if self.seen >= self.total:
            self.done.set()
        return output


def steps(agent: bool) -> list[Activity]:
    """Two function steps, then a function or an agent."""
    last: Activity = (
        AgentActivity(Agent(FunctionModel(reply_ok), name=NAMES[2]), prompt="Say ok.")
        if agent
        else FunctionActivity(nothing, name=NAMES[2])
    )
    return [FunctionActivity(nothing, name=NAMES[0]), FunctionActivity(nothing, name=NAMES[1]), last]


async def workflows_cpu(workflows: int, *, agent: bool, signed: bool, profile: cProfile.Profile | None) -> float:
    """Microseconds of CPU per hop: the worker's run only, once every workflow was dispatched."""
    transport = InMemoryTransport(namespace=f"profile-{uuid.uuid4().hex[:8]}")
    security = security_for(transport, signed)
    async with transport:
        dispatcher = WorkflowDispatcher(transport, security=security)
        specs = [ActivitySpec(name=n) for n in NAMES]
        await asyncio.gather(*(dispatcher.dispatch_workflow(specs, {"blob": "x" * 512}) for _ in range(workflows)))
        done = asyncio.Event()
        activities = steps(agent)
        activities[2] = Counted(activities[2], workflows, done)
        worker = Worker(transport, activities, concurrency=50, security=security)
        gc.collect()
        started = time.process_time()
        if profile is not None:
            profile.enable()
        running = asyncio.create_task(worker.run())
        await done.wait()
        if profile is not None:
            profile.disable()
        spent = time.process_time() - started
        worker.stop()
        await running
    return spent / (workflows * 3) * 1e6


async def bare_agent_cpu(rounds: int) -> float:
    """Microseconds of CPU per bare `agent.run` on the bench's FunctionModel."""
    agent = Agent(FunctionModel(reply_ok), name=NAMES[2])
    started = time.process_time()
    for _ in range(rounds):
        await agent.run("Say ok.")
    return (time.process_time() - started) / rounds * 1e6


def best(repeat: int, run: Callable[[], Coroutine[Any, Any, float]]) -> float:
    """The least of `repeat` runs: the one other processes on the machine disturbed least."""
    return min(asyncio.run(run()) for _ in range(repeat))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflows", type=int, default=3000, help="three-step workflows per run (default 3000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts (default 3)")
    parser.add_argument("--profile", choices=["hop", "agent"], help="print the top frames of one run")
    parser.add_argument("--top", type=int, default=30, help="frames to print with --profile (default 30)")
    args = parser.parse_args()
    if args.profile is not None:
        asyncio.run(workflows_cpu(50, agent=True, signed=False, profile=None))  # warm: imports, the versions' scan
        profile = cProfile.Profile()
        asyncio.run(workflows_cpu(args.workflows, agent=args.profile == "agent", signed=False, profile=profile))
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
        return
    n = args.workflows
    asyncio.run(workflows_cpu(50, agent=True, signed=True, profile=None))  # warm: imports, the versions' scan
    unsigned = best(args.repeat, lambda: workflows_cpu(n, agent=False, signed=False, profile=None))
    signed = best(args.repeat, lambda: workflows_cpu(n, agent=False, signed=True, profile=None))
    agent = best(args.repeat, lambda: workflows_cpu(n // 4, agent=True, signed=False, profile=None))
    bare = best(args.repeat, lambda: bare_agent_cpu(n // 4))
    agent_step = agent * 3 - unsigned * 2  # the agent hop alone: two function hops taken out
    print(f"CPU per hop, best of {args.repeat} runs of {n} three-step workflows (in-memory, concurrency 50)")
    print(f"  unsigned function hop   {unsigned:8.1f} us   ({1e6 / unsigned:,.0f} hops/s of CPU)")
    print(f"  signed function hop     {signed:8.1f} us")
    print(f"  agent hop (unsigned)    {agent_step:8.1f} us")
    print(f"  bare agent.run          {bare:8.1f} us   (agent hop / bare: {agent_step / bare:.2f}x)")


if __name__ == "__main__":
    main()
