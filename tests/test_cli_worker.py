"""`paigeant worker`: its start banner, its step log with `-v`, and what it says about the in-memory transport.

The workers the command runs here are built by the functions below (`tests.test_cli_worker:<function>`), at the
moment the command calls them, so each test's settings apply.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from paigeant_ai import (
    ActivityContext,
    InMemoryTransport,
    NonRetryableError,
    RetryActivity,
    Worker,
    WorkflowDispatcher,
    activity,
    get_transport,
)
from paigeant_ai._advertiser import Advertiser
from paigeant_ai._cli_keys import generate_keys
from paigeant_ai.approval import InMemoryWaitingStore
from paigeant_ai.cli import main
from paigeant_ai.exceptions import TransportError

from .brokers import REDIS_URL, delete_redis_namespace, require_redis
from .scripted import refunder

ROOT = Path(__file__).resolve().parent.parent


@activity(name="greet")
async def greet(ctx: ActivityContext) -> dict[str, str]:
    return {"greeting": "hello"}


@activity(name="flaky")
async def flaky(ctx: ActivityContext) -> dict[str, str]:
    if ctx.attempt == 0:
        raise RetryActivity("the service is busy", delay=0)
    return {"flaky": "ok"}


@activity(name="refuse")
async def refuse(ctx: ActivityContext) -> None:
    raise NonRetryableError("address refused")


async def four_workflows() -> Worker:
    """A worker on a transport that already holds four workflows: one done, one retried, one faulted, one parked."""
    transport = InMemoryTransport()
    await transport.connect()
    refund = refunder()
    dispatcher = WorkflowDispatcher(transport)
    await dispatcher.dispatch_workflow([greet], correlation_id="11111111-done")
    await dispatcher.dispatch_workflow([flaky], correlation_id="22222222-retried")
    await dispatcher.dispatch_workflow([refuse], correlation_id="33333333-faulted")
    await dispatcher.dispatch_workflow([refund], correlation_id="44444444-parked")
    return Worker(transport, [greet, flaky, refuse, refund], waiting_store=InMemoryWaitingStore())


_cancelling: list[WorkflowDispatcher] = []


@activity(name="wait-for-customer")
async def wait_for_customer(ctx: ActivityContext) -> None:
    await _cancelling[0].cancel(ctx.message.correlation_id, "the customer withdrew", by="alice")
    await asyncio.sleep(30)  # interrupted by the cancel


async def cancelled_mid_step() -> Worker:
    """A worker whose one workflow is cancelled while its step runs."""
    transport = InMemoryTransport()
    await transport.connect()
    _cancelling[:] = [dispatcher := WorkflowDispatcher(transport)]
    await dispatcher.dispatch_workflow([wait_for_customer], correlation_id="55555555-cancelled")
    return Worker(transport, [wait_for_customer])


def greeter() -> Worker:
    """A worker on the transport the settings choose."""
    return Worker(get_transport(), [greet, flaky])


def memory_greeter() -> Worker:
    return Worker(InMemoryTransport(), [greet])


def fixed_greeter() -> Worker:
    from paigeant_ai.transports.redis import RedisTransport

    return Worker(RedisTransport(REDIS_URL, namespace="fixed"), [greet], allow_unsigned=True)


def needs_a_transport(transport: InMemoryTransport) -> Worker:
    return Worker(transport, [greet])


def step_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [record.getMessage() for record in caplog.records if record.name == "paigeant_ai.cli"]
    return sorted(re.sub(r"in \d+\.\d{3}s", "in <s>", line) for line in lines)


# -- the banner ------------------------------------------------------------------------------------------------


@pytest.fixture
def namespace() -> Iterator[str]:
    require_redis()
    name = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    yield name
    asyncio.run(delete_redis_namespace(name))


@pytest.mark.redis
def test_the_banner_says_where_the_worker_connects_and_how_it_signs(
    namespace: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, public, kid = generate_keys("billing", out_dir=tmp_path)
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY_FILE", str(tmp_path / "billing.private.jwk.json"))
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS_FILE", str(public))
    parts = urlsplit(REDIS_URL)
    url = f"redis://default:s3cret@{parts.netloc}{parts.path}"  # Redis without a password accepts any
    argv = ["worker", "tests.test_cli_worker:greeter", "--burst", "-b", url, "--namespace", namespace]

    assert main([*argv, "--concurrency", "3"]) == 0
    err = capsys.readouterr().err
    assert "s3cret" not in err
    banner = err.split("\nworker stopped")[0]
    assert re.fullmatch(
        re.escape(
            "paigeant 0.1.0 worker tests.test_cli_worker:greeter\n"
            f"  transport    redis redis://default:***@{parts.netloc}{parts.path}\n"
            f"  namespace    {namespace}\n"
            f"  queues       {namespace}:{{q:greet}}, {namespace}:{{q:flaky}}\n"
            "  concurrency  3\n"
            f"  signing key  {kid}\n"
            "  ready        consuming, on the registry as "
        )
        + r"\S+-\d+-[0-9a-f]{8}",
        banner,
    )


def unsigned_burst_on_redis(namespace: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The command line of an unsigned `--burst` worker on Redis, in `namespace`."""
    monkeypatch.setenv("PAIGEANT_ALLOW_UNSIGNED", "1")
    monkeypatch.setenv("PAIGEANT_REDIS_URL", REDIS_URL)
    return ["worker", "tests.test_cli_worker:greeter", "--burst", "--transport", "redis", "--namespace", namespace]


