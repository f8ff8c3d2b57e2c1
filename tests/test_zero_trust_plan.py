"""Zero trust beyond the hop: the signed plan, signed revisions, mandatory steps, revision bounds, token binding.

Each attack is made as an attacker holding a trusted key makes it: it takes a hop off the broker, changes it,
signs it with that key and publishes it. Every worker refuses it with its own reason, and the valid workflow beside
it completes. On the in-memory transport, Redis and RabbitMQ alike.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
from joserfc import jws, jwt
from joserfc.jwk import Key
from pydantic_ai import Agent
from pydantic_ai.messages import ModelResponse, TextPart

from paigeant_ai import (
    ActivityCatalog,
    ActivityContext,
    ActivitySpec,
    AgentActivity,
    FunctionActivity,
    InMemoryTransport,
    ItineraryRevision,
    PaigeantMessage,
    PaigeantToolset,
    RetryPolicy,
    Revision,
    RevisionLimits,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
)
from paigeant_ai._plan import REVISION_TYPE, PlanCheck, check_route, new_plan, revise_route, token_subject
from paigeant_ai._sealing import seal
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.exceptions import SecurityError
from paigeant_ai.security import MessageSigner, TokenValidator, TrustPolicy, generate_key
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport

from .scripted import Script, call, tool_returns

ISSUER = "https://id.example.com"
AUDIENCE = "paigeant-workers"


@dataclass(frozen=True)
class Keys:
    orders: Key = field(default_factory=lambda: generate_key("orders-1"))
    """The dispatcher's key: it may start workflows."""
    shop: Key = field(default_factory=lambda: generate_key("shop-1"))
    """The workers' key: it may revise routes."""
    intruder: Key = field(default_factory=lambda: generate_key("intruder-1"))
    """A trusted service's key that may send hops, and nothing else."""
    issuer: Key = field(default_factory=lambda: generate_key("idp-1", "ES256"))


KEYS = Keys()
POLICY = TrustPolicy.load(
    {
        "keys": {
            "orders-1": {"may": ["start", "cancel"], "send_to": "*"},
            "shop-1": {"may": ["revise"], "send_to": "*"},
            "intruder-1": {"send_to": "*"},
        }
    }
)
MAX_BYTES = 1024 * 1024


def token(subject: str = "alice") -> str:
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "scope": "orders:write", "iat": now, "exp": now + 600}
    return jwt.encode({"alg": "ES256", "kid": KEYS.issuer.kid}, claims, KEYS.issuer, algorithms=["ES256"])


def signer(key: Key, transport: Transport | None = None, *, check_tokens: bool = True) -> MessageSigner:
    tokens = TokenValidator({"keys": [KEYS.issuer.as_dict(private=False)]}, issuer=ISSUER, audience=AUDIENCE)
    return MessageSigner(
        key,
        [KEYS.orders, KEYS.shop, KEYS.intruder],
        tokens=tokens if check_tokens else None,
        policy=POLICY,
        replay_cache=RedisReplayCache(transport) if isinstance(transport, RedisTransport) else None,
    )


# -- the shop: reserve, charge (mandatory), ship; a step that revises; what the attacker does -------------------


