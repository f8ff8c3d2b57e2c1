"""Who uses the console: local accounts (a users file of scrypt hashes) or a bearer token from the issuer the
workers trust, a signed session cookie, and a CSRF token for every form.

A person signs in once; the console then acts as that person, a `Principal`. What a person may do in the console
(`approve` tool calls, `replay` dead letters) is said by the users file for a local account, and by the token's
scopes (`paigeant:approve`, `paigeant:replay`) for a token. The decision itself is then signed with the console's
own key, which the trust policy must let `approve` (the workers check it), and names the person.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._tokens import TokenValidator, granted_scopes
from ..exceptions import TokenError, UserError

__all__ = (
    "PERMISSIONS",
    "SESSION_COOKIE",
    "Principal",
    "Session",
    "Sessions",
    "Users",
    "csrf_holds",
    "hash_password",
    "principal_from_token",
    "verify_password",
)

Permission = Literal["approve", "replay"]
PERMISSIONS: tuple[Permission, ...] = ("approve", "replay")
TOKEN_SCOPES: dict[str, Permission] = {"paigeant:approve": "approve", "paigeant:replay": "replay"}
"""The token scopes that give a person a console permission."""

_SCRYPT = {"n": 2**17, "r": 8, "p": 1}
"""scrypt's cost: OWASP's minimum for password storage (128 MiB, about half a second on one core)."""
_MOST_N = 2**20
"""The largest cost a stored hash may ask for (1 GiB): a hash asking more is refused, not computed."""
SESSION_COOKIE = "paigeant_console"
SESSION_SECONDS = 8 * 3600
"""How long a sign-in lasts."""
SIGN_IN_SECONDS = 1800
"""How long the session of a sign-in page lasts before anyone signed in with it."""


@dataclass(frozen=True, slots=True)
class Principal:
    """A signed-in person: the name every decision is recorded with, what they may do, and how they signed in."""

    name: str
    may: frozenset[str]
    via: Literal["account", "token"]
    token: str | None = field(default=None, repr=False)
    """The bearer token a person signed in with; sent with an approval as the approver's token."""
    expires: float | None = None
    """When the sign-in ends at the latest (a token's `exp`): the session ends then too."""

    def allows(self, permission: Permission) -> bool:
        return permission in self.may


