from __future__ import annotations

from importlib import resources

import paigeant_ai


def test_all_is_sorted_and_importable() -> None:
    assert list(paigeant_ai.__all__) == sorted(paigeant_ai.__all__)
    for name in paigeant_ai.__all__:
        assert getattr(paigeant_ai, name) is not None, name


def test_the_planner_results_and_the_stores_for_a_transport_are_exported() -> None:
    exported = set(paigeant_ai.__all__)
    assert {"DispatchedWorkflow", "dispatched_workflows", "get_waiting_store", "get_workflow_store"} <= exported


def test_the_package_says_it_is_typed() -> None:
    """PEP 561: type checkers read the package's own annotations (hatchling puts the marker in the wheel)."""
    marker = resources.files("paigeant_ai").joinpath("py.typed")
    assert marker.is_file()
    assert marker.read_bytes() == b""
