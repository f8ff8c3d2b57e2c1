"""What keeps a parked workflow from being lost on its way back: the dispatcher's checks before it sends a resume,
and the record leaving the waiting store only once a worker has claimed the resume.

- `check_before_resume` (from `WorkflowDispatcher.resume`): whatever the worker will check of a resume and the
  dispatcher can check too is checked before anything is sent, and a mistake is a `UserError` that names the fix:
  the approver token's validity and its `paigeant:approve` scope (when the dispatcher checks tokens), the fresh
  on-behalf-of token's subject against the one the workflow parked with and the plan's initiator (validated when
  tokens are checked, read as the token says otherwise, as the worker reads it), a token given for a workflow that
  ran without one, and the scopes the step requires.
- `release_parked` (from `Worker.process`): the dispatcher publishes a resume and leaves the parked record where
  it is; the worker removes it once the resume hop passed every check and claimed its id, just before the step runs.
  A resume refused for any reason (forged, or a token that expired on the way) changes nothing in the waiting
  store, so the workflow stays parked and can be resumed again with correct answers. Nothing is ever put back, so a
  forged resume cannot make a record up; and every resume of one record has the same id, so while the record waits
  two resumes of it run once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._escape import escape_control
from ._plan import token_subject
from ._tokens import check_scopes, granted_scopes
from ._wire import FROM_WIRE
from .approval import APPROVE_SCOPE, ParkedStep, WaitingStore
from .exceptions import SecurityError, TokenError, UserError
from .security import MessageSecurity, MessageSigner

if TYPE_CHECKING:
    from ._hop import Hop

__all__ = ("check_before_resume", "release_parked")

logger = logging.getLogger("paigeant_ai.worker")


def check_before_resume(
    parked: ParkedStep,
    security: MessageSecurity,
    *,
    approver: str | None,
    approver_token: str | None,
    obo_token: str | None,
) -> None:
    """Refuse, before anything is sent, a resume of `parked` that the worker would refuse.

    Raises:
        UserError: With what to pass instead.
    """
    tokens = security.tokens if isinstance(security, MessageSigner) else None
    cid = parked.correlation_id
    asks_approval = any(call.kind == "approval" for call in parked.pending)
    if approver_token is not None and asks_approval and tokens is not None:
        try:
            claims = tokens.validate(approver_token)
        except TokenError as exc:
            raise UserError(
                f"cannot resume workflow {cid!r}: the approver's token is refused ({exc}); pass a valid, unexpired "
                f"token of the approver with scope {APPROVE_SCOPE!r}"
            ) from None
        if APPROVE_SCOPE not in granted_scopes(claims):
            raise UserError(
                f"cannot resume workflow {cid!r}: the approver's token lacks the scope {APPROVE_SCOPE!r}; pass a "
                "token that grants it"
            )
        subject = claims.get("sub")
        if not isinstance(subject, str) or approver not in (None, subject):
            raise UserError(
                f"cannot resume workflow {cid!r}: approver={approver!r} is not the subject of the approver's token "
                f"({subject!r}); leave approver out, or pass the token of {approver!r}"
            )
    if obo_token is None:
        return  # a workflow that carried a token needs a fresh one: `resume` says so
    if not parked.obo_required:
        raise UserError(
            f"cannot resume workflow {cid!r} with obo_token: it ran without an on-behalf-of token, and the worker "
            "refuses a token of someone it was not started for; resume it without obo_token"
        )
    spec = parked.message.routing_slip.current_activity
    try:
        claims = check_scopes(tokens, obo_token, spec) if tokens is not None and spec is not None else None
    except TokenError as exc:
        raise UserError(
            f"cannot resume workflow {cid!r}: the fresh obo_token is refused ({exc}); pass a valid token of the "
            "workflow's user"
        ) from None
    subject = claims.get("sub") if claims is not None else token_subject(obo_token)
    plan = parked.message.plan
    expected = [who for who in (parked.obo_subject, plan.initiator if plan is not None else None) if who is not None]
    if any(subject != who for who in expected):
        raise UserError(
            f"cannot resume workflow {cid!r}: the fresh obo_token belongs to {subject!r}, but the workflow runs on "
            f"behalf of {expected[0]!r}; pass a fresh token of {expected[0]!r}"
        )


async def release_parked(hop: Hop, store: WaitingStore | None) -> None:
    """Remove from `store` the parked record a resume hop continues, once the hop is claimed and about to run.

    Only the very record the hop carries (verified by `check_resume`) is removed: one that parked anew since stays.
    """
    resume = hop.message.resume
    if resume is None or resume.parked is None:
        return
    parked = ParkedStep.model_validate(resume.parked, context=FROM_WIRE)
    if store is None:
        logger.warning(
            "workflow %s resumed on a worker without a waiting store: its parked record stays in the dispatcher's "
            "store (pass Worker(waiting_store=...), the store it parks in)",
            escape_control(parked.correlation_id),
        )
        return
    try:
        current = await store.get(parked.correlation_id)
    except SecurityError as exc:  # not a parked record: nothing of this workflow's to remove
        logger.warning(
            "leaving the waiting store's entry of workflow %s alone: %s", escape_control(parked.correlation_id), exc
        )
        return
    if current is not None and current.digest == parked.digest:
        await store.remove(current)
