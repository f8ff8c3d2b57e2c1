"""The route check of the signed plan (see `paigeant_ai._plan`): the route a plan and its logged revisions give,
held against the slip's log and live route; and what a worker remembers of it from one hop to the next.

What the check derives from a plan and its revisions (the route they give, the steps they added) is a function of
the bytes they were signed over, and each live step (its digest, its fallbacks, ...) a function of its spec's JSON.
`RouteMemo` keeps both under a digest of those bytes, so that the later hops of a workflow on one worker derive
neither again; everything that reads the slip's log still runs on every hop.
"""

from __future__ import annotations

import base64
import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

from ._lru import Lru
from ._plan_groups import (
    Branch,
    check_branch_compensation,
    check_branch_fallbacks,
    check_group_sizes,
    check_groups,
    is_mandatory,
    plan_error,
)
from .contracts import ActivitySpec, Plan, PlannedStep, Revision, RoutingSlip
from .exceptions import SecurityError

__all__ = (
    "RouteMemo",
    "Step",
    "added_and_removed",
    "check_route",
    "revision_error",
    "spec_digest",
)

T = TypeVar("T")


class Step(NamedTuple):
    """A step of the route as the check sees it."""

    name: str
    digest: str
    mandatory: bool
    fallbacks: tuple[str, ...] = ()
    compensate: str | None = None
    branches: tuple[Branch, ...] = ()

    def branch(self, key: str | None) -> Branch | None:
        """The branch with payload key `key`, if this step is a group that has one."""
        return next((branch for branch in self.branches if branch.key == key), None)

    @property
    def alternatives(self) -> tuple[str, ...]:
        """The activities that may run the step: its own, then its fallbacks."""
        return (self.name, *self.fallbacks)


def spec_digest(spec: ActivitySpec) -> str:
    """A digest of the whole spec as it travels (22 characters)."""
    return _text(_raw_digest(spec))


def _raw_digest(spec: ActivitySpec) -> bytes:
    """The blake2b digest of `spec.model_dump_json()` (encoded straight to bytes)."""
    return hashlib.blake2b(spec.__pydantic_serializer__.to_json(spec), digest_size=16).digest()


