"""Whose a workflow is: the principal that dispatched it, and the principal a planner asks for.

A principal is the subject (`sub`) of the user's on-behalf-of token, or a name the application gives explicitly
(`WorkflowDispatcher.dispatch_workflow(principal=...)`, `PlannerAgentDeps(principal=...)`). Where tokens are
checked (`PAIGEANT_OBO_*`, a `TokenValidator` on the `MessageSigner`), the subject is read from a validated
token; otherwise it is read as the token says, and is only as trustworthy as the application that passes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._tokens import unverified_claims
from .security import MessageSigner

if TYPE_CHECKING:
    from .security import MessageSecurity

__all__ = ("principal_of",)


def principal_of(token: str | None, security: MessageSecurity | None) -> str | None:
    """The subject of `token`: validated by `security`'s token validator when it has one; None without a token
    or without a `sub` claim.

    Raises:
        TokenError: Tokens are checked and `token` fails the check.
    """
    if token is None:
        return None
    validator = security.tokens if isinstance(security, MessageSigner) else None
    claims = validator.validate(token) if validator is not None else unverified_claims(token)
    subject = claims.get("sub")
    return subject if isinstance(subject, str) and subject else None
