"""A batch of events for several workflows is signed once for their progress streams: each workflow's part carries a
Merkle proof against that one signature, verifies on its own, and proves nothing anywhere else."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from joserfc.jwk import Key
from pydantic_core import to_json

from bench import progress_cost
from paigeant_ai import ActivityContext, WatchedEvent, Worker, WorkflowDispatcher, activity
from paigeant_ai._event_auth import authenticate_progress
from paigeant_ai._events import EVENTS_SIGNATURE_HEADER, EVENTS_SIGNATURE_TYPE, events_headers
from paigeant_ai._merkle import MAX_LEAVES, MerkleError, leaf_digest, root_from_path, tree
from paigeant_ai._progress_proof import (
    PROGRESS_PROOF_HEADER,
    PROGRESS_SIGNATURE_HEADER,
    PROGRESS_SIGNATURE_TYPE,
    sign_parts,
)
from paigeant_ai._progress_write import ProgressWriter
from paigeant_ai.exceptions import SecurityError
from paigeant_ai.security import MessageSigner, generate_key
from paigeant_ai.transports import InMemoryTransport, ProgressStreams, Transport
from paigeant_ai.transports.base import ProgressEntry
from paigeant_ai.trust import TrustPolicy

DISPATCHER_KEY = generate_key("orders-api-1")
WORKER_KEY = generate_key("billing-worker-1")
MALLORY_KEY = generate_key("mallory-1")
POLICY = TrustPolicy.load({"keys": {"orders-api-1": {"may": ["start"]}, "billing-worker-1": {}}})


class Counting(MessageSigner):
    """A signer that counts what it signs and verifies, by type."""

    def __init__(self, key: Key = WORKER_KEY, policy: TrustPolicy | None = POLICY) -> None:
        super().__init__(key, [DISPATCHER_KEY, WORKER_KEY], policy=policy)
        self.signed: dict[str, int] = {}
        self.verified: dict[str, int] = {}

    def sign_bytes(self, payload: bytes, *, typ: str) -> str | None:
        self.signed[typ] = self.signed.get(typ, 0) + 1
        return super().sign_bytes(payload, typ=typ)

    def verify_bytes(self, signature: str | None, payload: bytes, *, typ: str) -> str | None:
        self.verified[typ] = self.verified.get(typ, 0) + 1
        return super().verify_bytes(signature, payload, typ=typ)


class WrongType(MessageSigner):
    """A trusted signer that signs everything it is asked to as a batch on `events`."""

    def sign_bytes(self, payload: bytes, *, typ: str) -> str | None:
        return super().sign_bytes(payload, typ=EVENTS_SIGNATURE_TYPE)


def _events(workflows: int) -> list[dict[str, object]]:
    """A batch: workflow i reports one event, or two when i is odd, interleaved as a busy worker reports them."""
    events: list[dict[str, object]] = []
    for i in range(workflows):
        events.append({"kind": "step_started", "correlation_id": f"wf-{i}", "activity": "a", "step": 0})
    for i in range(1, workflows, 2):
        events.append({"kind": "step_completed", "correlation_id": f"wf-{i}", "activity": "a", "step": 0})
    return events


async def _entries(transport: InMemoryTransport, correlation_id: str) -> list[ProgressEntry]:
    reader = await transport.read_progress(correlation_id)
    try:
        return await reader.read(0)
    finally:
        await reader.aclose()


@dataclass
class Written:
    security: Counting
    events: list[dict[str, object]]
    body: bytes
    entries: dict[str, ProgressEntry]


async def _write(workflows: int) -> Written:
    """A batch of `workflows` workflows, written into their streams as a worker writes it."""
    security = Counting()
    events = _events(workflows)
    body = to_json(events)
    headers = events_headers(security, body)
    async with InMemoryTransport() as transport:
        await ProgressWriter(transport, security).write(events, body, headers)
        entries = {f"wf-{i}": await _entries(transport, f"wf-{i}") for i in range(workflows)}
    assert all(len(written) == 1 for written in entries.values())
    return Written(security, events, body, {cid: written[0] for cid, written in entries.items()})


@pytest.mark.parametrize("workflows", [1, 2, 3, 7, 500])
async def test_every_part_of_a_batch_verifies_on_its_own_under_one_signature(workflows: int) -> None:
    written = await _write(workflows)
    for cid, entry in written.entries.items():
        events = authenticate_progress(written.security, cid, entry.body, entry.headers)
        assert [(event.kind, event.correlation_id) for event in events] == [
            (values["kind"], cid) for values in written.events if values["correlation_id"] == cid
        ]
    progress_signatures = {entry.headers.get(PROGRESS_SIGNATURE_HEADER) for entry in written.entries.values()}
    if workflows == 1:
        # A batch of one workflow goes in as it was published: the batch's own signature, nothing more.
        assert written.entries["wf-0"].body == written.body
        assert set(written.entries["wf-0"].headers) == {EVENTS_SIGNATURE_HEADER}
        assert written.security.signed == {EVENTS_SIGNATURE_TYPE: 1}
    else:
        assert len(progress_signatures) == 1
        assert written.security.signed == {EVENTS_SIGNATURE_TYPE: 1, PROGRESS_SIGNATURE_TYPE: 1}


async def test_an_unsigned_batch_goes_in_unsigned() -> None:
    unsigned = MessageSigner(unsigned=True)
    events = _events(3)
    body = to_json(events)
    async with InMemoryTransport() as transport:
        await ProgressWriter(transport, unsigned).write(events, body, events_headers(unsigned, body))
        (entry,) = await _entries(transport, "wf-1")
    assert entry.headers == {}
    assert [event.kind for event in authenticate_progress(unsigned, "wf-1", entry.body, entry.headers)] == [
        "step_started",
        "step_completed",
    ]


@dataclass
class Presented:
    """What a reader is handed: the workflow it watches, and an entry's body and headers."""

    correlation_id: str
    body: bytes
    headers: dict[str, str]


