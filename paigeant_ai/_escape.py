"""One escape for text that came from a message (a reason, a log line, a command's output).

Control characters (C0, DEL, C1) and the bidirectional overrides and isolates are shown as `\\xNN` / `\\uNNNN`, so
that a forged value can neither end a log line, fake another one, move the cursor of a terminal, nor reorder
what a reader sees. Every other character, accented letters and emoji included, is kept as it is.

`show` puts a value from a message into a reason: its `repr`, cut short.
"""

from __future__ import annotations

import re

__all__ = ("escape_control", "escape_json", "show")

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_JSON = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
"""The same, but the line breaks and tabs of JSON's own layout (inside its strings they are escaped already)."""


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_control(text: str) -> str:
    """`text` with each control or bidirectional-control character written as `\\xNN` or `\\uNNNN` (a line
    break becomes the four characters `\\x0a`); every other character unchanged."""
    return _UNSAFE.sub(_escaped, text) if _UNSAFE.search(text) else text


def escape_json(text: str) -> str:
    """`text`, JSON, with the same characters written as JSON escapes (`\\u0085`): still valid JSON that reads the
    same, and safe to print. (They can only be inside its strings: JSON's own syntax is ASCII.)"""
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def show(value: object) -> str:
    """A value from a message, for a reason: quoted and short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
