"""The offline planner: a deterministic `FunctionModel` that stands in for an LLM in the planner suite.

It reads the request with keyword rules and drives the real planner toolset the way a model would: it refuses
unsafe requests outright, asks when a request is too vague to plan, looks at the catalog (`list_activities`)
before anything else, says so when a request needs an activity the catalog does not have, and otherwise
dispatches one workflow (`dispatch_workflow`) and reports its id. The rules are deliberately plain: the suite
measures the planner toolset and the evaluators, and the same cases run unchanged against a real model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import JsonValue
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_core import to_jsonable_python

__all__ = (
    "Clarify",
    "Decision",
    "Missing",
    "Plan",
    "Refuse",
    "Status",
    "decide",
    "offline_planner",
    "planner_policy",
)

PolicyFunction = Callable[[list[ModelMessage], AgentInfo], ModelResponse]

# -- what the policy decides ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Dispatch these activities with these variables (after checking each is in the catalog)."""

    activities: list[str]
    variables: dict[str, JsonValue] = field(default_factory=dict[str, JsonValue])
    purpose: str = ""


@dataclass(frozen=True)
class Refuse:
    """Dispatch nothing and say why."""

    reason: str


@dataclass(frozen=True)
class Clarify:
    """Dispatch nothing and ask for what is missing."""

    question: str


@dataclass(frozen=True)
class Status:
    """Look a workflow up."""

    correlation_id: str


@dataclass(frozen=True)
class Missing:
    """The request needs an activity the catalog may not have: check, then dispatch it or say it is not there."""

    activity: str
    capability: str
    variables: dict[str, JsonValue] = field(default_factory=dict[str, JsonValue])


Decision = Plan | Refuse | Clarify | Status | Missing

SUPPORT = ["classify-ticket-priority", "route-to-specialist", "research-customer-history", "generate-response"]
ONBOARDING = ["validate-customer-data", "create-customer-account", "setup-payment-method", "send-welcome-email"]
ORDER = [
    "validate-order",
    "check-inventory",
    "process-payment",
    "update-inventory",
    "generate-shipping-label",
    "send-confirmation",
]

# -- reading the request ---------------------------------------------------------------------------------------

_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_ORDER_ID = re.compile(r"\bord-\d+\b", re.IGNORECASE)
_SKU = re.compile(r"\bSKU-[A-Z0-9]+\b")
_QUANTITY = re.compile(r"\b(\d+)\s*(?:x\b|units?\b|copies\b|of\b)", re.IGNORECASE)
_AMOUNT = re.compile(r"(?:\$|€|£|for\s)\s?(\d+(?:\.\d{1,2})?)\b")
_ADDRESS = re.compile(
    r"\b(?:ship|shipped|deliver|delivered|send|sent)(?:\s+(?:it|them))?\s+to\s+(\d[^,;?!]*?)(?:[,;?!]|\.(?:\s|$)|$)"
)
_CUSTOMER = re.compile(r"\b[Cc]ustomer ([A-Z][\w-]*|\d[\w-]*)")
_WORKFLOW_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")

_UNSAFE: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(r"\b(skip\w*|bypass\w*|without)\s+(the\s+)?(pay\w*|charg\w*)|\bno payment\b|\bfor free\b"),
        "I won't ship an order without taking payment: payment is a required step of every order.",
    ),
    (
        re.compile(r"refund[^.]*\b(without|skip|no need to|don't|do not)\b[^.]*\b(check|verify|look)"),
        "I won't issue a refund without checking the order first.",
    ),
    (
        re.compile(r"\b(skip|without|bypass|ignore)\b[^.]*\b(validat\w*|verif\w*|inventory|stock|approv\w*)"),
        "I won't skip a safety check: validation, the stock check and approvals run on every workflow.",
    ),
    (
        re.compile(
            r"\b(every|all)\b[^.]*\bcustomers?\b[^.]*\b(refund|delete|charge)|\b(refund|delete|charge)\b[^.]*"
            r"\b(every|all)\b[^.]*\bcustomers?\b"
        ),
        "I won't run an action on every customer at once; name the customer or order it is for.",
    ),
]

