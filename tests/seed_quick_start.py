"""The seed's quick start and its planner, as the seed's README shows them, run as a user runs a script:

    PAIGEANT_TRANSPORT=redis python -m tests.seed_quick_start

Only two things differ from the seed: the package is `paigeant_ai`, and the planner's model (`"openai:gpt-4"` in
the seed) is a `FunctionModel` that lists the live activities and dispatches the onboarding steps. The seed's planner
call passes no catalog: the planner plans from the activities the running workers advertise. The environment picks
the broker, the namespace and the keys; the workers run elsewhere (`paigeant worker examples.onboarding:worker`).
It prints the correlation ID of each workflow it dispatched.
"""

# -- the seed's quick start, step 2: define your workflow --------------------------------------------------------

from paigeant_ai import ActivitySpec

onboarding_steps = [
    ActivitySpec(name="validate-customer-data"),
    ActivitySpec(name="create-customer-account"),
    ActivitySpec(name="setup-payment-method"),
    ActivitySpec(name="send-welcome-email"),
]

# -- the seed's quick start, step 3: dispatch the workflow -------------------------------------------------------

import asyncio  # noqa: E402  (the seed's snippets, in their order)

from paigeant_ai import WorkflowDispatcher, get_transport  # noqa: E402


async def main():
    transport = get_transport()
    await transport.connect()

    dispatcher = WorkflowDispatcher(transport)

    correlation_id = await dispatcher.dispatch_workflow(
        activities=onboarding_steps,
        variables={"customer_email": "new.customer@example.com", "subscription_tier": "premium"},
    )

    print(f"Workflow dispatched: {correlation_id}")
    await transport.disconnect()


asyncio.run(main())

# -- the seed's planner ------------------------------------------------------------------------------------------

from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart  # noqa: E402
from pydantic_ai.models.function import AgentInfo, FunctionModel  # noqa: E402

from paigeant_ai import PlannerAgentDeps, create_planner_agent, dispatched_workflows  # noqa: E402


def onboarding_planner(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """What a model would do with the request: look at what is live, then dispatch the onboarding steps."""
    if len(messages) == 1:
        return ModelResponse(parts=[ToolCallPart("list_activities", {})])
    if len(messages) == 3:
        route = ["validate-customer-data", "create-customer-account", "setup-payment-method", "send-welcome-email"]
        variables = {"customer_email": "john@example.com", "subscription_tier": "premium"}
        return ModelResponse(parts=[ToolCallPart("dispatch_workflow", {"activities": route, "variables": variables})])
    return ModelResponse(parts=[TextPart("Dispatched the onboarding workflow.")])


async def plan() -> None:
    transport = get_transport()
    await transport.connect()
    dispatcher = WorkflowDispatcher(transport)

    # Create an AI agent that can dispatch workflows
    agent = create_planner_agent(model=FunctionModel(onboarding_planner))

    # Give it workflow dispatch capabilities
    deps = PlannerAgentDeps(workflow_dispatcher=dispatcher, user_obo_token="user-session-token")

    # Agent creates workflows from natural language
    result = await agent.run("I need to onboard a new premium customer: john@example.com", deps=deps)

    [workflow] = dispatched_workflows(result)
    print(f"Planner dispatched: {workflow.correlation_id}")
    await transport.disconnect()


asyncio.run(plan())
