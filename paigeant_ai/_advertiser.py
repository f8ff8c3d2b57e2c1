"""What a worker tells the registry: its record on start, every heartbeat, and `stopped` when it stops cleanly.

The heartbeat is a background task of the worker: no hop ever waits for it. A post that fails (the broker is away)
is logged and tried again at the next heartbeat; a worker whose posts keep failing lapses from the registry after
`LAPSE_BEATS` heartbeats, as a dead one does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping

from ._registry import MAX_HEARTBEAT, REGISTRY_RETENTION, AdvertisedActivity, WorkerRecord
from ._versions import activity_version
from ._wire import utcnow
from .activity import Activity
from .catalog import ActivityCatalog, CatalogEntry
from .exceptions import UserError
from .security import MessageSecurity
from .transports.base import Advertising, RegistryBoard, Transport

__all__ = ("Advertiser",)

logger = logging.getLogger("paigeant_ai.registry")


class Advertiser:
    """Posts one worker's record on its transport's registry board, if the transport keeps one.

    Args:
        transport: The worker's transport.
        activities: The activities the worker serves, by name.
        security: Signs the record with the worker's key.
        concurrency: How many steps the worker runs at once.
        interval: Seconds between two heartbeats.
        home: The workflows' home transport, when it is another than `transport`: the record is posted there too,
            so that a planner reading the home's registry sees every activity of every transport.
        address: The name of the worker's transport, as steps name it: each advertised spec carries it, so that a
            route built from the catalog sends each step to the transport of the workers that serve it.
    """

    def __init__(
        self,
        transport: Transport,
        activities: Mapping[str, Activity],
        security: MessageSecurity,
        *,
        concurrency: int,
        interval: float,
        home: Transport | None = None,
        address: str | None = None,
    ) -> None:
        if not 0 < interval <= MAX_HEARTBEAT:
            raise UserError(
                f"the registry heartbeat must be a positive number of seconds up to {MAX_HEARTBEAT:g}, not {interval!r}"
            )
        places = [transport] if home is None or home is transport else [transport, home]
        self.boards: list[RegistryBoard] = [
            place.registry_board() for place in places if isinstance(place, Advertising)
        ]
        self.address = address
        self.activities = activities
        self.security = security
        self.concurrency = concurrency
        self.interval = interval
        self.host = socket.gethostname()
        self.worker_id = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._advertised: list[AdvertisedActivity] | None = None
        self._task: asyncio.Task[None] | None = None
        self.posted = False
        """Whether the last post of the record reached every board."""

    async def start(self) -> None:
        """Post the record, then keep posting it every heartbeat in the background."""
        if not self.boards:
            return
        await self._post_or_log()  # posting needs no open board: a worker never reads the registry
        self._task = asyncio.create_task(self._beat(), name="paigeant-registry-heartbeat")

    async def stop(self) -> None:
        """Stop the heartbeat and post the record once more, `stopped`: its activities are no longer served here."""
        task, self._task = self._task, None
        if task is None or not self.boards:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await self._post(stopped=True)
        except Exception as exc:
            logger.warning("could not withdraw worker %s from the registry (%s); it lapses there", self.worker_id, exc)
        for board in self.boards:
            with contextlib.suppress(Exception):
                await board.close()

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._post_or_log()

    async def _post_or_log(self) -> None:
        try:
            await self._post(stopped=False)
            self.posted = True
        except Exception as exc:  # the broker is away, say: the next heartbeat tries again
            self.posted = False
            logger.warning("posting worker %s on the registry failed: %s", self.worker_id, exc)

    async def _post(self, *, stopped: bool) -> None:
        record = WorkerRecord(
            worker_id=self.worker_id,
            host=self.host,
            pid=os.getpid(),
            concurrency=self.concurrency,
            heartbeat=utcnow(),
            interval=self.interval,
            stopped=stopped,
            activities=self._advertisements(),
        ).sign(self.security)
        for board in self.boards:
            await board.post(self.worker_id, record.to_bytes(), ttl=REGISTRY_RETENTION)

    def _advertisements(self) -> list[AdvertisedActivity]:
        if self._advertised is None:  # made once: an agent's output schema is not free
            catalog = ActivityCatalog(self.activities.values())
            self._advertised = [
                AdvertisedActivity.of(self._addressed(entry), activity_version(self.activities[entry.name]))
                for entry in catalog
            ]
        return self._advertised

    def _addressed(self, entry: CatalogEntry) -> CatalogEntry:
        """`entry`, its spec naming this worker's transport (if it has a name)."""
        if self.address is None:
            return entry
        return entry.model_copy(update={"spec": entry.spec.model_copy(update={"transport": self.address})})
