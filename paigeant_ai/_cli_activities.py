"""`paigeant activities`: what the live workers on a transport serve, read from its registry.

One line per activity any worker advertised within the registry's retention (ten minutes): how many live workers serve
it now, the versions they run (side by side during a deploy), their total concurrency, the latest heartbeat, and its
ordering rules (`after`, `requires`, `conflicts`, `max_per_plan`: see `PlanRules`) as the newest live worker
advertises them (the newest record when none is live). An activity whose workers all lapsed or stopped shows 0
workers and when one was last seen. Records that do not verify
under this process's trusted keys (`PAIGEANT_TRUSTED_KEYS`) are left out, with a warning.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from ._cli_workflows import command_transport
from ._escape import escape_control
from ._registry import AdvertisedActivity, LiveRegistry, read_registry
from .exceptions import UserError
from .security import MessageSigner
from .settings import Settings
from .transports import IN_MEMORY_NAMES

__all__ = ("activity_rows", "add_command", "run_command")


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add `activities` to the `paigeant` parser; `common` holds the options every broker command takes."""
    activities = commands.add_parser(
        "activities",
        parents=list(common),
        help="list what live workers serve: workers, versions, last heartbeat and ordering rules of each activity",
    )
    activities.add_argument("--json", action="store_true", help="print JSON instead of text")


async def run_command(args: argparse.Namespace) -> int:
    """Run `paigeant activities`; the exit code."""
    chosen = (args.transport or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "an in-memory registry lives in the process of its workers: read it there (read_registry), or run "
            "workers on sqlite, rabbitmq or redis (--transport or PAIGEANT_TRANSPORT)"
        )
    async with command_transport(chosen) as transport:
        signer = MessageSigner.from_settings(transport)
        if signer.refusal is not None:  # only records signed by a trusted key are shown
            raise UserError(signer.refusal)
        registry = await read_registry(transport, signer)
    if registry is None:
        raise UserError(f"the {chosen} transport keeps no registry of live workers")
    rows = activity_rows(registry)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


def activity_rows(registry: LiveRegistry) -> list[dict[str, Any]]:
    """One JSON object per activity on record: its live workers, their versions, the latest heartbeat, its rules."""
    rows: dict[str, dict[str, Any]] = {}
    ruled_live: set[str] = set()  # the activities whose rules are those of a live worker
    for record in registry.records:  # newest heartbeat first
        live = record.live(registry.now)
        for activity in record.activities:
            row = rows.setdefault(
                activity.name,
                {"name": activity.name, "workers": [], "versions": [], "concurrency": 0, "last_heartbeat": None},
            )
            if row["last_heartbeat"] is None:
                row["last_heartbeat"] = record.heartbeat.astimezone(UTC).isoformat()
            if "after" not in row or (live and activity.name not in ruled_live):
                row.update(_rules(activity))
            if not live:
                continue
            ruled_live.add(activity.name)
            row["concurrency"] += record.concurrency
            version = activity.version or "-"
            if version not in row["versions"]:
                row["versions"].append(version)
            row["workers"].append(
                {
                    "worker_id": record.worker_id,
                    "host": record.host,
                    "pid": record.pid,
                    "concurrency": record.concurrency,
                    "version": activity.version,
                    "heartbeat": record.heartbeat.astimezone(UTC).isoformat(),
                }
            )
    for row in rows.values():
        row["versions"].sort()
    return [rows[name] for name in sorted(rows)]


def _rules(activity: AdvertisedActivity) -> dict[str, Any]:
    """The ordering rules `activity` was advertised with (empty when its worker runs a release without them)."""
    return {
        "after": list(activity.after),
        "requires": list(activity.requires),
        "conflicts": list(activity.conflicts),
        "max_per_plan": activity.max_per_plan,
    }


def _rules_text(row: dict[str, Any]) -> str:
    """The rules of a row in a few words: `after a, b; requires c; conflicts d; at most once`, or `-`."""
    said = [f"{rule} {', '.join(row[rule])}" for rule in ("after", "requires", "conflicts") if row[rule]]
    if (most := row["max_per_plan"]) is not None:
        said.append("at most once" if most == 1 else f"at most {most} times")
    return "; ".join(said) or "-"


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no worker has advertised any activity on this transport within the last ten minutes"
    lines = [("ACTIVITY", "WORKERS", "CONCURRENCY", "VERSIONS", "LAST HEARTBEAT", "RULES")]
    for row in rows:
        seen = datetime.fromisoformat(row["last_heartbeat"]).strftime("%Y-%m-%d %H:%M:%S UTC")
        versions = ", ".join(row["versions"]) or "-"
        lines.append((row["name"], str(len(row["workers"])), str(row["concurrency"]), versions, seen, _rules_text(row)))
    widths = [max(len(escape_control(line[column])) for line in lines) for column in range(len(lines[0]))]
    return "\n".join(
        "  ".join(escape_control(cell).ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
