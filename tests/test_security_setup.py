"""Keys and settings: the secure default, the loud opt-out, `paigeant keys generate`, token checks, no leaks."""

from __future__ import annotations

import json
import logging
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey
from logfire.testing import CaptureLogfire

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    MessageSigner,
    PaigeantMessage,
    TokenError,
    TokenValidator,
    UserError,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
    activity,
    get_transport,
)
from paigeant_ai.cli import main
from paigeant_ai.security import generate_key
from paigeant_ai.transports.base import REASON_HEADER, Delivery

SECURITY_ENV = (
    "PAIGEANT_SIGNING_KEY",
    "PAIGEANT_SIGNING_KEY_FILE",
    "PAIGEANT_TRUSTED_KEYS",
    "PAIGEANT_TRUSTED_KEYS_FILE",
    "PAIGEANT_ALLOW_UNSIGNED",
    "PAIGEANT_OBO_JWKS",
    "PAIGEANT_OBO_JWKS_FILE",
    "PAIGEANT_OBO_ISSUER",
    "PAIGEANT_OBO_AUDIENCE",
)


@pytest.fixture(autouse=True)
def no_security_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SECURITY_ENV:
        monkeypatch.delenv(name, raising=False)


class PretendBroker(InMemoryTransport):
    """The in-memory transport declaring what a real broker does: what a worker on RabbitMQ decides, in one process."""

    name = "rabbitmq"
    process_local = False


@activity
async def greet(ctx: ActivityContext) -> dict[str, str]:
    return {"greeting": f"hello {ctx.payload.get('name', 'world')}"}


async def first_message(transport: InMemoryTransport, address: str = "greet") -> PaigeantMessage:
    async with await transport.consume(address) as consumer:  # closing it gives the message back
        return PaigeantMessage.from_json((await anext(consumer)).body)


async def dead_letters(transport: InMemoryTransport) -> list[Delivery]:
    letters: list[Delivery] = []
    async with await transport.consume("dead-letter", prefetch=100) as consumer:
        while await transport.pending("dead-letter") > len(letters):
            letters.append(await anext(consumer))
        for letter in letters:
            await transport.ack(letter)
    return letters


# -- the secure default ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rabbitmq", "redis"])
async def test_on_a_real_broker_without_keys_a_worker_refuses_to_start_and_names_the_fix(name: str) -> None:
    transport = get_transport(name)  # never connected: the worker stops before it consumes anything
    worker = Worker(transport, [greet])
    with pytest.raises(UserError) as refused:
        await worker.run()
    message = str(refused.value)
    assert message.startswith(f"the {name} transport needs message signing keys")
    for fix in ("PAIGEANT_SIGNING_KEY_FILE", "PAIGEANT_TRUSTED_KEYS_FILE", "paigeant keys generate"):
        assert fix in message
    assert "PAIGEANT_ALLOW_UNSIGNED=1" in message
    with pytest.raises(UserError, match="needs message signing keys"):
        await WorkflowDispatcher(transport).dispatch_workflow([greet])


async def test_the_opt_out_is_explicit_and_loud(caplog: pytest.LogCaptureFixture) -> None:
    events: list[WorkflowEvent] = []
    async with PretendBroker() as transport:
        await WorkflowDispatcher(transport, allow_unsigned=True).dispatch_workflow([greet], {"name": "ada"})
        assert (await first_message(transport)).security.jws_signature is None
        with caplog.at_level(logging.WARNING, logger="paigeant_ai.security"):
            await Worker(transport, [greet], allow_unsigned=True, on_event=events.append).run(burst=True)
    assert "messages are NOT signed or verified" in caplog.text
    assert [e.payload for e in events if e.kind == "completed"] == [{"name": "ada", "greeting": "hello ada"}]


async def test_the_opt_out_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_ALLOW_UNSIGNED", "1")
    async with PretendBroker() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([greet])
        worker = Worker(transport, [greet])
        await worker.run(burst=True)
    assert worker.stats.completed_workflows == 1
    monkeypatch.setenv("PAIGEANT_ALLOW_UNSIGNED", "maybe")
    with pytest.raises(UserError, match="PAIGEANT_ALLOW_UNSIGNED='maybe' is not a flag"):
        MessageSigner.from_settings(PretendBroker())


