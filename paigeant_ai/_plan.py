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
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

from ._plan_groups import (
    Branch,
    check_branch_compensation,
    check_branch_fallbacks,
    check_group_sizes,
    check_groups,
    is_mandatory,
)
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
    RoutingSlip,
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

T = TypeVar("T")

_CLOCK_LEEWAY = timedelta(seconds=60)
"""How far apart the clocks of a workflow's workers may be."""

COMPENSATION_WINDOW = timedelta(days=7)
"""How long after a workflow stopped its compensations may still run, past its own expiry."""


class _Step(NamedTuple):
    """A step of the route as the check sees it."""

    name: str
    digest: str
    mandatory: bool
    fallbacks: tuple[str, ...] = ()
    compensate: str | None = None
    branches: tuple[Branch, ...] = ()

    def branch(self, key: str | None) -> Branch | None:
        """The branch with payload key `key`, if this step is a group that has one."""
        return next((branch for branch in self.branches if branch.key == key), None)

    @property
    def alternatives(self) -> tuple[str, ...]:
        """The activities that may run the step: its own, then its fallbacks."""
        return (self.name, *self.fallbacks)


def spec_digest(spec: ActivitySpec) -> str:
    """A digest of the whole spec as it travels (22 characters)."""
    digest = hashlib.blake2b(spec.model_dump_json().encode(), digest_size=16).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


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


def _plan_bytes(plan: Plan) -> bytes:
    return plan.model_dump_json(exclude={"signature"}).encode()


def _revision_bytes(correlation_id: str, revision: Revision) -> bytes:
    return b"%s\n%s" % (correlation_id.encode(), revision.model_dump_json(exclude={"signature"}).encode())


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


# -- the route -------------------------------------------------------------------------------------------------


