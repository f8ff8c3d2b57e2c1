"""Approvals bound to the exact call and to an approver, and the worker's check of a resume hop.

Each answer to an approval request becomes an `Approval`: the workflow, step, activity, tool call, a digest of
the arguments that will run (the override arguments when `ToolApproved(override_args=...)` changes them), the
digest of the parked record, the decision, the approver and the time. It is signed (a detached JWS, `typ:
paigeant-approval+jws`, over its JSON) by the approver's principal, one of:

- a key that holds `approve` in the trust policy (an approvals desk's service): it attests `approver`;
- a user's token with the scope `paigeant:approve` (`APPROVE_SCOPE`), carried in the approval as
  `approver_token` and validated by the worker's `TokenValidator`: the approver is its `sub`. A token is a bearer
  credential that travels in the resume hop, so it stands for a decision only if it is bound to it (an RFC 9396
  `authorization_details` entry of type `paigeant_approval` with the `decision_digest`); then the resuming service's
  key needs no `approve` of its own. Otherwise that key must hold `approve` too.

Before a resume hop's step runs, `check_resume` verifies that the hop continues a real parked record (its proof,
its route and payload, its id, which is the same for every resume of that record so that only one runs) and that
each answer equals what an approver signed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, cast

from pydantic import ConfigDict, Field, JsonValue, TypeAdapter, ValidationError
from pydantic_ai import DeferredToolResults
from pydantic_ai.tools import ToolApproved, ToolDenied
from pydantic_core import to_jsonable_python

from ._at_most_once import check_decision
from ._escape import escape_control
from ._hop import Hop
from ._tokens import granted_scopes, unverified_claims
from ._wire import FROM_WIRE, Wire
from .approval import APPROVAL_TYPE, APPROVE_SCOPE, ParkedStep, PendingToolCall
from .exceptions import SecurityError, TokenError, UserError
from .security import MessageSecurity, own_kid

__all__ = ("APPROVAL_TYPE", "APPROVE_SCOPE", "Approval", "SignedApproval", "check_resume", "sign_approvals")

logger = logging.getLogger("paigeant_ai.worker")


_RESULTS: TypeAdapter[DeferredToolResults] = TypeAdapter(DeferredToolResults)
_COMPARED = {"v", "correlation_id", "routing_slip", "payload", "created_at", "expires_at"}
"""What a resume hop must carry exactly as its parked record holds it."""


class Approval(Wire):
    """One approver's decision on one tool call of a parked step, bound to the exact call and record."""

    model_config = ConfigDict(frozen=True)

    v: Literal[1] = 1
    correlation_id: str
    step: int
    activity: str
    tool_call_id: str
    tool_name: str
    args_digest: str
    """SHA-256 of the canonical JSON of the arguments that run (the override arguments, when given)."""
    parked_digest: str
    """`ParkedStep.digest` of the record the call waits in."""
    decision: Literal["approved", "denied"]
    approver: str | None = None
    """Who decided: attested by a key that may approve, or the `sub` of the approver's token."""
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    changed_args: dict[str, JsonValue] | None = None
    """The arguments the approver set instead of the requested ones (for the audit)."""


class SignedApproval(Wire):
    """An `Approval` with its signature, as a resume hop carries it."""

    approval: Approval
    proof: str | None = Field(default=None, repr=False)
    approver_token: str | None = Field(default=None, repr=False)
    """The approver's token (scope `paigeant:approve`), when a person's token is the principal."""

    def signed_bytes(self) -> bytes:
        return self.approval.model_dump_json().encode()


DECISION_TYPE = "paigeant_approval"
"""The `type` of the `authorization_details` entry (RFC 9396) that binds an approver's token to one decision."""