_MISSING: list[tuple[re.Pattern[str], str, str]] = [
    (re.compile(r"\bcancel\w*\b"), "cancel-order", "cancel an order"),
    (re.compile(r"\btranslat\w*"), "translate-text", "translate text"),
    (re.compile(r"\binvoice\w*"), "generate-invoice", "write an invoice"),
    (re.compile(r"\bloyalty\b|\bpoints\b"), "award-loyalty-points", "award loyalty points"),
    (re.compile(r"\bgift[- ]?wrap\w*"), "gift-wrap", "gift-wrap a parcel"),
    (re.compile(r"\b(close|delete)\b[^.]*\baccount\b"), "close-customer-account", "close an account"),
    (re.compile(r"\breset\b[^.]*\bpassword"), "reset-password", "reset a password"),
]

_SUPPORT_WORDS = (
    "ticket",
    "can't",
    "cannot",
    "complain",
    "unhappy",
    "problem",
    "error",
    "slow",
    "never arrived",
    "follow",
)


def _words(request: str, *words: str) -> bool:
    return any(re.search(rf"\b{word}", request) for word in words)


def decide(request: str) -> Decision:
    """What the offline planner does with `request`."""
    text = request.lower()
    for pattern, reason in _UNSAFE:
        if pattern.search(text):
            return Refuse(reason)
    if _words(text, "status", "how is", "how's", "where is", "progress") and (found := _WORKFLOW_ID.search(text)):
        return Status(found.group())
    for pattern, activity, capability in _MISSING:
        if pattern.search(text):
            return Missing(activity, capability, _order_variables(request) or _customer_variables(request))
    if _words(text, "refund"):
        return _refund_decision(request)
    if _words(text, *_SUPPORT_WORDS):
        return _support_decision(request, text)
    if _words(text, "order", "buy", "purchase", "ship", "stock"):
        return _order_decision(request, text)
    if _words(text, "onboard", "sign up", "signup", "register", "new customer", "account", "welcome", "customer data"):
        return _onboarding_decision(request, text)
    return Clarify(
        "I'm not sure what you need. I can onboard customers, process orders and handle support tickets: "
        "which is it, and for whom?"
    )


def _customer_variables(request: str) -> dict[str, JsonValue]:
    email = _EMAIL.search(request)
    if email is None:
        return {}
    tier = "premium" if "premium" in request.lower() else "standard"
    return {"customer_email": email.group(), "subscription_tier": tier}


def _onboarding_decision(request: str, text: str) -> Decision:
    variables = _customer_variables(request)
    if not variables:
        return Clarify("Which customer? I need their email address to onboard them.")
    if _words(text, "resend", "welcome email again", "send the welcome"):
        return Plan(["send-welcome-email"], variables, "send the welcome email")
    if _words(text, "validate", "check") and not _words(text, "onboard", "sign up", "set up", "account"):
        return Plan(["validate-customer-data"], variables, "validate the customer's data")
    return Plan(ONBOARDING, variables, "onboard the customer")


def _order_variables(request: str) -> dict[str, JsonValue]:
    found = {
        "order_id": _ORDER_ID.search(request),
        "sku": _SKU.search(request),
        "quantity": _QUANTITY.search(request),
        "amount": _AMOUNT.search(request),
        "address": _ADDRESS.search(request),
    }
    variables: dict[str, JsonValue] = {}
    for key, match in found.items():
        if match is None:
            continue
        value = match.group(1) if match.groups() else match.group()
        variables[key] = int(value) if key == "quantity" else float(value) if key == "amount" else value.strip()
    return variables


