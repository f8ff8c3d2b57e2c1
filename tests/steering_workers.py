"""Workers for the steering tests (compensation, cancellation, faults) that run as processes of their own:

    python -m paigeant_ai.cli worker tests.steering_workers:booking_worker

The environment picks the broker and the namespace, as for `tests.workflows_for_crash`, the directory where each
run is recorded (`PAIGEANT_TEST_RECORDS`: one `<kind>-<pid>.log` per process and kind, appended with O_APPEND so a
kill never tears a line), how long the slow step takes (`PAIGEANT_TEST_STEP_SECONDS`) and how long a
compensation takes (`PAIGEANT_TEST_UNDO_SECONDS`). With `PAIGEANT_TEST_SPAN_FILE` set, a worker also exports its
spans there, one JSON line each, so a test can join the traces of several processes.

Three families of steps:

- booking (`book` -> `wait` -> `finish`): `book` is undone by `unbook`; `wait` is slow and records when it
  starts, when it sees its task cancelled and when it finishes; `finish` records that it ran.
- a saga whose last step faults (`reserve` -> `charge` -> `explode`): `reserve` and `charge` are undone by slow
  compensations whose effect is keyed on the undone step's idempotency key, in a set shared by every process
  (a file created with O_EXCL per key), so a compensation run twice after a kill has its effect once.
- an order (`order-reserve` -> `order-charge` -> `order-ship` (faults) -> `order-notify`), for status and traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from paigeant_ai import Activity, ActivityContext, NonRetryableError, Worker, activity, get_transport
from paigeant_ai.settings import Settings
from paigeant_ai.transports import Transport

from .span_files import JsonLinesExporter
from .workflows_for_crash import read_records, record

# -- what the tests read back ------------------------------------------------------------------------------------


def lines(records: Path, kind: str) -> list[str]:
    """Every line any process recorded for `kind`."""
    return [line for found in read_records(records, kind).values() for line in found]


def counted(records: Path, kind: str) -> Counter[str]:
    """How many times each workflow (the first word of a line) was recorded for `kind`."""
    return Counter(line.split(" ", 1)[0] for line in lines(records, kind))


def effects(records: Path) -> set[str]:
    """The idempotency keys whose compensation had its effect."""
    folder = records / "effects"
    return {path.name for path in folder.iterdir()} if folder.exists() else set()


def _seconds(name: str, default: str) -> float:
    return float(os.environ.get(name, default))


def _undoing(ctx: ActivityContext) -> str:
    """`<correlation id> <cause> <by> <undone step> <undone key>`: what a compensation was told."""
    unwinding, undoing = ctx.unwinding, ctx.undoing
    assert unwinding is not None, "a compensation always knows why the workflow stopped"
    assert undoing is not None, "a compensation always knows what it undoes"
    return f"{ctx.correlation_id} {unwinding.cause} {unwinding.by} {undoing.step} {undoing.idempotency_key}"


# -- booking: cancelled while its slow step runs --------------------------------------------------------------


async def unbook(ctx: ActivityContext) -> None:
    """Give the booking back."""
    record("unbook", _undoing(ctx))


@activity(name="steer-book", compensate=unbook)
async def book(ctx: ActivityContext) -> dict[str, str]:
    record("book", ctx.correlation_id)
    return {"booking": f"booking-{ctx.correlation_id}"}


@activity(name="steer-wait")
async def wait(ctx: ActivityContext) -> dict[str, bool]:
    record("wait-started", f"{ctx.correlation_id} {time.time():.6f}")
    try:
        await asyncio.sleep(_seconds("PAIGEANT_TEST_STEP_SECONDS", "2"))
    except asyncio.CancelledError:
        record("wait-cancelled", ctx.correlation_id)
        raise
    record("wait-finished", ctx.correlation_id)
    return {"waited": True}


@activity(name="steer-finish")
async def finish(ctx: ActivityContext) -> None:
    record("finish", ctx.correlation_id)


BOOKING = (book, wait, finish)


# -- a saga whose last step faults, undone slowly ---------------------------------------------------------------


async def _undo_once(ctx: ActivityContext, kind: str) -> None:
    """A slow compensation whose effect happens once per undone step, however often it runs."""
    line = _undoing(ctx)
    record(f"{kind}-started", line)
    await asyncio.sleep(_seconds("PAIGEANT_TEST_UNDO_SECONDS", "0.5"))
    assert ctx.undoing is not None
    folder = Path(os.environ["PAIGEANT_TEST_RECORDS"]) / "effects"
    folder.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):  # undone already, by a run a kill cut short after its effect
        os.close(os.open(folder / ctx.undoing.idempotency_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    record(f"{kind}-finished", line)


async def release(ctx: ActivityContext) -> None:
    """Release the reservation."""
    await _undo_once(ctx, "release")


async def refund(ctx: ActivityContext) -> None:
    """Refund the charge."""
    await _undo_once(ctx, "refund")


@activity(name="saga-reserve", compensate=release)
async def reserve(ctx: ActivityContext) -> dict[str, str]:
    record("forward", f"{ctx.correlation_id} {ctx.idempotency_key}")
    return {"reservation": f"res-{ctx.correlation_id}"}


@activity(name="saga-charge", compensate=refund)
async def charge(ctx: ActivityContext) -> dict[str, str]:
    record("forward", f"{ctx.correlation_id} {ctx.idempotency_key}")
    return {"charge": f"ch-{ctx.correlation_id}"}


@activity(name="saga-explode")
async def explode(ctx: ActivityContext) -> None:
    raise NonRetryableError("the warehouse burned down")


SAGA = (reserve, charge, explode)


# -- an order: status and one trace -----------------------------------------------------------------------------


async def release_stock(ctx: ActivityContext) -> None:
    """Put the reserved stock back."""
    record("order-undo", f"release {_undoing(ctx)}")


async def refund_card(ctx: ActivityContext) -> None:
    """Refund the card."""
    record("order-undo", f"refund {_undoing(ctx)}")


@activity(name="order-reserve", compensate=release_stock)
async def order_reserve(ctx: ActivityContext) -> dict[str, str]:
    return {"stock": "held"}


@activity(name="order-charge", compensate=refund_card)
async def order_charge(ctx: ActivityContext) -> dict[str, str]:
    return {"payment": "captured"}


@activity(name="order-ship")
async def order_ship(ctx: ActivityContext) -> None:
    raise NonRetryableError("no carrier delivers to the moon")


@activity(name="order-notify")
async def order_notify(ctx: ActivityContext) -> None:
    record("order-notify", ctx.correlation_id)


ORDER = (order_reserve, order_charge, order_ship, order_notify)


# -- the workers --------------------------------------------------------------------------------------------------


def addresses(*families: Sequence[Activity]) -> list[str]:
    """Every queue the steps of `families` use, their compensations' included (for the clean-up)."""
    found: list[str] = ["@cancellations"]
    for family in families:
        for step in family:
            found.append(step.spec.name)
            if step.spec.compensate is not None:
                found.append(step.spec.compensate)
    return found


