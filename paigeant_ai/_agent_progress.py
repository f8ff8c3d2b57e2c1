"""An agent's output as it happens: `AgentActivity(..., stream_progress=True)` forwards the text its model streams,
its tool calls and their results into the workflow's progress stream while the step runs.

It is pydantic-ai's `event_stream_handler` on the step's `agent.run`, so the run itself is unchanged. What it sends
is bounded: text deltas are coalesced into one `agent_output` event at most every `1 / rate` seconds (text held back
goes out when that time is up, even if the model pauses mid-answer), each event's
`detail` is cut at `max_chars`, and a step sends at most `max_events` of them (then one saying the rest is left
out). The events go only to the progress stream (`WorkflowDispatcher.watch`), signed like every other; never to
`events`, the workflow store or the callbacks, so a chatty agent costs the store nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic_ai.messages import (
    FunctionToolCallEvent,
    FunctionToolResultEvent,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
)
from pydantic_ai.tools import RunContext

from .exceptions import UserError

if TYPE_CHECKING:
    from ._events import EventReporter
    from .contracts import PaigeantMessage

__all__ = ("OutputLimits", "StepProgress")


@dataclass(frozen=True, slots=True)
class OutputLimits:
    """How much of an agent's output a step forwards.

    Attributes:
        rate: Events a second at most for the streamed text (deltas in between are joined).
        max_chars: The longest `detail` of one event; longer text, tool arguments or results are cut.
        max_events: Events a step sends at most.
    """

    rate: float = 4.0
    max_chars: int = 2000
    max_events: int = 200

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.max_chars > 0 and self.max_events > 0):
            raise UserError(
                "stream_progress limits must be positive: OutputLimits(rate=4, max_chars=2000, max_events=200)"
            )


class StepProgress:
    """Where one step's running output goes: its workflow's progress stream, through the worker's reporter."""

    def __init__(self, reporter: EventReporter, message: PaigeantMessage) -> None:
        self.reporter = reporter
        self.message = message

    def handler(self, limits: OutputLimits) -> Any:
        """An `event_stream_handler` for one run of the step's agent."""
        forward = _Forwarder(self, limits)

        async def handle(ctx: RunContext[Any], events: AsyncIterable[Any]) -> None:
            try:
                async for event in events:
                    forward.take(event)
                forward.flush_text()
            finally:
                forward.stop_timer()  # nothing of this run is sent once it stopped

        return handle

    def send(self, part: str, detail: str) -> None:
        self.reporter.report_progress("agent_output", self.message, part=part, detail=detail)


class _Forwarder:
    def __init__(self, progress: StepProgress, limits: OutputLimits) -> None:
        self.progress = progress
        self.limits = limits
        self.text: list[str] = []
        self.last_sent = 0.0
        self.sent = 0
        self._timer: asyncio.TimerHandle | None = None

    def take(self, event: Any) -> None:
        if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart) and event.part.content:
            self._text(event.part.content)
        elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta) and event.delta.content_delta:
            self._text(event.delta.content_delta)
        elif isinstance(event, FunctionToolCallEvent):
            self.flush_text()
            self._send("tool_call", f"{event.part.tool_name}({event.part.args_as_json_str()})")
        elif isinstance(event, FunctionToolResultEvent):
            self.flush_text()
            self._send("tool_result", f"{event.part.tool_name}: {event.part.model_response_str()}")

    def _text(self, delta: str) -> None:
        self.text.append(delta)
        wait = 1 / self.limits.rate - (time.monotonic() - self.last_sent)
        if wait <= 0:
            self.flush_text()
        elif self._timer is None:  # a model that pauses shows what it said so far once the time is up
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush_text)

    def stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def flush_text(self) -> None:
        self.stop_timer()
        if self.text:
            text, self.text = "".join(self.text), []
            self._send("text", text)

    def _send(self, part: str, detail: str) -> None:
        if self.sent > self.limits.max_events:
            return
        self.sent += 1
        self.last_sent = time.monotonic()
        if self.sent > self.limits.max_events:
            self.progress.send("note", f"the step's output past {self.limits.max_events} events is left out")
            return
        if len(detail) > self.limits.max_chars:
            detail = detail[: self.limits.max_chars - 1] + "…"
        self.progress.send(part, detail)
