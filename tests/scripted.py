"""A `FunctionModel` that plays a script: one prepared response per model request, recording what it was shown."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import AgentActivity

Turn = ModelResponse | Callable[[list[ModelMessage], AgentInfo], ModelResponse]


@dataclass
class Script:
    """Answers the n-th model request with the n-th turn; a turn may be a function of what the model sees."""

    turns: list[Turn]
    infos: list[AgentInfo] = field(default_factory=list[AgentInfo])
    requests: list[list[ModelMessage]] = field(default_factory=list[list[ModelMessage]])

    def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.infos.append(info)
        self.requests.append(list(messages))
        turn = self.turns[len(self.infos) - 1]
        return turn if isinstance(turn, ModelResponse) else turn(messages, info)

    @property
    def model(self) -> FunctionModel:
        return FunctionModel(self)


def call(tool: str, args: Mapping[str, Any], tool_call_id: str | None = None) -> ModelResponse:
    """A response that calls one tool."""
    if tool_call_id is None:
        return ModelResponse(parts=[ToolCallPart(tool, dict(args))])
    return ModelResponse(parts=[ToolCallPart(tool, dict(args), tool_call_id=tool_call_id)])


def tool_returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    """Every tool result the model was shown, oldest first."""
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


def refunder() -> AgentActivity[None, str]:
    """A step whose agent asks to refund 900 with a tool that needs approval (it parks), then says it refunded."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts):
            return ModelResponse(parts=[TextPart("refunded")])
        return ModelResponse(parts=[ToolCallPart("refund", {"amount": 900}, tool_call_id="call-1")])

    agent = Agent(FunctionModel(model), name="refund-order")

    @agent.tool_plain(requires_approval=True)
    def refund(amount: int) -> str:
        return f"refunded {amount}"

    return AgentActivity(agent, prompt="Refund the order")