def _text(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def added_and_removed(old: Sequence[T], new: Sequence[T], key: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """The items of `new` that `old` did not hold (as often), and those of `old` that `new` does not."""
    before, after = Counter(key(item) for item in old), Counter(key(item) for item in new)
    return _beyond(new, after - before, key), _beyond(old, before - after, key)


def _beyond(items: Sequence[T], surplus: Counter[str], key: Callable[[T], str]) -> list[T]:
    """The last `surplus[k]` items of each key `k`, in their order."""
    picked: list[T] = []
    for item in reversed(items):
        if surplus[key(item)] > 0:
            surplus[key(item)] -= 1
            picked.append(item)
    picked.reverse()
    return picked


def _step_key(step: Step) -> str:
    return step.digest


def _steps(specs: Sequence[ActivitySpec]) -> list[Step]:
    return [_step(spec, spec_digest(spec)) for spec in specs]


def _step(spec: ActivitySpec, digest: str) -> Step:
    return Step(
        spec.name,
        digest,
        is_mandatory(spec),
        spec.fallbacks,
        spec.compensate,
        tuple(Branch(branch.branch_key, branch.alternatives, branch.compensate) for branch in spec.branches),
    )


def _planned_steps(steps: Sequence[PlannedStep]) -> list[Step]:
    return [
        Step(
            step.name,
            step.digest,
            step.mandatory or any(branch.mandatory for branch in step.branches),
            step.fallbacks,
            step.compensate,
            tuple(
                Branch(branch.key or branch.name, (branch.name, *branch.fallbacks), branch.compensate)
                for branch in step.branches
            ),
        )
        for step in steps
    ]


def check_route(plan: Plan, slip: RoutingSlip) -> int:
    """Check that `slip` is `plan` changed only by its logged revisions, within the plan's limits.

    Returns:
        How many steps the revisions added, all together.

    Raises:
        SecurityError: With code `revision` (a revision goes past the limits, removes a mandatory step, or was not
            made where it says) or `plan` (the log or the live route is not what the plan and revisions give).
    """
    done = _done(slip)
    return _check_slip(slip, _revised_route(plan, slip.revisions, len(done)), done, _steps)


class _Revised(NamedTuple):
    """The route a plan and its revisions give, and what the revisions did to it."""

    route: tuple[Step, ...]
    added: int
    """How many steps the revisions added, all together."""
    latest_step: int
    """The step the latest revision was made at (0 without one): the log must have got that far."""


def _revised_route(plan: Plan, revisions: Sequence[Revision], done: int) -> _Revised:
    """The route `plan` gives, changed by `revisions`, each made at one of the first `done` + 1 steps.

    Raises:
        SecurityError: With code `revision` (a revision goes past the limits, removes a mandatory step, or was not
            made where it says) or `plan` (a parallel group of the plan is too large).
    """
    route = _planned_steps(plan.steps)
    check_group_sizes(route, plan_error)
    limits = plan.limits
    if len(revisions) > limits.max_revisions:
        raise revision_error(f"the route was revised {len(revisions)} times, the plan allows {limits.max_revisions}")
    added_total, last = 0, 0
    for number, revision in enumerate(revisions, 1):
        at = revision.step
        if at < last or at > done or at >= len(route) or revision.activity not in route[at].alternatives:
            raise revision_error(
                f"revision {number} says step {at} {revision.activity!r} made it, which it cannot have"
            )
        last = at
        new = _steps(revision.remaining)
        check_group_sizes(new, lambda reason, n=number: revision_error(f"revision {n}: {reason}"))
        added, removed = added_and_removed(route[at + 1 :], new, _step_key)
        mandatory = [step.name for step in removed if step.mandatory]
        if mandatory:
            names = ", ".join(repr(name) for name in mandatory)
            group = " (a group is mandatory when one of its branches is)" if any(s.branches for s in removed) else ""
            raise revision_error(f"revision {number} by {revision.activity!r} removes mandatory step {names}{group}")
        if len(added) > limits.max_steps_per_revision:
            raise revision_error(
                f"revision {number} by {revision.activity!r} adds {len(added)} steps, the plan allows "
                f"{limits.max_steps_per_revision} per revision"
            )
        added_total += len(added)
        if added_total > limits.max_added_steps:
            raise revision_error(
                f"the revisions add {added_total} steps, the plan allows {limits.max_added_steps} in all"
            )
        route[at + 1 :] = new
    return _Revised(tuple(route), added_total, last)


def _done(slip: RoutingSlip) -> list[str]:
    """The activity that completed each step of the route so far (a parallel group's, for a group)."""
    return [entry.name for entry in slip.completed if entry.outcome != "failed" and entry.branch is None]


def _check_slip(
    slip: RoutingSlip,
    revised: _Revised,
    done: list[str],
    live_steps: Callable[[list[ActivitySpec]], Sequence[Step]],
) -> int:
    """Check the slip's log, compensations, fallbacks and live route (its steps from `live_steps`) against the
    route the plan and revisions give; returns how many steps the revisions added."""
    route = revised.route
    _check_done(route, done)
    check_groups(route, slip)
    _check_compensations(route, done, slip)
    if slip.unwinding is None:
        _check_remaining(route[len(done) :], live_steps(slip.itinerary))
    else:
        pending = [record.compensate for record in reversed(slip.compensations) if record.compensated_at is None]
        if [spec.model_dump() for spec in slip.itinerary] != [ActivitySpec(name=name).model_dump() for name in pending]:
            raise plan_error(
                f"the compensations to run {[spec.name for spec in slip.itinerary]} are not the ones the compensation "
                f"log leaves {pending}"
            )
    _check_fallbacks(route, slip)
    return revised.added


class RouteMemo:
    """`check_route` for a worker, which sees the hops of a workflow one after another.

    The route a plan and its revisions give is remembered under the digests of the bytes they were signed over
    (the caller verified each signature over those very bytes), and each step of a live route under the digest of
    its spec's JSON (the one the plan holds). Each is a function of those bytes alone, so a key nobody signed maps
    only to what its own bytes give. At most `size` of each are kept.
    """

    def __init__(self, size: int) -> None:
        self._revised: Lru[tuple[bytes, ...], _Revised] = Lru(size)
        self._steps: Lru[bytes, Step] = Lru(size)

    def check(self, plan: Plan, slip: RoutingSlip, signed: tuple[bytes, ...]) -> int:
        """`check_route(plan, slip)`, where `signed` holds the digests of the bytes `plan` and each of the slip's
        revisions were signed over, in order."""
        done = _done(slip)
        revised = self._revised.get(signed)
        if revised is None or revised.latest_step > len(done):  # a log not as far: walked again to say which
            revised = self._revised.put(signed, _revised_route(plan, slip.revisions, len(done)))
        return _check_slip(slip, revised, done, self._live_steps)

    def _live_steps(self, itinerary: list[ActivitySpec]) -> list[Step]:
        return [self._live_step(spec) for spec in itinerary]

    def _live_step(self, spec: ActivitySpec) -> Step:
        digest = _raw_digest(spec)
        step = self._steps.get(digest)
        return step if step is not None else self._steps.put(digest, _step(spec, _text(digest)))


def _check_done(route: Sequence[Step], done: list[str]) -> None:
    for position, name in enumerate(done):
        planned = route[position] if position < len(route) else None
        if planned is None or name not in (planned.name, *planned.fallbacks):
            raise plan_error(
                f"step {position} ran as {name!r}, but the plan and its revisions have "
                f"{planned.name if planned is not None else None!r} there"
            )


def _check_fallbacks(route: Sequence[Step], slip: RoutingSlip) -> None:
    """Each fallback taken follows its step's declared order, and the live step runs as one of its alternatives."""
    position = 0
    expected: str | None = route[0].name if route else None
    for entry in slip.completed:
        if entry.branch is not None:
            continue  # a branch's failure: see `_plan_groups.check_branch_fallbacks`
        step = route[position] if position < len(route) else None
        alternatives = (step.name, *step.fallbacks) if step is not None else ()
        if entry.outcome != "failed":
            position += 1
            expected = route[position].name if position < len(route) else None
            continue
        if entry.fallback is None:
            continue
        at = alternatives.index(entry.name) if entry.name in alternatives else -1
        if entry.name != expected or at < 0 or at + 1 >= len(alternatives) or alternatives[at + 1] != entry.fallback:
            raise plan_error(f"step {position} fell back from {entry.name!r} to {entry.fallback!r}, out of its order")
        expected = entry.fallback
    if slip.unwinding is None and slip.branch is not None:
        check_branch_fallbacks(route, position, slip)
    elif slip.unwinding is None and slip.current is not None and slip.current != expected:
        raise plan_error(f"step {position} runs as {slip.current!r}, but its alternatives give {expected!r} now")


def _check_compensations(route: Sequence[Step], done: list[str], slip: RoutingSlip) -> None:
    """Each entry of the compensation log names a completed step, once, with the compensation its plan declares;
    each step that completed as planned with a declared compensation has its entry, not yet marked done before
    the workflow unwinds."""
    recorded = {record.step: record for record in slip.compensations if record.branch is None}
    position = 0
    for entry in slip.completed:
        if entry.outcome == "failed":
            continue
        planned = route[position] if position < len(route) else None
        declared = planned.compensate if planned is not None and planned.name == entry.name else None
        record = recorded.get(position)
        if entry.outcome == "completed" and declared is not None and record is None:
            raise plan_error(
                f"step {position} {entry.name!r} completed, but the compensation log leaves out its {declared!r}"
            )
        if slip.unwinding is None and record is not None and record.compensated_at is not None:
            raise plan_error(f"the compensation log marks step {position} undone, but the workflow is not undone")
        position += 1
    last, keys = -1, set[str]()
    for record in slip.compensations:
        if record.branch is not None:
            check_branch_compensation(route, done, slip, record, last, keys)
            last = record.step
            continue
        if record.step <= last or record.step >= len(done) or done[record.step] != record.activity:
            raise plan_error(f"the compensation log names step {record.step} {record.activity!r}, which did not run")
        planned = route[record.step] if record.step < len(route) else None
        declared = planned.compensate if planned is not None and planned.name == record.activity else None
        if declared is not None and declared != record.compensate:
            raise plan_error(f"step {record.step} is undone by {record.compensate!r}, but its plan names {declared!r}")
        last = record.step


def _check_remaining(expected: Sequence[Step], live: Sequence[Step]) -> None:
    if [step.digest for step in expected] == [step.digest for step in live]:
        return
    if [step.name for step in expected] == [step.name for step in live]:
        changed = next(live[i].name for i in range(len(live)) if live[i].digest != expected[i].digest)
        raise plan_error(
            f"step {changed!r} is not as planned: its arguments, retry, timeout or scopes were changed without a "
            "revision"
        )
    raise plan_error(
        f"the remaining route {_names(live)} is not the planned {_names(expected)}: it was changed without a "
        "logged revision"
    )


def _names(steps: Sequence[Step]) -> str:
    return "[" + ", ".join(step.name for step in steps) + "]"


def revision_error(reason: str) -> SecurityError:
    return SecurityError(f"revision: {reason}", code="revision")
