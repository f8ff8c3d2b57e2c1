"""`paigeant console` and `paigeant console add-user`, and the timeline the workflow page draws."""

from __future__ import annotations

import asyncio
import io
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from paigeant_ai import MessageSigner, Worker, WorkflowDispatcher, WorkflowStatus, cli, get_transport
from paigeant_ai.console import Users
from paigeant_ai.console.views import redact, timeline
from paigeant_ai.security import load_signing_key
from paigeant_ai.store import StepStatus
from paigeant_ai.transports.redis import RedisTransport

from .brokers import RABBITMQ_URL, REDIS_URL, delete_queues, delete_redis_namespace
from .conftest import require_rabbitmq, require_redis
from .console_world import PASSWORD, Shop, activities


def test_add_user_writes_an_account_that_signs_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "people.json"
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\n"))
    code = cli.main(
        ["console", "--users-file", str(path), "add-user", "ana", "--may", "approve", "--password-file", "-"]
    )
    assert code == 0
    assert capsys.readouterr().out == f"added ana to {path} (may approve)\n"
    ana = Users(path).sign_in("ana", PASSWORD)
    assert ana is not None
    assert ana.may == {"approve"}
    assert PASSWORD not in path.read_text()


def test_a_short_password_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("short\n"))
    path = tmp_path / "people.json"
    assert cli.main(["console", "--users-file", str(path), "add-user", "ana", "--password-file", "-"]) == 2
    assert "a password of at least 8 characters" in capsys.readouterr().err
    assert not path.exists()


def test_a_missing_password_file_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "people.json"
    missing = tmp_path / "nowhere.txt"
    assert cli.main(["console", "--users-file", str(path), "add-user", "ana", "--password-file", str(missing)]) == 2
    assert f"cannot read the password from {missing}: No such file or directory" in capsys.readouterr().err
    assert not path.exists()


