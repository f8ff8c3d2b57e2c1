"""Prints a workflow's progress, one line per event, for the examples."""

from __future__ import annotations

import json

from paigeant_ai import WorkflowEvent


def show(event: WorkflowEvent) -> None:
    """Print one line per step as a workflow moves, and the final payload when it completes."""
    short = (event.correlation_id or "?")[:8]
    if event.kind == "step_completed":
        print(f"  [{short}] done    step {event.step} {event.activity} ({event.duration or 0:.3f}s)")
    elif event.kind == "step_retried":
        print(f"  [{short}] retry   step {event.step} {event.activity}: {event.detail}")
    elif event.kind in ("faulted", "rejected"):
        print(f"  [{short}] {event.kind} {event.activity}: {event.detail}")
    elif event.kind == "completed":
        ended = f" early: {event.detail}" if event.detail else ""
        print(f"workflow {event.correlation_id} completed{ended}; final payload:")
        print(json.dumps(event.payload, indent=2, sort_keys=True))
