"""Zero-trust messaging: a forged, altered, replayed or unauthorised message never runs; the valid workflow does.

The attack matrix runs on the in-memory transport, Redis and RabbitMQ alike.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from joserfc import jws, jwt
from joserfc.jwk import ECKey, Key, OctKey

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    InMemoryTransport,
    PaigeantMessage,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
    get_transport,
)
from paigeant_ai._plan import new_plan
from paigeant_ai._sealing import unsigned_body
from paigeant_ai.contracts import DEAD_LETTER
from paigeant_ai.security import (
    SIGNATURE_TYPE,
    MessageSigner,
    TokenValidator,
    generate_key,
)
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER, SOURCE_HEADER, Delivery
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport

from .brokers import clean
from .conftest import REDIS_URL, require_redis

ISSUER = "https://id.example.com"
AUDIENCE = "paigeant-workers"
SCOPE = "payments:write"


# -- keys and tokens -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    orders: Key = field(default_factory=lambda: generate_key("orders-1"))
    """The dispatching service's key."""
    billing: Key = field(default_factory=lambda: generate_key("billing-1"))
    """The worker's own key."""
    mallory: Key = field(default_factory=lambda: generate_key("mallory-1"))
    """A key nobody trusts."""
    issuer: Key = field(default_factory=lambda: generate_key("idp-1", "ES256"))
    """The identity provider's key, which signs users' tokens."""
    rogue_issuer: Key = field(default_factory=lambda: generate_key("idp-rogue", "ES256"))


KEYS = Keys()


def user_token(
    *,
    key: Key = KEYS.issuer,
    expires_in: float = 600,
    audience: str = AUDIENCE,
    issuer: str = ISSUER,
    scope: str = f"orders:read {SCOPE}",
    subject: str = "alice",
) -> str:
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": issuer, "aud": audience, "sub": subject, "scope": scope, "iat": now, "exp": now + expires_in}
    return jwt.encode({"alg": "ES256", "kid": key.kid}, claims, key, algorithms=["ES256"])


def orders_signer() -> MessageSigner:
    return MessageSigner(KEYS.orders)


def worker_signer(transport: Transport) -> MessageSigner:
    issuer_jwks = {"keys": [KEYS.issuer.as_dict(private=False)]}
    return MessageSigner(
        KEYS.billing,
        [KEYS.orders],
        tokens=TokenValidator(issuer_jwks, issuer=ISSUER, audience=AUDIENCE),
        replay_cache=RedisReplayCache(transport) if isinstance(transport, RedisTransport) else None,
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_signature(message: PaigeantMessage, header: dict[str, Any], key: Key, algorithm: str) -> str:
    compact = jws.serialize_compact(header, unsigned_body(message), key, algorithms=[algorithm])
    return jws.detach_content(compact)


# -- brokers ---------------------------------------------------------------------------------------------------


async def dead_letters(transport: Transport, expected: int) -> list[Delivery]:
    """The dead letters, once `expected` of them arrived (and, briefly, whether more come)."""
    letters: list[Delivery] = []
    async with await transport.consume(DEAD_LETTER, prefetch=100) as consumer:
        deadline = asyncio.get_running_loop().time() + 10
        while len(letters) < expected and asyncio.get_running_loop().time() < deadline:
            try:
                letters.append(await asyncio.wait_for(anext(consumer), 0.5))
            except TimeoutError:
                continue
        with contextlib.suppress(TimeoutError):  # one more would be a letter too many
            letters.append(await asyncio.wait_for(anext(consumer), 0.3))
        for letter in letters:
            await transport.ack(letter)
    return letters


# -- the scene: a shop's workflow, one worker, and what an attacker sends -------------------------------------


@dataclass
class Scene:
    transport: Transport
    executed: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    claims_seen: list[Any] = field(default_factory=list[Any])
    events: list[WorkflowEvent] = field(default_factory=list[WorkflowEvent])

    def __post_init__(self) -> None:
        @activity
        async def reserve(ctx: ActivityContext) -> dict[str, bool]:
            self.executed.append(("reserve", ctx.correlation_id))
            return {"reserved": True}

        @activity(name="charge", required_scopes=[SCOPE])
        async def charge(ctx: ActivityContext) -> dict[str, Any]:
            self.executed.append(("charge", ctx.correlation_id))
            self.claims_seen.append(ctx.obo_claims)
            return {"charged_for": (ctx.obo_claims or {}).get("sub")}

        @activity
        async def ship(ctx: ActivityContext) -> dict[str, bool]:
            self.executed.append(("ship", ctx.correlation_id))
            return {"shipped": True}

        self.reserve, self.charge, self.ship = reserve, charge, ship
        self.dispatcher = WorkflowDispatcher(self.transport, security=orders_signer())
        self.signer = worker_signer(self.transport)
        self.worker = Worker(self.transport, [reserve, charge, ship], security=self.signer, on_event=self.events.append)

    def message(
        self, steps: list[str], *, token: str | None = None, expires_at: datetime | None = None
    ) -> PaigeantMessage:
        """A new workflow's first message, signed by the orders service."""
        specs = [ActivitySpec(name=name) for name in steps]
        message = PaigeantMessage.new(specs, {"order": 42, "amount": 10}, obo_token=token, expires_at=expires_at)
        message.plan = new_plan(message, orders_signer())
        orders_signer().sign(message)
        return message

    async def send(self, message: PaigeantMessage | bytes, address: str | None = None) -> bytes:
        body = message if isinstance(message, bytes) else message.to_json()
        target = address or PaigeantMessage.from_json(body).routing_slip.current or ""
        await self.transport.publish(target, body)
        return body

    def ran(self, correlation_id: str) -> list[str]:
        return [name for name, cid in self.executed if cid == correlation_id]


Attack = Callable[[Scene], Awaitable[PaigeantMessage]]


async def tampered_payload(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "charge", "ship"])
    message.payload["amount"] = 1_000_000
    return message


