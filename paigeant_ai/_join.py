"""Where the branches of a parallel group meet: the join store, and the signed results kept in it.

A branch that completes stores its result, signed by its worker, under its workflow, its group's step and its key,
atomically with a count; the worker whose result brings the count to the number of branches joins the group (see
`paigeant_ai._fan`). A branch that fails for good marks the group failed, atomically too: a result stored after
that is not joined: its branch is undone instead. The mark is signed too (`paigeant_ai._group_marks`).

The store is shared by every process of the workflow's workers: the Redis transport's own Redis, or for RabbitMQ
the shared store (`PAIGEANT_SHARED_STORE_URL`); process memory only for the in-memory transport. Whoever can write
to that Redis can write results, so each one is verified against the key that signed it before it is joined.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Sequence
from typing import Protocol, cast

from pydantic import Field, JsonValue, ValidationError

from ._wire import FROM_WIRE, Wire
from .contracts import ActivityLogEntry, ActivitySpec, Compensation
from .exceptions import SecurityError, UserError
from .security import MessageSecurity
from .settings import Settings
from .transports.base import SharedStores, Transport

__all__ = (
    "BRANCH_RESULT_TYPE",
    "NO_JOIN_STORE",
    "BranchResult",
    "InMemoryJoinStore",
    "JoinStore",
    "join_store_for",
)

logger = logging.getLogger("paigeant_ai.worker")

BRANCH_RESULT_TYPE = "paigeant-branch+jws"

NO_JOIN_STORE = (
    "a parallel group needs a join store that all its workers share, which RabbitMQ does not have: set "
    "PAIGEANT_SHARED_STORE_URL=redis://... for every worker and dispatcher (or pass Worker(shared_store=...))"
)


class BranchResult(Wire):
    """What a branch of a parallel group did, as its worker stored it for the join, signed."""

    correlation_id: str
    step: int = Field(ge=0)
    """The index of the group in its workflow."""
    key: str
    entries: list[ActivityLogEntry]
    """The branch's log: its fallbacks' failures, if any, then its completion (the last entry)."""
    output: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    compensation: Compensation | None = None
    signature: str | None = Field(default=None, repr=False)

    def _signed_bytes(self) -> bytes:
        return self.model_dump_json(exclude={"signature"}).encode()

    def sign(self, security: MessageSecurity) -> BranchResult:
        """This result, signed with `security`'s key."""
        signature = security.sign_bytes(self._signed_bytes(), typ=BRANCH_RESULT_TYPE)
        return self.model_copy(update={"signature": signature})

    @classmethod
    def load(cls, raw: bytes, security: MessageSecurity, *, correlation_id: str, step: int, key: str) -> BranchResult:
        """The result `raw` read from the join store under (`correlation_id`, `step`, `key`), once its signature
        holds and it is the one of that branch.

        Raises:
            SecurityError: Code `branch_result`: unreadable, unsigned, not by a trusted key, or another branch's.
        """
        where = f"the result of branch {key!r} in the join store"
        try:
            result = cls.model_validate_json(raw, context=FROM_WIRE)
        except ValidationError:
            raise SecurityError(f"branch_result: {where} is not a branch result", code="branch_result") from None
        try:
            security.verify_bytes(result.signature, result._signed_bytes(), typ=BRANCH_RESULT_TYPE)
        except SecurityError as exc:
            raise SecurityError(f"branch_result: {where} does not verify ({exc})", code="branch_result") from None
        if (result.correlation_id, result.step, result.key) != (correlation_id, step, key) or not result.entries:
            raise SecurityError(f"branch_result: {where} is another branch's", code="branch_result")
        return result


