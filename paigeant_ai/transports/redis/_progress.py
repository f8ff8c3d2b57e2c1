"""The progress streams of a `RedisTransport`: one Redis stream per workflow, `<namespace>:{w:<id>}:progress`.

One stream per workflow rather than one shared: a watcher reads only its workflow's entries (`XREAD` on one key,
no filtering), each stream is trimmed on its own (`MAXLEN ~ PROGRESS_MAX_ENTRIES`), and expires
`PROGRESS_RETENTION` seconds after its last entry, so a finished workflow's stream costs nothing for long. An
append is two quick commands in the transport's shared pipeline; a reader blocks on a pooled connection of its own
while it waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from ..base import ProgressEntry
from ._layout import workflow_key
from ._wire import dump_headers, load_headers, ms

if TYPE_CHECKING:
    from ._transport import RedisTransport

__all__ = ("PROGRESS_MAX_ENTRIES", "PROGRESS_RETENTION", "RedisProgressReader", "append_progress", "progress_key")

PROGRESS_MAX_ENTRIES = 10_000
"""About how many entries a workflow's stream keeps (the oldest are trimmed)."""
PROGRESS_RETENTION = 7 * 24 * 3600.0
"""Seconds a workflow's stream is kept after its last entry."""
_READ_COUNT = 500


def progress_key(transport: RedisTransport, correlation_id: str) -> str:
    return workflow_key(transport.namespace, correlation_id, "progress")


async def append_progress(
    transport: RedisTransport, correlation_id: str, body: bytes, headers: Mapping[str, str]
) -> None:
    key = progress_key(transport, correlation_id)
    with transport.errors("appending to the progress of", correlation_id):
        added = transport.pipelined(
            "XADD", key, "MAXLEN", "~", PROGRESS_MAX_ENTRIES, "*", "b", body, "h", dump_headers(headers)
        )
        expiry = transport.pipelined("PEXPIRE", key, ms(PROGRESS_RETENTION))
        await added
        await expiry


class RedisProgressReader:
    """Reads one workflow's stream with blocking `XREAD`s."""

    def __init__(self, transport: RedisTransport, correlation_id: str, after: str | None) -> None:
        self.transport = transport
        self.correlation_id = correlation_id
        self.key = progress_key(transport, correlation_id)
        self._after = after if after and _entry_id(after) else "0-0"
        self._closed = False

    async def read(self, wait: float) -> list[ProgressEntry]:
        if self._closed:
            return []
        client = cast(Any, self.transport.client)
        with self.transport.errors("reading the progress of", self.correlation_id):
            reply = await client.execute_command(
                "XREAD", "COUNT", _READ_COUNT, "BLOCK", ms(wait), "STREAMS", self.key, self._after
            )
        entries: list[ProgressEntry] = []
        for _stream, items in _streams(reply):
            for entry_id, fields in items:
                position = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                values = _fields(fields)
                body = values.get(b"b")
                self._after = position
                if body is not None:
                    entries.append(ProgressEntry(position, body, load_headers(values.get(b"h"))))
        return entries

    async def aclose(self) -> None:
        self._closed = True


def _entry_id(text: str) -> bool:
    milliseconds, dash, sequence = text.partition("-")
    return bool(dash) and milliseconds.isdigit() and sequence.isdigit()


def _streams(reply: Any) -> list[tuple[Any, list[tuple[Any, Any]]]]:
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return list(cast("dict[Any, Any]", reply).items())
    return [(item[0], item[1]) for item in cast("list[Any]", reply)]


def _fields(fields: Any) -> dict[bytes, bytes]:
    if isinstance(fields, dict):
        return cast("dict[bytes, bytes]", fields)
    flat = cast("list[bytes]", fields or [])
    return dict(zip(flat[::2], flat[1::2], strict=False))
