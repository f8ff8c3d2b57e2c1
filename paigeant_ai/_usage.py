"""What a step used: the `Usage` a log entry records, and the totals of a workflow.

Re-exported from `paigeant_ai.contracts`. A step that ran one model records one `Usage`; a step whose code called
several models records one per model, so that a price table (per model) can cost each.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import ConfigDict, Field

from ._wire import Wire

__all__ = ("Usage", "sum_usage")

_COUNTS = ("requests", "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "tool_calls")


def _zero(value: int) -> bool:
    return value == 0


class Usage(Wire):
    """Model requests, tokens and tool calls, for one model (`model`), or for several when `model` is `None`."""

    model_config = ConfigDict(frozen=True)

    model: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """The model's name as pydantic-ai reports it (`"openai:gpt-5"`, `"test"`); `None` for a sum over models."""
    requests: int = Field(default=0, ge=0, exclude_if=_zero)
    input_tokens: int = Field(default=0, ge=0, exclude_if=_zero)
    output_tokens: int = Field(default=0, ge=0, exclude_if=_zero)
    cache_read_tokens: int = Field(default=0, ge=0, exclude_if=_zero)
    cache_write_tokens: int = Field(default=0, ge=0, exclude_if=_zero)
    tool_calls: int = Field(default=0, ge=0, exclude_if=_zero)

    @property
    def total_tokens(self) -> int:
        """Input and output tokens together (cache tokens are part of the input)."""
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        model = self.model if self.model == other.model else None
        counts: dict[str, Any] = {name: getattr(self, name) + getattr(other, name) for name in _COUNTS}
        return Usage(model=model, **counts)

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, name) == 0 for name in _COUNTS)


def sum_usage(usages: Iterable[Usage]) -> Usage:
    """The sum of `usages` (an empty `Usage` for none); `model` is kept only when all name the same one."""
    total: Usage | None = None
    for usage in usages:
        total = usage if total is None else total + usage
    return total if total is not None else Usage()
