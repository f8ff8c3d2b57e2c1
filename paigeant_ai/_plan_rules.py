"""Ordering rules of the catalog: what must come before an activity, what must accompany it, what it conflicts
with, and how often it may appear in one plan.

A plan is a list of steps, and a parallel group is one step whose branches run at the same time. "Before" means
at an earlier step: a branch is never before its sibling, and every branch of a group comes after the steps before
the group. A revision's route starts with the steps the workflow completed and the one that revises it, which come
before every remaining step. Fallbacks are not steps of the plan: the rules are checked on the steps it names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from .exceptions import UserError

if TYPE_CHECKING:
    from .catalog import CatalogEntry

__all__ = ("PlanRules", "broken_rules", "new_broken_rules", "plan_rules")


class PlanRules(BaseModel):
    """How an activity may be placed in a plan, beside what it needs and produces.

    Attributes:
        after: Activities that must be in the plan at an earlier step (shipping after payment).
        requires: Activities that must be in the same plan, at any step (a refund with its notification).
        conflicts: Activities that must not be in the same plan (a refund and a shipment).
        max_per_plan: How many times it may appear in one plan; `None` for no limit (`1`: a refund, once).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    max_per_plan: int | None = Field(default=None, ge=1)

    def __bool__(self) -> bool:
        return bool(self.after or self.requires or self.conflicts or self.max_per_plan is not None)


def plan_rules(
    name: str,
    *,
    after: Sequence[str] = (),
    requires: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    max_per_plan: int | None = None,
) -> PlanRules:
    """The rules of activity `name`, each checked.

    Raises:
        UserError: A rule is one string rather than a list of names, names the activity itself, or
            `max_per_plan` is below 1.
    """
    said = {"after": after, "requires": requires, "conflicts": conflicts}
    for rule, names in said.items():
        if isinstance(names, str):
            raise UserError(f"{rule} of {name!r} must be a list of activity names: write {rule}=[{names!r}]")
        if name in names:
            raise UserError(f"{rule} of {name!r} names {name!r} itself: name other activities")
    if max_per_plan is not None and (isinstance(max_per_plan, bool) or max_per_plan < 1):
        raise UserError(f"max_per_plan of {name!r} must be a whole number of at least 1, or None for no limit")
    return PlanRules(
        after=tuple(after), requires=tuple(requires), conflicts=tuple(conflicts), max_per_plan=max_per_plan
    )


Lookup = Callable[[str], "CatalogEntry | None"]
"""The catalog entry of a name, or None when the catalog does not know it (it then has no rules)."""


def broken_rules(lookup: Lookup, steps: Sequence[Sequence[str]]) -> list[str]:
    """A sentence, with its fix, for each rule the plan `steps` breaks (each step: the names that run at it)."""
    at: dict[str, list[int]] = {}
    for position, names in enumerate(steps):
        for name in names:
            at.setdefault(name, []).append(position)
    problems: list[str] = []
    for name in at:
        entry = lookup(name)
        if entry is not None:
            problems += _broken(lookup, entry, at)
    return list(dict.fromkeys(problems))


def new_broken_rules(lookup: Lookup, before: Sequence[Sequence[str]], after: Sequence[Sequence[str]]) -> list[str]:
    """The rules route `after` breaks that route `before` did not (a revision answers only for what it changes)."""
    old = set(broken_rules(lookup, before))
    return [problem for problem in broken_rules(lookup, after) if problem not in old]


def _unknown(name: str, rule: str, other: str) -> str:
    """A rule no plan can keep: it names an activity the catalog lacks (misspelt, or served by no live worker)."""
    return (
        f"{name!r} must {rule} {other!r}, which the catalog lacks: leave {name!r} out of the plan, "
        f"or add {other!r} to the catalog (or correct the rule's name)"
    )


def _broken(lookup: Lookup, entry: CatalogEntry, at: dict[str, list[int]]) -> list[str]:
    name, first = entry.name, min(at[entry.name])
    problems: list[str] = []
    for other in entry.after:
        if other not in at and lookup(other) is None:
            problems.append(_unknown(name, "come after", other))
        elif other not in at:
            problems.append(f"{name!r} must come after {other!r}, which the plan lacks: add {other!r} before {name!r}")
        elif min(at[other]) == first:
            problems.append(
                f"{name!r} must come after {other!r}, which runs beside it in a parallel group: "
                f"move {other!r} to a step before the group"
            )
        elif min(at[other]) > first:
            problems.append(f"{name!r} must come after {other!r}: move {other!r} before {name!r}")
    problems += [
        f"{name!r} must be accompanied by {other!r}: add {other!r} to the plan"
        if lookup(other) is not None
        else _unknown(name, "be accompanied by", other)
        for other in entry.requires
        if other not in at
    ]
    problems += [
        "{} and {} must not be in the same plan: keep only one of them".format(*map(repr, sorted((name, other))))
        for other in entry.conflicts
        if other in at
    ]
    count = len(at[name])
    if entry.max_per_plan is not None and count > entry.max_per_plan:
        times = "once" if entry.max_per_plan == 1 else f"{entry.max_per_plan} times"
        problems.append(f"{name!r} may appear at most {times} in a plan, and appears {count} times: remove the extra")
    return problems
