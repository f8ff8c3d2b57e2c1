"""Zero-trust messaging: every hop signed and verified, on-behalf-of tokens checked, replays refused.

A `MessageSigner` signs each message it sends with a detached JWS over the exact bytes sent (with the signature
itself `null`: see `paigeant_ai._sealing`), protected header `{"alg", "kid", "typ"}`, `alg` from a short
allow-list (`Ed25519`, `ES256`).
A worker verifies what it receives against its trusted public keys (a JWKS, looked up by `kid`), refuses a
message it has already settled, validates the user's on-behalf-of token and the scopes the step requires, and
signs again, with its own key, what it forwards. Keys, key sets and tokens are joserfc's; an Ed25519 signature
is made and checked by libsodium (see `paigeant_ai._jws`).

Keys come from the constructor or from the environment (`MessageSigner.from_settings`):

- `PAIGEANT_SIGNING_KEY_FILE` (or `PAIGEANT_SIGNING_KEY`, the JSON): this service's private JWK.
- `PAIGEANT_TRUSTED_KEYS_FILE` (paths separated by `os.pathsep`) or `PAIGEANT_TRUSTED_KEYS` (JSON): the public
  keys (JWKS) of every service whose messages are accepted. Rotation is trusting the old and the new `kid` at once.
- `PAIGEANT_OBO_JWKS_FILE` / `PAIGEANT_OBO_JWKS`, `PAIGEANT_OBO_ISSUER`, `PAIGEANT_OBO_AUDIENCE`: how user tokens
  are checked.
- `PAIGEANT_ALLOW_UNSIGNED=1`: the explicit opt-out. Without keys and without it, a worker or dispatcher on a real
  broker refuses to start; the in-memory transport signs with a key made for the process.

`MessageSigner` is here; its parts are private modules, and every public name is importable from here:
`paigeant_ai._message_security` (the `MessageSecurity` protocol it implements, `Authenticated`, `Verified`),
`paigeant_ai._jws` (its keys, and the detached JWS made and checked with them), `paigeant_ai._signer_settings`
(what `from_settings` reads), `paigeant_ai._tokens` (on-behalf-of tokens and scopes), `paigeant_ai._replay`
(the replay cache) and `paigeant_ai._keys` (loading and generating keys).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from joserfc.jwk import Key, KeySet

from ._escape import show
from ._hop import EXPIRY_GRACE
from ._jws import DetachedJWS, require_detached
from ._keys import ALGORITHMS, generate_key, load_signing_key, load_trusted_keys
from ._message_security import Authenticated, MessageSecurity, Verified
from ._replay import InMemoryReplayCache, RenewState, ReplayCache
from ._sealing import signing_input, unsigned_body
from ._signer_settings import signer_arguments
from ._tokens import TokenValidator, check_scopes
from ._tokens import granted_scopes as granted_scopes  # importable from here, as it always was
from .contracts import ActivitySpec, PaigeantMessage
from .exceptions import DuplicateMessage, InvalidMessage, ReplayedMessage, SecurityError, UserError
from .settings import Settings
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
_CLOCK_LEEWAY = 60.0


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
        self._jws = DetachedJWS(signing_key, trusted_keys)
        self.tokens = tokens
        self.replay_cache: ReplayCache = replay_cache or InMemoryReplayCache()
        self.replay_ttl = replay_ttl
        self._policy = policy or TrustPolicy.any_trusted_key()
        self.unsigned = unsigned
        self.refusal = refusal
        self.refused: Counter[str] = Counter()
        if not unsigned and refusal is None and not self.trusted_keys:
            self.refusal = "no trusted keys: set PAIGEANT_TRUSTED_KEYS_FILE to the JWKS of the services you accept"
        if unsigned and not self._policy.is_open:  # a policy grants keys; with nothing signed, no key is known
            self.refusal = (
                "a trust policy needs signed messages: set the signing keys, or drop the policy "
                "(PAIGEANT_TRUST_POLICY_FILE) to run unsigned"
            )

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
        return cls(
            **signer_arguments(transport, allow_unsigned=allow_unsigned, settings=settings, replay_cache=replay_cache)
        )

    @property
    def signing_key(self) -> Key | None:
        """This service's private key; None when it signs nothing."""
        return self._jws.signing_key

    @property
    def trusted_keys(self) -> KeySet:
        """The public keys whose signatures are accepted, the signing key's own included."""
        return self._jws.trusted_keys

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
        return None if self.unsigned else self._jws.sign(payload, typ)

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
        require_detached(signature)
        try:
            return self._jws.verify(signature, payload, typ)
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

    async def claim(
        self, message: PaigeantMessage, digest: str, *, redelivered: bool, lease: float, holder: str = ""
    ) -> None:
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
            holder=holder,
        )
        if state == "claimed":
            return
        shown = show(message.message_id)
        if state == "running":
            self.refused["replayed"] += 1
            raise ReplayedMessage(f"replayed: message {shown} is being processed", running=True)
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
            return check_scopes(self.tokens, message.security.obo_token, spec)
        except SecurityError as exc:
            self.refused[exc.code] += 1
            raise

    def _ttl_of(self, message: PaigeantMessage) -> float:
        """Seconds a hop is remembered: until it expires and for `EXPIRY_GRACE` after (while a late copy of it can
        still end its workflow `expired`), or `replay_ttl` if it never does."""
        if message.expires_at is None:
            return self.replay_ttl
        remembered = message.expires_at + EXPIRY_GRACE - datetime.now(UTC)
        return max(1.0, remembered.total_seconds() + _CLOCK_LEEWAY)

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
        require_detached(signature)
        try:
            signed = signing_input(body, signature)
        except InvalidMessage as exc:
            raise SecurityError(str(exc), code="malformed_signature") from None
        return signed, self._jws.verify(signature, signed, SIGNATURE_TYPE)

    async def renew(self, message: PaigeantMessage, digest: str, lease: float, holder: str = "") -> RenewState:
        """Extend the running claim of the hop `message` (its content `digest`) to `lease` seconds from now, while
        its worker runs it with its delivery handed back to the broker (see `paigeant_ai._long_steps`).

        Returns:
            `renewed`; `gone` when the hop is claimed no more (settled or forgotten): there is nothing left to renew;
            `taken` when another copy of the hop took the claim over (`holder` lost it).
        """
        if self.unsigned or not digest:
            return "gone"
        return await self.replay_cache.renew(message.message_id, digest, lease, holder)

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


def own_kid(security: MessageSecurity) -> str | None:
    """The key id `security` signs with; None when it signs nothing."""
    key = getattr(security, "signing_key", None)
    if key is None or getattr(security, "unsigned", False):
        return None
    return getattr(key, "kid", None)
