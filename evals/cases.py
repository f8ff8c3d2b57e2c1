"""What each suite's cases give their task (inputs) and what the task returns (the output the evaluators judge)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue

__all__ = (
    "DispatchedPlan",
    "Exchange",
    "PlannerCase",
    "PlannerRun",
    "ToolCall",
    "WorkflowCase",
    "WorkflowRun",
    "WorkflowStatus",
)

WorkflowStatus = Literal["completed", "ended", "faulted", "rejected", "waiting", "timed_out"]
"""How a workflow finished: all steps done; ended early by a step (`EndWorkflow`); faulted; dead-lettered before
it ran; parked, waiting for a person; or still unfinished when the case's time ran out."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorkflowCase(_Strict):
    """One workflow to run from dispatch to its end.

    Attributes:
        workflow: Which workflow: a name from `evals.workflows.WORKFLOWS`.
        variables: The workflow's initial payload.
        stock: The shop's stock before the run (order workflows); `None` keeps the example's own.
        approvals: How a person answers each approval the workflow waits for; `None` leaves it waiting.
        timeout: Seconds the whole workflow may take before the case counts as `timed_out`.
    """

    workflow: str
    variables: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    stock: dict[str, int] | None = None
    approvals: Literal["approve", "deny"] | None = None
    timeout: float = 30.0


class WorkflowRun(_Strict):
    """What happened to the workflow, as its events and dead letters tell it.

    Attributes:
        status: How it finished.
        steps: The steps that completed, in the order they completed.
        retries: How many times each step was retried (steps that were never retried are left out).
        payload: The final payload (for a faulted workflow, the payload of its dead-lettered copy).
        reason: Why it ended early, faulted or was rejected.
        duration: Seconds from dispatch to the workflow's last event.
    """

    status: WorkflowStatus
    steps: list[str]
    retries: dict[str, int] = Field(default_factory=dict[str, int])
    payload: dict[str, JsonValue] | None = None
    reason: str | None = None
    duration: float


class Exchange(_Strict):
    """One earlier turn of the conversation: what the user said, and what the planner answered."""

    user: str
    assistant: str


class PlannerCase(_Strict):
    """One request to the planner agent.

    Attributes:
        request: What the user asks for, in their words.
        history: The conversation before it, oldest first (given to the agent as its message history).
    """

    request: str
    history: list[Exchange] = Field(default_factory=list[Exchange])


class DispatchedPlan(_Strict):
    """A workflow the planner dispatched, as its first message carries it on the transport."""

    correlation_id: str
    activities: list[str]
    variables: dict[str, JsonValue]


class ToolCall(_Strict):
    """One tool call the planner made.

    Attributes:
        name: The tool.
        args: Its arguments, as the model sent them.
        retried: The tool answered with a retry (a plan it refused, say) rather than a result.
        refusal: What the tool said when it answered with a retry.
    """

    name: str
    args: dict[str, Any]
    retried: bool = False
    refusal: str | None = None


class PlannerRun(_Strict):
    """What the planner did with a request.

    Attributes:
        dispatched: The workflows it dispatched, read back from the transport.
        tool_calls: Its tool calls, in order.
        reply: Its final answer to the user.
    """

    dispatched: list[DispatchedPlan]
    tool_calls: list[ToolCall]
    reply: str