@pytest.mark.redis
def test_the_banner_says_ready_only_once_the_worker_is_on_the_registry(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = unsigned_burst_on_redis(namespace, monkeypatch)
    said: list[str] = []  # what the worker printed, read as each post of its record finished
    post = Advertiser._post

    async def slow_post(self: Advertiser, *, stopped: bool) -> None:
        await asyncio.sleep(0.3)  # a slow broker: the banner is out long before the record is posted
        said.append(capsys.readouterr().err)
        await post(self, stopped=stopped)

    monkeypatch.setattr(Advertiser, "_post", slow_post)
    assert main(argv) == 0
    said.append(capsys.readouterr().err)
    assert "  signing key  unsigned\n" in said[0]
    assert "  ready " not in said[0]  # the banner was out, its last line was not: the record was not posted yet
    assert re.search(r"\n  ready        consuming, on the registry as \S+\n", "".join(said))


@pytest.mark.redis
def test_the_banner_says_when_the_worker_is_not_on_the_registry_yet(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = unsigned_burst_on_redis(namespace, monkeypatch)

    async def failing_post(self: Advertiser, *, stopped: bool) -> None:
        raise TransportError("the registry is away")

    monkeypatch.setattr(Advertiser, "_post", failing_post)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"\n  ready        consuming; not on the registry yet \(trying again every \d+s\)\n", err)


@pytest.mark.redis
def test_the_banner_of_an_unsigned_worker(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAIGEANT_ALLOW_UNSIGNED", "1")
    monkeypatch.setenv("PAIGEANT_REDIS_URL", REDIS_URL)
    assert (
        main(["worker", "tests.test_cli_worker:greeter", "--burst", "--transport", "redis", "--namespace", namespace])
        == 0
    )
    assert "\n  signing key  unsigned\n" in capsys.readouterr().err


def test_the_banner_of_an_in_memory_worker(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "inmemory")
    assert main(["worker", "tests.test_cli_worker:greeter", "--burst"]) == 0
    err = capsys.readouterr().err
    assert "  transport    inmemory (this process only)\n" in err
    assert re.search(r"\n  signing key  ephemeral-[0-9a-f]{8} \(made for this process\)\n", err)
    assert "no other process" not in err  # a burst run drains what its own process dispatched


# -- the step log ----------------------------------------------------------------------------------------------


def test_verbose_logs_one_line_per_step(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "tests.test_cli_worker:four_workflows", "--burst", "-v"]) == 0
    assert step_lines(caplog) == [
        "[11111111] done    step 0 greet attempt 1 in <s>",
        "[11111111] started step 0 greet attempt 1",
        "[22222222] done    step 0 flaky attempt 2 in <s>",
        "[22222222] retry   step 0 flaky attempt 1: RetryActivity: the service is busy; attempt 2 in 0.00s",
        "[22222222] started step 0 flaky attempt 1",
        "[22222222] started step 0 flaky attempt 2",
        "[33333333] faulted step 0 refuse attempt 1: NonRetryableError: address refused",
        "[33333333] started step 0 refuse attempt 1",
        "[44444444] parked  step 0 refund-order attempt 1: waiting for approval of refund (call-1)",
        "[44444444] started step 0 refund-order attempt 1",
    ]
    assert all(record.levelno == logging.INFO for record in caplog.records if record.name == "paigeant_ai.cli")
    assert "worker stopped: 2 steps completed, 1 retried, 1 faulted" in capsys.readouterr().err


def test_verbose_logs_a_step_a_cancel_interrupted_as_stopped_not_faulted(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["worker", "tests.test_cli_worker:cancelled_mid_step", "--burst", "-v"]) == 0
    assert step_lines(caplog) == [
        "[55555555] started step 0 wait-for-customer attempt 1",
        "[55555555] stopped step 0 wait-for-customer attempt 1: interrupted: cancelled by alice: the customer withdrew",
    ]
    assert "0 faulted" in capsys.readouterr().err


def test_without_verbose_no_step_is_logged(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    assert main(["worker", "tests.test_cli_worker:four_workflows", "--burst"]) == 0
    assert step_lines(caplog) == []
    assert [record.levelno for record in caplog.records if record.name.startswith("paigeant_ai")] == [
        logging.WARNING,  # the faulted workflow
    ]
    assert "worker stopped: 2 steps completed" in capsys.readouterr().err


# -- mistakes ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--concurrency", "0"], "--concurrency must be at least 1, got 0"),
        (["--concurrency", "-2"], "--concurrency must be at least 1, got -2"),
        (["--transport", "redis"], "tests.test_cli_worker:memory_greeter runs on the inmemory transport, not redis"),
        (["--transport", "redis", "--namespace", "other"], "runs in the namespace 'fixed', not 'other'"),
    ],
)
def test_a_worker_that_cannot_run_as_asked_is_one_line(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = "fixed_greeter" if "--namespace" in argv else "memory_greeter"
    assert main(["worker", f"tests.test_cli_worker:{target}", "--burst", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paigeant: ")
    assert error in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("target", "error"),
    [
        (
            "no_such_module:worker",
            "no module named 'no_such_module' (from 'no_such_module:worker'); expected module:attribute",
        ),
        ("tests.no_such_module:worker", "no module named 'tests.no_such_module'"),
        ("tests.test_cli_worker:nope", "'tests.test_cli_worker' has no attribute 'nope'; expected module:attribute"),
        ("tests.test_cli_worker", "expected module:attribute, got 'tests.test_cli_worker'"),
        ("no/such/file.py:worker", "no file 'no/such/file.py'; expected module:attribute or path/to/file.py:attribute"),
        ("tests.test_cli_worker:needs_a_transport", "takes arguments; point at a Worker, or a function without any"),
        ("tests.test_cli_worker:ROOT", "is PosixPath, not a Worker"),
        ("examples/onboarding.py:worker", "'examples/onboarding.py' is part of a package (it imports relatively); "),
    ],
)
def test_a_target_that_is_not_found_is_one_line(
    target: str, error: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["worker", target]) == 2
    err = capsys.readouterr().err
    assert error in err
    assert err.startswith("paigeant: ")
    assert err.count("\n") == 1


# -- the in-memory transport ----------------------------------------------------------------------------------


def read_until(process: subprocess.Popen[bytes], text: bytes, timeout: float = 30.0) -> bytes:
    """What `process` writes to stderr up to the line that holds `text` (fails after `timeout` seconds)."""
    assert process.stderr is not None
    seen, deadline = b"", time.monotonic() + timeout
    while text not in seen or not seen.endswith(b"\n"):
        ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(process.stderr.fileno(), 4096) if ready else b""
        assert chunk, f"no {text!r} from the worker; it wrote: {seen.decode()}"
        seen += chunk
    return seen


def test_an_in_memory_worker_says_no_other_process_can_reach_it() -> None:
    env = {**os.environ, "PAIGEANT_TRANSPORT": "inmemory"}
    command = [str(Path(sys.executable).with_name("paigeant")), "worker", "tests.test_cli_worker:greeter"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    try:
        started = read_until(process, b"paigeant: warning").decode()
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=30)[1].decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert started.startswith("paigeant 0.1.0 worker tests.test_cli_worker:greeter\n")
    assert started.endswith(
        "\npaigeant: warning: the in-memory transport lives in this process, so no other process can send this "
        "worker a step; run it on a broker: --transport sqlite|redis|rabbitmq (or PAIGEANT_TRANSPORT)\n"
    )
    assert process.returncode == 0
    assert "worker stopped: 0 steps completed" in rest
