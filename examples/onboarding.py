"""Customer onboarding as a four-step durable workflow, run offline.

Shows: two pydantic-ai agents (`AgentActivity`, driven by `FunctionModel` so no API key is needed) and two plain
functions as steps; one step fails once and is retried; each step is printed as it happens, then the final payload.

Run it (in memory, one process):

    uv run python -m examples.onboarding

Durably, in one SQLite file (`./paigeant.sqlite3`), with no server to run (signed with a key kept beside the file,
unless `PAIGEANT_SIGNING_KEY_FILE` names one). Stop it mid-run (`--pause 3` makes each plain step take 3 s: time to
press Ctrl-C or `kill -9` it), start it again, and the same workflow finishes where it stopped:

    uv run python -m examples.onboarding --transport sqlite --pause 3
    uv run python -m examples.onboarding --transport sqlite

On RabbitMQ, Redis or SQLite, each step can run in its own process (see the README):

    PAIGEANT_TRANSPORT=rabbitmq uv run paigeant worker examples.onboarding:validate_worker
    PAIGEANT_TRANSPORT=rabbitmq uv run python -m examples.onboarding --dispatch-only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path

from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    NonRetryableError,
    RetryActivity,
    RetryPolicy,
    UserError,
    Worker,
    WorkflowDispatcher,
    activity,
    get_transport,
)
from paigeant_ai.security import MessageSigner, generate_key, load_signing_key
from paigeant_ai.settings import Settings
from paigeant_ai.transports import Transport
from paigeant_ai.transports.sqlite import SQLiteTransport

from ._progress import show

# -- the agents (scripted models stand in for a real LLM) ----------------------------------------------------


class CustomerCheck(BaseModel):
    valid: bool
    risk: str
    notes: str


def _last_prompt(messages: list[ModelMessage]) -> str:
    for message in reversed(messages):
        for part in message.parts:
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                return part.content
    return ""


def _review_customer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = _last_prompt(messages)
    valid = "@" in prompt and "example.invalid" not in prompt
    check = {"valid": valid, "risk": "low" if valid else "high", "notes": "email format and domain checked"}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, check)])


def _write_welcome(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = _last_prompt(messages)
    tier = "premium" if "premium" in prompt else "standard"
    return ModelResponse(parts=[TextPart(f"Welcome aboard! Your {tier} account is ready.")])


validator_agent = Agent(
    FunctionModel(_review_customer),
    name="validate-customer-data",
    output_type=CustomerCheck,
    instructions="Check that the customer's data is complete and plausible.",
)
welcome_agent = Agent(
    FunctionModel(_write_welcome),
    name="send-welcome-email",
    instructions="Write a short welcome email.",
)

# -- the steps -----------------------------------------------------------------------------------------------

validate = AgentActivity(
    validator_agent,
    prompt="Validate this customer: email {customer_email}, tier {subscription_tier}.",
    output_key="validation",
)


@activity(name="create-customer-account", after=["validate-customer-data"], max_per_plan=1)
async def create_account(ctx: ActivityContext) -> dict[str, str]:
    """Create the customer's account once the data is valid."""
    await _pause(ctx)
    validation = ctx.payload.get("validation")
    if not isinstance(validation, dict) or not validation.get("valid"):
        raise NonRetryableError("customer data did not pass validation")
    # The idempotency key is the same on every retry and redelivery: a real system passes it to its database.
    return {"account_id": "acct-" + ctx.idempotency_key.split(":")[0][:8]}


@activity(
    name="setup-payment-method",
    retry=RetryPolicy(max_attempts=3, initial_interval=0.2),
    after=["create-customer-account"],  # a payment method belongs to an account
    max_per_plan=1,
)
async def setup_payment(ctx: ActivityContext) -> dict[str, str]:
    """Attach a payment method; the payment provider is flaky on the first try."""
    await _pause(ctx)
    if ctx.attempt == 0:
        raise RetryActivity("payment provider timed out")
    return {"payment_method": f"card-on-file for {ctx.payload['account_id']}"}


async def _pause(ctx: ActivityContext) -> None:
    """Wait the workflow's `pause_seconds` (`--pause`): time to stop the run mid-step and start it again."""
    seconds = ctx.payload.get("pause_seconds")
    if isinstance(seconds, int | float):
        await asyncio.sleep(seconds)