@dataclass
class Shop:
    transport: Transport
    executed: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    events: list[WorkflowEvent] = field(default_factory=list[WorkflowEvent])

    def __post_init__(self) -> None:
        self.dispatcher = WorkflowDispatcher(self.transport, security=signer(KEYS.orders))
        self.security = signer(KEYS.shop, self.transport)

    def step(self, name: str) -> FunctionActivity:
        async def run(ctx: ActivityContext) -> dict[str, Any]:
            self.executed.append((name, ctx.correlation_id))
            if name == "reserve" and ctx.payload.get("gift"):  # a step that revises the route: add gift-wrap
                remaining = [
                    *ctx.routing_slip.itinerary[1:-1],
                    ActivitySpec(name="gift-wrap"),
                    *ctx.routing_slip.itinerary[-1:],
                ]
                ctx.revisions.append(
                    Revision(step=ctx.step, activity=name, action="add", reason="a gift", remaining=remaining)
                )
            return {name: True}

        return FunctionActivity(run, name=name)

    def worker(self, *names: str, extra: Sequence[Any] = ()) -> Worker:
        steps = [self.step(name) for name in names or ("reserve", "charge", "ship", "gift-wrap", "refund")]
        return Worker(self.transport, [*steps, *extra], security=self.security, on_event=self.events.append)

    async def start(self, *, gift: bool = False, subject: str = "alice") -> str:
        steps = ["reserve", ActivitySpec(name="charge", mandatory=True), "ship"]
        return await self.dispatcher.dispatch_workflow(steps, {"order": 42, "gift": gift}, obo_token=token(subject))

    async def capture(self, correlation_id: str, address: str = "charge") -> PaigeantMessage:
        """Take `correlation_id`'s hop off the queue of `address`; any other hop there goes back as it was."""
        others: list[bytes] = []
        captured: PaigeantMessage | None = None
        async with await self.transport.consume(address, prefetch=10) as consumer:
            while captured is None:
                delivery = await asyncio.wait_for(anext(consumer), 10)
                await self.transport.ack(delivery)
                message = PaigeantMessage.from_json(delivery.body)
                if message.correlation_id == correlation_id:
                    captured = message
                else:
                    others.append(delivery.body)
        for body in others:
            await self.transport.publish(address, body)
        return captured

    async def forge(self, message: PaigeantMessage, key: Key = KEYS.intruder) -> None:
        """Sign `message` with `key` and publish it to its current step, as an attacker holding that key does."""
        body = seal(message, signer(key), max_bytes=MAX_BYTES, trace=False)
        await self.transport.publish(message.routing_slip.current or "", body)

    def ran(self, correlation_id: str) -> list[str]:
        return [name for name, cid in self.executed if cid == correlation_id]

    def refused(self, code: str) -> int:
        return self.security.refused[code]


async def dead_letters(transport: Transport, expected: int) -> list[str]:
    """The reasons of the dead letters, once `expected` of them arrived (and whether one more comes)."""
    reasons: list[str] = []
    async with await transport.consume(DEAD_LETTER, prefetch=100) as consumer:
        deadline = asyncio.get_running_loop().time() + 10
        while len(reasons) < expected and asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(TimeoutError):
                letter = await asyncio.wait_for(anext(consumer), 0.5)
                reasons.append(letter.headers.get(REASON_HEADER, ""))
                await transport.ack(letter)
        with contextlib.suppress(TimeoutError):
            letter = await asyncio.wait_for(anext(consumer), 0.3)
            reasons.append(letter.headers.get(REASON_HEADER, ""))
    return reasons


async def attack_at_charge(shop: Shop, **start: Any) -> tuple[str, str, PaigeantMessage]:
    """Start a workflow to attack and a valid one; run their first step; capture the attacked one's next hop."""
    valid, target = await shop.start(**start), await shop.start(**start)
    await shop.worker("reserve").run(burst=True)
    return valid, target, await shop.capture(target)


async def attack_two_at_charge(shop: Shop) -> tuple[str, list[PaigeantMessage]]:
    """`attack_at_charge` with two workflows to attack."""
    valid, targets = await shop.start(), [await shop.start(), await shop.start()]
    await shop.worker("reserve").run(burst=True)
    return valid, [await shop.capture(target) for target in targets]


# -- the attacks -----------------------------------------------------------------------------------------------


async def test_attack_workflow_started_by_a_key_without_start(transport: Transport) -> None:
    shop = Shop(transport)
    with pytest.raises(UserError, match=r"key 'intruder-1' may not start workflows.*\"may\": \[\"start\"\]"):
        await WorkflowDispatcher(transport, security=signer(KEYS.intruder)).dispatch_workflow(["refund"])

    # Its own signer, with an open policy, signs the plan as a dispatcher would; a hop with no plan at all, too.
    own = MessageSigner(KEYS.intruder)
    refund = PaigeantMessage.new([ActivitySpec(name="refund")], {"to": "mallory"}, obo_token=token())
    refund.plan = new_plan(refund, own)
    await shop.forge(refund)
    planless = PaigeantMessage.new([ActivitySpec(name="refund")], {"to": "mallory"}, obo_token=token())
    await shop.forge(planless)
    valid = await shop.start()
    await shop.worker().run(burst=True)

    reasons = await dead_letters(transport, 2)
    assert sorted(reasons) == [
        "security check failed: plan: key 'intruder-1' signed it, and the trust policy does not allow it to "
        "'start' workflows",
        "security check failed: plan: the hop carries no plan; a workflow's first message carries the one its "
        "dispatcher signed",
    ]
    assert shop.ran(refund.correlation_id) == shop.ran(planless.correlation_id) == []
    assert shop.ran(valid) == ["reserve", "charge", "ship"]
    assert shop.refused("plan") == 2


