"""What a catalog entry needs and produces, as JSON schemas: said by the user, or inferred from the activity."""

from __future__ import annotations

import re
import string
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, JsonValue, TypeAdapter
from pydantic_ai import DeferredToolRequests
from pydantic_ai.agent import AbstractAgent

from .activity import Activity, AgentActivity, FunctionActivity
from .contracts import ActivitySpec

__all__ = ("UNKNOWN", "VariablesSchema", "infer", "schema")

VariablesSchema = type[Any] | Mapping[str, Any] | Sequence[str] | None
"""What variables an activity needs or produces: a pydantic model or other type (its JSON schema), a JSON schema
object, a list of names (all required, any type), or `None` to infer it where possible."""

_JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])
UNKNOWN: dict[str, JsonValue] = {"type": "object"}


def schema(value: VariablesSchema) -> dict[str, JsonValue]:
    if value is None:
        return dict(UNKNOWN)
    if isinstance(value, type):
        return _JSON_OBJECT.validate_python(TypeAdapter(value).json_schema())
    if isinstance(value, Mapping):
        return _JSON_OBJECT.validate_python(dict(value))
    if isinstance(value, str):
        value = [value]
    names = list(value)
    return {"type": "object", "properties": {name: {} for name in names}, "required": list(names)}


def infer(activity: Activity | ActivitySpec) -> tuple[dict[str, JsonValue], dict[str, JsonValue]]:
    if isinstance(activity, AgentActivity):
        return _prompt_needs(activity), _agent_produces(activity)
    if isinstance(activity, FunctionActivity):
        return dict(UNKNOWN), _function_produces(activity)
    return dict(UNKNOWN), dict(UNKNOWN)


def _prompt_needs(activity: AgentActivity[Any, Any]) -> dict[str, JsonValue]:
    if not isinstance(activity.prompt, str):
        return dict(UNKNOWN)
    names: list[str] = []
    for _, field_name, _, _ in string.Formatter().parse(activity.prompt):
        root = re.split(r"[.\[]", field_name or "", maxsplit=1)[0]
        if root and not root.isdigit() and root not in activity.spec.arguments and root not in names:
            names.append(root)
    return schema(names)


def _agent_produces(activity: AgentActivity[Any, Any]) -> dict[str, JsonValue]:
    agent: AbstractAgent[Any, Any] = activity.agent
    output_type: Any = agent.output_type
    if isinstance(output_type, Sequence) and not isinstance(output_type, str):
        output_type = [item for item in typing.cast(Sequence[Any], output_type) if item is not DeferredToolRequests]
    try:
        output_schema = _JSON_OBJECT.validate_python(agent.output_json_schema(output_type=output_type))
    except Exception:  # an output spec a JSON schema cannot describe (a function, say): the key is still known
        output_schema = {}
    key = activity.output_key
    return {"type": "object", "properties": {key: output_schema}, "required": [key]}


def _function_produces(activity: FunctionActivity) -> dict[str, JsonValue]:
    try:
        returns = typing.get_type_hints(activity.func).get("return")
    except Exception:  # annotations that do not resolve here: say nothing rather than guess
        return dict(UNKNOWN)
    is_model = isinstance(returns, type) and issubclass(returns, BaseModel)
    if is_model or typing.is_typeddict(returns):
        return schema(returns)
    return dict(UNKNOWN)
