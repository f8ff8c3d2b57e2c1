"""The checks of `WorkflowDispatcher.dispatch_workflow`: the shape of its arguments (each mistake told in one
sentence), what makes a retry the same workflow (`workflow_fingerprint`), and, with `require_workers`, that a worker
consumes the first step and every fallback and compensation the route names (`require_workers`, `served_hint`)."""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, cast

from pydantic import ValidationError

from ._parallel import MAX_BRANCHES, Parallel, check_branch_count
from ._versions import check_version_range
from .activity import Activity
from .contracts import RESERVED_ADDRESSES, ActivitySpec, PaigeantMessage
from .exceptions import NoWorker, UserError
from .transports.base import ConsumerWatch, Transport

__all__ = (
    "require_workers",
    "route_spec",
    "served_hint",
    "specs_of",
    "to_spec",
    "variables_of",
    "workflow_fingerprint",
)

logger = logging.getLogger("paigeant_ai.dispatch")


def to_spec(item: ActivitySpec | Activity | Parallel | str) -> ActivitySpec:
    """The spec the routing slip carries for `item`: a spec, an activity's spec, a bare name, or a `Parallel`
    group's."""
    if isinstance(item, Parallel):
        return item.spec
    if isinstance(item, ActivitySpec):
        if len(item.branches) > MAX_BRANCHES:
            check_branch_count(len(item.branches))
        return item
    if isinstance(item, str):
        try:
            return ActivitySpec(name=item)
        except ValidationError as exc:
            raise UserError(f"invalid activity name {item!r}: {exc.errors(include_url=False)[0]['msg']}") from None
    spec = getattr(item, "spec", None)
    if isinstance(spec, ActivitySpec):
        return route_spec(spec)
    raise UserError(f"{item!r} is not an activity: pass ActivitySpec objects, activities or names")


def route_spec(spec: ActivitySpec) -> ActivitySpec:
    """What the routing slip carries of an activity's own spec: the worker that runs it owns its retry and timeout."""
    return ActivitySpec(
        name=spec.name,
        description=spec.description,
        required_scopes=spec.required_scopes,
        mandatory=spec.mandatory,
        compensate=spec.compensate,
        fallbacks=spec.fallbacks,
    )


def specs_of(activities: object) -> list[ActivitySpec]:
    """The spec of each step in `activities`, which must be a list of steps."""
    if isinstance(activities, str):
        raise UserError(f"activities must be a list of steps, not one string: write [{activities!r}]")
    if not isinstance(activities, Sequence) or isinstance(activities, bytes | bytearray):
        raise UserError(
            f"activities must be a list of steps (ActivitySpec objects, activities or names), "
            f"not {type(activities).__name__}"
        )
    specs = [
        to_spec(item) for item in cast("Sequence[ActivitySpec | Activity | Parallel | str]", activities)
    ]  # each checked
    for spec in (step for group in specs for step in (group, *group.branches)):
        if spec.version is not None:
            check_version_range(spec.version, spec.name)
    return specs


def variables_of(variables: object) -> Mapping[str, Any] | None:
    """`variables`, once checked to be None or a mapping with names as keys."""
    if variables is None:
        return None
    if not isinstance(variables, Mapping):
        raise UserError(
            "variables must be a mapping of names to JSON values, like {'order_id': 42}, "
            f"not {type(variables).__name__}"
        )
    for key in cast("Mapping[object, object]", variables):
        if not isinstance(key, str):
            raise UserError(f"variable names must be strings: {key!r} is {type(key).__name__}; write {str(key)!r}")
    return cast("Mapping[str, Any]", variables)


def workflow_fingerprint(message: PaigeantMessage) -> str:
    """What makes two dispatches the same workflow: its activities, variables and token (hashed)."""
    content = {
        "activities": [spec.model_dump(mode="json") for spec in message.routing_slip.itinerary],
        "variables": message.payload,
        "obo_token": message.security.obo_token,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def served_hint(activity: str, served: list[str] | None) -> str:
    """What the transport knows of the steps that are served, for the `NoWorker` message."""
    if served is None:
        return ""
    if not served:
        return " (no worker consumes any step on this transport now)"
    close = difflib.get_close_matches(activity, served, n=1)
    guess = f"did you mean {close[0]!r}? " if close else ""
    return f" ({guess}workers consume: {', '.join(served)})"


async def require_workers(transport: Transport, itinerary: Sequence[ActivitySpec]) -> None:
    """Raise `NoWorker` unless something consumes the first step of `itinerary` now, and every fallback and
    compensation its steps name; nothing when the transport cannot tell (a warning says so).

    Only what the route carries is checked: a compensation that a worker's own spec adds at run time is not known
    here (a workflow waiting for it shows as `stalled`, see `mark_stalled`).
    """
    first = itinerary[0].branches[0].name if itinerary[0].branches else itinerary[0].name
    if not isinstance(transport, ConsumerWatch) or (count := await transport.consumers(first)) is None:
        logger.warning("%s cannot tell whether a worker consumes %r; dispatching anyway", transport.name, first)
        return
    wanted: dict[str, str | None] = {first: None}  # each activity, and what the route needs it for
    for position, spec in enumerate(step for group in itinerary for step in (group.branches or (group,))):
        if position == 0 or spec in itinerary[0].branches:
            wanted.setdefault(spec.name, None)  # each branch of a first group runs first
        for fallback in spec.fallbacks:
            wanted.setdefault(fallback, f"the fallback of step {position} {spec.name!r}")
        if spec.compensate is not None:
            wanted.setdefault(spec.compensate, f"the compensation of step {position} {spec.name!r}")
    for activity, role in wanted.items():
        if (count if activity == first else await transport.consumers(activity)) == 0:
            await _no_worker(transport, activity, role)


async def _no_worker(transport: ConsumerWatch, activity: str, role: str | None) -> NoReturn:
    consumed = await transport.consumed_addresses()
    served = None if consumed is None else [name for name in consumed if name not in RESERVED_ADDRESSES]
    hint = served_hint(activity, served)
    fix = "fix the step's name" if role is None else "fix its name"
    what = f"{activity!r}" if role is None else f"{activity!r}, {role}"
    raise NoWorker(
        f"no worker consumes {what}: start a worker for it, or {fix}{hint}", activity=activity, served=served
    )
