"""Itinerary revision: an agent running as a step changes the rest of its workflow's route.

```python
triage = AgentActivity(triage_agent, toolsets=[ItineraryRevision(catalog, max_revisions=2)])
```

An `ItineraryRevision` is a per-step toolset factory: the agent gets a small toolset (`view_itinerary`, `add_steps`,
`remove_steps`, `replace_remaining_steps`) for that step. Revisions use catalog activities only, are bounded per
workflow, and take effect when the step succeeds (or parks to wait for a person): the worker then logs each one in
the slip (`RoutingSlip.revisions`, with what it discarded) and publishes to the revised next step. A step that fails
and is retried starts again from the route it was given.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_ai import FunctionToolset, ModelRetry

from .activity import ActivityContext
from .catalog import ActivityCatalog, CatalogEntry
from .contracts import ActivitySpec, Revision
from .exceptions import InvalidPlan, UserError

__all__ = ("ItineraryRevision", "ItineraryView", "RevisionToolset")


@dataclass(frozen=True)
class ItineraryRevision:
    """Lets the agent of an `AgentActivity` revise the steps after its own: one of its `toolsets`.

    Called with a step's context, it builds the revision tools for that step.

    Args:
        catalog: The activities the agent may put on the route.
        max_revisions: How many revisions the whole workflow may have, all steps together.
        forbidden: Catalog names the agent may not add.
        toolset_id: The id of the toolset the agent is given.
    """

    catalog: ActivityCatalog
    max_revisions: int = 3
    forbidden: Collection[str] = field(default_factory=frozenset[str])
    toolset_id: str = "paigeant-revision"

    def __post_init__(self) -> None:
        if self.max_revisions < 1:
            raise UserError("max_revisions must be at least 1")

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
        added = self._specs(activities)
        return self._revise("replace", reason, list(added), added=added, discarded=list(self.remaining))

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
        return max(0, self.policy.max_revisions - made)

    @property
    def _current(self) -> str:
        return self.context.routing_slip.current or self.context.spec.name

    def _route_instructions(self) -> str:
        remaining = ", ".join(spec.name for spec in self.remaining) or "none (this is the last step)"
        return (
            f"You run as step {self._current!r} of a durable workflow. Steps still to run after yours: {remaining}. "
            "Only if your task calls for it, change them with `add_steps`, `remove_steps` or "
            "`replace_remaining_steps`, using activities that `view_itinerary` lists, and give a reason. "
            f"The workflow may be revised {self.revisions_left} more time(s)."
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
                f"The route was not changed: this workflow has used all {self.policy.max_revisions} revisions it may "
                "make. Continue with the current route."
            )
        try:
            self._check_variables(remaining)
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

    @staticmethod
    def _names(specs: list[ActivitySpec]) -> list[str]:
        return [spec.name for spec in specs]
