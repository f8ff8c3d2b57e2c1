"""`paigeant console`: serve the web console; `paigeant console add-user NAME`: add a local account to it.

The console reads the transport's shared stores (SQLite, Redis; on RabbitMQ the workflow store of
`PAIGEANT_REDIS_URL` and the waiting store of `PAIGEANT_SHARED_STORE_URL`, as the other commands do), feeds its
workflow store from the transport's events, and signs approvals and replays with this process's key
(`PAIGEANT_SIGNING_KEY_FILE`). It listens on 127.0.0.1 unless `--host` says otherwise. The web parts are imported
only here, from the `console` extra.
"""

from __future__ import annotations

import argparse
import getpass
import ipaddress
import os
import sys
from collections.abc import AsyncGenerator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ._cli_workflows import REDIS_URL_HELP, command_store, command_transport
from ._shared_store import resolve_shared_store
from .approval import WaitingStore
from .exceptions import UserError
from .security import MessageSigner
from .settings import Settings
from .transports import IN_MEMORY_NAMES, SharedStores

if TYPE_CHECKING:
    from .console import Console, Users

__all__ = ("DEFAULT_USERS_FILE", "add_command", "run_command")

DEFAULT_USERS_FILE = "paigeant-console-users.json"


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add `console` (and `console add-user`) to the `paigeant` parser."""
    console = commands.add_parser(
        "console", parents=list(common), help="serve the web console: workflows, dead letters and approvals"
    )
    console.add_argument("--host", help="the address to listen on (default 127.0.0.1: this machine only)")
    console.add_argument("--port", type=int, default=8765, help="the port (default 8765)")
    console.add_argument(
        "--users-file", help=f"the local accounts (default PAIGEANT_CONSOLE_USERS or {DEFAULT_USERS_FILE})"
    )
    console.add_argument("--trace-url", help="a link to a workflow's trace, with {correlation_id} in it")
    console.add_argument("--redis-url", help=REDIS_URL_HELP)
    actions = console.add_subparsers(dest="console_action")
    add_user = actions.add_parser("add-user", help="add (or replace) a local account of the console")
    add_user.add_argument("name", help="the name the person signs in with, recorded with every decision")
    add_user.add_argument(
        "--may", action="append", default=[], choices=["approve", "replay"], help="what the person may do (repeat)"
    )
    add_user.add_argument("--password-file", help="read the password from this file (- for stdin) instead of a prompt")


def _users_path(args: argparse.Namespace) -> str:
    return args.users_file or os.environ.get("PAIGEANT_CONSOLE_USERS") or DEFAULT_USERS_FILE


def _password(source: str | None) -> str:
    if source is None:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise UserError("the passwords differ: run the command again")
        return password
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as exc:
        raise UserError(
            f"cannot read the password from {source}: {exc.strerror}; give a readable --password-file"
        ) from None
    return text.rstrip("\n")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def run_command(args: argparse.Namespace) -> int:
    """Run `paigeant console`; the exit code."""
    from .console import Users

    users = Users(_users_path(args))
    if args.console_action == "add-user":
        users.add(args.name, _password(args.password_file), args.may)
        print(f"added {args.name} to {users.path}" + (f" (may {', '.join(args.may)})" if args.may else " (read only)"))
        return 0
    import uvicorn

    from .console import create_app

    host = args.host or "127.0.0.1"
    if not _is_loopback(host):
        print(
            f"paigeant: warning: the console listens on {host}, beyond this machine; put TLS in front of it",
            file=sys.stderr,
        )
    async with _console(args, users) as console:
        if _is_loopback(host):  # a page elsewhere that rebinds its name to this address is not answered
            console.allowed_hosts = ["127.0.0.1", "localhost", "::1", "[::1]", host]
        config = uvicorn.Config(create_app(console), host=host, port=args.port, log_level="warning")
        print(f"paigeant console on http://{host}:{args.port}/ ({console.transport.name})")
        await uvicorn.Server(config).serve()
    return 0


@asynccontextmanager
async def _console(args: argparse.Namespace, users: Users) -> AsyncGenerator[Console]:
    from .console import Console

    settings = Settings.from_env()
    chosen = (args.transport or settings.transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "in-memory workflows live in the process that runs them: give --transport sqlite|redis|rabbitmq, or "
            "serve paigeant_ai.console.create_app(Console(...)) from that process"
        )
    async with AsyncExitStack() as stack:
        transport = await stack.enter_async_context(command_transport(chosen))
        signer = MessageSigner.from_settings(transport)
        if signer.refusal is not None:  # approvals and replays are signed with this key
            raise UserError(signer.refusal)
        store = await stack.enter_async_context(command_store(transport, args.redis_url))
        waiting: WaitingStore | None = None
        if isinstance(transport, SharedStores):
            waiting = transport.waiting_store()
        else:
            shared, connection = resolve_shared_store(transport, None, settings)
            if connection is not None:
                await stack.enter_async_context(connection)
            waiting = shared.waiting_store() if shared is not None else None
        yield Console(
            transport,
            store,
            signer,
            waiting_store=waiting,
            users=users,
            tokens=signer.tokens,
            trace_url=args.trace_url,
            secret=os.environ.get("PAIGEANT_CONSOLE_SECRET"),
        )
