"""Workers for the SQLite crash tests; each runs as its own process:

    PAIGEANT_TRANSPORT=sqlite python -m paigeant_ai.cli worker tests.sqlite_workflows:middle_worker

The three steps of `tests.workflows_for_crash`, on one SQLite file (`PAIGEANT_SQLITE_PATH`): the workers share the
file's stores (completed steps, replay cache), and a dead worker's deliveries come back after
`PAIGEANT_TEST_VISIBILITY_TIMEOUT` seconds.
"""

from __future__ import annotations

import os

from paigeant_ai import Worker
from paigeant_ai.transports.sqlite import SQLiteTransport

from .workflows_for_crash import first, last, middle


def _transport() -> SQLiteTransport:
    return SQLiteTransport(visibility_timeout=float(os.environ.get("PAIGEANT_TEST_VISIBILITY_TIMEOUT", "2")))


def middle_worker() -> Worker:
    """The slow middle step; run two of these to have competing consumers."""
    return Worker(_transport(), [middle], concurrency=4, shutdown_timeout=5)


def edge_worker() -> Worker:
    """The quick first and last steps."""
    return Worker(_transport(), [first, last], concurrency=20, shutdown_timeout=5)
