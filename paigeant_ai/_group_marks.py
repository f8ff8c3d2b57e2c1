"""What the join store says about a whole parallel group, signed: that it failed, and by which branch.

The join store sits in a Redis that others may write to; a mark there decides what a branch does (a branch of a
group marked failed is undone, never joined), so the mark is signed by the worker that set it and bound to its
workflow, its group's step and its branch. A mark that does not verify is never acted on: it is logged and set
aside (see `paigeant_ai._fan`).
"""

from __future__ import annotations

import logging

from pydantic import Field, ValidationError

from ._escape import escape_control
from ._wire import FROM_WIRE, Wire
from .exceptions import SecurityError
from .security import MessageSecurity

__all__ = ("GROUP_MARK_TYPE", "GroupMark", "read_mark")

logger = logging.getLogger("paigeant_ai.worker")

GROUP_MARK_TYPE = "paigeant-group-mark+jws"


class GroupMark(Wire):
    """A group that failed: which branch failed it, signed by that branch's worker."""

    correlation_id: str
    step: int = Field(ge=0)
    key: str
    """The branch that failed the group."""
    signature: str | None = Field(default=None, repr=False)

    def _signed_bytes(self) -> bytes:
        return self.model_dump_json(exclude={"signature"}).encode()

    def sign(self, security: MessageSecurity) -> GroupMark:
        """This mark, signed with `security`'s key."""
        signature = security.sign_bytes(self._signed_bytes(), typ=GROUP_MARK_TYPE)
        return self.model_copy(update={"signature": signature})

    def to_bytes(self) -> bytes:
        """The mark as the join store keeps it."""
        return self.model_dump_json().encode()


def read_mark(raw: bytes | None, security: MessageSecurity, *, correlation_id: str, step: int) -> GroupMark | None:
    """The mark `raw` read from the join store for group `step` of workflow `correlation_id`, once it verifies and is
    that group's; None when there is none, or when it does not verify (which is logged: it is never acted on)."""
    if raw is None:
        return None
    where = f"the failure mark of group {correlation_id}/{step} in the join store"
    try:
        mark = GroupMark.model_validate_json(raw, context=FROM_WIRE)
        security.verify_bytes(mark.signature, mark._signed_bytes(), typ=GROUP_MARK_TYPE)  # pyright: ignore[reportPrivateUsage]
    except (ValidationError, SecurityError) as exc:
        logger.warning("%s does not verify and is ignored: %s", where, escape_control(str(exc)))
        return None
    if (mark.correlation_id, mark.step) != (correlation_id, step):
        logger.warning("%s is another group's and is ignored", where)
        return None
    return mark
