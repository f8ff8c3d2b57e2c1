"""Who may send what: the trust policy beside the trusted keys.

A trusted key proves who signed a message; the policy says what that signer may do. Without a policy every
trusted key may do everything (the compatible default). With one, a key may do only what it is granted:

```json
{
  "keys": {
    "orders-api": {"may": ["start", "cancel"], "send_to": ["validate-customer-data"]},
    "validate-worker": {"send_to": ["send-welcome-email"], "may": ["revise"]},
    "approvals-desk": {"may": ["approve"]}
  }
}
```

- `start`: sign the plan of a new workflow (a dispatcher).
- `send_to`: the activities whose hops the key may sign (a list, or `"*"` for all; none when left out).
- `approve`: sign approvals of tool calls a parked step waits for.
- `cancel`: cancel workflows it did not start.
- `revise`: sign revisions of a workflow's route (a worker whose agent revises it).
- `advertise`: post on the registry what it serves (a worker), which planners and dispatchers then use.

A key the policy does not name may do nothing. Load it with `TrustPolicy.load(path)` or the
`PAIGEANT_TRUST_POLICY_FILE` setting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast, get_args

from ._keys import read_json
from .exceptions import SecurityError, UserError

__all__ = ("Grant", "Permission", "TrustPolicy")

Permission = Literal["start", "approve", "cancel", "revise", "advertise"]
PERMISSIONS: frozenset[str] = frozenset(get_args(Permission))


@dataclass(frozen=True, slots=True)
class Grant:
    """What one key may do.

    Attributes:
        may: The permissions it holds.
        send_to: The activities whose hops it may sign; None for every activity.
    """

    may: frozenset[Permission] = frozenset()
    send_to: frozenset[str] | None = frozenset()

    def sends_to(self, activity: str) -> bool:
        return self.send_to is None or activity in self.send_to


class TrustPolicy:
    """What each trusted key may do (see the module's docstring for the file format).

    Args:
        grants: Each key id's grant; None lets every trusted key do everything.
    """

    def __init__(self, grants: Mapping[str, Grant] | None = None) -> None:
        self.grants = dict(grants) if grants is not None else None

    @classmethod
    def any_trusted_key(cls) -> TrustPolicy:
        """The default: every trusted key may do everything."""
        return cls(None)

    @classmethod
    def load(cls, source: str | Path | Mapping[str, Any]) -> TrustPolicy:
        """A policy from a mapping, JSON text, or the path of a JSON file.

        Raises:
            UserError: It cannot be read, or names an unknown permission.
        """
        data: object = read_json(source, "the trust policy")
        return cls(_grants(data))

    @property
    def is_open(self) -> bool:
        """Whether every trusted key may do everything."""
        return self.grants is None

    def allows(self, kid: str | None, permission: Permission) -> bool:
        """Whether `kid` holds `permission`."""
        if self.grants is None:
            return True
        grant = self.grants.get(kid or "")
        return grant is not None and permission in grant.may

    def may_send_to(self, kid: str | None, activity: str) -> bool:
        """Whether `kid` may sign hops to `activity`."""
        if self.grants is None:
            return True
        grant = self.grants.get(kid or "")
        return grant is not None and grant.sends_to(activity)

    def require(self, kid: str | None, permission: Permission, what: str) -> None:
        """Raise unless `kid` holds `permission`; `what` names the act, for the reason.

        Raises:
            SecurityError: With code `not_allowed`.
        """
        if not self.allows(kid, permission):
            raise SecurityError(
                f"key {kid!r} may not {what}: the trust policy does not grant it {permission!r}", code="not_allowed"
            )

    def require_send(self, kid: str | None, activity: str) -> None:
        """Raise unless `kid` may sign hops to `activity`.

        Raises:
            SecurityError: With code `not_allowed`.
        """
        if not self.may_send_to(kid, activity):
            raise SecurityError(
                f"key {kid!r} may not send to {activity!r}: the trust policy does not list it in that key's send_to",
                code="not_allowed",
            )


def _grants(data: object) -> dict[str, Grant]:
    if not isinstance(data, Mapping) or set(cast("Mapping[str, Any]", data)) != {"keys"}:
        raise UserError('the trust policy must be a JSON object with one member, "keys": {"<kid>": {...}}')
    keys = cast("Mapping[str, Any]", data)["keys"]
    if not isinstance(keys, Mapping):
        raise UserError('the trust policy\'s "keys" must map key ids to grants')
    return {str(kid): _grant(str(kid), grant) for kid, grant in cast("Mapping[object, object]", keys).items()}


def _grant(kid: str, raw: object) -> Grant:
    if not isinstance(raw, Mapping):
        raise UserError(f'the trust policy\'s grant of {kid!r} must be an object like {{"may": ["start"]}}')
    grant = cast("Mapping[str, Any]", raw)
    unknown = sorted(set(grant) - {"may", "send_to"})
    if unknown:
        raise UserError(f'the trust policy\'s grant of {kid!r} has unknown member {unknown[0]!r}; use "may", "send_to"')
    may = _names(grant.get("may", []), f"{kid!r}'s may")
    bad = sorted(set(may) - PERMISSIONS)
    if bad:
        known = ", ".join(sorted(PERMISSIONS))
        raise UserError(f"the trust policy grants {kid!r} unknown permission {bad[0]!r}; choose from {known}")
    send_to = grant.get("send_to", [])
    targets = None if send_to == "*" else frozenset(_names(send_to, f"{kid!r}'s send_to"))
    return Grant(may=frozenset(cast("Iterable[Permission]", may)), send_to=targets)


def _names(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in cast("list[object]", value)):
        raise UserError(f"the trust policy's {what} must be a list of strings")
    return cast("list[str]", value)