def _proof(index: int, leaves: int, path: list[str]) -> str:
    return ".".join([str(index), str(leaves), *path])


def _path_of(entry: ProgressEntry) -> list[str]:
    return entry.headers[PROGRESS_PROOF_HEADER].split(".")[2:]


def _tampered(w: Written) -> Presented:
    entry = w.entries["wf-3"]
    return Presented("wf-3", entry.body.replace(b"step_completed", b"step_skipped"), dict(entry.headers))


def _another_leafs_path(w: Written) -> Presented:
    return Presented("wf-3", w.entries["wf-3"].body, dict(w.entries["wf-5"].headers))


def _swapped_index(w: Written) -> Presented:
    entry = w.entries["wf-3"]
    return Presented("wf-3", entry.body, {**entry.headers, PROGRESS_PROOF_HEADER: _proof(2, 7, _path_of(entry))})


def _fewer_leaves(w: Written) -> Presented:
    entry = w.entries["wf-3"]
    return Presented("wf-3", entry.body, {**entry.headers, PROGRESS_PROOF_HEADER: _proof(3, 4, _path_of(entry)[:2])})


def _another_workflows_part(w: Written) -> Presented:
    entry = w.entries["wf-5"]
    return Presented("wf-3", entry.body, dict(entry.headers))


def _unsigned(w: Written) -> Presented:
    entry = w.entries["wf-3"]
    return Presented("wf-3", entry.body, {PROGRESS_PROOF_HEADER: entry.headers[PROGRESS_PROOF_HEADER]})


def _without_proof(w: Written) -> Presented:
    entry = w.entries["wf-3"]
    return Presented("wf-3", entry.body, {PROGRESS_SIGNATURE_HEADER: entry.headers[PROGRESS_SIGNATURE_HEADER]})


def _resigned(signer: MessageSigner) -> Callable[[Written], Presented]:
    def presented(w: Written) -> Presented:
        parts = [(cid, entry.body) for cid, entry in w.entries.items()]
        return Presented("wf-3", w.entries["wf-3"].body, sign_parts(signer, parts)[3])

    return presented


