"""`paigeant evals record` and `paigeant evals run` in their own processes, on workflows a real worker ran on SQLite
and signed: the dataset comes from SQLite's status store, and the exit code gates a deploy. And the same workflows
recorded from Redis's status store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from paigeant_ai import WorkflowProjector, get_transport
from paigeant_ai.evals import RecordedStep, load_dataset, record_dataset, replay_dataset
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports.base import SharedStores

from .brokers import clean, make_transport
from .support_records import CHANGED, OBO_TOKEN, changed_classifier, run_support_workflows

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = "classify-ticket-priority=tests.support_records:"


def paigeant(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paigeant_ai.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


KEY = generate_key("evals-test")


@pytest.fixture
async def sqlite_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a service whose 20 support workflows ran to their end on a SQLite file, signed."""
    key = KEY
    path, namespace = tmp_path / "paigeant.db", f"paigeant-test-{uuid.uuid4().hex[:12]}"
    async with get_transport("sqlite", path=str(path), namespace=namespace) as transport:
        await run_support_workflows(transport, security=MessageSigner(key))
    env = {name: value for name, value in os.environ.items() if not name.startswith("PAIGEANT_")}
    return env | {
        "PAIGEANT_TRANSPORT": "sqlite",
        "PAIGEANT_SQLITE_PATH": str(path),
        "PAIGEANT_NAMESPACE": namespace,
        "PAIGEANT_TRUSTED_KEYS": json.dumps({"keys": [key.as_dict(private=False)]}),
    }


def test_record_on_sqlite_then_run_exits_1_on_exactly_the_five_regressions(
    sqlite_env: dict[str, str], tmp_path: Path
) -> None:
    dataset_file = str(tmp_path / "support.yaml")
    recorded = paigeant("evals", "record", dataset_file, "--activity", "classify-ticket-priority", env=sqlite_env)
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout.strip() == f"recorded 20 steps of 20 workflows to {dataset_file}"
    assert OBO_TOKEN not in Path(dataset_file).read_text()

    offline = {name: value for name, value in sqlite_env.items() if not name.startswith("PAIGEANT_")}
    changed = paigeant("evals", "run", dataset_file, "--activity", CANDIDATES + "changed_classifier", env=offline)
    assert changed.returncode == 1, changed.stderr
    lines = changed.stdout.splitlines()
    regressions = [line for line in lines if line.startswith("REGRESSION ")]
    assert len(regressions) == 5
    assert all(line.endswith(": FieldsMatch: priority: expected 'normal', got 'low'") for line in regressions)
    dataset = load_dataset(dataset_file)
    expected = {
        case.name
        for case in dataset.cases
        if isinstance(case.inputs, RecordedStep) and case.inputs.payload["customer"] in CHANGED
    }
    assert {line.removeprefix("REGRESSION ").split(": ")[0] for line in regressions} == expected
    assert lines[-1] == "5 of 20 replayed cases regressed (20 not replayed)"
    assert changed.stderr.strip() == "FAIL: 5 regressions, 0 allowed"

    allowed = ["--max-regressions", "5"]
    tolerated = paigeant(
        "evals", "run", dataset_file, "--activity", CANDIDATES + "changed_classifier", *allowed, env=offline
    )
    assert tolerated.returncode == 0, tolerated.stderr

    same = paigeant(
        "evals", "run", dataset_file, "--activity", CANDIDATES + "same_classifier", "--logfire", env=offline
    )
    assert same.returncode == 0, same.stderr
    assert same.stdout.splitlines() == ["0 of 20 replayed cases regressed (20 not replayed)"]


async def test_the_sqlite_status_store_keeps_what_each_agent_step_saw_and_produced(
    sqlite_env: dict[str, str],
) -> None:
    path, namespace = sqlite_env["PAIGEANT_SQLITE_PATH"], sqlite_env["PAIGEANT_NAMESPACE"]
    async with get_transport("sqlite", path=path, namespace=namespace) as transport:
        assert isinstance(transport, SharedStores)
        store = transport.workflow_store()
        verifier = MessageSigner(None, [KEY])  # the events are applied once their signature holds
        projector = WorkflowProjector(transport, store, security=verifier)
        await projector.run(burst=True)
        assert projector.applied > 0
        assert dict(projector.refused) == {}
        dataset = await record_dataset(store)
    steps = [case for case in dataset.cases if isinstance(case.inputs, RecordedStep)]
    assert len(steps) == 40
    assert len(dataset.cases) == 60
    assert {case.inputs.activity for case in steps if isinstance(case.inputs, RecordedStep)} == {
        "classify-ticket-priority",
        "generate-response",
    }


def test_in_memory_workflows_cannot_be_recorded_from_another_process(tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PAIGEANT_")}
    result = paigeant("evals", "record", str(tmp_path / "x.yaml"), "--transport", "inmemory", env=env)
    assert result.returncode == 2
    assert "record them there (paigeant_ai.evals.record_dataset)" in result.stderr


def test_a_candidate_that_is_not_an_agent_is_refused(tmp_path: Path) -> None:
    dataset = tmp_path / "empty.yaml"
    dataset.write_text("name: empty\ncases: []\n")
    env = {name: value for name, value in os.environ.items() if not name.startswith("PAIGEANT_")}
    result = paigeant("evals", "run", str(dataset), "--activity", "x=tests.support_records:CHANGED", env=env)
    assert result.returncode == 2
    assert "is a list: name an Agent or an AgentActivity" in result.stderr
    result = paigeant("evals", "run", str(dataset), "--activity", "tests.support_records:CHANGED", env=env)
    assert "--activity takes NAME=module:agent" in result.stderr


@pytest.mark.redis
async def test_workflows_recorded_from_redis_replay_as_those_recorded_elsewhere() -> None:
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    transport = make_transport("redis", namespace)
    try:
        async with transport:
            await run_support_workflows(transport, security=MessageSigner(KEY))
            assert isinstance(transport, SharedStores)
            store = transport.workflow_store()
            projector = WorkflowProjector(transport, store, security=MessageSigner(None, [KEY]))
            await projector.run(burst=True)
            assert dict(projector.refused) == {}
            dataset = await record_dataset(store, activities=["classify-ticket-priority"])
    finally:
        await clean(transport, namespace)
    assert len(dataset.cases) == 40
    report = await replay_dataset(dataset, {"classify-ticket-priority": changed_classifier})
    changed = {
        case.name
        for case in dataset.cases
        if isinstance(case.inputs, RecordedStep) and case.inputs.payload["customer"] in CHANGED
    }
    assert set(report.regressions) == changed
    assert len(changed) == 5
