"""The examples run as a new user would run them: as their own process, with the README's command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(module: str, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env={**os.environ, "PAIGEANT_TRANSPORT": "inmemory", **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_onboarding_runs_offline_in_memory() -> None:
    out = run_example("examples.onboarding")
    lines = out.splitlines()
    assert lines[0].startswith("dispatched onboarding workflow ")
    done = [line.split()[4] for line in lines if " done " in line]
    assert done == ["validate-customer-data", "create-customer-account", "setup-payment-method", "send-welcome-email"]
    assert any(" retry " in line and "setup-payment-method" in line for line in lines)
    assert "completed; final payload:" in out
    assert '"welcome_email": "Welcome aboard! Your premium account is ready."' in out


def test_order_processing_retries_payment_and_ends_an_out_of_stock_order_cleanly() -> None:
    out = run_example("examples.order_processing")
    assert out.count(" retry   step 2 process-payment: ConnectionError: payment provider timed out") == 2
    assert "completed early: out of stock: SKU-LAMP has 0, the order needs 1" in out
    assert '"tracking_number": "TRK-' in out
    assert out.count("completed") == 2