def _events_signature(w: Written) -> Presented:
    """The batch's own signature (a `paigeant-events+jws`) where the tree's should be."""
    batch = events_headers(w.security, w.body) or {}
    entry = w.entries["wf-3"]
    return Presented("wf-3", entry.body, {**entry.headers, PROGRESS_SIGNATURE_HEADER: batch[EVENTS_SIGNATURE_HEADER]})


def _bad_proof(proof: str) -> Callable[[Written], Presented]:
    def presented(w: Written) -> Presented:
        entry = w.entries["wf-3"]
        return Presented("wf-3", entry.body, {**entry.headers, PROGRESS_PROOF_HEADER: proof})

    return presented


DIGEST = base64.urlsafe_b64encode(bytes(32)).decode().rstrip("=")

REFUSED = {
    "a tampered part": (_tampered, "bad_signature"),
    "the path of another leaf": (_another_leafs_path, "bad_signature"),
    "a swapped index": (_swapped_index, "bad_signature"),
    "the same part in a smaller tree": (_fewer_leaves, "bad_signature"),
    "another workflow's part": (_another_workflows_part, "bad_signature"),
    "no signature": (_unsigned, "unsigned"),
    "no proof": (_without_proof, "progress_proof"),
    "an untrusted key": (_resigned(MessageSigner(MALLORY_KEY, [MALLORY_KEY])), "unknown_kid"),
    "the tree signed as events": (_resigned(WrongType(WORKER_KEY, [WORKER_KEY])), "header"),
    "the batch's events signature": (_events_signature, "header"),
    "an index outside the tree": (_bad_proof(_proof(7, 7, [DIGEST] * 3)), "progress_proof"),
    "a path too long": (_bad_proof(_proof(3, 7, [DIGEST] * 33)), "progress_proof"),
    "a path one digest too long": (_bad_proof(_proof(3, 7, [DIGEST] * 4)), "progress_proof"),
    "more leaves than a tree holds": (_bad_proof(_proof(0, MAX_LEAVES + 1, [DIGEST] * 17)), "progress_proof"),
    "a digest that is not base64url": (_bad_proof(_proof(3, 7, [DIGEST, DIGEST, "!" * 43])), "progress_proof"),
    "a signed number": (_bad_proof(_proof(3, 7, [DIGEST] * 3).replace("3", "+3", 1)), "progress_proof"),
}


@pytest.mark.parametrize(("make", "code"), REFUSED.values(), ids=REFUSED.keys())
async def test_a_part_that_is_not_exactly_what_was_signed_for_its_workflow_is_refused(
    make: Callable[[Written], Presented], code: str
) -> None:
    written = await _write(7)
    presented = make(written)
    with pytest.raises(SecurityError) as refused:
        authenticate_progress(written.security, presented.correlation_id, presented.body, presented.headers)
    assert refused.value.code == code


async def test_a_signed_part_with_events_of_another_workflow_is_refused() -> None:
    """Only a faulty writer signs such a part: the reader still keeps to the workflow it watches."""
    security = Counting()
    mixed = to_json([{"kind": "step_started", "correlation_id": "wf-9"}])
    headers = sign_parts(security, [("wf-1", mixed), ("wf-2", to_json([]))])[0]
    with pytest.raises(SecurityError, match="events of another workflow") as refused:
        authenticate_progress(security, "wf-1", mixed, headers)
    assert refused.value.code == "progress_part"


async def test_only_a_key_allowed_to_start_workflows_reports_a_dispatch_in_a_part() -> None:
    parts = [(cid, to_json([{"kind": "dispatched", "correlation_id": cid, "owner": "x"}])) for cid in ("a", "b")]
    reader = Counting()
    dispatcher_headers = sign_parts(Counting(DISPATCHER_KEY), parts)[0]
    assert [event.owner for event in authenticate_progress(reader, "a", parts[0][1], dispatcher_headers)] == ["x"]
    worker_headers = sign_parts(Counting(WORKER_KEY), parts)[0]
    with pytest.raises(SecurityError) as refused:
        authenticate_progress(reader, "a", parts[0][1], worker_headers)
    assert refused.value.code == "not_allowed"


