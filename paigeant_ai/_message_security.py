"""What a worker and a dispatcher need of their message security (`MessageSecurity`, which `MessageSigner`
implements), and what its checks prove (`Authenticated`, `Verified`); all re-exported by `paigeant_ai.security`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ._replay import RenewState
from .contracts import ActivitySpec, PaigeantMessage
from .trust import TrustPolicy

__all__ = ("Authenticated", "MessageSecurity", "Verified")


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified hop proved.

    Attributes:
        signer: The key id that signed it; None when messages are not signed.
        claims: The validated claims of the user's on-behalf-of token, when there is one and tokens are checked.
    """

    signer: str | None = None
    claims: Mapping[str, Any] | None = None


class MessageSecurity(Protocol):
    """Signs what a worker or dispatcher sends and verifies what a worker receives (`MessageSigner` is one)."""

    def signature_for(self, body: bytes) -> str | None:
        """The detached JWS over `body`, a message encoded with no signature; None to send it unsigned."""
        ...

    @property
    def policy(self) -> TrustPolicy:
        """What each trusted key may do."""
        ...

    def sign_bytes(self, payload: bytes, *, typ: str) -> str | None:
        """A detached JWS of type `typ` over `payload` (state kept at rest, a plan, an approval); None when unsigned."""
        ...

    def verify_bytes(self, signature: str | None, payload: bytes, *, typ: str) -> str | None:
        """The key id that signed `payload` with `signature` (of type `typ`); None when messages are not signed.

        Raises:
            SecurityError: Not signed, not by a trusted key, of another type, or altered.
        """
        ...

    async def verify(self, message: PaigeantMessage, spec: ActivitySpec, body: bytes) -> Verified:
        """Check the signature of `body` (the bytes `message` was read from), that its signer may send to the
        step, replay, and the user's token against `spec.required_scopes`.

        Returns:
            The signer and the validated claims of the user's on-behalf-of token, if there is one.

        Raises:
            SecurityError: With the precise reason; the message is dead-lettered and never run.
            ReplayedMessage: A copy of exactly a settled hop: skipped if the broker redelivered it, else refused.
            DuplicateMessage: The settled hop produced anew by a trusted signer: skipped.
            TokenError: The user's token fails a check: the workflow faults, never retried.
        """
        ...

    def authenticate(self, message: PaigeantMessage, spec: ActivitySpec, body: bytes) -> Authenticated:
        """Check, without I/O, the signature of `body` (the bytes `message` was read from) and that its signer may
        send to the step: the first check of a hop, before it may wait for anything.

        Raises:
            SecurityError: With the precise reason; the message is dead-lettered and never run.
        """
        ...

    async def claim(
        self, message: PaigeantMessage, digest: str, *, redelivered: bool, lease: float, holder: str = ""
    ) -> None:
        """Claim the authenticated hop `message` (its content `digest`) as it starts (see `paigeant_ai._replay`).

        Raises:
            ReplayedMessage: A copy of exactly a hop that runs elsewhere or was settled: refused unless the broker
                redelivered it (then skipped).
            DuplicateMessage: The hop produced anew by a trusted signer: skipped.
            SecurityError: The hop cannot be told from a replay (`replay_horizon`).
        """
        ...

    async def renew(self, message: PaigeantMessage, digest: str, lease: float, holder: str = "") -> RenewState:
        """Extend the running claim of the hop `message` (its content `digest`) held by `holder` to `lease` seconds
        from now; `gone` when it is claimed no more, `taken` when another holds it (see `paigeant_ai._long_steps`)."""
        ...

    def check_token(self, message: PaigeantMessage, spec: ActivitySpec) -> Mapping[str, Any] | None:
        """The validated claims of the user's token, checked against `spec.required_scopes`.

        Raises:
            TokenError: The token fails a check: the workflow faults, never retried.
        """
        ...

    async def settled(self, message: PaigeantMessage, digest: str | None = None) -> None:
        """Called once the hop `message` (its content `digest`, from `authenticate`) is settled (acked after its
        successor, retry or fault was published)."""
        ...


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A hop whose signature holds: who signed it, and a digest of exactly what the signature covers."""

    signer: str | None
    digest: str = ""
