"""Workers for the at-most-once crash tests, run as processes of their own:

    python -m paigeant_ai.cli worker tests.doubt_workers:checked_worker     # also unchecked_worker, rest_worker

The environment picks the broker, the namespace and the records directory, as for `tests.steering_workers`; on
RabbitMQ, `PAIGEANT_SHARED_STORE_URL` names the Redis every replica keeps its start records in.

Two at-most-once payments, each followed by `doubt-ship`: `doubt-pay-checked` with a reconcile hook that reads the
effect records, `doubt-pay-unchecked` without one. Each records its effect (the payment, a line in `paid-<pid>.log`)
and then, the first time it runs in a workflow, SIGKILLs its own process before the ack. `doubt-note`, not
at-most-once, records that it ran, for workflows in flight beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import Counter
from pathlib import Path

from paigeant_ai import ActivityContext, Ran, RunAgain, Worker, activity, get_transport
from paigeant_ai.settings import Settings
from paigeant_ai.transports import Transport

from .workflows_for_crash import read_records, record

CHECKED, UNCHECKED, NOTE, SHIP = "doubt-pay-checked", "doubt-pay-unchecked", "doubt-note", "doubt-ship"


def payments(records: Path) -> Counter[str]:
    """How many times each workflow's payment happened (what the tests count)."""
    return Counter(line for lines in read_records(records, "paid").values() for line in lines)


def _records() -> Path:
    return Path(os.environ["PAIGEANT_TEST_RECORDS"])


async def _pay(ctx: ActivityContext) -> dict[str, str]:
    record("paid", ctx.correlation_id)  # the effect, with no key a provider would honour
    marker = _records() / "killed"
    marker.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(marker / ctx.correlation_id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        await asyncio.sleep(float(os.environ.get("PAIGEANT_TEST_KILL_AFTER", "0.3")))  # others in flight pay too
        os.kill(os.getpid(), signal.SIGKILL)  # after the effect, before the ack
    return {"paid": ctx.correlation_id}


def _paid(ctx: ActivityContext) -> Ran | RunAgain:
    """Whether this workflow's payment happened, from the effect records."""
    return Ran({"paid": ctx.correlation_id}) if payments(_records())[ctx.correlation_id] else RunAgain()


pay_checked = activity(name=CHECKED, at_most_once=True, reconcile=_paid)(_pay)
pay_unchecked = activity(name=UNCHECKED, at_most_once=True)(_pay)


@activity(name=NOTE)
async def note(ctx: ActivityContext) -> dict[str, bool]:
    record("note", ctx.correlation_id)
    await asyncio.sleep(0.05)
    return {"noted": True}


@activity(name=SHIP)
async def ship(ctx: ActivityContext) -> None:
    record("ship", ctx.correlation_id)


ADDRESSES = [CHECKED, UNCHECKED, NOTE, SHIP, "@cancellations"]


def _transport() -> Transport:
    if Settings.from_env().transport == "redis":
        from paigeant_ai.transports.redis import RedisTransport

        # A SIGKILLed worker's entries are claimed by another after this many seconds.
        return RedisTransport(visibility_timeout=float(os.environ.get("PAIGEANT_TEST_VISIBILITY_TIMEOUT", "2")))
    return get_transport()


def checked_worker() -> Worker:
    """The payment with a reconcile hook, one at a time (each kill stops exactly one payment, and holds no other);
    restarted by the test each time a payment kills it."""
    return Worker(_transport(), [pay_checked], concurrency=1, shutdown_timeout=5)


def unchecked_worker() -> Worker:
    """The payment without a hook, one at a time; restarted by the test each time a payment kills it."""
    return Worker(_transport(), [pay_unchecked], concurrency=1, shutdown_timeout=5)


def rest_worker() -> Worker:
    """The steps that never kill their process: the note and the shipping after every payment."""
    return Worker(_transport(), [note, ship], concurrency=20, shutdown_timeout=5)
