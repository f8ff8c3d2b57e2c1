"""Prints a workflow's progress, one line per event, for the examples."""

from __future__ import annotations

import json

from paigeant_ai import WorkflowEvent


def show(event: WorkflowEvent) -> None:
    """Print one line per step as a workflow moves, and the final payload when it completes.

    A workflow that stops (faulted, cancelled, expired) prints why, then each compensation as it undoes a step.
    """
    short = (event.correlation_id or "?")[:8]
    kind = event.kind
    if kind == "step_completed" and event.undoes is not None:
        print(f"  [{short}] undone  step {event.step} {event.undoes} by {event.activity} ({event.duration or 0:.3f}s)")
    elif kind == "step_completed":
        print(f"  [{short}] done    step {event.step} {event.activity} ({event.duration or 0:.3f}s)")
    elif kind == "step_retried":
        print(f"  [{short}] retry   step {event.step} {event.activity}: {event.detail}")
    elif kind == "step_failed":
        print(f"  [{short}] failed  step {event.step} {event.activity}: {event.detail}")
    elif kind in ("faulted", "rejected", "expired", "compensation_failed"):
        print(f"  [{short}] {kind} {event.activity}: {event.detail}")
    elif kind == "cancel_requested":
        print(f"  [{short}] cancel  requested by {event.by}: {event.detail}")
    elif kind == "cancelled":
        print(f"  [{short}] cancelled at step {event.step} {event.activity}: {event.detail}")
    elif kind == "compensating":
        print(f"  [{short}] {event.detail}")
    elif kind == "compensated":
        print(f"workflow {event.correlation_id} stopped and was undone: {event.detail}")
    elif kind == "completed":
        ended = f" early: {event.detail}" if event.detail else ""
        print(f"workflow {event.correlation_id} completed{ended}; final payload:")
        print(json.dumps(event.payload, indent=2, sort_keys=True))
