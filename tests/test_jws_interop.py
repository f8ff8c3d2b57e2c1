"""A message signature is a standard detached JWS (RFC 7515, Appendix F): joserfc reads ours, and we read its own."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from joserfc import jws
from joserfc.errors import BadSignatureError
from joserfc.jwk import Key
from joserfc.util import urlsafe_b64decode, urlsafe_b64encode

from paigeant_ai._jws import DetachedJWS
from paigeant_ai.exceptions import SecurityError
from paigeant_ai.security import ALGORITHMS, generate_key, load_trusted_keys

TYP = "paigeant+jws"
PAYLOAD = b'{"v":1,"payload":{"text":"caf\\u00e9 \xe2\x9c\x93"},"security":{"jws_signature":null}}'

Algorithm = Literal["Ed25519", "ES256"]
BOTH: list[Algorithm] = ["Ed25519", "ES256"]


def attached(detached: str, payload: bytes) -> str:
    """The compact JWS `detached` with `payload` put back in its middle segment."""
    header, _, signature = detached.partition("..")
    return f"{header}.{urlsafe_b64encode(payload).decode()}.{signature}"


def public(key: Key) -> Key:
    return next(iter(load_trusted_keys(key)))


@pytest.mark.parametrize("algorithm", BOTH)
def test_joserfc_verifies_our_signature_with_the_payload_put_back(algorithm: Algorithm) -> None:
    key = generate_key(f"interop-{algorithm}", algorithm)
    ours = DetachedJWS(key, None).sign(PAYLOAD, TYP)
    assert ours is not None

    read = jws.deserialize_compact(attached(ours, PAYLOAD), public(key), algorithms=list(ALGORITHMS))

    assert read.payload == PAYLOAD
    assert read.headers() == {"alg": algorithm, "kid": key.kid, "typ": TYP}


@pytest.mark.parametrize("algorithm", BOTH)
def test_joserfc_refuses_our_signature_over_other_bytes(algorithm: Algorithm) -> None:
    key = generate_key(f"interop-{algorithm}", algorithm)
    ours = DetachedJWS(key, None).sign(PAYLOAD, TYP)
    assert ours is not None

    with pytest.raises(BadSignatureError):
        jws.deserialize_compact(attached(ours, PAYLOAD + b" "), public(key), algorithms=list(ALGORITHMS))


@pytest.mark.parametrize("algorithm", BOTH)
def test_we_verify_joserfcs_signature_with_the_payload_left_out(algorithm: Algorithm) -> None:
    key = generate_key(f"interop-{algorithm}", algorithm)
    theirs = jws.serialize_compact(
        {"alg": algorithm, "kid": key.kid, "typ": TYP}, PAYLOAD, key, algorithms=list(ALGORITHMS)
    )
    header, _, signature = theirs.split(".")
    detached = f"{header}..{signature}"
    verifier = DetachedJWS(None, [public(key)])

    assert verifier.verify(detached, PAYLOAD, TYP) == key.kid
    with pytest.raises(SecurityError) as refused:
        verifier.verify(detached, PAYLOAD.replace(b"caf", b"CAF"), TYP)
    assert refused.value.code == "bad_signature"


def test_an_ed25519_signature_is_byte_for_byte_joserfcs() -> None:
    """Ed25519 is deterministic: libsodium and joserfc (OpenSSL) make the same signature over the same input."""
    key = generate_key("interop-same", "Ed25519")
    ours = DetachedJWS(key, None).sign(PAYLOAD, TYP)
    assert ours is not None
    header = urlsafe_b64decode(ours.split(".")[0].encode())

    theirs = jws.serialize_compact(json.loads(header), PAYLOAD, key, algorithms=list(ALGORITHMS))

    assert attached(ours, PAYLOAD) == theirs


@pytest.mark.parametrize("algorithm", BOTH)
def test_a_signature_cut_short_or_not_base64_does_not_hold(algorithm: Algorithm) -> None:
    key = generate_key(f"interop-{algorithm}", algorithm)
    signer = DetachedJWS(key, None)
    ours = signer.sign(PAYLOAD, TYP)
    assert ours is not None
    header, _, signature = ours.partition("..")

    for forged in [f"{header}..{signature[:-8]}", f"{header}..{signature[:-1]}!", f"{header}.."]:
        with pytest.raises(SecurityError) as refused:
            signer.verify(forged, PAYLOAD, TYP)
        assert refused.value.code == "bad_signature"


def test_a_trusted_key_whose_key_ops_leave_out_verify_is_refused_by_name() -> None:
    key = generate_key("interop-enc", "Ed25519")
    signature = DetachedJWS(key, None).sign(PAYLOAD, TYP)
    assert signature is not None
    for_signing_only = {**public(key).as_dict(), "key_ops": ["sign"]}
    verifier = DetachedJWS(None, load_trusted_keys(for_signing_only))

    with pytest.raises(SecurityError, match="may not verify signatures") as refused:
        verifier.verify(signature, PAYLOAD, TYP)
    assert refused.value.code == "algorithm"
