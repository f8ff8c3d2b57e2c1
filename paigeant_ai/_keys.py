"""Message signing keys: make them, load a service's private key, load the public keys it trusts."""

from __future__ import annotations

import functools
import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from joserfc.errors import JoseError
from joserfc.jwk import ECKey, Key, KeySet, OKPKey, import_key

from .exceptions import UserError

__all__ = ("ALGORITHMS", "algorithm_of", "ephemeral_key", "generate_key", "load_signing_key", "load_trusted_keys")

ALGORITHMS = ("Ed25519", "ES256")
"""The only algorithms a message signature may use."""


def generate_key(kid: str, algorithm: Literal["Ed25519", "ES256"] = "Ed25519") -> Key:
    """A new private signing key with `kid`, for `algorithm`."""
    parameters: dict[str, Any] = {"kid": kid, "use": "sig", "alg": algorithm}
    if algorithm == "Ed25519":
        return OKPKey.generate_key("Ed25519", parameters=parameters)  # pyright: ignore[reportArgumentType]
    if algorithm == "ES256":
        return ECKey.generate_key("P-256", parameters=parameters)  # pyright: ignore[reportArgumentType]
    raise UserError(f"unsupported signing algorithm {algorithm!r}; choose one of: {', '.join(ALGORITHMS)}")


def algorithm_of(key: Key) -> str | None:
    if isinstance(key, OKPKey) and key.curve_name == "Ed25519":
        return "Ed25519"
    if isinstance(key, ECKey) and key.curve_name == "P-256":
        return "ES256"
    return None


def read_json(value: str | Path | Mapping[str, Any], what: str) -> Any:
    """JSON from a mapping, JSON text, or the path of a JSON file; `what` names it in the `UserError`."""
    if isinstance(value, Mapping):
        return dict(value)
    text = str(value).strip()
    if isinstance(value, Path) or not text.startswith("{"):
        try:
            text = Path(text).expanduser().read_text()
        except OSError as exc:
            raise UserError(f"cannot read {what} from {str(value)!r}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise UserError(f"{what} is not valid JSON") from None


def load_signing_key(value: str | Path | Mapping[str, Any] | Key) -> Key:
    """A private signing key: a joserfc key, a JWK as a dict or JSON text, or the path of a JWK file.

    Raises:
        UserError: Not a private Ed25519 (OKP) or P-256 (EC) key.
    """
    if isinstance(value, Key):
        key = value
    else:
        data = read_json(value, "the signing key")
        if isinstance(data, dict) and "keys" in data:
            raise UserError(
                "the signing key must be one private JWK (<service>.private.jwk.json), not a JWKS; "
                "a JWKS (<service>.jwks.json) lists the keys to trust"
            )
        key = _import(data, "the signing key")
    if algorithm_of(key) is None:
        raise UserError("a signing key must be an Ed25519 (OKP) or P-256 (EC) key; make one: paigeant keys generate")
    if not key.is_private:
        raise UserError("the signing key is a public key; use the private JWK written by `paigeant keys generate`")
    key.ensure_kid()
    return key


def load_trusted_keys(*sources: str | Path | Mapping[str, Any] | KeySet | Key) -> KeySet:
    """The public keys of `sources` (JWKS or single JWKs: dicts, JSON text or file paths) as one key set.

    Private parts are dropped. Symmetric keys and two different keys under one `kid` are refused.
    """
    keys: dict[str, Key] = {}
    for source in sources:
        if isinstance(source, KeySet):
            found = list(source)
        elif isinstance(source, Key):
            found = [source]
        else:
            data = read_json(source, "the trusted keys")
            entries = data.get("keys") if isinstance(data, dict) and "keys" in data else [data]
            if not isinstance(entries, list):
                raise UserError('trusted keys must be a JWKS: {"keys": [...]}')
            found = [_import(entry, "a trusted key") for entry in entries]
        for key in found:
            if key.key_type == "oct":
                raise UserError("trusted keys must be public keys; a shared secret (oct) key cannot be trusted")
            public = _import(key.as_dict(private=False), "a trusted key")
            kid = public.kid or ""
            if kid in keys and keys[kid].as_dict() != public.as_dict():
                raise UserError(f"two different trusted keys share the kid {kid!r}; every key needs its own kid")
            keys[kid] = public
    return KeySet(list(keys.values()))


def _import(data: Any, what: str) -> Key:
    if not isinstance(data, dict):
        raise UserError(f"{what} must be a JWK (a JSON object)")
    try:
        key = import_key(data)  # pyright: ignore[reportUnknownArgumentType]
    except (JoseError, ValueError, TypeError) as exc:
        raise UserError(f"{what} is not a valid JWK: {type(exc).__name__}") from None
    key.ensure_kid()
    return key


@functools.cache
def ephemeral_key() -> Key:
    """The key the in-memory transport signs with when none is configured: made once per process."""
    return generate_key(f"ephemeral-{secrets.token_hex(4)}")
