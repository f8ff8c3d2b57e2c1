"""The signed plan of a workflow, its signed revisions, and the check every worker makes of both.

A hop's signature says only which key sent that hop. The plan says what the workflow was started to do:

- At dispatch, the dispatcher (or the planner, through it) signs a `Plan`: the correlation ID, a digest of every
  step's whole `ActivitySpec` (arguments, retry, timeout, scopes, `mandatory`), the initiator (the subject of the
  workflow's on-behalf-of token), the `RevisionLimits`, and when it was made and expires. Its key must hold `start`.
  The plan travels unchanged beside the live route on every hop, retry, resume and dead-letter replay.
- A step that changes the rest of the route logs a `Revision`, signed by the worker that ran the step (its key must
  hold `revise`) and bound to the workflow (the correlation ID is part of what is signed) and to the step.
- Every worker, before it runs a step (`PlanCheck.check`, from `Worker._authorize`), checks the plan's signature,
  each revision's signature, that the plan replayed through the logged revisions, at their steps, gives exactly
  the completed log and the live route (the current step's spec included), that no revision removed a mandatory
  step or went past the limits, and that the hop's token is the initiator's. Any failure is a `SecurityError`
  (`plan`, `revision`, `token_subject`): the hop is dead-lettered with the reason, never run.

So a key that may send to one step can no longer rewrite the rest of the route, clear the revision log, raise a
step's retries or swap in another user's token: it would have to forge the dispatcher's or a reviser's signature.
What stays possible for a key holding `send_to` alone: undoing the latest revisions whose added steps have not
run yet, which returns the route to one the plan and its earlier revisions allowed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from ._lru import Lru
from ._plan_groups import plan_error
from ._plan_route import RouteMemo, added_and_removed, check_route, revision_error, spec_digest
from ._tokens import unverified_claims
from .contracts import (
    ActivitySpec,
    Budget,
    Compensation,
    PaigeantMessage,
    Plan,
    PlannedStep,
    Revision,
    RevisionLimits,
    Unwinding,
)
from .exceptions import SecurityError, UserError
from .security import MessageSecurity

__all__ = (
    "PLAN_TYPE",
    "REVISION_TYPE",
    "PlanCheck",
    "added_and_removed",
    "begin_unwinding",
    "check_route",
    "new_plan",
    "revise_route",
    "signer_of",
    "spec_digest",
    "token_subject",
)

PLAN_TYPE = "paigeant-plan+jws"
REVISION_TYPE = "paigeant-revision+jws"

_CLOCK_LEEWAY = timedelta(seconds=60)
"""How far apart the clocks of a workflow's workers may be."""

COMPENSATION_WINDOW = timedelta(days=7)
"""How long after a workflow stopped its compensations may still run, past its own expiry."""


def token_subject(token: str | None) -> str | None:
    """The `sub` claim of a JWT, read without checking it; None for no token, an opaque one, or no `sub`."""
    subject = unverified_claims(token).get("sub")
    return subject if isinstance(subject, str) else None


def signer_of(signature: str) -> str | None:
    """The `kid` of a JWS this process just made (read from its header, not checked)."""
    part = signature.split(".")[0]
    header: object = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    kid = header.get("kid") if isinstance(header, dict) else None  # pyright: ignore[reportUnknownMemberType]
    return kid if isinstance(kid, str) else None


def _unsigned_json(model: Plan | Revision) -> bytes:
    """`model.model_dump_json(exclude={"signature"})`, encoded: the same bytes, without a round trip through `str`
    (every hop encodes its plan and revisions again, to find the bytes their signatures are over)."""
    return model.__pydantic_serializer__.to_json(model, exclude={"signature"})


def _plan_bytes(plan: Plan) -> bytes:
    return _unsigned_json(plan)


def _revision_bytes(correlation_id: str, revision: Revision) -> bytes:
    return b"%s\n%s" % (correlation_id.encode(), _unsigned_json(revision))


# -- signing ---------------------------------------------------------------------------------------------------


