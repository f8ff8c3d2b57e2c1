"""Where each thing lives in Redis: every key name of the transport and its stores, in one place.

Redis Cluster runs a script or a transaction only on keys of one hash slot, and a key's slot is that of its hash
tag, the text between its first `{` and the next `}`. So every key belongs to one owner and carries its owner's tag:

- an address (`{q:<address>}`): its stream, the stream's delivery counts, its delayed messages, its consumers'
  heartbeats and the markers of the publishes to it. The scripts that move an entry (retry, promote, give back)
  touch one address only.
- a workflow (`{w:<correlation id>}`): its events and owner, its cancel records, its progress stream, its parked
  step.
- a parallel group (`{j:<group>}`): its branches' results and the key of its parked branch.
- the registry (`{registry}`): its records and their expiries.

Keys nothing touches together with another stay untagged (`done:`, `replay:`, the claims, the indexes of parked
and of all workflows), so they spread over the cluster on their own. Different owners land in different slots, so
addresses and workflows spread over the nodes. The kind letter before the colon keeps a tag from ever being
empty, whatever the name holds; a namespace with a `{` in it puts every key in one slot (it still works).
"""

from __future__ import annotations

__all__ = (
    "address_key",
    "group_key",
    "registry_keys",
    "workflow_key",
)


def address_key(namespace: str, address: str, suffix: str = "") -> str:
    """A key of `address`: its stream with no `suffix`, else `<stream>:<suffix>`."""
    return f"{namespace}:{{q:{address}}}" + (f":{suffix}" if suffix else "")


def workflow_key(namespace: str, correlation_id: str, kind: str) -> str:
    """The key of one kind of record (`events`, `cancel`...) of the workflow `correlation_id`."""
    return f"{namespace}:{{w:{correlation_id}}}:{kind}"


def group_key(namespace: str, group: str) -> str:
    """The hash of one parallel group's results."""
    return f"{namespace}:{{j:{group}}}"


def registry_keys(namespace: str) -> list[str]:
    """The hash of the registry's records and the sorted set of their expiries."""
    return [f"{namespace}:{{registry}}", f"{namespace}:{{registry}}:until"]
