"""Forgetting what expired: Redis expires keys by itself; here every transport deletes the expired rows of its
namespace once a minute (and when it connects), each table in one statement of one transaction."""

from __future__ import annotations

import sqlite3
import time

from ._progress import PROGRESS_RETENTION

__all__ = ("SWEEP_EVERY", "sweep")

SWEEP_EVERY = 60.0
"""Seconds between two sweeps of one transport."""
_CONSUMERS_KEPT = 24 * 3600.0
"""How long a consumer's last heartbeat is remembered (to say since when a step has had no consumer)."""


def sweep(db: sqlite3.Connection, ns: str) -> None:
    """Delete the rows of `ns` whose time has passed."""
    now = time.time()
    db.execute("DELETE FROM claims WHERE ns = ? AND expires <= ?", (ns, now))
    db.execute("DELETE FROM consumers WHERE ns = ? AND seen <= ?", (ns, now - _CONSUMERS_KEPT))
    db.execute("DELETE FROM cancels WHERE ns = ? AND expires <= ?", (ns, now))
    db.execute("DELETE FROM registry WHERE ns = ? AND until <= ?", (ns, now))
    db.execute(
        "DELETE FROM workflow_events WHERE ns = ? AND correlation_id IN "
        "(SELECT correlation_id FROM workflows WHERE ns = ? AND expires <= ?)",
        (ns, ns, now),
    )
    db.execute("DELETE FROM workflows WHERE ns = ? AND expires <= ?", (ns, now))
    db.execute(
        "DELETE FROM joins WHERE ns = ? AND grp IN (SELECT grp FROM join_groups WHERE ns = ? AND expires <= ?)",
        (ns, ns, now),
    )
    db.execute("DELETE FROM join_groups WHERE ns = ? AND expires <= ?", (ns, now))
    db.execute(
        "DELETE FROM progress WHERE ns = ? AND correlation_id IN (SELECT correlation_id FROM progress "
        "WHERE ns = ? GROUP BY correlation_id HAVING max(created) < ?)",
        (ns, ns, now - PROGRESS_RETENTION),
    )