send_welcome = AgentActivity(
    welcome_agent,
    prompt="Write a welcome email for {customer_email} on the {subscription_tier} tier.",
    output_key="welcome_email",
)

ONBOARDING = [validate, create_account, setup_payment, send_welcome]

# -- workers: one for everything, or one per step for separate processes -------------------------------------

transport = get_transport()
worker = Worker(transport, ONBOARDING, on_event=show)
validate_worker = Worker(transport, [validate], on_event=show)
account_worker = Worker(transport, [create_account], on_event=show)
payment_worker = Worker(transport, [setup_payment], on_event=show)
welcome_worker = Worker(transport, [send_welcome], on_event=show)


def key_for_this_run(chosen: Transport) -> MessageSigner | None:
    """A signer for this process's dispatcher and worker, when no keys are set; no other process can sign with it.

    On SQLite the key is kept beside the file (readable by its owner only), so a run stopped midway and started
    again verifies, and finishes, what the first run signed; elsewhere it is made for the run.
    """
    settings = Settings.from_env()
    if settings.signing_key or settings.signing_key_file or settings.allow_unsigned:
        return None
    if not isinstance(chosen, SQLiteTransport):
        return MessageSigner(generate_key("onboarding-example"))
    kept = chosen.path.with_name(chosen.path.name + ".onboarding-key.json")
    if not kept.exists():
        key = generate_key("onboarding-example")
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
                file.write(json.dumps(key.as_dict(private=True)))
        except OSError as exc:
            fix = "set PAIGEANT_SQLITE_PATH to a file in a folder you can write"
            raise UserError(f"cannot keep the example's key at {kept} ({exc.strerror}): {fix}") from exc
    if os.name == "posix" and kept.stat().st_mode & 0o077:
        raise SystemExit(f"{kept} may be read or written by others: delete it (a new key is made) or chmod 600 it")
    return MessageSigner(load_signing_key(Path(kept)))


async def in_flight(chosen: Transport, runner: Worker) -> int:
    """How many messages of earlier runs wait at the workflow's steps (a retry waiting its turn included)."""
    return sum([await chosen.pending(name) for name in runner.activities])


async def main(*, dispatch_only: bool = False, transport_name: str | None = None, pause: float = 0.0) -> str | None:
    """Dispatch one onboarding workflow; unless `dispatch_only`, run the steps here until it completes.

    On a durable transport that still holds the steps of an earlier run (stopped midway), nothing new is dispatched:
    the run finishes those instead, and returns None. `transport_name` picks another transport than
    `PAIGEANT_TRANSPORT` (`inmemory`, `sqlite`, `redis`, `rabbitmq`); `pause` makes each plain step wait that long.
    """
    chosen = get_transport(transport_name) if transport_name else transport
    security = None if chosen is transport or dispatch_only else key_for_this_run(chosen)
    runner = worker if chosen is transport else Worker(chosen, ONBOARDING, on_event=show, security=security)
    correlation_id: str | None = None
    async with chosen:
        left = 0 if dispatch_only else await in_flight(chosen, runner)
        if left:
            print(f"resuming what an earlier run left unfinished on the {chosen.name} transport; a step it was running")
            print("when it was killed comes back once that run's lease on it lapses (visibility_timeout, 30 s)")
        else:
            dispatcher = WorkflowDispatcher(chosen, security=security)
            correlation_id = await dispatcher.dispatch_workflow(
                activities=ONBOARDING,
                variables={
                    "customer_email": "new.customer@example.com",
                    "subscription_tier": "premium",
                    **({"pause_seconds": pause} if pause else {}),
                },
            )
            print(f"dispatched onboarding workflow {correlation_id} on the {chosen.name} transport")
        if not dispatch_only:
            await runner.run(burst=True)
    return correlation_id


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the customer-onboarding workflow.")
    parser.add_argument("--dispatch-only", action="store_true", help="dispatch, and leave the steps to workers")
    parser.add_argument("--transport", help="inmemory, sqlite, redis or rabbitmq (default PAIGEANT_TRANSPORT)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each plain step waits (time to stop it)")
    args = parser.parse_args()
    try:
        asyncio.run(main(dispatch_only=args.dispatch_only, transport_name=args.transport, pause=args.pause))
    except UserError as exc:  # a setting to fix (a transport's name, its file): one sentence, not a traceback
        raise SystemExit(f"onboarding: {exc}") from None