class JoinStore(Protocol):
    """The results of the branches of parallel groups, by group (`<correlation id>/<step>`) and branch key."""

    async def add(self, group: str, key: str, record: bytes, *, ttl: float) -> tuple[int, bytes | None]:
        """Store `record` under `key`, the group kept `ttl` seconds from now (0: until it is joined or fails): how many
        results the group holds now, and its failure mark if it has one (a `GroupMark`, to verify before it is
        believed)."""
        ...

    async def records(self, group: str) -> dict[str, bytes]:
        """The results the group holds, by branch key."""
        ...

    async def fail(self, group: str, mark: bytes, *, ttl: float) -> tuple[bytes, dict[str, bytes]]:
        """Mark the group failed with `mark` unless it has a mark already: the mark it has now, and its results."""
        ...

    async def replace_mark(self, group: str, old: bytes, new: bytes) -> tuple[bytes, dict[str, bytes]]:
        """Put `new` in place of the mark `old` (one that did not verify), unless the mark changed meanwhile: the
        mark the group has now, and its results."""
        ...

    async def delete(self, group: str) -> None:
        """Forget the group (its continuation is safe with the broker)."""
        ...

    async def hold_wait(self, group: str, key: str, *, ttl: float) -> str:
        """Let branch `key` park (wait for approval, or be in doubt) unless another branch of the group is parked:
        the key of the branch that holds the group's one wait now."""
        ...

    async def release_wait(self, group: str, key: str) -> None:
        """Branch `key`, resumed and done waiting, lets another branch of the group park."""
        ...


class InMemoryJoinStore:
    """A `JoinStore` in this process's memory: for the in-memory transport, whose workers share the process."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[str, bytes]] = {}
        self._failed: dict[str, bytes] = {}
        self._waits: dict[str, str] = {}

    async def add(self, group: str, key: str, record: bytes, *, ttl: float) -> tuple[int, bytes | None]:
        results = self._groups.setdefault(group, {})
        results[key] = record
        return len(results), self._failed.get(group)

    async def records(self, group: str) -> dict[str, bytes]:
        return dict(self._groups.get(group, {}))

    async def fail(self, group: str, mark: bytes, *, ttl: float) -> tuple[bytes, dict[str, bytes]]:
        return self._failed.setdefault(group, mark), dict(self._groups.get(group, {}))

    async def replace_mark(self, group: str, old: bytes, new: bytes) -> tuple[bytes, dict[str, bytes]]:
        if self._failed.get(group) == old:
            self._failed[group] = new
        return self._failed[group], dict(self._groups.get(group, {}))

    async def delete(self, group: str) -> None:
        self._groups.pop(group, None)
        self._waits.pop(group, None)

    async def hold_wait(self, group: str, key: str, *, ttl: float) -> str:
        return self._waits.setdefault(group, key)

    async def release_wait(self, group: str, key: str) -> None:
        if self._waits.get(group) == key:
            del self._waits[group]


_MEMORY: weakref.WeakKeyDictionary[Transport, InMemoryJoinStore] = weakref.WeakKeyDictionary()


def refuse_groups_without_join(transport: Transport, specs: Sequence[ActivitySpec]) -> None:
    """At dispatch: refuse a route with a parallel group on a transport whose workers cannot share a join store.

    Raises:
        UserError: The route has a group, and the transport is RabbitMQ without `PAIGEANT_SHARED_STORE_URL`.
    """
    if not any(spec.branches for spec in specs) or transport.process_local or isinstance(transport, SharedStores):
        return
    if not Settings.from_env().shared_store_url:
        raise UserError(NO_JOIN_STORE)


def join_store_for(transport: Transport, shared: object | None) -> JoinStore | None:
    """The join store of a worker on `transport` with the shared store `shared`; None when there is none (RabbitMQ
    without a shared store), which is said once, here."""
    if transport.process_local:
        store = _MEMORY.get(transport)
        if store is None:
            store = _MEMORY[transport] = InMemoryJoinStore()
        return store
    make = getattr(shared, "join_store", None)
    if callable(make):
        return cast("JoinStore", make())
    logger.warning(NO_JOIN_STORE)
    return None
