"""The budget stage of a hop: before its step runs, and once it ran into a usage limit.

- `budget_gate` (from `Worker.process`, after the cancel and deadline checks): a workflow whose budget is spent
  does not start another step; it parks as `budget_exhausted` (or faults, with `on_exhausted="fault"`).
- `after_step`: a step that raised `UsageLimitExceeded` because of the limits its budget gave it (see
  `paigeant_ai._budget.step_limits`) has exhausted the budget: the same outcome, not a fault of the step. Parked,
  its attempt is logged as failed with what it used, so that the overshoot stays counted.

A compensation always runs: undoing what was done is never stopped by a budget.
"""

from __future__ import annotations

from pydantic_ai.exceptions import UsageLimitExceeded
from pydantic_ai.usage import UsageLimits

from ._budget import BudgetExhausted, effective_budget, exhaustion
from ._hop import Hop
from ._ledger import take_usage
from ._outcome import Fault, Outcome, Park
from ._usage import Usage, sum_usage
from .approval import WaitingStore
from .exceptions import SecurityError

__all__ = ("after_step", "budget_gate", "release_budget_park")


def budget_gate(hop: Hop) -> Outcome | None:
    """How the hop ends because its workflow's budget is spent, if it is; None: the step may run."""
    if hop.message.routing_slip.unwinding is not None:
        return None
    reason = exhaustion(hop.message)
    return None if reason is None else _exhausted(hop, reason)


def after_step(hop: Hop, outcome: Outcome) -> Outcome:
    """`outcome`, unless the step stopped at a limit its budget gave it: then the budget is exhausted."""
    if not isinstance(hop.raised, UsageLimitExceeded) or hop.message.routing_slip.unwinding is not None:
        return outcome
    used = hop.ctx.usage if hop.ctx is not None else []
    reason = exhaustion(hop.message, running=used)
    if reason is None and not _within(getattr(hop.activity, "usage_limits", None), sum_usage(used)):
        return outcome  # the activity's own limit: a fault of the step, as before
    if reason is None:  # the limit what was left gave it (a cost left counts as tokens at the dearer price)
        reason = f"step {hop.spec.name!r} reached the limit what was left gave it ({hop.raised})"
    exhausted = _exhausted(hop, f"{reason}; step {hop.spec.name!r} stopped at its limit")
    if isinstance(exhausted, Park):
        message = hop.message
        entry = message.routing_slip.mark_failed(
            hop.spec.name, attempt=message.attempt, started_at=hop.started, error=str(exhausted.signal)
        )
        entry.usage = take_usage(hop)  # with what its earlier attempts used
    return exhausted


async def release_budget_park(hop: Hop, store: WaitingStore | None) -> None:
    """Remove the record of the workflow parked `budget_exhausted` that `hop`, authorized and claimed, goes on from.

    The resume is a fresh hop of the parked step carrying one grant more than the record (see
    `paigeant_ai._budget_resume`); a record that parked again since carries that grant too, and stays.
    """
    message = hop.message
    if store is None or message.resume is not None or not message.budget_extensions:
        return
    try:
        parked = await store.get(message.correlation_id)
    except SecurityError:
        return  # not a parked record: nothing of this workflow's to remove
    if (
        parked is not None
        and parked.budget_exhausted is not None
        and (parked.activity, parked.step) == (message.routing_slip.current, message.step)
        and len(parked.message.budget_extensions) < len(message.budget_extensions)
    ):
        await store.remove(parked)


def _within(own: object, used: Usage) -> bool:
    """Whether `used` keeps to the activity's own limits (`own`: its `UsageLimits`, if it has any)."""
    if not isinstance(own, UsageLimits):
        return True
    pairs = (
        (own.request_limit, used.requests),
        (own.tool_calls_limit, used.tool_calls),
        (own.total_tokens_limit, used.total_tokens),
        (own.input_tokens_limit, used.input_tokens),
        (own.output_tokens_limit, used.output_tokens),
    )
    return all(limit is None or count <= limit for limit, count in pairs)


def _exhausted(hop: Hop, reason: str) -> Park | Fault:
    budget = effective_budget(hop.message)
    if budget is not None and budget.on_exhausted == "fault":
        return Fault(f"budget exhausted: {reason}", fallback=False)
    return Park(BudgetExhausted(reason))
