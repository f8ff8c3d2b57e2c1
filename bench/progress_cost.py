"""What the progress streams cost a signed hop: streams off, a signature per workflow of a batch, one per batch.

A worker's batch of events often holds several workflows' events; each workflow's progress stream gets its own
part. Three-step signed workflows run through a `Worker` on the in-memory transport (see `bench.hop_cost`), the
variants alternating in one process:

- streams off: nothing is written to the progress streams (what a transport without them costs);
- a signature per workflow: each part of a batch of several workflows signed on its own, as before;
- one signature per batch: the parts signed together, over a Merkle tree, each with its proof (paigeant today).

Each prints CPU per hop (`time.process_time`, best and every run) and the signatures made per hop.

    uv run python -m bench.progress_cost                  # 1,000 workflows a run, 3 runs of each
    uv run python -m bench.progress_cost --workflows 2000 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

from paigeant_ai._events import events_headers
from paigeant_ai._progress_write import ProgressWriter

from .hop_cost import print_table, whole_hops

_Entry = tuple[str, bytes, dict[str, str]]
_Patch = Callable[[], contextlib.AbstractContextManager[object]]


def _signed_apart(self: ProgressWriter, parts: list[tuple[str, bytes]], *, signed: bool) -> list[_Entry]:
    """Each part with a signature of its own, as a batch on `events` is signed: the progress streams before."""
    security = self.security if signed else None
    return [(correlation_id, body, events_headers(security, body) or {}) for correlation_id, body in parts]


def _nothing(self: ProgressWriter, *args: object) -> list[_Entry]:
    return []


def _patched(name: str, replacement: Callable[..., list[_Entry]]) -> _Patch:
    """A context in which `replacement` stands for the `ProgressWriter` method `name`: one variant's writer."""
    return lambda: mock.patch.object(ProgressWriter, name, replacement)


VARIANTS: dict[str, _Patch] = {
    "progress streams off": _patched("_entries", _nothing),
    "a signature per workflow (before)": _patched("_signed", _signed_apart),
    "one signature per batch (now)": contextlib.nullcontext,
}


@dataclass
class Measured:
    """One variant's runs: CPU µs per hop and signatures made per hop, each run."""

    cpu: list[float] = field(default_factory=list[float])
    signed: list[float] = field(default_factory=list[float])


async def measure(workflows: int, runs: int) -> dict[str, Measured]:
    """Every variant, `runs` times each, alternating, after one warm-up run."""
    measured = {variant: Measured() for variant in VARIANTS}
    await whole_hops(50, signed=True)  # warm: imports, the versions' scan
    for _ in range(runs):
        for variant, patch in VARIANTS.items():
            with patch():
                per_hop, (made, _verified) = await whole_hops(workflows, signed=True)
            measured[variant].cpu.append(per_hop)
            measured[variant].signed.append(made)
    return measured


async def bench(workflows: int, runs: int) -> None:
    load_before = os.getloadavg()[0]
    measured = await measure(workflows, runs)
    rows = [["signed hop (in-memory worker)", "CPU µs per hop, best", "all runs", "signatures made per hop"]]
    for variant, runs_of in measured.items():
        cpu = ", ".join(f"{value:,.0f}" for value in runs_of.cpu)
        made = ", ".join(f"{value:.2f}" for value in runs_of.signed)
        rows.append([variant, f"{min(runs_of.cpu):,.0f}", cpu, made])
    print_table(rows)
    print(f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workflows", type=int, default=1000, help="workflows per run (default 1,000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant, alternating (default 3)")
    args = parser.parse_args()
    asyncio.run(bench(args.workflows, args.runs))


if __name__ == "__main__":
    main()
