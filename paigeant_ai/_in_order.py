"""A workflow's events in the order its hops happened, within one worker.

A broker may hand out a hop before the worker that sent it has its confirm: RabbitMQ confirms a persistent message
once it is on disk, and delivers it to a consumer before that. The next step may then start, run and report, while
the hop that sent it still waits for the confirm and has yet to report its own step as done. A worker serving both
steps would hand its `on_event` callbacks (and its `-v` log) the second step's events before the first's: a saga
would seem to undo its first step before its second.

So a hop does not start while another hop of its workflow is settling in the same worker: it waits until that one
has been acked and reported. The wait is bounded (`WAIT_AT_MOST`): a settle stuck on a broker that does not answer
holds the next hop up no longer than that. Across workers nothing is held: each worker's events are in order, and a
`WorkflowStore` orders the events of several by what they say (`store.event_order`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from dataclasses import dataclass, field

__all__ = ("WAIT_AT_MOST", "SettlingWorkflows")

WAIT_AT_MOST = 5.0
"""Seconds a hop waits, at most, for another hop of its workflow to settle before it starts anyway."""


@dataclass(slots=True)
class _Settling:
    hops: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)


class SettlingWorkflows:
    """The workflows a hop of which is settling in this worker, for the hops of theirs that arrive meanwhile."""

    def __init__(self) -> None:
        self._settling: dict[str, _Settling] = {}

    @contextlib.contextmanager
    def settling(self, correlation_id: str) -> Generator[None]:
        """Mark a hop of `correlation_id` as settling for the duration of the block (its publish, ack and reports)."""
        entry = self._settling.get(correlation_id)
        if entry is None:
            entry = self._settling[correlation_id] = _Settling()
        entry.hops += 1
        try:
            yield
        finally:
            entry.hops -= 1
            if entry.hops == 0:
                del self._settling[correlation_id]
                entry.done.set()

    async def wait_for(self, correlation_id: str, *, at_most: float = WAIT_AT_MOST) -> None:
        """Return once no hop of `correlation_id` that was settling here on the call is settling any more."""
        entry = self._settling.get(correlation_id)
        if entry is None:
            return  # the usual case: nothing to wait for, and no await
        # `asyncio.timeout`, not `asyncio.wait_for`: on Python 3.11 that returns instead of raising when a shutdown
        # cancels the hop just as the settle ends, and the hop would then run its step after all.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most):
                await entry.done.wait()
