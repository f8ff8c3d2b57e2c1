"""`paigeant cancel ID`: stop a workflow wherever it runs, and undo its completed steps.

The command brings the workflow store up to date first (as `paigeant status` does), so that a workflow that has
ended is left alone and an ID nobody knows is refused, then posts a signed cancel request on the transport's cancel
board through `WorkflowDispatcher.cancel`. It signs with this process's key (`PAIGEANT_SIGNING_KEY`), which the
workers must trust and the trust policy must let `cancel`. A workflow is named by its whole ID or by a prefix only
it starts with, as with `status`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ._cancel import Cancellation
from ._cli_workflows import REDIS_URL_HELP, command_store, command_transport, find_status, sync_store
from ._escape import escape_control, escape_json
from .dispatch import WorkflowDispatcher
from .exceptions import UnknownWorkflow, UserError
from .security import MessageSigner
from .settings import Settings
from .transports import IN_MEMORY_NAMES
from .transports.base import SharedStores

__all__ = ("add_command", "run_command")

_SAID = {
    "requested": "cancel requested",
    "cancelled": "cancelled",
    "finished": "nothing changed",
}
"""The first words of the line `paigeant cancel` prints, by what the cancel did."""


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add `cancel` to the `paigeant` parser; `common` holds the options every broker command takes."""
    cancel = commands.add_parser(
        "cancel",
        parents=list(common),
        help="cancel a workflow: no further step starts, a running one is interrupted, completed steps are undone",
    )
    cancel.add_argument("correlation_id", help="the workflow's correlation ID, or a prefix only it starts with")
    cancel.add_argument("--reason", default="", help="why, for its status and its compensations")
    cancel.add_argument(
        "--by", help="who cancels it (default: the subject of --token-file, else the kid of this process's key)"
    )
    cancel.add_argument(
        "--token-file",
        metavar="FILE",
        help="the requester's own token (the workflow's initiator's or owner's), for a key the trust policy does "
        "not let cancel by itself; - reads it from stdin",
    )
    cancel.add_argument("--json", action="store_true", help="print JSON instead of text")
    cancel.add_argument("--redis-url", help=REDIS_URL_HELP)


async def run_command(args: argparse.Namespace) -> int:
    """Run `paigeant cancel`; the exit code (1 for an ID no workflow has)."""
    chosen = (args.transport or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "an in-memory workflow lives in the process that dispatched it: cancel it there "
            "(WorkflowDispatcher.cancel), or run workflows on sqlite, rabbitmq or redis "
            "(--transport or PAIGEANT_TRANSPORT)"
        )
    token = _token(args.token_file)
    async with command_transport(chosen) as transport, command_store(transport, args.redis_url) as store:
        signer = MessageSigner.from_settings(transport)
        if signer.refusal is not None:  # the workers act only on a cancel signed by a key they trust
            raise UserError(signer.refusal)
        await sync_store(store, transport)
        status = await find_status(store, args.correlation_id)
        correlation_id = status.correlation_id if status is not None else args.correlation_id
        waiting = transport.waiting_store() if isinstance(transport, SharedStores) else None
        by = args.by or (None if token is not None else _kid(signer))  # with a token: its subject, by default
        try:
            async with WorkflowDispatcher(transport, security=signer, waiting_store=waiting) as dispatcher:
                done = await dispatcher.cancel(correlation_id, args.reason, by=by, token=token, store=store)
        except UnknownWorkflow as exc:
            return _print(Cancellation(exc.correlation_id, "finished", str(exc)), as_json=args.json, unknown=True)
    return _print(done, as_json=args.json)


def _token(path: str | None) -> str | None:
    """The token in the file at `path` (stdin for `-`), never one given on the command line, where `ps` shows it."""
    if path is None:
        return None
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read --token-file {path!r}: {exc.strerror or exc}") from None
    if not text.strip():
        raise UserError(f"--token-file {path!r} is empty: put the requester's token in it")
    return text.strip()


def _kid(signer: MessageSigner) -> str | None:
    key = signer.signing_key
    return None if key is None or signer.unsigned else key.kid


def _print(done: Cancellation, *, as_json: bool, unknown: bool = False) -> int:
    state = "unknown" if unknown else done.state
    if as_json:
        answer = {"correlation_id": done.correlation_id, "state": state, "detail": done.detail}
        print(escape_json(json.dumps(answer)))
    else:
        print(escape_control(done.detail if unknown else f"{_SAID[done.state]}: {done.detail}"))
    return 1 if unknown else 0
