"""The offline planner: a deterministic `FunctionModel` that stands in for an LLM in the planner suite.

It sees what a model sees and nothing else: the conversation (`messages`: the user's turns, its own earlier replies,
and the tools' answers) and the tool definitions. It knows no activity by name. It reads the request
(`evals.reading`), calls `list_activities`, and plans from what the catalog says: the activity whose name holds the
request's verb (or every activity of the flow the verb names, or the one whose description says what the request
asks: "check the order", "in stock"), the activities that produce what those need, in the order the variables
flow. It asks when a value the plan needs is not in the conversation, and says so when no activity does what is
asked. It does not read the ordering rules ahead: it dispatches, and when the toolset refuses
the plan it repairs it from the refusal (adds a step, moves one before another, drops one that conflicts), as a
model would, unless the repair goes against what the user asked (leaving a step out, doing a step twice), in which
case it tells the user the catalog refuses it. So an unsafe plan is refused by the toolset, not by this policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_core import to_jsonable_python

from .planning import Activity, Say, decide
from .reading import read

__all__ = ("Conversation", "offline_planner", "planner_policy")

PolicyFunction = Callable[[list[ModelMessage], AgentInfo], ModelResponse]


@dataclass
class Conversation:
    """What the model was shown: the user's messages, and the tool calls and answers since the latest one."""

    requests: list[str] = field(default_factory=list[str])
    answers: list[ToolReturnPart] = field(default_factory=list[ToolReturnPart])
    dispatched: list[list[str]] = field(default_factory=list[list[str]])

    @classmethod
    def of(cls, messages: list[ModelMessage]) -> Conversation:
        conversation = cls()
        for message in messages:
            for part in message.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    conversation.requests.append(part.content)
                    conversation.answers, conversation.dispatched = [], []
                elif isinstance(part, ToolReturnPart) and isinstance(message, ModelRequest):
                    conversation.answers.append(part)
                elif isinstance(part, ToolCallPart) and part.tool_name == "dispatch_workflow":
                    names = part.args_as_dict().get("activities", [])
                    conversation.dispatched.append([str(name) for name in names])
        return conversation

    def answer(self, tool: str) -> ToolReturnPart | None:
        """The latest answer of `tool` this turn."""
        found = [part for part in self.answers if part.tool_name == tool]
        return found[-1] if found else None

    @property
    def refusals(self) -> list[str]:
        """What the toolset said of each plan it refused this turn."""
        return [
            str(part.content)
            for part in self.answers
            if part.tool_name == "dispatch_workflow" and part.outcome != "success"
        ]


def _say(text: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(text)])


def planner_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """One model turn of the offline planner."""
    conversation = Conversation.of(messages)
    reading = read(conversation.requests[-1] if conversation.requests else "")
    if reading.status_of is not None:
        status = conversation.answer("get_workflow_status")
        if status is None:
            return ModelResponse(parts=[ToolCallPart("get_workflow_status", {"correlation_id": reading.status_of})])
        return _say(f"Workflow {reading.status_of}: {to_jsonable_python(status.content)}")
    if reading.bulk:
        return _say("I act on one named order or customer at a time, never on all of them at once: which one?")
    listing = conversation.answer("list_activities")
    if listing is None:
        return ModelResponse(parts=[ToolCallPart("list_activities", {})])
    dispatched = conversation.answer("dispatch_workflow")
    if dispatched is not None and dispatched.outcome == "success":
        result = to_jsonable_python(dispatched.content)
        steps = " -> ".join(result.get("activities", []))
        return _say(f"Dispatched workflow {result.get('correlation_id')}: {steps}.")
    catalog = [Activity.listed(entry) for entry in to_jsonable_python(listing.content)]
    move = decide(conversation.requests, conversation.refusals, conversation.dispatched, catalog)
    if isinstance(move, Say):
        return _say(move.text)
    return ModelResponse(
        parts=[ToolCallPart("dispatch_workflow", {"activities": list(move.activities), "variables": move.variables})]
    )


def offline_planner(policy: PolicyFunction = planner_policy) -> FunctionModel:
    """The offline planner as a model for `create_planner_agent`."""
    return FunctionModel(policy, model_name="offline-planner")
