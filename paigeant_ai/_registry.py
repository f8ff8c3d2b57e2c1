"""The live activity registry: what each running worker serves, signed by that worker and read by anyone.

A worker posts one `WorkerRecord` on its transport's registry board (see `paigeant_ai.transports.base.RegistryBoard`)
when it starts, again every heartbeat, and once more, marked `stopped`, when it stops cleanly. A record lists each
activity the worker serves as a catalog entry (what it needs and produces, its scopes, its compensation, its
version) beside the worker's id, host, concurrency and the time of the heartbeat.

The board is broker state that anyone who can write to the broker may write, so nothing on it is believed for being
there. A reader keeps a record only when its signature (`typ` `paigeant-registry+jws`) holds under a trusted key
that the trust policy lets `advertise` (every trusted key, without a policy): the planner signs plans made of what
records advertise, so a key trusted only to approve, say, must not be able to put a step there. Anything else is
logged and ignored. A record is live until
`LAPSE_BEATS` of its heartbeats have passed without a newer one: the time is signed, so a replayed old record is
never live again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import AwareDatetime, Field, JsonValue, ValidationError

from ._escape import escape_control
from ._wire import FROM_WIRE, Wire, utcnow
from .catalog import CatalogEntry
from .contracts import ActivitySpec
from .exceptions import SecurityError
from .security import MessageSecurity
from .transports.base import Advertising, Transport

__all__ = (
    "LAPSE_BEATS",
    "MAX_HEARTBEAT",
    "REGISTRY_RETENTION",
    "REGISTRY_TYPE",
    "STALL_BEATS",
    "AdvertisedActivity",
    "LiveRegistry",
    "WorkerRecord",
    "read_registry",
)

logger = logging.getLogger("paigeant_ai.registry")

REGISTRY_TYPE = "paigeant-registry+jws"
LAPSE_BEATS = 3
"""A worker's record lapses once this many of its heartbeats have passed without a newer one."""
STALL_BEATS = 2
"""`paigeant status` shows a workflow stalled at a step once every worker serving it has been silent this many of
its heartbeats: one to two heartbeats after the last one died. Dispatch waits for the record to lapse."""
REGISTRY_RETENTION = 600.0
"""Seconds a board keeps a record after its last post: how long a dead worker shows as last seen (and how far back
a RabbitMQ reader reads the registry stream when it opens)."""
MAX_HEARTBEAT = REGISTRY_RETENTION / 4
"""The longest heartbeat period a worker may have: a live worker's record is always on the board (a record with a
longer one is ignored)."""


class AdvertisedActivity(Wire):
    """One activity a worker serves, as a planner's catalog describes it."""

    spec: ActivitySpec
    """The spec a route carries for it (its name, description, scopes, compensation and fallbacks)."""
    description: str = ""
    needs: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    produces: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    compensation: str | None = None
    at_most_once: bool = False
    version: str | None = None
    # The ordering rules (`PlanRules`); left out when empty, so a record reads and verifies alike on older releases.
    after: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    requires: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    conflicts: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    max_per_plan: int | None = Field(default=None, ge=1, exclude_if=lambda value: value is None)

    @property
    def name(self) -> str:
        return self.spec.name

    @classmethod
    def of(cls, entry: CatalogEntry, version: str | None) -> AdvertisedActivity:
        """The advertisement of a catalog entry, with the version of the code behind it."""
        return cls(
            spec=entry.spec,
            description=entry.description,
            needs=entry.needs,
            produces=entry.produces,
            compensation=entry.compensation,
            at_most_once=entry.at_most_once,
            version=version,
            after=entry.after,
            requires=entry.requires,
            conflicts=entry.conflicts,
            max_per_plan=entry.max_per_plan,
        )

    def catalog_entry(self) -> CatalogEntry:
        """The catalog entry it advertises."""
        return CatalogEntry(
            name=self.spec.name,
            description=self.description,
            needs=self.needs,
            produces=self.produces,
            compensate=self.spec.compensate,
            compensation=self.compensation,
            fallbacks=list(self.spec.fallbacks),
            at_most_once=self.at_most_once,
            spec=self.spec,
            after=self.after,
            requires=self.requires,
            conflicts=self.conflicts,
            max_per_plan=self.max_per_plan,
        )


