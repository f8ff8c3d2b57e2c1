"""Plans with parallel groups, as the planner's `dispatch_workflow` tool gives them: a nested list of names is a
group. Its branches see the variables as they were before the group; the steps after it see each branch's output
under the branch's name (its key)."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from ._parallel import group_spec
from ._plan_rules import broken_rules
from .contracts import ActivitySpec
from .exceptions import InvalidPlan, UserError

if TYPE_CHECKING:
    from .catalog import ActivityCatalog

__all__ = ("PlanStep", "plan_with_groups")

PlanStep = str | Sequence[str]
"""A step of a plan: an activity's name, or the names of a parallel group's branches."""


def _names(steps: Sequence[PlanStep]) -> list[str]:
    return [name for step in steps for name in ([step] if isinstance(step, str) else step)]


def plan_with_groups(
    catalog: ActivityCatalog,
    steps: Sequence[PlanStep],
    variables: Iterable[str],
    *,
    forbidden: Collection[str],
    fallbacks: Mapping[str, Sequence[str]],
) -> list[ActivitySpec]:
    """The specs of a route with parallel groups, once it is checked (see `ActivityCatalog.plan`).

    Raises:
        InvalidPlan: With every problem at once.
    """
    names = _names(steps)
    problems = catalog.unusable(
        [*names, *(name for found in fallbacks.values() for name in found)], forbidden=forbidden
    )
    problems += [
        f"fallbacks are given for {name!r}, which is not an activity of the plan"
        for name in fallbacks
        if name not in names
    ]
    if not problems:
        problems = _unmet(catalog, steps, set(variables))
        problems += broken_rules(catalog.get, [[step] if isinstance(step, str) else list(step) for step in steps])
    specs: list[ActivitySpec] = []
    for step in steps if not problems else []:
        branches = [_spec(catalog, name, fallbacks) for name in ([step] if isinstance(step, str) else step)]
        if isinstance(step, str):
            specs.extend(branches)
            continue
        try:
            specs.append(group_spec(branches))
        except UserError as exc:
            problems.append(str(exc))
    if problems:
        raise InvalidPlan("; ".join(dict.fromkeys(problems)))
    return specs


def _spec(catalog: ActivityCatalog, name: str, fallbacks: Mapping[str, Sequence[str]]) -> ActivitySpec:
    entry = catalog.get(name)
    assert entry is not None  # checked by `unusable`
    spec = entry.spec
    if name in fallbacks:
        spec = spec.model_copy(update={"fallbacks": tuple(fallbacks[name])})
    return spec


def _unmet(catalog: ActivityCatalog, steps: Sequence[PlanStep], known: set[str]) -> list[str]:
    """A sentence for each variable a step needs that nothing before it provides; a group's branches see only
    what was there before the group, and leave each branch's output under its name."""
    problems: list[str] = []
    for position, step in enumerate(steps):
        for name in [step] if isinstance(step, str) else step:
            entry = catalog.get(name)
            needs = entry.required_variables if entry is not None else []
            problems.extend(
                f"step {position + 1} {name!r} needs variable {variable!r}, which neither the workflow's variables "
                "nor an earlier step provide"
                for variable in needs
                if variable not in known
            )
        if isinstance(step, str):
            entry = catalog.get(step)
            known.update(entry.produced_variables if entry is not None else [])
        else:
            known.update(step)
    return problems
