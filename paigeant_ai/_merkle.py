"""A Merkle tree over a few pieces of data, so that one signature over its root vouches for each piece on its own.

The tree is RFC 6962's (section 2.1) with SHA-256: a leaf is `SHA-256(0x00 || data)`, an inner node
`SHA-256(0x01 || left || right)`, and a tree of `n > 1` leaves is split after the largest power of two below `n`.
The distinct prefixes keep a node from passing for a leaf. A piece is proved by its index, the number of leaves and
its audit path: the siblings' digests from the leaf up. The index and the number of leaves decide which side each
sibling is on and how many there are, so a path proves one position of one tree, and no other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

__all__ = ("MAX_LEAVES", "MerkleError", "leaf_digest", "root_from_path", "tree")

MAX_LEAVES = 1 << 16
"""The most leaves a tree may have: its audit paths then hold at most 16 digests."""
DIGEST_SIZE = 32

_LEAF = b"\x00"
_NODE = b"\x01"


class MerkleError(ValueError):
    """An audit path that proves nothing: a position outside the tree, or a path of the wrong length or digests."""


def leaf_digest(data: bytes) -> bytes:
    """The digest a piece of data stands for in the tree."""
    return hashlib.sha256(_LEAF + data).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(_NODE + left + right).digest()


def _split(size: int) -> int:
    """How many of `size > 1` leaves go left: the largest power of two below `size`."""
    return 1 << ((size - 1).bit_length() - 1)


def tree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    """The root over `leaves` (leaf digests) and each leaf's audit path, its siblings from the leaf up.

    Raises:
        MerkleError: No leaves, or more than `MAX_LEAVES`.
    """
    if not 0 < len(leaves) <= MAX_LEAVES:
        raise MerkleError(f"a tree has 1 to {MAX_LEAVES} leaves, not {len(leaves)}")
    return _subtree(leaves)


def _subtree(leaves: Sequence[bytes]) -> tuple[bytes, list[list[bytes]]]:
    if len(leaves) == 1:
        return leaves[0], [[]]
    half = _split(len(leaves))
    left, left_paths = _subtree(leaves[:half])
    right, right_paths = _subtree(leaves[half:])
    for path in left_paths:
        path.append(right)
    for path in right_paths:
        path.append(left)
    return _node(left, right), left_paths + right_paths


def _sides(index: int, size: int) -> list[bool]:
    """For the leaf at `index` of `size`, from the root down: whether it lies in the right subtree at each level."""
    sides: list[bool] = []
    while size > 1:
        half = _split(size)
        on_right = index >= half
        sides.append(on_right)
        index, size = (index - half, size - half) if on_right else (index, half)
    return sides


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that `path` proves the leaf digest `leaf` is at `index` of, in a tree of `size` leaves.

    The caller compares it with a root it trusts: a leaf, index or path that does not belong there gives another.

    Raises:
        MerkleError: `index` is not a position of a tree of `size` leaves, or the path is not as long as that
            position's, or holds something other than digests.
    """
    if not 0 < size <= MAX_LEAVES or not 0 <= index < size:
        raise MerkleError(f"no leaf {index} in a tree of {size} leaves")
    sides = _sides(index, size)
    if len(path) != len(sides):
        raise MerkleError(f"leaf {index} of {size} has a path of {len(sides)} digests, not {len(path)}")
    digest = leaf
    for sibling, on_right in zip(path, reversed(sides), strict=True):
        if len(sibling) != DIGEST_SIZE:
            raise MerkleError(f"a path holds digests of {DIGEST_SIZE} bytes, not {len(sibling)}")
        digest = _node(sibling, digest) if on_right else _node(digest, sibling)
    return digest