async def test_in_memory_signs_with_a_key_made_for_the_process() -> None:
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport).dispatch_workflow([greet])
        signature = (await first_message(transport)).security.jws_signature
        worker = Worker(transport, [greet])  # built apart from the dispatcher, it trusts the same key
        await worker.run(burst=True)
    assert signature is not None
    header = json.loads(_b64decode(signature.split(".")[0]))
    assert header["alg"] == "Ed25519"
    assert header["kid"].startswith("ephemeral-")
    assert header["typ"] == "paigeant+jws"
    assert worker.stats.completed_workflows == 1


async def test_an_unsigned_message_is_refused_in_memory_too() -> None:
    async with InMemoryTransport() as transport:
        await WorkflowDispatcher(transport, allow_unsigned=True).dispatch_workflow([greet])
        worker = Worker(transport, [greet])
        await worker.run(burst=True)
        [letter] = await dead_letters(transport)
    assert letter.headers[REASON_HEADER] == "security check failed: the message is not signed"
    assert worker.stats.completed_steps == 0


def _b64decode(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


# -- keys from files and the environment: two services that trust each other ----------------------------------


def generate(service: str, directory: Path, *extra: str) -> tuple[Path, Path]:
    assert main(["keys", "generate", service, "--out-dir", str(directory), *extra]) == 0
    return directory / f"{service}.private.jwk.json", directory / f"{service}.jwks.json"


async def test_two_services_with_their_own_keys_trust_each_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    orders_key, orders_jwks = generate("orders", tmp_path)
    billing_key, billing_jwks = generate("billing", tmp_path)
    events: list[WorkflowEvent] = []
    async with PretendBroker() as transport:
        monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(orders_key))  # the orders service dispatches
        await WorkflowDispatcher(transport).dispatch_workflow([greet], {"name": "grace"})
        monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(billing_key))  # the billing service works
        monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS_FILE", f"{orders_jwks}{os.pathsep}{billing_jwks}")
        worker = Worker(transport, [greet], on_event=events.append)
        await worker.run(burst=True)
    assert [e.payload for e in events if e.kind == "completed"] == [{"name": "grace", "greeting": "hello grace"}]

    # A worker that trusts only billing refuses what orders signed.
    async with PretendBroker() as transport:
        monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(orders_key))
        await WorkflowDispatcher(transport).dispatch_workflow([greet])
        monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(billing_key))
        monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS_FILE", str(billing_jwks))
        await Worker(transport, [greet]).run(burst=True)
        [letter] = await dead_letters(transport)
    orders_kid = json.loads(orders_jwks.read_text())["keys"][0]["kid"]
    assert letter.headers[REASON_HEADER] == f"security check failed: signed with unknown key id {orders_kid!r}"


async def test_rotation_with_the_cli_keeps_the_old_key_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orders_key, orders_jwks = generate("orders", tmp_path, "--kid", "orders-1")
    async with PretendBroker() as transport:
        monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(orders_key))
        dispatcher = WorkflowDispatcher(transport)
        await dispatcher.dispatch_workflow([greet])  # signed with orders-1, still in the queue
        generate("orders", tmp_path, "--kid", "orders-2", "--rotate")
        assert [key["kid"] for key in json.loads(orders_jwks.read_text())["keys"]] == ["orders-1", "orders-2"]
        await WorkflowDispatcher(transport).dispatch_workflow([greet])  # signed with orders-2
        monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", orders_jwks.read_text())
        worker = Worker(transport, [greet])
        await worker.run(burst=True)
    assert worker.stats.completed_workflows == 2
    assert worker.stats.rejected == 0


