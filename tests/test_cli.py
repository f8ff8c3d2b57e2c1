from __future__ import annotations

import pytest

from paigeant_ai import UserError
from paigeant_ai.cli import load_object, main


def test_load_object_names_the_expected_form() -> None:
    with pytest.raises(UserError, match="expected module:attribute"):
        load_object("examples.onboarding")
    with pytest.raises(UserError, match="has no attribute 'nope'"):
        load_object("examples.onboarding:nope")


def test_worker_command_runs_a_burst(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "inmemory")
    assert main(["worker", "examples.onboarding:worker", "--burst"]) == 0
    assert "worker stopped: 0 steps completed" in capsys.readouterr().err


def test_worker_command_refuses_a_non_worker(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "examples.onboarding:ONBOARDING"]) == 2
    assert "is list, not a Worker" in capsys.readouterr().err


def test_dispatch_command_validates_variables(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dispatch", "first", "--variables", "[1]", "--transport", "inmemory"]) == 2
    assert "--variables must be a JSON object" in capsys.readouterr().err
    assert main(["dispatch", "first", "--variables", '{"a": 1}', "--transport", "inmemory"]) == 2
    assert "an in-memory workflow dies with this command's process" in capsys.readouterr().err
