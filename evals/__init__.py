"""Evaluation suites for paigeant-ai: does the planner pick the right workflow, and do workflows end right?

Two pydantic-evals datasets, stored as YAML next to this file, with the custom evaluators in `evaluators.py`:

- `planner.yaml`: requests (and conversations) to a planner agent; checks the itinerary it dispatched, its
  questions, its refusals (the catalog's rules among them) and its tool calls. Offline, the planner is
  `policy.py`'s, which sees only what a model sees.
- `workflows.yaml`: whole workflows run on the in-memory transport; checks how they end, step order, payload,
  retries and duration.

Run both offline (deterministic `FunctionModel`s, no API key): `uv run python -m evals`.
"""
