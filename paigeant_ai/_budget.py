"""What a workflow's budget leaves: the usage its log records, what that costs, and the limits of the next step.

A workflow's `Budget` travels in its signed plan, so no worker or broker can raise it; more is granted only by a
signed `BudgetExtension` (see `paigeant_ai._budget_resume`). Everything here is a pure function of a message that
the worker already verified: the plan, the extensions and the log.

The branches of a parallel group draw from the same budget: when the group starts, what is left is shared among
the branches that may run. With a step that used a model before the group, the largest such step's use is the
estimate of what one branch uses, and only as many branches as what is left pays for (rounded up) get a share, the
others none (they stop as `budget_exhausted`). Without one, under a `tokens` limit, the first branch runs alone
and its use is the estimate for the others (see `probes_first`); otherwise every branch gets an equal share. Each
share is a branch's own limit, so the group overspends by at most each running branch's own overshoot.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic_ai.usage import RunUsage, UsageLimits

from ._ledger import usage_by_model
from ._usage import Usage, sum_usage
from ._wire import Budget, Price
from .contracts import ActivityLogEntry, PaigeantMessage
from .exceptions import ParkWorkflow, UserError

__all__ = (
    "BudgetExhausted",
    "Spent",
    "checked_budget",
    "effective_budget",
    "exhaustion",
    "logged_usages",
    "probes_first",
    "spent",
    "step_limits",
    "wave",
)

_LIMITS = ("tokens", "requests", "tool_calls", "cost", "wall_time")


class BudgetExhausted(ParkWorkflow):
    """The workflow's budget is spent: the worker parks it `budget_exhausted` until more is granted."""

    def __init__(self, reason: str) -> None:  # pyright: ignore[reportMissingSuperCall]
        Exception.__init__(self, f"budget exhausted: {reason}")  # it waits for a person, not for tool calls
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Spent:
    """What usages come to, against a budget."""

    tokens: int = 0
    requests: int = 0
    tool_calls: int = 0
    cost: float = 0.0
    unpriced: frozenset[str] = field(default_factory=frozenset[str])
    """Models used that the price table leaves out (their cost is unknown)."""


def checked_budget(budget: object) -> Budget | None:
    """`budget` as `dispatch_workflow(budget=...)` takes it.

    Raises:
        UserError: It is not a `Budget`, or limits cost without a price table.
    """
    if budget is None:
        return None
    if not isinstance(budget, Budget):
        raise UserError(f"budget must be a paigeant_ai.Budget, not {type(budget).__name__}: pass Budget(tokens=...)")
    if budget.cost is not None and not budget.prices:
        raise UserError(
            "a cost budget needs the price of each model the workflow uses: pass Budget(cost=..., prices={"
            '"openai:gpt-5": Price(input_per_mtok=1.25, output_per_mtok=10)})'
        )
    return budget


def _entry_usages(entries: Iterable[ActivityLogEntry], branch: str | None = None) -> list[Usage]:
    found: list[Usage] = []
    for entry in entries:
        if branch is None or entry.branch == branch:
            found.extend(entry.usage)
        found.extend(_entry_usages(entry.branches))
    return found


def logged_usages(message: PaigeantMessage) -> list[Usage]:
    """Everything the workflow's slip records it used, per model: steps, branches, failed attempts carried on,
    fallbacks and compensations (see `paigeant_ai._ledger`)."""
    return list(usage_by_model(message).values())


def spent(usages: Iterable[Usage], prices: dict[str, Price]) -> Spent:
    """What `usages` come to: counts, and their cost under `prices`."""
    usages = list(usages)
    total = sum_usage(usages)
    cost, unpriced = 0.0, set[str]()
    for usage in usages:
        price = prices.get(usage.model or "")
        if price is None:
            unpriced.add(usage.model or "an unnamed model")
            continue
        cost += _cost(usage, price)
    return Spent(total.total_tokens, total.requests, total.tool_calls, cost, frozenset(unpriced))


