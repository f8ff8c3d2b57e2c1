"""Workers for the Redis crash and restart tests; each runs as its own process:

    PAIGEANT_TRANSPORT=redis python -m paigeant_ai.cli worker tests.redis_workflows:middle_worker

The three steps of the RabbitMQ tests (`tests.workflows_for_crash`), on Redis Streams: the workers remember
completed steps in Redis (`RedisDedupeStore`), so a step redelivered to another process after a crash is
skipped once it completed, and a dead worker's entries are claimed after `PAIGEANT_TEST_VISIBILITY_TIMEOUT`
seconds. The environment also picks the URL and namespace (`PAIGEANT_REDIS_URL`, `PAIGEANT_NAMESPACE`), and the
replicas a publish waits for (`PAIGEANT_TEST_MIN_REPLICAS_ACKED`, for the failover tests).
"""

from __future__ import annotations

import os

from paigeant_ai import Worker
from paigeant_ai.transports.redis import RedisDedupeStore, RedisTransport

from .workflows_for_crash import first, last, middle


def _transport() -> RedisTransport:
    return RedisTransport(
        visibility_timeout=float(os.environ.get("PAIGEANT_TEST_VISIBILITY_TIMEOUT", "2")),
        min_replicas_acked=int(os.environ.get("PAIGEANT_TEST_MIN_REPLICAS_ACKED", "0")),
    )


def middle_worker() -> Worker:
    """The slow middle step; run two of these to have competing consumers."""
    transport = _transport()
    return Worker(transport, [middle], concurrency=4, dedupe=RedisDedupeStore(transport), shutdown_timeout=5)


def edge_worker() -> Worker:
    """The quick first and last steps."""
    transport = _transport()
    return Worker(transport, [first, last], concurrency=20, dedupe=RedisDedupeStore(transport), shutdown_timeout=5)
