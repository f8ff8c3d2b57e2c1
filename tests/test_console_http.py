"""The console over HTTP (httpx's ASGI transport): who may sign in and act, and forms without a CSRF token."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import re
import time
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from joserfc import jwt
from pydantic_ai import models

from paigeant_ai import TokenValidator, TrustPolicy, UserError, WorkflowStatus
from paigeant_ai.console import create_app
from paigeant_ai.console.auth import (
    SESSION_COOKIE,
    Principal,
    Sessions,
    Users,
    hash_password,
    principal_from_token,
    verify_password,
)
from paigeant_ai.security import generate_key

from .console_world import PASSWORD, World, world

models.ALLOW_MODEL_REQUESTS = False


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncGenerator[tuple[World, httpx.AsyncClient]]:
    async with world(tmp_path) as shop, served(shop) as client:
        yield shop, client


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, name: str, password: str = PASSWORD) -> httpx.Response:
    login = await client.get("/login")
    return await client.post("/login", data={"csrf": csrf_of(login), "name": name, "password": password})


async def waiting(shop: World, correlation_id: str) -> bool:
    assert shop.console.waiting_store is not None
    return await shop.console.waiting_store.get(correlation_id) is not None


async def parked_ticket(shop: World) -> str:
    correlation_id = await shop.ticket()
    for _ in range(200):
        if await waiting(shop, correlation_id):
            return correlation_id
        await asyncio.sleep(0.05)
    raise AssertionError("the ticket never parked")


def test_passwords_are_scrypt_hashes_that_verify_only_themselves() -> None:
    stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt$131072$8$1$")  # OWASP's minimum for scrypt
    assert PASSWORD not in stored
    assert verify_password(PASSWORD, stored)
    assert not verify_password(PASSWORD + "!", stored)
    assert not verify_password(PASSWORD, "md5$nothing")
    salt, digest = stored.split("$")[4:]
    assert not verify_password(PASSWORD, f"scrypt${2**30}$8$1${salt}${digest}")  # refused, never computed


def test_a_hash_made_with_other_parameters_still_verifies() -> None:
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(PASSWORD.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    stored = "$".join(["scrypt", "16384", "8", "1", base64.b64encode(salt).decode(), base64.b64encode(digest).decode()])
    assert verify_password(PASSWORD, stored)
    assert not verify_password("another one", stored)


def test_the_users_file_is_private_and_refuses_unknown_permissions(tmp_path: Path) -> None:
    users = Users(tmp_path / "users.json")
    users.add("ana", PASSWORD, ["approve"])
    assert (tmp_path / "users.json").stat().st_mode & 0o777 == 0o600
    signed_in = users.sign_in("ana", PASSWORD)
    assert signed_in is not None
    assert signed_in.may == {"approve"}
    assert users.sign_in("ana", "wrong password") is None
    assert users.sign_in("nobody", PASSWORD) is None
    with pytest.raises(Exception, match="unknown permission delete"):
        users.add("eve", PASSWORD, ["delete"])


async def test_every_page_needs_a_signed_in_person(shop: tuple[World, httpx.AsyncClient]) -> None:
    _, client = shop
    for path in ("/workflows", "/approvals", "/dead-letters", "/workflows/rows"):
        response = await client.get(path)
        assert response.status_code == 303
        assert response.headers["location"] == "/login"
    refused = await sign_in(client, "ana", "not her password")
    assert refused.headers["location"] == "/login?failed=1"
    assert "unknown name or wrong password" in (await client.get("/login?failed=1")).text


async def test_the_session_cookie_is_signed_httponly_and_strict(shop: tuple[World, httpx.AsyncClient]) -> None:
    _, client = shop
    signed_in = await sign_in(client, "ana")
    assert signed_in.status_code == 303
    assert signed_in.headers["location"] == "/workflows"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert (await client.get("/workflows")).status_code == 200
    session_id, _, mac = client.cookies[SESSION_COOKIE].partition(".")
    client.cookies.set(SESSION_COOKIE, f"{session_id}.{'0' * len(mac)}")  # a cookie whose signature does not hold
    assert (await client.get("/workflows")).status_code == 303
    odd = await client.get("/workflows", headers={b"Cookie": f"{SESSION_COOKIE}={session_id}.".encode() + b"\xc3\xa9"})
    assert odd.status_code == 303  # a signature that is not even ASCII is refused as any other


async def test_signing_out_ends_the_session_and_clears_its_cookie(shop: tuple[World, httpx.AsyncClient]) -> None:
    _, client = shop
    await sign_in(client, "ana")
    page = await client.get("/workflows")
    cookie = client.cookies[SESSION_COOKIE]
    assert (await client.post("/logout")).status_code == 403  # without the form's CSRF token
    assert (await client.get("/workflows")).status_code == 200
    signed_out = await client.post("/logout", data={"csrf": csrf_of(page)})
    assert signed_out.headers["location"] == "/login"
    assert f'{SESSION_COOKIE}=""' in signed_out.headers["set-cookie"]
    assert SESSION_COOKIE not in client.cookies
    client.cookies.set(SESSION_COOKIE, cookie)  # the old cookie, kept by someone: its session is gone
    assert (await client.get("/workflows")).status_code == 303


async def test_a_new_session_id_is_given_at_sign_in(shop: tuple[World, httpx.AsyncClient]) -> None:
    _, client = shop
    login = await client.get("/login")
    planted = client.cookies[SESSION_COOKIE]
    await client.post("/login", data={"csrf": csrf_of(login), "name": "ana", "password": PASSWORD})
    assert client.cookies[SESSION_COOKIE].partition(".")[0] != planted.partition(".")[0]
    client.cookies.set(SESSION_COOKIE, planted)  # the session of before the sign-in is worth nothing
    assert (await client.get("/workflows")).status_code == 303


async def test_a_form_without_the_csrf_token_is_refused(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    correlation_id = await parked_ticket(world_)
    await sign_in(client, "ana")
    forged = await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve"})
    assert forged.status_code == 403
    assert "CSRF" in forged.text
    wrong = await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": "guessed"})
    assert wrong.status_code == 403
    login = await client.post("/login", data={"name": "ana", "password": PASSWORD})
    assert login.status_code == 403
    assert await waiting(world_, correlation_id)
    assert world_.shop.refunds == []


async def test_a_person_without_approve_permission_is_refused(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    correlation_id = await parked_ticket(world_)
    await sign_in(client, "bob")
    inbox = await client.get("/approvals")
    assert "refund" in inbox.text
    assert "You may look, not decide" in inbox.text
    assert "Approve</button>" not in inbox.text
    refused = await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf_of(inbox)})
    assert refused.status_code == 403
    assert refused.text == "refused: bob may not approve tool calls (the users file or token gives 'approve')"
    await asyncio.sleep(0.3)
    assert await waiting(world_, correlation_id)
    assert world_.shop.refunds == []


async def test_a_denial_note_reaches_the_agent(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    correlation_id = await parked_ticket(world_)
    await sign_in(client, "ana")
    inbox = await client.get("/approvals")
    note = "Refunds over 30 EUR need a manager."
    data = {"decision": "deny", "csrf": csrf_of(inbox), "note": note}
    await client.post(f"/approvals/{correlation_id}/r1", data=data)
    status = await completed(world_, correlation_id)
    assert status.payload is not None
    assert status.payload["reply"] == f"Dear customer: {note}"
    assert world_.shop.refunds == []
    resumed = next(event for event in status.events if event.kind == "resumed")
    assert resumed.detail == "denied refund (r1) by ana"


async def test_two_requests_of_one_step_are_sent_once_both_are_answered(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    world_.shop.calls_asked = 2
    correlation_id = await parked_ticket(world_)
    await sign_in(client, "ana")
    inbox = await client.get("/approvals")
    assert inbox.text.count(f'action="/approvals/{correlation_id}/') == 2
    first = await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf_of(inbox)})
    assert first.headers["location"] == "/approvals"
    assert "refund approved by ana; sent once you answer r2 too" in (await client.get("/approvals")).text
    await asyncio.sleep(0.3)
    assert await waiting(world_, correlation_id)
    data = {"decision": "deny", "csrf": csrf_of(inbox), "note": "one refund is enough"}
    second = await client.post(f"/approvals/{correlation_id}/r2", data=data)
    assert second.headers["location"] == f"/workflows/{correlation_id}"
    status = await completed(world_, correlation_id)
    assert world_.shop.refunds == [{"ticket": "T-1042", "amount": 40}]
    resumed = next(event for event in status.events if event.kind == "resumed")
    assert resumed.detail is not None
    assert "r1" in resumed.detail
    assert "r2" in resumed.detail
    assert "by ana" in resumed.detail


async def test_edited_arguments_run_and_are_recorded_as_edited(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    correlation_id = await parked_ticket(world_)
    await sign_in(client, "ana")
    inbox = await client.get("/approvals")
    decided = await client.post(
        f"/approvals/{correlation_id}/r1",
        data={"decision": "approve", "csrf": csrf_of(inbox), "args": '{"ticket": "T-1042", "amount": 25}'},
    )
    assert decided.headers["location"] == f"/workflows/{correlation_id}"
    status = await completed(world_, correlation_id)
    assert world_.shop.refunds == [{"ticket": "T-1042", "amount": 25}]
    page = (await client.get(f"/workflows/{correlation_id}")).text
    assert "refund approved with edited arguments by ana" in page
    resumed = next(event for event in status.events if event.kind == "resumed")
    assert resumed.detail is not None
    assert "ana" in resumed.detail
    assert "25" in resumed.detail


async def test_an_agent_step_shows_the_payload_it_saw_its_output_and_its_tools(
    shop: tuple[World, httpx.AsyncClient],
) -> None:
    world_, client = shop
    given = {"ticket": "charged twice", "session_token": "tok-do-not-show"}
    correlation_id = await world_.dispatcher.dispatch_workflow(["answer-ticket"], given)
    for _ in range(200):
        if await waiting(world_, correlation_id):
            break
        await asyncio.sleep(0.05)
    await sign_in(client, "ana")
    inbox = await client.get("/approvals")
    await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf_of(inbox)})
    await completed(world_, correlation_id)
    page = (await client.get(f"/workflows/{correlation_id}")).text
    seen = page[page.index('<details class="seen"') : page.index("</details>", page.index('<details class="seen"'))]
    assert "called refund" in seen
    assert "&#34;ticket&#34;: &#34;charged twice&#34;" in seen  # the payload the step saw, escaped for HTML
    assert "&#34;session_token&#34;: &#34;[redacted]&#34;" in seen
    assert "output, as <code>reply</code>" in seen
    assert "Dear customer: refunded 40 EUR on T-1042" in seen
    assert "tok-do-not-show" not in page


async def test_a_step_without_a_record_shows_no_payload_of_its_own(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    correlation_id = await world_.order("take-order", "charge")
    for _ in range(200):
        status = await world_.console.store.get(correlation_id)
        if status is not None and status.state == "faulted":
            break
        await asyncio.sleep(0.05)
    await sign_in(client, "ana")
    page = (await client.get(f"/workflows/{correlation_id}")).text
    assert "the card was declined" in page
    assert '<details class="seen"' not in page


ISSUER, AUDIENCE = "https://id.example.com", "paigeant-console"
IDP = generate_key("idp-1", "ES256")


def token(subject: str, scope: str) -> str:
    now = int(datetime.now(UTC).timestamp())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": subject, "scope": scope, "iat": now, "exp": now + 600}
    return jwt.encode({"alg": "ES256", "kid": IDP.kid}, claims, IDP, algorithms=["ES256"])


def validator() -> TokenValidator:
    return TokenValidator({"keys": [IDP.as_dict(private=False)]}, issuer=ISSUER, audience=AUDIENCE)


@asynccontextmanager
async def served(shop: World) -> AsyncGenerator[httpx.AsyncClient]:
    app = create_app(shop.console)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            yield client


async def completed(shop: World, correlation_id: str) -> WorkflowStatus:
    for _ in range(200):
        status = await shop.console.store.get(correlation_id)
        if status is not None and status.state == "completed":
            return status
        await asyncio.sleep(0.05)
    raise AssertionError(f"workflow {correlation_id} did not complete")


def test_a_token_gives_the_permissions_its_scopes_name() -> None:
    carol = principal_from_token(token("carol", "openid paigeant:approve"), validator())
    assert (carol.name, carol.may, carol.via) == ("carol", frozenset({"approve"}), "token")
    reader = principal_from_token(token("dave", "openid"), validator())
    assert reader.may == frozenset()
    assert reader.expires is not None
    assert time.time() + 590 < reader.expires <= time.time() + 600
    with pytest.raises(UserError, match="the token is refused"):
        principal_from_token(token("carol", "paigeant:approve") + "x", validator())
    with pytest.raises(UserError, match="token sign-in needs the issuer"):
        principal_from_token(token("carol", "paigeant:approve"), None)


async def test_a_person_signed_in_with_a_token_approves_as_its_subject(tmp_path: Path) -> None:
    async with world(tmp_path, tokens=validator()) as shop, served(shop) as client:
        correlation_id = await parked_ticket(shop)
        login = await client.get("/login")
        assert "Sign in with the token" in login.text
        bearer = token("carol", "paigeant:approve")
        await client.post("/login", data={"csrf": csrf_of(login), "token": bearer})
        inbox = await client.get("/approvals")
        await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf_of(inbox)})
        status = await completed(shop, correlation_id)
        resumed = next(event for event in status.events if event.kind == "resumed")
        assert resumed.detail == "approved refund (r1) by carol"
        assert shop.shop.refunds == [{"ticket": "T-1042", "amount": 40}]


def test_a_token_sign_in_ends_when_its_token_expires() -> None:
    sessions = Sessions()
    carol = principal_from_token(token("carol", "paigeant:approve"), validator())
    session_id, session = sessions.start(carol)
    assert carol.expires is not None
    assert session.expires == carol.expires  # ten minutes, not the eight hours of a password's sign-in
    expired = dataclasses.replace(carol, expires=time.time() - 1)
    session_id, _ = sessions.start(expired)
    assert sessions.get(sessions.cookie_of(session_id)) is None


def test_sessions_of_the_sign_in_page_are_bounded() -> None:
    sessions = Sessions()
    sessions.most_waiting = 3
    ana, _ = sessions.start(Principal("ana", frozenset(), "account"))
    opened = [sessions.start()[0] for _ in range(5)]
    assert [sessions.get(sessions.cookie_of(key)) is not None for key in opened] == [False, False, True, True, True]
    assert sessions.get(sessions.cookie_of(ana)) is not None  # a signed-in person is never pushed out
    _, waiting = sessions.start()
    assert waiting.expires < time.time() + 1801


async def test_the_trust_policy_decides_whether_the_console_may_approve(tmp_path: Path) -> None:
    policy = TrustPolicy.load({"keys": {"shop-console": {"may": ["start"], "send_to": "*"}}})
    async with world(tmp_path, policy=policy) as shop, served(shop) as client:
        correlation_id = await parked_ticket(shop)
        await sign_in(client, "ana")
        inbox = await client.get("/approvals")
        sent = await client.post(
            f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf_of(inbox)}
        )
        assert sent.headers["location"] == "/approvals"
        page = (await client.get("/approvals")).text
        assert "not sent:" in page
        assert "may not approve" in page
        await asyncio.sleep(0.3)
        assert await waiting(shop, correlation_id)
        assert shop.shop.refunds == []


async def test_a_console_on_loopback_answers_only_to_its_own_names(tmp_path: Path) -> None:
    async with world(tmp_path) as shop:
        shop.console.allowed_hosts = ["127.0.0.1", "localhost"]
        async with served(shop) as client:
            assert (await client.get("/login")).status_code == 200
            rebound = await client.get("/login", headers={"Host": "attacker.example"})  # a DNS rebinding page
            assert rebound.status_code == 400
