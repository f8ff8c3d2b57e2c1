"""Spans from worker processes, for tests that check a trace across processes: each finished span one JSON line."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult


class JsonLinesExporter(SpanExporter):
    """Appends each finished span to a file as one JSON line, with `extra` fields (which process made it...)."""

    def __init__(self, path: str, **extra: str) -> None:
        self.path = path
        self.extra = extra

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with open(self.path, "a", encoding="utf-8") as file:
            for span in spans:
                assert span.context is not None
                record = {
                    "name": span.name,
                    "trace_id": f"{span.context.trace_id:032x}",
                    "span_id": f"{span.context.span_id:016x}",
                    "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "links": [f"{link.context.span_id:016x}" for link in span.links],
                    "attributes": dict(span.attributes or {}),
                    "pid": os.getpid(),
                    **self.extra,
                }
                file.write(json.dumps(record, default=str) + "\n")
        return SpanExportResult.SUCCESS
