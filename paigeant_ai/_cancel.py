"""Cancel requests: what `WorkflowDispatcher.cancel` posts, and how every worker decides whether one holds.

A cancel is a small signed record, `CancelRequest`, posted on the transport's cancel board (see
`paigeant_ai.transports.base.CancelBoard`), where every process on the transport reads it, including processes
that start later. Nothing on the board is trusted for being there: the board is broker state an attacker may write.
A worker acts on a record only when

- its signature (`typ` `paigeant-cancel+jws`) holds under a trusted key, and names this workflow; and
- that key may `cancel` under the trust policy, or the record carries the token of the workflow's initiator or
  owner (its `sub`), valid under the worker's token validator.

Unsigned (`PAIGEANT_ALLOW_UNSIGNED=1`), any well-formed record for the workflow holds: anyone who can write to the
broker can then cancel, as they can forge steps. A record for another workflow, a forged or altered one, or one
from a key that may not cancel changes nothing (it is counted in `CancelCheck.refused` and logged once).
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AwareDatetime, Field, ValidationError

from ._escape import escape_control
from ._plan import begin_unwinding, token_subject
from ._tokens import TokenValidator
from ._wire import FROM_WIRE, Plan, Wire, utcnow
from .contracts import Compensation, PaigeantMessage, Unwinding
from .exceptions import SecurityError, TokenError
from .security import MessageSecurity

__all__ = ("CANCEL_TTL", "CANCEL_TYPE", "CancelCheck", "CancelRequest", "Cancellation", "sign_cancel", "unwind_parked")

CANCEL_TTL = 8 * 24 * 3600.0
"""Seconds a cancel stays on the board, at most: a workflow's default lifetime (7 days) and the grace after it in
which its hops still arrive (see `paigeant_ai._hop.EXPIRY_GRACE`)."""

logger = logging.getLogger("paigeant_ai.cancel")

CANCEL_TYPE = "paigeant-cancel+jws"


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What `WorkflowDispatcher.cancel` did.

    Attributes:
        correlation_id: The workflow.
        state: `requested`: the cancel is posted; the workflow stops before its next step starts, and a step of it
            running now is interrupted, in whatever process. `cancelled`: the workflow waited for input; it was
            released here and its compensations started. `finished`: it had ended already; nothing changed.
        detail: The same, in a sentence for people.
    """

    correlation_id: str
    state: Literal["requested", "cancelled", "finished"]
    detail: str


class CancelRequest(Wire):
    """A request to cancel one workflow, signed by the service that made it."""

    correlation_id: str = Field(min_length=1, max_length=200)
    reason: str = Field(default="", max_length=2000)
    by: str | None = Field(default=None, max_length=200)
    """Who asked: the principal the service names, or the subject of `token`."""
    at: AwareDatetime = Field(default_factory=utcnow)
    token: str | None = Field(default=None, repr=False)
    """The requester's own token, when the signing key may not cancel by itself: its subject must be the
    workflow's initiator or owner."""
    signature: str | None = Field(default=None, repr=False)
    """A detached JWS (`typ` `paigeant-cancel+jws`) over the request without this field; None when unsigned."""

    def signed_bytes(self) -> bytes:
        """What the signature covers."""
        return self.model_dump_json(exclude={"signature"}).encode()

    def to_bytes(self) -> bytes:
        """The record as it is posted."""
        return self.model_dump_json().encode()

    @property
    def summary(self) -> str:
        """Who cancelled, and why, in a few words."""
        who = self.by or "an unnamed service"
        return f"cancelled by {who}" + (f": {self.reason}" if self.reason else "")


def sign_cancel(request: CancelRequest, security: MessageSecurity) -> CancelRequest:
    """`request`, signed with the key of `security` (unchanged when unsigned)."""
    unsigned = request.model_copy(update={"signature": None})
    return unsigned.model_copy(update={"signature": security.sign_bytes(unsigned.signed_bytes(), typ=CANCEL_TYPE)})


class CancelCheck:
    """Decides which posted record, if any, cancels a workflow (see the module's docstring).

    Records already judged are remembered (a bounded number), so a worker that sees the same record on every
    hop of a cancelled workflow verifies it once.
    """

    def __init__(self, remembered: int = 4096) -> None:
        self.refused: Counter[str] = Counter()
        self._judged: OrderedDict[tuple[bytes, str, str | None, str | None], CancelRequest | None] = OrderedDict()
        self._remembered = remembered

    def holding(
        self, records: Sequence[bytes], message: PaigeantMessage, security: MessageSecurity
    ) -> CancelRequest | None:
        """The first of `records` that cancels `message`'s workflow, or None."""
        plan = message.plan
        initiator = plan.initiator if plan is not None else token_subject(message.security.obo_token)
        owner = plan.owner if plan is not None else None
        for record in records:
            key = (record, message.correlation_id, initiator, owner)
            if key in self._judged:
                self._judged.move_to_end(key)
                found = self._judged[key]
            else:
                found = self._judge(record, message.correlation_id, plan, initiator, owner, security)
                self._judged[key] = found
                while len(self._judged) > self._remembered:
                    self._judged.popitem(last=False)
            if found is not None:
                return found
        return None

    def _judge(
        self,
        record: bytes,
        correlation_id: str,
        plan: Plan | None,
        initiator: str | None,
        owner: str | None,
        security: MessageSecurity,
    ) -> CancelRequest | None:
        try:
            request = CancelRequest.model_validate_json(record, context=FROM_WIRE)
        except ValidationError:
            return self._refuse("malformed", correlation_id, "a record on the cancel board is not a cancel request")
        if request.correlation_id != correlation_id:
            return self._refuse("misfiled", correlation_id, "a cancel request for another workflow was filed here")
        try:
            kid = security.verify_bytes(request.signature, request.signed_bytes(), typ=CANCEL_TYPE)
        except SecurityError as exc:
            return self._refuse(exc.code, correlation_id, f"a cancel request's signature does not hold ({exc})")
        if kid is None or security.policy.allows(kid, "cancel"):
            return request
        subject = _token_subject(security, request.token)
        if subject is not None and subject in (initiator, owner):
            return request
        why = f"key {kid!r} may not 'cancel' under the trust policy"
        why += ", and the request carries no valid token of the workflow's initiator or owner"
        return self._refuse("not_allowed", correlation_id, f"a cancel request is refused: {why}")

    def _refuse(self, code: str, correlation_id: str, reason: str) -> CancelRequest | None:
        self.refused[code] += 1
        logger.warning("workflow %s: %s; it changes nothing", escape_control(correlation_id), escape_control(reason))
        return None


def _token_subject(security: MessageSecurity, token: str | None) -> str | None:
    """The subject of `token` once the worker's token validator accepts it; None without a token or a validator."""
    tokens = getattr(security, "tokens", None)
    if token is None or not isinstance(tokens, TokenValidator):
        return None
    try:
        claims: Mapping[str, Any] = tokens.validate(token)
    except (TokenError, SecurityError):
        return None
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


def unwind_parked(message: PaigeantMessage, request: CancelRequest) -> list[Compensation]:
    """Stop a parked workflow's `message` for `request`: its slip unwinds (see `RoutingSlip.unwind`); the
    compensations to run, the first of which `message` is then addressed to."""
    slip = message.routing_slip
    unwinding = Unwinding(
        cause="cancelled",
        reason=request.summary,
        step=slip.step,
        activity=slip.current,
        by=request.by,
        cancel=request.to_bytes().decode(),
    )
    return begin_unwinding(message, unwinding)
