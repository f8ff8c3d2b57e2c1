"""What a step's `transport` may say: a transport's name, or its URL without credentials (see `paigeant_ai._routes`).

A message is read and written by whoever can reach a broker, so what it says of a transport only ever selects among
the transports a process was configured with. It never carries a secret: a URL with a user, a password or a query
(where Redis URLs may put one) is refused when the step is built.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

__all__ = ("bare_url", "check_transport_address", "is_url")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def is_url(address: str) -> bool:
    """Whether `address` is written as a URL rather than a name."""
    return "://" in address


def check_transport_address(address: str) -> None:
    """Raise `ValueError` unless `address` is a transport name or a URL that carries no credentials."""
    if not is_url(address):
        if not _NAME.match(address):
            raise ValueError(
                f"transport {address!r} is not a transport name (letters, digits, '.', '_' and '-', at most 64) "
                "nor a URL: name it as PAIGEANT_TRANSPORTS does"
            )
        return
    try:
        parts = urlsplit(address)
    except ValueError:
        raise ValueError(f"transport {address!r} is not a URL Python can read: use the transport's name") from None
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            "a step's transport URL may not carry credentials, a query or a fragment (a message is readable on the "
            "broker): configure the transport with PAIGEANT_TRANSPORTS and name it instead"
        )


def bare_url(url: str) -> str:
    """`url` as a step may name it: without user, password, query or fragment, and without a trailing `/`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme.lower()}://{host.lower()}{parts.path}".rstrip("/")
