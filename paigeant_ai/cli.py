"""The `paigeant` command: run a worker as its own process, dispatch a workflow, see where workflows are, cancel one.

`--transport`, `--broker-url` and `--namespace` are given before or after the subcommand; they set the
`PAIGEANT_*` settings for the command's run, so a worker module that builds its transport with `get_transport()`
(at import, or in the function `paigeant worker` calls) runs on what the command line says.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import os
import signal
import sys
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

from . import (
    __version__,
    _cli_activities,
    _cli_cancel,
    _cli_console,
    _cli_dead_letters,
    _cli_evals,
    _cli_keys,
    _cli_resume,
    _cli_workflows,
)
from ._escape import escape_control
from ._events import WorkflowEvent
from ._prefork import (
    STOP_MARGIN,
    ChildSlot,
    Supervisor,
    SupervisorLink,
    child_command,
    in_memory_refusal,
    process_count,
    run_as_child,
)
from ._settle import INTERRUPTED
from .exceptions import PaigeantError, UserError
from .security import MessageSigner
from .settings import Settings
from .transports import IN_MEMORY_NAMES
from .transports.base import redact_url
from .worker import Worker

__all__ = ("main",)

logger = logging.getLogger("paigeant_ai.cli")

_EXAMPLE_TARGET = "examples.onboarding:worker"
_URL_SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis", "amqp": "rabbitmq", "amqps": "rabbitmq"}
_URL_SETTINGS = {"redis": "PAIGEANT_REDIS_URL", "rabbitmq": "PAIGEANT_RABBITMQ_URL"}
_STEP_LABELS = {
    "step_started": "started",
    "step_completed": "done",
    "step_retried": "retry",
    "step_failed": "faulted",
    "waiting": "parked",
    "in_doubt": "in doubt",
    "budget_exhausted": "budget exhausted",
    "reconciled": "reconciled",
}
"""The events `paigeant worker -v` logs, and the word each is logged with."""


# -- loading the worker ------------------------------------------------------------------------------------------


def load_object(target: str) -> Any:
    """Import `module:attribute` (or `path/to/file.py:attribute`).

    Raises:
        UserError: The target is not of that form, or its module, file or attribute is not found.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"expected module:attribute, got {target!r} (for example {_EXAMPLE_TARGET})")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    module = _import_file(module_name) if module_name.endswith(".py") else _import_module(module_name, target)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(
                f"{module_name!r} has no attribute {part!r}; expected module:attribute (for example {_EXAMPLE_TARGET})"
            ) from None
    return obj


def _import_module(module_name: str, target: str) -> ModuleType:
    if module_name.startswith("."):
        raise UserError(
            f"{target!r} names a relative module; give its full dotted name (for example {_EXAMPLE_TARGET})"
        )
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(f"{missing}."):
            raise UserError(
                f"no module named {missing!r} (from {target!r}); expected module:attribute, importable from the "
                f"current directory (for example {_EXAMPLE_TARGET})"
            ) from None
        raise UserError(
            f"importing {module_name!r} failed: no module named {missing!r}; is it installed here?"
        ) from exc


