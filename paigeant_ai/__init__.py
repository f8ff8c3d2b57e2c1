"""paigeant-ai: durable, message-driven workflows for pydantic-ai agents, with the routing slip pattern."""

import logging as _logging

from .activity import Activity, ActivityContext, AgentActivity, FunctionActivity, activity
from .contracts import (
    ActivityLogEntry,
    ActivitySpec,
    PaigeantMessage,
    RetryPolicy,
    RoutingSlip,
    SecurityContext,
    WorkflowEvent,
)
from .dispatch import WorkflowDispatcher
from .exceptions import (
    EndWorkflow,
    InvalidMessage,
    MessageTooLarge,
    NonRetryableError,
    PaigeantError,
    RetryActivity,
    SecurityError,
    TransportError,
    UserError,
)
from .transports import InMemoryTransport, Transport, get_transport
from .worker import Worker, WorkerStats

__all__ = (
    "Activity",
    "ActivityContext",
    "ActivityLogEntry",
    "ActivitySpec",
    "AgentActivity",
    "EndWorkflow",
    "FunctionActivity",
    "InMemoryTransport",
    "InvalidMessage",
    "MessageTooLarge",
    "NonRetryableError",
    "PaigeantError",
    "PaigeantMessage",
    "RetryActivity",
    "RetryPolicy",
    "RoutingSlip",
    "SecurityContext",
    "SecurityError",
    "Transport",
    "TransportError",
    "UserError",
    "Worker",
    "WorkerStats",
    "WorkflowDispatcher",
    "WorkflowEvent",
    "activity",
    "get_transport",
)

__version__ = "0.1.0"

# A library logs; the application decides where it goes.
_logging.getLogger("paigeant_ai").addHandler(_logging.NullHandler())
