"""Steps that wait for a person: parking a workflow on deferred tool calls, and resuming it with the answers.

When an `AgentActivity`'s agent ends its run with pydantic-ai's `DeferredToolRequests` (a tool that requires
approval, or one that raised `CallDeferred`), the step raises `ParkWorkflow`. The worker stores a `ParkedStep`
(the message as it arrived, without its token, and the agent's conversation, whose deferred tool requests are
what it waits for), signed with its key, in a `WaitingStore` and acks the message: nothing runs until
`WorkflowDispatcher.resume` verifies the record, has each answer signed as an approval by an approver, and
publishes the same step again with the record, the approvals and a fresh token (the worker removes the record once
it has claimed that resume, see `paigeant_ai._resume_checks`). The
worker checks all of that before the step runs (`paigeant_ai._approvals`), and the agent continues its
conversation where it stopped.

A store is shared state an attacker may write: what it returns is verified before anything acts on it
(`ParkedStep.verify`; `WorkflowDispatcher.waiting` lists only the records that pass). Everything stored is JSON
made with pydantic-ai's own type adapters, never pickle.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError
from pydantic_ai import Conversation, ConversationTypeAdapter, DeferredToolRequests, DeferredToolResults
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolApproved, ToolDenied
from pydantic_core import to_jsonable_python

from ._budget import BudgetExhausted
from ._escape import escape_control
from ._in_doubt import InDoubt, StepInDoubt
from ._wire import FROM_WIRE, Wire
from .contracts import PaigeantMessage, Resumption, SecurityContext, TransportAddress, derive_message_id
from .exceptions import ParkWorkflow, SecurityError, UserError
from .transports.base import SharedStores, Transport

if TYPE_CHECKING:
    from .security import MessageSecurity

__all__ = (
    "APPROVAL_TYPE",
    "APPROVE_SCOPE",
    "PARKED_TYPE",
    "InMemoryWaitingStore",
    "ParkWorkflow",
    "ParkedStep",
    "PendingToolCall",
    "WaitingStore",
    "get_waiting_store",
)

logger = logging.getLogger("paigeant_ai.approval")

_RESULTS: TypeAdapter[DeferredToolResults] = TypeAdapter(DeferredToolResults)
_JSON_OBJECT: TypeAdapter[dict[str, JsonValue]] = TypeAdapter(dict[str, JsonValue])

ApprovalAnswer = bool | ToolApproved | ToolDenied

PARKED_TYPE = "paigeant-parked+jws"
"""The `typ` of a parked record's signature."""
APPROVAL_TYPE = "paigeant-approval+jws"
"""The `typ` of an approval's signature."""
APPROVE_SCOPE = "paigeant:approve"
"""The scope a user's token needs to approve tool calls (`WorkflowDispatcher.resume(..., approver_token=...)`)."""


class PendingToolCall(BaseModel):
    """One tool call a parked step waits for: an approval, or a result from outside."""

    model_config = ConfigDict(frozen=True)

    tool_call_id: str
    tool_name: str
    args: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    kind: Literal["approval", "call"]
    """`approval`: a person approves or denies it; `call`: its result comes from outside."""
    metadata: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])


