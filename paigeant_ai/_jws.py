"""The detached JWS mechanics of `MessageSigner`: its keys, and each signature made and checked with them.

A signature is the compact serialization of RFC 7515 with the payload left out (`header..signature`, its
Appendix F), protected header exactly `{"alg", "kid", "typ"}`, `alg` from `ALGORITHMS`. `typ` says what kind of
thing was signed, so that a signature over one kind (a hop, a plan, an approval) never passes for another. What is
signed, and why, is `paigeant_ai.security`'s.

Every hop is signed once and verified once, and its events are signed too, so these calls weigh on every hop.
An Ed25519 key signs and verifies through libsodium (PyNaCl), the fastest implementation at hand: Ed25519 is
deterministic, so the signature is the very one joserfc would make, in a fraction of the time. A P-256 key uses
joserfc's algorithm. Keys, key sets and everything else stay joserfc's.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable, Iterable
from typing import Any, cast

from joserfc.errors import JoseError
from joserfc.jwk import Key, KeySet
from joserfc.jws import JWSRegistry
from joserfc.util import json_b64decode, json_b64encode, urlsafe_b64decode, urlsafe_b64encode
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from ._escape import show
from ._keys import ALGORITHMS, algorithm_of, load_signing_key, load_trusted_keys
from .exceptions import SecurityError

__all__ = ("DetachedJWS", "require_detached")

_HEADER_KEYS = frozenset({"alg", "kid", "typ"})
_REMEMBERED_HEADERS = 256
"""Checked protected headers kept: one per signer and type of signed thing."""
_REGISTRY = JWSRegistry(algorithms=list(ALGORITHMS))

Sign = Callable[[bytes], bytes]
"""Signs a JWS signing input (`header.payload`, both base64url) with one key: the signature's bytes."""
Verify = Callable[[bytes, bytes], bool]
"""Whether a signature (second) holds over a JWS signing input (first) for one key."""


def require_detached(signature: str) -> None:
    """Raise unless `signature` has the shape of a detached compact JWS (three segments, the middle one empty)."""
    parts = signature.split(".")
    if len(parts) != 3 or parts[1]:
        raise SecurityError("the signature is not a detached compact JWS", code="malformed_signature")


def sign_with(key: Key, alg: str) -> Sign:
    """How the private `key` signs with `alg`: libsodium for Ed25519, joserfc's algorithm otherwise.

    Made once per key, as joserfc would check it on every signature: the key must allow signing.
    """
    key.check_key_op("sign")
    if alg == "Ed25519":
        signing = SigningKey(_member(key, "d"))
        return lambda data: signing.sign(data).signature
    algorithm = _REGISTRY.get_alg(alg)
    return lambda data: algorithm.sign(data, key)


def verify_with(key: Key, alg: str) -> Verify:
    """How the public `key` checks an `alg` signature: libsodium for Ed25519, joserfc's algorithm otherwise.

    Both compare in the library, in constant time; a signature of the wrong length or shape does not hold.
    """
    key.check_key_op("verify")
    if alg != "Ed25519":
        algorithm = _REGISTRY.get_alg(alg)

        def verify_with_joserfc(data: bytes, signature: bytes) -> bool:
            try:
                return algorithm.verify(data, signature, key)
            except (JoseError, ValueError):
                return False

        return verify_with_joserfc
    verifying = VerifyKey(_member(key, "x"))

    def verify_with_libsodium(data: bytes, signature: bytes) -> bool:
        try:
            verifying.verify(data, signature)
        except (BadSignatureError, ValueError):  # nacl's ValueError: not 64 bytes
            return False
        return True

    return verify_with_libsodium


def _member(key: Key, name: str) -> bytes:
    """The raw bytes of the JWK member `name` of an OKP key (`x` the public key, `d` the private one)."""
    value = key.get(name)
    if not isinstance(value, str):  # pragma: no cover - a loaded OKP key has `x`, and `d` when private
        raise SecurityError(f"key {show(key.kid)} has no {name!r}", code="algorithm")
    return urlsafe_b64decode(value.encode())


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
        self._sign: tuple[Key, Sign] | None = None  # the signing key, and how it signs
        self._headers: dict[str, bytes] = {}  # typ -> the protected header segment the signing key puts on it
        self._checked: dict[tuple[str, str], tuple[Key, Verify]] = {}  # (header segment, typ) -> key, verifier

    def sign(self, payload: bytes, typ: str) -> str | None:
        """A detached JWS of type `typ` over `payload` with the signing key; None without one."""
        key = self.signing_key
        if key is None:
            return None
        if self._sign is None or self._sign[0] is not key:
            alg = algorithm_of(key) or ""  # a signing key is loaded only for an allowed algorithm
            self._sign, self._headers = (key, sign_with(key, alg)), {}
        segment = self._headers.get(typ)
        if segment is None:  # the protected header is the same on everything of one type: encoded once
            segment = self._headers[typ] = json_b64encode({"alg": algorithm_of(key), "kid": key.kid, "typ": typ})
        signature = self._sign[1](segment + b"." + urlsafe_b64encode(payload))
        return f"{segment.decode()}..{urlsafe_b64encode(signature).decode()}"

    def verify(self, signature: str, signed: bytes, typ: str) -> str:
        """The key id that made the detached `signature` over `signed`, once checked against the trusted keys.

        A signer's protected header is the same on everything it signs of one type, so each header is checked once
        (its algorithm, members, type and key) and remembered with the key's verifier; each signature is then
        verified over `header.payload`, exactly as the compact serialization defines the signing input.

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
        key, verify = checked
        try:
            raw = urlsafe_b64decode(encoded.encode())
        except (ValueError, binascii.Error):
            raw = b""
        if not verify(segment.encode() + b"." + urlsafe_b64encode(signed), raw):
            raise SecurityError(
                f"bad signature: the message was altered after key {show(key.kid)} signed it, or that key did not "
                "sign it",
                code="bad_signature",
            )
        return key.kid or ""

    def _check_header(self, segment: str, typ: str) -> tuple[Key, Verify]:
        """The trusted key a protected header names, and its verifier, once the header is exactly what `typ`
        signatures carry."""
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
        try:
            return key, verify_with(key, alg)
        except JoseError:
            raise SecurityError(f"key {show(kid)} may not verify signatures (its key_ops)", code="algorithm") from None
