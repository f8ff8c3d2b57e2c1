"""Zero-trust messaging: every hop signed and verified, on-behalf-of tokens checked, replays refused.

A `MessageSigner` signs each message it sends with a detached JWS over the exact bytes sent (with the signature
itself `null`: see `paigeant_ai._sealing`), protected header `{"alg", "kid", "typ"}`, `alg` from a short
allow-list (`Ed25519`, `ES256`).
A worker verifies what it receives against its trusted public keys (a JWKS, looked up by `kid`), refuses a
message it has already settled, validates the user's on-behalf-of token and the scopes the step requires, and
signs again, with its own key, what it forwards. All cryptography is joserfc's.

Keys come from the constructor or from the environment (`MessageSigner.from_settings`):

- `PAIGEANT_SIGNING_KEY_FILE` (or `PAIGEANT_SIGNING_KEY`, the JSON): this service's private JWK.
- `PAIGEANT_TRUSTED_KEYS_FILE` (paths separated by `os.pathsep`) or `PAIGEANT_TRUSTED_KEYS` (JSON): the public
  keys (JWKS) of every service whose messages are accepted. Rotation is trusting the old and the new `kid` at once.
- `PAIGEANT_OBO_JWKS_FILE` / `PAIGEANT_OBO_JWKS`, `PAIGEANT_OBO_ISSUER`, `PAIGEANT_OBO_AUDIENCE`: how user tokens
  are checked.
- `PAIGEANT_ALLOW_UNSIGNED=1`: the explicit opt-out. Without keys and without it, a worker or dispatcher on a real
  broker refuses to start; the in-memory transport signs with a key made for the process.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet
from joserfc.jws import JWSRegistry
from joserfc.util import json_b64encode, urlsafe_b64encode

from ._keys import ALGORITHMS, algorithm_of, ephemeral_key, generate_key, load_signing_key, load_trusted_keys
from ._replay import InMemoryReplayCache, ReplayCache
from ._sealing import signing_input, unsigned_body
from ._tokens import TokenValidator, granted_scopes
from .contracts import ActivitySpec, PaigeantMessage
from .exceptions import DuplicateMessage, InvalidMessage, ReplayedMessage, SecurityError, TokenError, UserError
from .settings import Settings
from .transports import IN_MEMORY_NAMES
from .transports.base import SharedStores
from .trust import TrustPolicy

if TYPE_CHECKING:
    from .transports.base import Transport

__all__ = (
    "ALGORITHMS",
    "Authenticated",
    "InMemoryReplayCache",
    "MessageSecurity",
    "MessageSigner",
    "ReplayCache",
    "TokenValidator",
    "TrustPolicy",
    "Verified",
    "generate_key",
    "load_signing_key",
    "load_trusted_keys",
)

logger = logging.getLogger("paigeant_ai.security")

SIGNATURE_TYPE = "paigeant+jws"
DEFAULT_REPLAY_TTL = 7 * 24 * 3600.0
DEFAULT_LEASE = 360.0
"""Seconds a hop's claim stays running when nobody says how long its step may take (the default timeout and a
minute): a copy arriving later may take it over."""
_HEADER_KEYS = frozenset({"alg", "kid", "typ"})
_CLOCK_LEEWAY = 60.0


class _Algorithm(Protocol):
    def sign(self, msg: bytes, key: Any) -> bytes: ...


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

    async def claim(self, message: PaigeantMessage, digest: str, *, redelivered: bool, lease: float) -> None:
        """Claim the authenticated hop `message` (its content `digest`) as it starts (see `paigeant_ai._replay`).

        Raises:
            ReplayedMessage: A copy of exactly a hop that runs elsewhere or was settled: refused unless the broker
                redelivered it (then skipped).
            DuplicateMessage: The hop produced anew by a trusted signer: skipped.
            SecurityError: The hop cannot be told from a replay (`replay_horizon`).
        """
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


# -- the signer ------------------------------------------------------------------------------------------------


class MessageSigner:
    """Signs what a dispatcher or worker sends and verifies what a worker receives (the `MessageSecurity` of
    `Worker` and `WorkflowDispatcher`).

    Args:
        signing_key: This service's private key (Ed25519 or P-256), with its `kid`.
        trusted_keys: The public keys whose signatures are accepted, besides the signing key's own.
        tokens: Checks the user's on-behalf-of tokens; without it, tokens are not checked and a step that
            requires scopes faults.
        replay_cache: Where hops are claimed as they start and remembered once settled; in this process's memory
            by default (see `paigeant_ai._replay`).
        replay_ttl: Seconds a settled hop without an expiry is remembered.
        policy: What each trusted key may do; every trusted key may do everything by default.
        unsigned: Sign nothing and check no signature (nor replay): the explicit, loud opt-out.
        refusal: Why this signer cannot work; `ensure_ready`, `sign` and `verify` raise it as a `UserError`.

    Attributes:
        refused: How many messages each check refused, by reason code (`unsigned`, `bad_signature`, ...).
    """

    def __init__(
        self,
        signing_key: Key | None = None,
        trusted_keys: KeySet | Iterable[Key] | None = None,
        *,
        tokens: TokenValidator | None = None,
        replay_cache: ReplayCache | None = None,
        replay_ttl: float = DEFAULT_REPLAY_TTL,
        policy: TrustPolicy | None = None,
        unsigned: bool = False,
        refusal: str | None = None,
    ) -> None:
        self.signing_key = load_signing_key(signing_key) if signing_key is not None else None
        trusted = list(trusted_keys or [])
        if self.signing_key is not None:
            trusted.append(self.signing_key)  # a worker may forward to a step it runs itself
        self.trusted_keys = load_trusted_keys(*trusted) if trusted else KeySet([])
        self.tokens = tokens
        self.replay_cache: ReplayCache = replay_cache or InMemoryReplayCache()
        self.replay_ttl = replay_ttl
        self._policy = policy or TrustPolicy.any_trusted_key()
        self.unsigned = unsigned
        self.refusal = refusal
        self.refused: Counter[str] = Counter()
        self._registry = JWSRegistry(algorithms=list(ALGORITHMS))
        self._headers: dict[str, tuple[Key, bytes, _Algorithm]] = {}  # typ -> key, header segment, algorithm
        if not unsigned and refusal is None and not self.trusted_keys:
            self.refusal = "no trusted keys: set PAIGEANT_TRUSTED_KEYS_FILE to the JWKS of the services you accept"

    @classmethod
    def from_settings(
        cls,
        transport: Transport | None = None,
        *,
        allow_unsigned: bool | None = None,
        settings: Settings | None = None,
        replay_cache: ReplayCache | None = None,
    ) -> MessageSigner:
        """The signer the `PAIGEANT_*` settings describe, for a dispatcher or worker on `transport`.

        Its replay cache is `replay_cache` if given, else the transport's shared one (`SharedStores`), else this
        process's memory.

        Without keys: with `allow_unsigned` (or `PAIGEANT_ALLOW_UNSIGNED=1`) it runs unsigned; on the in-memory
        transport it signs with a key made for this process; otherwise it refuses to work (see `ensure_ready`).
        """
        settings = settings or Settings.from_env()
        name = transport.name if transport is not None else settings.transport
        local = getattr(transport, "process_local", False) if transport is not None else name in IN_MEMORY_NAMES
        tokens = TokenValidator.from_settings(settings)
        replay = replay_cache or _replay_cache_for(transport)
        trusted_sources = _trusted_sources(settings)
        opted_out = settings.allow_unsigned if allow_unsigned is None else allow_unsigned
        policy_source = settings.trust_policy or settings.trust_policy_file
        common: dict[str, Any] = {
            "tokens": tokens,
            "replay_cache": replay,
            "replay_ttl": settings.replay_ttl,
            "policy": TrustPolicy.load(policy_source) if policy_source else None,
        }
        if settings.signing_key or settings.signing_key_file or trusted_sources:
            signing = _signing_key_of(settings)
            trusted = load_trusted_keys(*trusted_sources) if trusted_sources else None
            refusal = None if signing else "no signing key: set PAIGEANT_SIGNING_KEY_FILE to this service's private JWK"
            return cls(signing, trusted, refusal=refusal, **common)
        if opted_out:
            return cls(unsigned=True, **common)
        if local:  # nothing outside this process can reach its messages
            return cls(ephemeral_key(), **common)
        return cls(refusal=_missing_keys(name), **common)

    # -- readiness -------------------------------------------------------------------------------------------

    def ensure_ready(self, *, what: str = "steps") -> None:
        """Raise what stops this signer from working, if anything; warn loudly when it runs unsigned.

        Args:
            what: What a forger could fake, for the warning.

        Raises:
            UserError: It has no keys (and was not told to run unsigned), or lacks a signing key.
        """
        if self.refusal is not None:
            raise UserError(self.refusal)
        self.warn_if_unsigned(what)

    def warn_if_unsigned(self, what: str = "steps") -> None:
        """Log a loud warning when this signer runs unsigned (every worker, dispatcher and projector says it)."""
        if self.unsigned:
            logger.warning(
                "messages are NOT signed or verified (PAIGEANT_ALLOW_UNSIGNED / allow_unsigned=True): "
                "anyone who can publish to the broker can forge or replay %s",
                what,
            )

    # -- signing ---------------------------------------------------------------------------------------------

    @property
    def policy(self) -> TrustPolicy:
        """What each trusted key may do."""
        return self._policy

    def signature_for(self, body: bytes) -> str | None:
        """The detached JWS over `body` (a message as `_sealing.unsigned_body` encodes it), or None when unsigned."""
        return self.sign_bytes(body, typ=SIGNATURE_TYPE)

    def sign_bytes(self, payload: bytes, *, typ: str) -> str | None:
        """A detached JWS of type `typ` over `payload`, or None when unsigned.

        Each kind of signed thing has its own `typ` (a hop, a plan, a parked step, an approval), so that a
        signature over one can never pass for another.
        """
        if self.refusal is not None:
            raise UserError(self.refusal)
        if self.unsigned or self.signing_key is None:
            return None
        key = self.signing_key
        cached = self._headers.get(typ)
        if cached is None or cached[0] is not key:
            # joserfc's compact serialization, with the protected header (always the same) encoded once
            alg = algorithm_of(key) or ""  # a signing key is loaded only for an allowed algorithm
            header = {"alg": alg, "kid": key.kid, "typ": typ}
            cached = self._headers[typ] = (key, json_b64encode(header), self._registry.get_alg(alg))
        _, segment, algorithm = cached
        signature = algorithm.sign(segment + b"." + urlsafe_b64encode(payload), key)
        return f"{segment.decode()}..{urlsafe_b64encode(signature).decode()}"

    def verify_bytes(self, signature: str | None, payload: bytes, *, typ: str) -> str | None:
        """The key id that signed `payload` with the detached JWS `signature` of type `typ`; None when unsigned.

        Raises:
            SecurityError: Not signed, not by a trusted key, of another type, or altered.
        """
        if self.refusal is not None:
            raise UserError(self.refusal)
        if self.unsigned:
            return None
        if not signature:
            raise SecurityError("not signed", code="unsigned")
        parts = signature.split(".")
        if len(parts) != 3 or parts[1]:
            raise SecurityError("the signature is not a detached compact JWS", code="malformed_signature")
        try:
            return self._check_jws(signature, payload, typ)
        except SecurityError as exc:
            self.refused[exc.code] += 1
            raise

    def sign(self, message: PaigeantMessage) -> None:
        """Set `message.security.jws_signature` over the message as it now is (`message.to_json()` then sends it)."""
        message.security.jws_signature = self.signature_for(unsigned_body(message))

    # -- verifying -------------------------------------------------------------------------------------------

    async def verify(self, message: PaigeantMessage, spec: ActivitySpec, body: bytes) -> Verified:
        """Check the signature of `body` (the bytes `message` was read from), that the trust policy lets its signer
        send to `spec.name`, replay, and the user's token against `spec.required_scopes`.

        Returns:
            The signer, and the validated claims of the user's on-behalf-of token when there is one and tokens are
            checked.

        Raises:
            SecurityError: The message is not signed, or not by a trusted key, or was altered, or its signer may
                not send to this step.
            ReplayedMessage: A copy of exactly a hop that was already settled.
            DuplicateMessage: The hop was already settled, and was produced anew by a trusted signer.
            TokenError: The token is missing, invalid, or lacks a scope the step requires.
        """
        authenticated = self.authenticate(message, spec, body)
        await self.claim(message, authenticated.digest, redelivered=False, lease=DEFAULT_LEASE)
        return Verified(authenticated.signer, self.check_token(message, spec))

    def authenticate(self, message: PaigeantMessage, spec: ActivitySpec, body: bytes) -> Authenticated:
        """Check the signature of `body` (the bytes `message` was read from) and that the trust policy lets its
        signer send to `spec.name`: no I/O, so a worker does it before a hop may wait for anything.

        Raises:
            SecurityError: Not signed, not by a trusted key, altered, or from a signer that may not send here.
        """
        if self.refusal is not None:
            raise UserError(self.refusal)
        if self.unsigned:
            return Authenticated(None)
        try:
            signed, signer = self._check_signature(message.security.jws_signature, body)
            self._policy.require_send(signer, spec.name)
        except SecurityError as exc:
            self.refused[exc.code] += 1
            raise
        return Authenticated(signer, hashlib.sha256(signed).hexdigest())

    async def claim(self, message: PaigeantMessage, digest: str, *, redelivered: bool, lease: float) -> None:
        """Claim the authenticated hop `message`, whose signed content has `digest`, as it starts.

        Why a hop is claimed as it starts, and by what: see `paigeant_ai._replay`. The broker redelivers a hop
        whose worker died before acking it, with the same `message_id`; that copy takes the claim over and runs.
        Any other copy of a hop that runs or ran is a replay; a copy with other content but a trusted signature
        is the hop produced again by an upstream step that re-ran after a crash, a duplicate the worker skips.
        Only authenticated hops claim, so a forger cannot block a message id in advance.

        Raises:
            ReplayedMessage: The same hop runs elsewhere, or was settled.
            DuplicateMessage: The hop with other content was claimed already.
            SecurityError: This worker's in-memory cache may have forgotten the hop (`replay_horizon`).
        """
        if self.unsigned:
            return
        state = await self.replay_cache.claim(
            message.message_id,
            digest,
            sent_at=_made_after(message),
            redelivered=redelivered,
            lease=lease,
            ttl=self._ttl_of(message),
        )
        if state == "claimed":
            return
        shown = _show(message.message_id)
        if state == "running":
            self.refused["replayed"] += 1
            raise ReplayedMessage(f"replayed: message {shown} is being processed")
        if state == "settled":
            self.refused["replayed"] += 1
            raise ReplayedMessage(f"replayed: message {shown} was already processed")
        if state == "duplicate":
            self.refused["duplicate"] += 1
            raise DuplicateMessage(f"replayed: message {shown} was already processed")
        self.refused["replay_horizon"] += 1
        raise SecurityError(
            f"message {shown} was made before hops this worker's in-memory replay cache had to forget (it is full): "
            "it may be a replay; share a replay cache between workers (PAIGEANT_SHARED_STORE_URL) or raise "
            "InMemoryReplayCache(max_entries=...)",
            code="replay_horizon",
        )

    def check_token(self, message: PaigeantMessage, spec: ActivitySpec) -> Mapping[str, Any] | None:
        """The validated claims of the user's token in `message`, checked against `spec.required_scopes`.

        Raises:
            TokenError: The token is missing, invalid, or lacks a scope the step requires.
        """
        try:
            return self._check_token(message.security.obo_token, spec)
        except SecurityError as exc:
            self.refused[exc.code] += 1
            raise

    def _ttl_of(self, message: PaigeantMessage) -> float:
        """Seconds a hop is remembered: until it expires, or `replay_ttl` if it never does."""
        if message.expires_at is None:
            return self.replay_ttl
        return max(1.0, (message.expires_at - datetime.now(UTC)).total_seconds() + _CLOCK_LEEWAY)

    def check_signature(self, message: PaigeantMessage, body: bytes) -> str | None:
        """Check only that a trusted key signed `body`, the bytes `message` was read from (no replay or token check).

        Returns:
            The key id that signed it; None when this signer runs unsigned.

        Raises:
            SecurityError: With the reason.
        """
        return None if self.unsigned else self._check_signature(message.security.jws_signature, body)[1]

    def _check_signature(self, signature: str | None, body: bytes) -> tuple[bytes, str]:
        """What `signature` covers in `body`, and the key that signed it, once checked against the trusted keys."""
        if not signature:
            raise SecurityError("the message is not signed", code="unsigned")
        parts = signature.split(".")
        if len(parts) != 3 or parts[1]:
            raise SecurityError("the signature is not a detached compact JWS", code="malformed_signature")
        try:
            signed = signing_input(body, signature)
        except InvalidMessage as exc:
            raise SecurityError(str(exc), code="malformed_signature") from None
        return signed, self._check_jws(signature, signed, SIGNATURE_TYPE)

    def _check_jws(self, signature: str, signed: bytes, typ: str) -> str:
        """The key id that made the detached `signature` over `signed`, once checked against the trusted keys."""
        try:
            obj = jws.extract_compact(signature.encode(), signed)
        except (JoseError, ValueError):
            raise SecurityError("the signature's header cannot be read", code="malformed_signature") from None
        header = obj.headers()
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            accepted = ", ".join(ALGORITHMS)
            raise SecurityError(f"algorithm {_show(alg)} is not allowed (accepted: {accepted})", code="algorithm")
        unexpected = sorted(set(header) - _HEADER_KEYS)
        if unexpected:
            raise SecurityError(f"unexpected signature header {_show(unexpected[0])}", code="header")
        if header.get("typ") != typ:
            raise SecurityError(f"signature type {_show(header.get('typ'))} is not {typ!r}", code="header")
        kid = header.get("kid")
        key = next((k for k in self.trusted_keys if isinstance(kid, str) and k.kid == kid), None)
        if key is None:
            raise SecurityError(f"signed with unknown key id {_show(kid)}", code="unknown_kid")
        if algorithm_of(key) != alg or key.get("alg", alg) != alg:
            raise SecurityError(f"key {_show(kid)} does not sign with {alg}", code="algorithm")
        try:
            valid = jws.validate_compact(obj, key, registry=self._registry)
        except JoseError:
            valid = False
        if not valid:
            raise SecurityError(
                f"bad signature: the message was altered after key {_show(kid)} signed it, or that key did not sign it",
                code="bad_signature",
            )
        return key.kid or ""

    def _check_token(self, token: str | None, spec: ActivitySpec) -> Mapping[str, Any] | None:
        required = spec.required_scopes
        if token is None:
            if required:
                raise TokenError(
                    f"step {spec.name!r} requires scope {_scopes(required)} but the workflow carries no "
                    "on-behalf-of token",
                    code="token_missing",
                )
            return None
        if self.tokens is None:
            if required:
                raise TokenError(
                    f"step {spec.name!r} requires scope {_scopes(required)} but this worker does not check tokens "
                    "(set PAIGEANT_OBO_JWKS_FILE, PAIGEANT_OBO_ISSUER and PAIGEANT_OBO_AUDIENCE)",
                    code="token_unchecked",
                )
            return None
        claims = self.tokens.validate(token)
        missing = [scope for scope in required if scope not in granted_scopes(claims)]
        if missing:
            raise TokenError(
                f"the on-behalf-of token lacks scope {_scopes(missing)}, which step {spec.name!r} requires",
                code="token_scope",
            )
        return claims

    # -- settling --------------------------------------------------------------------------------------------

    async def settled(self, message: PaigeantMessage, digest: str | None = None) -> None:
        """Record that the hop `message`, whose signed content has `digest`, was settled: from now on even the
        broker's redelivery of it (a lost ack) is skipped, and any other copy refused. A hop that never expires is
        remembered for `replay_ttl` seconds.
        """
        if self.unsigned or not digest:
            return
        await self.replay_cache.settle(message.message_id, digest, self._ttl_of(message))


def _made_after(message: PaigeantMessage) -> float:
    """A signed time the hop `message` was made after (Unix): its workflow's start, or its last logged step's end."""
    completed = message.routing_slip.completed
    made = message.created_at if not completed else max(message.created_at, completed[-1].finished_at)
    return made.timestamp()


def _signing_key_of(settings: Settings) -> Key | None:
    """The signing key of `PAIGEANT_SIGNING_KEY` (the JWK itself, never echoed: it is a secret) or of
    `PAIGEANT_SIGNING_KEY_FILE` (its path)."""
    inline = settings.signing_key
    if not inline:
        return load_signing_key(settings.signing_key_file) if settings.signing_key_file else None
    fix = (
        "put the private JWK written by `paigeant keys generate` there, as JSON, or set PAIGEANT_SIGNING_KEY_FILE "
        "to the path of that file instead"
    )
    if not inline.strip().startswith("{"):
        raise UserError(f"PAIGEANT_SIGNING_KEY is not a JWK (a JSON object); its value is not shown: {fix}")
    try:
        return load_signing_key(inline)
    except UserError as exc:
        raise UserError(f"PAIGEANT_SIGNING_KEY cannot be used ({exc}); its value is not shown: {fix}") from None


def _trusted_sources(settings: Settings) -> list[str]:
    sources: list[str] = []
    if settings.trusted_keys:
        sources.append(settings.trusted_keys)
    if settings.trusted_keys_file:
        import os

        sources.extend(path for path in settings.trusted_keys_file.split(os.pathsep) if path.strip())
    return sources


def _replay_cache_for(transport: Transport | None) -> ReplayCache | None:
    return transport.replay_cache() if isinstance(transport, SharedStores) else None


def _missing_keys(transport: str) -> str:
    return (
        f"the {transport} transport needs message signing keys: set PAIGEANT_SIGNING_KEY_FILE to this service's "
        "private JWK and PAIGEANT_TRUSTED_KEYS_FILE to the JWKS of every service it accepts messages from "
        "(make them with `paigeant keys generate <service>`), or run without signatures, deliberately, with "
        "PAIGEANT_ALLOW_UNSIGNED=1 (allow_unsigned=True)"
    )


def _show(value: object) -> str:
    """A value from a message, for a reason: quoted and short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _scopes(scopes: Sequence[str]) -> str:
    return ", ".join(repr(scope) for scope in scopes)
