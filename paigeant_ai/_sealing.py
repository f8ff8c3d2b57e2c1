"""The one way a message leaves a process: trace context, encoding, signature, size check.

A signature covers exactly the bytes that are sent. The message is encoded once, with an empty signature (JSON
`null`) as its very last value, and that encoding is what the signer signs; the bytes sent are the same bytes with
that `null` replaced by the signature. A receiver puts the `null` back and checks the signature over the result, so
it verifies the bytes it received, never a re-encoding of what it parsed: no value can mean one thing to the
signer and another on the wire.

JSON has no NaN or infinity. Such a number is refused before anything is signed or sent, with the place it was
found, instead of being sent as `null` (which would change the workflow's data without a word).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from pydantic_core import to_json

from . import observability
from ._json_values import check_finite
from .exceptions import InvalidMessage, MessageTooLarge, NonFiniteNumber

if TYPE_CHECKING:
    from .contracts import PaigeantMessage

__all__ = (
    "NonFiniteNumber",
    "Signer",
    "check_finite",
    "check_finite_json",
    "encode_output",
    "seal",
    "signed_bytes",
    "signing_input",
    "too_large",
    "unsigned_body",
)

_UNSIGNED_TAIL = b'"jws_signature":null}}'
"""How every encoded message ends: `security` is the message's last field and `jws_signature` the last of it."""


class Signer(Protocol):
    """What `seal` needs of a `MessageSecurity`."""

    def signature_for(self, body: bytes) -> str | None:
        """The detached JWS over `body`, or None when messages are not signed."""
        ...


def unsigned_body(message: PaigeantMessage) -> bytes:
    """`message` encoded with no signature: the bytes a signer signs.

    Raises:
        NonFiniteNumber: The message holds a NaN or an infinity.
    """
    signature = message.security.jws_signature
    if signature is None:  # the usual case: a hop made by `next_hop`, not signed yet
        body = message.to_json()
    else:
        message.security.jws_signature = None
        try:
            body = message.to_json()
        finally:
            message.security.jws_signature = signature
    # `check_finite_json` inline: the message is dumped to be walked only when its bytes hold a bare constant (a
    # string holding the word says it quoted), not on every hop.
    if b"NaN" in body or b"Infinity" in body:
        check_finite(message.model_dump(), "the message")
    if not body.endswith(_UNSIGNED_TAIL):  # pragma: no cover - the field order of PaigeantMessage guarantees it
        raise AssertionError("the message's signature is not its last field")
    return body


def signed_bytes(unsigned: bytes, signature: str | None) -> bytes:
    """The bytes to send: `unsigned` (from `unsigned_body`) carrying `signature`."""
    if signature is None:
        return unsigned
    return b'%s"%s"}}' % (unsigned[: -len(b"null}}")], signature.encode())


def signing_input(body: bytes, signature: str) -> bytes:
    """What the sender of `body` signed, given the signature `body` carries.

    Raises:
        InvalidMessage: The signature is not where a sender puts it (the last value of the message).
    """
    tail = b'"jws_signature":"%s"}}' % signature.encode()
    if not body.endswith(tail):
        raise InvalidMessage("the signature is not the last value of the message, where every sender puts it")
    return body[: -len(tail)] + _UNSIGNED_TAIL


def seal(message: PaigeantMessage, signer: Signer, *, max_bytes: int, trace: bool = True) -> bytes:
    """Put the current trace context in `message`, sign it, and return the bytes to send.

    `message.security.jws_signature` is set to the signature the bytes carry.

    Args:
        message: The message to send.
        signer: Signs the encoded message.
        max_bytes: The largest message allowed.
        trace: Replace the message's trace context with the current one (False keeps what it carries).

    Raises:
        NonFiniteNumber: The message holds a NaN or an infinity.
        MessageTooLarge: The bytes would exceed `max_bytes`; nothing is signed.
    """
    if trace:
        message.headers = observability.inject_context(message.headers, message.correlation_id)
    unsigned = unsigned_body(message)
    # About what a signature adds: refuse before spending a signature on a message that cannot be sent.
    if len(unsigned) > max_bytes:
        raise too_large(len(unsigned), max_bytes)
    signature = signer.signature_for(unsigned)
    body = signed_bytes(unsigned, signature)
    if len(body) > max_bytes:
        raise too_large(len(body), max_bytes)
    message.security.jws_signature = signature
    return body


def too_large(size: int, limit: int) -> MessageTooLarge:
    """The error for a message of `size` bytes over `limit`."""
    return MessageTooLarge(
        f"the message would be {size} bytes, over the limit of {limit} (max_message_bytes); keep large data out "
        "of the workflow's variables and outputs: store it elsewhere and pass a reference"
    )


def check_finite_json(encoded: bytes, value: Any, where: str) -> None:
    """`check_finite` for `value` already encoded as `encoded` (with NaN and infinities as bare constants)."""
    if b"NaN" in encoded or b"Infinity" in encoded:
        check_finite(value, where)


def encode_output(value: Any) -> bytes:
    """`value` as JSON, NaN and infinities as bare constants, so `check_finite_json` can see them."""
    return to_json(value, inf_nan_mode="constants")
