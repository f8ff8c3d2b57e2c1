"""Model settings and usage limits per step: what an itinerary may ask of an agent's run, within the worker's limits.

A step's `ActivitySpec` may carry `model_settings` and `usage_limits`. The worker's `AgentActivity` decides what
they can change:

- a model setting applies only if the activity lists its name in `overridable`; any other is left out, with a
  warning that names it; `max_tokens` can only lower the activity's own, when it sets one;
- a usage limit can only lower the activity's own: each limit is the smaller of the two (a limit the activity does
  not set is pydantic-ai's default, unlimited but for 50 requests).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal, cast

from pydantic import AfterValidator, Field, JsonValue
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import UsageLimits

from ._escape import escape_control
from .exceptions import UserError

__all__ = ("LIMIT_NAMES", "StepModelSettings", "StepUsageLimits", "check_overridable", "step_run_options")

logger = logging.getLogger("paigeant_ai.activity")

LimitName = Literal[
    "request_limit",
    "tool_calls_limit",
    "input_tokens_limit",
    "output_tokens_limit",
    "total_tokens_limit",
    "per_request_input_tokens_limit",
]
LIMIT_NAMES: tuple[str, ...] = LimitName.__args__
"""The `UsageLimits` an itinerary may set for a step (each only lowers the worker's)."""

_MAX_SETTINGS = 32


def _setting_names(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    if any(not name or len(name) > 100 for name in value):
        raise ValueError("a model setting's name must be 1 to 100 characters")
    return value


StepModelSettings = Annotated[dict[str, JsonValue], Field(max_length=_MAX_SETTINGS), AfterValidator(_setting_names)]
"""Model settings an itinerary asks for at a step, by name (`{"temperature": 0.2}`)."""
StepUsageLimits = dict[LimitName, Annotated[int, Field(ge=0)]]
"""Usage limits an itinerary asks for at a step (`{"request_limit": 3}`)."""


def check_overridable(name: str, overridable: Sequence[str]) -> tuple[str, ...]:
    """The names of the model settings a plan may set for activity `name`, checked.

    Raises:
        UserError: `overridable` is a string, or names a setting twice or an empty one.
    """
    if isinstance(overridable, str):
        raise UserError(f"overridable of {name!r} must be a list of setting names: write overridable=[{overridable!r}]")
    names = tuple(str(item) for item in overridable)
    if any(not item for item in names) or len(set(names)) != len(names):
        raise UserError(f"overridable of {name!r} must name each model setting once, e.g. ['temperature']")
    return names


def step_run_options(
    activity: str,
    correlation_id: str,
    own_settings: ModelSettings | None,
    overridable: Sequence[str],
    own_limits: UsageLimits | None,
    planned_settings: Mapping[str, JsonValue] | None,
    planned_limits: Mapping[LimitName, int] | None,
) -> tuple[ModelSettings | None, UsageLimits | None]:
    """The model settings and usage limits of one run of `activity`: its own, with what the step's spec asks.

    Settings the activity does not let a plan set are left out, each logged with the reason.
    """
    settings = own_settings
    if planned_settings:
        allowed = {name: value for name, value in planned_settings.items() if name in overridable}
        refused = sorted(set(planned_settings) - set(allowed))
        if refused:
            logger.warning(
                "step %s of %s: model settings %s left out: the activity lets a plan set only %s",
                activity,
                escape_control(correlation_id),
                escape_control(", ".join(refused)),
                ", ".join(overridable) or "none",
            )
        allowed = _capped(activity, correlation_id, own_settings or {}, allowed)
        if allowed:
            settings = cast(ModelSettings, {**(own_settings or {}), **allowed})
    return settings, lowered_limits(own_limits, planned_limits)


_CAPS = ("max_tokens",)
"""Model settings that cap what a run spends: a plan may lower the worker's, never raise it."""


def _capped(
    activity: str, correlation_id: str, own: Mapping[str, Any], planned: dict[str, JsonValue]
) -> dict[str, JsonValue]:
    """`planned` with each cap the worker sets no higher than the worker's (one that is not a number left out)."""
    for name in _CAPS:
        if name not in planned or own.get(name) is None:
            continue
        value = planned[name]
        if isinstance(value, bool) or not isinstance(value, int):
            logger.warning(
                "step %s of %s: model setting %s left out: %s is not a whole number",
                activity,
                escape_control(correlation_id),
                name,
                escape_control(repr(value)[:100]),
            )
            del planned[name]
        else:
            planned[name] = min(value, own[name])
    return planned


def lowered_limits(own: UsageLimits | None, planned: Mapping[LimitName, int] | None) -> UsageLimits | None:
    """`own` with each limit in `planned` that is lower (a limit `own` does not set counts as unlimited)."""
    if not planned:
        return own
    base = own or UsageLimits()
    lowered: dict[str, Any] = {}
    for name, value in planned.items():
        current = getattr(base, name)
        lowered[name] = value if current is None else min(current, value)
    return dataclasses.replace(base, **lowered)