def test_keys_generate_writes_a_secret_private_key_and_a_public_jwks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = generate("orders", tmp_path, "--alg", "ES256")
    output = capsys.readouterr().out
    key = json.loads(private.read_text())
    jwks = json.loads(public.read_text())
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert key["kty"] == "EC"
    assert "d" in key
    assert key["d"] not in output, "the private key is never printed"
    [shared] = jwks["keys"]
    assert "d" not in shared
    assert shared["kid"] == key["kid"]
    assert shared["kid"].startswith("orders-")
    assert f"PAIGEANT_SIGNING_KEY_FILE={private}" in output

    assert main(["keys", "generate", "orders", "--out-dir", str(tmp_path)]) == 2
    assert "already exist; pass --rotate to add a new key, or --force to replace them" in capsys.readouterr().err
    generate("orders", tmp_path, "--force")
    assert json.loads(public.read_text())["keys"][0]["kid"] != shared["kid"]


def test_key_settings_that_cannot_work_are_refused_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, orders_jwks = generate("orders", tmp_path)
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match=r"cannot read the trusted keys from '.*missing.json': No such file"):
        MessageSigner.from_settings(PretendBroker())

    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS_FILE", str(orders_jwks))
    verifier_only = MessageSigner.from_settings(PretendBroker())
    with pytest.raises(UserError, match="no signing key: set PAIGEANT_SIGNING_KEY_FILE"):
        verifier_only.ensure_ready()

    monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(orders_jwks))
    with pytest.raises(UserError, match=r"must be one private JWK \(<service>.private.jwk.json\), not a JWKS"):
        MessageSigner.from_settings(PretendBroker())
    public = tmp_path / "public.jwk.json"
    public.write_text(json.dumps(json.loads(orders_jwks.read_text())["keys"][0]))
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(public))
    with pytest.raises(UserError, match="the signing key is a public key"):
        MessageSigner.from_settings(PretendBroker())

    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", json.dumps({"keys": [OctKey.generate_key(256).as_dict(private=True)]}))
    monkeypatch.delenv("PAIGEANT_SIGNING_KEY_FILE")
    with pytest.raises(UserError, match="a shared secret \\(oct\\) key cannot be trusted"):
        MessageSigner.from_settings(PretendBroker())

    monkeypatch.delenv("PAIGEANT_TRUSTED_KEYS")
    monkeypatch.setenv("PAIGEANT_OBO_ISSUER", "https://id.example.com")
    with pytest.raises(
        UserError, match=r"also needs PAIGEANT_OBO_JWKS_FILE \(or PAIGEANT_OBO_JWKS\), PAIGEANT_OBO_AUDIENCE"
    ):
        MessageSigner.from_settings(PretendBroker())


# -- on-behalf-of tokens ---------------------------------------------------------------------------------------

ISSUER_KEY = generate_key("idp-1", "ES256")
ISSUER = "https://id.example.com"


def validator() -> TokenValidator:
    return TokenValidator({"keys": [ISSUER_KEY.as_dict()]}, issuer=ISSUER, audience="api")


def claims(**overrides: Any) -> dict[str, Any]:
    # Valid for a day: the tokens of the parametrized cases are made when the tests are collected, and the whole
    # suite may run longer than a few minutes before they are checked.
    now = int(datetime.now(UTC).timestamp())
    return {"iss": ISSUER, "aud": "api", "sub": "alice", "exp": now + 86_400, **overrides}


def signed(values: dict[str, Any]) -> str:
    return jwt.encode({"alg": "ES256", "kid": "idp-1"}, values, ISSUER_KEY, algorithms=["ES256"])


def unsigned_token(values: dict[str, Any]) -> str:
    header = _b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(values).encode())}."


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_with_the_issuers_public_key(values: dict[str, Any]) -> str:
    secret = OctKey.import_key(json.dumps(ISSUER_KEY.as_dict(private=False)).encode())
    return jwt.encode({"alg": "HS256", "kid": "idp-1"}, values, secret, algorithms=["HS256"])