class WorkerRecord(Wire):
    """What one worker serves, as of its latest heartbeat, signed with its key."""

    worker_id: str = Field(min_length=1, max_length=200)
    host: str = Field(default="", max_length=255)
    pid: int = 0
    concurrency: int = Field(default=1, ge=1)
    heartbeat: AwareDatetime = Field(default_factory=utcnow)
    interval: float = Field(gt=0, le=MAX_HEARTBEAT)
    """Seconds between two heartbeats of this worker."""
    stopped: bool = False
    """The worker stopped cleanly: it serves nothing any more."""
    activities: list[AdvertisedActivity] = Field(default_factory=list[AdvertisedActivity])
    signature: str | None = Field(default=None, repr=False)

    @property
    def lapses_at(self) -> datetime:
        """When the record stops being live unless a newer heartbeat comes."""
        return self.heartbeat + timedelta(seconds=LAPSE_BEATS * self.interval)

    def live(self, now: datetime | None = None) -> bool:
        """Whether the worker serves its activities now, as far as its heartbeats tell."""
        return not self.stopped and (now or utcnow()) < self.lapses_at

    def signed_bytes(self) -> bytes:
        """What the signature covers."""
        return self.model_dump_json(exclude={"signature"}).encode()

    def to_bytes(self) -> bytes:
        """The record as it is posted."""
        return self.model_dump_json().encode()

    def sign(self, security: MessageSecurity) -> WorkerRecord:
        """This record, signed with `security`'s key (unsigned when it signs nothing)."""
        unsigned = self.model_copy(update={"signature": None})
        return unsigned.model_copy(
            update={"signature": security.sign_bytes(unsigned.signed_bytes(), typ=REGISTRY_TYPE)}
        )


@dataclass(frozen=True, slots=True)
class LiveRegistry:
    """The records of a transport's registry that verify, and what they say is served now.

    Attributes:
        records: Every verified record (the latest of each worker), live or not, newest heartbeat first.
        now: The time liveness was judged at.
    """

    records: list[WorkerRecord] = field(default_factory=list[WorkerRecord])
    now: datetime = field(default_factory=utcnow)

    @property
    def live(self) -> list[WorkerRecord]:
        """The records of the workers alive now."""
        return [record for record in self.records if record.live(self.now)]

    @property
    def names(self) -> list[str]:
        """The activities some live worker serves, sorted."""
        return sorted({activity.name for record in self.live for activity in record.activities})

    def workers(self, name: str) -> list[WorkerRecord]:
        """The live workers that serve `name`."""
        return [record for record in self.live if any(item.name == name for item in record.activities)]

    def serves(self, name: str) -> bool:
        """Whether a live worker serves `name`."""
        return bool(self.workers(name))

    def heard_from(self, name: str, *, beats: float = STALL_BEATS) -> bool:
        """Whether a live worker serving `name` posted within its last `beats` heartbeats."""
        return any(self.now < r.heartbeat + timedelta(seconds=beats * r.interval) for r in self.workers(name))

    def last_seen(self, name: str) -> datetime | None:
        """The latest heartbeat of any worker that served `name` (live or not); None if none is on record."""
        beats = [record.heartbeat for record in self.records if any(item.name == name for item in record.activities)]
        return max(beats, default=None)

    def entries(self) -> list[CatalogEntry]:
        """A catalog entry per live activity, as its most recent live worker advertises it, sorted by name."""
        found: dict[str, CatalogEntry] = {}
        for record in self.live:  # newest first: the first advertisement of a name wins
            for activity in record.activities:
                found.setdefault(activity.name, activity.catalog_entry())
        return [found[name] for name in sorted(found)]


def verified_records(raw: Iterable[bytes], security: MessageSecurity) -> list[WorkerRecord]:
    """The records of `raw` that verify (the latest heartbeat of each worker), newest first; the others are logged."""
    latest: dict[str, WorkerRecord] = {}
    for body in raw:
        record = _verified(body, security)
        if record is not None and (
            record.worker_id not in latest or record.heartbeat > latest[record.worker_id].heartbeat
        ):
            latest[record.worker_id] = record
    return sorted(latest.values(), key=lambda record: record.heartbeat, reverse=True)


def _verified(body: bytes, security: MessageSecurity) -> WorkerRecord | None:
    try:
        record = WorkerRecord.model_validate_json(body, context=FROM_WIRE)
    except ValidationError as exc:
        logger.warning("a registry record is not a worker record and is ignored: %s", _first_error(exc))
        return None
    try:
        kid = security.verify_bytes(record.signature, record.signed_bytes(), typ=REGISTRY_TYPE)
        if kid is not None:
            security.policy.require(kid, "advertise", "advertise activities on the registry")
    except SecurityError as exc:
        logger.warning(
            "the registry record of worker %r does not verify and is ignored: %s",
            escape_control(record.worker_id),
            escape_control(str(exc)),
        )
        return None
    return record


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return escape_control(f"{where}: {error['msg']}" if where else error["msg"])


async def read_registry(transport: Transport, security: MessageSecurity | None = None) -> LiveRegistry | None:
    """The verified registry of `transport`; None when the transport keeps no registry.

    Args:
        transport: A connected transport.
        security: Verifies the records; by default a `MessageSigner` with the keys of the `PAIGEANT_*` settings.
    """
    if not isinstance(transport, Advertising):
        return None
    if security is None:
        from .security import MessageSigner

        security = MessageSigner.from_settings(transport)
    board = transport.registry_board()
    await board.open()
    return LiveRegistry(verified_records(await board.records(), security))