def _cost(usage: Usage, price: Price) -> float:
    read = price.cache_read_per_mtok if price.cache_read_per_mtok is not None else price.input_per_mtok
    write = price.cache_write_per_mtok if price.cache_write_per_mtok is not None else price.input_per_mtok
    plain_input = max(usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens, 0)
    return (
        plain_input * price.input_per_mtok
        + usage.cache_read_tokens * read
        + usage.cache_write_tokens * write
        + usage.output_tokens * price.output_per_mtok
    ) / 1_000_000


def effective_budget(message: PaigeantMessage) -> Budget | None:
    """The plan's budget with every extension the message carries added (verified by the worker before)."""
    plan = message.plan
    budget = plan.budget if plan is not None else None
    if budget is None:
        return None
    raised: dict[str, Any] = {}
    for name in _LIMITS:
        limit = getattr(budget, name)
        if limit is not None:
            raised[name] = limit + sum(getattr(ext.add, name) or 0 for ext in message.budget_extensions)
    return budget.model_copy(update=raised)


def _share(message: PaigeantMessage, budget: Budget) -> tuple[Budget, list[Usage]]:
    """For a branch's hop: its share of the budget, and what it used itself; else the budget and the whole log."""
    slip = message.routing_slip
    if slip.branch is None or not slip.itinerary:
        return budget, logged_usages(message)
    keys, runnable, left = _runnable(message, budget)
    position = keys.index(slip.branch) if slip.branch in keys else len(keys)
    shares: dict[str, Any] = {}
    for name in ("tokens", "requests", "tool_calls", "cost"):
        if name in left:
            whole = left[name] / runnable if position < runnable else 0
            shares[name] = math.floor(whole) if name != "cost" else whole
    own = [usage for entry in slip.completed if entry.branch == slip.branch for usage in entry.usage]
    return budget.model_copy(update=shares), own


def _runnable(message: PaigeantMessage, budget: Budget) -> tuple[list[str], int, dict[str, Any]]:
    """For a branch's hop: the keys of its group's branches that have not run, how many of them (the first) get a
    share, and what is left to share."""
    slip = message.routing_slip
    before = [entry for entry in slip.completed if entry.branch is None]
    probe = [entry for entry in slip.completed if entry.branch not in (None, slip.branch)]  # see `probes_first`
    used_before = _entry_usages([*before, *probe])
    left = _left(budget, spent(used_before, budget.prices))
    done = {entry.branch for entry in probe}
    keys = [spec.branch_key for spec in slip.itinerary[0].branches if spec.branch_key not in done]
    runnable = 1 if probes_first(message) else len(keys)  # the probe runs alone: all that is left is its share
    estimate = _estimate([*before, *probe])
    if budget.tokens is not None and estimate > 0:
        runnable = min(runnable, math.ceil(left.get("tokens", 0) / estimate))
    return keys, runnable, left


def wave(message: PaigeantMessage) -> list[str] | None:
    """For a branch's hop: the keys of the branches of its group that get a share, the ones sent with it (see
    `paigeant_ai._budget_probe`); None when every branch is sent at once (no budget, or one that faults when spent).
    """
    budget = effective_budget(message)
    slip = message.routing_slip
    if budget is None or budget.on_exhausted == "fault" or slip.branch is None or not slip.itinerary:
        return None
    keys, runnable, _ = _runnable(message, budget)
    return keys[:runnable]


def _estimate(entries: Iterable[ActivityLogEntry]) -> int:
    """What one branch is expected to use: the tokens of the largest step in `entries`."""
    return max((sum_usage(entry.usage).total_tokens for entry in entries), default=0)


def probes_first(message: PaigeantMessage) -> bool:
    """Whether the parallel group `message` has reached (its fan-out's hop, or the first hop of one of its branches
    before any other completed) starts with its first branch alone, the probe.

    So it does when the budget limits tokens and no step before the group used a model: nothing tells what a
    branch uses, and branches sent at once could each spend all that is left. The probe's worker sends the other
    branches once it completed, each with the probe's log entry, from which `_share` knows what is left and what a
    branch uses before they start (see `paigeant_ai._budget_probe`).
    """
    slip = message.routing_slip
    budget = effective_budget(message)
    if budget is None or budget.tokens is None or not slip.itinerary or len(slip.itinerary[0].branches) < 2:
        return False
    if any(entry.branch not in (None, slip.branch) for entry in slip.completed):
        return False  # a branch sent after the probe
    return _estimate(entry for entry in slip.completed if entry.branch is None) == 0


