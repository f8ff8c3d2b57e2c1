"""A `FunctionModel` that plays a script: one prepared response per model request, recording what it was shown."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

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
