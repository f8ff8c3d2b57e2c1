"""What an agent step saw and produced: `StepRecord`, reported with the step's `step_completed` event.

`AgentActivity` records it by default, so that the workflow store keeps, beside each agent step's status, the
rendered prompt of its run, the payload it saw, its output and the tools it called: what `paigeant_ai.evals`
turns into a dataset. The record travels in the event, so it is signed with the event's batch and verified by
the `WorkflowProjector` before any store keeps it, like the rest of the store's data.

Nothing of the security context is recorded: the user's on-behalf-of token and the message's signature are
replaced by `[redacted]` wherever they appear (a prompt that quoted the token, say). A record larger than its
bound keeps only its size, the tools called and the route (`omitted`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field, JsonValue
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart

from ._wire import Wire

if TYPE_CHECKING:
    from pydantic_ai.agent import AgentRunResult

    from .activity import ActivityContext

__all__ = ("DEFAULT_RECORD_BYTES", "REDACTED", "StepRecord", "record_step")

DEFAULT_RECORD_BYTES = 32_000
"""The largest record (its JSON, in bytes) an `AgentActivity` keeps by default."""
REDACTED = "[redacted]"


class StepRecord(Wire):
    """What one agent step saw and produced, as its worker recorded it (see `AgentActivity(record=...)`)."""

    prompt: str | None = None
    """The rendered user prompt of the step's run."""
    inputs: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    """The workflow's payload as the step saw it."""
    output_key: str
    """Where the step put its output in the payload."""
    output: JsonValue = None
    """The agent's output, as stored in the payload."""
    tool_calls: list[str] = Field(default_factory=list[str])
    """The tools the agent called, in order (the output tool left out)."""
    route: list[str] = Field(default_factory=list[str])
    """The steps still to run when the step started, itself first."""
    omitted: int | None = Field(default=None, exclude_if=lambda value: value is None)
    """Set when the record was larger than its bound: its size in bytes; `prompt`, `inputs` and `output` are
    then left out."""


def record_step(
    ctx: ActivityContext, result: AgentRunResult[Any], output: JsonValue, output_key: str, *, max_bytes: int
) -> StepRecord:
    """The record of the agent run `result` of step `ctx`, its secrets redacted and its size bounded."""
    secrets = [value for value in (ctx.message.security.obo_token, ctx.message.security.jws_signature) if value]
    record = StepRecord(
        prompt=first_prompt(result.all_messages()),
        inputs=dict(ctx.payload),
        output_key=output_key,
        output=output,
        # pydantic-ai names the run's output tool only privately; without it, no tool call is taken for one.
        tool_calls=tools_called(result.all_messages(), getattr(result, "_output_tool_name", None)),
        route=[spec.name for spec in ctx.message.routing_slip.itinerary],
    )
    record = StepRecord.model_validate(_redacted(record.model_dump(mode="json"), secrets))
    size = len(record.model_dump_json())
    if size <= max_bytes:
        return record
    return StepRecord(output_key=output_key, tool_calls=record.tool_calls, route=record.route, omitted=size)


def first_prompt(messages: Sequence[ModelMessage]) -> str | None:
    """The first text the user gave the run (a resumed run's conversation starts with it)."""
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart):
                    return part.content if isinstance(part.content, str) else str(part.content)
    return None


def tools_called(messages: Sequence[ModelMessage], output_tool: str | None) -> list[str]:
    """The tools that returned to the run, in order, but its output tool."""
    return [
        part.tool_name
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart) and part.tool_name != output_tool
    ]


def _redacted(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, dict):
        return {_redacted(key, secrets): _redacted(item, secrets) for key, item in value.items()}  # pyright: ignore[reportUnknownVariableType]
    if isinstance(value, list):
        return [_redacted(item, secrets) for item in value]  # pyright: ignore[reportUnknownVariableType]
    return value