def _transport() -> Transport:
    if Settings.from_env().transport == "redis":
        from paigeant_ai.transports.redis import RedisTransport

        # A SIGKILLed worker's entries are claimed by another after this many seconds.
        return RedisTransport(visibility_timeout=_seconds("PAIGEANT_TEST_VISIBILITY_TIMEOUT", "2"))
    return get_transport()


def booking_worker() -> Worker:
    """The booking steps; enough concurrency for every workflow of the cancel test at once."""
    return Worker(_transport(), list(BOOKING), concurrency=60, shutdown_timeout=5)


def book_worker() -> Worker:
    """The first booking step (and its compensation) only."""
    return Worker(_transport(), [book], concurrency=10, shutdown_timeout=5)


def wait_worker() -> Worker:
    """The second and third booking steps only."""
    return Worker(_transport(), [wait, finish], concurrency=10, shutdown_timeout=5)


def saga_worker() -> Worker:
    """The saga's steps and compensations; run two to have one to kill."""
    return Worker(_transport(), list(SAGA), concurrency=10, shutdown_timeout=5)


def _traced() -> None:
    """Export this process's spans to `PAIGEANT_TEST_SPAN_FILE`, if it is set (the library never does this)."""
    path = os.environ.get("PAIGEANT_TEST_SPAN_FILE")
    if path:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(f"{path}.{os.getpid()}")))
        trace.set_tracer_provider(provider)


def order_payment_worker() -> Worker:
    """Reserve and charge, with their compensations, traced."""
    _traced()
    return Worker(_transport(), [order_reserve, order_charge], concurrency=4, shutdown_timeout=5)


def order_shipping_worker() -> Worker:
    """Ship and notify, traced."""
    _traced()
    return Worker(_transport(), [order_ship, order_notify], concurrency=4, shutdown_timeout=5)