def altered(values: dict[str, Any]) -> str:
    header, _, signature = signed(values).split(".")
    return f"{header}.{_b64(json.dumps({**values, 'sub': 'mallory'}).encode())}.{signature}"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (unsigned_token(claims()), "the on-behalf-of token uses an algorithm that is not accepted"),
        (hs256_with_the_issuers_public_key(claims()), "the on-behalf-of token uses an algorithm that is not accepted"),
        (altered(claims()), "the on-behalf-of token's signature is not valid"),
        ("not-a-token", "the on-behalf-of token is malformed"),
        (signed({k: v for k, v in claims().items() if k != "exp"}), "the on-behalf-of token has no exp claim"),
        (signed(claims(nbf=claims()["exp"])), "the on-behalf-of token has an invalid nbf claim"),
        (signed(claims(aud=["other", "another"])), "the on-behalf-of token is for another audience, not 'api'"),
    ],
    ids=["alg-none", "alg-confusion-hs256", "altered", "malformed", "no-exp", "not-yet-valid", "audience-list"],
)
def test_token_checks_refuse_with_a_reason_that_never_quotes_the_token(token: str, reason: str) -> None:
    with pytest.raises(TokenError) as refused:
        validator().validate(token)
    assert str(refused.value) == reason
    assert token not in str(refused.value)


def test_token_scopes_come_from_scope_or_scp() -> None:
    from paigeant_ai.security import granted_scopes

    assert validator().validate(signed(claims(aud=["other", "api"])))["sub"] == "alice"
    assert granted_scopes({"scope": "a b"}) == {"a", "b"}
    assert granted_scopes({"scp": ["c", "d"]}) == {"c", "d"}
    assert granted_scopes({"scp": "e"}) == {"e"}
    with pytest.raises(UserError, match="public-key algorithms, not HS256, none"):
        TokenValidator({"keys": [ISSUER_KEY.as_dict()]}, issuer=ISSUER, audience="api", algorithms=["HS256", "none"])


# -- nothing secret leaks ----------------------------------------------------------------------------------------


async def test_tokens_and_keys_never_reach_logs_spans_events_or_dead_letter_reasons(
    capfire: CaptureLogfire, caplog: pytest.LogCaptureFixture
) -> None:
    signing_key = generate_key("orders-1")
    private_part = str(signing_key.as_dict(private=True)["d"])
    signer = MessageSigner(
        signing_key, tokens=TokenValidator({"keys": [ISSUER_KEY.as_dict()]}, issuer=ISSUER, audience="api")
    )
    expired_token = signed(claims(exp=int(datetime.now(UTC).timestamp()) - 600))
    good_token = signed(claims(scope="payments:write"))

    @activity(name="charge", required_scopes=["payments:write"])
    async def charge(ctx: ActivityContext) -> dict[str, Any]:
        return {"by": (ctx.obo_claims or {}).get("sub")}

    events: list[WorkflowEvent] = []
    caplog.set_level(logging.DEBUG, logger="paigeant_ai")
    async with InMemoryTransport() as transport:
        dispatcher = WorkflowDispatcher(transport, security=signer)
        # A dispatcher that checks tokens refuses an expired one; one that does not lets the worker find out.
        await WorkflowDispatcher(transport, security=MessageSigner(signing_key)).dispatch_workflow(
            [charge], obo_token=expired_token
        )
        await dispatcher.dispatch_workflow([charge], obo_token=good_token)
        await WorkflowDispatcher(transport, allow_unsigned=True).dispatch_workflow([charge], obo_token=good_token)
        worker = Worker(transport, [charge], security=signer, on_event=events.append)
        await worker.run(burst=True)
        letters = await dead_letters(transport)

    assert worker.stats.faulted == 1
    assert worker.stats.rejected == 1
    assert worker.stats.completed_workflows == 1
    signatures = [PaigeantMessage.from_json(letter.body).security.jws_signature or "" for letter in letters]
    places = {
        "logs": caplog.text,
        "spans": json.dumps(capfire.exporter.exported_spans_as_dict(), default=str),
        "events": json.dumps([event.model_dump(mode="json") for event in events]),
        "reasons": json.dumps([letter.headers for letter in letters]),
    }
    for place, text in places.items():
        for secret in (expired_token, good_token, private_part, *(s.split(".")[-1] for s in signatures if s)):
            assert secret not in text, f"a secret reached the {place}"
    assert "the on-behalf-of token has expired" in places["reasons"]
    carrying = PaigeantMessage.new([charge.spec], obo_token=good_token)
    signer.sign(carrying)
    assert good_token not in repr(carrying), "a message logged by accident shows neither token nor signature"
    assert (carrying.security.jws_signature or "-") not in repr(carrying)
