"""The version of an activity's code, as a worker advertises it and a log entry records it."""

from __future__ import annotations

from typing import Any

__all__ = ("activity_version",)


def activity_version(activity: Any) -> str | None:
    """The version `activity` declares (its `version` attribute), else `None`."""
    version = getattr(activity, "version", None)
    return version if isinstance(version, str) else None
