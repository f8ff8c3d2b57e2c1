"""`get_waiting_store` and `get_workflow_store`: one module serves the in-memory transport, SQLite and Redis alike."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset

from paigeant_ai import (
    AgentActivity,
    InMemoryTransport,
    InMemoryWaitingStore,
    Transport,
    Worker,
    WorkflowDispatcher,
    get_waiting_store,
    get_workflow_store,
)
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.store import InMemoryWorkflowStore
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport, RedisWaitingStore, RedisWorkflowStore
from paigeant_ai.transports.sqlite import SQLiteTransport, SQLiteWaitingStore, SQLiteWorkflowStore

from .brokers import REDIS_URL, delete_redis_namespace, require_redis
from .scripted import Script
from .test_approval import SEND, answer


@pytest.fixture(params=["inmemory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def transport(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Transport]:
    if request.param == "inmemory":
        async with InMemoryTransport() as memory:
            yield memory
        return
    if request.param == "sqlite":
        async with SQLiteTransport(tmp_path / "paigeant.sqlite3", poll_interval=0.05) as sqlite:
            yield sqlite
        return
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace, poll_interval=0.05) as redis:
            yield redis
    finally:
        await delete_redis_namespace(namespace)


def approval_step(sent: list[str]) -> AgentActivity[Any, Any]:
    tools = FunctionToolset[Any](id="support")

    @tools.tool_plain(requires_approval=True)
    def send_reply(text: str) -> str:
        sent.append(text)
        return "sent"

    return AgentActivity(Agent(Script([SEND, answer]).model, name="draft-reply", toolsets=[tools]), output_key="reply")


async def test_the_stores_that_fit_the_transport_park_resume_and_report_a_workflow(transport: Transport) -> None:
    sent: list[str] = []
    step = approval_step(sent)
    key = generate_key("support-1")

    def signer() -> MessageSigner:
        replay = RedisReplayCache(transport) if isinstance(transport, RedisTransport) else None
        if isinstance(transport, SQLiteTransport):
            replay = transport.replay_cache()
        return MessageSigner(key, replay_cache=replay)

    # What an application module writes once, whatever PAIGEANT_TRANSPORT says.
    waiting = get_waiting_store(transport)
    store = get_workflow_store(transport)
    dispatcher = WorkflowDispatcher(transport, security=signer(), waiting_store=waiting, on_event=store.apply)

    def worker() -> Worker:
        return Worker(transport, [step], security=signer(), waiting_store=waiting, on_event=store.apply)

    correlation_id = await dispatcher.dispatch_workflow([step], {"ticket": "can't log in"})
    await worker().run(burst=True)
    waiting_status = await store.get(correlation_id)
    assert waiting_status is not None
    assert waiting_status.state == "waiting"

    await dispatcher.resume(correlation_id, approvals={"send-1": True}, approver="ana")
    await worker().run(burst=True)

    completed = await store.get(correlation_id)
    assert completed is not None
    assert (completed.state, completed.payload) == (
        "completed",
        {"ticket": "can't log in", "reply": "send_reply: sent"},
    )
    assert sent == ["Your login works again."]


async def test_each_transport_gets_its_own_kind_of_store(transport: Transport) -> None:
    waiting, store = get_waiting_store(transport), get_workflow_store(transport)
    if isinstance(transport, RedisTransport):
        assert isinstance(waiting, RedisWaitingStore)
        assert isinstance(store, RedisWorkflowStore)
        assert (waiting.transport, store.transport) == (transport, transport)  # its connection and namespace
    elif isinstance(transport, SQLiteTransport):
        assert isinstance(waiting, SQLiteWaitingStore)
        assert isinstance(store, SQLiteWorkflowStore)
        assert (waiting.transport, store.transport) == (transport, transport)  # its file and namespace
    else:
        assert isinstance(waiting, InMemoryWaitingStore)
        assert isinstance(store, InMemoryWorkflowStore)