def decision_digest(approval: Approval) -> str:
    """What an approver's own token binds to: the workflow, step, call, the arguments that run, the parked record and
    the decision (not who or when). See `ParkedStep.decision_digest`."""
    fields = [
        approval.correlation_id,
        approval.step,
        approval.activity,
        approval.tool_call_id,
        approval.tool_name,
        approval.args_digest,
        approval.parked_digest,
        approval.decision,
    ]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def binds(claims: Mapping[str, Any], digest: str) -> bool:
    """Whether a token's claims bind it to the decision `digest` (`authorization_details`, RFC 9396)."""
    details = claims.get("authorization_details")
    if not isinstance(details, list):
        return False
    return any(
        isinstance(entry, dict) and entry.get("type") == DECISION_TYPE and entry.get("digest") == digest
        for entry in cast("list[object]", details)
    )


def approval_of(parked: ParkedStep, call: PendingToolCall, answer: object, approver: str | None) -> Approval:
    """The approval of `answer` to `call`, as `resume` signs it."""
    decision, runs_with = _decision(answer, call)
    return Approval(
        correlation_id=parked.correlation_id,
        step=parked.step,
        activity=parked.activity,
        tool_call_id=call.tool_call_id,
        tool_name=call.tool_name,
        args_digest=args_digest(runs_with),
        parked_digest=parked.digest,
        decision=decision,
        approver=approver,
        changed_args=_changed(call, runs_with),
    )


