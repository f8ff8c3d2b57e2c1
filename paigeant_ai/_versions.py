"""The version of an activity's code, as a worker advertises it and a log entry records it, and the version
ranges a workflow pins its steps to.

An activity's version is the one it is given (`activity(version="2.1.0")`, `AgentActivity(..., version=...)`);
else the version of the installed distribution its code belongs to; else `0+<8 hex digits>`, a digest of its
code (a PEP 440 local version: comparable, and lower than any release).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import sys
from importlib import metadata
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from .exceptions import UserError

__all__ = ("activity_version", "check_version", "check_version_range", "fits")


def activity_version(activity: Any) -> str | None:
    """The version `activity` declares (its `version` attribute), else the one derived from its code."""
    version = getattr(activity, "version", None)
    if isinstance(version, str):
        return version
    origin = _origin(activity)
    if origin is None:
        return None
    module, code = origin
    return _distribution_version(module.partition(".")[0]) or _code_version(code)


def _code_version(code: Any) -> str:
    """`0+` and 8 hex digits of a digest of the source of `code` (of its qualified name when it has none)."""
    while isinstance(code, functools.partial):
        code = code.func  # pyright: ignore[reportUnknownMemberType]
    try:
        return _cached_code_version(code)
    except TypeError:  # not hashable: a callable object that defines equality
        return _digest_of(type(code))


def check_version(version: str | None, name: str) -> str | None:
    """`version`, once it is a PEP 440 version (or None).

    Raises:
        UserError: It is not.
    """
    if version is None:
        return None
    try:
        Version(version)
    except (InvalidVersion, TypeError):
        raise UserError(
            f"the version {version!r} of activity {name!r} is not a PEP 440 version: write one like '2.1.0'"
        ) from None
    return version


def check_version_range(pin: str, name: str) -> None:
    """Check that `pin` is a PEP 440 version range.

    Raises:
        UserError: It is not.
    """
    try:
        _specifier(pin)
    except (InvalidSpecifier, TypeError):
        raise UserError(
            f"the version range {pin!r} of step {name!r} is not a PEP 440 specifier: write one like '~=2.1' or '>=2,<3'"
        ) from None


def fits(version: str | None, pin: str) -> bool:
    """Whether `version` is in the range `pin` (pre-releases and local versions included); no version never is.

    Raises:
        InvalidSpecifier: `pin` is not a version range.
    """
    if version is None:
        return False
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return _specifier(pin).contains(parsed, prereleases=True)


@functools.lru_cache(maxsize=256)
def _specifier(pin: str) -> SpecifierSet:
    return SpecifierSet(pin)


def _origin(activity: Any) -> tuple[str, Any] | None:
    """The module the activity's code is in, and the object whose source is its code."""
    func = getattr(activity, "func", None)  # a function activity
    while isinstance(func, functools.partial):
        func = func.func  # pyright: ignore[reportUnknownMemberType]
    if callable(func):
        return getattr(func, "__module__", None) or "", func
    defined_in = getattr(activity, "defined_in", None)  # an agent activity: the module that built it
    if isinstance(defined_in, str):
        module = sys.modules.get(defined_in)
        return defined_in, module if module is not None else defined_in
    return type(activity).__module__, type(activity)


@functools.lru_cache(maxsize=256)
def _distribution_version(package: str) -> str | None:
    """The version of the one installed distribution that provides top-level package `package`, if one does."""
    if not package or package == "__main__":
        return None
    names = _packages_distributions().get(package, [])
    if len(set(names)) != 1:
        return None
    try:
        return metadata.version(names[0])
    except metadata.PackageNotFoundError:  # pragma: no cover - listed, then removed
        return None


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return dict(metadata.packages_distributions())


@functools.lru_cache(maxsize=256)
def _cached_code_version(code: Any) -> str:
    return _digest_of(code)


def _digest_of(code: Any) -> str:
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError):  # no source at hand (built in, or typed at a prompt): its name, the same anywhere
        name = getattr(code, "__qualname__", None) or type(code).__qualname__
        source = f"{getattr(code, '__module__', '')}.{name}"
    digest = hashlib.blake2b(source.encode(), digest_size=4).hexdigest()
    return f"0+{digest}"