def new_plan(
    message: PaigeantMessage,
    security: MessageSecurity,
    limits: RevisionLimits | None = None,
    *,
    owner: str | None = None,
    budget: Budget | None = None,
) -> Plan:
    """The signed plan of the workflow whose first message is `message`, which belongs to `owner`.

    Raises:
        UserError: The signing key may not start workflows under the trust policy (with the fix).
    """
    plan = Plan(
        correlation_id=message.correlation_id,
        steps=[_planned(spec) for spec in message.routing_slip.itinerary],
        initiator=token_subject(message.security.obo_token),
        owner=owner,
        limits=limits or RevisionLimits(),
        created_at=message.created_at,
        expires_at=message.expires_at,
        budget=budget,
    )
    signature = security.sign_bytes(_plan_bytes(plan), typ=PLAN_TYPE)
    if signature is not None:
        kid = signer_of(signature)
        if not security.policy.allows(kid, "start"):
            raise UserError(
                f"this dispatcher's key {kid!r} may not start workflows: the trust policy does not grant it "
                f"'start', so every worker would refuse its workflows; add it to the key's grant in the trust "
                f'policy (PAIGEANT_TRUST_POLICY_FILE), as in {{"keys": {{"{kid}": {{"may": ["start"]}}}}}}'
            )
    plan.signature = signature
    return plan


def _planned(spec: ActivitySpec, key: str | None = None) -> PlannedStep:
    return PlannedStep(
        name=spec.name,
        digest=spec_digest(spec),
        mandatory=spec.mandatory,
        fallbacks=spec.fallbacks,
        compensate=spec.compensate,
        branches=tuple(_planned(branch, branch.branch_key) for branch in spec.branches),
        key=key,
    )


def revise_route(message: PaigeantMessage, revisions: Sequence[Revision], security: MessageSecurity) -> None:
    """Sign `revisions` with this worker's key and log them in `message`'s slip, if the plan allows them.

    Nothing changes unless all of them are signed and allowed.

    Raises:
        SecurityError: This worker's key may not revise routes, or the revisions go past the plan's limits or
            remove a mandatory step (code `revision`).
    """
    slip = message.routing_slip
    trial = slip.model_copy(update={"itinerary": list(slip.itinerary), "revisions": list(slip.revisions)})
    for revision in revisions:
        trial.revise(_signed(message.correlation_id, revision, security))
    if message.plan is not None:
        check_route(message.plan, trial)
    message.routing_slip = trial


def _signed(correlation_id: str, revision: Revision, security: MessageSecurity) -> Revision:
    revision = revision.model_copy(update={"signature": None})
    signature = security.sign_bytes(_revision_bytes(correlation_id, revision), typ=REVISION_TYPE)
    if signature is not None and not security.policy.allows(kid := signer_of(signature), "revise"):
        raise SecurityError(
            f"this worker's key {kid!r} may not revise a workflow's route: the trust policy does not grant it 'revise'",
            code="revision",
        )
    return revision.model_copy(update={"signature": signature})


def begin_unwinding(message: PaigeantMessage, unwinding: Unwinding) -> list[Compensation]:
    """Stop `message`'s workflow for `unwinding.cause`: its slip's itinerary becomes the compensations still to run
    (see `RoutingSlip.unwind`), which have `COMPENSATION_WINDOW` from now to run, whatever the workflow had left;
    those compensations, oldest step first (none: the workflow just ends)."""
    pending = message.routing_slip.unwind(unwinding)
    message.resume = None
    if pending:
        message.expires_at = unwinding.at + COMPENSATION_WINDOW
    return pending


# -- the check at every worker ---------------------------------------------------------------------------------


class _Verified(NamedTuple):
    """A signature verified over the bytes whose digest keys it, with the verifier that held it."""

    security: MessageSecurity
    """Kept, so that no other verifier (another set of trusted keys) can come to have its `id` while remembered."""
    kid: str | None


