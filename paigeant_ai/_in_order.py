"""A workflow's events in the order its hops happened, within one worker.

A broker may hand out a hop before the worker that sent it has its confirm: RabbitMQ confirms a persistent message
once it is on disk, and delivers it to a consumer before that. The next step may then start, run and report, while
the hop that sent it still waits for the confirm and has yet to report its own step as done. A worker serving both
steps would hand its `on_event` callbacks (and its `-v` log) the second step's events before the first's: a saga
would seem to undo its first step before its second.

So a hop that arrives while other hops of its workflow are settling in the same worker waits until those have been
acked and reported (not for the ones that begin settling after it arrived). The wait is bounded (`WAIT_AT_MOST`):
a settle stuck on a broker that does not answer holds the next hop up no longer than that. Across workers nothing
is held: each worker's events are in order, and a `WorkflowStore` orders the events of several by what they say
(`store.event_order`).
"""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ("WAIT_AT_MOST", "SettlingWorkflows")

WAIT_AT_MOST = 5.0
"""Seconds a hop waits, at most, for the hops of its workflow settling when it arrived, before it starts anyway."""


class SettlingWorkflows:
    """The hops settling in this worker, by workflow, for the hops of theirs that arrive meanwhile."""

    def __init__(self) -> None:
        self._settling: dict[str, list[asyncio.Event]] = {}

    def begin(self, correlation_id: str) -> asyncio.Event:
        """Mark a hop of `correlation_id` as settling (its publish, ack and reports) until `end` of what this returns.

        Two plain calls rather than a context manager: this runs on every hop, and a generator costs twice as much.
        """
        done = asyncio.Event()
        self._settling.setdefault(correlation_id, []).append(done)
        return done

    def end(self, correlation_id: str, done: asyncio.Event) -> None:
        """The hop `begin` marked has settled: the hops that waited for it go on."""
        hops = self._settling[correlation_id]
        hops.remove(done)
        if not hops:
            del self._settling[correlation_id]
        done.set()

    async def wait_for(self, correlation_id: str, *, at_most: float = WAIT_AT_MOST) -> None:
        """Return once every hop of `correlation_id` that was settling here on the call has settled.

        Only those: the branches of a wide parallel group settle one after another, and a hop that waited for all
        of them, those that began after it arrived too, could wait the whole `at_most` behind them.
        """
        hops = self._settling.get(correlation_id)
        if hops is None:
            return  # the usual case: nothing to wait for, and no await
        earlier = list(hops)
        # `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11 that returns instead of raising when a shutdown
        # cancels the hop just as the settle ends, and the hop would then run its step after all.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                for done in earlier:
                    await done.wait()