@pytest.mark.parametrize("leaves", [1, 2, 3, 4, 5, 7, 8, 9, 500])
def test_every_path_of_a_tree_leads_to_its_root_and_no_other_position_does(leaves: int) -> None:
    digests = [leaf_digest(str(i).encode()) for i in range(leaves)]
    root, paths = tree(digests)
    for index, path in enumerate(paths):
        assert len(path) <= 32
        assert root_from_path(digests[index], index, leaves, path) == root
        for other in {0, index - 1, index + 1, leaves - 1} - {index}:
            if 0 <= other < leaves:
                with_other_index = _root_or_none(digests[index], other, leaves, path)
                assert with_other_index != root


def _root_or_none(leaf: bytes, index: int, size: int, path: list[bytes]) -> bytes | None:
    try:
        return root_from_path(leaf, index, size, path)
    except MerkleError:
        return None


def test_the_tree_is_rfc_6962_s_and_a_node_cannot_pass_for_a_leaf() -> None:
    def sha(data: bytes) -> bytes:
        return hashlib.sha256(data).digest()

    a, b, c = (sha(b"\x00" + data) for data in (b"a", b"b", b"c"))
    root, _ = tree([a, b, c])
    assert root == sha(b"\x01" + sha(b"\x01" + a + b) + c)
    # The two children of the left node, presented as the data of one leaf, make another digest.
    assert leaf_digest(a + b) != sha(b"\x01" + a + b)


def test_a_tree_is_bounded() -> None:
    with pytest.raises(MerkleError):
        tree([])
    with pytest.raises(MerkleError):
        tree([bytes(32)] * (MAX_LEAVES + 1))


@activity(name="proof-one")
async def _one(ctx: ActivityContext) -> dict[str, int]:
    return {"one": 1}


@activity(name="proof-two")
async def _two(ctx: ActivityContext) -> dict[str, int]:
    return {"two": 2}


async def test_workflows_run_together_are_each_watched_whole_from_proved_parts(transport: Transport) -> None:
    assert isinstance(transport, ProgressStreams)
    watching = Counting(DISPATCHER_KEY, policy=None)
    dispatcher = WorkflowDispatcher(transport, security=watching)
    worker = Worker(transport, [_one, _two], concurrency=20, security=Counting(WORKER_KEY, policy=None))
    running = asyncio.create_task(worker.run())
    try:
        cids = await asyncio.gather(*(dispatcher.dispatch_workflow(["proof-one", "proof-two"]) for _ in range(20)))
        watched = [await asyncio.wait_for(_watch(dispatcher, cid), 30) for cid in cids]
    finally:
        worker.stop()
        await asyncio.wait_for(running, 30)
    for cid, items in zip(cids, watched, strict=True):
        assert {item.event.correlation_id for item in items} == {cid}
        assert sorted(item.event.kind for item in items) == sorted(
            ["dispatched", "step_started", "step_completed", "step_started", "step_completed", "completed"]
        )
    assert watching.verified.get(PROGRESS_SIGNATURE_TYPE, 0) > 0, "the worker's batches held several workflows"


async def _watch(dispatcher: WorkflowDispatcher, cid: str) -> list[WatchedEvent]:
    return [item async for item in dispatcher.watch(cid)]


async def test_the_progress_bench_signs_once_a_batch_where_it_signed_once_a_workflow() -> None:
    """The bench's variants differ in what they sign (counted, not timed)."""
    workflows, hops = 30, 90
    measured = await progress_cost.measure(workflows=workflows, runs=1)
    off, apart, once = (round(measured[variant].signed[0] * hops) for variant in progress_cost.VARIANTS)
    # The events' batches are cut by timing, so each run may sign one or two more or fewer of them.
    assert apart - off >= workflows - 3  # a signature per workflow's progress entries
    assert once - off < (apart - off) / 3  # one per batch of workflows: a few
