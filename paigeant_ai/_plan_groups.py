"""The checks of the signed plan (see `paigeant_ai._plan`) that concern parallel groups: their size, the log of a
group that completed (one completion per branch, by one of the branch's alternatives), a live branch's fallbacks,
and the compensation log's entries of branches."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from .contracts import MAX_BRANCHES, ActivityLogEntry, ActivitySpec, Compensation, RoutingSlip
from .exceptions import SecurityError

if TYPE_CHECKING:
    from ._plan_route import Step

__all__ = (
    "Branch",
    "check_branch_compensation",
    "check_branch_fallbacks",
    "check_group_sizes",
    "check_groups",
    "is_mandatory",
    "mark_mandatory",
    "plan_error",
)


def is_mandatory(spec: ActivitySpec) -> bool:
    """Whether no revision may remove or replace `spec`: it is mandatory, or it is a group one of whose branches is."""
    return spec.mandatory or any(branch.mandatory for branch in spec.branches)


def mark_mandatory(spec: ActivitySpec, names: set[str]) -> ActivitySpec:
    """`spec` marked mandatory if its name is in `names`; for a group, each branch whose activity is."""
    if spec.branches:
        branches = tuple(mark_mandatory(branch, names) for branch in spec.branches)
        return spec.model_copy(update={"branches": branches, "mandatory": spec.mandatory or spec.name in names})
    return spec.model_copy(update={"mandatory": True}) if spec.name in names else spec


def plan_error(reason: str) -> SecurityError:
    return SecurityError(f"plan: {reason}", code="plan")


class Branch(NamedTuple):
    """A branch of a parallel group as the check sees it."""

    key: str
    alternatives: tuple[str, ...]
    compensate: str | None


def check_group_sizes(steps: Sequence[Step], error: Callable[[str], SecurityError]) -> None:
    for step in steps:
        if len(step.branches) > MAX_BRANCHES:
            raise error(
                f"parallel group {step.name!r} has {len(step.branches)} branches, at most {MAX_BRANCHES} are allowed"
            )


def check_groups(route: Sequence[Step], slip: RoutingSlip) -> None:
    """Each parallel group that completed logs one completion per branch, by one of the branch's alternatives; a
    branch's failures (and, in another branch's hop, its completion) logged beside the route belong to a branch of
    the group the workflow is at."""
    position = 0
    for entry in slip.completed:
        planned = route[position] if position < len(route) else None
        if entry.branch is not None:
            branch = planned.branch(entry.branch) if planned is not None else None
            # a failure of a branch, or the completion of the branch that ran first alone, carried to the others
            # (see `paigeant_ai._budget_probe`)
            probe = slip.branch not in (None, entry.branch)
            if (entry.outcome != "failed" and not probe) or branch is None or entry.name not in branch.alternatives:
                raise plan_error(f"step {position} logs {entry.name!r} as branch {entry.branch!r}, which it is not")
            continue
        if entry.outcome == "failed":
            continue
        if planned is not None and planned.branches:
            _check_joined(position, planned, entry)
        elif entry.branches:
            raise plan_error(f"step {position} {entry.name!r} logs branches, but it is not a parallel group")
        position += 1
    if slip.branch is not None and (len(route) <= position or route[position].branch(slip.branch) is None):
        raise plan_error(f"the hop runs branch {slip.branch!r}, which step {position} of the plan does not have")


def _check_joined(position: int, planned: Step, entry: ActivityLogEntry) -> None:
    done = [branch.branch for branch in entry.branches if branch.outcome == "completed"]
    if sorted(key or "" for key in done) != sorted(branch.key for branch in planned.branches):
        raise plan_error(f"parallel group {planned.name!r} at step {position} did not log each branch completed once")
    for logged in entry.branches:
        branch = planned.branch(logged.branch)
        if branch is None or logged.name not in branch.alternatives:
            raise plan_error(
                f"parallel group {planned.name!r} at step {position} logs {logged.name!r} as branch "
                f"{logged.branch!r}, which it is not"
            )


def check_branch_fallbacks(route: Sequence[Step], position: int, slip: RoutingSlip) -> None:
    """The live branch's fallbacks were taken in its declared order, and it runs as the one they give now."""
    branch = route[position].branch(slip.branch) if position < len(route) else None
    if branch is None:
        raise plan_error(f"the hop runs branch {slip.branch!r}, which step {position} of the plan does not have")
    expected = branch.alternatives[0]
    for entry in slip.completed:
        if entry.branch != slip.branch or entry.fallback is None:
            continue
        at = branch.alternatives.index(entry.name) if entry.name in branch.alternatives else -1
        if (
            entry.name != expected
            or at + 1 >= len(branch.alternatives)
            or branch.alternatives[at + 1] != entry.fallback
        ):
            raise plan_error(
                f"branch {slip.branch!r} fell back from {entry.name!r} to {entry.fallback!r}, out of its order"
            )
        expected = entry.fallback
    if slip.current != expected:
        raise plan_error(f"branch {slip.branch!r} runs as {slip.current!r}, but its alternatives give {expected!r} now")


def check_branch_compensation(
    route: Sequence[Step], done: list[str], slip: RoutingSlip, record: Compensation, last: int, keys: set[str]
) -> None:
    """A branch's entry in the compensation log: of a branch of the group at its step, which completed there (or
    the workflow is being undone from that group), once, after the steps before it."""
    if record.step != last:
        keys.clear()
    planned = route[record.step] if record.step < len(route) else None
    branch = planned.branch(record.branch) if planned is not None else None
    joined = record.step < len(done) and planned is not None and done[record.step] == planned.name
    stopped_there = record.step == len(done) and slip.unwinding is not None
    if (
        record.step < last
        or record.branch in keys
        or branch is None
        or record.activity not in branch.alternatives
        or not (joined or stopped_there)
    ):
        raise plan_error(
            f"the compensation log names branch {record.branch!r} of step {record.step} {record.activity!r}, which "
            "did not run"
        )
    if record.activity == branch.alternatives[0] and branch.compensate not in (None, record.compensate):
        raise plan_error(
            f"branch {record.branch!r} of step {record.step} is undone by {record.compensate!r}, but its plan names "
            f"{branch.compensate!r}"
        )
    keys.add(record.branch or "")
