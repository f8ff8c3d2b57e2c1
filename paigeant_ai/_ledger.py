"""The usage ledger: what each step used, as the signed slip records it, and the totals of a workflow.

Where usage is recorded:

- a step's log entry (`ActivityLogEntry.usage`): what the step used, one `Usage` per model, its failed attempts
  that were retried included;
- a parallel group's entry: each branch's entry in `branches` (the group's own `usage` stays empty); when a branch
  fails its group, its failed entry also takes what the branches that had completed used;
- a compensation's record (`Compensation.usage`), once it ran;
- the slip's `carried_usage`: what earlier attempts of the current step used (a retried failure, a run that parked),
  until the step's entry takes it over.

`workflow_usage` adds all of them up; nothing is counted twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.usage import RequestUsage, RunUsage

from ._usage import _COUNTS as COUNTS  # pyright: ignore[reportPrivateUsage]
from ._usage import Usage, sum_usage
from .contracts import ActivityLogEntry, PaigeantMessage, RoutingSlip
from .exceptions import UserError

if TYPE_CHECKING:
    from ._hop import Hop

__all__ = (
    "by_model",
    "carry_usage",
    "describe_usage",
    "most_used",
    "run_model_name",
    "take_usage",
    "to_usage",
    "usage_by_model",
    "usage_if_any",
    "usage_since",
    "workflow_usage",
)

MAX_MODEL_NAME = 200
"""The longest model name a slip records (each log entry and retry carries it)."""
UNNAMED_MODEL = "unknown"
"""The key of `usage_by_model` for usage recorded without a model name."""


def to_usage(usage: Usage | RunUsage | RequestUsage, model: str | None = None) -> Usage:
    """`usage` as a `Usage` for `model` (a `Usage`'s own model unless `model` is given).

    Raises:
        UserError: `usage` is none of the three, or its model's name is longer than the slip keeps.
    """
    name = model if model is not None else getattr(usage, "model", None)
    if isinstance(name, str) and len(name) > MAX_MODEL_NAME:
        raise UserError(f"a model name of {len(name)} characters is too long: name the model in at most 200 characters")
    if isinstance(usage, Usage):
        return usage if model is None else usage.model_copy(update={"model": model})
    if isinstance(usage, RunUsage | RequestUsage):  # pyright: ignore[reportUnnecessaryIsInstance]
        return Usage(
            model=model,
            requests=usage.requests,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            tool_calls=usage.tool_calls if isinstance(usage, RunUsage) else 0,
        )
    raise UserError(
        f"add_usage takes a pydantic-ai RunUsage or RequestUsage, or a Usage, not {type(usage).__name__}: "
        "pass result.usage"
    )


def usage_since(usage: RunUsage, start: RunUsage) -> Usage:
    """What `usage` added to `start`, the usage it began from."""
    now, before = to_usage(usage), to_usage(start)
    added: dict[str, Any] = {name: max(getattr(now, name) - getattr(before, name), 0) for name in COUNTS}
    return Usage(**added)


def by_model(usages: Iterable[Usage]) -> list[Usage]:
    """`usages` added up per model, in the order each model first appears; empty ones left out."""
    totals: dict[str | None, Usage] = {}
    for usage in usages:
        if usage.is_empty:
            continue
        known = totals.get(usage.model)
        totals[usage.model] = usage if known is None else known + usage
    return list(totals.values())


def run_model_name(messages: Iterable[ModelMessage], model: Any) -> str | None:
    """The name a run's usage is recorded and priced under: the agent's model as written (`"openai:gpt-5"`, the
    name a price table knows), or as `provider:model` when the agent holds a model object (what `Agent("openai:gpt-5")`
    makes of the name), else the latest response's (`provider:model` when it names its provider), else the model's
    `model_name`; cut to `MAX_MODEL_NAME` characters."""
    name = _run_model_name(messages, model)
    return name[:MAX_MODEL_NAME] if name is not None else None


def _run_model_name(messages: Iterable[ModelMessage], model: Any) -> str | None:
    if isinstance(model, str):
        return model
    if (configured := _configured_name(model)) is not None:
        return configured
    for message in reversed(list(messages)):
        if isinstance(message, ModelResponse) and message.model_name:
            provider = message.provider_name
            return f"{provider}:{message.model_name}" if provider else message.model_name
    name = getattr(model, "model_name", None)
    return name if isinstance(name, str) else None


def _configured_name(model: Any) -> str | None:
    """`provider:model` of the model object an agent was built with (`Agent("openai:gpt-5")` builds one, whose
    responses name a dated snapshot the price table does not know); None for a model that picks among several."""
    name, system = getattr(model, "model_name", None), getattr(model, "system", None)
    if not isinstance(name, str) or not isinstance(system, str) or system.startswith("fallback:"):
        return None
    return name if ":" in name or system == "function" else f"{system}:{name}"  # a FunctionModel names itself


def _entries(entries: Iterable[ActivityLogEntry]) -> Iterator[ActivityLogEntry]:
    for entry in entries:
        yield entry
        yield from _entries(entry.branches)


def _recorded(slip: RoutingSlip) -> Iterator[Usage]:
    for entry in _entries(slip.completed):
        yield from entry.usage
    for record in slip.compensations:
        yield from record.usage
    yield from slip.carried_usage


def workflow_usage(workflow: RoutingSlip | PaigeantMessage) -> Usage:
    """What a workflow used so far, over every step, branch, failed attempt, fallback and compensation its slip
    records; `model` is set only when every one used the same model."""
    slip = workflow.routing_slip if isinstance(workflow, PaigeantMessage) else workflow
    return sum_usage(_recorded(slip))


def usage_if_any(workflow: RoutingSlip | PaigeantMessage) -> Usage | None:
    """`workflow_usage`, or None while the workflow used nothing: most events of most workflows, which then add up
    no totals."""
    slip = workflow.routing_slip if isinstance(workflow, PaigeantMessage) else workflow
    recorded = list(_recorded(slip))
    if not recorded:
        return None
    used = sum_usage(recorded)
    return None if used.is_empty else used


def usage_by_model(workflow: RoutingSlip | PaigeantMessage) -> dict[str, Usage]:
    """`workflow_usage` per model (usage recorded without a model name under `"unknown"`)."""
    slip = workflow.routing_slip if isinstance(workflow, PaigeantMessage) else workflow
    return {usage.model or UNNAMED_MODEL: usage for usage in by_model(_recorded(slip))}


def carry_usage(hop: Hop) -> None:
    """Move what the hop's attempt used so far into its slip's `carried_usage` (a retry or a park takes it on)."""
    slip = hop.message.routing_slip
    if hop.ctx is not None and hop.ctx.usage:
        slip.carried_usage = by_model([*slip.carried_usage, *hop.ctx.usage])
        hop.ctx.usage.clear()  # moved, never counted twice should the hop settle otherwise after all


def take_usage(hop: Hop) -> list[Usage]:
    """What the hop's step used over all its attempts, for its log entry; the slip carries none of it on."""
    carry_usage(hop)
    slip = hop.message.routing_slip
    used, slip.carried_usage = slip.carried_usage, []
    return used


def most_used(known: Usage | None, told: Usage) -> Usage:
    """The larger of two totals of one workflow (by requests, then tokens, then tool calls): events from different
    slips (branches, a late branch's undoing) each tell their own, so the latest is not always the most."""
    if known is None:
        return told
    return max(known, told, key=lambda usage: (usage.requests, usage.total_tokens, usage.tool_calls))


def describe_usage(usage: Usage) -> str:
    """`usage` in one line: `3 requests, 120 input + 45 output tokens, 2 tool calls`."""
    parts = [f"{usage.requests} request{'s' if usage.requests != 1 else ''}"]
    parts.append(f"{usage.input_tokens} input + {usage.output_tokens} output tokens")
    if usage.cache_read_tokens or usage.cache_write_tokens:
        parts.append(f"cache {usage.cache_read_tokens} read, {usage.cache_write_tokens} written")
    if usage.tool_calls:
        parts.append(f"{usage.tool_calls} tool call{'s' if usage.tool_calls != 1 else ''}")
    return ", ".join(parts) + (f" ({usage.model})" if usage.model else "")
