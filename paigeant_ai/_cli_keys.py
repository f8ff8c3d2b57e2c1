"""`paigeant keys generate`: a service's signing key pair, and the JWKS it shares with the services that trust it."""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from .exceptions import UserError
from .security import ALGORITHMS, generate_key, load_trusted_keys

__all__ = ("add_commands", "generate_keys", "run_command")


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keys` to the `paigeant` parser."""
    keys = commands.add_parser("keys", help="make the keys that sign and verify messages")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    generate = actions.add_parser(
        "generate",
        help="write <service>.private.jwk.json (keep it secret) and <service>.jwks.json (share it)",
    )
    generate.add_argument("service", help="the service's name, e.g. orders")
    generate.add_argument("--kid", help="the key's id (default <service>-<date>-<random>)")
    generate.add_argument("--alg", choices=ALGORITHMS, default="Ed25519", help="signature algorithm (Ed25519)")
    generate.add_argument("--out-dir", type=Path, default=Path("."), help="where to write the files (.)")
    group = generate.add_mutually_exclusive_group()
    group.add_argument("--rotate", action="store_true", help="replace the private key; the JWKS keeps the old one")
    group.add_argument("--force", action="store_true", help="overwrite both files")


def run_command(args: argparse.Namespace) -> int:
    """Run `keys <command>`; the exit code."""
    try:
        private, public, kid = generate_keys(
            args.service, out_dir=args.out_dir, kid=args.kid, algorithm=args.alg, rotate=args.rotate, force=args.force
        )
    except OSError as exc:
        raise UserError(
            f"cannot write the keys to {str(args.out_dir)!r}: {exc.strerror or exc}; pick another --out-dir"
        ) from None
    print(f"wrote {private} (the private key of {args.service}, kid {kid}: keep it secret)")
    print(f"wrote {public} (its public JWKS: give it to every service that accepts messages from {args.service})")
    print(f"  {args.service}:  PAIGEANT_SIGNING_KEY_FILE={private}")
    print(f"  its peers: PAIGEANT_TRUSTED_KEYS_FILE=<their own jwks>{os.pathsep}{public}")
    return 0


def generate_keys(
    service: str,
    *,
    out_dir: Path,
    kid: str | None = None,
    algorithm: str = "Ed25519",
    rotate: bool = False,
    force: bool = False,
) -> tuple[Path, Path, str]:
    """Write a new key pair for `service`; the paths of the private JWK and the public JWKS, and the key id.

    With `rotate`, the public JWKS keeps the keys it had, so verifiers trust the old and the new key until the
    old one is removed from it.

    Raises:
        UserError: The files exist (and neither `rotate` nor `force` was given), one is a symbolic link (never
            followed, also with `force`), or the name is unusable.
    """
    if not service or any(ch in service for ch in "/\\") or service.startswith("."):
        raise UserError(f"{service!r} is not a usable service name (no slashes, not starting with a dot)")
    private = out_dir / f"{service}.private.jwk.json"
    public = out_dir / f"{service}.jwks.json"
    links = [path for path in (private, public) if path.is_symlink()]
    if links:
        raise UserError(
            f"{links[0]} is a symbolic link; keys are never written through one: remove it, or pick another --out-dir"
        )
    existing = [path for path in (private, public) if path.exists()]
    if existing and not (rotate or force):
        names = ", ".join(str(path) for path in existing)
        raise UserError(f"{names} already exist; pass --rotate to add a new key, or --force to replace them")
    if rotate and not public.exists():
        raise UserError(f"--rotate needs the existing {public}")
    kid = kid or f"{service}-{datetime.now(UTC):%Y%m%d}-{os.urandom(3).hex()}"
    key = generate_key(kid, cast(Literal["Ed25519", "ES256"], algorithm))
    kept: list[dict[str, Any]] = []
    if rotate:
        kept = [dict(old.as_dict()) for old in load_trusted_keys(public) if old.kid != kid]
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_new(private, json.dumps(key.as_dict(private=True), indent=2) + "\n", 0o600)
    keys = [*kept, dict(key.as_dict(private=False))]
    _write_new(public, json.dumps({"keys": keys}, indent=2) + "\n", 0o644)
    return private, public, kid


def _write_new(path: Path, text: str, mode: int) -> None:
    """Write `text` to `path` with exactly `mode`, whatever the umask, never through a symbolic link.

    The text goes to a new file beside `path` (created exclusively, never following a link, with `mode` set
    before anything is written), which then replaces `path`: a link put at `path` meanwhile is replaced, its
    target untouched.
    """
    temporary = path.with_name(f".{path.name}.{os.urandom(4).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        descriptor = os.open(temporary, flags, mode & 0o600)
    except FileExistsError:
        raise UserError(f"{temporary} exists; remove it and run again") from None
    try:
        with os.fdopen(descriptor, "w") as file:
            os.fchmod(file.fileno(), mode)  # the umask may have narrowed the mode given to open
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