async def test_attack_itinerary_rewritten_by_a_trusted_but_unauthorized_key(transport: Transport) -> None:
    shop = Shop(transport)
    valid, target, hop = await attack_at_charge(shop)
    hop.routing_slip.itinerary[1:] = [ActivitySpec(name="refund", arguments={"to": "mallory"})]
    await shop.forge(hop)
    skipped = hop.model_copy(deep=True)  # and one that ships without the charge
    skipped.routing_slip.itinerary = [ActivitySpec(name="ship")]
    skipped.routing_slip.current = "ship"
    await shop.forge(skipped)
    await shop.worker().run(burst=True)

    reasons = await dead_letters(transport, 2)
    assert sorted(reasons) == [
        "security check failed: plan: the remaining route [charge, refund] is not the planned [charge, ship]: it "
        "was changed without a logged revision",
        "security check failed: plan: the remaining route [ship] is not the planned [charge, ship]: it was changed "
        "without a logged revision",
    ]
    assert shop.ran(target) == ["reserve"]
    assert shop.ran(valid) == ["reserve", "charge", "ship"]


async def test_attack_cleared_revision_log(transport: Transport) -> None:
    shop = Shop(transport)
    valid, target, hop = await attack_at_charge(shop, gift=True)
    assert [revision.activity for revision in hop.routing_slip.revisions] == ["reserve"]
    assert hop.routing_slip.revisions[0].signature is not None
    hop.routing_slip.revisions.clear()  # the route stays as revised; the revision budget would start again
    await shop.forge(hop)
    await shop.worker().run(burst=True)

    assert await dead_letters(transport, 1) == [
        "security check failed: plan: the remaining route [charge, gift-wrap, ship] is not the planned "
        "[charge, ship]: it was changed without a logged revision"
    ]
    assert shop.ran(target) == ["reserve"]
    assert shop.ran(valid) == ["reserve", "charge", "gift-wrap", "ship"]  # the valid revised workflow completes


async def test_attack_retries_raised_to_1000_and_timeout_to_1e9(transport: Transport) -> None:
    shop = Shop(transport)
    valid, target, hop = await attack_at_charge(shop)
    charge = hop.routing_slip.itinerary[0]
    hop.routing_slip.itinerary[0] = charge.model_copy(update={"retry": RetryPolicy(max_attempts=1000), "timeout": 1e9})
    await shop.forge(hop)
    await shop.worker().run(burst=True)

    assert await dead_letters(transport, 1) == [
        "security check failed: plan: step 'charge' is not as planned: its arguments, retry, timeout or scopes were "
        "changed without a revision"
    ]
    assert shop.ran(target) == ["reserve"]
    assert shop.ran(valid) == ["reserve", "charge", "ship"]


@pytest.mark.parametrize("check_tokens", [True, False], ids=["validated", "not-validated"])
async def test_attack_swapped_obo_token(transport: Transport, check_tokens: bool) -> None:
    shop = Shop(transport)
    shop.security = signer(KEYS.shop, transport, check_tokens=check_tokens)
    valid, target, hop = await attack_at_charge(shop)
    refreshed = hop.model_copy(deep=True)
    hop.security.obo_token = token("bob")  # another user's valid token
    await shop.forge(hop)
    await shop.worker("charge", "ship").run(burst=True)
    assert await dead_letters(transport, 1) == [
        "security check failed: token_subject: the on-behalf-of token belongs to 'bob', but the workflow was "
        "started for 'alice'"
    ]
    assert shop.ran(target) == ["reserve"]
    assert shop.refused("token_subject") == 1

    refreshed.security.obo_token = token("alice")  # a fresh token of the same user, as a resume may carry
    await shop.forge(refreshed)
    await shop.worker().run(burst=True)
    assert shop.ran(target) == ["reserve", "charge", "ship"]
    assert shop.ran(valid) == ["reserve", "charge", "ship"]


def forged_revision(hop: PaigeantMessage, remaining: list[ActivitySpec], key: Key = KEYS.shop) -> None:
    """Log in `hop` a revision by its first step, signed with `key`, that leaves `remaining` after that step."""
    revision = Revision(step=0, activity="reserve", action="replace", reason="forged", remaining=remaining)
    slip = hop.routing_slip
    payload = b"%s\n%s" % (hop.correlation_id.encode(), revision.model_dump_json(exclude={"signature"}).encode())
    revision.signature = signer(key).sign_bytes(payload, typ=REVISION_TYPE)
    slip.revisions.append(revision)
    slip.itinerary = list(remaining)
    slip.current = remaining[0].name if remaining else None


