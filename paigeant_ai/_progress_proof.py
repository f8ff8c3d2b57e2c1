"""One signature for the parts of a batch of events that go to several workflows' progress streams.

A batch of events (one message on `events`) often holds events of several workflows, and each workflow's progress
stream must get its own part only: a watcher of one workflow sees nothing of another's. Rather than sign each part,
the writer signs once, a detached JWS of type `paigeant-progress+jws` over a statement of the root of a Merkle tree
(`paigeant_ai._merkle`) whose leaves are the parts, and of the number of leaves. Each part goes into its stream with
that signature and its proof: its index in the tree and its audit path.

A leaf binds a part to its workflow: it is the digest of the workflow's ID (its UTF-8 length in four bytes, then
its bytes) followed by the part's exact bytes. A reader computes the leaf from the workflow it watches and the bytes
it read, the root from the proof, and checks the signature over the statement it rebuilds: a part altered, moved to
another position or another workflow's stream, or proved with another leaf's path gives another root, and the
signature does not hold.

The headers of such an entry:

- `x-paigeant-progress-signature`: the JWS, the same for every part of the batch.
- `x-paigeant-progress-proof`: `<index>.<leaves>` then `.<digest>` for each sibling from the leaf up, the digests
  in unpadded base64url.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pydantic_core import to_json

from ._merkle import DIGEST_SIZE, MAX_LEAVES, MerkleError, leaf_digest, root_from_path, tree
from .exceptions import SecurityError

if TYPE_CHECKING:
    from .security import MessageSecurity

__all__ = (
    "PROGRESS_PROOF_HEADER",
    "PROGRESS_SIGNATURE_HEADER",
    "PROGRESS_SIGNATURE_TYPE",
    "is_proved_part",
    "sign_parts",
    "verify_part",
)

PROGRESS_SIGNATURE_TYPE = "paigeant-progress+jws"
"""The `typ` of the signature over a batch's tree: no other signature can pass for it, nor it for another."""
PROGRESS_SIGNATURE_HEADER = "x-paigeant-progress-signature"
PROGRESS_PROOF_HEADER = "x-paigeant-progress-proof"

_MAX_PATH = 32
_DIGEST_CHARS = 43  # 32 bytes in unpadded base64url
_NUMBER = r"(?:0|[1-9][0-9]{0,5})"
_PROOF = re.compile(rf"({_NUMBER})\.({_NUMBER})((?:\.[A-Za-z0-9_-]{{{_DIGEST_CHARS}}}){{0,{_MAX_PATH}}})")


def _leaf(correlation_id: str, body: bytes) -> bytes:
    name = correlation_id.encode()
    return leaf_digest(len(name).to_bytes(4, "big") + name + body)


def _statement(root: bytes, leaves: int) -> bytes:
    """What the signature covers: the tree's root and its number of leaves (so the index is read in the right tree)."""
    return to_json({"v": 1, "leaves": leaves, "root": _b64(root)})


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def sign_parts(security: MessageSecurity, parts: Sequence[tuple[str, bytes]]) -> list[dict[str, str]]:
    """The headers that sign each of `parts` (a workflow's ID and its events of one batch) with one signature.

    Returns:
        One mapping of headers a part, in order; empty mappings when `security` does not sign.

    Raises:
        MerkleError: No parts, or more than `MAX_LEAVES`.
    """
    root, paths = tree([_leaf(correlation_id, body) for correlation_id, body in parts])
    signature = security.sign_bytes(_statement(root, len(parts)), typ=PROGRESS_SIGNATURE_TYPE)
    if signature is None:
        return [{} for _ in parts]
    proofs = _proofs(paths)
    return [{PROGRESS_SIGNATURE_HEADER: signature, PROGRESS_PROOF_HEADER: proof} for proof in proofs]


def _proofs(paths: list[list[bytes]]) -> list[str]:
    """Each leaf's proof header. A sibling is on the paths of every leaf of the other half of its subtree: each
    digest is encoded once."""
    encoded: dict[bytes, str] = {}
    proofs: list[str] = []
    for index, path in enumerate(paths):
        for digest in path:
            if digest not in encoded:
                encoded[digest] = _b64(digest)
        proofs.append(".".join([str(index), str(len(paths)), *[encoded[digest] for digest in path]]))
    return proofs


def is_proved_part(headers: Mapping[str, str]) -> bool:
    """Whether an entry claims to be a part of a batch signed once (else it is signed as a batch on `events`)."""
    return PROGRESS_SIGNATURE_HEADER in headers or PROGRESS_PROOF_HEADER in headers


def verify_part(security: MessageSecurity, correlation_id: str, body: bytes, headers: Mapping[str, str]) -> str | None:
    """The key that signed the batch `body` is `correlation_id`'s part of; None when messages are not signed.

    Raises:
        SecurityError: No proof or no signature, a proof that cannot be read or does not lead to the root that
            was signed, a signature of another type, or not by a trusted key.
    """
    index, leaves, path = _read_proof(headers.get(PROGRESS_PROOF_HEADER))
    try:
        root = root_from_path(_leaf(correlation_id, body), index, leaves, path)
    except MerkleError as exc:
        raise SecurityError(f"the proof of a progress part holds nothing: {exc}", code="progress_proof") from exc
    return security.verify_bytes(
        headers.get(PROGRESS_SIGNATURE_HEADER), _statement(root, leaves), typ=PROGRESS_SIGNATURE_TYPE
    )


def _read_proof(text: str | None) -> tuple[int, int, list[bytes]]:
    """The index, the number of leaves and the audit path a proof header holds."""
    matched = _PROOF.fullmatch(text or "")
    if matched is None:
        raise SecurityError(
            "a progress part without a readable proof (`<index>.<leaves>.<digest>...`)", code="progress_proof"
        )
    index, leaves = int(matched[1]), int(matched[2])
    if leaves > MAX_LEAVES:
        raise SecurityError(f"a progress proof of {leaves} leaves: at most {MAX_LEAVES}", code="progress_proof")
    try:
        path = [base64.urlsafe_b64decode(digest + "=") for digest in matched[3].split(".")[1:]]
    except (binascii.Error, ValueError) as exc:
        raise SecurityError("a progress proof whose path is not base64url digests", code="progress_proof") from exc
    if any(len(digest) != DIGEST_SIZE for digest in path):
        raise SecurityError("a progress proof whose path is not base64url digests", code="progress_proof")
    return index, leaves, path
