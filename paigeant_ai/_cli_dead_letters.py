"""`paigeant dead-letters`: browse the dead-letter queue, and send a letter back to the step it failed at."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import ValidationError

from . import observability
from ._cli_workflows import ambiguous, command_transport
from ._escape import escape_control
from ._events import EventReporter
from ._long_steps import WATCH_HEADER
from ._sealing import seal
from ._wire import FROM_WIRE
from .approval import ParkedStep, WaitingStore, verified
from .contracts import DEAD_LETTER, ActivityLogEntry, PaigeantMessage
from .exceptions import InvalidMessage, SecurityError, UserError
from .security import MessageSecurity, MessageSigner, own_kid
from .settings import Settings
from .transports import IN_MEMORY_NAMES, Transport
from .transports.base import REASON_HEADER, SOURCE_HEADER, Delivery, SharedStores

__all__ = (
    "DeadLetter",
    "add_command",
    "browse_dead_letters",
    "park_again",
    "replay_dead_letter",
    "replay_id",
    "replay_letter",
    "run_command",
    "signed_failure",
)


def add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: Sequence[argparse.ArgumentParser] = ()
) -> None:
    """Add `dead-letters` to the `paigeant` parser; `common` holds the options every broker command takes."""
    letters = commands.add_parser(
        "dead-letters", parents=list(common), help="list the dead-letter queue with reasons, or replay one"
    )
    letters.add_argument("--limit", type=int, default=50, help="how many letters to show (default 50)")
    letters.add_argument(
        "--replay",
        metavar="ID",
        help="send this letter back to its step (once its cause is fixed): its message ID or its workflow's, "
        "or a prefix only it starts with",
    )


async def run_command(args: argparse.Namespace) -> int:
    """Run `paigeant dead-letters`; the exit code."""
    if args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    return await _dead_letters(args.transport, limit=args.limit, replay=args.replay)


@dataclass(slots=True)
class DeadLetter:
    """One letter of the dead-letter queue."""

    delivery: Delivery
    message: PaigeantMessage | None
    problem: str | None
    """Why the body is not a paigeant message, if it is not."""

    @property
    def reason(self) -> str:
        return self.delivery.headers.get(REASON_HEADER, "(no reason recorded)")

    @property
    def source(self) -> str:
        return self.delivery.headers.get(SOURCE_HEADER, "?")


def _letter(delivery: Delivery) -> DeadLetter:
    try:
        return DeadLetter(delivery, PaigeantMessage.from_json(delivery.body), None)
    except InvalidMessage as exc:
        return DeadLetter(delivery, None, str(exc))


async def browse_dead_letters(transport: Transport, visit: Callable[[DeadLetter], Awaitable[bool]]) -> int:
    """Show each letter waiting in the dead-letter queue to `visit`, oldest first; the number seen.

    A letter `visit` returns True for is put back at the end of the queue; the others are removed (after
    `visit` has done what it does with them). Letters arriving meanwhile wait for the next browse.
    """
    total = await transport.pending(DEAD_LETTER)
    seen = 0
    if total == 0:
        return 0
    async with await transport.consume(DEAD_LETTER, prefetch=min(total, 100)) as consumer:
        while seen < total:
            try:
                async with asyncio.timeout(2.0):
                    delivery = await anext(consumer)
            except (TimeoutError, StopAsyncIteration):
                break  # the rest is held by another consumer
            seen += 1
            if await visit(_letter(delivery)):
                await transport.publish(DEAD_LETTER, delivery.body, headers=delivery.headers)
            await transport.ack(delivery)
    return seen


async def replay_dead_letter(
    transport: Transport,
    letter: DeadLetter,
    signer: MessageSecurity,
    waiting_store: WaitingStore | None = None,
) -> PaigeantMessage:
    """Send a letter back to the step it failed at, keeping its identity, so that nothing runs twice.

    The decision rests on what the letter's signature covers, never on its headers (anyone who can publish to
    the dead-letter queue writes those). The letter must be signed by a trusted key; then:

    - a hop the worker faulted (its signed log ends with the failure of its current step, at its attempt) is sent
      as the next attempt, signed by `signer`, under an id derived from that signed failure: replaying the same
      letter again makes the same hop, which the workers' replay cache refuses or skips;
    - any other letter (a hop refused as it arrived, a poison message, or a captured hop put there with a
      harmless-looking reason) is sent back exactly as it arrived, with its own id and signature: the worker checks
      it in full again, and its replay cache refuses a hop that already ran;
    - a resume (a hop that carries a parked record and the answers to it) is not sent at all: its answers were used
      once. Its parked record, once it verifies, is put back in `waiting_store` (by default the one the transport's
      processes share, see `get_waiting_store`), signed anew by `signer`, so the workflow waits for new answers
      (`park_again`).

    Returns:
        The message sent (for a resume, the message of the record put back).

    Raises:
        UserError: The letter is not a paigeant message, its workflow has no step left, no trusted key signed it, or
            it is a resume that cannot be parked again (see `park_again`).
    """
    message = letter.message
    if message is None or message.routing_slip.current is None:
        raise UserError(f"this letter cannot be replayed: {letter.problem or 'its workflow has no step left'}")
    if isinstance(signer, MessageSigner):
        try:  # resending or re-signing vouches for the letter: only one a trusted key signed as it is gets that
            signer.check_signature(message, letter.delivery.body)
        except SecurityError as exc:
            raise UserError(f"this letter cannot be replayed: {exc}") from None
    if message.resume is not None and message.resume.parked is not None:
        return await park_again(transport, letter, signer, waiting_store)
    failure = signed_failure(message)
    if failure is None:
        replay, body = message, letter.delivery.body  # as it arrived: its identity is its id and signature
        with observability.replay_span(replay, transport.name):
            await transport.publish(message.routing_slip.current, body, headers=_hop_headers(letter.delivery.headers))
    else:
        replay = message.next_hop(attempt=message.attempt + 1)
        replay.message_id = replay_id(message, failure)
        with observability.replay_span(replay, transport.name):
            body = seal(replay, signer, max_bytes=Settings.from_env().max_message_bytes)
            await transport.publish(message.routing_slip.current, body, headers=dict(replay.headers))
    await EventReporter(transport, batched=False, on_span=False, security=signer).report(
        "replayed", replay, detail="from the dead-letter queue"
    )
    return replay


async def park_again(
    transport: Transport, letter: DeadLetter, signer: MessageSecurity, waiting_store: WaitingStore | None
) -> PaigeantMessage:
    """Put the parked record a resume letter carries back in the waiting store, signed anew by `signer`; its message.

    Raises:
        UserError: The transport's waiting store is process-local and none is given, the record does not verify,
            `signer`'s key may not send to its step, or the workflow waits already.
    """
    message = letter.message
    assert message is not None
    assert message.resume is not None
    assert message.resume.parked is not None
    cid = message.correlation_id
    store = waiting_store or (transport.waiting_store() if isinstance(transport, SharedStores) else None)
    if store is None:
        raise UserError(
            f"this letter resumed workflow {cid!r}, so replaying it means parking the workflow again in the waiting "
            f"store its workers share, and {transport.name}'s is in each process's memory: it stays in the "
            "dead-letter queue (from Python, pass replay_dead_letter(..., waiting_store=<the workers' store>))"
        )
    try:
        parked = ParkedStep.model_validate(message.resume.parked, context=FROM_WIRE)
        parked.verify(signer)
    except (ValidationError, SecurityError) as exc:
        raise UserError(f"this letter cannot be replayed: its parked record is refused: {exc}") from None
    kid = own_kid(signer)
    if kid is not None and not signer.policy.may_send_to(kid, parked.activity):
        raise UserError(
            f"this letter cannot be replayed with key {kid!r}: the parked record is signed anew by the replaying "
            f"key, and the trust policy does not let it send to {parked.activity!r}; grant it send_to "
            f"{parked.activity!r}, or replay it with the key of a service that may"
        )
    current = await store.get(cid)
    if current is not None and verified(current, signer):
        raise UserError(f"workflow {cid!r} waits for input already: resume it rather than replay this letter")
    again = parked.model_copy(update={"parked_at": datetime.now(UTC), "proof": None}).sign(signer)
    await store.put(again)
    await EventReporter(transport, batched=False, on_span=False, security=signer).report(
        "in_doubt" if again.in_doubt is not None else "waiting",  # an at-most-once step's doubt stays one
        again.message,
        detail=f"{again.describe()} again (its resume was replayed from the dead-letter queue)",
    )
    return again.message


def signed_failure(message: PaigeantMessage) -> ActivityLogEntry | None:
    """The failure of `message`'s current step at its attempt, when its (signed) log ends with it: the worker
    faulted this hop and published the letter."""
    completed = message.routing_slip.completed
    last = completed[-1] if completed else None
    if last is None or last.outcome != "failed":
        return None
    if last.name != message.routing_slip.current or last.attempt != message.attempt:
        return None
    return last


def replay_id(message: PaigeantMessage, failure: ActivityLogEntry) -> str:
    """The id of the replay of the faulted hop `message`: derived from its signed failure, so the same every time
    (a hop that faults again after a replay is another letter, with another id and attempt)."""
    seed = f"paigeant/v1/replay/{message.message_id}/{failure.name}/{failure.attempt}/{failure.error}".encode()
    digest = hashlib.blake2b(seed, digest_size=16).hexdigest()
    return f"{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:]}"


def _hop_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers a replayed letter goes back with: not why it was dead-lettered, and never as a watch copy."""
    return {key: value for key, value in headers.items() if key not in (REASON_HEADER, SOURCE_HEADER, WATCH_HEADER)}


