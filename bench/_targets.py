"""The performance targets, each checked against a baseline measured in the same run, and how they are printed.

Every limit is relative to something the same run measured (the raw relay, the unsigned hop, a bare `agent.run`
loop), except the two absolute ones (20,000 unsigned hops/s in memory, 1 ms per signed hop on a broker), so a
busy machine moves a measurement and its baseline together.

Each target prints one line, `PASS`, `FAIL` or `SKIP` (not measured: no server, or not asked for), its number, what
was measured, the limit and the baseline it was derived from; `--markdown` prints them again as a table.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ._paigeant import percentile_ms

__all__ = ("Check", "Measurements", "checks", "print_checks")

BROKERS = ("rabbitmq", "redis")
RAW_RATIOS = {("rabbitmq", True): 0.6, ("rabbitmq", False): 0.9, ("redis", True): 0.3, ("redis", False): 0.5}
"""The least share of its raw relay's hops/s paigeant makes on each broker, signed (True) and unsigned."""
SIGNING_ALLOWANCE = 1.25
"""A signed hop may cost the unsigned hop plus this many times one bare sign + verify."""
UNSIGNED_HOPS = 20_000
AGENT_RATIO = 0.8
LATENCY_P50_MS = 1.0
GROWTH_MB = 10.0


@dataclass
class Latency:
    """One at a time: the gaps between steps of signed workflows, and between the raw relay's stages."""

    paigeant: list[float]
    raw: list[float]


@dataclass
class Measurements:
    """What the run measured that the targets need, keyed by transport."""

    transports: list[str]
    hop_cpu_us: dict[bool, list[float]] = field(default_factory=dict[bool, list[float]])
    """In memory, CPU µs per hop of each round, signed (True) and unsigned (False)."""
    unsigned_rates: list[float] = field(default_factory=list[float])
    """In memory, unsigned hops/s of each round."""
    cpu_shares: list[float] = field(default_factory=list[float])
    sign_verify_us: dict[str, float] = field(default_factory=dict[str, float])
    raw: dict[str, float] = field(default_factory=dict[str, float])
    rates: dict[tuple[str, bool], float] = field(default_factory=dict[tuple[str, bool], float])
    """Functions' hops/s per (transport, signed)."""
    agent_steps: dict[str, float] = field(default_factory=dict[str, float])
    bare_agent: dict[str, float] = field(default_factory=dict[str, float])
    latency: dict[str, Latency] = field(default_factory=dict[str, Latency])
    growth_mb: dict[str, tuple[int, float]] = field(default_factory=dict[str, tuple[int, float]])
    """RSS growth after warm-up per transport, with the hops it was measured over."""


@dataclass(frozen=True)
class Check:
    """One target: what was measured, its limit, the same-run baseline the limit comes from, and the verdict."""

    number: int
    what: str
    measured: str = "-"
    limit: str = "-"
    baseline: str = "-"
    passed: bool | None = None
    """None when it was not measured."""

    @property
    def verdict(self) -> str:
        return "SKIP" if self.passed is None else "PASS" if self.passed else "FAIL"

    def line(self) -> str:
        if self.passed is None:
            return f"SKIP {self.number}. {self.what}: not measured"
        return f"{self.verdict} {self.number}. {self.what}: {self.measured} (target {self.limit}; {self.baseline})"


def spread(values: list[float], unit: str) -> str:
    """The median of `values`, with their range when there are several: how noisy the rounds were."""
    middle = statistics.median(values)
    if len(values) < 2:
        return f"{middle:,.0f} {unit}"
    return f"{middle:,.0f} {unit} ({min(values):,.0f}-{max(values):,.0f} over {len(values)} rounds)"


def signed_hop_cpu(m: Measurements) -> Check:
    what = "signed hop CPU, in memory"
    signed, unsigned = m.hop_cpu_us.get(True), m.hop_cpu_us.get(False)
    if not signed or not unsigned or not m.sign_verify_us:
        return Check(1, what)
    fastest = min(m.sign_verify_us, key=m.sign_verify_us.__getitem__)
    limit = statistics.median(unsigned) + SIGNING_ALLOWANCE * m.sign_verify_us[fastest]
    implementations = ", ".join(f"{name} {us:,.0f} µs" for name, us in m.sign_verify_us.items())
    return Check(
        1,
        what,
        spread(signed, "µs/hop"),
        f"<= {limit:,.0f} µs/hop",
        f"unsigned {spread(unsigned, 'µs/hop')} + {SIGNING_ALLOWANCE} x sign+verify of {fastest}; "
        f"sign+verify: {implementations}",
        statistics.median(signed) <= limit,
    )


