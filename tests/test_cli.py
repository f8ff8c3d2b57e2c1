from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import paigeant_ai
from paigeant_ai import UserError
from paigeant_ai.cli import _parser, load_object, main


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


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"paigeant {paigeant_ai.__version__}\n"


BROKER_COMMANDS = [
    ["worker", "examples.onboarding:worker"],
    ["dispatch", "first"],
    ["status", "6e5c217c"],
    ["workflows"],
    ["cancel", "6e5c217c"],
    ["dead-letters"],
]
OPTIONS = ["--transport", "redis", "-b", "redis://127.0.0.1:1/0", "--namespace", "elsewhere", "-v"]


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda command: command[0])
def test_every_broker_command_takes_the_connection_options_before_or_after_its_name(command: list[str]) -> None:
    for argv in ([*OPTIONS, *command], [*command, *OPTIONS], [*OPTIONS[:2], *command, *OPTIONS[2:]]):
        args = _parser().parse_args(argv)
        assert (args.transport, args.broker_url, args.namespace, args.verbose) == (
            "redis",
            "redis://127.0.0.1:1/0",
            "elsewhere",
            True,
        ), argv
    args = _parser().parse_args(command)
    assert (args.transport, args.broker_url, args.namespace, args.verbose) == (None, None, None, False)


@pytest.mark.parametrize("command", BROKER_COMMANDS[1:], ids=lambda command: command[0])
def test_a_command_gives_up_on_an_unreachable_redis_within_seconds(
    command: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAIGEANT_ALLOW_UNSIGNED", "1")
    started = time.monotonic()
    assert main([*command, "--transport", "redis", "--broker-url", "redis://127.0.0.1:1/0"]) == 2
    assert time.monotonic() - started < 5
    err = capsys.readouterr().err
    assert err.startswith("paigeant: Redis at redis://127.0.0.1:1/0 is unreachable while connecting")
    assert err.count("\n") == 1


def test_a_command_gives_up_on_an_unreachable_rabbitmq_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dead-letters", "-b", "amqp://guest:guest@127.0.0.1:1/"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("paigeant: cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/")
    assert err.count("\n") == 1  # and the AMQP client's own log of the failure is not repeated


def test_the_options_apply_for_the_command_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_NAMESPACE", "mine")
    monkeypatch.delenv("PAIGEANT_REDIS_URL", raising=False)
    assert main(["workflows", "--namespace", "theirs", "-b", "redis://127.0.0.1:1/0"]) == 2
    assert os.environ["PAIGEANT_NAMESPACE"] == "mine"
    assert "PAIGEANT_REDIS_URL" not in os.environ


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--transport", "kafka"], "unknown --transport 'kafka'; use inmemory, rabbitmq, redis or sqlite"),
        (["-b", "http://u:pw@host/"], "--broker-url 'http://u:***@host/' is neither a redis:// nor an amqp:// URL"),
        (["--transport", "rabbitmq", "-b", "redis://h/0"], "--broker-url is a redis URL but --transport is rabbitmq"),
        (["--namespace", " "], "--namespace must not be empty"),
        (["--limit", "0"], "--limit must be at least 1, got 0"),
    ],
)
def test_a_wrong_option_is_one_line(argv: list[str], error: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workflows", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"paigeant: {error}")
    assert err.count("\n") == 1


def test_keys_that_cannot_be_written_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("")
    assert main(["keys", "generate", "orders", "--out-dir", str(tmp_path / "file" / "keys")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"paigeant: cannot write the keys to '{tmp_path / 'file' / 'keys'}': Not a directory")
    assert err.count("\n") == 1