def added_and_removed(old: Sequence[T], new: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """The items of `new` that `old` did not hold (as often), and those of `old` that `new` does not."""
    before, after = Counter(key(item) for item in old), Counter(key(item) for item in new)
    return _beyond(new, after - before, key), _beyond(old, before - after, key)


def _beyond(items: Sequence[T], surplus: Counter[str], key: Callable[[T], str]) -> list[T]:
    """The last `surplus[k]` items of each key `k`, in their order."""
    picked: list[T] = []
    for item in reversed(items):
        if surplus[key(item)] > 0:
            surplus[key(item)] -= 1
            picked.append(item)
    picked.reverse()
    return picked


def _step_key(step: _Step) -> str:
    return step.digest


def _steps(specs: Sequence[ActivitySpec]) -> list[_Step]:
    return [
        _Step(
            spec.name,
            spec_digest(spec),
            is_mandatory(spec),
            spec.fallbacks,
            spec.compensate,
            tuple(Branch(branch.branch_key, branch.alternatives, branch.compensate) for branch in spec.branches),
        )
        for spec in specs
    ]


def _planned_steps(steps: Sequence[PlannedStep]) -> list[_Step]:
    return [
        _Step(
            step.name,
            step.digest,
            step.mandatory or any(branch.mandatory for branch in step.branches),
            step.fallbacks,
            step.compensate,
            tuple(
                Branch(branch.key or branch.name, (branch.name, *branch.fallbacks), branch.compensate)
                for branch in step.branches
            ),
        )
        for step in steps
    ]


def check_route(plan: Plan, slip: RoutingSlip) -> int:
    """Check that `slip` is `plan` changed only by its logged revisions, within the plan's limits.

    Returns:
        How many steps the revisions added, all together.

    Raises:
        SecurityError: With code `revision` (a revision goes past the limits, removes a mandatory step, or was not
            made where it says) or `plan` (the log or the live route is not what the plan and revisions give).
    """
    route = _planned_steps(plan.steps)
    check_group_sizes(route, _plan_error)
    done = [entry.name for entry in slip.completed if entry.outcome != "failed" and entry.branch is None]
    limits = plan.limits
    if len(slip.revisions) > limits.max_revisions:
        raise _revision_error(
            f"the route was revised {len(slip.revisions)} times, the plan allows {limits.max_revisions}"
        )
    added_total, last = 0, 0
    for number, revision in enumerate(slip.revisions, 1):
        at = revision.step
        if at < last or at > len(done) or at >= len(route) or revision.activity not in route[at].alternatives:
            raise _revision_error(
                f"revision {number} says step {at} {revision.activity!r} made it, which it cannot have"
            )
        last = at
        new = _steps(revision.remaining)
        check_group_sizes(new, lambda reason, n=number: _revision_error(f"revision {n}: {reason}"))
        added, removed = added_and_removed(route[at + 1 :], new, _step_key)
        mandatory = [step.name for step in removed if step.mandatory]
        if mandatory:
            names = ", ".join(repr(name) for name in mandatory)
            group = " (a group is mandatory when one of its branches is)" if any(s.branches for s in removed) else ""
            raise _revision_error(f"revision {number} by {revision.activity!r} removes mandatory step {names}{group}")
        if len(added) > limits.max_steps_per_revision:
            raise _revision_error(
                f"revision {number} by {revision.activity!r} adds {len(added)} steps, the plan allows "
                f"{limits.max_steps_per_revision} per revision"
            )
        added_total += len(added)
        if added_total > limits.max_added_steps:
            raise _revision_error(
                f"the revisions add {added_total} steps, the plan allows {limits.max_added_steps} in all"
            )
        route[at + 1 :] = new
    _check_done(route, done)
    check_groups(route, slip)
    _check_compensations(route, done, slip)
    if slip.unwinding is None:
        _check_remaining(route[len(done) :], _steps(slip.itinerary))
    else:
        pending = [record.compensate for record in reversed(slip.compensations) if record.compensated_at is None]
        if [spec.model_dump() for spec in slip.itinerary] != [ActivitySpec(name=name).model_dump() for name in pending]:
            raise _plan_error(
                f"the compensations to run {[spec.name for spec in slip.itinerary]} are not the ones the compensation "
                f"log leaves {pending}"
            )
    _check_fallbacks(route, slip)
    return added_total


def _check_done(route: list[_Step], done: list[str]) -> None:
    for position, name in enumerate(done):
        planned = route[position] if position < len(route) else None
        if planned is None or name not in (planned.name, *planned.fallbacks):
            raise _plan_error(
                f"step {position} ran as {name!r}, but the plan and its revisions have "
                f"{planned.name if planned is not None else None!r} there"
            )


def _check_fallbacks(route: list[_Step], slip: RoutingSlip) -> None:
    """Each fallback taken follows its step's declared order, and the live step runs as one of its alternatives."""
    position = 0
    expected: str | None = route[0].name if route else None
    for entry in slip.completed:
        if entry.branch is not None:
            continue  # a branch's failure: see `_plan_groups.check_branch_fallbacks`
        step = route[position] if position < len(route) else None
        alternatives = (step.name, *step.fallbacks) if step is not None else ()
        if entry.outcome != "failed":
            position += 1
            expected = route[position].name if position < len(route) else None
            continue
        if entry.fallback is None:
            continue
        at = alternatives.index(entry.name) if entry.name in alternatives else -1
        if entry.name != expected or at < 0 or at + 1 >= len(alternatives) or alternatives[at + 1] != entry.fallback:
            raise _plan_error(f"step {position} fell back from {entry.name!r} to {entry.fallback!r}, out of its order")
        expected = entry.fallback
    if slip.unwinding is None and slip.branch is not None:
        check_branch_fallbacks(route, position, slip)
    elif slip.unwinding is None and slip.current is not None and slip.current != expected:
        raise _plan_error(f"step {position} runs as {slip.current!r}, but its alternatives give {expected!r} now")


def _check_compensations(route: list[_Step], done: list[str], slip: RoutingSlip) -> None:
    """Each entry of the compensation log names a completed step, once, with the compensation its plan declares;
    each step that completed as planned with a declared compensation has its entry, not yet marked done before
    the workflow unwinds."""
    recorded = {record.step: record for record in slip.compensations if record.branch is None}
    position = 0
    for entry in slip.completed:
        if entry.outcome == "failed":
            continue
        planned = route[position] if position < len(route) else None
        declared = planned.compensate if planned is not None and planned.name == entry.name else None
        record = recorded.get(position)
        if entry.outcome == "completed" and declared is not None and record is None:
            raise _plan_error(
                f"step {position} {entry.name!r} completed, but the compensation log leaves out its {declared!r}"
            )
        if slip.unwinding is None and record is not None and record.compensated_at is not None:
            raise _plan_error(f"the compensation log marks step {position} undone, but the workflow is not undone")
        position += 1
    last, keys = -1, set[str]()
    for record in slip.compensations:
        if record.branch is not None:
            check_branch_compensation(route, done, slip, record, last, keys)
            last = record.step
            continue
        if record.step <= last or record.step >= len(done) or done[record.step] != record.activity:
            raise _plan_error(f"the compensation log names step {record.step} {record.activity!r}, which did not run")
        planned = route[record.step] if record.step < len(route) else None
        declared = planned.compensate if planned is not None and planned.name == record.activity else None
        if declared is not None and declared != record.compensate:
            raise _plan_error(f"step {record.step} is undone by {record.compensate!r}, but its plan names {declared!r}")
        last = record.step


def _check_remaining(expected: list[_Step], live: list[_Step]) -> None:
    if [step.digest for step in expected] == [step.digest for step in live]:
        return
    if [step.name for step in expected] == [step.name for step in live]:
        changed = next(live[i].name for i in range(len(live)) if live[i].digest != expected[i].digest)
        raise _plan_error(
            f"step {changed!r} is not as planned: its arguments, retry, timeout or scopes were changed without a "
            "revision"
        )
    raise _plan_error(
        f"the remaining route {_names(live)} is not the planned {_names(expected)}: it was changed without a "
        "logged revision"
    )


def _names(steps: list[_Step]) -> str:
    return "[" + ", ".join(step.name for step in steps) + "]"


def _plan_error(reason: str) -> SecurityError:
    return SecurityError(f"plan: {reason}", code="plan")


def _revision_error(reason: str) -> SecurityError:
    return SecurityError(f"revision: {reason}", code="revision")


# -- the check at every worker ---------------------------------------------------------------------------------


class PlanCheck:
    """What a worker checks of a hop's plan, revisions and token (see the module's docstring).

    Signatures it verified are remembered (a bounded number), so that the plan of a workflow whose steps run on
    one worker is verified there once, not on every hop.
    """

    def __init__(self, remembered: int = 4096) -> None:
        self._verified: OrderedDict[tuple[int, str, str, bytes], str | None] = OrderedDict()
        self._remembered = remembered

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
            raise _plan_error(
                "the hop carries no plan; a workflow's first message carries the one its dispatcher signed"
            )
        kid = self._verified_signer(
            security, plan.signature, _plan_bytes(plan), PLAN_TYPE, lambda reason: _plan_error(f"the plan's {reason}")
        )
        if kid is not None and not security.policy.allows(kid, "start"):
            raise _plan_error(f"key {kid!r} signed it, and the trust policy does not allow it to 'start' workflows")
        if plan.correlation_id != message.correlation_id:
            raise _plan_error("the hop carries the plan of another workflow")
        self._check_deadline(message, plan)
        for number, revision in enumerate(message.routing_slip.revisions, 1):
            payload = _revision_bytes(message.correlation_id, revision)
            kid = self._verified_signer(
                security,
                revision.signature,
                payload,
                REVISION_TYPE,
                lambda r, n=number: _revision_error(f"revision {n}'s {r}"),
            )
            if kid is not None and not security.policy.allows(kid, "revise"):
                raise _revision_error(f"revision {number} was signed by key {kid!r}, which may not 'revise' routes")
        check_route(plan, message.routing_slip)
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
                raise _plan_error("the hop has a deadline its plan does not have")
            return
        if unwinding is None:
            if message.expires_at != deadline:
                raise _plan_error(f"the hop's deadline is not its plan's ({deadline.isoformat()})")
            return
        latest = max(deadline, unwinding.at) + COMPENSATION_WINDOW
        if message.expires_at is None or message.expires_at > latest:
            raise _plan_error(f"the hop expires later than the plan allows ({latest.isoformat()})")
        if unwinding.cause == "expired" and unwinding.at + _CLOCK_LEEWAY < deadline:
            raise _plan_error(
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
    ) -> str | None:
        key = (id(security), typ, signature or "", hashlib.sha256(payload).digest())
        if key in self._verified:
            self._verified.move_to_end(key)
            return self._verified[key]
        try:
            kid = security.verify_bytes(signature, payload, typ=typ)
        except SecurityError as exc:
            raise error(f"signature does not hold ({exc})") from None
        self._verified[key] = kid
        while len(self._verified) > self._remembered:
            self._verified.popitem(last=False)
        return kid


def _subject(claims: Mapping[str, Any]) -> str | None:
    subject = claims.get("sub")
    return subject if isinstance(subject, str) else None


def _who(subject: str | None) -> str:
    return "no one (no token, or one without a subject)" if subject is None else repr(subject[:80])