async def _dead_letters(transport_name: str | None, *, limit: int, replay: str | None) -> int:
    chosen = (transport_name or Settings.from_env().transport).strip().lower()
    if chosen in IN_MEMORY_NAMES:
        raise UserError(
            "the in-memory transport's dead letters live in the process that made them; "
            "use --transport sqlite, rabbitmq or redis (or PAIGEANT_TRANSPORT)"
        )
    async with command_transport(chosen) as transport:
        if replay is not None:
            return await _replay(transport, replay)
        shown: list[DeadLetter] = []

        async def note(letter: DeadLetter) -> bool:
            if len(shown) < limit:
                shown.append(letter)
            return True

        total = await browse_dead_letters(transport, note)
    if not total:
        print("the dead-letter queue is empty")
        return 0
    more = f" (showing the oldest {len(shown)})" if total > len(shown) else ""
    print(f"{total} dead letter{'s' if total != 1 else ''} on {chosen}{more}:")
    for letter in shown:
        print()
        print("  " + _letter_heading(letter))
        print(f"    reason: {escape_control(letter.reason)}")
    print()
    print("replay one once its cause is fixed: paigeant dead-letters --replay <message id>")
    return 0


def _letter_heading(letter: DeadLetter) -> str:
    message = letter.message
    if message is None:
        return escape_control(f"(not a paigeant message: {letter.problem}) from {letter.source}")
    step = f"step {message.step} {message.routing_slip.current}" if message.routing_slip.current else "no step left"
    return escape_control(
        f"message {message.message_id}  workflow {message.correlation_id}  {step}  "
        f"attempt {message.attempt + 1}  from {letter.source}"
    )


