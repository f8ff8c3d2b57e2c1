"""What a worker remembers of the plans it checked: a workflow's later hops on it verify no signature again, and
everything a worker that remembers nothing refuses it still refuses, for the same reason."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from joserfc import jwt
from joserfc.jwk import Key

from paigeant_ai import ActivitySpec, Budget, PaigeantMessage, Plan, Price, RetryPolicy, Revision, RevisionLimits
from paigeant_ai._lru import Lru
from paigeant_ai._plan import (  # pyright: ignore[reportPrivateUsage]
    PLAN_TYPE,
    REVISION_TYPE,
    PlanCheck,
    _plan_bytes,
    _revision_bytes,
    new_plan,
    revise_route,
    spec_digest,
)
from paigeant_ai.exceptions import SecurityError
from paigeant_ai.security import MessageSigner, TrustPolicy, generate_key

ORDERS, SHOP, INTRUDER = generate_key("orders-1"), generate_key("shop-1"), generate_key("intruder-1")
ISSUER = generate_key("idp-1", "ES256")
POLICY = TrustPolicy.load(
    {
        "keys": {
            "orders-1": {"may": ["start"], "send_to": "*"},
            "shop-1": {"may": ["revise"], "send_to": "*"},
            "intruder-1": {"send_to": "*"},
        }
    }
)
DEADLINE = datetime(2030, 1, 1, tzinfo=UTC)


class CountingSigner(MessageSigner):
    """A worker's signer that counts the signatures it verifies."""

    verified = 0

    def verify_bytes(self, signature: str | None, payload: bytes, *, typ: str) -> str | None:
        self.verified += 1
        return super().verify_bytes(signature, payload, typ=typ)


def signer(key: Key) -> CountingSigner:
    return CountingSigner(key, [ORDERS, SHOP, INTRUDER], policy=POLICY)


def token(subject: str) -> str:
    return jwt.encode({"alg": "ES256"}, {"sub": subject}, ISSUER, algorithms=["ES256"])


def wire(message: PaigeantMessage) -> PaigeantMessage:
    """`message` as the next worker reads it off the broker."""
    return PaigeantMessage.from_json(message.to_json())


def started() -> PaigeantMessage:
    """The first message of a workflow: reserve, charge (mandatory, with arguments), ship; signed plan and all."""
    specs = [
        ActivitySpec(name="reserve"),
        ActivitySpec(name="charge", mandatory=True, arguments={"amount": 10}),
        ActivitySpec(name="ship"),
    ]
    message = PaigeantMessage.new(specs, {"order": 42}, obo_token=token("alice"), expires_at=DEADLINE)
    message.plan = new_plan(message, signer(ORDERS))
    return message


def hops(*, revised: bool = False) -> list[PaigeantMessage]:
    """The hops of a workflow after its first step, as workers read them; `revised`, `reserve` added `gift-wrap`
    before `ship`."""
    message = started()
    if revised:
        itinerary = message.routing_slip.itinerary
        remaining = [*itinerary[1:-1], ActivitySpec(name="gift-wrap"), *itinerary[-1:]]
        revision = Revision(step=0, activity="reserve", action="add", reason="a gift", remaining=remaining)
        revise_route(message, [revision], signer(SHOP))
    later: list[PaigeantMessage] = []
    while len(message.routing_slip.itinerary) > 1:
        message.routing_slip.mark_complete(message.routing_slip.current or "")
        later.append(wire(message.next_hop()))
    return later


def at_charge(*, revised: bool = False) -> PaigeantMessage:
    """The hop to `charge`, after `reserve` ran."""
    return hops(revised=revised)[0]


def at_ship_revised_by_charge() -> PaigeantMessage:
    """The hop to `ship` after `charge` added `gift-wrap` behind it (a revision at step 1)."""
    message = started()
    message.routing_slip.mark_complete("reserve")
    remaining = [ActivitySpec(name="gift-wrap"), ActivitySpec(name="ship")]
    revise_route(message, [Revision(step=1, activity="charge", action="add", remaining=remaining)], signer(SHOP))
    message.routing_slip.mark_complete("charge")
    return wire(message.next_hop())


def refusal(check: PlanCheck, hop: PaigeantMessage, security: MessageSigner) -> tuple[str, str]:
    with pytest.raises(SecurityError) as caught:
        check.check(hop, "intruder-1", None, security)
    return caught.value.code, str(caught.value)


# -- what a later hop costs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("revised", [False, True])
def test_a_workflows_later_hops_verify_no_signature_again(revised: bool) -> None:
    worker, check = signer(SHOP), PlanCheck()
    first, *later = hops(revised=revised)
    check.check(first, "shop-1", None, worker)
    assert worker.verified == (2 if revised else 1)  # the plan, and its revision
    for hop in [*later, *later, wire(first)]:
        check.check(hop, "shop-1", None, worker)
    assert worker.verified == (2 if revised else 1)


