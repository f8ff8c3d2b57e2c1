"""Itinerary revision: an agent running as a step changes the rest of its workflow's route.

```python
triage = AgentActivity(triage_agent, toolsets=[ItineraryRevision(catalog, max_revisions=2)])
```

An `ItineraryRevision` is a per-step toolset factory: the agent gets a small toolset (`view_itinerary`, `add_steps`,
`remove_steps`, `replace_remaining_steps`) for that step. Revisions use catalog activities only, never remove a
mandatory step (`ActivitySpec(mandatory=True)`), never break an ordering rule of the catalog the route kept
(`after`, `requires`, `conflicts`, `max_per_plan`: see `PlanRules`), are bounded in number and in the steps they
add (per revision and per workflow; the stricter of this toolset's limits and those signed into the workflow's
plan), and take effect when the step succeeds (or parks to wait for a person): the worker then signs and logs each
one in the slip (`RoutingSlip.revisions`, with what it added and discarded) and publishes to the revised next step.
A step that fails and is retried starts again from the route it was given.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_ai import FunctionToolset, ModelRetry

from ._plan import added_and_removed, check_route, spec_digest
from ._plan_groups import is_mandatory
from ._plan_rules import new_broken_rules
from .activity import ActivityContext
from .catalog import ActivityCatalog, CatalogEntry
from .contracts import ActivitySpec, Revision, RevisionLimits
from .exceptions import InvalidPlan, SecurityError, UserError

__all__ = ("ItineraryRevision", "ItineraryView", "RevisionToolset")


@dataclass(frozen=True)
class ItineraryRevision:
    """Lets the agent of an `AgentActivity` revise the steps after its own: one of its `toolsets`.

    Called with a step's context, it builds the revision tools for that step.

    Args:
        catalog: The activities the agent may put on the route.
        max_revisions: How many revisions the whole workflow may have, all steps together.
        max_steps_per_revision: How many steps one revision may add.
        max_added_steps: How many steps all revisions of the workflow may add together.
        forbidden: Catalog names the agent may not add.
        toolset_id: The id of the toolset the agent is given.
    """

    catalog: ActivityCatalog
    max_revisions: int = 3
    max_steps_per_revision: int = 5
    max_added_steps: int = 10
    forbidden: Collection[str] = field(default_factory=frozenset[str])
    toolset_id: str = "paigeant-revision"

    def __post_init__(self) -> None:
        if self.max_revisions < 1:
            raise UserError("max_revisions must be at least 1")
        if self.max_steps_per_revision < 0 or self.max_added_steps < 0:
            raise UserError("max_steps_per_revision and max_added_steps must not be negative")

    def __call__(self, ctx: ActivityContext) -> RevisionToolset:
        """The revision tools for the step `ctx`; what they change is kept in `ctx.revisions`."""
        return RevisionToolset(self, ctx)


class ItineraryView(BaseModel):
    """What `view_itinerary` tells the model."""

    completed: list[str]
    current: str
    remaining: list[str]
    available: list[CatalogEntry]
    revisions_left: int


class RevisionToolset(FunctionToolset[Any]):
    """The tools with which an agent revises the rest of its workflow's route during one step."""

    def __init__(self, policy: ItineraryRevision, context: ActivityContext) -> None:
        super().__init__(id=policy.toolset_id, instructions=self._route_instructions)
        self.policy = policy
        self.context = context
        self.limits = _stricter(policy, context)
        self._added_before = _added_before(context)
        self.add_function(self.view_itinerary, takes_ctx=False)
        self.add_function(self.add_steps, takes_ctx=False)
        self.add_function(self.remove_steps, takes_ctx=False)
        self.add_function(self.replace_remaining_steps, takes_ctx=False)

    # -- the tools -------------------------------------------------------------------------------------------

    async def view_itinerary(self) -> ItineraryView:
        """Show the route: the steps done, this one, the steps still to run, and the activities you may add."""
        return ItineraryView(
            completed=[entry.name for entry in self.context.routing_slip.completed if entry.outcome != "failed"],
            current=self._current,
            remaining=[spec.name for spec in self.remaining],
            available=self.policy.catalog.entries(forbidden=self.policy.forbidden),
            revisions_left=self.revisions_left,
        )

    async def add_steps(self, activities: list[str], reason: str, before: str | None = None) -> list[str]:
        """Add steps to the workflow's remaining route; returns the remaining route.

        Args:
            activities: Activity names to add, in the order they run.
            reason: Why the route needs them.
            before: A remaining step to put them before; at the end when omitted.
        """
        remaining = list(self.remaining)
        position = len(remaining) if before is None else self._position(remaining, before)
        added = self._specs(activities)
        remaining[position:position] = added
        return self._revise("add", reason, remaining, added=added, discarded=[])

    async def remove_steps(self, activities: list[str], reason: str) -> list[str]:
        """Remove steps from the workflow's remaining route; returns the remaining route.

        Args:
            activities: Names of remaining steps to remove (the first one of each name).
            reason: Why they are not needed.
        """
        if not activities:
            raise ModelRetry("Name at least one remaining step to remove.")
        remaining = list(self.remaining)
        discarded = [remaining.pop(self._position(remaining, name)) for name in activities]
        return self._revise("remove", reason, remaining, added=[], discarded=discarded)

    async def replace_remaining_steps(self, activities: list[str], reason: str) -> list[str]:
        """Replace all remaining steps with new ones; returns the remaining route.

        Args:
            activities: Activity names to run after this step instead, in order ([] ends the workflow here).
            reason: Why the route changes.
        """
        new = self._specs(activities)
        added, discarded = added_and_removed(self.remaining, new, spec_digest)
        return self._revise("replace", reason, list(new), added=added, discarded=discarded)

    # -- helpers ---------------------------------------------------------------------------------------------

    @property
    def remaining(self) -> list[ActivitySpec]:
        """The steps after this one, with this step's revisions so far."""
        if self.context.revisions:
            return self.context.revisions[-1].remaining
        return self.context.routing_slip.itinerary[1:]

    @property
    def revisions_left(self) -> int:
        """How many revisions the workflow may still make."""
        made = len(self.context.routing_slip.revisions) + len(self.context.revisions)
        return max(0, self.limits.max_revisions - made)

    @property
    def steps_left(self) -> int:
        """How many steps revisions of the workflow may still add."""
        added = self._added_before + sum(len(revision.added) for revision in self.context.revisions)
        return max(0, self.limits.max_added_steps - added)

    @property
    def _current(self) -> str:
        return self.context.routing_slip.current or self.context.spec.name

    def _route_instructions(self) -> str:
        remaining = ", ".join(spec.name for spec in self.remaining) or "none (this is the last step)"
        return (
            f"You run as step {self._current!r} of a durable workflow. Steps still to run after yours: {remaining}. "
            "Only if your task calls for it, change them with `add_steps`, `remove_steps` or "
            "`replace_remaining_steps`, using activities that `view_itinerary` lists, and give a reason. "
            f"The workflow may be revised {self.revisions_left} more time(s), adding at most "
            f"{min(self.limits.max_steps_per_revision, self.steps_left)} step(s) at a time.{self._mandatory_note()}"
        )

    def _specs(self, names: list[str]) -> list[ActivitySpec]:
        catalog = self.policy.catalog
        problems = catalog.unusable(names, forbidden=self.policy.forbidden)
        if not names:
            problems.append("name at least one activity")
        if problems:
            raise ModelRetry(f"The route was not changed: {'; '.join(problems)}.")
        return [entry.spec for entry in (catalog.get(name) for name in names) if entry is not None]

    def _position(self, remaining: list[ActivitySpec], name: str) -> int:
        for position, spec in enumerate(remaining):
            if spec.name == name:
                return position
        names = ", ".join(spec.name for spec in remaining) or "none"
        raise ModelRetry(f"The route was not changed: {name!r} is not a remaining step (remaining: {names}).")

    def _revise(
        self,
        action: Literal["add", "remove", "replace"],
        reason: str,
        remaining: list[ActivitySpec],
        *,
        added: list[ActivitySpec],
        discarded: list[ActivitySpec],
    ) -> list[str]:
        if self.revisions_left == 0:
            raise ModelRetry(
                f"The route was not changed: this workflow has used all {self.limits.max_revisions} revisions it may "
                "make. Continue with the current route."
            )
        self._check_bounds(added, discarded)
        try:
            self._check_variables(remaining)
            self._check_rules(remaining)
        except InvalidPlan as exc:
            raise ModelRetry(f"The route was not changed: {exc}.") from None
        self.context.revisions.append(
            Revision(
                step=self.context.step,
                activity=self._current,
                action=action,
                reason=reason,
                added=added,
                discarded=discarded,
                remaining=remaining,
            )
        )
        return [spec.name for spec in remaining]

    def _check_bounds(self, added: list[ActivitySpec], discarded: list[ActivitySpec]) -> None:
        mandatory = [_mandatory_name(spec) for spec in discarded if is_mandatory(spec)]
        if mandatory:
            names = ", ".join(repr(name) for name in mandatory)
            raise ModelRetry(
                f"The route was not changed: {names} is a mandatory step of this workflow, which no revision may "
                "remove. Keep it on the route."
            )
        per_revision = self.limits.max_steps_per_revision
        if len(added) > per_revision:
            raise ModelRetry(
                f"The route was not changed: one revision may add at most {per_revision} step(s), and this one adds "
                f"{len(added)}. Add only the steps the task needs."
            )
        if len(added) > self.steps_left:
            raise ModelRetry(
                f"The route was not changed: this workflow may add {self.steps_left} more step(s) in all "
                f"(of {self.limits.max_added_steps}), and this revision adds {len(added)}."
            )

    def _mandatory_note(self) -> str:
        mandatory = [_mandatory_name(spec) for spec in self.remaining if is_mandatory(spec)]
        if not mandatory:
            return ""
        return f" Mandatory steps, which no revision may remove: {', '.join(mandatory)}."

    def _check_variables(self, remaining: list[ActivitySpec]) -> None:
        """Refuse a route on which a step would miss a variable, unless the route it replaces missed it already."""
        catalog = self.policy.catalog
        current = catalog.get(self._current)
        available = {*self.context.payload, *(current.produced_variables if current is not None else ())}
        before = {(name, variable) for _, name, variable in catalog.unmet_needs(self._names(self.remaining), available)}
        problems = [
            f"remaining step {position + 1} {name!r} needs variable {variable!r}, which nothing before it provides"
            for position, name, variable in catalog.unmet_needs(self._names(remaining), available)
            if (name, variable) not in before
        ]
        if problems:
            raise InvalidPlan("; ".join(problems))

    def _check_rules(self, remaining: list[ActivitySpec]) -> None:
        """Refuse a route that breaks an ordering rule of the catalog the route it replaces did not break; the
        steps done and this one come before every remaining step (see `paigeant_ai._plan_rules`)."""
        completed = self.context.routing_slip.completed
        done = [[b.name for b in entry.branches] or [entry.name] for entry in completed if entry.outcome != "failed"]
        done.append([self._current])
        lookup = self.policy.catalog.get
        problems = new_broken_rules(lookup, [*done, *_steps(self.remaining)], [*done, *_steps(remaining)])
        if problems:
            raise InvalidPlan("; ".join(problems))

    @staticmethod
    def _names(specs: list[ActivitySpec]) -> list[str]:
        return [spec.name for spec in specs]


