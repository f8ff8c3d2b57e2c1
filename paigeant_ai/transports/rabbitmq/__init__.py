"""`RabbitMQTransport`: durable quorum queues on RabbitMQ 3.10+ through aio-pika, with no plugin.

What it declares, for the namespace `paigeant`:

- `paigeant.<address>`: one durable quorum queue per address. Consumers on it compete; messages are persistent.
  Its delivery limit ends a poison loop: a message handed out `max_deliveries` times without being settled (its
  consumers keep dying) moves to the dead-letter queue.
- `paigeant.dead-letter`: the dead-letter queue. Every letter says why in `x-paigeant-reason` and where it came
  from in `x-paigeant-source`. It and `paigeant.events` keep at most `max_length` messages, dropping the oldest.
- `paigeant.<address>@delay-<bound>`: delayed messages wait in one of a few queues per address, sorted by how
  long they wait, each message with its own expiry. When it expires, RabbitMQ dead-letters it back to
  `paigeant.<address>` (at-least-once dead-lettering, so nothing is lost on the way).
- `paigeant.@cancellations`: a stream (`x-queue-type: stream`, `x-max-age` 8 days) of cancel records, each with
  its correlation ID in a header, that every process reads from its first entry (`cancel_board()`; see
  `_cancel_board.py`).

One connection reconnects by itself; it carries one channel for publishing (every publish waits for its own
confirm, while other publishes go out meanwhile), one for declarations and counts, one per consumer (its
prefetch), and one that reads the cancellations stream. Consumers resume after a reconnect, and after the broker
cancels them (their queue was deleted); deliveries handed out before a reconnect can no longer be acked and come
back from the broker.

The connection may be given the nodes of a cluster: it reconnects to the next node when it loses one.

The modules: `_transport.py` (the transport and its queues), `_consumer.py` (its consumers), `_nodes.py` (a
cluster's nodes behind one connection), `_wire.py` (headers, delivery counts, queue arguments), `_errors.py` (the
broker's errors, translated), `_cancel_board.py` (the cancel board).
"""

try:
    import aio_pika  # noqa: F401  # pyright: ignore[reportUnusedImport]
    import aiormq  # noqa: F401  # pyright: ignore[reportUnusedImport]
except ImportError as _exc:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError('the RabbitMQ transport needs aio-pika: pip install "paigeant-ai[rabbitmq]"') from _exc

from ._transport import DELAY_BUCKETS, RabbitMQTransport

__all__ = ("DELAY_BUCKETS", "RabbitMQTransport")
