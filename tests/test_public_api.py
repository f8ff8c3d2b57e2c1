from __future__ import annotations

from importlib import resources

import paigeant_ai
from paigeant_ai.transports import redis

PUBLIC = (
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
"""Every public name, sorted. A name added or removed here is a change of the public API: say so in the notes."""


def test_the_public_names_are_exactly_these() -> None:
    assert paigeant_ai.__all__ == PUBLIC


def test_all_is_sorted_and_importable() -> None:
    assert list(paigeant_ai.__all__) == sorted(paigeant_ai.__all__)
    for name in paigeant_ai.__all__:
        assert getattr(paigeant_ai, name) is not None, name


def test_the_planner_results_and_the_stores_for_a_transport_are_exported() -> None:
    exported = set(paigeant_ai.__all__)
    assert {"DispatchedWorkflow", "dispatched_workflows", "get_waiting_store", "get_workflow_store"} <= exported
    assert {"WorkflowStore", "InMemoryWorkflowStore", "WorkflowProjector", "WorkflowStatus"} <= exported


def test_what_belongs_to_redis_is_exported_from_its_module_only() -> None:
    assert redis.__all__ == (
        "GROUP",
        "RedisDedupeStore",
        "RedisReplayCache",
        "RedisTransport",
        "RedisWaitingStore",
        "RedisWorkflowStore",
    )
    for name in redis.__all__:
        assert getattr(redis, name) is not None, name
    assert not [name for name in paigeant_ai.__all__ if name.startswith("Redis")]


def test_the_evals_module_exports_the_recording_and_the_replay() -> None:
    from paigeant_ai import evals

    assert evals.__all__ == (
        "FieldsMatch",
        "RecordedDataset",
        "RecordedStep",
        "RecordedWorkflow",
        "ReplayReport",
        "ReplayedStep",
        "SameToolCalls",
        "SchemaValid",
        "load_dataset",
        "record_dataset",
        "replay_dataset",
    )
    for name in evals.__all__:
        assert getattr(evals, name) is not None, name


def test_the_package_says_it_is_typed() -> None:
    """PEP 561: type checkers read the package's own annotations (hatchling puts the marker in the wheel)."""
    marker = resources.files("paigeant_ai").joinpath("py.typed")
    assert marker.is_file()
    assert marker.read_bytes() == b""
