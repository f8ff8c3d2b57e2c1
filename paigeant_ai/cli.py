"""The `paigeant` command: run a worker as its own process, dispatch a workflow, see where workflows are."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _cli_keys, _cli_workflows
from .exceptions import PaigeantError, UserError
from .settings import Settings
from .transports import IN_MEMORY_NAMES, get_transport
from .worker import Worker

__all__ = ("main",)


def load_object(target: str) -> Any:
    """Import `module:attribute` (or `path/to/file.py:attribute`)."""
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise UserError(f"expected module:attribute, got {target!r} (for example examples.onboarding:worker)")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot import {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UserError(f"{module_name!r} has no attribute {attribute!r}") from None
    return obj


async def _resolve_worker(target: str) -> Worker:
    obj = load_object(target)
    if callable(obj) and not isinstance(obj, Worker):
        obj = obj()
        if inspect.isawaitable(obj):
            obj = await obj
    if not isinstance(obj, Worker):
        raise UserError(f"{target} is {type(obj).__name__}, not a Worker (or a function returning one)")
    return obj


async def run_worker(target: str, *, burst: bool = False, concurrency: int | None = None) -> int:
    """Run the worker at `target` until SIGTERM/SIGINT (graceful) or, with `burst`, until its queues are empty."""
    worker = await _resolve_worker(target)
    if concurrency is not None:
        worker.concurrency = concurrency
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    names = ", ".join(worker.activities)
    logging.getLogger("paigeant_ai").info("worker for %s on %s started", names, worker.transport.name)
    await worker.transport.connect()
    try:
        await worker.run(burst=burst)
    finally:
        await worker.transport.disconnect()
    stats = worker.stats
    print(
        f"worker stopped: {stats.completed_steps} steps completed, {stats.retried} retried, "
        f"{stats.faulted} faulted, {stats.rejected} rejected, {stats.duplicates} duplicates skipped",
        file=sys.stderr,
    )
    return 0


async def run_dispatch(activities: Sequence[str], variables: str, transport: str | None) -> int:
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
            "an in-memory workflow dies with this command's process: dispatch on rabbitmq or redis "
            "(--transport or PAIGEANT_TRANSPORT)"
        )
    async with get_transport(transport) as connected:
        correlation_id = await WorkflowDispatcher(connected).dispatch_workflow(list(activities), parsed)
    print(correlation_id)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paigeant", description="Durable routing-slip workflows for pydantic-ai.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run a Worker as its own process (SIGTERM stops it gracefully)")
    worker.add_argument("target", help="module:attribute of a Worker, or of a function that returns one")
    worker.add_argument("--burst", action="store_true", help="stop once the worker's queues are empty")
    worker.add_argument("--concurrency", type=int, help="steps run at once (default PAIGEANT_CONCURRENCY or 10)")

    dispatch = commands.add_parser("dispatch", help="start a workflow and print its correlation ID")
    dispatch.add_argument("activities", nargs="+", help="activity names, in order")
    dispatch.add_argument("--variables", default="{}", help="the initial payload as a JSON object")
    dispatch.add_argument("--transport", help="inmemory, rabbitmq or redis (default PAIGEANT_TRANSPORT)")

    _cli_workflows.add_commands(commands)  # status, workflows, dead-letters
    _cli_keys.add_commands(commands)  # keys generate
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `paigeant` command."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "worker":
            return asyncio.run(run_worker(args.target, burst=args.burst, concurrency=args.concurrency))
        if args.command == "dispatch":
            return asyncio.run(run_dispatch(args.activities, args.variables, args.transport))
        if args.command in _cli_workflows.COMMANDS:
            return asyncio.run(_cli_workflows.run_command(args))
        if args.command == "keys":
            return _cli_keys.run_command(args)
    except PaigeantError as exc:
        print(f"paigeant: {exc}", file=sys.stderr)
        return 2
    return 1  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
