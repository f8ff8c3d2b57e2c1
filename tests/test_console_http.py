"""The console over HTTP (httpx's ASGI transport): who may sign in and act, and forms without a CSRF token."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator
from pathlib import Path

import httpx
import pytest
from pydantic_ai import models

from paigeant_ai.console import create_app
from paigeant_ai.console.auth import SESSION_COOKIE, Users, hash_password, verify_password

from .console_world import PASSWORD, World, world

models.ALLOW_MODEL_REQUESTS = False


@pytest.fixture
async def shop(tmp_path: Path) -> AsyncGenerator[tuple[World, httpx.AsyncClient]]:
    async with world(tmp_path) as shop:
        app = create_app(shop.console)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                yield shop, client


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, name: str, password: str = PASSWORD) -> httpx.Response:
    login = await client.get("/login")
    return await client.post("/login", data={"csrf": csrf_of(login), "name": name, "password": password})


async def parked_ticket(shop: World) -> str:
    correlation_id = await shop.ticket()
    for _ in range(200):
        if await shop.console.waiting_store.get(correlation_id) is not None:  # type: ignore[union-attr]
            return correlation_id
        await asyncio.sleep(0.05)
    raise AssertionError("the ticket never parked")


def test_passwords_are_scrypt_hashes_that_verify_only_themselves() -> None:
    stored = hash_password(PASSWORD)
    assert stored.startswith("scrypt$16384$8$1$")
    assert PASSWORD not in stored
    assert verify_password(PASSWORD, stored)
    assert not verify_password(PASSWORD + "!", stored)
    assert not verify_password(PASSWORD, "md5$nothing")


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
    assert await world_.console.waiting_store.get(correlation_id) is not None  # type: ignore[union-attr]
    assert world_.shop.refunds == []


async def test_a_person_without_approve_permission_is_refused(shop: tuple[World, httpx.AsyncClient]) -> None:
    world_, client = shop
    correlation_id = await parked_ticket(world_)
    await sign_in(client, "bob")
    inbox = await client.get("/approvals")
    assert "refund" in inbox.text
    assert "bob" in inbox.text
    refused = await client.post(f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf_of(inbox)})
    assert refused.status_code == 403
    assert refused.text == "refused: bob may not approve tool calls (the users file or token gives 'approve')"
    await asyncio.sleep(0.3)
    assert await world_.console.waiting_store.get(correlation_id) is not None  # type: ignore[union-attr]
    assert world_.shop.refunds == []


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
    for _ in range(200):
        status = await world_.console.store.get(correlation_id)
        if status is not None and status.state == "completed":
            break
        await asyncio.sleep(0.05)
    assert world_.shop.refunds == [{"ticket": "T-1042", "amount": 25}]
    page = (await client.get(f"/workflows/{correlation_id}")).text
    assert "refund approved with edited arguments by ana" in page
    resumed = next(event for event in status.events if event.kind == "resumed")  # type: ignore[union-attr]
    assert resumed.detail is not None
    assert "ana" in resumed.detail
    assert "25" in resumed.detail
    print(resumed.detail)
