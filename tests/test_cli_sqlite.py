"""`paigeant status`, `workflows` and `cancel` on SQLite read the workflow store in the SQLite file, never Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paigeant_ai import ActivityContext, Worker, WorkflowDispatcher, activity
from paigeant_ai.approval import get_waiting_store
from paigeant_ai.cli import main
from paigeant_ai.security import generate_key
from paigeant_ai.transports.sqlite import SQLiteTransport

from .scripted import refunder
from .test_cli_cancel import paigeant


@pytest.fixture
def database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A SQLite file the `paigeant` processes this test starts use, with a Redis nobody can reach: a command that
    asked Redis would fail. One key signs and is trusted (no trust policy: it may cancel)."""
    path = tmp_path / "paigeant.sqlite3"
    key = generate_key("ops-1")
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "sqlite")
    monkeypatch.setenv("PAIGEANT_SQLITE_PATH", str(path))
    monkeypatch.setenv("PAIGEANT_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("PAIGEANT_SIGNING_KEY", json.dumps(key.as_dict(private=True)))
    monkeypatch.setenv("PAIGEANT_TRUSTED_KEYS", json.dumps({"keys": [key.as_dict(private=False)]}))
    return path


@activity(name="check-customer")
async def check_customer(ctx: ActivityContext) -> dict[str, str]:
    return {"customer": "known"}


IDS = ["6e5c217c-first", "6e5c9a01-second", "a_%-literal", "ab-other"]


async def test_status_by_prefix_and_workflows_read_the_sqlite_file(database: Path) -> None:
    async with SQLiteTransport(database) as transport:
        dispatcher = WorkflowDispatcher(transport)
        for correlation_id in IDS:
            await dispatcher.dispatch_workflow([check_customer], correlation_id=correlation_id)
        await Worker(transport, [check_customer]).run(burst=True)

    code, out = await paigeant("status", "6e5c2", "--json")  # applies the events waiting in the file first
    assert code == 0, out
    status = json.loads(out)
    assert (status["correlation_id"], status["state"]) == ("6e5c217c-first", "completed")

    code, out = await paigeant("status", "6e5c")
    assert (code, out) == (
        2,
        "paigeant: '6e5c' is the start of 2 workflows: 6e5c217c-first, 6e5c9a01-second; give more of the ID\n",
    )
    code, out = await paigeant("status", "a_", "--no-sync")  # SQL wildcards are taken as they are
    assert (code, out.splitlines()[0]) == (0, "workflow a_%-literal: completed")
    for missing in ("a%", "A_", "6e5c217c-first-and-more"):
        code, out = await paigeant("status", missing, "--no-sync")
        assert (code, out) == (
            1,
            f"no workflow {missing!r} in the store (unknown, expired, or its events not yet applied)\n",
        )

    code, out = await paigeant("workflows", "--json")
    assert code == 0, out
    listed = json.loads(out)
    assert sorted(workflow["correlation_id"] for workflow in listed) == sorted(IDS)
    assert {workflow["state"] for workflow in listed} == {"completed"}


async def test_cancel_by_prefix_releases_a_waiting_workflow_on_sqlite(database: Path) -> None:
    refund = refunder()
    async with SQLiteTransport(database) as transport:
        worker = Worker(transport, [check_customer, refund], waiting_store=get_waiting_store(transport))
        correlation_id = await WorkflowDispatcher(transport).dispatch_workflow([check_customer, refund])
        await worker.run(burst=True)

        code, out = await paigeant("cancel", correlation_id[:8], "--reason", "refund withdrawn")
        assert (code, out) == (
            0,
            f"cancelled: workflow {correlation_id!r} waited at 'refund-order'; it was released, with nothing to undo\n",
        )
        assert await get_waiting_store(transport).get(correlation_id) is None
        await worker.run(burst=True)

    code, out = await paigeant("status", correlation_id, "--json")
    assert code == 0, out
    status = json.loads(out)
    assert (status["state"], status["cancelled"]) == ("cancelled", "cancelled by ops-1: refund withdrawn")


def test_status_refuses_the_in_memory_transport_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["status", "6e5c217c"], ["workflows"]):
        assert main([*command, "--transport", "inmemory"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("paigeant: in-memory workflows live in the process that runs them: ask its")
        assert err.count("\n") == 1