def test_another_workflow_has_its_own_plan_verified() -> None:
    worker, check = signer(SHOP), PlanCheck()
    check.check(at_charge(), "shop-1", None, worker)
    check.check(at_charge(), "shop-1", None, worker)
    assert worker.verified == 2


def test_what_is_remembered_is_bounded() -> None:
    worker = signer(SHOP)
    hops = [at_charge() for _ in range(3)]
    check = PlanCheck(remembered=2)
    for hop in [*hops, hops[0]]:
        check.check(hop, "shop-1", None, worker)
    assert worker.verified == 4  # the first plan was forgotten for the third, and verified again

    roomy = PlanCheck(remembered=3)
    worker.verified = 0
    for hop in [*hops, hops[0]]:
        roomy.check(hop, "shop-1", None, worker)
    assert worker.verified == 3


def test_the_memory_forgets_the_entry_used_longest_ago() -> None:
    memory: Lru[str, int] = Lru(2)
    memory.put("a", 1)
    memory.put("b", 2)
    assert memory.get("a") == 1  # now used after "b"
    memory.put("c", 3)
    assert (memory.get("a"), memory.get("b"), memory.get("c"), len(memory)) == (1, None, 3, 2)


# -- what a remembered plan still refuses ----------------------------------------------------------------------


def changed_arguments(hop: PaigeantMessage) -> None:
    hop.routing_slip.itinerary[0] = hop.routing_slip.itinerary[0].model_copy(update={"arguments": {"amount": 1e6}})


def raised_retries(hop: PaigeantMessage) -> None:
    hop.routing_slip.itinerary[0] = hop.routing_slip.itinerary[0].model_copy(
        update={"retry": RetryPolicy(max_attempts=1000)}
    )


def added_step(hop: PaigeantMessage) -> None:
    hop.routing_slip.itinerary.append(ActivitySpec(name="refund"))


def dropped_mandatory_step(hop: PaigeantMessage) -> None:
    del hop.routing_slip.itinerary[0]


def swapped_token(hop: PaigeantMessage) -> None:
    hop.security.obo_token = token("mallory")


def moved_deadline(hop: PaigeantMessage) -> None:
    hop.expires_at = DEADLINE + timedelta(days=365)


def replaced_step_digest(hop: PaigeantMessage) -> None:
    assert hop.plan is not None
    steps = list(hop.plan.steps)
    steps[2] = steps[2].model_copy(update={"digest": spec_digest(ActivitySpec(name="ship", arguments={"to": "x"}))})
    hop.plan = hop.plan.model_copy(update={"steps": steps})


def raised_limits(hop: PaigeantMessage) -> None:
    assert hop.plan is not None
    hop.plan = hop.plan.model_copy(update={"limits": RevisionLimits(max_revisions=1000, max_added_steps=10_000)})


def plan_of_another_workflow(hop: PaigeantMessage) -> None:
    hop.plan = at_charge().plan


def plan_signed_by_a_key_without_start(hop: PaigeantMessage) -> None:
    assert hop.plan is not None
    plan = hop.plan.model_copy(update={"signature": None})
    hop.plan = plan.model_copy(update={"signature": signer(INTRUDER).sign_bytes(_plan_bytes(plan), typ=PLAN_TYPE)})


def log_revision(hop: PaigeantMessage, revision: Revision, key: Key) -> None:
    """Make `revision`, signed with `key`, `hop`'s only one."""
    signature = signer(key).sign_bytes(_revision_bytes(hop.correlation_id, revision), typ=REVISION_TYPE)
    hop.routing_slip.revisions[:] = [revision.model_copy(update={"signature": signature})]


def revision_by_a_key_without_revise(hop: PaigeantMessage) -> None:
    remaining = [*hop.routing_slip.itinerary[1:], ActivitySpec(name="refund")]
    log_revision(hop, Revision(step=0, activity="reserve", action="add", remaining=remaining), INTRUDER)
    hop.routing_slip.itinerary[1:] = remaining


def signed_revision_removing_charge(hop: PaigeantMessage) -> None:
    remaining = [ActivitySpec(name="ship")]
    log_revision(hop, Revision(step=0, activity="reserve", action="remove", remaining=remaining), SHOP)
    hop.routing_slip.itinerary[:], hop.routing_slip.current = remaining, "ship"


