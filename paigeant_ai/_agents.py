"""How `AgentActivity` meets pydantic-ai: the output types a step's run asks for, and what a model error means.

A step parks on deferred tool calls only if `DeferredToolRequests` is among the run's output types; pydantic-ai
refuses a run-time `output_type` on an agent with output validators, so such an agent must list it itself.
A model request the provider rejected for good faults the step at once; one it asked to retry later is retried
after the wait it asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_ai import DeferredToolRequests
from pydantic_ai.agent import AbstractAgent
from pydantic_ai.exceptions import ModelAPIError, ModelQuotaExceededError, ModelRequestRejectedError
from pydantic_ai.toolsets import (
    AbstractToolset,
    ApprovalRequiredToolset,
    CombinedToolset,
    ExternalToolset,
    FunctionToolset,
    WrapperToolset,
)

from .exceptions import NonRetryableError, RetryActivity, UserError

_REJECTED_FOR_GOOD: tuple[type[ModelAPIError], ...] = (ModelRequestRejectedError, ModelQuotaExceededError)
"""Sending the same request again cannot succeed: bad credentials, an unknown model, a context window overflow,
a request the provider refuses as it is, an exhausted quota."""


def run_output_type(agent: AbstractAgent[Any, Any], activity_name: str) -> Any:
    """The `output_type` each run of the step passes, or `None` to keep the agent's own.

    Raises:
        UserError: The agent has output validators and tools that wait for approval, but cannot end its run
            with `DeferredToolRequests`, so the step could never park.
    """
    if allows_deferred(agent.output_type):
        return None
    if not _has_output_validators(agent):
        return [agent.output_type, DeferredToolRequests]
    if any(_defers(toolset) for toolset in agent.toolsets):
        raise UserError(
            f"the agent of {activity_name!r} has output validators and tools that wait for approval, so its "
            "output types must allow parking: add DeferredToolRequests to them, "
            "Agent(..., output_type=[YourOutput, DeferredToolRequests])"
        )
    return None  # its output validators forbid a run-time output type, and nothing it has needs one


def allows_deferred(output_type: Any) -> bool:
    """Whether an agent with `output_type` can end its run with `DeferredToolRequests`."""
    if output_type is DeferredToolRequests:
        return True
    if isinstance(output_type, Sequence) and not isinstance(output_type, str):
        return any(allows_deferred(item) for item in output_type)  # pyright: ignore[reportUnknownVariableType]
    return False


def _has_output_validators(agent: AbstractAgent[Any, Any]) -> bool:
    # pydantic-ai keeps them private; a wrapper agent (durable execution, say) delegates to the agent it wraps.
    while (validators := getattr(agent, "_output_validators", None)) is None:
        inner = getattr(agent, "wrapped", None)
        if not isinstance(inner, AbstractAgent):
            return False
        agent = inner
    return bool(validators)


def _defers(toolset: AbstractToolset[Any]) -> bool:
    """Whether a toolset has tools that always wait: approval required, or run outside the agent."""
    if isinstance(toolset, ApprovalRequiredToolset | ExternalToolset):
        return True
    if isinstance(toolset, FunctionToolset):
        return any(tool.requires_approval for tool in toolset.tools.values())
    if isinstance(toolset, WrapperToolset):
        return _defers(toolset.wrapped)
    if isinstance(toolset, CombinedToolset):
        return any(_defers(inner) for inner in toolset.toolsets)
    return False  # a dynamic toolset is only known during a run


def model_error_signal(exc: BaseException, activity_name: str) -> Exception | None:
    """What a model error tells the worker: fault now, or retry after the provider's wait; `None` to retry as usual."""
    errors = _leaves(exc)
    if not errors or not all(isinstance(error, ModelAPIError) for error in errors):
        return None
    if all(isinstance(error, _REJECTED_FOR_GOOD) for error in errors):
        return NonRetryableError(
            f"the model provider rejected the request of {activity_name!r}, and another attempt cannot change "
            f"that: {_describe(exc)}"
        )
    waits = [error.retry_after for error in errors if isinstance(error, ModelAPIError) and error.retry_after]
    if not waits:
        return None
    wait = max(waits)
    return RetryActivity(f"the model provider asked {activity_name!r} to wait {wait:g}s: {_describe(exc)}", delay=wait)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):  # a `FallbackModel` whose every model failed
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(inner) for inner in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"
