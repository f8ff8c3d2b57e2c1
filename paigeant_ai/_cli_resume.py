"""`paigeant resume ID --ran OUTPUT_JSON | --run-again | --budget NAME=AMOUNT...`: settle a workflow parked
`in_doubt`, or grant one parked `budget_exhausted` more budget (see `paigeant_ai._budget_resume`).

An at-most-once step that a crash left started and not finished waits for a person to say whether it ran (see
`paigeant_ai._at_most_once`). The command signs that decision with this process's key (`PAIGEANT_SIGNING_KEY`),
which the workers must trust and the trust policy must let `approve`, through `WorkflowDispatcher.resume`. The
parked record is read from the store the workers park in: the transport's own on Redis, the shared store
(`PAIGEANT_SHARED_STORE_URL`) on RabbitMQ.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from ._budget_resume import describe_amounts
from ._cli_cancel import _kid, _token  # pyright: ignore[reportPrivateUsage]
from ._cli_workflows import command_transport
from ._escape import escape_control
from ._in_doubt import Ran, RunAgain
from ._shared_store import resolve_shared_store
from .contracts import Budget
from .dispatch import WorkflowDispatcher
from .exceptions import UserError
from .security import MessageSigner
from .settings import Settings
from .transports import IN_MEMORY_NAMES

__all__ = ("add_command", "run_command")


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add `resume` to the `paigeant` parser; `common` holds the options every broker command takes."""
    resume = commands.add_parser(
        "resume",
        parents=list(common),
        help="settle a workflow in doubt: say whether its at-most-once step ran (--ran) or must run (--run-again); "
        "or add to the budget of a workflow whose budget is spent (--budget tokens=5000)",
    )
    resume.add_argument("correlation_id", help="the workflow's correlation ID")
    answer = resume.add_mutually_exclusive_group(required=True)
    answer.add_argument("--ran", metavar="OUTPUT_JSON", help="the step ran: it completes with this output (JSON)")
    answer.add_argument("--run-again", action="store_true", help="the step did not run: run it now")
    answer.add_argument(
        "--budget",
        nargs="+",
        metavar="NAME=AMOUNT",
        help="add to a spent budget's limits: tokens, requests, tool_calls, cost, wall_time (seconds)",
    )
    resume.add_argument("--by", help="who decides, for the audit trail (default: the kid of this process's key)")
    resume.add_argument(
        "--token-file", metavar="FILE", help="a fresh token of the workflow's user, when it ran with one; - for stdin"
    )


async def run_command(args: argparse.Namespace) -> int:
    """Run `paigeant resume`; the exit code."""
    settings = Settings.from_env()
    chosen = (args.transport or settings.transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "an in-memory workflow lives in the process that dispatched it: resume it there (WorkflowDispatcher.resume)"
        )
    budget = _budget(args.budget) if args.budget else None
    answer = None if budget is not None else RunAgain() if args.run_again else Ran(_output(args.ran))
    token = _token(args.token_file)
    async with command_transport(chosen) as transport:
        signer = MessageSigner.from_settings(transport)
        if signer.refusal is not None:  # the workers act only on a decision signed by a key they trust
            raise UserError(signer.refusal)
        shared, connection = resolve_shared_store(transport, None, settings)
        if shared is None:
            raise UserError(
                f"workflows in doubt on {transport.name} are parked in the workers' shared store: set "
                "PAIGEANT_SHARED_STORE_URL=redis://... as the workers have it"
            )
        if connection is not None:
            await connection.connect()
        try:
            by = args.by or _kid(signer) or "an unnamed operator"
            async with WorkflowDispatcher(transport, security=signer, waiting_store=shared.waiting_store()) as sender:
                await sender.resume(args.correlation_id, in_doubt=answer, budget=budget, approver=by, obo_token=token)
        finally:
            if connection is not None:
                await connection.disconnect()
    if budget is not None:
        said = f"its budget extended ({describe_amounts(budget)}) by {by}"
    else:
        said = f"its in-doubt step {'declared run' if isinstance(answer, Ran) else 'sent to run again'} by {by}"
    print(escape_control(f"resumed {args.correlation_id}: {said}"))
    return 0


def _budget(pairs: Sequence[str]) -> Budget:
    """`--budget tokens=5000 cost=0.5` as the `Budget` of the amounts to add."""
    amounts: dict[str, float] = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        name = name.strip().replace("-", "_")
        if name not in _AMOUNTS:
            raise UserError(f"--budget takes NAME=AMOUNT with NAME one of {', '.join(_AMOUNTS)}, not {pair!r}")
        try:
            amount = float(text)
        except ValueError:
            amount = math.nan
        if not math.isfinite(amount) or amount <= 0 or (_AMOUNTS[name] is int and not amount.is_integer()):
            kind = "a positive whole number" if _AMOUNTS[name] is int else "a positive number"
            raise UserError(f"--budget {name}= takes {kind}, not {text!r}")
        amounts[name] = amount
    return Budget.model_validate({name: _AMOUNTS[name](amount) for name, amount in amounts.items()})


_AMOUNTS: dict[str, type[int] | type[float]] = {
    "tokens": int,
    "requests": int,
    "tool_calls": int,
    "cost": float,
    "wall_time": float,
}


def _output(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f'--ran takes the step\'s output as JSON (e.g. \'{{"charge_id": "ch_1"}}\'): {exc}') from None
