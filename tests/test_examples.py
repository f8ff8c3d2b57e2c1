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


def test_onboarding_names_the_fix_of_a_bad_setting_in_one_sentence() -> None:
    def fails(*args: str, env: dict[str, str]) -> str:
        keys = ("PAIGEANT_SIGNING_KEY", "PAIGEANT_SIGNING_KEY_FILE", "PAIGEANT_ALLOW_UNSIGNED")
        result = subprocess.run(
            [sys.executable, "-m", "examples.onboarding", *args],
            cwd=ROOT,
            env={**{k: v for k, v in os.environ.items() if k not in keys}, **env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        return result.stderr.strip()

    assert fails("--transport", "nosuch", env={}) == (
        "onboarding: unknown transport 'nosuch'; set PAIGEANT_TRANSPORT to one of: inmemory, rabbitmq, redis, sqlite"
    )
    said = fails("--transport", "sqlite", env={"PAIGEANT_SQLITE_PATH": "/proc/no-such-folder/x.db"})
    assert said.startswith("onboarding: cannot keep the example's key at /proc/no-such-folder/x.db.onboarding-key.json")
    assert said.endswith("set PAIGEANT_SQLITE_PATH to a file in a folder you can write")


def test_onboarding_runs_offline_in_memory() -> None:
    out = run_example("examples.onboarding")
    lines = out.splitlines()
    assert lines[0].startswith("dispatched onboarding workflow ")
    done = [line.split()[4] for line in lines if " done " in line]
    assert done == ["validate-customer-data", "create-customer-account", "setup-payment-method", "send-welcome-email"]
    assert any(" retry " in line and "setup-payment-method" in line for line in lines)
    assert "completed; final payload:" in out
    assert '"welcome_email": "Welcome aboard! Your premium account is ready."' in out


def progress(out: str, word: str) -> list[str]:
    """The activities of the progress lines that start with `word` (`done`, `failed`), in order."""
    lines = [line.split() for line in out.splitlines() if line.startswith("  [")]
    return [words[4].rstrip(":") for words in lines if words[1] == word]


def undone(out: str) -> list[tuple[str, str]]:
    """(the step undone, the compensation that undid it) of each `undone` line, in order."""
    lines = [line.split() for line in out.splitlines() if line.startswith("  [") and line.split()[1] == "undone"]
    return [(words[4], words[6]) for words in lines]


def test_order_processing_saga_undoes_the_order_when_both_payment_providers_fail() -> None:
    out = run_example("examples.order_processing")
    assert progress(out, "done") == ["validate-order", "check-inventory"]
    assert out.count(" retry   step 2 process-payment: ConnectionError: payment provider timed out") == 2
    assert "failed  step 2 process-payment: NonRetryableError: the main payment provider declined the card; " in out
    assert "falling back to 'charge-backup'" in out
    assert "failed  step 2 charge-backup: NonRetryableError: the backup payment provider declined the card" in out
    assert undone(out) == [("check-inventory", "release-inventory"), ("validate-order", "notify-customer")]
    assert "stock: SKU-BOOK 5, SKU-LAMP 0\ncharged: 0.00, refunded: 0.00\n" in out  # the reservation released
    told = "customer told: Your order ord-1001 is cancelled: we could not take the payment; you were not charged."
    assert told in out
    assert ": compensated\n" in out
    assert "undoes check-inventory" in out  # the status shows each compensation beside the step it undid
    assert "undoes validate-order" in out


def test_order_processing_cancelled_while_a_slow_step_runs_interrupts_it_and_undoes_the_rest() -> None:
    out = run_example("examples.order_processing", "--cancel-after", "generate-shipping-label")
    assert progress(out, "done") == ["validate-order", "check-inventory", "process-payment", "update-inventory"]
    assert "cancel  requested by customer-service: the customer withdrew the order" in out
    assert "the carrier booking was called off mid-way" in out  # the activity saw the cancellation
    assert progress(out, "failed") == ["generate-shipping-label"]
    assert "interrupted: cancelled by customer-service: the customer withdrew the order" in out
    assert undone(out) == [
        ("process-payment", "refund-payment"),
        ("check-inventory", "release-inventory"),
        ("validate-order", "notify-customer"),
    ]
    assert "stock: SKU-BOOK 5, SKU-LAMP 0\ncharged: 39.90, refunded: 39.90\n" in out
    assert "customer told: Your order ord-1001 is cancelled: you cancelled it; your payment is refunded." in out
    assert ": cancelled\n" in out
    assert "send-confirmation" not in progress(out, "done")


def test_order_processing_cancelled_as_a_quick_step_starts_stops_before_the_next_one() -> None:
    out = run_example("examples.order_processing", "--cancel-after", "check-inventory")
    assert progress(out, "done") == ["validate-order", "check-inventory"]  # it finished; nothing after it started
    assert "cancelled at step 2 process-payment: cancelled by customer-service" in out
    assert undone(out) == [("check-inventory", "release-inventory"), ("validate-order", "notify-customer")]
    assert "charged: 0.00, refunded: 0.00" in out
    assert ": cancelled\n" in out


def test_order_processing_pays_ships_and_ends_an_out_of_stock_order_cleanly() -> None:
    out = run_example("examples.order_processing", "--pay-ok")
    assert out.count(" retry   step 2 process-payment: ConnectionError: payment provider timed out") == 2
    assert "completed early: out of stock: SKU-LAMP has 0, the order needs 1" in out
    assert '"tracking_number": "TRK-' in out
    assert "stock: SKU-BOOK 3, SKU-LAMP 0\ncharged: 39.90, refunded: 0.00\n" in out
    assert undone(out) == []  # ending early is a success: nothing is undone
    assert "customer told" not in out
    assert out.count(": completed\n") == 2