async def _dead_letter_id(transport: Transport, given: str) -> str | None:
    """The message ID of the one letter `given` names: its message ID, or a prefix of its message ID or of its
    workflow's correlation ID that no other letter starts with.

    Raises:
        UserError: `given` is empty, or several letters start with it.
    """
    if not given:
        raise UserError("--replay needs the message ID of a letter (or its workflow's), or a prefix of it")
    candidates: dict[str, str] = {}  # message id: its letter's heading

    async def note(letter: DeadLetter) -> bool:
        message = letter.message
        if message is not None and (message.message_id.startswith(given) or message.correlation_id.startswith(given)):
            candidates[message.message_id] = f"message {message.message_id} (workflow {message.correlation_id})"
        return True

    await browse_dead_letters(transport, note)
    if given in candidates:
        return given
    if len(candidates) > 1:
        raise UserError(ambiguous(given, "dead letters", list(candidates.values())))
    return next(iter(candidates), None)


async def replay_letter(
    transport: Transport, message_id: str, signer: MessageSecurity, waiting_store: WaitingStore | None = None
) -> tuple[DeadLetter, PaigeantMessage] | None:
    """Replay the letter with `message_id` (see `replay_dead_letter`), taking it off the queue once it is sent;
    the letter and what was sent, or None when no letter has that id (any more).

    Raises:
        UserError: The letter cannot be replayed (see `replay_dead_letter`); it stays in the queue.
    """
    replayed: list[tuple[DeadLetter, PaigeantMessage]] = []
    refused: list[UserError] = []

    async def replay_match(letter: DeadLetter) -> bool:
        if replayed or refused or letter.message is None or letter.message.message_id != message_id:
            return True
        try:
            replayed.append((letter, await replay_dead_letter(transport, letter, signer, waiting_store)))
        except UserError as exc:
            refused.append(exc)
            return True  # the letter stays in the queue
        return False

    await browse_dead_letters(transport, replay_match)
    if refused:
        raise refused[0]
    return replayed[0] if replayed else None


async def _replay(transport: Transport, given: str) -> int:
    signer = MessageSigner.from_settings(transport)
    signer.ensure_ready()  # the replay is signed with this process's key, which the workers must trust
    message_id = await _dead_letter_id(transport, given)
    if message_id is None:
        print(f"no dead letter with message id {given!r}, nor one whose message or workflow ID starts with it")
        return 1
    found = await replay_letter(transport, message_id, signer)
    if found is None:
        print(f"no dead letter with message id {message_id!r}: another process took it meanwhile")
        return 1
    letter, message = found
    if letter.message is not None and letter.message.resume is not None:
        print(
            f"parked workflow {escape_control(message.correlation_id)} again at step {message.step} "
            f"{escape_control(message.routing_slip.current or '')}: its resume's answers were used once, so it "
            "waits for new ones (see `paigeant workflows` / WorkflowDispatcher.waiting())"
        )
        print(f"  its resume had failed: {escape_control(letter.reason)}")
        return 0
    how = "as it arrived, " if message is letter.message else ""
    print(
        f"replayed workflow {escape_control(message.correlation_id)} to step {message.step} "
        f"{escape_control(message.routing_slip.current or '')} {how}as message {escape_control(message.message_id)} "
        f"(attempt {message.attempt + 1})"
    )
    print(f"  it had failed: {escape_control(letter.reason)}")
    return 0
