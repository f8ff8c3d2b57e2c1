"""`Parallel`: a group of steps that run at the same time, and how a route holds one.

A group travels in the itinerary as one `ActivitySpec` whose `branches` are its steps. When the workflow reaches
it, each branch is sent as a hop of its own to its activity's queue (the slip's `branch` names which); once all
branches completed, their outputs are merged into the payload, each under its branch's key, and the workflow goes
on with one message (see `paigeant_ai._fan`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import ValidationError

from .activity import Activity
from .contracts import MAX_BRANCHES, ActivitySpec
from .exceptions import UserError

__all__ = ("MAX_BRANCHES", "Parallel", "check_branch_count", "group_spec", "refuse_shadowed_keys")

Branch = ActivitySpec | Activity | str


class Parallel:
    """Steps that run at the same time; the workflow goes on once all of them completed.

    `dispatch_workflow(["validate", Parallel("research-history", "check-inventory"), "decide"])` runs the two
    branches at once after `validate`; `decide` then finds each one's output in the payload under its key:
    `payload["research-history"]` and `payload["check-inventory"]`.

    Args:
        *branches: The branches: activity names, activities or `ActivitySpec`s (with their own retries, timeout,
            fallbacks, compensation and scopes). At most `MAX_BRANCHES` (64).
        keys: The payload key of each branch's output, in the order of `branches` (`None` for a branch keeps its
            default: the spec's `key`, else its activity name). Keys must be unique within the group.
        name: The group's name in the workflow's log and status.

    Raises:
        UserError: No branches, more than 64, a nested group, or two branches with the same key.
    """

    def __init__(self, *branches: Branch, keys: Sequence[str | None] | None = None, name: str = "parallel") -> None:
        if keys is not None and len(keys) != len(branches):
            raise UserError(
                f"keys must give one key (or None) per branch: {len(keys)} keys for {len(branches)} branches"
            )
        specs = [_branch_spec(branch) for branch in branches]
        if keys is not None:
            specs = [
                spec if key is None else spec.model_copy(update={"key": key})
                for spec, key in zip(specs, keys, strict=True)
            ]
        self.spec = group_spec(specs, name=name)

    @property
    def keys(self) -> list[str]:
        """The payload key of each branch, in order."""
        return [spec.branch_key for spec in self.spec.branches]

    def __repr__(self) -> str:
        return f"Parallel({', '.join(repr(key) for key in self.keys)})"


def _branch_spec(branch: object) -> ActivitySpec:
    from ._dispatch_checks import to_spec  # it knows how a step becomes a spec; it imports this module

    if isinstance(branch, Parallel) or (isinstance(branch, ActivitySpec) and branch.branches):
        raise UserError("a parallel group cannot hold another group; run the inner group as a step of its own")
    return to_spec(branch)  # pyright: ignore[reportArgumentType]  # to_spec says what else it accepts


def check_branch_count(count: int) -> None:
    """Raise `UserError` if a group of `count` branches is past the limit."""
    if count > MAX_BRANCHES:
        raise UserError(
            f"a parallel group may have at most {MAX_BRANCHES} branches, not {count}: split the work into several "
            "groups one after the other"
        )


def group_spec(branches: Sequence[ActivitySpec], *, name: str = "parallel") -> ActivitySpec:
    """The itinerary's spec of a parallel group of `branches`.

    Raises:
        UserError: No branches, more than 64, a nested group, or two branches with the same key.
    """
    if not branches:
        raise UserError("a parallel group needs at least one branch")
    check_branch_count(len(branches))
    for spec in branches:
        if spec.key is not None and not spec.key:
            raise UserError(
                f"branch {spec.name!r} of the parallel group has an empty key: give it a non-empty key, or None to "
                "put its output under its activity's name"
            )
    keys = [spec.branch_key for spec in branches]
    for position, key in enumerate(keys):
        if key in keys[:position]:
            raise UserError(
                f"two branches of the parallel group have the key {key!r}; give one of them its own key, as in "
                f"Parallel(..., keys=[...]) or ActivitySpec(name={branches[position].name!r}, key='...')"
            )
    try:
        return ActivitySpec(name=name, branches=tuple(branches))
    except ValidationError as exc:
        raise UserError(f"invalid parallel group: {exc.errors(include_url=False)[0]['msg']}") from None


def refuse_shadowed_keys(specs: Sequence[ActivitySpec], variables: Mapping[str, object] | None) -> None:
    """At dispatch: refuse a variable that a branch's output would overwrite, as it is merged under the branch's key.

    Raises:
        UserError: A variable has the name of a branch's key.
    """
    for spec in specs:
        for branch in spec.branches:
            if variables is not None and branch.branch_key in variables:
                raise UserError(
                    f"the variable {branch.branch_key!r} would be overwritten by the output of branch "
                    f"{branch.name!r} of the parallel group, which is merged under that key: rename the variable, "
                    "or give the branch another key (Parallel(..., keys=[...]))"
                )
