"""paigeant-ai: durable, message-driven workflows for pydantic-ai agents, with the routing slip pattern."""

import logging as _logging

from .activity import Activity, ActivityContext, AgentActivity, FunctionActivity, activity
from .approval import (
    InMemoryWaitingStore,
    ParkedStep,
    ParkWorkflow,
    PendingToolCall,
    RedisWaitingStore,
    WaitingStore,
)
from .catalog import ActivityCatalog, CatalogEntry
from .contracts import (
    ActivityLogEntry,
    ActivitySpec,
    PaigeantMessage,
    Resumption,
    RetryPolicy,
    Revision,
    RoutingSlip,
    SecurityContext,
    WorkflowEvent,
)
from .dispatch import WorkflowDispatcher
from .exceptions import (
    EndWorkflow,
    InvalidMessage,
    InvalidPlan,
    MessageTooLarge,
    NonRetryableError,
    NoWorker,
    PaigeantError,
    ReplayedMessage,
    RetryActivity,
    SecurityError,
    TokenError,
    TransportError,
    UserError,
    WorkflowExists,
)
from .planner import PaigeantPlanner, PaigeantToolset, PlannerAgentDeps, create_planner_agent
from .revision import ItineraryRevision
from .security import MessageSigner, TokenValidator
from .transports import InMemoryTransport, Transport, get_transport
from .worker import Worker, WorkerStats

__all__ = (
    "Activity",
    "ActivityCatalog",
    "ActivityContext",
    "ActivityLogEntry",
    "ActivitySpec",
    "AgentActivity",
    "CatalogEntry",
    "EndWorkflow",
    "FunctionActivity",
    "InMemoryTransport",
    "InMemoryWaitingStore",
    "InvalidMessage",
    "InvalidPlan",
    "ItineraryRevision",
    "MessageSigner",
    "MessageTooLarge",
    "NoWorker",
    "NonRetryableError",
    "PaigeantError",
    "PaigeantMessage",
    "PaigeantPlanner",
    "PaigeantToolset",
    "ParkWorkflow",
    "ParkedStep",
    "PendingToolCall",
    "PlannerAgentDeps",
    "RedisWaitingStore",
    "ReplayedMessage",
    "Resumption",
    "RetryActivity",
    "RetryPolicy",
    "Revision",
    "RoutingSlip",
    "SecurityContext",
    "SecurityError",
    "TokenError",
    "TokenValidator",
    "Transport",
    "TransportError",
    "UserError",
    "WaitingStore",
    "Worker",
    "WorkerStats",
    "WorkflowDispatcher",
    "WorkflowEvent",
    "WorkflowExists",
    "activity",
    "create_planner_agent",
    "get_transport",
)

__version__ = "0.1.0"

# A library logs; the application decides where it goes.
_logging.getLogger("paigeant_ai").addHandler(_logging.NullHandler())
