"""The arguments of the `MessageSigner` the `PAIGEANT_*` settings describe (`MessageSigner.from_settings`): its
keys, token validator, replay cache and trust policy, or why it runs unsigned, signs with a key made for the
process, or refuses to work."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from joserfc.jwk import Key

from ._keys import ephemeral_key, load_signing_key, load_trusted_keys
from ._tokens import TokenValidator
from .exceptions import UserError
from .settings import Settings
from .transports import IN_MEMORY_NAMES
from .transports.base import SharedStores
from .trust import TrustPolicy

if TYPE_CHECKING:
    from ._replay import ReplayCache
    from .transports.base import Transport

__all__ = ("signer_arguments",)


def signer_arguments(
    transport: Transport | None,
    *,
    allow_unsigned: bool | None,
    settings: Settings | None,
    replay_cache: ReplayCache | None,
) -> dict[str, Any]:
    """The keyword arguments of `MessageSigner` for a dispatcher or worker on `transport` (see `from_settings`)."""
    settings = settings or Settings.from_env()
    name = transport.name if transport is not None else settings.transport
    local = getattr(transport, "process_local", False) if transport is not None else name in IN_MEMORY_NAMES
    tokens = TokenValidator.from_settings(settings)
    replay = replay_cache or _replay_cache_for(transport)
    sources = _trusted_sources(settings)
    opted_out = settings.allow_unsigned if allow_unsigned is None else allow_unsigned
    policy_source = settings.trust_policy or settings.trust_policy_file
    common: dict[str, Any] = {
        "tokens": tokens,
        "replay_cache": replay,
        "replay_ttl": settings.replay_ttl,
        "policy": TrustPolicy.load(policy_source) if policy_source else None,
    }
    if settings.signing_key or settings.signing_key_file or sources:
        signing = _signing_key_of(settings)
        trusted = load_trusted_keys(*sources) if sources else None
        refusal = None if signing else "no signing key: set PAIGEANT_SIGNING_KEY_FILE to this service's private JWK"
        return {"signing_key": signing, "trusted_keys": trusted, "refusal": refusal, **common}
    if opted_out:
        return {"unsigned": True, **common}
    if local:  # nothing outside this process can reach its messages
        return {"signing_key": ephemeral_key(), **common}
    return {"refusal": _missing_keys(name), **common}


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
    """Where the trusted keys are: the JWKS of `PAIGEANT_TRUSTED_KEYS`, each path of `PAIGEANT_TRUSTED_KEYS_FILE`."""
    sources: list[str] = []
    if settings.trusted_keys:
        sources.append(settings.trusted_keys)
    if settings.trusted_keys_file:
        sources.extend(path for path in settings.trusted_keys_file.split(os.pathsep) if path.strip())
    return sources


def _replay_cache_for(transport: Transport | None) -> ReplayCache | None:
    """The replay cache `transport` shares between processes, if it has one."""
    return transport.replay_cache() if isinstance(transport, SharedStores) else None


def _missing_keys(transport: str) -> str:
    """Why a signer on the `transport` transport, with no keys and not told to run unsigned, refuses to work."""
    return (
        f"the {transport} transport needs message signing keys: set PAIGEANT_SIGNING_KEY_FILE to this service's "
        "private JWK and PAIGEANT_TRUSTED_KEYS_FILE to the JWKS of every service it accepts messages from "
        "(make them with `paigeant keys generate <service>`), or run without signatures, deliberately, with "
        "PAIGEANT_ALLOW_UNSIGNED=1 (allow_unsigned=True)"
    )
