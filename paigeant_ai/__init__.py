"""paigeant-ai: durable, message-driven workflows for pydantic-ai agents, with the routing slip pattern.

Every public name is here. What belongs to one backend is exported from its module: the Redis transport and
its shared stores from `paigeant_ai.transports.redis`, the RabbitMQ transport from
`paigeant_ai.transports.rabbitmq` (each needs its extra).
"""

import logging as _logging

from ._agent_progress import OutputLimits
from ._approvals import Approval, SignedApproval
from ._cancel import Cancellation
from ._events import WorkflowEvent
from ._in_doubt import Ran, RunAgain
from ._ledger import usage_by_model, workflow_usage
from ._parallel import Parallel
from ._plan_rules import PlanRules
from ._registry import AdvertisedActivity, LiveRegistry, WorkerRecord, read_registry
from ._step_record import StepRecord
from ._watch import WatchedEvent
from .activity import Activity, ActivityContext, AgentActivity, FunctionActivity, activity
from .approval import (
    InMemoryWaitingStore,
    ParkedStep,
    ParkWorkflow,
    PendingToolCall,
    WaitingStore,
    get_waiting_store,
)
from .catalog import ActivityCatalog, CatalogEntry
from .contracts import (
    ActivityLogEntry,
    ActivitySpec,
    Budget,
    BudgetExtension,
    Compensation,
    PaigeantMessage,
    Plan,
    PlannedStep,
    Price,
    Resumption,
    RetryPolicy,
    Revision,
    RevisionLimits,
    RoutingSlip,
    SecurityContext,
    Unwinding,
    Usage,
)
from .dispatch import WorkflowDispatcher
from .exceptions import (
    DuplicateMessage,
    EndWorkflow,
    InvalidMessage,
    InvalidPlan,
    MessageTooLarge,
    NonFiniteNumber,
    NonRetryableError,
    NoWorker,
    PaigeantError,
    ReplayedMessage,
    RetryActivity,
    SecurityError,
    TokenError,
    TransportError,
    UnknownTransport,
    UnknownWorkflow,
    UserError,
    WorkflowExists,
)
from .planner import (
    DispatchedWorkflow,
    PaigeantPlanner,
    PaigeantToolset,
    PlannerAgentDeps,
    create_planner_agent,
    dispatched_workflows,
)
from .revision import ItineraryRevision
from .security import MessageSigner, TokenValidator
from .store import InMemoryWorkflowStore, WorkflowProjector, WorkflowStatus, WorkflowStore, get_workflow_store
from .transports import InMemoryTransport, Transport, get_transport
from .trust import TrustPolicy
from .worker import Worker, WorkerStats

__all__ = (
    "Activity",
    "ActivityCatalog",
    "ActivityContext",
    "ActivityLogEntry",
    "ActivitySpec",
    "AdvertisedActivity",
    "AgentActivity",
    "Approval",
    "Budget",
    "BudgetExtension",
    "Cancellation",
    "CatalogEntry",
    "Compensation",
    "DispatchedWorkflow",
    "DuplicateMessage",
    "EndWorkflow",
    "FunctionActivity",
    "InMemoryTransport",
    "InMemoryWaitingStore",
    "InMemoryWorkflowStore",
    "InvalidMessage",
    "InvalidPlan",
    "ItineraryRevision",
    "LiveRegistry",
    "MessageSigner",
    "MessageTooLarge",
    "NoWorker",
    "NonFiniteNumber",
    "NonRetryableError",
    "OutputLimits",
    "PaigeantError",
    "PaigeantMessage",
    "PaigeantPlanner",
    "PaigeantToolset",
    "Parallel",
    "ParkWorkflow",
    "ParkedStep",
    "PendingToolCall",
    "Plan",
    "PlanRules",
    "PlannedStep",
    "PlannerAgentDeps",
    "Price",
    "Ran",
    "ReplayedMessage",
    "Resumption",
    "RetryActivity",
    "RetryPolicy",
    "Revision",
    "RevisionLimits",
    "RoutingSlip",
    "RunAgain",
    "SecurityContext",
    "SecurityError",
    "SignedApproval",
    "StepRecord",
    "TokenError",
    "TokenValidator",
    "Transport",
    "TransportError",
    "TrustPolicy",
    "UnknownTransport",
    "UnknownWorkflow",
    "Unwinding",
    "Usage",
    "UserError",
    "WaitingStore",
    "WatchedEvent",
    "Worker",
    "WorkerRecord",
    "WorkerStats",
    "WorkflowDispatcher",
    "WorkflowEvent",
    "WorkflowExists",
    "WorkflowProjector",
    "WorkflowStatus",
    "WorkflowStore",
    "activity",
    "create_planner_agent",
    "dispatched_workflows",
    "get_transport",
    "get_waiting_store",
    "get_workflow_store",
    "read_registry",
    "usage_by_model",
    "workflow_usage",
)

__version__ = "0.1.0"

# A library logs; the application decides where it goes.
_logging.getLogger("paigeant_ai").addHandler(_logging.NullHandler())
