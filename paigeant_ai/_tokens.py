"""The user's on-behalf-of tokens: checked against the issuer's keys, issuer, audience and expiry, and (`check_scopes`)
against the scopes a step requires."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from joserfc import jwt
from joserfc.errors import (
    BadSignatureError,
    ClaimError,
    ExpiredTokenError,
    InvalidKeyIdError,
    JoseError,
    MissingClaimError,
    UnsupportedAlgorithmError,
)
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from ._keys import load_trusted_keys
from .exceptions import TokenError, UserError
from .settings import Settings

if TYPE_CHECKING:
    from .contracts import ActivitySpec

__all__ = ("TOKEN_ALGORITHMS", "TokenValidator", "check_scopes", "granted_scopes")

TOKEN_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "Ed25519")
"""The algorithms accepted on on-behalf-of tokens by default: what identity providers sign with, never `none`
or a shared secret."""


class TokenValidator:
    """Checks the user's on-behalf-of token: its signature against the issuer's JWKS, then `iss`, `aud`, `exp`.

    Args:
        jwks: The issuer's public keys: a `KeySet`, a JWKS dict, JSON text or a file path.
        issuer: The expected `iss`.
        audience: The expected `aud` (this system's identifier at the issuer).
        algorithms: The token algorithms accepted; asymmetric ones only by default.
        leeway: Seconds of clock skew tolerated on `exp` and `nbf`.
    """

    def __init__(
        self,
        jwks: KeySet | str | Path | Mapping[str, Any],
        *,
        issuer: str,
        audience: str,
        algorithms: Collection[str] = TOKEN_ALGORITHMS,
        leeway: int = 30,
    ) -> None:
        if not issuer or not audience:
            raise UserError("checking on-behalf-of tokens needs both an issuer and an audience")
        unsafe = sorted(alg for alg in algorithms if alg == "none" or alg.startswith("HS"))
        if unsafe:
            raise UserError(f"on-behalf-of tokens must be signed with public-key algorithms, not {', '.join(unsafe)}")
        self.jwks = load_trusted_keys(jwks)
        self.issuer = issuer
        self.audience = audience
        self.algorithms = tuple(algorithms)
        self.leeway = leeway
        # Identity providers add header fields of their own (x5t, nonce...): they are signed, so they are allowed.
        self._registry = JWSRegistry(algorithms=list(self.algorithms), strict_check_header=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenValidator | None:
        """The validator the `PAIGEANT_OBO_*` settings describe, or None if none is configured."""
        source = settings.obo_jwks or settings.obo_jwks_file
        if not source and not settings.obo_issuer and not settings.obo_audience:
            return None
        missing = [
            name
            for name, value in (
                ("PAIGEANT_OBO_JWKS_FILE (or PAIGEANT_OBO_JWKS)", source),
                ("PAIGEANT_OBO_ISSUER", settings.obo_issuer),
                ("PAIGEANT_OBO_AUDIENCE", settings.obo_audience),
            )
            if not value
        ]
        if missing:
            raise UserError(f"checking on-behalf-of tokens also needs {', '.join(missing)}")
        assert source is not None
        assert settings.obo_issuer is not None
        assert settings.obo_audience is not None
        return cls(source, issuer=settings.obo_issuer, audience=settings.obo_audience)

    def validate(self, token: str) -> dict[str, Any]:
        """The token's claims once its signature, issuer, audience and expiry are checked.

        Raises:
            TokenError: With a reason that never quotes the token.
        """
        try:
            decoded = jwt.decode(token, self.jwks, algorithms=self.algorithms, registry=self._registry)
        except InvalidKeyIdError:
            raise TokenError(
                "the on-behalf-of token is signed by a key the issuer does not publish", code="token_key"
            ) from None
        except UnsupportedAlgorithmError:
            raise TokenError(
                "the on-behalf-of token uses an algorithm that is not accepted", code="token_alg"
            ) from None
        except BadSignatureError:
            raise TokenError("the on-behalf-of token's signature is not valid", code="token_signature") from None
        except (JoseError, ValueError, TypeError):
            raise TokenError("the on-behalf-of token is malformed", code="token_malformed") from None
        claims = decoded.claims
        registry = jwt.JWTClaimsRegistry(
            leeway=self.leeway,
            iss={"essential": True, "value": self.issuer},
            aud={"essential": True, "value": self.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except ExpiredTokenError:
            raise TokenError("the on-behalf-of token has expired", code="token_expired") from None
        except MissingClaimError as exc:
            raise TokenError(f"the on-behalf-of token has no {exc.claim} claim", code="token_claims") from None
        except ClaimError as exc:
            raise TokenError(self._claim_reason(exc.claim), code=f"token_{exc.claim}") from None
        return claims

    def _claim_reason(self, claim: str) -> str:
        if claim == "aud":
            return f"the on-behalf-of token is for another audience, not {self.audience!r}"
        if claim == "iss":
            return f"the on-behalf-of token is from another issuer, not {self.issuer!r}"
        return f"the on-behalf-of token has an invalid {claim} claim"


def granted_scopes(claims: Mapping[str, Any]) -> set[str]:
    """The scopes a token grants: its `scope` (space-separated) and `scp` (a list or a string) claims."""
    granted: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(item for item in value if isinstance(item, str))  # pyright: ignore[reportUnknownVariableType]
    return granted


def check_scopes(tokens: TokenValidator | None, token: str | None, spec: ActivitySpec) -> Mapping[str, Any] | None:
    """The claims of `token` once `tokens` validated it and found every scope `spec` requires; None without a token,
    or when tokens are not checked, if the step requires no scope.

    Raises:
        TokenError: The token is missing, invalid, or lacks a scope the step requires, or the step requires scopes
            and tokens are not checked.
    """
    required = spec.required_scopes
    if token is None:
        if required:
            raise TokenError(
                f"step {spec.name!r} requires scope {_scopes(required)} but the workflow carries no on-behalf-of token",
                code="token_missing",
            )
        return None
    if tokens is None:
        if required:
            raise TokenError(
                f"step {spec.name!r} requires scope {_scopes(required)} but this worker does not check tokens "
                "(set PAIGEANT_OBO_JWKS_FILE, PAIGEANT_OBO_ISSUER and PAIGEANT_OBO_AUDIENCE)",
                code="token_unchecked",
            )
        return None
    claims = tokens.validate(token)
    missing = [scope for scope in required if scope not in granted_scopes(claims)]
    if missing:
        raise TokenError(
            f"the on-behalf-of token lacks scope {_scopes(missing)}, which step {spec.name!r} requires",
            code="token_scope",
        )
    return claims


def _scopes(scopes: Sequence[str]) -> str:
    return ", ".join(repr(scope) for scope in scopes)


def unverified_claims(token: str | None) -> dict[str, Any]:
    """The claims of a compact JWT, read without checking it; `{}` for no token or anything else. Only ever a hint
    for an early, friendly error: what is trusted is what a `TokenValidator` validated."""
    parts = (token or "").split(".")
    if len(parts) != 3:
        return {}
    try:
        decoded: object = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError):
        return {}
    return decoded if isinstance(decoded, dict) else {}  # pyright: ignore[reportUnknownVariableType]
