"""The types of a recorded dataset (see `paigeant_ai.evals`): what a step or a workflow case holds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, JsonValue
from pydantic_evals import Case, Dataset

__all__ = ("RecordedCase", "RecordedDataset", "RecordedStep", "RecordedWorkflow")


class RecordedStep(BaseModel):
    """The inputs of an agent step's case: what the step saw."""

    kind: Literal["step"] = "step"
    activity: str
    prompt: str | None
    """The rendered prompt of its run."""
    payload: dict[str, JsonValue] = Field(default_factory=dict[str, JsonValue])
    """The workflow's payload as the step saw it."""
    output_key: str
    """Where the step put its output in the payload."""
    route: list[str] = Field(default_factory=list[str])
    """The steps still to run when it started, itself first."""


class RecordedWorkflow(BaseModel):
    """The inputs of a workflow's case: what it was asked and the plan it ran."""

    kind: Literal["workflow"] = "workflow"
    request: dict[str, JsonValue] | None
    """The payload its first step saw (the variables it was dispatched with), when that step was recorded."""
    plan: list[str]
    """The steps it ran, in order."""


RecordedDataset = Dataset[RecordedStep | RecordedWorkflow, JsonValue, dict[str, Any]]
"""A dataset of recorded workflows: expected outputs are a step's output or a workflow's final payload."""
RecordedCase = Case[RecordedStep | RecordedWorkflow, JsonValue, dict[str, Any]]
"""One case of a recorded dataset: a step's or a workflow's."""