def unsigned_hops(m: Measurements) -> Check:
    what = "unsigned hops/s, in memory"
    if not m.unsigned_rates:
        return Check(2, what)
    rate = statistics.median(m.unsigned_rates)
    return Check(
        2, what, spread(m.unsigned_rates, "hops/s"), f">= {UNSIGNED_HOPS:,} hops/s", "absolute", rate >= UNSIGNED_HOPS
    )


def versus_raw(m: Measurements, broker: str, signed: bool) -> Check:
    what = f"{broker} {'signed' if signed else 'unsigned'} vs raw relay"
    rate, raw = m.rates.get((broker, signed)), m.raw.get(broker)
    if rate is None or raw is None:
        return Check(3, what)
    ratio, least = rate / raw, RAW_RATIOS[(broker, signed)]
    return Check(
        3, what, f"{ratio:.2f}x ({rate:,.0f} hops/s)", f">= {least}x", f"raw relay {raw:,.0f} hops/s", ratio >= least
    )


def agent_steps(m: Measurements, transport: str) -> Check:
    what = f"agent steps vs bare agent.run, {transport}"
    steps, bare = m.agent_steps.get(transport), m.bare_agent.get(transport)
    if steps is None or bare is None:
        return Check(4, what)
    ratio = steps / bare
    return Check(
        4,
        what,
        f"{ratio:.2f}x ({steps:,.0f} steps/s)",
        f">= {AGENT_RATIO}x",
        f"bare agent.run loop {bare:,.0f} runs/s",
        ratio >= AGENT_RATIO,
    )


def low_load_latency(m: Measurements, broker: str) -> Check:
    what = f"signed hop latency at concurrency 1, {broker}"
    latency = m.latency.get(broker)
    if latency is None or not latency.paigeant:
        return Check(5, what)
    p50 = percentile_ms(latency.paigeant, 0.5)
    return Check(
        5,
        what,
        f"p50 {p50:.2f} ms, p99 {percentile_ms(latency.paigeant, 0.99):.2f} ms",
        f"p50 <= {LATENCY_P50_MS:g} ms",
        f"raw relay one at a time p50 {percentile_ms(latency.raw, 0.5):.2f} ms, "
        f"p99 {percentile_ms(latency.raw, 0.99):.2f} ms",
        p50 <= LATENCY_P50_MS,
    )


def memory_growth(m: Measurements, transport: str) -> Check:
    what = f"RSS growth, {transport}"
    if transport not in m.growth_mb:
        return Check(6, what)
    hops, growth = m.growth_mb[transport]
    return Check(
        6,
        what,
        f"{growth:+.1f} MB over {hops:,} hops",
        f"< {GROWTH_MB:g} MB",
        "after a warm-up, gc",
        growth < GROWTH_MB,
    )


def checks(m: Measurements) -> list[Check]:
    """Every target, in order: a check per transport (or broker) where the target is per transport."""
    brokers = [b for b in BROKERS if b in m.transports]
    found = [signed_hop_cpu(m), unsigned_hops(m)] if "inmemory" in m.transports else []
    found += [versus_raw(m, broker, signed) for broker in brokers for signed in (True, False)]
    found += [agent_steps(m, transport) for transport in m.transports]
    found += [low_load_latency(m, broker) for broker in brokers]
    return found + [memory_growth(m, transport) for transport in m.transports]


def print_checks(found: list[Check], *, markdown: bool) -> None:
    """A line per target; with `markdown`, the same again as a table (the README's)."""
    for check in found:
        print(check.line())
    if not markdown:
        return
    print()
    print("| # | target | measured | limit | same-run baseline | result |")
    print("|---|--------|----------|-------|-------------------|--------|")
    for c in found:
        print(f"| {c.number} | {c.what} | {c.measured} | {c.limit} | {c.baseline} | {c.verdict} |")