def _order_decision(request: str, text: str) -> Decision:
    variables = _order_variables(request)
    needed = ["order_id", "sku", "address"] if _words(text, "stock") else ["order_id", "sku", "amount", "address"]
    missing = [key for key in needed if key not in variables]
    if missing:
        return Clarify(f"To process that order I need its {', '.join(missing)}.")
    variables.setdefault("quantity", 1)
    if _words(text, "in stock", "stock check", "check stock", "check the stock", "availab"):
        return Plan(ORDER[:2], variables, "check the order's stock")
    return Plan(ORDER, variables, "process the order")


def _support_decision(request: str, text: str) -> Decision:
    customer = _CUSTOMER.search(request)
    if customer is None:
        return Clarify("Which customer is it? I need their customer id to handle the ticket.")
    variables: dict[str, JsonValue] = {"ticket": request, "customer": customer.group(1)}
    if _words(text, "schedule a follow"):
        return Plan(["schedule-follow-up"], variables, "schedule a follow-up call")
    if _words(text, "just classify", "only classify"):
        return Plan(SUPPORT[:1], variables, "classify the ticket")
    return Plan(SUPPORT, variables, "handle the ticket")


def _refund_decision(request: str) -> Decision:
    variables = _order_variables(request)
    missing = [key for key in ("order_id", "sku", "address") if key not in variables]
    if missing:
        return Clarify(f"To refund that order I need to check it first, and for that I need its {', '.join(missing)}.")
    variables.setdefault("quantity", 1)
    return Plan(["validate-order", "issue-refund"], variables, "check the order and refund it")


# -- driving the toolset ---------------------------------------------------------------------------------------


def _request(messages: list[ModelMessage]) -> str:
    for message in messages:
        for part in message.parts:
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                return part.content
    return ""


def _results(messages: list[ModelMessage]) -> dict[str, ToolReturnPart]:
    """The latest answer of each tool, by tool name (a refused call is answered with `outcome='retried'`)."""
    answers: dict[str, ToolReturnPart] = {}
    for message in messages:
        for part in message.parts:
            if isinstance(part, ToolReturnPart):
                answers[part.tool_name] = part
    return answers


def _catalog_names(answer: ToolReturnPart) -> list[str]:
    entries = to_jsonable_python(answer.content) if answer.outcome == "success" else []
    return [str(entry["name"]) for entry in entries if isinstance(entry, dict) and "name" in entry]


def _say(text: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(text)])


def _call(tool: str, args: dict[str, JsonValue]) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart(tool, args)])


def planner_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """One model turn of the offline planner."""
    decision = decide(_request(messages))
    answers = _results(messages)
    if isinstance(decision, Refuse):
        return _say(decision.reason)
    if isinstance(decision, Clarify):
        return _say(decision.question)
    if isinstance(decision, Status):
        status = answers.get("get_workflow_status")
        if status is None:
            return _call("get_workflow_status", {"correlation_id": decision.correlation_id})
        return _say(f"Workflow {decision.correlation_id}: {json.dumps(to_jsonable_python(status.content))}")
    listing = answers.get("list_activities")
    if listing is None:
        return _call("list_activities", {})
    if isinstance(decision, Missing):
        if decision.activity not in _catalog_names(listing):
            return _say(f"I can't {decision.capability}: no activity in the catalog does that.")
        decision = Plan([decision.activity], decision.variables, decision.capability)
    unknown = [name for name in decision.activities if name not in _catalog_names(listing)]
    if unknown:
        return _say(f"I can't {decision.purpose}: the catalog has no {', '.join(unknown)}.")
    dispatched = answers.get("dispatch_workflow")
    if dispatched is None:
        return _call("dispatch_workflow", {"activities": list(decision.activities), "variables": decision.variables})
    if dispatched.outcome != "success":
        return _say(f"I could not {decision.purpose}: {dispatched.model_response_str()}")
    result = to_jsonable_python(dispatched.content)
    steps = " -> ".join(decision.activities)
    return _say(f"Dispatched workflow {result.get('correlation_id')} to {decision.purpose}: {steps}.")


def offline_planner(policy: PolicyFunction = planner_policy) -> FunctionModel:
    """The offline planner as a model for `create_planner_agent`."""
    return FunctionModel(policy, model_name="offline-planner")
