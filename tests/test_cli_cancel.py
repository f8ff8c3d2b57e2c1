"""`paigeant cancel`: a workflow run by a worker is cancelled from another process, and ends `cancelled`."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from paigeant_ai import ActivityContext, Worker, WorkflowDispatcher, activity
from paigeant_ai.approval import get_waiting_store
from paigeant_ai.cli import _parser, main
from paigeant_ai.security import generate_key
from paigeant_ai.transports.redis import RedisTransport

from .brokers import (
    RABBITMQ_URL,
    REDIS_URL,
    ROOT,
    delete_rabbitmq_namespace,
    delete_redis_namespace,
    make_transport,
    redis_command_line,
)
from .scripted import refunder


def test_cancel_takes_its_options_and_the_connection_options() -> None:
    args = _parser().parse_args(["cancel", "6e5c217c", "--reason", "withdrawn", "--by", "alice", "--json", "-v"])
    assert (args.command, args.correlation_id, args.reason, args.by, args.json, args.verbose) == (
        "cancel",
        "6e5c217c",
        "withdrawn",
        "alice",
        True,
        True,
    )
    args = _parser().parse_args(["--transport", "redis", "cancel", "6e5c217c"])
    assert (args.transport, args.reason, args.by, args.json) == ("redis", "", None, False)


def test_cancel_refuses_the_in_memory_transport_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["cancel", "6e5c217c", "--transport", "inmemory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paigeant: an in-memory workflow lives in the process that dispatched it: cancel it there")
    assert err.count("\n") == 1


# -- on Redis, across processes ---------------------------------------------------------------------------------


@pytest.fixture
def namespace(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test Redis, in a namespace of its own, with one key that signs and is trusted (no trust policy: it may
    cancel) for this process and the `paigeant` processes it starts."""
    name = redis_command_line(monkeypatch)
    key = generate_key("ops-1")
    monkeypatch.delenv("PAIGEANT_ALLOW_UNSIGNED")
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(key.as_dict(private=True)))
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", json.dumps({"keys": [key.as_dict(private=False)]}))
    yield name
    asyncio.run(delete_redis_namespace(name))