def args_digest(args: Mapping[str, Any]) -> str:
    """The SHA-256 of `args` as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(to_jsonable_python(dict(args)), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# -- the resuming side ------------------------------------------------------------------------------------------


def sign_approvals(
    parked: ParkedStep,
    answers: DeferredToolResults,
    security: MessageSecurity,
    *,
    approver: str | None,
    approver_token: str | None,
) -> list[SignedApproval]:
    """One signed approval per approval request `answers` answers.

    Raises:
        UserError: There are approvals to sign but no approver, or this service's key may not approve and no
            approver token was given.
    """
    requests = [call for call in parked.pending if call.kind == "approval"]
    if not requests:
        return []
    if approver is None and approver_token is None:
        raise UserError(
            f"resuming workflow {parked.correlation_id!r} answers approval requests: say who decides with "
            "approver='<their identity>' (with a key that holds 'approve' in the trust policy) or "
            "approver_token=<their token with scope 'paigeant:approve'>"
        )
    kid = own_kid(security)
    may_approve = kid is None or security.policy.allows(kid, "approve")
    if approver_token is None and not may_approve:
        raise UserError(
            f"this service's key {kid!r} may not approve tool calls: grant it 'approve' in the trust policy, "
            "or pass approver_token=<the approver's token with scope 'paigeant:approve', bound to the decision>"
        )
    signed: list[SignedApproval] = []
    for call in requests:
        approval = approval_of(parked, call, answers.approvals[call.tool_call_id], approver)
        if not may_approve and not binds(unverified_claims(approver_token), decision_digest(approval)):
            raise UserError(
                f"this service's key {kid!r} may not approve tool calls, and the approver's token is not bound to "
                f"the decision on {call.tool_name} ({call.tool_call_id}): have it issued with authorization_details "
                f'[{{"type": "{DECISION_TYPE}", "digest": "{decision_digest(approval)}"}}] '
                "(ParkedStep.decision_digest), or grant this key 'approve'"
            )
        item = SignedApproval(approval=approval, approver_token=approver_token)
        item.proof = security.sign_bytes(item.signed_bytes(), typ=APPROVAL_TYPE)
        signed.append(item)
    return signed


def describe(approvals: list[tuple[Approval, str]]) -> list[str]:
    """One line per decision, for the audit: who approved or denied which call, and any changed arguments."""
    lines: list[str] = []
    for approval, who in approvals:
        line = f"{approval.decision} {approval.tool_name} ({approval.tool_call_id}) by {who}"
        if approval.changed_args is not None:
            line += f", with changed arguments {json.dumps(approval.changed_args, sort_keys=True)}"
        lines.append(line)
    return lines


def attested(item: SignedApproval) -> str:
    """Who an approval names, as the resuming side knows it (before the worker validated any token)."""
    return item.approval.approver or "the holder of the approver token"


# -- the worker's check -----------------------------------------------------------------------------------------


def check_resume(hop: Hop, security: MessageSecurity) -> list[str]:
    """Verify a resume hop before its step runs; the audit lines of its approvals.

    Raises:
        SecurityError: With the reason: the hop continues no real parked record, or an answer is not what an
            approver signed.
    """
    resume = hop.message.resume
    if resume is None:
        return []
    parked = _parked_of(hop, security)
    if parked.in_doubt is not None:  # a person's word on whether an at-most-once step ran
        return check_decision(parked, resume.approvals, security)
    try:
        results = _RESULTS.validate_python(resume.results)
    except ValidationError:
        raise SecurityError("the resume's answers are not DeferredToolResults", code="resume_invalid") from None
    pending = {call.tool_call_id: call for call in parked.pending}
    asked = {cid for cid, call in pending.items() if call.kind == "approval"}
    if set(results.approvals) != asked or not set(results.calls) <= set(pending) - asked:
        raise SecurityError("the resume's answers are not the calls the parked step waits for", code="resume_answers")
    approvals = _verified_approvals(resume.approvals, parked, security)
    decided: list[tuple[Approval, str]] = []
    for call_id in sorted(asked):
        call = pending[call_id]
        if call_id not in approvals:
            raise SecurityError(f"no signed approval for {call.tool_name} ({call_id})", code="approval_missing")
        approval, who = approvals[call_id]
        decision, runs_with = _decision(results.approvals[call_id], call)
        if (approval.decision, approval.tool_name) != (decision, call.tool_name):
            raise SecurityError(
                f"the answer to {call.tool_name} ({call_id}) is not what {who} decided ({approval.decision})",
                code="approval_mismatch",
            )
        if approval.args_digest != args_digest(runs_with):
            raise SecurityError(
                f"the arguments {call.tool_name} ({call_id}) would run with are not the ones {who} approved",
                code="approval_mismatch",
            )
        if approval.changed_args != _changed(call, runs_with):  # the audit says what runs, whoever signed it
            raise SecurityError(
                f"the approval of {call.tool_name} ({call_id}) misstates the arguments it changed",
                code="approval_mismatch",
            )
        decided.append((approval, who))
    lines = describe(decided)
    if lines:
        what = escape_control(f"{hop.message.correlation_id} resumed at {hop.spec.name}: {'; '.join(lines)}")
        logger.info("workflow %s", what)
    return lines


def _parked_of(hop: Hop, security: MessageSecurity) -> ParkedStep:
    """The verified parked record a resume hop continues; it must be the very one the hop carries on."""
    resume, message = hop.message.resume, hop.message
    assert resume is not None
    if resume.parked is None:
        raise SecurityError(
            "a resume for a step that never parked: the hop carries no parked record", code="resume_unparked"
        )
    try:
        parked = ParkedStep.model_validate(resume.parked, context=FROM_WIRE)
    except ValidationError:
        raise SecurityError("the resume's parked record is not a parked record", code="resume_unparked") from None
    parked.verify(security)
    if message.model_dump(include=_COMPARED, mode="json") != parked.message.model_dump(include=_COMPARED, mode="json"):
        raise SecurityError("the resume hop's route or payload is not the parked record's", code="resume_mismatch")
    if message.message_id != _expected_id(parked, message.attempt) or resume.count != parked.resume_count:
        raise SecurityError("the resume hop's id is not the one of its parked record", code="resume_mismatch")
    if resume.conversation and resume.conversation != parked.conversation:
        raise SecurityError("the resume's conversation is not the parked record's", code="resume_mismatch")
    if parked.obo_required and message.security.obo_token is None:
        raise SecurityError(
            "the workflow carried an on-behalf-of token when it parked; its resume carries none",
            code="resume_token",
        )
    subject = hop.claims.get("sub") if hop.claims is not None else None
    if parked.obo_subject is not None and hop.claims is not None and subject != parked.obo_subject:
        raise SecurityError(
            "the resume's on-behalf-of token is of another subject than the workflow's", code="resume_token"
        )
    return parked


def _expected_id(parked: ParkedStep, attempt: int) -> str | None:
    """The id of the hop that resumes `parked`: the same for every resume of the record, so only one runs. There is
    no other: a resumed step that fails parks again (its answers are used once), so no retry carries them."""
    return parked.resume_message_id() if attempt == parked.message.attempt else None


def _verified_approvals(
    raw: list[dict[str, JsonValue]], parked: ParkedStep, security: MessageSecurity
) -> dict[str, tuple[Approval, str]]:
    """Each verified approval of `parked`'s calls, with who decided, by tool call id."""
    found: dict[str, tuple[Approval, str]] = {}
    for data in raw:
        try:
            item = SignedApproval.model_validate(data, context=FROM_WIRE)
        except ValidationError:
            raise SecurityError("an approval of the resume is malformed", code="approval_invalid") from None
        approval = item.approval
        what = f"the approval of {approval.tool_name} ({approval.tool_call_id})"
        try:
            kid = security.verify_bytes(item.proof, item.signed_bytes(), typ=APPROVAL_TYPE)
        except SecurityError as exc:
            raise SecurityError(f"{what} is refused: {exc}", code=exc.code) from None
        who = _approver(item, kid, security, what)
        binding = (approval.correlation_id, approval.step, approval.activity, approval.parked_digest)
        if binding != (parked.correlation_id, parked.step, parked.activity, parked.digest):
            raise SecurityError(f"{what} is for another parked step", code="approval_mismatch")
        if approval.tool_call_id in found:
            raise SecurityError(f"{what} is given twice", code="approval_invalid")
        found[approval.tool_call_id] = (approval, who)
    return found


