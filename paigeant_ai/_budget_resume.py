"""More budget for a workflow parked `budget_exhausted`: the signed grant, and the check every worker makes of it.

`WorkflowDispatcher.resume(cid, budget=Budget(tokens=...), approver=...)` (or `paigeant resume CID --budget
tokens=...`) signs a `BudgetExtension` with this service's key, which must hold `approve` in the trust policy, bound
to the workflow, and sends the parked step again as a fresh hop carrying it beside the extensions granted before.
Every worker, before a step runs, verifies each extension the hop carries (`check_extensions`); one that does not
hold refuses the hop (dead-lettered with the reason), so a broker that adds or alters a grant gains nothing, and one
that drops a grant only lowers the budget.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from . import observability
from ._budget_probe import resumed_wave
from ._escape import escape_control
from ._resume_checks import check_before_resume
from ._wire import Budget, BudgetExtension
from .approval import ParkedStep
from .contracts import PaigeantMessage, SecurityContext
from .exceptions import SecurityError, UserError
from .security import MessageSecurity, own_kid

if TYPE_CHECKING:
    from .dispatch import WorkflowDispatcher

__all__ = ("EXTENSION_TYPE", "check_extensions", "resume_with_budget")

logger = logging.getLogger("paigeant_ai.budget")

EXTENSION_TYPE = "paigeant-budget+jws"
"""The `typ` of a budget extension's signature."""


def _signed_bytes(extension: BudgetExtension) -> bytes:
    return extension.model_dump_json(exclude={"signature"}).encode()


def check_extensions(message: PaigeantMessage, signer: str | None, security: MessageSecurity) -> None:
    """Check every budget extension `message` carries: bound to its workflow, once each, signed by a key that may
    `approve` (nothing is checked of an unsigned hop: anyone could have written its plan too).

    Raises:
        SecurityError: Code `budget`, with the reason.
    """
    if signer is None or not message.budget_extensions:
        return
    seen: set[str] = set()
    for number, extension in enumerate(message.budget_extensions, 1):
        what = f"budget: extension {number} (by {extension.by[:80]!r})"
        if extension.correlation_id != message.correlation_id:
            raise SecurityError(f"{what} was granted to another workflow", code="budget")
        try:
            kid = security.verify_bytes(extension.signature, _signed_bytes(extension), typ=EXTENSION_TYPE)
            security.policy.require(kid, "approve", "grant more budget")
        except SecurityError as exc:
            raise SecurityError(f"{what} is refused: {exc}", code="budget") from None
        if extension.signature in seen:
            raise SecurityError(f"{what} is carried twice", code="budget")
        seen.add(extension.signature or "")


def _checked_amounts(correlation_id: str, add: Budget | None, parked: ParkedStep) -> Budget:
    if parked.budget_exhausted is None:
        raise UserError(
            f"workflow {correlation_id!r} does not wait for budget ({parked.describe()}): resume it without budget="
        )
    if add is None:
        raise UserError(
            f"workflow {correlation_id!r} waits because its budget is spent: pass budget=Budget(tokens=...) with "
            "the amounts to add, or cancel it"
        )
    if add.prices:
        raise UserError("budget= adds amounts to the workflow's limits; its prices are the plan's: drop prices=")
    plan_budget = parked.message.plan.budget if parked.message.plan is not None else None
    limited = {name for name in ("tokens", "requests", "tool_calls", "cost", "wall_time") if getattr(add, name)}
    unlimited = sorted(name for name in limited if plan_budget is None or getattr(plan_budget, name) is None)
    if not limited or unlimited:
        names = ", ".join(unlimited) or "nothing"
        raise UserError(
            f"budget= must add to limits the workflow has (it adds {names} it has no limit on): give at least one "
            "positive amount among the limits of its budget"
        )
    return add


async def resume_with_budget(
    dispatcher: WorkflowDispatcher,
    parked: ParkedStep,
    add: Budget | None,
    *,
    approver: str | None,
    obo_token: str | None,
) -> BudgetExtension:
    """Grant `add` more to the workflow parked `budget_exhausted` as `parked`, and send its step again.

    Raises:
        UserError: The workflow waits for something else, no amounts or approver are given, this service's key may
            not approve, or a fresh user token is needed.
    """
    cid = parked.correlation_id
    add = _checked_amounts(cid, add, parked)
    security = dispatcher.security
    if approver is None:
        raise UserError(f"extending the budget of workflow {cid!r}: say who grants it with approver='<their identity>'")
    kid = own_kid(security)
    if kid is not None and not security.policy.allows(kid, "approve"):
        raise UserError(f"this service's key {kid!r} may not grant more budget: grant it 'approve' in the trust policy")
    if parked.obo_required and obo_token is None:
        raise UserError(
            f"workflow {cid!r} runs on behalf of a user and its parked record keeps no token: pass obo_token=<a fresh "
            "token of that user>"
        )
    check_before_resume(parked, security, approver=approver, approver_token=None, obo_token=obo_token)
    extension = BudgetExtension(correlation_id=cid, add=add, by=approver)
    extension = extension.model_copy(
        update={"signature": security.sign_bytes(_signed_bytes(extension), typ=EXTENSION_TYPE)}
    )
    message = parked.message.next_hop(attempt=parked.message.attempt)
    message.message_id = parked.resume_message_id()  # the same for every resume of this record: one runs
    message.security = SecurityContext(obo_token=obo_token)
    message.resume = None  # the step starts afresh
    message.budget_extensions = [*message.budget_extensions, extension]
    with observability.replay_span(message, dispatcher.transport.name, operation="resume"):
        siblings = resumed_wave(parked.message, message)  # a branch held back: the rest of the grant's wave
        transport = await dispatcher.parked_on(parked, message, *siblings)  # where it parked: its group runs there
        await transport.publish(parked.activity, dispatcher.encode(message), headers=dict(message.headers))
        for sibling in siblings:
            address = sibling.routing_slip.current or ""
            await transport.publish(address, dispatcher.encode(sibling), headers=dict(sibling.headers))
    # The record stays parked until a worker has checked and claimed the resume (`_budget_gate.release_budget_park`).
    detail = f"budget extended by {approver}: {describe_amounts(add)}"
    logger.info("workflow %s: %s", escape_control(cid), escape_control(detail))
    await dispatcher.reporter.report("resumed", message, detail=detail)
    return extension


def describe_amounts(add: Budget) -> str:
    """`add`'s amounts in one line (`+5000 tokens, +2 requests`)."""
    parts = [
        f"+{getattr(add, name):g} {unit}"
        for name, unit in (
            ("tokens", "tokens"),
            ("requests", "requests"),
            ("tool_calls", "tool calls"),
            ("cost", "cost"),
            ("wall_time", "s of wall time"),
        )
        if getattr(add, name)
    ]
    return ", ".join(parts)