def _steps(specs: list[ActivitySpec]) -> list[list[str]]:
    """The names that run at each step of `specs`: a group's branches run at one step."""
    return [[branch.name for branch in spec.branches] or [spec.name] for spec in specs]


def _stricter(policy: ItineraryRevision, context: ActivityContext) -> RevisionLimits:
    """The stricter of the toolset's limits and those signed into the workflow's plan."""
    own = RevisionLimits(
        max_revisions=policy.max_revisions,
        max_steps_per_revision=policy.max_steps_per_revision,
        max_added_steps=policy.max_added_steps,
    )
    plan = context.message.plan
    if plan is None:
        return own
    return RevisionLimits(
        max_revisions=min(own.max_revisions, plan.limits.max_revisions),
        max_steps_per_revision=min(own.max_steps_per_revision, plan.limits.max_steps_per_revision),
        max_added_steps=min(own.max_added_steps, plan.limits.max_added_steps),
    )


def _added_before(context: ActivityContext) -> int:
    """How many steps the workflow's logged revisions added (as the plan counts them, when there is one)."""
    plan, slip = context.message.plan, context.routing_slip
    if plan is not None:
        try:
            return check_route(plan, slip)
        except SecurityError:
            pass  # the worker checked the route before the step ran; counting what the log says will do
    return sum(len(revision.added) for revision in slip.revisions)


def _mandatory_name(spec: ActivitySpec) -> str:
    """A mandatory step as the model is told of it: a group by its mandatory branches."""
    if not spec.branches:
        return spec.name
    inside = ", ".join(branch.name for branch in spec.branches if branch.mandatory)
    return f"{spec.name} (the parallel group of {inside})" if inside else spec.name