class ParkedStep(Wire):
    """A workflow waiting at one step, as a `WaitingStore` keeps it: signed by the worker that parked it.

    The record holds what is later acted on, once: the message as parked (route, payload, revisions) and the
    agent's conversation, whose deferred tool requests are what the step waits for (`pending` is derived from
    them, never stored beside them). It keeps no bearer token and no hop signature: `WorkflowDispatcher.resume`
    takes a fresh token. `proof` is a detached JWS (`typ: paigeant-parked+jws`) over the record without it; a
    record is acted on only once `verify` found it signed by a trusted key that may send to its activity.

    Attributes:
        message: The step's message as the worker received it (with any route revisions the step made), without
            its token and signature.
        conversation: The agent's conversation so far, as `ConversationTypeAdapter` JSON.
        obo_subject: The `sub` of the user's token when the step parked (when the worker checks tokens); a fresh
            token given to `resume` must be of the same subject.
        obo_required: Whether the workflow carried a user token: `resume` then needs a fresh one.
        proof: The parking worker's signature; None when messages are not signed.
    """

    v: Literal[2] = 2
    correlation_id: str
    activity: str
    step: int
    parked_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    message: PaigeantMessage
    conversation: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    obo_subject: str | None = None
    obo_required: bool = False
    in_doubt: InDoubt | None = Field(default=None, exclude_if=lambda value: value is None)
    """Set when the step waits because it may have run (an at-most-once step): what a person must settle."""
    budget_exhausted: str | None = Field(default=None, exclude_if=lambda value: value is None)
    """Set when the workflow waits because its budget is spent: why (see `paigeant_ai._budget`)."""
    transport: TransportAddress | None = Field(default=None, exclude_if=lambda value: value is None)
    """The name of the transport the step parked on (its worker's), where a resume or a cancel sends it back;
    `None`: the transport its step names, else the dispatcher's (see `docs/deployment.md`)."""
    proof: str | None = Field(default=None, repr=False)

    @classmethod
    def from_signal(
        cls, message: PaigeantMessage, signal: ParkWorkflow, *, obo_subject: str | None = None
    ) -> ParkedStep:
        """The (unsigned) record of `message` parked on `signal`; `sign` it before it is stored."""
        parked = message.model_copy(deep=True)
        parked.security = SecurityContext()  # no bearer token and no hop signature at rest
        if parked.resume is not None:  # what the last resume carried is done with; only the count is kept
            parked.resume = Resumption(count=parked.resume.count)
        return cls(
            correlation_id=message.correlation_id,
            activity=message.routing_slip.current or "",
            step=message.step,
            message=parked,
            conversation=_conversation_of(signal),
            in_doubt=signal.in_doubt if isinstance(signal, StepInDoubt) else None,
            budget_exhausted=signal.reason if isinstance(signal, BudgetExhausted) else None,
            obo_subject=obo_subject,
            obo_required=message.security.obo_token is not None,
        )

    @classmethod
    def load(cls, data: bytes | str) -> ParkedStep:
        """A record as a store keeps it (JSON), not verified yet.

        Raises:
            SecurityError: It is not a parked record of this version (code `parked_invalid`).
        """
        try:
            return cls.model_validate_json(data, context=FROM_WIRE)
        except ValidationError as exc:
            reason = exc.errors(include_url=False)[0]
            where = ".".join(str(item) for item in reason["loc"]) or "<root>"
            raise SecurityError(f"not a parked record: {where}: {reason['msg']}", code="parked_invalid") from None

    def signed_bytes(self) -> bytes:
        """What `proof` signs: the record's JSON without the proof."""
        return self.model_dump_json(exclude={"proof"}).encode()

    @property
    def digest(self) -> str:
        """The SHA-256 of `signed_bytes`: what approvals and the resume hop name the record by."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def sign(self, security: MessageSecurity) -> ParkedStep:
        """Set `proof` with `security`'s key; returns the record."""
        self.proof = security.sign_bytes(self.signed_bytes(), typ=PARKED_TYPE)
        return self

    def verify(self, security: MessageSecurity) -> str | None:
        """Check the record before anything acts on it; the key id that parked it (None when unsigned).

        Raises:
            SecurityError: It is not signed, not by a trusted key, altered, signed by a key that may not send to
                its activity, or inconsistent; the reason names the workflow.
        """
        try:
            kid = security.verify_bytes(self.proof, self.signed_bytes(), typ=PARKED_TYPE)
            security.policy.require_send(kid, self.activity)
        except SecurityError as exc:
            raise SecurityError(
                f"the parked record of workflow {self.correlation_id!r} is refused: {exc}", code=exc.code
            ) from None
        slip = self.message.routing_slip
        if (self.message.correlation_id, slip.current, self.message.step) != (
            self.correlation_id,
            self.activity,
            self.step,
        ):
            raise SecurityError(
                f"the parked record of workflow {self.correlation_id!r} is refused: its message is for another step",
                code="parked_invalid",
            )
        return kid

    @property
    def requests(self) -> DeferredToolRequests:
        """The pending requests as pydantic-ai's `DeferredToolRequests`, from the conversation."""
        if self.in_doubt is not None or self.budget_exhausted is not None:
            return DeferredToolRequests()  # it waits for a person's word on the step, not for tool calls
        requests = ConversationTypeAdapter.validate_python(self.conversation).deferred_tool_requests
        return requests or DeferredToolRequests()

    @property
    def pending(self) -> list[PendingToolCall]:
        """What the step waits for, readable without pydantic-ai: derived from the signed conversation."""
        return _pending(self.requests)

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
        missing = [call for call in _pending(requests) if call.tool_call_id not in {*built.approvals, *built.calls}]
        if missing:
            needed = ", ".join(f"{call.tool_call_id} ({call.kind} of {call.tool_name})" for call in missing)
            raise UserError(f"cannot resume workflow {self.correlation_id}: no answer for {needed}")
        return built

    @property
    def resume_count(self) -> int:
        """How many times the step will have been resumed once this record is."""
        return self.message.resume.count + 1 if self.message.resume is not None else 1

    def resume_message_id(self) -> str:
        """The id of the hop that resumes this record: the same for every resume of it, so only one runs."""
        name = f"{self.activity}#resume-{self.resume_count}-{self.digest[:32]}"
        return derive_message_id(self.correlation_id, self.step, name, self.message.attempt)

    def resume_message(
        self,
        results: DeferredToolResults,
        approvals: Sequence[Mapping[str, JsonValue]] = (),
        *,
        obo_token: str | None = None,
    ) -> PaigeantMessage:
        """The hop that continues the step: the record with its proof, the answers, their signed approvals and
        the fresh user token."""
        hop = self.message.next_hop(attempt=self.message.attempt)
        hop.message_id = self.resume_message_id()
        hop.security = SecurityContext(obo_token=obo_token)
        hop.resume = Resumption(
            count=self.resume_count,
            results=_JSON_OBJECT.validate_python(_RESULTS.dump_python(results, mode="json")),
            parked=_JSON_OBJECT.validate_python(self.model_dump(mode="json")),
            approvals=[dict(approval) for approval in approvals],
        )
        return hop

    def decision_digest(self, tool_call_id: str, answer: ApprovalAnswer = True) -> str:
        """What an approver's own token must be bound to, for `resume(..., approver_token=...)` to need no key that
        may approve: the digest to put in the token's `authorization_details` (RFC 9396) as
        `{"type": "paigeant_approval", "digest": ...}`, for `answer` to the call `tool_call_id`.

        Raises:
            UserError: No approval request of that id is pending.
        """
        from ._approvals import approval_of, decision_digest  # the approvals module builds on this one

        call = next((c for c in self.pending if c.tool_call_id == tool_call_id and c.kind == "approval"), None)
        if call is None:
            raise UserError(f"workflow {self.correlation_id!r} waits for no approval of {tool_call_id!r}")
        return decision_digest(approval_of(self, call, answer, approver=None))

    def describe(self) -> str:
        """One line: what the step waits for."""
        if self.in_doubt is not None:
            return self.in_doubt.describe(self.correlation_id, self.activity)
        if self.budget_exhausted is not None:
            return f"budget exhausted before step {self.activity!r}: {self.budget_exhausted}"
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
        """The parked step of a workflow, if it waits; not verified yet (see `ParkedStep.verify`).

        Raises:
            SecurityError: What is stored is not a parked record.
        """
        ...

    async def remove(self, parked: ParkedStep) -> bool:
        """Remove `parked`, unless the workflow has parked anew since (then its new record stays).

        Returns:
            Whether it was removed.
        """
        ...

    async def waiting(self) -> list[ParkedStep]:
        """Every parked workflow, oldest first; not verified yet (`WorkflowDispatcher.waiting` lists the verified
        ones). What is not a parked record is left out, with a logged reason."""
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
        return ParkedStep.load(data) if data is not None else None

    async def remove(self, parked: ParkedStep) -> bool:
        current = await self.get(parked.correlation_id)
        if current is None or current.message.message_id != parked.message.message_id:
            return False
        del self._records[parked.correlation_id]
        return True

    async def waiting(self) -> list[ParkedStep]:
        return loadable(self._records.items())


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
    """The conversation and answers a resumed step continues its agent run with (the conversation of the parked
    record it carries, which the worker verified)."""
    conversation = resume.parked.get("conversation") if resume.parked is not None else resume.conversation
    return ConversationTypeAdapter.validate_python(conversation), _RESULTS.validate_python(resume.results)


def verified(parked: ParkedStep, security: MessageSecurity) -> bool:
    """Whether `parked` verifies (`ParkedStep.verify`); the reason it does not is logged as a warning."""
    try:
        parked.verify(security)
    except SecurityError as exc:
        logger.warning("ignoring a parked record: %s", escape_control(str(exc)))
        return False
    return True


def loadable(records: Iterable[tuple[str, bytes | str]]) -> list[ParkedStep]:
    """The records that are parked records, by correlation ID; the others left out with a logged reason."""
    found: list[ParkedStep] = []
    for correlation_id, data in records:
        try:
            found.append(ParkedStep.load(data))
        except SecurityError as exc:
            logger.warning("leaving parked workflow %r out: %s", correlation_id, escape_control(str(exc)))
    return found


def _conversation_of(signal: ParkWorkflow) -> dict[str, JsonValue]:
    if isinstance(signal, StepInDoubt | BudgetExhausted):
        return {}
    return _JSON_OBJECT.validate_python(ConversationTypeAdapter.dump_python(signal.conversation, mode="json"))


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
