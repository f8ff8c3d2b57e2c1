"""A shop on one SQLite file, for the console's tests: a real worker, a dispatcher, and the console over them.

Workflows: an order that completes (`take-order`, `pack`, `ship`), one whose payment is declined (it faults), one
whose carrier is down (it faults, and its dead letter is replayed once the carrier is back), and support tickets whose
agent asks a person before it refunds (approve, deny, edit).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_ai import Agent, FunctionToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from paigeant_ai import (
    ActivityContext,
    AgentActivity,
    MessageSigner,
    NonRetryableError,
    TokenValidator,
    TrustPolicy,
    Worker,
    WorkflowDispatcher,
    activity,
)
from paigeant_ai.console import Console, Users
from paigeant_ai.security import generate_key
from paigeant_ai.transports.sqlite import SQLiteTransport

PASSWORD = "correct horse battery"


@dataclass
class Shop:
    """What the steps did, and the switch that brings the carrier back."""

    carrier_down: bool = True
    pack_seconds: float = 0.0
    calls_asked: int = 1
    """How many refunds the support agent asks for at once (`r1`, `r2`, ...)."""
    refunds: list[dict[str, Any]] = field(default_factory=list[dict[str, Any]])


def support_model(shop: Shop) -> FunctionModel:
    """The support agent: asks to refund the ticket's amount, then says what became of it."""

    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]
        if returns:
            return ModelResponse(parts=[TextPart(f"Dear customer: {returns[-1].model_response_str()}")])
        because = TextPart("The customer was charged twice for one order: I refund the second charge.")
        calls = [
            ToolCallPart("refund", {"ticket": "T-1042", "amount": 40 - 10 * index}, tool_call_id=f"r{index + 1}")
            for index in range(shop.calls_asked)
        ]
        return ModelResponse(parts=[because, *calls])

    return FunctionModel(reply, model_name="support-test")


def activities(shop: Shop) -> list[Any]:
    @activity(name="take-order")
    async def take_order(ctx: ActivityContext) -> dict[str, Any]:
        return {"order": "ord-7", "api_key": "sk-live-do-not-show"}

    @activity(name="pack")
    async def pack(ctx: ActivityContext) -> dict[str, bool]:
        await asyncio.sleep(shop.pack_seconds)
        return {"packed": True}

    @activity(name="ship")
    async def ship(ctx: ActivityContext) -> dict[str, str]:
        if shop.carrier_down:
            raise NonRetryableError("the carrier's booking service is down")
        return {"tracking": "TRK-555"}

    @activity(name="charge")
    async def charge(ctx: ActivityContext) -> None:
        raise NonRetryableError("the card was declined (insufficient funds)")

    tools = FunctionToolset[Any](id="support")

    @tools.tool_plain(requires_approval=True)
    def refund(ticket: str, amount: int) -> str:
        """Refund a customer."""
        shop.refunds.append({"ticket": ticket, "amount": amount})
        return f"refunded {amount} EUR on {ticket}"

    agent = Agent(support_model(shop), name="answer-ticket", toolsets=[tools])
    return [take_order, pack, ship, charge, AgentActivity(agent, prompt="Help with: {ticket}", output_key="reply")]


@dataclass
class World:
    transport: SQLiteTransport
    signer: MessageSigner
    dispatcher: WorkflowDispatcher
    console: Console
    shop: Shop

    async def order(self, *steps: str) -> str:
        return await self.dispatcher.dispatch_workflow(list(steps), {"customer": "c-1", "password": "hunter2"})

    async def ticket(self) -> str:
        return await self.dispatcher.dispatch_workflow(["answer-ticket"], {"ticket": "charged twice for one order"})


@asynccontextmanager
async def world(
    tmp_path: Path, *, policy: TrustPolicy | None = None, tokens: TokenValidator | None = None
) -> AsyncGenerator[World]:
    """A shop on `tmp_path`'s SQLite file with its worker running, and a console over it (not yet served).

    The users file holds `ana` (may approve and replay) and `bob` (may only look), both with `PASSWORD`. Every
    part signs with the key `shop-console`, which `policy` (by default none: every trusted key may do everything)
    governs.
    """
    key = generate_key("shop-console")
    users = Users(tmp_path / "users.json")
    users.add("ana", PASSWORD, ["approve", "replay"])
    users.add("bob", PASSWORD, [])
    shop = Shop()
    async with SQLiteTransport(tmp_path / "shop.db", poll_interval=0.05) as transport:
        signer = MessageSigner(key, [key], replay_cache=transport.replay_cache(), policy=policy, tokens=tokens)
        waiting = transport.waiting_store()
        dispatcher = WorkflowDispatcher(transport, security=signer, waiting_store=waiting)
        console = Console(
            transport,
            transport.workflow_store(),
            signer,
            waiting_store=waiting,
            users=users,
            tokens=tokens,
            trace_url="https://traces.example/search?q={correlation_id}",
        )
        worker = Worker(transport, activities(shop), security=signer, waiting_store=waiting)
        async with worker:
            yield World(transport, signer, dispatcher, console, shop)