async def paigeant(*argv: str) -> tuple[int, str]:
    """Run the `paigeant` command in a process of its own; its exit code and what it printed."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "paigeant_ai.cli", *argv),
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


async def status_of(correlation_id: str) -> dict[str, object]:
    code, out = await paigeant("status", correlation_id, "--json")
    assert code == 0, out
    return json.loads(out[out.index("{") :])


@pytest.mark.redis
@pytest.mark.parametrize("broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def test_a_running_workflow_cancelled_by_the_command_ends_cancelled_with_its_steps_undone(
    namespace: str, broker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if broker == "rabbitmq":  # the cancel goes on RabbitMQ; `status` reads the workflow store in Redis
        monkeypatch.setenv("PAIGEANT_TRANSPORT", "rabbitmq")
        monkeypatch.setenv("PAIGEANT_RABBITMQ_URL", RABBITMQ_URL)
    started, interrupted, undone = asyncio.Event(), asyncio.Event(), list[str]()

    @activity(name="reserve-stock", compensate="release-stock")
    async def reserve(ctx: ActivityContext) -> dict[str, str]:
        return {"reservation": "r-1"}

    @activity(name="release-stock")
    async def release(ctx: ActivityContext) -> None:
        assert ctx.undoing is not None
        assert ctx.unwinding is not None
        undone.append(f"{ctx.undoing.output['reservation']} ({ctx.unwinding.cause}: {ctx.unwinding.reason})")

    @activity(name="charge-card")
    async def charge(ctx: ActivityContext) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            interrupted.set()
            raise

    @activity(name="ship-order")
    async def ship(ctx: ActivityContext) -> None:
        raise AssertionError("a cancelled workflow never reaches its next step")

    async with make_transport(broker, namespace) as transport:
        worker = Worker(transport, [reserve, release, charge, ship])
        worker.cancel_poll = 0.1
        async with worker:
            correlation_id = await WorkflowDispatcher(transport).dispatch_workflow(
                [reserve, charge, ship], {"order": 42}
            )
            await asyncio.wait_for(started.wait(), 10)

            code, out = await paigeant("cancel", correlation_id[:13], "--reason", "customer withdrew", "--by", "alice")
            assert (code, out) == (
                0,
                f"cancel requested: workflow {correlation_id!r} will stop before its next step, and a step of it "
                "running now is interrupted\n",
            )
            await asyncio.wait_for(interrupted.wait(), 10)
            deadline = time.monotonic() + 20
            while (status := await status_of(correlation_id))["state"] != "cancelled":
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.2)

    assert undone == ["r-1 (cancelled: cancelled by alice: customer withdrew)"]
    assert status["cancelled"] == "cancelled by alice: customer withdrew"
    steps = [(step["activity"], step["state"]) for step in status["steps"]]  # pyright: ignore[reportGeneralTypeIssues]
    assert steps == [("reserve-stock", "completed"), ("release-stock", "completed"), ("charge-card", "failed")]
    assert (worker.stats.cancelled, worker.stats.compensated) == (1, 1)

    code, out = await paigeant("cancel", correlation_id, "--json")
    assert code == 0
    assert json.loads(out) == {
        "correlation_id": correlation_id,
        "state": "finished",
        "detail": f"workflow {correlation_id!r} had already ended cancelled; nothing was cancelled",
    }
    code, out = await paigeant("cancel", correlation_id)
    assert (code, out) == (
        0,
        f"nothing changed: workflow {correlation_id!r} had already ended cancelled; nothing was cancelled\n",
    )
    if broker == "rabbitmq":
        await delete_rabbitmq_namespace(namespace)


@pytest.mark.redis
async def test_cancelling_an_id_nobody_knows_says_so_and_posts_nothing(namespace: str) -> None:
    code, out = await paigeant("cancel", "no-such-workflow")
    assert (code, out) == (
        1,
        "no workflow 'no-such-workflow' is known: check the ID (`paigeant workflows` lists them)\n",
    )
    code, out = await paigeant("cancel", "no-such-workflow", "--json")
    assert code == 1
    assert json.loads(out)["state"] == "unknown"
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        board = transport.cancel_board()
        await board.open()
        try:
            assert await board.records("no-such-workflow") == []
        finally:
            await board.close()


def test_the_token_comes_from_a_file_never_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = ["--transport", "redis", "-b", "redis://127.0.0.1:1/0"]
    assert main(["cancel", "6e5c217c", *unreachable, "--token-file", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err == f"paigeant: cannot read --token-file '{tmp_path / 'nope'}': No such file or directory\n"
    (tmp_path / "empty").write_text(" \n")
    assert main(["cancel", "6e5c217c", *unreachable, "--token-file", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err == f"paigeant: --token-file '{tmp_path / 'empty'}' is empty: put the requester's token in it\n"
    (tmp_path / "token").write_text("eyJ.token.sig\n")
    assert main(["cancel", "6e5c217c", *unreachable, "--token-file", str(tmp_path / "token")]) == 2
    assert "is unreachable" in capsys.readouterr().err  # the token was read; then the broker was tried


@pytest.mark.redis
async def test_a_workflow_waiting_for_approval_is_released_by_the_command_and_undone(namespace: str) -> None:
    undone: list[str] = []

    @activity(name="reserve-stock", compensate="release-stock")
    async def reserve(ctx: ActivityContext) -> dict[str, str]:
        return {"reservation": "r-7"}

    @activity(name="release-stock")
    async def release(ctx: ActivityContext) -> None:
        assert ctx.undoing is not None
        undone.append(str(ctx.undoing.output["reservation"]))

    refund = refunder()
    async with RedisTransport(REDIS_URL, namespace=namespace) as transport:
        worker = Worker(transport, [reserve, release, refund], waiting_store=get_waiting_store(transport))
        correlation_id = await WorkflowDispatcher(transport).dispatch_workflow([reserve, refund])
        await worker.run(burst=True)
        assert (await status_of(correlation_id))["state"] == "waiting"

        code, out = await paigeant("cancel", correlation_id, "--reason", "refund withdrawn")
        assert (code, out) == (
            0,
            f"cancelled: workflow {correlation_id!r} waited at 'refund-order'; it was released and its "
            "compensations started\n",
        )
        assert await get_waiting_store(transport).get(correlation_id) is None
        await worker.run(burst=True)

    assert undone == ["r-7"]
    status = await status_of(correlation_id)
    assert (status["state"], status["cancelled"]) == ("cancelled", "cancelled by ops-1: refund withdrawn")