async def test_attack_300_steps_in_one_revision_by_a_forged_hop(transport: Transport) -> None:
    shop = Shop(transport)
    valid, target, hop = await attack_at_charge(shop)
    forged_revision(hop, [*hop.routing_slip.itinerary, *[ActivitySpec(name="gift-wrap")] * 300])
    await shop.forge(hop, KEYS.shop)  # the key of a worker that may revise
    await shop.worker().run(burst=True)

    assert await dead_letters(transport, 1) == [
        "security check failed: revision: revision 1 by 'reserve' adds 300 steps, the plan allows 5 per revision"
    ]
    assert shop.ran(target) == ["reserve"]
    assert shop.ran(valid) == ["reserve", "charge", "ship"]


async def test_attack_mandatory_step_removed_by_a_forged_hop(transport: Transport) -> None:
    shop = Shop(transport)
    valid, (hop, other) = await attack_two_at_charge(shop)
    forged_revision(hop, [ActivitySpec(name="ship")])  # ship unpaid, with the key of a worker that may revise
    await shop.forge(hop, KEYS.shop)
    forged_revision(other, [ActivitySpec(name="ship")], KEYS.intruder)  # with a key that may not revise
    await shop.forge(other)
    await shop.worker().run(burst=True)

    reasons = await dead_letters(transport, 2)
    assert sorted(reasons) == [
        "security check failed: revision: revision 1 by 'reserve' removes mandatory step 'charge'",
        "security check failed: revision: revision 1 was signed by key 'intruder-1', which may not 'revise' routes",
    ]
    assert shop.ran(hop.correlation_id) == shop.ran(other.correlation_id) == ["reserve"]
    assert shop.ran(valid) == ["reserve", "charge", "ship"]


# -- the revising agent's tools refuse what the plan would -----------------------------------------------------


def revising_agent(script: Script) -> AgentActivity[None, str]:
    catalog = ActivityCatalog()
    for name in ("charge", "ship", "gift-wrap"):
        catalog.add(ActivitySpec(name=name))
    agent = Agent(script.model, name="reserve")
    return AgentActivity(agent, toolsets=[ItineraryRevision(catalog)])


async def run_revising(shop: Shop, *turns: ModelResponse) -> tuple[Script, str]:
    script = Script([*turns, ModelResponse(parts=[TextPart("reserved")])])
    cid = await shop.start()
    await shop.worker("charge", "ship", "gift-wrap", extra=[revising_agent(script)]).run(burst=True)
    return script, cid


async def test_attack_300_steps_in_one_revision_refused_by_the_tool(transport: Transport) -> None:
    shop = Shop(transport)
    add = call("add_steps", {"activities": ["gift-wrap"] * 300, "reason": "more is better"})
    script, cid = await run_revising(shop, add)
    assert [part.content for part in tool_returns(script.requests[-1])] == [
        "The route was not changed: one revision may add at most 5 step(s), and this one adds 300. Add only the "
        "steps the task needs."
    ]
    assert shop.ran(cid) == ["charge", "ship"]


async def test_attack_mandatory_step_removed_by_the_tool(transport: Transport) -> None:
    shop = Shop(transport)
    remove = call("remove_steps", {"activities": ["charge"], "reason": "ship faster"})
    add = call("add_steps", {"activities": ["gift-wrap"], "reason": "a gift", "before": "ship"})
    script, cid = await run_revising(shop, remove, add)
    assert [part.content for part in tool_returns(script.requests[-1])] == [
        "The route was not changed: 'charge' is a mandatory step of this workflow, which no revision may remove. "
        "Keep it on the route.",
        ["charge", "gift-wrap", "ship"],
    ]
    assert "Mandatory steps, which no revision may remove: charge." in str(script.infos[0].instructions)
    assert shop.ran(cid) == ["charge", "gift-wrap", "ship"]  # the valid revision signed and followed


async def test_the_tool_holds_to_the_stricter_of_its_limits_and_the_plans(transport: Transport) -> None:
    shop = Shop(transport)
    shop.dispatcher.revision_limits = RevisionLimits(max_added_steps=1)
    add = call("add_steps", {"activities": ["gift-wrap", "gift-wrap"], "reason": "two gifts"})
    script, cid = await run_revising(shop, add)
    assert [part.content for part in tool_returns(script.requests[-1])] == [
        "The route was not changed: this workflow may add 1 more step(s) in all (of 1), and this revision adds 2."
    ]
    assert shop.ran(cid) == ["charge", "ship"]


# -- the check itself ------------------------------------------------------------------------------------------