async def step_added(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "ship"])
    message.routing_slip.itinerary.insert(1, ActivitySpec(name="refund", arguments={"to": "mallory"}))
    return message


async def step_skipped(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "charge", "ship"])
    del message.routing_slip.itinerary[1]  # ship without being paid
    return message


async def resigned_by_untrusted_key(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "charge", "ship"])
    message.payload["amount"] = 0
    header = {"alg": "Ed25519", "kid": KEYS.orders.kid, "typ": SIGNATURE_TYPE}  # claims to be orders
    message.security.jws_signature = forged_signature(message, header, KEYS.mallory, "Ed25519")
    return message


async def unknown_kid(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "ship"])
    key = generate_key("orders-0")
    message.security.jws_signature = forged_signature(
        message, {"alg": "Ed25519", "kid": "orders-0", "typ": SIGNATURE_TYPE}, key, "Ed25519"
    )
    return message


async def unsigned(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "ship"])
    message.security.jws_signature = None
    return message


async def alg_none(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "ship"])
    header = json.dumps({"alg": "none", "kid": KEYS.orders.kid, "typ": SIGNATURE_TYPE}).encode()
    message.security.jws_signature = f"{b64(header)}.."
    return message


async def hs256_with_the_public_key(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "ship"])
    public = json.dumps(KEYS.orders.as_dict(private=False)).encode()  # what anyone can read in the JWKS
    secret = OctKey.import_key(public)
    header = {"alg": "HS256", "kid": KEYS.orders.kid, "typ": SIGNATURE_TYPE}
    message.security.jws_signature = forged_signature(message, header, secret, "HS256")
    return message


