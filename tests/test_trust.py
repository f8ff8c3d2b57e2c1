"""The trust policy: what each trusted key may do, read from JSON, and enforced on every hop."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from paigeant_ai import ActivityContext, Worker, WorkflowDispatcher, activity
from paigeant_ai.exceptions import SecurityError, UserError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import Transport
from paigeant_ai.transports.base import REASON_HEADER
from paigeant_ai.trust import Grant, TrustPolicy

from .brokers import dead_letters

ORDERS = generate_key("orders-1")
INTRUDER = generate_key("inventory-1")  # trusted, but not allowed to feed billing
BILLING = generate_key("billing-1")

POLICY = {
    "keys": {
        "orders-1": {"may": ["start"], "send_to": ["charge"]},
        "inventory-1": {"may": ["start"], "send_to": ["reserve"]},
        "billing-1": {"send_to": "*", "may": ["revise"]},
    }
}


def test_without_a_policy_every_trusted_key_may_do_everything() -> None:
    policy = TrustPolicy.any_trusted_key()
    assert policy.is_open
    assert policy.allows("anyone", "approve")
    assert policy.may_send_to("anyone", "charge")


def test_a_policy_grants_only_what_it_names() -> None:
    policy = TrustPolicy.load(POLICY)
    assert not policy.is_open
    assert policy.allows("orders-1", "start")
    assert not policy.allows("orders-1", "approve")
    assert policy.may_send_to("orders-1", "charge")
    assert not policy.may_send_to("orders-1", "ship")
    assert policy.may_send_to("billing-1", "anything")
    assert policy.allows("billing-1", "revise")
    assert not policy.allows("stranger", "start")
    assert not policy.may_send_to("stranger", "charge")
    assert not policy.allows(None, "start")
    assert policy.grants is not None
    assert policy.grants["orders-1"] == Grant(may=frozenset({"start"}), send_to=frozenset({"charge"}))
    with pytest.raises(SecurityError, match="may not approve") as refused:
        policy.require("orders-1", "approve", "approve")
    assert refused.value.code == "not_allowed"
    with pytest.raises(SecurityError, match="may not send to 'ship'"):
        policy.require_send("orders-1", "ship")


def test_a_policy_names_keys_exactly() -> None:
    # A kid is chosen by whoever made the key: a partner's "orders-20261206-0a1b2c" is not the orders service's key.
    policy = TrustPolicy.load({"keys": {"orders": {"may": ["start"], "send_to": ["charge"]}}})
    assert policy.allows("orders", "start")
    assert not policy.allows("orders-20261206-0a1b2c", "start")
    assert not policy.may_send_to("orders-1", "charge")


def test_a_policy_is_read_from_a_file_or_json_text(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    assert (
        TrustPolicy.load(path).grants
        == TrustPolicy.load(str(path)).grants
        == TrustPolicy.load(json.dumps(POLICY)).grants
    )


@pytest.mark.parametrize(
    ("source", "fix"),
    [
        ({"orders-1": {"may": ["start"]}}, 'one member, "keys"'),
        ({"keys": {"orders-1": {"may": ["sart"]}}}, "unknown permission 'sart'; choose from advertise, approve"),
        ({"keys": {"orders-1": {"can": ["start"]}}}, "unknown member 'can'"),
        ({"keys": {"orders-1": {"send_to": "charge"}}}, "send_to must be a list of strings"),
        ({"keys": {"orders-1": ["start"]}}, 'must be an object like {"may": ["start"]}'),
        ('{"keys": ', "not valid JSON"),
        ("/nonexistent/policy.json", "cannot read the trust policy from '/nonexistent/policy.json'"),
    ],
)
def test_a_bad_policy_names_the_fix(source: Any, fix: str) -> None:
    with pytest.raises(UserError, match=fix.replace("(", r"\(").replace("[", r"\[").replace("{", r"\{")):
        TrustPolicy.load(source)


def test_the_settings_load_the_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(POLICY))
    monkeypatch.setenv("PAIGEANT_TRUST_POLICY_FILE", str(path))
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(BILLING.as_dict(private=True)))
    assert MessageSigner.from_settings().policy.grants == TrustPolicy.load(POLICY).grants


def test_a_trust_policy_without_signatures_is_refused_at_start() -> None:
    signer = MessageSigner(unsigned=True, policy=TrustPolicy.load(POLICY))
    with pytest.raises(UserError, match="a trust policy needs signed messages"):
        signer.ensure_ready()


async def test_a_hop_from_a_key_not_allowed_to_feed_the_step_is_dead_lettered(transport: Transport) -> None:
    ran: list[str] = []

    @activity(name="charge")
    async def charge(ctx: ActivityContext) -> dict[str, Any]:
        ran.append(ctx.message.correlation_id)
        return {"charged": True}

    policy = TrustPolicy.load(POLICY)
    worker_security = MessageSigner(BILLING, [ORDERS, INTRUDER], policy=policy)
    allowed = WorkflowDispatcher(transport, security=MessageSigner(ORDERS))
    intruder = WorkflowDispatcher(transport, security=MessageSigner(INTRUDER))
    good = await allowed.dispatch_workflow(["charge"], {"order": 1}, correlation_id=f"good-{uuid.uuid4().hex}")
    bad = await intruder.dispatch_workflow(["charge"], {"order": 2}, correlation_id=f"bad-{uuid.uuid4().hex}")

    worker = Worker(transport, [charge], security=worker_security)
    await worker.run(burst=True)

    assert ran == [good]
    (letter,) = await dead_letters(transport)
    assert json.loads(letter.body)["correlation_id"] == bad
    reason = letter.headers[REASON_HEADER]
    assert "key 'inventory-1' may not send to 'charge'" in reason
    assert worker_security.refused["not_allowed"] == 1
