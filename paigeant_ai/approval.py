"""Steps that wait for a person: parking a workflow on deferred tool calls, and resuming it with the answers.

When an `AgentActivity`'s agent ends its run with pydantic-ai's `DeferredToolRequests` (a tool that requires
approval, or one that raised `CallDeferred`), the step raises `ParkWorkflow`. The worker stores a `ParkedStep`
(the message as it arrived, the agent's conversation and what it waits for) in a `WaitingStore` and acks the
message: nothing runs until `WorkflowDispatcher.resume` publishes the same step again with the answers (and removes
the record), and the agent continues its conversation where it stopped.

Everything stored is JSON made with pydantic-ai's own type adapters, never pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter
from pydantic_ai import Conversation, ConversationTypeAdapter, DeferredToolRequests, DeferredToolResults
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolApproved, ToolDenied
from pydantic_core import to_jsonable_python

from .contracts import PaigeantMessage, Resumption, derive_message_id
from .exceptions import ParkWorkflow, UserError
from .transports.base import SharedStores, Transport

__all__ = (
    "InMemoryWaitingStore",
    "ParkWorkflow",
    "ParkedStep",
    "PendingToolCall",
    "WaitingStore",
    "get_waiting_store",
)

_RESULTS: TypeAdapter[DeferredToolResults] = TypeAdapter(DeferredToolResults)
_JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])

ApprovalAnswer = bool | ToolApproved | ToolDenied


class PendingToolCall(BaseModel):
    """One tool call a parked step waits for: an approval, or a result from outside."""

    model_config = ConfigDict(frozen=True)

    tool_call_id: str
    tool_name: str
    args: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    kind: Literal["approval", "call"]
    """`approval`: a person approves or denies it; `call`: its result comes from outside."""
    metadata: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])


class ParkedStep(BaseModel):
    """A workflow waiting at one step, as a `WaitingStore` keeps it.

    Attributes:
        message: The step's message as the worker received it (with any route revisions the step made).
        conversation: The agent's conversation so far, as `ConversationTypeAdapter` JSON.
        pending: What the step waits for, readable without pydantic-ai.
    """

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    correlation_id: str
    activity: str
    step: int
    parked_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    message: PaigeantMessage
    conversation: dict[str, JsonValue]
    pending: list[PendingToolCall]

    @classmethod
    def from_signal(cls, message: PaigeantMessage, signal: ParkWorkflow) -> ParkedStep:
        """The record of `message` parked on `signal`."""
        return cls(
            correlation_id=message.correlation_id,
            activity=message.routing_slip.current or "",
            step=message.step,
            message=message.model_copy(deep=True),
            conversation=_JSON_OBJECT.validate_python(
                ConversationTypeAdapter.dump_python(signal.conversation, mode="json")
            ),
            pending=_pending(signal.requests),
        )

    @property
    def requests(self) -> DeferredToolRequests:
        """The pending requests as pydantic-ai's `DeferredToolRequests`."""
        requests = ConversationTypeAdapter.validate_python(self.conversation).deferred_tool_requests
        return requests or DeferredToolRequests()

    def build_results(
        self,
        results: DeferredToolResults | None = None,
        *,
        approvals: Mapping[str, ApprovalAnswer] | None = None,
        calls: Mapping[str, Any] | None = None,
        approve_all: bool = False,
    ) -> DeferredToolResults:
        """The answers to every pending call, checked against what is pending.

        Raises:
            UserError: An answer names a call that is not pending, or a pending call has no answer.
        """
        requests = self.requests
        answers = DeferredToolResults(approvals=dict(approvals or {}), calls=dict(calls or {}))
        if results is not None:
            answers.update(results)
        try:
            built = requests.build_results(
                approvals=answers.approvals, calls=answers.calls, metadata=answers.metadata, approve_all=approve_all
            )
        except ValueError as exc:
            raise UserError(f"cannot resume workflow {self.correlation_id}: {exc}") from None
        missing = [call for call in self.pending if call.tool_call_id not in {*built.approvals, *built.calls}]
        if missing:
            needed = ", ".join(f"{call.tool_call_id} ({call.kind} of {call.tool_name})" for call in missing)
            raise UserError(f"cannot resume workflow {self.correlation_id}: no answer for {needed}")
        return built

    def resume_message(self, results: DeferredToolResults) -> PaigeantMessage:
        """The hop that continues the step with `results`: a new message id, the conversation and the answers."""
        count = self.message.resume.count + 1 if self.message.resume is not None else 1
        name = self.message.routing_slip.current
        hop = self.message.next_hop(attempt=self.message.attempt)
        hop.message_id = derive_message_id(self.correlation_id, self.step, f"{name}#resume-{count}", hop.attempt)
        hop.resume = Resumption(
            count=count,
            conversation=self.conversation,
            results=_JSON_OBJECT.validate_python(_RESULTS.dump_python(results, mode="json")),
        )
        return hop

    def describe(self) -> str:
        """One line: what the step waits for."""
        return "waiting for " + ", ".join(
            f"{call.kind} of {call.tool_name} ({call.tool_call_id})" for call in self.pending
        )


