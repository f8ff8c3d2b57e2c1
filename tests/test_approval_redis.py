"""Parking and resuming over Redis: the transport, the waiting store and the replay cache all in Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic_ai import Agent, FunctionToolset

from paigeant_ai import (
    ActivitySpec,
    AgentActivity,
    PaigeantMessage,
    ParkedStep,
    Worker,
    WorkflowDispatcher,
    WorkflowEvent,
)
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports.redis import RedisReplayCache, RedisTransport, RedisWaitingStore

from .brokers import REDIS_URL, delete_redis_namespace, require_redis
from .scripted import Script
from .test_approval import SEND, answer

pytestmark = pytest.mark.redis


@pytest.fixture
async def transport() -> AsyncIterator[RedisTransport]:
    require_redis()
    namespace = f"paigeant-test-{uuid.uuid4().hex[:12]}"
    try:
        async with RedisTransport(REDIS_URL, namespace=namespace, poll_interval=0.05) as transport:
            yield transport
    finally:
        await delete_redis_namespace(namespace)


async def test_a_workflow_parked_in_redis_is_resumed_by_a_new_worker(transport: RedisTransport) -> None:
    sent: list[str] = []
    tools = FunctionToolset[Any](id="support")

    @tools.tool_plain(requires_approval=True)
    def send_reply(text: str) -> str:
        sent.append(text)
        return "sent"

    step = AgentActivity(Agent(Script([SEND, answer]).model, name="draft-reply", toolsets=[tools]), output_key="reply")
    key = generate_key("support-1")

    def signer() -> MessageSigner:
        return MessageSigner(key, replay_cache=RedisReplayCache(transport))

    store = RedisWaitingStore(transport)
    events: list[WorkflowEvent] = []
    dispatcher = WorkflowDispatcher(transport, security=signer(), waiting_store=store)
    correlation_id = await dispatcher.dispatch_workflow([step], {"ticket": "can't log in"})
    await Worker(transport, [step], security=signer(), waiting_store=store, on_event=events.append).run(burst=True)

    parked = await store.get(correlation_id)
    assert parked is not None
    assert [call.tool_name for call in parked.pending] == ["send_reply"]
    assert [p.correlation_id for p in await store.waiting()] == [correlation_id]

    await dispatcher.resume(correlation_id, approvals={"send-1": True}, approver="ana")
    restarted = Worker(transport, [step], security=signer(), waiting_store=store, on_event=events.append)
    await restarted.run(burst=True)

    assert sent == ["Your login works again."]
    completed = next(event for event in events if event.kind == "completed")
    assert completed.payload == {"ticket": "can't log in", "reply": "send_reply: sent"}
    assert await store.waiting() == []


async def test_removing_a_parking_keeps_a_newer_one(transport: RedisTransport) -> None:
    store = RedisWaitingStore(transport)
    message = PaigeantMessage.new([ActivitySpec(name="draft-reply")], {})
    older = ParkedStep(
        correlation_id=message.correlation_id,
        activity="draft-reply",
        step=0,
        message=message,
        conversation={},
    )
    newer = older.model_copy(update={"message": message.model_copy(update={"message_id": "resumed-hop"})})
    await store.put(older)
    await store.put(newer)

    assert await store.remove(older) is False
    assert [p.message.message_id for p in await store.waiting()] == ["resumed-hop"]
    assert await store.remove(newer) is True
    assert await store.get(message.correlation_id) is None
    assert await store.waiting() == []
