"""The raw cost of one Ed25519 signature and its verification, with each implementation installed.

A signed hop verifies the hop it received and signs the next one, so its least possible extra CPU is one sign and
one verify over a message of its size. This measures exactly that with the bare libraries: `cryptography` (what
joserfc uses, and paigeant for P-256 keys) and PyNaCl (libsodium, what paigeant signs and verifies Ed25519 hops
with). The fastest is the floor the signed-hop target is set against.
"""

from __future__ import annotations

import importlib
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = ("sign_and_verify_cpu",)

SignAndVerify = Callable[[bytes], None]


def with_cryptography() -> SignAndVerify:
    key = Ed25519PrivateKey.generate()
    public = key.public_key()

    def sign_and_verify(message: bytes) -> None:
        public.verify(key.sign(message), message)

    return sign_and_verify


def with_pynacl() -> SignAndVerify | None:
    """PyNaCl's sign and verify, or None when it cannot be imported."""
    try:
        signing = importlib.import_module("nacl.signing")
    except ImportError:
        return None
    key = signing.SigningKey.generate()
    verify_key = key.verify_key

    def sign_and_verify(message: bytes) -> None:
        verify_key.verify(key.sign(message))

    return sign_and_verify


IMPLEMENTATIONS: dict[str, Callable[[], SignAndVerify | None]] = {
    "cryptography": with_cryptography,
    "PyNaCl": with_pynacl,
}


def cpu_per_call(func: SignAndVerify, message: bytes, rounds: int, repeats: int = 5) -> float:
    """Median CPU microseconds per `func(message)` over `repeats` runs of `rounds` calls."""
    samples: list[float] = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(rounds):
            func(message)
        samples.append((time.process_time() - started) / rounds * 1e6)
    return statistics.median(samples)


def sign_and_verify_cpu(size: int, rounds: int) -> dict[str, float]:
    """CPU microseconds of one sign plus one verify over `size` bytes, for each implementation importable."""
    message = b"x" * size
    measured: dict[str, float] = {}
    for name, make in IMPLEMENTATIONS.items():
        func = make()
        if func is not None:
            measured[name] = cpu_per_call(func, message, rounds)
    return measured
