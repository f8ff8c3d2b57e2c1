"""The support-ticket example runs as a new user runs it: its own process, offline, in memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(*args: str) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "PAIGEANT_MODEL"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.support_ticket", *args],
        cwd=ROOT,
        env={**env, "PAIGEANT_TRANSPORT": "inmemory"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_planner_plans_the_ticket_one_step_waits_for_approval_and_the_workflow_completes() -> None:
    lines = run_example()

    assert lines[0] == "request: urgent: customer X can't log in after payment"
    assert lines[1] == (
        "plan: classify-ticket-priority -> route-to-specialist -> research-customer-history -> generate-response"
    )
    assert lines[2].startswith("planner: Dispatched workflow ")
    assert any(" revised classify-ticket-priority added schedule-follow-up " in line for line in lines)
    assert any(" waiting step 3 generate-response: waiting for approval of send_response" in line for line in lines)
    assert any(line.startswith("approval needed: send_response(") for line in lines)
    assert "  approved by the support lead" in lines
    done = [line.split()[4] for line in lines if " done " in line]
    assert done == [
        "classify-ticket-priority",
        "route-to-specialist",
        "research-customer-history",
        "generate-response",
        "schedule-follow-up",
    ]
    assert any(line.startswith("workflow ") and "completed; final payload:" in line for line in lines)
    assert lines[-1].startswith("result: Hi X, sorry for the trouble.")


def test_a_denied_reply_is_not_sent_and_the_workflow_still_completes() -> None:
    lines = run_example("--deny")

    assert "  denied by the support lead" in lines
    assert '  "response": "The support lead will call the customer instead.",' in lines
    assert lines[-1] == "result: no reply was sent"
