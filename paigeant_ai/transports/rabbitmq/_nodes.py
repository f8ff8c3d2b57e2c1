"""The nodes of a RabbitMQ cluster behind one robust connection: each reconnect goes to the next node."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from aio_pika import RobustConnection
from yarl import URL

from ...exceptions import TransportError, UserError
from ..base import redact_url, split_urls
from ._errors import BROKER_ERRORS, explain

__all__ = ("NodesConnection", "node_urls", "open_connection")

logger = logging.getLogger("paigeant_ai.transports.rabbitmq")


def node_urls(url: str | Sequence[str]) -> tuple[str, ...]:
    """The node addresses in `url`: one URL, several separated by commas, or a list of them."""
    given = [url] if isinstance(url, str) else list(url)
    parts = (part.strip(" ,") for item in given for part in split_urls(item))  # a stray comma at either end
    urls = tuple(part for part in parts if part)
    if not urls:
        raise UserError("give RabbitMQ's address: url= or PAIGEANT_RABBITMQ_URL (several nodes separated by commas)")
    return urls


class NodesConnection(RobustConnection):
    """A robust connection to one node of a cluster at a time.

    When its connection is lost, or an attempt to open it fails, the next attempt goes to the next node in
    `nodes`, round and round, every `reconnect_interval` seconds; its channels and consumers are restored there as
    aio-pika restores them on one node. Give every URL the same query options (`heartbeat`, ...): those of the
    first are the connection's.
    """

    def __init__(self, nodes: Sequence[str], first: int = 0, **kwargs: Any) -> None:
        super().__init__(URL(nodes[first]), **kwargs)
        self.nodes = tuple(nodes)
        self.node = first
        """The index in `nodes` of the node this connection is on, or tries next."""
        self._left: object = None  # the connection last left behind: one that fails twice moves on once
        self.close_callbacks.add(self._next_node)

    @property
    def node_url(self) -> str:
        """The URL of the node this connection is on, or tries next, its password hidden."""
        return redact_url(self.nodes[self.node])

    def _next_node(self, sender: object, exc: BaseException | None) -> None:
        # Called when the connection is lost and when an attempt to open it fails, before the next attempt; and
        # with a cancel, or nothing, when it is closed.
        if self.is_closed or len(self.nodes) == 1 or exc is None or isinstance(exc, asyncio.CancelledError):
            return
        underlay = self.transport  # None when an attempt to connect failed
        if underlay is not None and underlay is self._left:
            return  # a connection whose channels could not be restored reports its loss twice
        self._left = underlay
        lost = self.node_url
        self.node = (self.node + 1) % len(self.nodes)
        self.url = URL(self.nodes[self.node])
        why = f" ({explain(exc)})" if isinstance(exc, Exception) else ""
        logger.warning("lost RabbitMQ node %s%s; the connection tries %s next", lost, why, self.node_url)


async def open_connection(nodes: Sequence[str], *, within: float, **kwargs: Any) -> NodesConnection:
    """A connection to the first node of `nodes` that accepts one, trying each once, in order, each for up to
    `within` seconds."""
    failures: list[str] = []
    last: BaseException | None = None
    for first, url in enumerate(nodes):
        connection = NodesConnection(nodes, first, **kwargs)
        try:
            await connection.connect(timeout=within)
            return connection
        except (*BROKER_ERRORS, ValueError) as exc:
            failures.append(f"{redact_url(url)}: {explain(exc)}")
            last = exc
            with suppress(*BROKER_ERRORS):
                await connection.close()
    where = failures[0] if len(failures) == 1 else f"any of its nodes ({'; '.join(failures)})"
    raise TransportError(
        f"cannot connect to RabbitMQ at {where}; check that it runs and that PAIGEANT_RABBITMQ_URL (or url=) "
        "points at it"
    ) from last
