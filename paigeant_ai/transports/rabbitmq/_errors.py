"""RabbitMQ's errors, translated once into `TransportError` with a reason a person can act on; waiting out a
lost connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator
from contextlib import contextmanager
from typing import TypeVar

import aiormq
import aiormq.exceptions
import pamqp.exceptions
from aio_pika.abc import AbstractRobustChannel

from ...exceptions import TransportError

__all__ = (
    "BROKER_ERRORS",
    "CONNECTION_LOST",
    "broker_errors",
    "cancelling",
    "channel_ready",
    "explain",
    "on_channel",
)

T = TypeVar("T")

BROKER_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
    pamqp.exceptions.PAMQPException,
    OSError,  # includes ConnectionError and TimeoutError
)
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    aiormq.exceptions.ChannelInvalidStateError,
    aiormq.exceptions.AMQPConnectionError,
    ConnectionError,
)


@contextmanager
def broker_errors(action: str) -> Generator[None]:
    """Translate aio-pika, aiormq and socket errors into `TransportError`, the cause chained."""
    try:
        yield
    except asyncio.CancelledError as exc:
        if cancelling():
            raise
        # aiormq cancels what waits on a channel that closes under it: that is a lost connection, not a cancel.
        raise TransportError(f"{action}: the channel closed while waiting for RabbitMQ") from exc
    except BROKER_ERRORS as exc:
        raise TransportError(f"{action}: {explain(exc)}") from exc


def cancelling() -> bool:
    """True if the current task is being cancelled (not merely woken by a channel that closed under it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def explain(exc: BaseException) -> str:
    if isinstance(exc, aiormq.exceptions.PublishError):
        return "RabbitMQ could not route the message to its queue (was the queue deleted?)"
    if isinstance(exc, aiormq.exceptions.DeliveryError):
        return "RabbitMQ refused the message (negative publisher confirm)"
    if isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return (
            f"{exc}; the queue exists with other arguments: use the same max_deliveries and max_length in "
            "every process of the namespace, or delete the queue first"
        )
    if isinstance(exc, aiormq.exceptions.AuthenticationError | aiormq.exceptions.ProbableAuthenticationError):
        return f"{exc}; check the user and password in the URL"
    if isinstance(exc, aiormq.exceptions.ChannelAccessRefused):
        return f"{exc}; the user lacks permissions on this virtual host"
    if isinstance(exc, aiormq.exceptions.ChannelInvalidStateError):
        return "the channel is closed (the connection was lost; it reconnects by itself)"
    if isinstance(exc, TimeoutError):
        return "RabbitMQ did not answer in time"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def on_channel(
    channel: AbstractRobustChannel, action: str, operation: Callable[[], Awaitable[T]], within: float
) -> T:
    """Run `operation`, which is safe to repeat; while its channel is down (a reconnect, or the broker closed
    it on an error), wait for the channel to be restored and run it again, up to `within` seconds in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            with broker_errors(action):
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    return await operation()
        except TransportError as exc:
            if not isinstance(exc.__cause__, CONNECTION_LOST) or loop.time() >= deadline:
                raise
        await asyncio.sleep(0.05)  # let the channel's close callback start its restore
        with broker_errors(f"{action}: waiting for the connection to RabbitMQ"):
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await channel.ready()


async def channel_ready(channel: AbstractRobustChannel, action: str, within: float) -> None:
    """Wait, up to `within` seconds, for a channel that is down (the connection is being restored) to be back."""
    if not channel.is_closed:
        return
    with broker_errors(f"{action}: waiting for the connection to RabbitMQ"):
        async with asyncio.timeout(within):
            while channel.is_closed:
                await channel.ready()
                if channel.is_closed:
                    await asyncio.sleep(0.05)  # closed, and its restore not started yet
