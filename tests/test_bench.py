"""The throughput bench runs, and ends with one line per target; its verdicts follow from the measurements.

The bench runs in memory with tiny counts, in a process of its own (it sets log levels and runs its own event
loop), with warnings as errors. Nothing here asserts a speed: only that every target is measured and reported.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from bench._targets import Latency, Measurements, checks

from .brokers import ROOT

TINY = ["--workflows", "12", "--concurrency", "4", "--rounds", "2", "--latency-workflows", "4", "--sign-rounds", "10"]
LINE = re.compile(
    r"^(?P<verdict>PASS|FAIL) (?P<number>[1-6])\. (?P<what>[^:]+): (?P<measured>.+) \(target (?P<limit>.+?); .+\)$"
)
ROW = re.compile(r"^\| (?P<number>[1-6]) \| [^|]+ \| [^|]+ \| [^|]+ \| [^|]+ \| (?P<verdict>PASS|FAIL|SKIP) \|$")


def run_bench(*args: str) -> str:
    command = [sys.executable, "-m", "bench.throughput", "--transports", "inmemory", *TINY, *args]
    env = {**os.environ, "PYTHONWARNINGS": "error"}  # the soak's own process too
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_in_memory_run_prints_a_line_and_a_table_row_for_each_of_its_targets() -> None:
    output = run_bench("--hops", "60", "--warmup-hops", "30", "--markdown")

    lines = {int(found["number"]): found for line in output.splitlines() if (found := LINE.match(line))}
    assert sorted(lines) == [1, 2, 4, 6]
    assert re.fullmatch(r"<= [\d,]+ µs/hop", lines[1]["limit"])
    assert re.fullmatch(r"[\d,]+ hops/s \([\d,]+-[\d,]+ over 2 rounds\)", lines[2]["measured"])
    assert re.fullmatch(r"[\d.]+x \([\d,]+ steps/s\)", lines[4]["measured"])
    assert re.fullmatch(r"[-+][\d.]+ MB over 60 hops", lines[6]["measured"])
    rows = {int(found["number"]): found["verdict"] for line in output.splitlines() if (found := ROW.match(line))}
    assert rows == {number: found["verdict"] for number, found in lines.items()}
    assert "RSS growth over 60 hops after warm-up" in output
    assert "| inmemory  | raw relay" in output


def measured(**changes: object) -> Measurements:
    """Measurements of every target, each passing, with `changes` applied."""
    m = Measurements(["inmemory", "rabbitmq", "redis"])
    m.hop_cpu_us = {False: [100.0, 110.0, 90.0], True: [220.0]}
    m.unsigned_rates = [21_000.0]
    m.sign_verify_us = {"cryptography": 120.0, "PyNaCl": 100.0}
    m.raw = {"rabbitmq": 4000.0, "redis": 10_000.0}
    m.rates = {("rabbitmq", True): 2400.0, ("rabbitmq", False): 3600.0, ("redis", True): 3000.0}
    m.rates[("redis", False)] = 5000.0
    m.agent_steps = dict.fromkeys(m.transports, 800.0)
    m.bare_agent = dict.fromkeys(m.transports, 1000.0)
    m.latency = {b: Latency([0.0009] * 10, [0.0002] * 10) for b in ("rabbitmq", "redis")}
    m.growth_mb = dict.fromkeys(m.transports, (100_000, 9.9))
    for name, value in changes.items():
        setattr(m, name, value)
    return m


def verdicts(m: Measurements) -> list[tuple[int, str, str]]:
    return [(check.number, check.what, check.verdict) for check in checks(m)]


def test_every_target_passes_at_its_limit_against_its_same_run_baseline() -> None:
    found = verdicts(measured())

    assert [number for number, _, _ in found] == [1, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 6, 6, 6]
    assert {verdict for _, _, verdict in found} == {"PASS"}


def test_the_signed_hop_is_held_to_the_fastest_implementation() -> None:
    # median unsigned 100 + 1.25 x PyNaCl's 100 = 225; cryptography's 120 would allow 250
    check = checks(measured(hop_cpu_us={False: [100.0], True: [240.0]}))[0]

    assert (check.verdict, check.limit) == ("FAIL", "<= 225 µs/hop")
    assert "sign+verify of PyNaCl" in check.baseline


def test_each_ratio_target_fails_below_its_share_of_the_baseline() -> None:
    m = measured(agent_steps={"inmemory": 799.0, "rabbitmq": 800.0, "redis": 800.0}, unsigned_rates=[19_999.0])
    m.rates[("redis", True)] = 2999.0

    failed = [(number, what) for number, what, verdict in verdicts(m) if verdict == "FAIL"]
    assert failed == [
        (2, "unsigned hops/s, in memory"),
        (3, "redis signed vs raw relay"),
        (4, "agent steps vs bare agent.run, inmemory"),
    ]


def test_a_slow_hop_or_a_growing_worker_fails_and_what_was_not_measured_is_skipped() -> None:
    m = measured(growth_mb={"inmemory": (100_000, 10.0)})
    m.latency["redis"] = Latency([0.0011] * 10, [0.0002] * 10)

    found = verdicts(m)
    assert [(number, what) for number, what, verdict in found if verdict == "FAIL"] == [
        (5, "signed hop latency at concurrency 1, redis"),
        (6, "RSS growth, inmemory"),
    ]
    assert [(number, what) for number, what, verdict in found if verdict == "SKIP"] == [
        (6, "RSS growth, rabbitmq"),
        (6, "RSS growth, redis"),
    ]


def test_the_hop_floor_sums_the_operations_no_hop_can_skip() -> None:
    command = [sys.executable, "-m", "bench.hop_floor", "--rounds", "200"]
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    figures = dict(re.findall(r"^  (.+?)\s+([\d.]+) us", done.stdout, flags=re.MULTILINE))
    assert len(figures) == 7, done.stdout
    parts = ["parse and validate the message (pydantic)", "log the step in the slip"]
    parts += ["write the successor message (pydantic)", "put on and take off an asyncio queue"]
    assert all(float(figures[part]) >= 0 for part in parts)
    assert float(figures["unsigned floor (sum)"]) > 0
    assert float(figures["signed floor (sum)"]) > float(figures["unsigned floor (sum)"])
