from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from paigeant_ai.exceptions import UserError
from paigeant_ai.transports import InMemoryTransport, Transport, get_transport

from .transport_contract import TransportContract


class TestInMemoryContract(TransportContract):
    @pytest.fixture
    async def transport(self) -> AsyncIterator[Transport]:
        async with InMemoryTransport() as transport:
            yield transport

    def new_transport(self) -> Transport:
        return InMemoryTransport()


def test_get_transport_defaults_to_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAIGEANT_TRANSPORT", raising=False)
    assert isinstance(get_transport(), InMemoryTransport)


def test_get_transport_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", " Redis ")
    assert get_transport().name == "redis"  # made, not connected
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "memory")
    assert isinstance(get_transport(), InMemoryTransport)


def test_unknown_transport_names_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAIGEANT_TRANSPORT", "kafka")
    with pytest.raises(UserError, match=r"unknown transport 'kafka'; set PAIGEANT_TRANSPORT to one of: inmemory"):
        get_transport()


def test_missing_extra_names_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_aio_pika(name: str, *args: object, **kwargs: object) -> object:
        if name.split(".")[0] in ("aio_pika", "redis"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)  # pyright: ignore[reportArgumentType]

    import sys

    for module in ("paigeant_ai.transports.rabbitmq", "paigeant_ai.transports.redis"):
        monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setattr(builtins, "__import__", no_aio_pika)
    with pytest.raises(UserError, match=r'pip install "paigeant-ai\[rabbitmq\]"'):
        get_transport("rabbitmq")
    with pytest.raises(UserError, match=r'pip install "paigeant-ai\[redis\]"'):
        get_transport("redis")


async def test_unread_events_and_dead_letters_stay_bounded() -> None:
    async with InMemoryTransport(max_length=50, max_bytes=10_000) as transport:
        for i in range(200):
            await transport.publish("events", str(i).encode() * 100)  # 100-300 bytes each
        assert await transport.pending("events") <= 50
        for _ in range(200):
            await transport.publish("dead-letter", b"x" * 1000)
        assert await transport.pending("dead-letter") == 10
        async with await transport.consume("events", prefetch=100) as consumer:
            newest = [(await anext(consumer)).body for _ in range(await transport.pending("events"))]
        assert newest[-1] == b"199" * 100, "the oldest are dropped, the newest kept"