TAMPERED: dict[str, tuple[Callable[[PaigeantMessage], None], str]] = {
    "changed arguments": (changed_arguments, "plan"),
    "raised retries": (raised_retries, "plan"),
    "added step": (added_step, "plan"),
    "dropped mandatory step": (dropped_mandatory_step, "plan"),
    "swapped token": (swapped_token, "token_subject"),
    "moved deadline": (moved_deadline, "plan"),
    "replaced step digest": (replaced_step_digest, "plan"),
    "raised limits": (raised_limits, "plan"),
    "plan of another workflow": (plan_of_another_workflow, "plan"),
    "plan signed by a key without start": (plan_signed_by_a_key_without_start, "plan"),
    "a signed revision removing a mandatory step": (signed_revision_removing_charge, "revision"),
}


@pytest.mark.parametrize("revised", [False, True])
@pytest.mark.parametrize("name", list(TAMPERED))
def test_a_remembered_plan_refuses_a_tampered_hop_as_a_fresh_check_does(name: str, revised: bool) -> None:
    tamper, code = TAMPERED[name]
    worker, check = signer(SHOP), PlanCheck()
    genuine = at_charge(revised=revised)
    check.check(genuine, "shop-1", None, worker)
    check.check(at_charge(revised=revised), "shop-1", None, worker)  # another workflow's, remembered too
    tamper(genuine)
    warm = refusal(check, genuine, worker)
    assert warm == refusal(PlanCheck(), genuine, worker)
    assert warm[0] == code
    assert refusal(check, genuine, worker) == warm  # refused again: a refusal is not remembered as anything


def unsigned_revision_change(hop: PaigeantMessage) -> None:
    revision = hop.routing_slip.revisions[0]
    remaining = [*revision.remaining, ActivitySpec(name="refund")]
    hop.routing_slip.revisions[0] = revision.model_copy(update={"remaining": remaining})
    hop.routing_slip.itinerary.append(ActivitySpec(name="refund"))


def cleared_revision_log(hop: PaigeantMessage) -> None:
    hop.routing_slip.revisions.clear()


REVISION_TAMPERED: dict[str, tuple[Callable[[PaigeantMessage], None], str]] = {
    "changed after it was signed": (unsigned_revision_change, "revision"),
    "signed by a key without revise": (revision_by_a_key_without_revise, "revision"),
    "cleared revision log": (cleared_revision_log, "plan"),
}


@pytest.mark.parametrize("name", list(REVISION_TAMPERED))
def test_remembered_revisions_refuse_a_tampered_log_as_a_fresh_check_does(name: str) -> None:
    tamper, code = REVISION_TAMPERED[name]
    worker, check = signer(SHOP), PlanCheck()
    genuine = at_charge(revised=True)
    check.check(genuine, "shop-1", None, worker)
    tamper(genuine)
    warm = refusal(check, genuine, worker)
    assert warm == refusal(PlanCheck(), genuine, worker)
    assert warm[0] == code


def test_a_remembered_revision_is_refused_on_a_hop_whose_log_has_not_reached_its_step() -> None:
    worker, check = signer(SHOP), PlanCheck()
    genuine = at_ship_revised_by_charge()
    check.check(genuine, "shop-1", None, worker)
    genuine.routing_slip.completed.clear()  # the log of a hop before `charge` ran, with the revision it made
    warm = refusal(check, genuine, worker)
    assert warm == refusal(PlanCheck(), genuine, worker)
    assert warm == ("revision", "revision: revision 1 says step 1 'charge' made it, which it cannot have")


# -- the bytes every worker hashes and verifies ----------------------------------------------------------------


def test_a_plan_is_signed_over_its_json_without_its_signature() -> None:
    plan = started().plan
    assert plan is not None
    budget = Budget(tokens=10, cost=2.5, prices={"test": Price(input_per_mtok=1, output_per_mtok=2)})
    rich = Plan.model_validate_json(
        plan.model_copy(update={"budget": budget, "owner": "alice"}).model_dump_json()[:-1] + ',"later":[1,2.0,true]}',
        context={"paigeant_wire": True},
    )
    for each in (plan, rich):
        assert _plan_bytes(each) == each.model_dump_json(exclude={"signature"}).encode()


@pytest.mark.parametrize(
    "spec",
    [
        ActivitySpec(name="ship"),
        ActivitySpec(name="charge", mandatory=True, arguments={"amount": 10.5, "to": ["a", None]}, timeout=3),
        ActivitySpec(name="pay", fallbacks=("pay-later",), compensate="refund", retry=RetryPolicy(max_attempts=2)),
        ActivitySpec(name="both", branches=(ActivitySpec(name="a"), ActivitySpec(name="b", key="b2", mandatory=True))),
        ActivitySpec.model_validate_json('{"name":"later","unknown":{"x":1.0}}', context={"paigeant_wire": True}),
    ],
)
def test_a_specs_digest_is_the_blake2b_of_its_json(spec: ActivitySpec) -> None:
    digest = hashlib.blake2b(spec.model_dump_json().encode(), digest_size=16).digest()
    assert spec_digest(spec) == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
