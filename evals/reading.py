"""How the offline planner reads a request: its words, the values it carries, and what it asks to leave out.

Nothing here knows the catalog or the suite's cases: words are reduced to stems so that they can be compared with the
names and descriptions `list_activities` returns, values are found by the variable names a catalog uses, and a
short list of phrases maps everyday words onto plainer ones ("sign up" is onboarding, "deliver" is ship), as a
model's knowledge of the language would. No phrase names an activity: which activity a request means is read from
the catalog's names and descriptions (`evals.planning`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import JsonValue

__all__ = ("GENERIC", "Reading", "read", "stem", "stems")

_STOPWORDS = """a an the of for to from in on at by with and or but as is are was be it its it's this that these those
    their his her our my your me us we i you they them he she there here what which who how when where why now also then
    just only please kindly can could would should will want wants like need needs needed nothing else new newest
    all any some first again end make sure up out into about after before per so if not no do does did done has have
    had customer customers thing yesterday today x units unit copies"""
STOPWORDS = frozenset(_STOPWORDS.split())


PHRASES: list[tuple[str, str]] = [
    (r"\bcheck(?:ed)? out\b", "hold"),
    (r"\b(?:sign(?:ing)?[- ]?up|register)\b", "onboard"),
    (r"\bset(?:ting)? up\b", "setup"),
    (r"\b(?:bought|buy|buys|purchased?)\b", "process order"),
    (r"\bfor free\b", "without payment"),
    (r"\bresend\b", "send"),
    (r"\bdeliver(?:ed)?\b", "ship"),
    (r"\b(?:urgent|complains?|complaint|unhappy|can't|cannot|problem|error|slow|never arrived|answer)\b", "ticket"),
]

_EXCLUDE = re.compile(
    r"\b(?:skip(?:ping)?|without|bypass(?:ing)?|no need to|don't|do not)\s+(?:the |a |any |waiting for )?"
    r"([a-z-]+(?:\s+(?:the |an |a )?[a-z-]+)?)"
)
_BULK = re.compile(r"\b(?:every|all)\b[^.]*\bcustomers?\b")
_TWICE = re.compile(r"\b(?:twice|two times)\b")
_WORKFLOW_ID = re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b")
_STATUS = re.compile(r"\b(?:status|how is|how's|where is|progress)\b")

_VALUES: list[tuple[str, re.Pattern[str]]] = [
    ("customer_email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("subscription_tier", re.compile(r"\b(premium|standard)\b", re.IGNORECASE)),
    ("order_id", re.compile(r"\bord-\d+\b", re.IGNORECASE)),
    ("sku", re.compile(r"\bSKU-[A-Z0-9]+\b")),
    ("quantity", re.compile(r"\b(\d+)\s*(?:x\b|units?\b|copies\b|of\b)", re.IGNORECASE)),
    ("amount", re.compile(r"(?:\$|€|£|for\s)\s?(\d+(?:\.\d{1,2})?)\b")),
    (
        "address",
        re.compile(
            r"\b(?:ship|shipped|deliver|delivered|send|sent)(?:\s+(?:it|them))?\s+to\s+(\d[^,;?!)]*?)"
            r"(?:[,;?!)]|\.(?:\s|$)|$)"
        ),
    ),
    ("customer", re.compile(r"\b[Cc]ustomer ([A-Z][\w-]*|\d[\w-]*)")),
]


def stem(word: str) -> str:
    """A crude stem, enough to match `shipping` with `ship` and `validation` with `validate`."""
    word = word.lower().strip("'-")
    for suffix in ("ings", "ing", "ions", "ion", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3 and not (suffix == "s" and word.endswith("ss")):
            word = word[: -len(suffix)]
            break
    if word.endswith("at") and len(word) >= 7:
        word = word[:-2]
    if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
        word = word[:-1]
    return word


def stems(text: str) -> list[str]:
    """The stems of the words of `text` that carry meaning, in order."""
    words = re.findall(r"[a-z][a-z']*", text.lower())
    return [stem(word) for word in words if word not in STOPWORDS and stem(word) not in STOPWORDS]


@dataclass
class Reading:
    """What one message says.

    Attributes:
        clauses: The stems of each clause, in order (values taken out).
        words: The first meaningful word of each clause, as written (for replies).
        values: The values found, by the variable name they would go under.
        excluded: Each thing the user asked to leave out: their words, and the stems of those.
        bulk: The request is about every customer at once.
        repeat: How many times the request asks for its action (2 for "twice").
        status_of: The workflow id whose status is asked for.
    """

    clauses: list[list[str]] = field(default_factory=list[list[str]])
    words: list[str] = field(default_factory=list[str])
    values: dict[str, JsonValue] = field(default_factory=dict[str, JsonValue])
    excluded: list[tuple[str, list[str]]] = field(default_factory=list[tuple[str, list[str]]])
    bulk: bool = False
    repeat: int = 1
    status_of: str | None = None


def read(message: str) -> Reading:
    """Read one message."""
    reading = Reading(values=_values(message))
    text = message
    for _, pattern in _VALUES:
        text = pattern.sub(" ", text)
    text = _WORKFLOW_ID.sub(" ", text.lower())
    for pattern, replacement in PHRASES:
        text = re.sub(pattern, replacement, text)
    reading.excluded = [(found.strip(), stems(found)) for found in _EXCLUDE.findall(text)]
    text = _EXCLUDE.sub(" ", text)
    reading.bulk = bool(_BULK.search(message.lower()))
    reading.repeat = 2 if _TWICE.search(text) else 1
    if (found := _WORKFLOW_ID.search(message)) and _STATUS.search(message.lower()):
        reading.status_of = found.group()
    for clause in re.split(r"\band\b|\bthen\b|[;:.?!]", text):
        clause_stems = stems(clause)
        if clause_stems:
            reading.clauses.append(clause_stems)
            reading.words.append(_first_word(clause))
    return reading


GENERIC = frozenset(stem(word) for word in ("handle", "take", "care", "help", "run", "deal", "sort", "manage", "look"))
"""The stems of verbs that ask for a whole flow rather than one step ("handle order ...")."""


def _first_word(clause: str) -> str:
    for word in re.findall(r"[a-z][a-z'-]*", clause):
        if word not in STOPWORDS and stem(word) not in STOPWORDS:
            return word
    return clause.strip()


def _values(message: str) -> dict[str, JsonValue]:
    values: dict[str, JsonValue] = {}
    for name, pattern in _VALUES:
        match = pattern.search(message)
        if match is None:
            continue
        value = (match.group(1) if match.groups() else match.group()).strip()
        values[name] = int(value) if name == "quantity" else float(value) if name == "amount" else value
    if isinstance(tier := values.get("subscription_tier"), str):
        values["subscription_tier"] = tier.lower()
    return values
