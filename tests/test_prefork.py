"""`paigeant worker --processes N`: what is refused before or as the worker processes start, in one line.

The supervisor runs here, in the test's process; its children are real `python -m paigeant_ai.cli` processes that
fail as they start, so no broker is needed. The workers of real brokers are in `test_prefork_processes.py`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from paigeant_ai import Worker
from paigeant_ai._prefork import ChildSlot, SupervisorLink
from paigeant_ai.cli import main
from paigeant_ai.exceptions import UserError

ROOT = Path(__file__).resolve().parent.parent
IN_MEMORY = (
    "paigeant: the in-memory transport lives in one process, so 2 processes would not share its queues: run "
    "--processes 1, or run on a broker: --transport redis|rabbitmq (or PAIGEANT_TRANSPORT)\n"
)


def broken() -> Worker:
    """A worker function that fails with something other than a paigeant error, every time."""
    raise RuntimeError("the model registry is down")


@pytest.fixture(autouse=True)
def in_the_project(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("PAIGEANT_PROCESSES", raising=False)


@pytest.mark.parametrize(
    ("argv", "env", "error"),
    [
        (["--processes", "0"], "", "paigeant: --processes must be at least 1, got 0\n"),
        (["--processes", "-3"], "", "paigeant: --processes must be at least 1, got -3\n"),
        ([], "0", "paigeant: PAIGEANT_PROCESSES must be at least 1, got 0\n"),
        ([], "two", "paigeant: PAIGEANT_PROCESSES='two' is not an integer\n"),
        (["--processes", "2", "--transport", "inmemory"], "", IN_MEMORY),
    ],
)
def test_a_number_of_processes_that_cannot_run_is_one_line_before_any_starts(
    argv: list[str], env: str, error: str, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    if env:
        monkeypatch.setenv("PAIGEANT_PROCESSES", env)
    assert main(["worker", "no_such_module:worker", *argv]) == 2
    assert capfd.readouterr() == ("", error)


def test_a_target_that_is_not_found_is_one_line_from_the_supervisor(capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "no_such_module:worker", "--processes", "2"]) == 2
    assert capfd.readouterr() == (
        "",
        "paigeant: no module named 'no_such_module' (from 'no_such_module:worker'); expected module:attribute, "
        "importable from the current directory (for example examples.onboarding:worker)\n",
    )


def test_a_worker_on_the_in_memory_transport_is_refused_by_its_processes(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "inmemory")  # the command line does not say: the worker tells
    assert main(["worker", "tests.test_cli_worker:greeter", "--processes", "2"]) == 2
    assert capfd.readouterr() == ("", IN_MEMORY)


@pytest.mark.slow
def test_a_child_that_keeps_failing_as_it_starts_stops_the_supervisor(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert main(["worker", "tests.test_prefork:broken", "--processes", "2"]) == 2
    out, err = capfd.readouterr()
    *tracebacks, last = err.splitlines()
    assert re.fullmatch(
        r"paigeant: worker [12]/2 failed 3 times as it started: RuntimeError: the model registry is down", last
    )
    assert "RuntimeError: the model registry is down" in "\n".join(tracebacks)  # each child's own traceback
    assert out == ""
    restarts = [record.getMessage() for record in caplog.records if record.name == "paigeant_ai.prefork"]
    restart = r"worker [12]/2 \(pid \d+\) exited with code 1; starting another in (0\.5|1\.0)s"
    assert all(re.fullmatch(restart, line) for line in restarts), restarts
    gave_up = last.split()[2]  # "1/2" or "2/2": started three times, 0.5 s then 1 s after its failures
    backoff = [line.rpartition(" in ")[2] for line in restarts if line.startswith(f"worker {gave_up} ")]
    assert backoff == ["0.5s", "1.0s"]


def test_the_supervisors_option_is_refused_when_it_is_not_the_supervisors() -> None:
    with pytest.raises(UserError, match="--prefork-child 'x' is not the supervisor's; run --processes N instead"):
        SupervisorLink.from_option("x")


def test_a_child_says_which_it_is() -> None:
    slot = ChildSlot(2, 4)
    assert (slot.label, slot.option(7)) == ("worker 2/4", "2/4:7")
