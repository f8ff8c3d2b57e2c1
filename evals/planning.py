"""What the offline planner does next, from the conversation and the catalog `list_activities` returned.

`decide` picks the request's goals, leaves out what the user asked to leave out, adds what the goals need, learns
from every refusal of the toolset so far this turn, and either dispatches, asks for a missing value, or says why it
will not. See `evals.policy` for what it sees and what it does not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import JsonValue

from .reading import GENERIC, Reading, read, stems

__all__ = ("Activity", "Dispatch", "Say", "decide")


@dataclass(frozen=True)
class Activity:
    """A catalog entry as `list_activities` returned it."""

    name: str
    description: str
    needs: tuple[str, ...]
    produces: tuple[str, ...]

    @property
    def name_stems(self) -> set[str]:
        return set(stems(self.name.replace("-", " ")))

    @property
    def flow(self) -> set[str]:
        """The stems of the flow its description names first ("Order: ..." is in the order flow)."""
        return set(stems(re.split(r"[:,]", self.description, maxsplit=1)[0])) if ":" in self.description else set()

    @property
    def words(self) -> set[str]:
        return self.name_stems | set(stems(self.description))

    @property
    def verb(self) -> str | None:
        """The first word of what its description says it does, after the flow ("Order: check an order" -> check)."""
        said = stems(self.description.rsplit(":", 1)[-1])
        return said[0] if said else None

    def described_by(self, words: list[str]) -> bool:
        """Whether its description starts with the verb of `words` and mentions the rest ("check the order")."""
        return len(words) > 1 and self.verb == words[0] and all(word in self.words for word in words[1:])

    @classmethod
    def listed(cls, entry: dict[str, Any]) -> Activity:
        needs, produces = entry.get("needs") or {}, entry.get("produces") or {}
        return cls(
            name=str(entry["name"]),
            description=str(entry.get("description") or ""),
            needs=tuple(str(name) for name in needs.get("required") or []),
            produces=tuple(str(name) for name in produces.get("properties") or {}),
        )


@dataclass(frozen=True)
class Say:
    """Reply to the user and dispatch nothing."""

    text: str


@dataclass(frozen=True)
class Dispatch:
    """Call `dispatch_workflow` with this plan."""

    activities: list[str]
    variables: dict[str, JsonValue]


_VAGUE = object()


def decide(
    requests: list[str], refusals: list[str], dispatched: list[list[str]], catalog: list[Activity]
) -> Say | Dispatch:
    """The next move, given the user's messages, the toolset's refusals this turn and the plans sent this turn."""
    readings = [read(request) for request in requests]
    found = _main(readings, catalog)
    if isinstance(found, Say):
        return found
    at, goals = found
    main = readings[at]
    excluded = _excluded([*main.excluded, *readings[-1].excluded], catalog)
    if isinstance(excluded, Say):
        return excluded
    state = _State(goals=[name for name in goals if name not in excluded], excluded=excluded, repeat=main.repeat)
    for refusal in refusals:
        if (said := state.learn(refusal, catalog)) is not None:
            return said
    values: dict[str, JsonValue] = {"ticket": requests[at]}
    for reading in readings:
        values.update(reading.values)
    return _dispatch(state, catalog, values, refusals, dispatched)


def _main(readings: list[Reading], catalog: list[Activity]) -> tuple[int, list[str]] | Say:
    """The message that says what to do (the latest that asks for something) and its goals."""
    for at in range(len(readings) - 1, -1, -1):
        goals = _intent(readings[at], catalog)
        if isinstance(goals, list):
            return at, goals
        if isinstance(goals, str) and at == 0 and len(readings) == 1:
            return Say(f"I can't {goals} anything: no activity in the catalog does that.")
    flows = ", ".join(dict.fromkeys(" ".join(sorted(a.flow)) for a in catalog if a.flow))
    return Say(f"What would you like me to do, and for whom? I can help with: {flows}.")


def _intent(reading: Reading, catalog: list[Activity]) -> list[str] | str | object:
    """The goals of a message; its first word when no activity does it; `_VAGUE` when it asks for nothing."""
    if not reading.clauses:
        return _VAGUE
    verb, clause = reading.clauses[0][0], reading.clauses[0]
    goals = [a.name for a in catalog if verb in a.flow] or _named(verb, clause, catalog)
    if not goals and verb in GENERIC:
        later = [word for words in reading.clauses for word in words if word not in GENERIC]
        flows = [[a.name for a in catalog if word in a.flow] for word in later]
        goals = next((flow for flow in flows if flow), [])
        if not goals:
            return _VAGUE
    if not goals:
        return reading.words[0]
    for clause in reading.clauses[1:]:
        goals += [name for name in _named(clause[0], clause, catalog) if name not in goals]
    return goals


def _named(verb: str, clause: list[str], catalog: list[Activity]) -> list[str]:
    """The activities the clause's verb and object describe ("check the order": the one described as checking an
    order); else those whose name holds `verb` (the ones sharing the most words with the clause); else the one
    activity whose description uses `verb`."""
    described = [a.name for a in catalog if a.described_by(clause[:2])]
    if described:
        return described
    hits = [a for a in catalog if verb in a.name_stems]
    if not hits:  # a word one description alone uses points to it; "handle" asks for a flow, not one step
        described = [a.name for a in catalog if verb in stems(a.description)]
        return described if len(described) == 1 and verb not in GENERIC else []
    best = max(len(set(clause) & a.words) for a in hits)
    return [a.name for a in hits if len(set(clause) & a.words) == best]


def _excluded(phrases: list[tuple[str, list[str]]], catalog: list[Activity]) -> dict[str, str] | Say:
    """The activities the user asked to leave out, each with the words they used."""
    excluded: dict[str, str] = {}
    for said, words in phrases:
        named = (
            [a for a in catalog if set(words) <= a.name_stems]
            or [a for a in catalog if a.described_by(words)]
            or [a for a in catalog if set(words) & a.name_stems]
        )
        if not named:
            return Say(f"I can't do that without {said}: it is not a step I can leave out of the plan.")
        excluded.update({a.name: said for a in named})
    return excluded


_PROBLEMS: list[tuple[str, re.Pattern[str]]] = [
    ("add", re.compile(r"'([\w.-]+)' must come after '([\w.-]+)', which the plan lacks")),
    ("move", re.compile(r"'([\w.-]+)' must come after '([\w.-]+)'")),
    ("accompany", re.compile(r"'([\w.-]+)' must be accompanied by '([\w.-]+)'")),
    ("conflict", re.compile(r"'([\w.-]+)' and '([\w.-]+)' must not be in the same plan")),
    ("once", re.compile(r"'([\w.-]+)' may appear at most")),
    ("variable", re.compile(r"step \d+ '([\w.-]+)' needs variable '(\w+)'")),
]


@dataclass
class _State:
    goals: list[str]
    excluded: dict[str, str]
    repeat: int
    added: list[str] = field(default_factory=list[str])
    before: list[tuple[str, str]] = field(default_factory=list[tuple[str, str]])
    dropped: set[str] = field(default_factory=set[str])

    def learn(self, refusal: str, catalog: list[Activity]) -> Say | None:
        """Take in what one refusal of the toolset says; a reply when what it asks goes against the request."""
        text = refusal.removeprefix("The plan was not dispatched: ").split(". Fix the plan")[0]
        for problem in text.split("; "):
            said = self._fix(problem, catalog)
            if said is not None:
                return said
        return None

    def _fix(self, problem: str, catalog: list[Activity]) -> Say | None:
        for kind, pattern in _PROBLEMS:
            if (match := pattern.search(problem)) is None:
                continue
            first, second = match.group(1), match.group(2) if kind != "once" else ""
            if kind in ("add", "accompany") and second in self.excluded:
                return _refuse(problem, f"you asked me to leave out {self.excluded[second]}")
            if kind == "once" and self.repeat > 1:
                return _refuse(problem, "you asked for it more than once")
            if kind == "conflict" and first in self.goals and second in self.goals:
                return _refuse(problem, "you asked for both")
            if kind == "variable":
                return self._produce(problem, second, catalog)
            self._apply(kind, first, second)
            return None
        return None

    def _apply(self, kind: str, first: str, second: str) -> None:
        if kind in ("add", "accompany"):
            self.added.append(second)
        if kind in ("add", "move"):
            self.before.append((second, first))
        if kind == "conflict":
            self.dropped.add(second if second not in self.goals else first)

    def _produce(self, problem: str, variable: str, catalog: list[Activity]) -> Say | None:
        makers = [a.name for a in catalog if variable in a.produces]
        usable = [name for name in makers if name not in self.excluded and name not in self.dropped]
        if makers and not usable and any(name in self.excluded for name in makers):
            return _refuse(problem, f"you asked me to leave out {self.excluded[makers[0]]}")
        if usable:
            self.added.append(usable[0])
        return None


def _refuse(problem: str, why: str) -> Say:
    return Say(f"I can't do that: the catalog's rules refuse it ({problem}), and {why}.")


def _dispatch(
    state: _State,
    catalog: list[Activity],
    values: dict[str, JsonValue],
    refusals: list[str],
    dispatched: list[list[str]],
) -> Say | Dispatch:
    by_name = {a.name: a for a in catalog}
    members = _members(state, by_name, values)
    needed = [need for name in members for need in by_name[name].needs]
    made = {made for name in members for made in by_name[name].produces}
    _defaults(values, needed)
    missing = [need for need in dict.fromkeys(needed) if need not in values and need not in made]
    unmakeable = [need for need in missing if not any(need in a.produces for a in catalog)]
    if unmakeable:
        return Say(
            f"To do that, I need the {', '.join(unmakeable)}: what {'is it' if len(unmakeable) == 1 else 'are they'}?"
        )
    plan = _ordered(members, by_name, values, state.before)
    if refusals and (refusals[-1] in refusals[:-1] or (dispatched and plan == dispatched[-1])):
        return Say(f"I could not dispatch a plan: {refusals[-1]}")  # what it repairs comes back: give up
    return Dispatch(plan, {key: values[key] for key in dict.fromkeys(needed) if key in values})


def _members(state: _State, by_name: dict[str, Activity], values: dict[str, JsonValue]) -> list[str]:
    """The goals (as often as asked), what the refusals added, and the producers of what they need."""
    members = [name for name in state.goals for _ in range(state.repeat)]
    members += [name for name in state.added if name not in members]
    members = [name for name in members if name not in state.dropped and name in by_name]
    grown = True
    while grown:
        grown = False
        made = {made for name in members for made in by_name[name].produces}
        for need in [need for name in members for need in by_name[name].needs]:
            if need in values or need in made:
                continue
            maker = next(
                (a for a in by_name.values() if need in a.produces and a.name not in {*state.excluded, *state.dropped}),
                None,
            )
            if maker is not None and maker.name not in members:
                members.append(maker.name)
                grown = True
                break
    return members


def _defaults(values: dict[str, JsonValue], needed: list[str]) -> None:
    """What a planner may assume: one item, the standard tier."""
    if "quantity" in needed and "order_id" in values:
        values.setdefault("quantity", 1)
    if "subscription_tier" in needed and "customer_email" in values:
        values.setdefault("subscription_tier", "standard")


def _ordered(
    members: list[str], by_name: dict[str, Activity], values: dict[str, JsonValue], before: list[tuple[str, str]]
) -> list[str]:
    """`members` in an order where each comes after what makes its variables and after what `before` says; among
    those free to go, the one listed first in the catalog."""
    rank = {name: at for at, name in enumerate(by_name)}
    nodes = sorted(range(len(members)), key=lambda at: (rank[members[at]], at))
    edges = {
        (i, j)
        for i in nodes
        for j in nodes
        if i != j
        and (
            any(need not in values and need in by_name[members[i]].produces for need in by_name[members[j]].needs)
            or (members[i], members[j]) in before
        )
    }
    order: list[int] = []
    while nodes:
        free = [j for j in nodes if not any((i, j) in edges for i in nodes)] or nodes[:1]  # a cycle: catalog order
        order.append(free[0])
        nodes.remove(free[0])
    return [members[at] for at in order]