def test_a_worker_without_revise_cannot_sign_a_revision_and_nothing_changes() -> None:
    message = PaigeantMessage.new([ActivitySpec(name="reserve"), ActivitySpec(name="ship")], obo_token=token())
    message.plan = new_plan(message, signer(KEYS.orders))
    revision = Revision(step=0, activity="reserve", action="remove", remaining=[])
    with pytest.raises(SecurityError, match="key 'intruder-1' may not revise a workflow's route") as caught:
        revise_route(message, [revision], signer(KEYS.intruder))
    assert caught.value.code == "revision"
    assert [spec.name for spec in message.routing_slip.itinerary] == ["reserve", "ship"]
    revise_route(message, [revision], signer(KEYS.shop))
    assert [spec.name for spec in message.routing_slip.itinerary] == ["reserve"]
    assert check_route(message.plan, message.routing_slip) == 0


async def test_unsigned_mode_has_no_plan_to_check() -> None:
    # Unsigned, anyone who can publish can forge a plan as easily as a route: there is nothing to check against.
    unsigned = MessageSigner(unsigned=True)
    async with InMemoryTransport() as transport:
        messages: list[PaigeantMessage] = []
        dispatcher = WorkflowDispatcher(transport, security=unsigned)
        dispatcher.encode = lambda message: (messages.append(message), seal(message, unsigned, max_bytes=1 << 20))[1]  # pyright: ignore[reportAttributeAccessIssue]
        await dispatcher.dispatch_workflow(["reserve", "ship"])
    assert messages[0].plan is None
    message = PaigeantMessage.new([ActivitySpec(name="reserve"), ActivitySpec(name="ship")])
    message.plan = new_plan(message, unsigned)
    message.routing_slip.itinerary.append(ActivitySpec(name="refund"))
    PlanCheck().check(message, None, None, unsigned)  # not checked: nothing in it is signed


def test_the_initiator_is_the_tokens_subject() -> None:
    assert token_subject(token("carol")) == "carol"
    assert token_subject("opaque-token") is None
    assert token_subject(None) is None
    assert token_subject("a.!!!.c") is None


async def test_the_planner_marks_mandatory_steps_in_the_signed_plan() -> None:
    async with InMemoryTransport() as transport:
        shop = Shop(transport)
        catalog = ActivityCatalog()
        for name in ("reserve", "charge", "ship"):
            catalog.add(ActivitySpec(name=name))
        toolset = PaigeantToolset(catalog, dispatcher=shop.dispatcher, require_workers=False, mandatory={"charge"})
        plan = {"activities": ["reserve", "charge", "ship"], "variables": {}, "mandatory": ["ship"]}
        wrong = {**plan, "mandatory": ["refund"]}
        done = ModelResponse(parts=[TextPart("dispatched")])
        script = Script([call("dispatch_workflow", wrong), call("dispatch_workflow", plan), done])
        await Agent(script.model, toolsets=[toolset]).run("ship order 42")

        first = PaigeantMessage.from_json((await anext(await transport.consume("reserve"))).body)
        assert first.plan is not None
        assert [(step.name, step.mandatory) for step in first.plan.steps] == [
            ("reserve", False),
            ("charge", True),
            ("ship", True),
        ]
        assert [part.content for part in tool_returns(script.requests[1])] == [
            "The plan was not dispatched: mandatory step 'refund' is not an activity of the plan. Fix the plan and "
            "call dispatch_workflow again."
        ]


@pytest.mark.parametrize("algorithm", ["Ed25519", "ES256"])
def test_a_signature_is_joserfcs_detached_compact_jws(algorithm: Literal["Ed25519", "ES256"]) -> None:
    key = generate_key("svc-1", algorithm)
    own = MessageSigner(key)
    payload = b'{"a":1}'
    signature = own.sign_bytes(payload, typ="paigeant+jws")
    assert signature is not None
    assert own.verify_bytes(signature, payload, typ="paigeant+jws") == "svc-1"
    header = {"alg": algorithm, "kid": "svc-1", "typ": "paigeant+jws"}
    made_by_joserfc = jws.detach_content(jws.serialize_compact(header, payload, key, algorithms=[algorithm]))
    assert signature.split(".")[0] == made_by_joserfc.split(".")[0]
    if algorithm == "Ed25519":  # deterministic: the very same signature
        assert signature == made_by_joserfc
    with pytest.raises(SecurityError, match="signature type"):
        own.verify_bytes(own.sign_bytes(payload, typ=REVISION_TYPE), payload, typ="paigeant+jws")