def _approver(item: SignedApproval, kid: str | None, security: MessageSecurity, what: str) -> str:
    """Who decided, once their principal is checked: a key that may approve, or a token with the approve scope."""
    token = item.approver_token
    if token is None:
        try:
            security.policy.require(kid, "approve", "approve tool calls")
        except SecurityError as exc:
            raise SecurityError(f"{what} is refused: {exc}", code=exc.code) from None
        named = item.approval.approver or kid or "unknown"
        return f"{named} (key {kid})" if kid is not None and named != kid else named
    tokens = getattr(security, "tokens", None)
    if tokens is None:
        raise SecurityError(
            f"{what} rests on an approver token, but this worker does not check tokens", code="approval_token"
        )
    try:
        claims = tokens.validate(token)
    except TokenError as exc:
        raise SecurityError(f"{what} is refused: the approver's token: {exc}", code="approval_token") from None
    if APPROVE_SCOPE not in granted_scopes(claims):
        raise SecurityError(f"{what} is refused: the approver's token lacks {APPROVE_SCOPE!r}", code="approval_token")
    subject = claims.get("sub")
    if not isinstance(subject, str) or (item.approval.approver not in (None, subject)):
        raise SecurityError(f"{what} is refused: it names another approver than its token", code="approval_token")
    # A token is a bearer credential that travels in the resume hop: alone, it proves only that its holder may
    # approve something. It stands for this decision only if it is bound to it, or a key that may approve vouches.
    if not security.policy.allows(kid, "approve") and not binds(claims, decision_digest(item.approval)):
        raise SecurityError(
            f"{what} is refused: the approver's token is not bound to this decision (authorization_details of type "
            f"{DECISION_TYPE!r}), and key {kid!r} may not approve",
            code="approval_token",
        )
    return f"{subject} (token)"


def _decision(answer: object, call: PendingToolCall) -> tuple[Literal["approved", "denied"], dict[str, Any]]:
    """Approved or denied, and the arguments the call runs with if approved."""
    if answer is True:
        return "approved", dict(call.args)
    if isinstance(answer, ToolApproved):
        return "approved", dict(answer.override_args if answer.override_args is not None else call.args)
    if answer is False or isinstance(answer, ToolDenied):
        return "denied", dict(call.args)
    raise SecurityError(f"the answer to {call.tool_call_id} is not an approval", code="resume_answers")


def _changed(call: PendingToolCall, runs_with: Mapping[str, Any]) -> dict[str, JsonValue] | None:
    jsonable = to_jsonable_python(dict(runs_with))
    return jsonable if jsonable != to_jsonable_python(dict(call.args)) else None