# -- passwords and the users file -------------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """`password` as `scrypt$n$r$p$salt$hash` (base64), with a fresh salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, **_SCRYPT, dklen=32, maxmem=_memory(_SCRYPT["n"], 8))
    encoded = [base64.b64encode(part).decode() for part in (salt, digest)]
    return "$".join(["scrypt", str(_SCRYPT["n"]), str(_SCRYPT["r"]), str(_SCRYPT["p"]), *encoded])


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` (from `hash_password`) was made of, in constant time."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected, cost, block = base64.b64decode(digest), int(n), int(r)
        if cost > _MOST_N or block > 16:
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=cost,
            r=block,
            p=int(p),
            dklen=len(expected),
            maxmem=_memory(cost, block),
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, expected)


def _memory(n: int, r: int) -> int:
    """The memory scrypt may use for cost `n` and block size `r`: what it needs (128 n r bytes), and room."""
    return 128 * n * r + 2**24


class Users:
    """The local accounts of a users file: `{"users": {"ana": {"password": "scrypt$...", "may": ["approve"]}}}`.

    The file is read on every sign-in, so an account added or removed counts at once.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            users = json.loads(self.path.read_text()).get("users", {})
        except (ValueError, AttributeError) as exc:
            raise UserError(f"the console's users file {self.path} is not valid: {exc}; fix or remove it") from None
        return users if isinstance(users, dict) else {}

    def sign_in(self, name: str, password: str) -> Principal | None:
        """The principal `name` is when `password` is theirs; None otherwise."""
        account = self._read().get(name)
        if not isinstance(account, dict) or not verify_password(password, str(account.get("password", ""))):
            hash_password(password)  # as slow for an unknown name as for a wrong password
            return None
        may = frozenset(str(item) for item in account.get("may", []) if item in PERMISSIONS)
        return Principal(name, may, "account")

    def add(self, name: str, password: str, may: list[str]) -> None:
        """Add or replace the account `name`; the file is written `0600`, as a new file renamed into place."""
        unknown = sorted(set(may) - set(PERMISSIONS))
        if unknown:
            raise UserError(f"unknown permission {', '.join(unknown)}: give --may {' or '.join(PERMISSIONS)}")
        if not name or len(password) < 8:
            raise UserError("an account needs a name and a password of at least 8 characters")
        users = self._read()
        users[name] = {"password": hash_password(password), "may": sorted(set(may))}
        temporary = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({"users": users}, file, indent=2)
        temporary.replace(self.path)


def principal_from_token(token: str, validator: TokenValidator | None) -> Principal:
    """The person a bearer token from the configured issuer names (its `sub`), with the permissions its scopes
    give.

    Raises:
        UserError: No issuer is configured, or the token fails its checks (the reason is said).
    """
    if validator is None:
        raise UserError("token sign-in needs the issuer the workers trust: set PAIGEANT_OBO_JWKS_FILE and its issuer")
    try:
        claims = validator.validate(token)
    except TokenError as exc:
        raise UserError(f"the token is refused: {exc}") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise UserError("the token names nobody: it has no 'sub' claim")
    may = frozenset(TOKEN_SCOPES[scope] for scope in granted_scopes(claims) if scope in TOKEN_SCOPES)
    expires = claims.get("exp")
    return Principal(subject, may, "token", token, float(expires) if isinstance(expires, int | float) else None)


# -- sessions ---------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Session:
    """One browser's session: who signed in (None before), its CSRF token, and when it ends."""

    csrf: str
    expires: float
    principal: Principal | None = None
    flash: str | None = None
    """A line to show on the next page (what a decision did, or why it was refused)."""


class Sessions:
    """Sessions kept in this process, named by a random ID in an HMAC-signed, HttpOnly, SameSite=Strict cookie.

    The secret is `PAIGEANT_CONSOLE_SECRET` when set (sessions then survive a restart only as far as this memory
    does: a restart signs everyone out), else a random one for the process.
    """

    most_waiting = 10_000
    """The most sessions of a sign-in page kept at once (anyone may open one): the oldest go first."""

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret or secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}

    def _mac(self, session_id: str) -> str:
        return hmac.new(self._secret, session_id.encode(), hashlib.sha256).hexdigest()

    def cookie_of(self, session_id: str) -> str:
        return f"{session_id}.{self._mac(session_id)}"

    def get(self, cookie: str | None) -> tuple[str, Session] | None:
        """The session the cookie names, when its signature holds and it has not ended."""
        session_id, _, mac = (cookie or "").partition(".")
        if not session_id or not hmac.compare_digest(mac.encode(), self._mac(session_id).encode()):
            return None
        session = self._sessions.get(session_id)
        if session is None or session.expires < time.time():
            self._sessions.pop(session_id, None)
            return None
        return session_id, session

    def start(self, principal: Principal | None = None) -> tuple[str, Session]:
        """A new session (a new ID at each sign-in, so one planted before it is worth nothing)."""
        now = time.time()
        for stale in [key for key, session in self._sessions.items() if session.expires < now]:
            del self._sessions[stale]
        session_id = secrets.token_urlsafe(32)
        expires = now + (SESSION_SECONDS if principal is not None else SIGN_IN_SECONDS)
        if principal is not None and principal.expires is not None:  # a token's sign-in ends with the token
            expires = min(expires, principal.expires)
        if principal is None:
            waiting = [key for key, session in self._sessions.items() if session.principal is None]
            for oldest in waiting[: max(0, len(waiting) - self.most_waiting + 1)]:
                del self._sessions[oldest]
        session = Session(secrets.token_urlsafe(32), expires, principal)
        self._sessions[session_id] = session
        return session_id, session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)


def csrf_holds(session: Session, given: object) -> bool:
    """Whether a form's `csrf` field is the session's token."""
    return isinstance(given, str) and hmac.compare_digest(given.encode(), session.csrf.encode())