class WaitingStore(Protocol):
    """Where parked workflows wait, by correlation ID; shared by the workers that park and the dispatcher that resumes.

    It must outlive a worker: a parked workflow's message is already acked, so the store holds all that is left of it.
    """

    async def put(self, parked: ParkedStep) -> None:
        """Store `parked`, replacing what the workflow had stored before."""
        ...

    async def get(self, correlation_id: str) -> ParkedStep | None:
        """The parked step of a workflow, if it waits."""
        ...

    async def remove(self, parked: ParkedStep) -> bool:
        """Remove `parked`, unless the workflow has parked anew since (then its new record stays).

        Returns:
            Whether it was removed.
        """
        ...

    async def waiting(self) -> list[ParkedStep]:
        """Every parked workflow, oldest first."""
        ...


class InMemoryWaitingStore:
    """A `WaitingStore` in this process's memory: it outlives workers, not the process.

    Records are kept as JSON, as a shared store keeps them, so what comes back is a fresh copy.
    """

    def __init__(self) -> None:
        self._records: dict[str, bytes] = {}

    async def put(self, parked: ParkedStep) -> None:
        self._records.pop(parked.correlation_id, None)
        self._records[parked.correlation_id] = parked.model_dump_json().encode()

    async def get(self, correlation_id: str) -> ParkedStep | None:
        data = self._records.get(correlation_id)
        return ParkedStep.model_validate_json(data) if data is not None else None

    async def remove(self, parked: ParkedStep) -> bool:
        current = await self.get(parked.correlation_id)
        if current is None or current.message.message_id != parked.message.message_id:
            return False
        del self._records[parked.correlation_id]
        return True

    async def waiting(self) -> list[ParkedStep]:
        return [ParkedStep.model_validate_json(data) for data in self._records.values()]


def get_waiting_store(transport: Transport) -> WaitingStore:
    """The waiting store that fits `transport`: the one its processes share if it offers `SharedStores` (on
    Redis a `RedisWaitingStore` on its connection), else one in this process's memory.

    ```python
    transport = get_transport()  # PAIGEANT_TRANSPORT picks it
    waiting = get_waiting_store(transport)
    ```

    An in-memory store serves one process: on RabbitMQ, share a `RedisWaitingStore` between processes instead.
    """
    return transport.waiting_store() if isinstance(transport, SharedStores) else InMemoryWaitingStore()


def resumed_run(resume: Resumption) -> tuple[Conversation, DeferredToolResults]:
    """The conversation and answers a resumed step continues its agent run with."""
    return ConversationTypeAdapter.validate_python(resume.conversation), _RESULTS.validate_python(resume.results)


def _pending(requests: DeferredToolRequests) -> list[PendingToolCall]:
    def entry(call: ToolCallPart, kind: Literal["approval", "call"]) -> PendingToolCall:
        return PendingToolCall(
            tool_call_id=call.tool_call_id,
            tool_name=call.tool_name,
            args=_JSON_OBJECT.validate_python(to_jsonable_python(call.args_as_dict())),
            kind=kind,
            metadata=_JSON_OBJECT.validate_python(to_jsonable_python(requests.metadata.get(call.tool_call_id, {}))),
        )

    return [entry(call, "approval") for call in requests.approvals] + [entry(call, "call") for call in requests.calls]