def _import_file(file_name: str) -> ModuleType:
    path = Path(file_name).resolve()
    if not path.is_file():
        raise UserError(f"no file {file_name!r}; expected module:attribute or path/to/file.py:attribute")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has a loader
        raise UserError(f"cannot import {file_name!r}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as exc:
        del sys.modules[path.stem]
        if "relative import" not in str(exc):
            raise
        dotted = ".".join(Path(file_name).with_suffix("").parts)
        raise UserError(f"{file_name!r} is part of a package (it imports relatively); name it as {dotted}:...") from exc
    return module


async def _resolve_worker(target: str) -> Worker:
    obj = load_object(target)
    if callable(obj) and not isinstance(obj, Worker):
        try:
            inspect.signature(obj).bind()
        except TypeError:
            raise UserError(
                f"{target} takes arguments; point at a Worker, or a function without any that returns one"
            ) from None
        except ValueError:  # pragma: no cover - a callable without a signature: let the call tell
            pass
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if not isinstance(obj, Worker):
        raise UserError(f"{target} is {type(obj).__name__}, not a Worker (or a function returning one)")
    return obj


# -- running it --------------------------------------------------------------------------------------------------


async def run_worker(
    target: str,
    *,
    burst: bool = False,
    concurrency: int | None = None,
    verbose: bool = False,
    expected: dict[str, str] | None = None,
    child: SupervisorLink | None = None,
) -> int:
    """Run the worker at `target` until SIGTERM/SIGINT (graceful) or, with `burst`, until its queues are empty.

    `expected` is what the command line asked for (`transport`, `namespace`): a worker built on something
    else is refused rather than run where the user did not mean it to. `child` is the link to the supervisor of
    `--processes N` when this process is one of its workers.
    """
    if concurrency is not None and concurrency < 1:
        raise UserError(f"--concurrency must be at least 1, got {concurrency}")
    worker = await _resolve_worker(target)
    _check_connection(worker, target, expected or {})
    if child is not None and worker.transport.process_local:
        raise UserError(in_memory_refusal(child.slot.count))
    if concurrency is not None:
        worker.concurrency = concurrency
    if verbose:  # only then: a worker without callbacks does not build its events' models at all
        worker.reporter.callbacks.append(log_step)
    await _run_until_stopped(worker, target, burst=burst, child=child)
    stats = worker.stats
    name = "worker" if child is None else child.slot.label
    print(
        f"{name} stopped: {stats.completed_steps} steps completed, {stats.retried} retried, "
        f"{stats.faulted} faulted, {stats.rejected} rejected, {stats.duplicates} duplicates skipped",
        file=sys.stderr,
    )
    return 0


async def _run_until_stopped(worker: Worker, target: str, *, burst: bool, child: SupervisorLink | None) -> None:
    loop = asyncio.get_running_loop()
    # A child of `--processes N` leaves SIGINT ignored: the supervisor turns the terminal's Ctrl-C into its SIGTERM.
    signals = (signal.SIGTERM, signal.SIGINT) if child is None else (signal.SIGTERM,)
    for sig in signals:  # first: a supervisor may signal as soon as it sees the banner
        loop.add_signal_handler(sig, worker.stop)
    links = [*_link_to_supervisor(worker, child), asyncio.create_task(_say_when_ready(worker))]
    try:
        print(worker_banner(worker, target, None if child is None else child.slot), file=sys.stderr)
        if getattr(worker.transport, "process_local", False) and not burst:
            print(
                "paigeant: warning: the in-memory transport lives in this process, so no other process can send "
                "this worker a step; run it on a broker: --transport sqlite|redis|rabbitmq (or PAIGEANT_TRANSPORT)",
                file=sys.stderr,
            )
        await worker.transport.connect()
        await worker.run(burst=burst)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        for task in links:
            task.cancel()
        await asyncio.gather(*links, return_exceptions=True)
        await worker.transport.disconnect()


async def _say_when_ready(worker: Worker) -> None:
    """The banner's last line, once the worker is on the registry and consumes: from then on a dispatch of its
    steps finds it, where one sent as the banner appears may be refused as unserved."""
    await worker.consuming.wait()
    advertiser = worker.advertiser
    if not advertiser.boards:
        said = "consuming"
    elif advertiser.posted:
        said = f"consuming, on the registry as {advertiser.worker_id}"
    else:
        said = f"consuming; not on the registry yet (trying again every {advertiser.interval:g}s)"
    print(f"  ready        {said}", file=sys.stderr)


def _link_to_supervisor(worker: Worker, child: SupervisorLink | None) -> list[asyncio.Task[None]]:
    """A child tells its supervisor once it consumes, and stops when the supervisor is gone."""
    if child is None:
        return []
    stop_within = worker.shutdown_timeout + STOP_MARGIN

    async def ready() -> None:
        await worker.consuming.wait()
        child.ready(stop_within)

    child.stop_when_gone(worker.stop, stop_within)
    return [asyncio.create_task(ready())]


def _check_connection(worker: Worker, target: str, expected: dict[str, str]) -> None:
    """Refuse a worker that cannot run as the command line asked, before anything is printed or connected."""
    hint = "build its transport with get_transport() so that the command line chooses it"
    wanted = expected.get("transport")
    if wanted is not None and worker.transport.name != wanted:
        raise UserError(f"{target} runs on the {worker.transport.name} transport, not {wanted}: {hint}")
    namespace = getattr(worker.transport, "namespace", None)
    wanted = expected.get("namespace")
    if wanted is not None and namespace != wanted and not getattr(worker.transport, "process_local", False):
        raise UserError(f"{target} runs in the namespace {namespace!r}, not {wanted!r}: {hint}")
    if isinstance(worker.security, MessageSigner) and worker.security.refusal is not None:
        raise UserError(worker.security.refusal)


def worker_banner(worker: Worker, target: str, slot: ChildSlot | None = None) -> str:
    """What a worker prints as it starts: what it is, where it connects, what it consumes and how it signs; as one
    of the processes of `--processes N` (`slot`), which one it is and its id on the registry."""
    transport = worker.transport
    namespace: str = getattr(transport, "namespace", "paigeant")
    url: str | None = getattr(transport, "url", None)
    location: str | None = getattr(transport, "location", None)  # a file (SQLite): the absolute path
    where = f"{transport.name} {redact_url(url)}" if url else f"{transport.name} (this process only)"
    where = f"{transport.name} {location}" if location else where
    stream_key = getattr(transport, "stream_key", None)  # Redis: the stream of an address, with its hash tag
    queues = ", ".join(stream_key(name) if stream_key else f"{namespace}.{name}" for name in worker.activities)
    lines = [
        f"paigeant {__version__} worker {target}",
        f"  transport    {where}",
        f"  namespace    {namespace}",
        f"  queues       {queues}",
        f"  concurrency  {worker.concurrency}",
        f"  signing key  {_signing_key(worker)}",
    ]
    if worker.routes.hybrid:  # steps on other transports: where their hops go, and where events do
        named = ", ".join(f"{name} ({t.name})" for name, t in sorted(worker.routes.named.items()))
        home = next((name for name, t in worker.routes.named.items() if t is worker.routes.home), "its own")
        lines.append(f"  transports   {named}; this one is {worker.routes.own_name or 'unnamed'}, home {home}")
    if slot is not None:
        worker_id = worker.advertiser.worker_id
        lines.append(f"  process      {slot.index} of {slot.count}, pid {os.getpid()}, registry id {worker_id}")
    return "\n".join(lines)


def _signing_key(worker: Worker) -> str:
    security = worker.security
    if not isinstance(security, MessageSigner):
        return f"(signed by {type(security).__name__})"
    if security.unsigned or security.signing_key is None:
        return "unsigned"
    kid = security.signing_key.kid or "?"
    return f"{kid} (made for this process)" if kid.startswith("ephemeral-") else kid


def log_step(event: WorkflowEvent) -> None:
    """Log one line at INFO for a step that starts, is done, is retried, faults or is parked."""
    label = _STEP_LABELS.get(event.kind)
    if label is None:
        return
    if event.kind == "step_failed" and (event.detail or "").startswith(INTERRUPTED):
        label = "stopped"  # a cancel or the deadline stopped it while it ran: it did not fault
    text = f"[{(event.correlation_id or '?')[:8]}] {label:<7} step {event.step} {event.activity}"
    text += f" attempt {event.attempt + 1}"
    if event.duration is not None:
        text += f" in {event.duration:.3f}s"
    if event.detail:
        text += f": {event.detail}"
    logger.info("%s", escape_control(text))


async def run_dispatch(activities: Sequence[str], variables: str, transport: str | None = None) -> int:
    """Dispatch a workflow and print its correlation ID."""
    from .dispatch import WorkflowDispatcher

    try:
        parsed = json.loads(variables)
    except json.JSONDecodeError as exc:
        raise UserError(f"--variables is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UserError("--variables must be a JSON object")
    if (transport or Settings.from_env().transport).strip().lower() in IN_MEMORY_NAMES:
        raise UserError(
            "an in-memory workflow dies with this command's process: dispatch on sqlite, rabbitmq or redis "
            "(--transport or PAIGEANT_TRANSPORT)"
        )
    async with _cli_workflows.command_transport(transport) as connected, WorkflowDispatcher(connected) as dispatcher:
        correlation_id = await dispatcher.dispatch_workflow(list(activities), parsed)
    print(correlation_id)
    return 0


# -- the command line --------------------------------------------------------------------------------------------


def _connection_options(*, in_subcommand: bool) -> argparse.ArgumentParser:
    """The options every command that talks to a broker takes, before or after its name.

    After the name they default to nothing at all, so that they never undo the same option given before it.
    """
    options = argparse.ArgumentParser(add_help=False)
    unset = argparse.SUPPRESS if in_subcommand else None
    group = options.add_argument_group("broker")
    group.add_argument(
        "--transport", default=unset, help="inmemory, rabbitmq, redis or sqlite (default PAIGEANT_TRANSPORT)"
    )
    group.add_argument(
        "-b",
        "--broker-url",
        default=unset,
        metavar="URL",
        help="redis://... or amqp://... (default PAIGEANT_REDIS_URL / PAIGEANT_RABBITMQ_URL); implies --transport",
    )
    group.add_argument("--namespace", default=unset, help="prefix of queues, streams and keys (PAIGEANT_NAMESPACE)")
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS if in_subcommand else False,
        help="log paigeant's INFO lines (a worker logs each step)",
    )
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paigeant",
        description="Durable routing-slip workflows for pydantic-ai.",
        parents=[_connection_options(in_subcommand=False)],
    )
    parser.add_argument("--version", action="version", version=f"paigeant {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = [_connection_options(in_subcommand=True)]

    worker = commands.add_parser(
        "worker", parents=common, help="run a Worker as its own process (SIGTERM stops it gracefully)"
    )
    worker.add_argument("target", help="module:attribute of a Worker, or of a function that returns one")
    worker.add_argument("--burst", action="store_true", help="stop once the worker's queues are empty")
    worker.add_argument("--concurrency", type=int, help="steps run at once (default PAIGEANT_CONCURRENCY or 10)")
    worker.add_argument(
        "--processes",
        type=int,
        help="worker processes run side by side under one supervisor (default PAIGEANT_PROCESSES or 1)",
    )
    worker.add_argument("--prefork-child", help=argparse.SUPPRESS)  # set by the supervisor on its children

    dispatch = commands.add_parser("dispatch", parents=common, help="start a workflow and print its correlation ID")
    dispatch.add_argument("activities", nargs="+", help="activity names, in order")
    dispatch.add_argument("--variables", default="{}", help="the initial payload as a JSON object")

    _cli_workflows.add_commands(commands, common)  # status, workflows
    _cli_cancel.add_command(commands, common)
    _cli_activities.add_command(commands, common)
    _cli_resume.add_command(commands, common)
    _cli_dead_letters.add_command(commands, common)
    _cli_console.add_command(commands, common)
    _cli_keys.add_commands(commands)  # keys generate
    _cli_evals.add_command(commands, common)  # evals record, evals run
    return parser


def _settings_from(args: argparse.Namespace) -> dict[str, str]:
    """The `PAIGEANT_*` settings the connection options stand for."""
    settings: dict[str, str] = {}
    transport: str | None = None
    if args.transport is not None:
        transport = args.transport.strip().lower()
        transport = "inmemory" if transport in IN_MEMORY_NAMES else transport
        if transport not in ("inmemory", "sqlite", *_URL_SETTINGS):
            raise UserError(f"unknown --transport {args.transport!r}; use inmemory, rabbitmq, redis or sqlite")
    if args.broker_url is not None:
        by_scheme = _URL_SCHEMES.get(urlsplit(args.broker_url).scheme.lower())
        if by_scheme is None:
            raise UserError(f"--broker-url {redact_url(args.broker_url)!r} is neither a redis:// nor an amqp:// URL")
        if transport not in (None, by_scheme):
            raise UserError(f"--broker-url is a {by_scheme} URL but --transport is {transport}; drop one of them")
        transport = by_scheme
        settings[_URL_SETTINGS[by_scheme]] = args.broker_url
    if transport is not None:
        settings["PAIGEANT_TRANSPORT"] = transport
    if args.namespace is not None:
        if not args.namespace.strip():
            raise UserError("--namespace must not be empty")
        settings["PAIGEANT_NAMESPACE"] = args.namespace
    return settings


@contextmanager
def _environment(settings: dict[str, str]) -> Generator[None]:
    """Set `settings` in the environment for the command's run, and put back what was there."""
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _logging(*, verbose: bool, quiet: Sequence[str], tag: str = "") -> Generator[None]:
    """paigeant's own logs at INFO with `-v` (WARNING without); the loggers named in `quiet` silenced; `tag` in
    each line (which of the processes of `--processes N` logs it)."""
    logging.basicConfig(format=f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")
    levels = dict.fromkeys(quiet, logging.CRITICAL) | {"paigeant_ai": logging.INFO if verbose else logging.WARNING}
    saved = {name: logging.getLogger(name).level for name in levels}
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _run_worker_command(args: argparse.Namespace, settings: dict[str, str]) -> int:
    """`paigeant worker`: in this process, as a supervisor of `--processes N`, or as one of its children."""
    names = {"transport": "PAIGEANT_TRANSPORT", "namespace": "PAIGEANT_NAMESPACE"}
    expected = {key: settings[name] for key, name in names.items() if name in settings}
    worker = partial(
        run_worker, args.target, burst=args.burst, concurrency=args.concurrency, verbose=args.verbose, expected=expected
    )
    if args.prefork_child is not None:
        link = SupervisorLink.from_option(args.prefork_child)
        return run_as_child(link, lambda: asyncio.run(worker(child=link)))
    processes = process_count(args.processes)
    if processes == 1:
        return asyncio.run(worker())
    if expected.get("transport") == "inmemory":
        raise UserError(in_memory_refusal(processes))
    options = [f"--{key}={value}" for key, value in expected.items()]  # each child refuses what this one would
    if args.concurrency is not None:
        options.append(f"--concurrency={args.concurrency}")
    options += ["--burst"] * args.burst + ["--verbose"] * args.verbose
    return asyncio.run(Supervisor(child_command(args.target, options), processes, args.target).run())


def _run(args: argparse.Namespace, settings: dict[str, str]) -> int:
    if args.command == "worker":
        return _run_worker_command(args, settings)
    if args.command == "dispatch":
        return asyncio.run(run_dispatch(args.activities, args.variables))
    if args.command in _cli_workflows.COMMANDS:
        return asyncio.run(_cli_workflows.run_command(args))
    if args.command == "cancel":
        return asyncio.run(_cli_cancel.run_command(args))
    if args.command == "activities":
        return asyncio.run(_cli_activities.run_command(args))
    if args.command == "resume":
        return asyncio.run(_cli_resume.run_command(args))
    if args.command == "dead-letters":
        return asyncio.run(_cli_dead_letters.run_command(args))
    if args.command == "evals":
        return asyncio.run(_cli_evals.run_command(args))
    if args.command == "console":
        return asyncio.run(_cli_console.run_command(args))
    return _cli_keys.run_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `paigeant` command."""
    args = _parser().parse_args(argv)
    # A one-shot command reports a broker it cannot reach in one line; the client's own log would repeat it.
    quiet = () if args.command == "worker" else ("aiormq", "aio_pika")
    child: str | None = getattr(args, "prefork_child", None)
    tag = f" [worker {child.partition(':')[0]}]" if child else ""  # as `ChildSlot.label` says it
    try:
        settings = _settings_from(args)
        with _logging(verbose=args.verbose, quiet=quiet, tag=tag), _environment(settings):
            return _run(args, settings)
    except PaigeantError as exc:
        print(f"paigeant: {escape_control(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paigeant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
