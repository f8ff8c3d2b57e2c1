"""The detached JWS mechanics of `MessageSigner`: its keys, and each signature made and checked with them.

A signature is joserfc's compact serialization with the payload left out (`header..signature`), protected header
exactly `{"alg", "kid", "typ"}`, `alg` from `ALGORITHMS`. `typ` says what kind of thing was signed, so that a
signature over one kind (a hop, a plan, an approval) never passes for another. What is signed, and why, is
`paigeant_ai.security`'s.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable
from typing import Any, Protocol, cast

from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet
from joserfc.jws import JWSRegistry
from joserfc.util import json_b64decode, json_b64encode, urlsafe_b64decode, urlsafe_b64encode

from ._escape import show
from ._keys import ALGORITHMS, algorithm_of, load_signing_key, load_trusted_keys
from .exceptions import SecurityError

__all__ = ("DetachedJWS", "require_detached")

_HEADER_KEYS = frozenset({"alg", "kid", "typ"})
_REMEMBERED_HEADERS = 256
"""Checked protected headers kept: one per signer and type of signed thing."""


class _Algorithm(Protocol):
    def sign(self, msg: bytes, key: Any) -> bytes: ...
    def verify(self, msg: bytes, sig: bytes, key: Any) -> bool: ...


def require_detached(signature: str) -> None:
    """Raise unless `signature` has the shape of a detached compact JWS (three segments, the middle one empty)."""
    parts = signature.split(".")
    if len(parts) != 3 or parts[1]:
        raise SecurityError("the signature is not a detached compact JWS", code="malformed_signature")


class DetachedJWS:
    """This service's signing key and the keys it trusts, and the detached JWS it makes and checks with them.

    Args:
        signing_key: This service's private key (Ed25519 or P-256), with its `kid`; None to sign nothing.
        trusted_keys: The public keys whose signatures are accepted, besides the signing key's own.

    Attributes:
        signing_key: The signing key, loaded and checked.
        trusted_keys: Every key a signature is checked against, the signing key's public part included.
    """

    def __init__(self, signing_key: Key | None, trusted_keys: KeySet | Iterable[Key] | None) -> None:
        self.signing_key = load_signing_key(signing_key) if signing_key is not None else None
        trusted = list(trusted_keys or [])
        if self.signing_key is not None:
            trusted.append(self.signing_key)  # a worker may forward to a step it runs itself
        self.trusted_keys = load_trusted_keys(*trusted) if trusted else KeySet([])
        self._registry = JWSRegistry(algorithms=list(ALGORITHMS))
        self._headers: dict[str, tuple[Key, bytes, _Algorithm]] = {}  # typ -> key, header segment, algorithm
        self._checked: dict[tuple[str, str], tuple[Key, _Algorithm]] = {}  # (header segment, typ) -> key, algorithm

    def sign(self, payload: bytes, typ: str) -> str | None:
        """A detached JWS of type `typ` over `payload` with the signing key; None without one."""
        key = self.signing_key
        if key is None:
            return None
        cached = self._headers.get(typ)
        if cached is None or cached[0] is not key:
            # joserfc's compact serialization, with the protected header (always the same) encoded once
            alg = algorithm_of(key) or ""  # a signing key is loaded only for an allowed algorithm
            header = {"alg": alg, "kid": key.kid, "typ": typ}
            cached = self._headers[typ] = (key, json_b64encode(header), self._registry.get_alg(alg))
        _, segment, algorithm = cached
        signature = algorithm.sign(segment + b"." + urlsafe_b64encode(payload), key)
        return f"{segment.decode()}..{urlsafe_b64encode(signature).decode()}"

    def verify(self, signature: str, signed: bytes, typ: str) -> str:
        """The key id that made the detached `signature` over `signed`, once checked against the trusted keys.

        A signer's protected header is the same on everything it signs of one type, so each header is checked once
        (its algorithm, members, type and key) and remembered; each signature is then verified with joserfc's
        algorithm over `header.payload`, exactly as its compact serialization defines the signing input.

        Raises:
            SecurityError: A header that cannot be read or is not exactly what `typ` signatures carry, an
                algorithm not allowed or not the key's, an unknown key, or a signature that does not hold.
        """
        segment, _, encoded = signature.partition("..")
        checked = self._checked.get((segment, typ))
        if checked is None:
            checked = self._check_header(segment, typ)
            if len(self._checked) < _REMEMBERED_HEADERS:  # a signer has a few; a forger must not grow this
                self._checked[(segment, typ)] = checked
        key, algorithm = checked
        try:
            valid = algorithm.verify(
                segment.encode() + b"." + urlsafe_b64encode(signed), urlsafe_b64decode(encoded.encode()), key
            )
        except (JoseError, ValueError, binascii.Error):
            valid = False
        if not valid:
            raise SecurityError(
                f"bad signature: the message was altered after key {show(key.kid)} signed it, or that key did not "
                "sign it",
                code="bad_signature",
            )
        return key.kid or ""

    def _check_header(self, segment: str, typ: str) -> tuple[Key, _Algorithm]:
        """The trusted key and algorithm a protected header names, once it is exactly what `typ` signatures carry."""
        try:
            header: object = json_b64decode(segment.encode())
        except (ValueError, binascii.Error):
            raise SecurityError("the signature's header cannot be read", code="malformed_signature") from None
        if not isinstance(header, dict):
            raise SecurityError("the signature's header cannot be read", code="malformed_signature")
        header = cast("dict[str, Any]", header)
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            accepted = ", ".join(ALGORITHMS)
            raise SecurityError(f"algorithm {show(alg)} is not allowed (accepted: {accepted})", code="algorithm")
        unexpected = sorted(set(header) - _HEADER_KEYS)
        if unexpected:
            raise SecurityError(f"unexpected signature header {show(unexpected[0])}", code="header")
        if header.get("typ") != typ:
            raise SecurityError(f"signature type {show(header.get('typ'))} is not {typ!r}", code="header")
        kid = header.get("kid")
        key = next((k for k in self.trusted_keys if isinstance(kid, str) and k.kid == kid), None)
        if key is None:
            raise SecurityError(f"signed with unknown key id {show(kid)}", code="unknown_kid")
        if algorithm_of(key) != alg or key.get("alg", alg) != alg:
            raise SecurityError(f"key {show(kid)} does not sign with {alg}", code="algorithm")
        return key, self._registry.get_alg(alg)
