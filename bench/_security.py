"""Signing on or off for the benchmark runs, and a count of the signatures a run makes and checks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Generator
from dataclasses import dataclass

from joserfc.jwk import Key
from joserfc.jws import JWSRegistry

from paigeant_ai import _jws
from paigeant_ai._jws import DetachedJWS, Sign, Verify
from paigeant_ai._registry import REGISTRY_TYPE
from paigeant_ai.security import ALGORITHMS, InMemoryReplayCache, MessageSigner, ReplayCache, generate_key
from paigeant_ai.transports import SharedStores, Transport


def security_for(transport: Transport, signed: bool) -> MessageSigner:
    """What a benchmark's worker and dispatcher share: one fresh key pair when signed, the opt-out when not.

    Signed runs use the replay cache a real deployment would: the transport's shared one (Redis), if it has one.
    """
    if not signed:
        logging.getLogger("paigeant_ai.security").setLevel(logging.ERROR)  # the opt-out warns on every start
        return MessageSigner(unsigned=True)
    cache: ReplayCache = transport.replay_cache() if isinstance(transport, SharedStores) else InMemoryReplayCache()
    return MessageSigner(generate_key("bench-1"), replay_cache=cache)


class _CountingJWS(DetachedJWS):
    """A `DetachedJWS` that counts what it signs and verifies (hops, plans, events, progress entries alike).

    The registry's advertisements are left out: the worker's heartbeat signs them on its own clock, not per hop,
    so a slower run would count more of them.
    """

    signed = 0
    verified = 0

    def sign(self, payload: bytes, typ: str) -> str | None:
        self.signed += typ != REGISTRY_TYPE
        return super().sign(payload, typ)

    def verify(self, signature: str, signed: bytes, typ: str) -> str:
        self.verified += typ != REGISTRY_TYPE
        return super().verify(signature, signed, typ)


@dataclass
class Counted:
    """A signer whose every signature made and checked is counted, from the last `reset`."""

    signer: MessageSigner
    _jws: _CountingJWS

    def reset(self) -> None:
        self._jws.signed = self._jws.verified = 0

    def per(self, hops: int) -> tuple[float, float]:
        """Signatures made and verified per hop over `hops` hops."""
        return self._jws.signed / hops, self._jws.verified / hops


def counted(signer: MessageSigner) -> Counted:
    """`signer`, counting its signatures (its keys are kept)."""
    jws = _CountingJWS(signer.signing_key, signer.trusted_keys)
    signer._jws = jws
    return Counted(signer, jws)


@contextlib.contextmanager
def joserfc_ed25519() -> Generator[None]:
    """Every signature made and checked by joserfc's own algorithms (OpenSSL for Ed25519), as before libsodium:
    the baseline a run compares against."""
    registry = JWSRegistry(algorithms=list(ALGORITHMS))

    def sign_with(key: Key, alg: str) -> Sign:
        algorithm = registry.get_alg(alg)
        return lambda data: algorithm.sign(data, key)

    def verify_with(key: Key, alg: str) -> Verify:
        algorithm = registry.get_alg(alg)
        return lambda data, signature: algorithm.verify(data, signature, key)

    saved = _jws.sign_with, _jws.verify_with
    _jws.sign_with, _jws.verify_with = sign_with, verify_with
    try:
        yield
    finally:
        _jws.sign_with, _jws.verify_with = saved