def _left(budget: Budget, used: Spent) -> dict[str, Any]:
    left: dict[str, Any] = {}
    for name in ("tokens", "requests", "tool_calls", "cost"):
        limit = getattr(budget, name)
        if limit is not None:
            left[name] = max(limit - getattr(used, name), 0)
    return left


def exhaustion(message: PaigeantMessage, now: datetime | None = None, running: Sequence[Usage] = ()) -> str | None:
    """Why the budget of `message`'s workflow (the hop's branch's share, for a branch) is spent, if it is.

    Args:
        message: A verified hop.
        now: The time to measure `wall_time` at.
        running: What the step at hand used so far (it is not in the log yet).
    """
    budget = effective_budget(message)
    if budget is None:
        return None
    if budget.wall_time is not None and message.plan is not None:
        elapsed = ((now or datetime.now(UTC)) - message.plan.created_at).total_seconds()
        if elapsed >= budget.wall_time:
            return f"it ran {elapsed:.1f}s of its {budget.wall_time:g}s of wall time"
    budget, used_usages = _share(message, budget)
    used = spent([*used_usages, *running], budget.prices)
    share = " (this branch's share)" if message.routing_slip.branch is not None else ""
    if budget.cost is not None and used.unpriced:
        names = ", ".join(sorted(used.unpriced))
        return f"the price table has no price for {names}, so its cost budget cannot be kept; add them to prices"
    for name, unit in (("tokens", "tokens"), ("requests", "model requests"), ("tool_calls", "tool calls")):
        limit = getattr(budget, name)
        if limit is not None and getattr(used, name) >= limit:
            return f"it used {getattr(used, name)} of its {limit} {unit}{share}"
    if budget.cost is not None and used.cost >= budget.cost:
        return f"it cost {used.cost:.6g} of its {budget.cost:g}{share}"
    return None


def step_limits(
    message: PaigeantMessage, own: UsageLimits | None, model: str | None, begun: RunUsage | None = None
) -> UsageLimits | None:
    """The usage limits of an agent step: its activity's own (`own`) tightened to what the budget leaves.

    A cost left is turned into tokens at the dearer of the model's input and output prices, so the step cannot
    overspend it by more than its last response; a model without a price gets no cost-derived limit here (the
    check before each hop stops the workflow once it ran). A run resumed after approval starts from its
    conversation's usage (`begun`), which the log already counts (carried while it waited): what the budget leaves
    is added to it, so that the earlier part of the run is counted once.
    """
    budget = effective_budget(message)
    if budget is None:
        return own
    budget, used_usages = _share(message, budget)
    left = _left(budget, spent(used_usages, budget.prices))
    tokens = left.get("tokens")
    price = budget.prices.get(model or "")
    if "cost" in left and price is not None:
        per_token = max(price.input_per_mtok, price.output_per_mtok) / 1_000_000
        if per_token > 0:
            by_cost = math.floor(left["cost"] / per_token)
            tokens = by_cost if tokens is None else min(tokens, by_cost)
    begun = begun or RunUsage()
    limits = own if own is not None else UsageLimits()
    return UsageLimits(
        request_limit=_tighter(limits.request_limit, left.get("requests"), begun.requests),
        tool_calls_limit=_tighter(limits.tool_calls_limit, left.get("tool_calls"), begun.tool_calls),
        input_tokens_limit=limits.input_tokens_limit,
        output_tokens_limit=limits.output_tokens_limit,
        total_tokens_limit=_tighter(limits.total_tokens_limit, tokens, begun.total_tokens),
        per_request_input_tokens_limit=limits.per_request_input_tokens_limit,
        count_tokens_before_request=limits.count_tokens_before_request,
        cost_limit=limits.cost_limit,
    )


def _tighter(limit: int | None, left: int | None, begun: int) -> int | None:
    """The stricter of the activity's `limit` and the run's start `begun` plus what the budget leaves (`left`)."""
    if left is None:
        return limit
    return begun + left if limit is None else min(limit, begun + left)
