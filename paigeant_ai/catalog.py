"""`ActivityCatalog`: the activities a planner or a revising agent may put on a route, and what each needs.

A catalog is built explicitly from activities and specs (no registry). Each entry says what the activity does,
which workflow variables it needs and which it produces, as JSON schemas a model can read. The catalog checks a
route before anything is dispatched: every name known and allowed, every needed variable provided by the
workflow's variables or by an earlier step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from ._catalog_groups import PlanStep, plan_with_groups
from ._catalog_schemas import UNKNOWN, VariablesSchema, infer, schema
from ._dispatch_checks import route_spec
from ._plan_rules import PlanRules, broken_rules, plan_rules
from .activity import Activity
from .contracts import ActivitySpec
from .exceptions import InvalidPlan, UserError

if TYPE_CHECKING:
    from .security import MessageSecurity
    from .transports.base import Transport

__all__ = ("ActivityCatalog", "CatalogEntry", "VariablesSchema")


class CatalogEntry(BaseModel):
    """One activity as a planner sees it.

    Attributes:
        name: The activity's name, as it goes on the route.
        description: What it does.
        needs: JSON schema of the workflow variables it reads; its `required` ones must exist when it runs.
        produces: JSON schema of the variables it adds to the workflow.
        compensate: The activity that undoes it once it completed, should the workflow later fault, be cancelled
            or expire; None when nothing does.
        compensation: What that activity does, in words, when it is known: what a planner tells the user will be
            undone.
        fallbacks: The activities tried instead of it, in order, once it failed for good (the activity's own; a
            plan may name others).
        at_most_once: The step runs at most once: after a crash it is never re-run blindly, but reconciled or
            left for a person to settle (it may then wait).
        after: Activities that must be in the plan at an earlier step (see `PlanRules`).
        requires: Activities that must be in the same plan, at any step.
        conflicts: Activities that must not be in the same plan.
        max_per_plan: How many times it may appear in one plan; None for no limit.
        spec: The spec the route carries for it (not shown to models).
    """

    model_config = ConfigDict(frozen=True)

    name: str
    description: str = ""
    needs: dict[str, JsonValue] = Field(default_factory=lambda: dict(UNKNOWN))
    produces: dict[str, JsonValue] = Field(default_factory=lambda: dict(UNKNOWN))
    compensate: str | None = Field(default=None, exclude_if=lambda value: value is None)
    compensation: str | None = Field(default=None, exclude_if=lambda value: value is None)
    fallbacks: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    at_most_once: bool = Field(default=False, exclude_if=lambda value: not value)
    after: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    requires: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    conflicts: list[str] = Field(default_factory=list[str], exclude_if=lambda value: not value)
    max_per_plan: int | None = Field(default=None, ge=1, exclude_if=lambda value: value is None)
    spec: ActivitySpec = Field(exclude=True)

    @property
    def rules(self) -> PlanRules:
        """Its ordering rules."""
        return PlanRules(
            after=tuple(self.after),
            requires=tuple(self.requires),
            conflicts=tuple(self.conflicts),
            max_per_plan=self.max_per_plan,
        )

    @property
    def required_variables(self) -> list[str]:
        """The variables that must exist before the activity runs."""
        required = self.needs.get("required")
        return [item for item in required if isinstance(item, str)] if isinstance(required, list) else []

    @property
    def produced_variables(self) -> list[str]:
        """The variables the activity adds to the workflow."""
        properties = self.produces.get("properties")
        return list(properties) if isinstance(properties, dict) else []


class ActivityCatalog:
    """The activities a route may be built from.

    ```python
    catalog = ActivityCatalog([classify, route_ticket, ActivitySpec(name="schedule-follow-up")])
    catalog.add(research, needs=["customer_id"], produces=CustomerHistory)
    ```

    What an entry needs and produces is inferred where the activity says it: an `AgentActivity` needs the
    placeholders of its prompt template and produces its output under its `output_key`; a function activity
    that returns a pydantic model produces that model's fields. Say it explicitly with `add(...)` otherwise.

    Args:
        activities: Activities, `ActivitySpec`s or ready `CatalogEntry`s.
    """

    def __init__(self, activities: Iterable[Activity | ActivitySpec | CatalogEntry] = ()) -> None:
        self._entries: dict[str, CatalogEntry] = {}
        for item in activities:
            self.add(item)

    @classmethod
    async def from_registry(
        cls,
        transport: Transport,
        *,
        security: MessageSecurity | None = None,
        allowed: Collection[str] | None = None,
        forbidden: Collection[str] = (),
        scopes: Collection[str] | None = None,
    ) -> ActivityCatalog:
        """The activities live workers on `transport` serve now, as they advertise them (see `docs/registry.md`).

        ```python
        catalog = await ActivityCatalog.from_registry(transport, scopes=["customers:write"])
        ```

        Args:
            transport: A connected transport that keeps a registry (all three built-in ones do).
            security: Verifies the workers' records; by default a `MessageSigner` of the `PAIGEANT_*` settings.
            allowed: Only these activities, when given.
            forbidden: Never these activities.
            scopes: Only the activities whose required scopes are all among these, when given.

        Raises:
            UserError: The transport keeps no registry.
        """
        from ._registry import read_registry

        registry = await read_registry(transport, security)
        if registry is None:
            raise UserError(
                f"the {transport.name} transport keeps no registry of live workers: build the catalog by hand "
                "with ActivityCatalog([...])"
            )
        return cls(
            entry
            for entry in registry.entries()
            if (allowed is None or entry.name in allowed)
            and entry.name not in forbidden
            and (scopes is None or set(entry.spec.required_scopes) <= set(scopes))
        )

    def merge(self, other: ActivityCatalog) -> ActivityCatalog:
        """A new catalog with the entries of both; where both have an activity, this catalog's entry wins.

        `catalog | live` is the same: a hand-written catalog merged with the registry's keeps its own descriptions
        and schemas, and gains the live activities it does not name.
        """
        merged = ActivityCatalog()
        merged._entries = {**other._entries, **self._entries}
        return merged

    def __or__(self, other: object) -> ActivityCatalog:
        return self.merge(other) if isinstance(other, ActivityCatalog) else NotImplemented

    def add(
        self,
        activity: Activity | ActivitySpec | CatalogEntry,
        *,
        description: str | None = None,
        needs: VariablesSchema = None,
        produces: VariablesSchema = None,
        after: Sequence[str] | None = None,
        requires: Sequence[str] | None = None,
        conflicts: Sequence[str] | None = None,
        max_per_plan: int | None = None,
    ) -> CatalogEntry:
        """Add an activity and return its entry; adding one that is already there amends its entry.

        ```python
        catalog.add(research, produces=["customer_history"])  # research is in the catalog: say what it produces
        catalog.add(ship_order, after=["process-payment"])  # never shipped before it is paid
        ```

        Args:
            activity: The activity, its spec, or a ready entry (which replaces the one of its name).
            description: What it does; defaults to the spec's description (or, when amending, the entry's).
            needs: The variables it reads (see `VariablesSchema`); inferred when `None` (or, when amending, kept).
            produces: The variables it adds; inferred when `None` (or, when amending, kept).
            after: Activities that must be in the plan at an earlier step; `None` keeps the activity's own
                (see `PlanRules` for all four rules).
            requires: Activities that must be in the same plan; `None` keeps the activity's own.
            conflicts: Activities that must not be in the same plan; `None` keeps the activity's own.
            max_per_plan: How many times it may appear in one plan; `None` keeps the activity's own.

        Raises:
            UserError: `activity` is not an activity, has the name of one in the catalog that requires other scopes,
                or a rule is malformed.
        """
        rules = {"after": after, "requires": requires, "conflicts": conflicts, "max_per_plan": max_per_plan}
        entry = activity if isinstance(activity, CatalogEntry) else _entry(activity, description, needs, produces)
        if any(value is not None for value in rules.values()):
            own = (entry if isinstance(activity, CatalogEntry) else self._entries.get(entry.name, entry)).rules
            checked = plan_rules(
                entry.name,
                after=after if after is not None else own.after,
                requires=requires if requires is not None else own.requires,
                conflicts=conflicts if conflicts is not None else own.conflicts,
                max_per_plan=max_per_plan if max_per_plan is not None else own.max_per_plan,
            )
            entry = entry.model_copy(update=_rule_fields(checked))
        existing = self._entries.get(entry.name)
        if existing is not None and set(existing.spec.required_scopes) != set(entry.spec.required_scopes):
            raise UserError(
                f"the catalog already has an activity named {entry.name!r} that requires other scopes: "
                "give the new one another name"
            )
        if existing is not None and not isinstance(activity, CatalogEntry):
            said = {"description": description, "needs": needs, "produces": produces, **rules}
            entry = existing.model_copy(
                update={key: getattr(entry, key) for key, value in said.items() if value is not None}
            )
        self._entries[entry.name] = entry
        return entry

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> CatalogEntry | None:
        """The entry named `name`, if there is one."""
        return self._entries.get(name)

    @property
    def names(self) -> list[str]:
        """Every activity name, in the order they were added."""
        return list(self._entries)

    def entries(self, *, forbidden: Collection[str] = ()) -> list[CatalogEntry]:
        """The entries a planner may use: all but `forbidden`; each one's `compensation` said in words when its
        compensating activity is in the catalog with a description."""
        return [self._described(entry) for entry in self._entries.values() if entry.name not in forbidden]

    def _described(self, entry: CatalogEntry) -> CatalogEntry:
        undo = self._entries.get(entry.compensate) if entry.compensate is not None else None
        if entry.compensation is not None or undo is None or not undo.description:
            return entry
        return entry.model_copy(update={"compensation": undo.description})

    def plan(
        self,
        activities: Sequence[PlanStep],
        variables: Iterable[str] = (),
        *,
        forbidden: Collection[str] = (),
        fallbacks: Mapping[str, Sequence[str]] | None = None,
    ) -> list[ActivitySpec]:
        """The specs of a route, once it is checked.

        Args:
            activities: Activity names in the order they run; a list of names is a parallel group (see
                `paigeant_ai._catalog_groups`).
            variables: The names of the variables the workflow starts with.
            forbidden: Names that may not be used.
            fallbacks: For an activity of the route, the activities to try instead, in order, once it failed for
                good (`ActivitySpec.fallbacks`); they replace the activity's own. Each must be usable as a step,
                and find the variables it needs where its step runs.

        Raises:
            InvalidPlan: With every problem at once: unknown or forbidden names (fallbacks included), fallbacks
                for an activity not on the route, needed variables that neither `variables` nor an earlier
                step provide, or ordering rules the plan breaks (`CatalogEntry.after` and the others), each
                with its fix.
        """
        if not activities:
            raise InvalidPlan("a workflow needs at least one activity")
        fallbacks = dict(fallbacks or {})
        if any(not isinstance(step, str) for step in activities):  # a parallel group: a list of names
            return plan_with_groups(self, activities, variables, forbidden=forbidden, fallbacks=fallbacks)
        activities = [step for step in activities if isinstance(step, str)]  # all of them: names
        problems = self.unusable(
            [*activities, *(name for names in fallbacks.values() for name in names)], forbidden=forbidden
        )
        problems += [
            f"fallbacks are given for {name!r}, which is not an activity of the plan"
            for name in fallbacks
            if name not in activities
        ]
        if not problems:
            variables = list(variables)
            problems = self.missing_variables(activities, variables) + self._fallback_needs(
                activities, variables, fallbacks
            )
            problems += broken_rules(self.get, [[name] for name in activities])
        specs = [self._entries[name].spec for name in activities] if not problems else []
        if fallbacks and not problems:
            specs = [
                _with_fallbacks(spec, fallbacks[spec.name], problems) if spec.name in fallbacks else spec
                for spec in specs
            ]
        if problems:
            raise InvalidPlan("; ".join(dict.fromkeys(problems)))
        return specs

    def _fallback_needs(
        self, activities: Sequence[str], variables: list[str], fallbacks: Mapping[str, Sequence[str]]
    ) -> list[str]:
        """A sentence for each variable a fallback needs that is not there when its step runs."""
        problems: list[str] = []
        for position, name in enumerate(activities):
            for fallback in fallbacks.get(name, ()):
                problems.extend(
                    f"fallback {fallback!r} of step {position + 1} {name!r} needs variable {variable!r}, which "
                    "neither the workflow's variables nor an earlier step provide"
                    for at, _, variable in self.unmet_needs([*activities[:position], fallback], variables)
                    if at == position
                )
        return problems

    def unusable(self, activities: Iterable[str], *, forbidden: Collection[str] = ()) -> list[str]:
        """A sentence for each name that is not in the catalog or is forbidden."""
        problems: list[str] = []
        unknown = list(dict.fromkeys(name for name in activities if name not in self._entries))
        if unknown:
            allowed = ", ".join(entry.name for entry in self.entries(forbidden=forbidden))
            names = ", ".join(repr(name) for name in unknown)
            problems.append(f"unknown {'activity' if len(unknown) == 1 else 'activities'} {names}; use only: {allowed}")
        for name in dict.fromkeys(name for name in activities if name in forbidden and name in self._entries):
            problems.append(f"activity {name!r} is not allowed here")
        return problems

    def missing_variables(self, activities: Sequence[str], available: Iterable[str]) -> list[str]:
        """A sentence for each variable a step needs that neither `available` nor an earlier step provides."""
        return [
            f"step {position + 1} {name!r} needs variable {variable!r}, which neither the workflow's variables "
            "nor an earlier step provide"
            for position, name, variable in self.unmet_needs(activities, available)
        ]

    def unmet_needs(self, activities: Sequence[str], available: Iterable[str]) -> list[tuple[int, str, str]]:
        """`(position, activity, variable)` for each variable a step needs that nothing before it provides.

        Names the catalog does not know are taken to need and produce nothing.
        """
        known = set(available)
        unmet: list[tuple[int, str, str]] = []
        for position, name in enumerate(activities):
            entry = self._entries.get(name)
            if entry is None:
                continue
            unmet.extend((position, name, variable) for variable in entry.required_variables if variable not in known)
            known.update(entry.produced_variables)
        return unmet


def _entry(
    activity: Activity | ActivitySpec, description: str | None, needs: VariablesSchema, produces: VariablesSchema
) -> CatalogEntry:
    spec = activity if isinstance(activity, ActivitySpec) else getattr(activity, "spec", None)
    if not isinstance(spec, ActivitySpec):
        raise UserError(f"{activity!r} is not an activity: add activities, ActivitySpecs or CatalogEntries")
    inferred_needs, inferred_produces = infer(activity)
    undo = getattr(activity, "compensation", None)  # the activity or function this step's worker undoes it with
    return CatalogEntry(
        name=spec.name,
        description=description if description is not None else spec.description,
        needs=schema(needs) if needs is not None else inferred_needs,
        produces=schema(produces) if produces is not None else inferred_produces,
        compensate=spec.compensate,
        compensation=undo.spec.description or None if isinstance(undo, Activity) else None,
        fallbacks=list(spec.fallbacks),
        at_most_once=spec.at_most_once,
        spec=route_spec(spec),
    ).model_copy(update=_rule_fields(rules) if isinstance(rules := getattr(activity, "rules", None), PlanRules) else {})


def _rule_fields(rules: PlanRules) -> dict[str, Any]:
    """An entry's fields for `rules`: they have the same names."""
    return rules.model_dump(mode="json")


def _with_fallbacks(spec: ActivitySpec, fallbacks: Sequence[str], problems: list[str]) -> ActivitySpec:
    """`spec` with `fallbacks` instead of its own; what is wrong with them is added to `problems`."""
    try:
        return ActivitySpec.model_validate({**spec.model_dump(), "fallbacks": list(fallbacks)})
    except ValidationError as exc:
        why = exc.errors(include_url=False)[0]["msg"]
        problems.append(
            why.removeprefix("Value error, ") if why.startswith("Value error, ") else f"{spec.name!r}: {why}"
        )
        return spec