async def es256_under_an_ed25519_kid(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve", "ship"])
    header = {"alg": "ES256", "kid": KEYS.orders.kid, "typ": SIGNATURE_TYPE}
    message.security.jws_signature = forged_signature(message, header, ECKey.generate_key("P-256"), "ES256")
    return message


async def expired(scene: Scene) -> PaigeantMessage:
    # Past the grace in which a late hop still ends its workflow `expired`: only a replay could be that old.
    return scene.message(["reserve", "ship"], expires_at=datetime.now(UTC) - timedelta(days=1, minutes=1))


async def replayed(scene: Scene) -> PaigeantMessage:
    message = scene.message(["reserve"])
    await scene.send(message)
    await scene.worker.run(burst=True)  # processed once, for real
    assert scene.ran(message.correlation_id) == ["reserve"]
    return PaigeantMessage.from_json(message.to_json())  # ...and captured and sent again


def with_token(**claims: Any) -> Attack:
    async def build(scene: Scene) -> PaigeantMessage:
        return scene.message(["charge", "ship"], token=user_token(**claims))

    return build


async def no_token(scene: Scene) -> PaigeantMessage:
    return scene.message(["charge", "ship"])


def refused(reason: str) -> str:
    return f"security check failed: {reason}"


def faulted(reason: str) -> str:
    return f"step 'charge' failed: {reason}"


BAD_SIGNATURE = refused(
    "bad signature: the message was altered after key 'orders-1' signed it, or that key did not sign it"
)

MATRIX: list[Any] = [
    pytest.param(tampered_payload, BAD_SIGNATURE, "bad_signature", id="tampered-payload"),
    pytest.param(step_added, BAD_SIGNATURE, "bad_signature", id="itinerary-step-added"),
    pytest.param(step_skipped, BAD_SIGNATURE, "bad_signature", id="itinerary-step-skipped"),
    pytest.param(resigned_by_untrusted_key, BAD_SIGNATURE, "bad_signature", id="re-signed-by-untrusted-key"),
    pytest.param(unknown_kid, refused("signed with unknown key id 'orders-0'"), "unknown_kid", id="unknown-kid"),
    pytest.param(unsigned, refused("the message is not signed"), "unsigned", id="unsigned"),
    pytest.param(
        alg_none, refused("algorithm 'none' is not allowed (accepted: Ed25519, ES256)"), "algorithm", id="alg-none"
    ),
    pytest.param(
        hs256_with_the_public_key,
        refused("algorithm 'HS256' is not allowed (accepted: Ed25519, ES256)"),
        "algorithm",
        id="alg-confusion-hs256-public-key",
    ),
    pytest.param(
        es256_under_an_ed25519_kid,
        refused("key 'orders-1' does not sign with ES256"),
        "algorithm",
        id="alg-confusion-key-type",
    ),
    pytest.param(expired, "expired at ", None, id="expired"),
    pytest.param(
        replayed, refused("replayed: message '{message_id}' was already processed"), "replayed", id="replayed"
    ),
    pytest.param(
        with_token(expires_in=-120), faulted("the on-behalf-of token has expired"), "token_expired", id="obo-expired"
    ),
    pytest.param(
        with_token(audience="another-api"),
        faulted(f"the on-behalf-of token is for another audience, not {AUDIENCE!r}"),
        "token_aud",
        id="obo-wrong-audience",
    ),
    pytest.param(
        with_token(scope="orders:read"),
        faulted(f"the on-behalf-of token lacks scope {SCOPE!r}, which step 'charge' requires"),
        "token_scope",
        id="obo-missing-scope",
    ),
    pytest.param(
        with_token(key=KEYS.rogue_issuer),
        faulted("the on-behalf-of token is signed by a key the issuer does not publish"),
        "token_key",
        id="obo-unknown-issuer",
    ),
    pytest.param(
        with_token(issuer="https://evil.example.com"),
        faulted(f"the on-behalf-of token is from another issuer, not {ISSUER!r}"),
        "token_iss",
        id="obo-wrong-issuer",
    ),
    pytest.param(
        no_token,
        faulted(f"step 'charge' requires scope {SCOPE!r} but the workflow carries no on-behalf-of token"),
        "token_missing",
        id="obo-missing",
    ),
]


@pytest.mark.parametrize(("attack", "reason", "code"), MATRIX)
async def test_an_attack_is_refused_with_its_reason_and_the_valid_workflow_completes(
    transport: Transport, attack: Attack, reason: str, code: str | None
) -> None:
    scene = Scene(transport)
    forged = await attack(scene)
    executed_before = list(scene.executed)
    body = await scene.send(forged)
    valid = await scene.dispatcher.dispatch_workflow(
        [scene.reserve, scene.charge, scene.ship], {"order": 7}, obo_token=user_token()
    )
    await scene.worker.run(burst=True)

    [letter] = await dead_letters(transport, expected=1)
    expected = reason.format(message_id=forged.message_id)
    if code is not None and code.startswith("token_"):
        assert letter.headers[REASON_HEADER] == expected
        copy = PaigeantMessage.from_json(letter.body)
        assert copy.correlation_id == forged.correlation_id
        assert [entry.outcome for entry in copy.routing_slip.completed] == ["failed"], "faulted, never retried"
        assert scene.worker.stats.faulted == 1
        assert scene.worker.stats.retried == 0
        assert [e.detail for e in scene.events if e.kind == "faulted"] == [expected]
    else:
        assert letter.headers[REASON_HEADER].startswith(expected)
        assert letter.body == body, "the refused message is kept as it arrived"
        assert scene.worker.stats.rejected == 1
    assert letter.headers[SOURCE_HEADER] == forged.routing_slip.current
    if forged.security.obo_token:
        assert forged.security.obo_token not in letter.headers[REASON_HEADER]
    assert scene.executed[: len(executed_before)] == executed_before
    assert scene.ran(forged.correlation_id) == [name for name, _ in executed_before], "nothing of it executed"
    assert dict(scene.signer.refused) == ({code: 1} if code else {})

    assert scene.ran(valid) == ["reserve", "charge", "ship"], "the valid workflow next to it completed"
    [done] = [e for e in scene.events if e.kind == "completed" and e.correlation_id == valid]
    assert done.payload == {"order": 7, "reserved": True, "charged_for": "alice", "shipped": True}
    assert scene.claims_seen[-1]["sub"] == "alice"
    assert scene.claims_seen[-1]["aud"] == AUDIENCE


async def test_a_workflow_signed_with_the_old_key_completes_after_the_new_key_is_introduced(
    transport: Transport,
) -> None:
    old, new = generate_key("orders-2025"), generate_key("orders-2026")
    scene = Scene(transport)
    await WorkflowDispatcher(transport, security=MessageSigner(old)).dispatch_workflow(["reserve", "ship"])
    # The new key is introduced: the workers trust old and new at once, and the dispatcher signs with the new one.
    rotated = MessageSigner(KEYS.billing, [old, new])
    worker = Worker(transport, [scene.reserve, scene.ship], security=rotated, on_event=scene.events.append)
    await WorkflowDispatcher(transport, security=MessageSigner(new)).dispatch_workflow(["reserve", "ship"])
    await worker.run(burst=True)

    assert len([e for e in scene.events if e.kind == "completed"]) == 2
    assert worker.stats.rejected == 0
    assert not rotated.refused

    # Once the old key is retired, what it signs is refused.
    await WorkflowDispatcher(transport, security=MessageSigner(old)).dispatch_workflow(["reserve", "ship"])
    retired = Worker(transport, [scene.reserve, scene.ship], security=MessageSigner(KEYS.billing, [new]))
    await retired.run(burst=True)
    [letter] = await dead_letters(transport, expected=1)
    assert letter.headers[REASON_HEADER] == refused("signed with unknown key id 'orders-2025'")


# -- replays against at-least-once delivery ----------------------------------------------------------------------


def produced_again(scene: Scene) -> tuple[PaigeantMessage, PaigeantMessage]:
    """The hop after `reserve`, as the billing worker produced it twice: once, then again after a crash."""
    first = scene.message(["reserve", "ship"])
    copies: list[PaigeantMessage] = []
    for minute in (1, 2):
        run = first.model_copy(deep=True)
        at = datetime(2026, 1, 1, 12, minute, tzinfo=UTC)
        run.routing_slip.mark_complete("reserve", started_at=at, finished_at=at)
        hop = run.next_hop()
        scene.signer.sign(hop)
        copies.append(hop)
    assert copies[0].message_id == copies[1].message_id
    return copies[0], copies[1]


async def test_a_hop_produced_again_by_a_step_that_reran_is_skipped_not_refused(transport: Transport) -> None:
    scene = Scene(transport)
    original, again = produced_again(scene)
    await scene.send(original)
    await scene.worker.run(burst=True)
    await scene.send(again)
    await scene.worker.run(burst=True)

    assert scene.ran(original.correlation_id) == ["ship"]
    assert scene.worker.stats.duplicates == 1
    assert scene.worker.stats.rejected == 0
    assert await dead_letters(transport, expected=0) == []
    assert [e.detail for e in scene.events if e.kind == "step_skipped"] == ["already settled (duplicate)"]


async def test_the_brokers_redelivery_of_a_settled_hop_is_skipped_not_refused() -> None:
    async with InMemoryTransport() as transport:
        scene = Scene(transport)
        message = scene.message(["reserve"])
        await scene.send(message)
        await scene.worker.run(burst=True)
        # The ack of that hop was lost on the way to the broker, which hands the same bytes out again.
        await scene.send(message)
        async with await transport.consume("reserve") as consumer:
            delivery = await anext(consumer)
            delivery.delivery_count = 2
            await scene.worker.process(delivery)
        assert scene.ran(message.correlation_id) == ["reserve"]
        assert scene.worker.stats.duplicates == 1
        assert scene.worker.stats.rejected == 0
        assert await transport.pending("reserve") == 0


async def test_an_unfinished_step_redelivered_after_a_crash_still_runs(transport: Transport) -> None:
    scene = Scene(transport)
    started, release = asyncio.Event(), asyncio.Event()

    @activity(name="reserve")
    async def slow_reserve(ctx: ActivityContext) -> dict[str, bool]:
        scene.executed.append(("reserve", ctx.correlation_id))
        started.set()
        await release.wait()
        return {"reserved": True}

    crashing = Worker(transport, [slow_reserve], security=worker_signer(transport), shutdown_timeout=0.05)
    message = scene.message(["reserve", "ship"])
    await scene.send(message)
    async with crashing:
        await asyncio.wait_for(started.wait(), 10)
    release.set()
    # The same message id again, never settled: a redelivery to run, not a replay to refuse.
    await scene.worker.run(burst=True)
    assert scene.ran(message.correlation_id) == ["reserve", "reserve", "ship"]
    assert scene.worker.stats.rejected == 0


@pytest.mark.redis
async def test_with_redis_a_replay_is_refused_by_every_worker_not_only_the_one_that_ran_it() -> None:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    transport = get_transport("redis", url=REDIS_URL, namespace=namespace)
    async with transport:
        scene = Scene(transport)
        other_process = Scene(transport)  # another worker, with a signer and memory of its own
        assert isinstance(MessageSigner.from_settings(transport).replay_cache, RedisReplayCache)
        message = scene.message(["reserve"])
        await scene.send(message)
        await scene.worker.run(burst=True)
        await scene.send(message)
        await other_process.worker.run(burst=True)

        [letter] = await dead_letters(transport, expected=1)
        assert letter.headers[REASON_HEADER] == refused(
            f"replayed: message {message.message_id!r} was already processed"
        )
        assert other_process.executed == []
    await clean(transport, namespace)


async def test_a_completed_steps_redelivery_after_its_token_expired_is_skipped_not_faulted() -> None:
    async with InMemoryTransport() as transport:
        scene = Scene(transport)
        message = scene.message(["charge", "ship"], token=user_token(expires_in=-120))
        await scene.worker.dedupe.mark_done(message.idempotency_key)  # it ran while the token was valid
        await scene.send(message)
        await scene.worker.run(burst=True)
        assert scene.worker.stats.faulted == 0
        assert scene.worker.stats.duplicates == 1
        assert await dead_letters(transport, expected=0) == []


@pytest.mark.redis
async def test_a_redis_publish_sent_again_after_a_lost_reply_adds_no_second_copy() -> None:
    """redis-py sends a command again when the connection drops before the reply; an identical second entry
    would reach the next worker as a replay. Each publish carries a marker that makes the second send a no-op."""
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    transport = get_transport("redis", url=REDIS_URL, namespace=namespace)
    assert isinstance(transport, RedisTransport)
    async with transport:
        marker = f"{namespace}:published:once"
        for _ in range(2):  # the call, then redis-py's retry of the very same call
            await transport.scripts.publish(
                keys=[transport.stream_key("reserve"), marker], args=[b"{}", b"{}", 0, 60_000]
            )
        assert await transport.client.xlen(transport.stream_key("reserve")) == 1
    await clean(transport, namespace)
