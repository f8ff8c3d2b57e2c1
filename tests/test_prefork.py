"""`paigeant worker --processes N`: what is refused before or as the worker processes start, in one line.

The supervisor runs here, in the test's process; its children are real `python -m paigeant_ai.cli` processes that
fail as they start, so no broker is needed. The workers of real brokers are in `test_prefork_processes.py`.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from paigeant_ai import Worker
from paigeant_ai._prefork import ChildSlot, Supervisor, SupervisorLink
from paigeant_ai.cli import main
from paigeant_ai.exceptions import UserError

ROOT = Path(__file__).resolve().parent.parent
IN_MEMORY = (
    "paigeant: the in-memory transport lives in one process, so 2 processes would not share its queues: run "
    "--processes 1, or run on a broker: --transport redis|rabbitmq (or PAIGEANT_TRANSPORT)\n"
)


HUNG_CHILD = """
import json, signal, socket, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a worker whose stop hangs
link = socket.socket(fileno=int(sys.argv[-1].rpartition(":")[2]))
link.send(json.dumps({"ready": True, "stop_within": 0.5}).encode() + b"\\n")
time.sleep(600)
"""
"""A child of the supervisor that says it is ready and that it stops within half a second, then never stops."""

BLOCKED_CHILD = """
import asyncio, logging, sys, time
from paigeant_ai._prefork import SupervisorLink

async def main():
    logging.basicConfig()  # as `paigeant worker` logs
    link = SupervisorLink.from_option(sys.argv[1])
    link.stop_when_gone(lambda: print("asked to stop", flush=True), 0.5)
    print("running", flush=True)
    time.sleep(600)  # a step that blocks the event loop

asyncio.run(main())
"""
"""A worker process whose event loop is blocked: the stop it is asked for never happens."""


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


async def test_a_child_that_does_not_stop_by_its_deadline_is_killed(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    supervisor = Supervisor([sys.executable, "-c", HUNG_CHILD], 2, "tests:hung")
    running = asyncio.create_task(supervisor.run())
    said = ""
    while "runs 2 worker processes" not in said:  # both said they are ready
        await asyncio.sleep(0.05)
        said += capsys.readouterr().err
    os.kill(os.getpid(), signal.SIGTERM)
    assert await asyncio.wait_for(running, 60) == 1
    assert capsys.readouterr().err.endswith("supervisor stopped: 2 worker processes stopped, 2 killed as hung\n")
    hung = [r.getMessage() for r in caplog.records if "did not stop" in r.getMessage()]
    assert len(hung) == 2
    assert all(re.fullmatch(r"worker [12]/2 \(pid \d+\) did not stop within 0.5s of SIGTERM: .*", m) for m in hung)


def test_a_child_whose_loop_is_blocked_does_not_outlive_its_supervisor() -> None:
    ours, theirs = socket.socketpair()
    with (
        theirs,
        subprocess.Popen(
            [sys.executable, "-c", BLOCKED_CHILD, ChildSlot(1, 2).option(theirs.fileno())],
            pass_fds=(theirs.fileno(),),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as child,
    ):
        theirs.close()
        assert child.stdout is not None
        assert child.stdout.readline() == "running\n"
        ours.close()  # the supervisor is killed
        out, err = child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert out == ""  # its event loop never ran the stop
    assert "the supervisor is gone: stopping gracefully" in err
    assert "still running 0.5s after the supervisor went: killing this worker process" in err