def test_the_in_memory_transport_is_served_from_its_own_process(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["console", "--transport", "inmemory"]) == 2
    assert "serve paigeant_ai.console.create_app(Console(...)) from that process" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def keyed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, str]:
    """The environment of a console process on a SQLite file of `tmp_path`, with a key of its own."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keys", "generate", "desk"]) == 0
    capsys.readouterr()
    return os.environ | {
        "PAIGEANT_SQLITE_PATH": str(tmp_path / "shop.db"),
        "PAIGEANT_SIGNING_KEY_FILE": str(tmp_path / "desk.private.jwk.json"),
        "PAIGEANT_CONSOLE_USERS": str(tmp_path / "users.json"),
    }


@pytest.fixture
def console_process(
    keyed: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    port = free_port()
    extra: list[str] = getattr(request, "param", [])
    command = [sys.executable, "-m", "paigeant_ai.cli", "console", "--transport", "sqlite", "--port", str(port), *extra]
    process = subprocess.Popen(command, env=keyed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield process, port
    finally:
        process.terminate()
        process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def wait_for_sign_in_page(port: int) -> str:
    deadline = time.monotonic() + 20
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=2) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.slow
def test_the_console_serves_on_loopback_by_default(console_process: tuple[subprocess.Popen[str], int]) -> None:
    process, port = console_process
    page = wait_for_sign_in_page(port)
    assert "<h1>Sign in</h1>" in page
    assert process.stdout is not None
    assert process.stdout.readline() == f"paigeant console on http://127.0.0.1:{port}/ (sqlite)\n"


@pytest.mark.slow
@pytest.mark.parametrize("console_process", [["--host", "0.0.0.0"]], indirect=True)
def test_another_host_is_served_with_a_warning(console_process: tuple[subprocess.Popen[str], int]) -> None:
    process, port = console_process
    wait_for_sign_in_page(port)
    process.terminate()
    _, err = process.communicate(timeout=10)
    assert "the console listens on 0.0.0.0, beyond this machine; put TLS in front of it" in err


def at(second: int) -> datetime:
    return datetime(2026, 1, 1, 12, 0, second, tzinfo=UTC)


def test_the_timeline_puts_branches_side_by_side_and_compensations_last() -> None:
    steps = [
        StepStatus(step=0, activity="reserve", state="completed", attempts=1),
        StepStatus(step=1, activity="quote-a", state="completed", attempts=1, branch="a"),
        StepStatus(step=1, activity="quote-b", state="completed", attempts=3, branch="b"),
        StepStatus(step=2, activity="charge", state="failed", attempts=2, error="declined"),
        StepStatus(step=0, activity="release", state="completed", attempts=1, undoes="reserve"),
    ]
    status = WorkflowStatus(correlation_id="w-1", state="compensated", steps=steps, started_at=at(0), updated_at=at(5))
    rows = [(row.step, row.kind, [cell.activity for cell in row.cells]) for row in timeline(status)]
    assert rows == [
        (0, "step", ["reserve"]),
        (1, "parallel", ["quote-a", "quote-b"]),
        (2, "step", ["charge"]),
        (0, "undo", ["release"]),
    ]


def test_secrets_are_redacted_at_any_depth() -> None:
    payload = {"user": {"name": "ana", "api_key": "sk-1", "tokens": ["a"]}, "items": [{"password": "x", "n": 1}]}
    assert redact(payload) == {
        "user": {"name": "ana", "api_key": "[redacted]", "tokens": "[redacted]"},
        "items": [{"password": "[redacted]", "n": 1}],
    }
    headers = {"Auth": "Basic YW5h", "x_bearer": "b", "db_pwd": "p", "author": "Ana", "authority": "ops"}
    assert redact(headers) == {
        "Auth": "[redacted]",
        "x_bearer": "[redacted]",
        "db_pwd": "[redacted]",
        "author": "Ana",
        "authority": "ops",
    }


def start_console(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "paigeant_ai.cli", "console", "--port", str(port)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.redis
@pytest.mark.slow
async def test_the_console_on_redis_shows_what_its_events_say(keyed: dict[str, str], tmp_path: Path) -> None:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:8]}"
    env = keyed | {"PAIGEANT_TRANSPORT": "redis", "PAIGEANT_REDIS_URL": REDIS_URL, "PAIGEANT_NAMESPACE": namespace}
    Users(env["PAIGEANT_CONSOLE_USERS"]).add("ana", PASSWORD, [])
    port = free_port()
    process = start_console(env, port)
    try:
        await asyncio.to_thread(wait_for_sign_in_page, port)
        key = load_signing_key(env["PAIGEANT_SIGNING_KEY_FILE"])
        async with get_transport("redis", url=REDIS_URL, namespace=namespace) as transport:
            dispatcher = WorkflowDispatcher(transport, security=MessageSigner(key, [key]))
            correlation_id = await dispatcher.dispatch_workflow(["pack"], {"order": "ord-9"})
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            login = await client.get("/login")
            csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
            assert csrf is not None
            await client.post("/login", data={"csrf": csrf.group(1), "name": "ana", "password": PASSWORD})
            rows = ""
            for _ in range(100):  # the console's projector applies the dispatcher's signed event
                rows = (await client.get("/workflows/rows")).text
                if correlation_id in rows:
                    break
                await asyncio.sleep(0.1)
            assert correlation_id in rows
            assert "pending" in rows
            page = (await client.get(f"/workflows/{correlation_id[:8]}")).text
            assert "Still to run</dt><dd>pack" in page
    finally:
        process.terminate()
        process.communicate(timeout=10)
        await delete_redis_namespace(namespace)


async def sign_in(client: httpx.AsyncClient, name: str) -> None:
    login = await client.get("/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', login.text)
    assert csrf is not None
    signed_in = await client.post("/login", data={"csrf": csrf.group(1), "name": name, "password": PASSWORD})
    assert signed_in.headers["location"] == "/workflows"


async def page_until(client: httpx.AsyncClient, path: str, wanted: str, seconds: float = 20) -> str:
    page = ""
    for _ in range(int(seconds * 10)):
        page = (await client.get(path)).text
        if wanted in page:
            return page
        await asyncio.sleep(0.1)
    raise AssertionError(f"{wanted!r} never showed on {path}:\n{page}")


@pytest.mark.rabbitmq
@pytest.mark.redis
@pytest.mark.slow
async def test_the_console_on_rabbitmq_answers_a_parked_ticket_of_a_real_worker(
    keyed: dict[str, str], tmp_path: Path
) -> None:
    require_rabbitmq()
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:8]}"
    env = keyed | {
        "PAIGEANT_TRANSPORT": "rabbitmq",
        "PAIGEANT_RABBITMQ_URL": RABBITMQ_URL,
        "PAIGEANT_REDIS_URL": REDIS_URL,  # the workflow store, on Redis beside RabbitMQ
        "PAIGEANT_SHARED_STORE_URL": REDIS_URL,  # where parked workflows wait
        "PAIGEANT_NAMESPACE": namespace,
    }
    Users(env["PAIGEANT_CONSOLE_USERS"]).add("ana", PASSWORD, ["approve"])
    key = load_signing_key(env["PAIGEANT_SIGNING_KEY_FILE"])
    shop = Shop()
    port = free_port()
    process = start_console(env, port)
    transport = get_transport("rabbitmq", url=RABBITMQ_URL, namespace=namespace)
    try:
        await asyncio.to_thread(wait_for_sign_in_page, port)
        async with (
            transport,
            RedisTransport(REDIS_URL, namespace=namespace) as shared,
        ):
            signer = MessageSigner(key, [key], replay_cache=shared.replay_cache())
            waiting = shared.waiting_store()
            dispatcher = WorkflowDispatcher(transport, security=signer, waiting_store=waiting)
            worker = Worker(transport, activities(shop), security=signer, waiting_store=waiting, shared_store=shared)
            async with worker:
                correlation_id = await dispatcher.dispatch_workflow(["answer-ticket"], {"ticket": "charged twice"})
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                    await sign_in(client, "ana")
                    await page_until(client, "/workflows/rows?state=waiting", correlation_id)
                    inbox = await page_until(client, "/approvals", correlation_id)
                    assert "refund" in inbox
                    csrf = re.search(r'name="csrf" value="([^"]+)"', inbox)
                    assert csrf is not None
                    decided = await client.post(
                        f"/approvals/{correlation_id}/r1", data={"decision": "approve", "csrf": csrf.group(1)}
                    )
                    assert decided.headers["location"] == f"/workflows/{correlation_id}"
                    page = await page_until(client, f"/workflows/{correlation_id}", ">completed<")
        assert "Dear customer: refunded 40 EUR on T-1042" in page
        assert "approved refund (r1) by ana" in page
        assert "called refund" in page  # what the agent step saw, recorded on RabbitMQ and kept on Redis
        assert shop.refunds == [{"ticket": "T-1042", "amount": 40}]
    finally:
        process.terminate()
        process.communicate(timeout=10)
        await delete_queues(getattr(transport, "_declared", set[str]()))
        await delete_redis_namespace(namespace)