class PlanCheck:
    """What a worker checks of a hop's plan, revisions and token (see the module's docstring).

    A workflow whose steps run on one worker has its plan's and revisions' signatures verified there once, and the
    route they give derived once: each is remembered under a digest of the bytes signed (see
    `paigeant_ai._plan_route.RouteMemo`). Every hop still encodes the plan and revisions it carries, to find those
    bytes, and checks its own log and live route. At most `remembered` of each are kept (4,096 by default: every
    workflow in flight on a busy worker, a few hundred bytes each for a short route, so a few megabytes at most).
    """

    def __init__(self, remembered: int = 4096) -> None:
        self._verified: Lru[tuple[int, str, str, bytes], _Verified] = Lru(remembered)
        self._routes = RouteMemo(remembered)

    def check(
        self,
        message: PaigeantMessage,
        signer: str | None,
        claims: Mapping[str, Any] | None,
        security: MessageSecurity,
    ) -> None:
        """Check `message`'s plan, revisions and token subject; `signer` signed the hop, `claims` are its token's.

        Raises:
            SecurityError: Code `plan`, `revision` or `token_subject`, with the reason.
        """
        try:
            self._check(message, signer, claims, security)
        except SecurityError as exc:
            refused = getattr(security, "refused", None)
            if isinstance(refused, Counter):
                refused[exc.code] += 1
            raise

    def _check(
        self,
        message: PaigeantMessage,
        signer: str | None,
        claims: Mapping[str, Any] | None,
        security: MessageSecurity,
    ) -> None:
        if signer is None:
            return  # unsigned (the opt-out): a plan could be forged as easily as the route, so nothing is checked
        plan = message.plan
        if plan is None:
            raise plan_error(
                "the hop carries no plan; a workflow's first message carries the one its dispatcher signed"
            )
        kid, digest = self._verified_signer(
            security, plan.signature, _plan_bytes(plan), PLAN_TYPE, lambda reason: plan_error(f"the plan's {reason}")
        )
        if kid is not None and not security.policy.allows(kid, "start"):
            raise plan_error(f"key {kid!r} signed it, and the trust policy does not allow it to 'start' workflows")
        if plan.correlation_id != message.correlation_id:
            raise plan_error("the hop carries the plan of another workflow")
        self._check_deadline(message, plan)
        signed = [digest]
        for number, revision in enumerate(message.routing_slip.revisions, 1):
            kid, digest = self._verified_signer(
                security,
                revision.signature,
                _revision_bytes(message.correlation_id, revision),
                REVISION_TYPE,
                lambda r, n=number: revision_error(f"revision {n}'s {r}"),
            )
            if kid is not None and not security.policy.allows(kid, "revise"):
                raise revision_error(f"revision {number} was signed by key {kid!r}, which may not 'revise' routes")
            signed.append(digest)
        self._routes.check(plan, message.routing_slip, tuple(signed))
        subject = _subject(claims) if claims is not None else token_subject(message.security.obo_token)
        if subject != plan.initiator:
            raise SecurityError(
                f"token_subject: the on-behalf-of token belongs to {_who(subject)}, but the workflow was started for "
                f"{_who(plan.initiator)}",
                code="token_subject",
            )

    @staticmethod
    def _check_deadline(message: PaigeantMessage, plan: Plan) -> None:
        """The hop's deadline is the plan's; only its compensations may run past it, for `COMPENSATION_WINDOW`; and
        a workflow is undone as `expired` only once the plan's deadline passed."""
        deadline, unwinding = plan.expires_at, message.routing_slip.unwinding
        if deadline is None:
            if message.expires_at is not None and unwinding is None:
                raise plan_error("the hop has a deadline its plan does not have")
            return
        if unwinding is None:
            if message.expires_at != deadline:
                raise plan_error(f"the hop's deadline is not its plan's ({deadline.isoformat()})")
            return
        latest = max(deadline, unwinding.at) + COMPENSATION_WINDOW
        if message.expires_at is None or message.expires_at > latest:
            raise plan_error(f"the hop expires later than the plan allows ({latest.isoformat()})")
        if unwinding.cause == "expired" and unwinding.at + _CLOCK_LEEWAY < deadline:
            raise plan_error(
                f"the workflow is undone as expired at {unwinding.at.isoformat()}, before its deadline "
                f"{deadline.isoformat()}"
            )

    def _verified_signer(
        self,
        security: MessageSecurity,
        signature: str | None,
        payload: bytes,
        typ: str,
        error: Callable[[str], SecurityError],
    ) -> tuple[str | None, bytes]:
        """The key that signed `payload` with `signature`, and the digest of `payload` (what it is remembered by)."""
        digest = hashlib.sha256(payload).digest()
        key = (id(security), typ, signature or "", digest)
        verified = self._verified.get(key)
        if verified is not None and verified.security is security:
            return verified.kid, digest
        try:
            kid = security.verify_bytes(signature, payload, typ=typ)
        except SecurityError as exc:
            raise error(f"signature does not hold ({exc})") from None
        self._verified.put(key, _Verified(security, kid))
        return kid, digest


def _subject(claims: Mapping[str, Any]) -> str | None:
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


def _who(subject: str | None) -> str:
    return "no one (no token, or one without a subject)" if subject is None else repr(subject[:80])
