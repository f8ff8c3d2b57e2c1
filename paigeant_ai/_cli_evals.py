"""`paigeant evals record` and `paigeant evals run`: completed workflows to a pydantic-evals dataset, and that
dataset replayed against new versions of agents, exiting 1 on regressions so that a deploy can be gated on it.

`record` reads the workflow store of the transport (`--transport`, `PAIGEANT_TRANSPORT`): SQLite's file and Redis
keep their own; on RabbitMQ the store is on Redis (`--redis-url`). It first applies the events waiting on the
transport, checking their signatures with the `PAIGEANT_*` keys, as `paigeant status` does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic_ai.agent import AbstractAgent

from ._cli_workflows import REDIS_URL_HELP
from ._escape import escape_control
from .activity import AgentActivity
from .exceptions import UserError
from .settings import Settings
from .store import WorkflowStore
from .transports import IN_MEMORY_NAMES

if TYPE_CHECKING:
    from .evals import ReplayReport

__all__ = ("add_command", "run_command")


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add `evals record` and `evals run` to the `paigeant` parser."""
    evals = commands.add_parser("evals", help="record workflows as a dataset, replay it against a new agent")
    actions = evals.add_subparsers(dest="evals_command", required=True)
    record = actions.add_parser(
        "record", parents=list(common), help="turn completed workflows of the store into a pydantic-evals dataset"
    )
    record.add_argument("output", help="the dataset's file: .yaml or .json")
    record.add_argument("--activity", action="append", default=[], help="only this activity's steps (repeatable)")
    record.add_argument("--since", type=_moment, help="only workflows started at or after this ISO time")
    record.add_argument("--until", type=_moment, help="only workflows started before this ISO time")
    record.add_argument(
        "--state", action="append", default=[], help="only workflows in this final state (default completed)"
    )
    record.add_argument(
        "--redact", action="append", default=[], metavar="FIELD.PATH", help="a payload field to redact (repeatable)"
    )
    record.add_argument("--limit", type=int, default=1000, help="how many recent workflows to look at")
    record.add_argument("--name", default="recorded-workflows", help="the dataset's name")
    record.add_argument("--redis-url", help=REDIS_URL_HELP)

    run = actions.add_parser("run", help="replay a recorded dataset against new versions of its agents")
    run.add_argument("dataset", help="a file `paigeant evals record` wrote")
    run.add_argument(
        "--activity",
        action="append",
        default=[],
        required=True,
        metavar="NAME=MODULE:AGENT",
        help="the candidate for an activity: an Agent or AgentActivity (repeatable)",
    )
    run.add_argument("--max-regressions", type=int, default=0, help="regressed cases allowed before exiting 1")
    run.add_argument("--judge", metavar="MODEL", help="also grade each output with an LLMJudge on this real model")
    run.add_argument(
        "--logfire",
        action="store_true",
        help="configure Logfire (LOGFIRE_TOKEN) so that the results reach its evals view",
    )


async def run_command(args: argparse.Namespace) -> int:
    """Run `evals record` or `evals run`; the exit code."""
    try:
        from . import evals
    except ImportError as exc:
        raise UserError(str(exc)) from exc
    if args.evals_command == "record":
        return await _record(args)
    if args.max_regressions < 0:
        raise UserError(f"--max-regressions must be 0 or more, got {args.max_regressions}")
    if args.logfire:
        _configure_logfire()
    candidates = dict(_candidate(spec) for spec in args.activity)
    dataset = evals.load_dataset(args.dataset)
    report = await evals.replay_dataset(dataset, candidates, judge=args.judge)
    return _verdict(report, args.max_regressions)


async def _record(args: argparse.Namespace) -> int:
    from .evals import record_dataset

    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    async with _store(args) as store:
        dataset = await record_dataset(
            store,
            name=args.name,
            activities=args.activity,
            since=args.since,
            until=args.until,
            states=args.state or ["completed"],
            redact=args.redact,
            limit=args.limit,
        )
    dataset.to_file(args.output)
    steps = sum(1 for case in dataset.cases if case.inputs.kind == "step")
    print(f"recorded {steps} steps of {len(dataset.cases) - steps} workflows to {escape_control(args.output)}")
    return 0


@asynccontextmanager
async def _store(args: argparse.Namespace) -> AsyncGenerator[WorkflowStore]:
    """The transport's workflow store, up to date with the events waiting on the transport."""
    from ._cli_workflows import command_store, command_transport, sync_store

    chosen = (args.transport or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "in-memory workflows live in the process that ran them: record them there "
            "(paigeant_ai.evals.record_dataset), or choose --transport sqlite, redis or rabbitmq"
        )
    async with command_transport(chosen) as transport, command_store(transport, args.redis_url) as store:
        await sync_store(store, transport)
        yield store


def _candidate(spec: str) -> tuple[str, Any]:
    """`NAME=module:attribute` as the activity's name and the candidate it names."""
    from .cli import load_object

    name, sep, target = spec.partition("=")
    if not sep or not name or not target:
        raise UserError(f"--activity takes NAME=module:agent, got {spec!r}")
    candidate = load_object(target)
    if not isinstance(candidate, AbstractAgent | AgentActivity):
        raise UserError(f"{target} is a {type(candidate).__name__}: name an Agent or an AgentActivity")
    return name, candidate


def _configure_logfire() -> None:
    """Send this process's spans to Logfire when a token is set (`LOGFIRE_TOKEN`); an application's call to make."""
    try:
        import logfire
    except ImportError as exc:
        raise UserError(f'--logfire needs the logfire extra: pip install "paigeant-ai[logfire]" ({exc})') from exc
    logfire.configure(service_name="paigeant-evals", send_to_logfire="if-token-present", console=False)


def _verdict(report: ReplayReport, allowed: int) -> int:
    print(report.render())
    regressed = len(report.regressions)
    if regressed > allowed:
        print(f"FAIL: {regressed} regressions, {allowed} allowed", file=sys.stderr)
        return 1
    return 0


def _moment(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO time: {text!r} (for example 2026-05-01T00:00+00:00)") from None
