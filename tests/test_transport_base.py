"""What code may count on from any transport: its declarations (not its name), and URLs shown without passwords."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from paigeant_ai import (
    ActivityContext,
    ActivitySpec,
    InMemoryTransport,
    InMemoryWaitingStore,
    InMemoryWorkflowStore,
    MessageSigner,
    PaigeantMessage,
    UserError,
    Worker,
    activity,
    get_waiting_store,
    get_workflow_store,
)
from paigeant_ai.security import InMemoryReplayCache
from paigeant_ai.transports import SharedStores
from paigeant_ai.transports.base import redact_url
from paigeant_ai.worker import InMemoryDedupeStore


class FourthTransport(InMemoryTransport):
    """A transport of a user's own: it declares stores every process shares and a lag like a broker's."""

    name = "fourth"
    process_local = False
    requeue_lag = 0.3

    def __init__(self) -> None:
        super().__init__()
        self.dedupe = InMemoryDedupeStore()
        self.replays = InMemoryReplayCache()
        self.waiting = InMemoryWaitingStore()
        self.workflows = InMemoryWorkflowStore()

    def dedupe_store(self) -> InMemoryDedupeStore:
        return self.dedupe

    def replay_cache(self) -> InMemoryReplayCache:
        return self.replays

    def waiting_store(self) -> InMemoryWaitingStore:
        return self.waiting

    def workflow_store(self) -> InMemoryWorkflowStore:
        return self.workflows


@activity
async def step(ctx: ActivityContext) -> dict[str, str]:
    return {}


def test_a_transport_that_offers_shared_stores_gets_them_used_by_default() -> None:
    transport = FourthTransport()
    assert isinstance(transport, SharedStores)
    assert Worker(transport, [step], allow_unsigned=True).dedupe is transport.dedupe
    assert MessageSigner.from_settings(transport, allow_unsigned=True).replay_cache is transport.replays
    assert get_waiting_store(transport) is transport.waiting
    assert get_workflow_store(transport) is transport.workflows


def test_a_transport_without_shared_stores_keeps_them_in_this_process() -> None:
    transport = InMemoryTransport()
    assert not isinstance(transport, SharedStores)
    assert isinstance(Worker(transport, [step], allow_unsigned=True).dedupe, InMemoryDedupeStore)
    assert isinstance(MessageSigner.from_settings(transport, allow_unsigned=True).replay_cache, InMemoryReplayCache)


def test_only_a_process_local_transport_signs_with_a_key_made_for_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "PAIGEANT_SIGNING_KEY",
        "PAIGEANT_SIGNING_KEY_FILE",
        "PAIGEANT_TRUSTED_KEYS",
        "PAIGEANT_ALLOW_UNSIGNED",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PAIGEANT_TRUSTED_KEYS_FILE", raising=False)
    in_process = MessageSigner.from_settings(InMemoryTransport())
    assert in_process.refusal is None
    assert in_process.signing_key is not None
    assert (in_process.signing_key.kid or "").startswith("ephemeral-")
    refused = MessageSigner.from_settings(FourthTransport())
    assert refused.refusal is not None
    assert "the fourth transport needs message signing keys" in refused.refusal


async def test_a_burst_run_waits_for_the_transports_requeue_lag() -> None:
    loop = asyncio.get_running_loop()
    async with FourthTransport() as transport:
        started = loop.time()
        await Worker(transport, [step], allow_unsigned=True).run(burst=True)
        assert loop.time() - started >= transport.requeue_lag
    assert InMemoryTransport.requeue_lag == 0.0


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:hunter2@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("amqp://guest:guest@rabbit.example:5672/prod", "amqp://guest:***@rabbit.example:5672/prod"),
        ("amqp://guest:guest@[::1]:5672/", "amqp://guest:***@[::1]:5672/"),
        ("rediss://app:s3cret@[2001:db8::7]/2", "rediss://app:***@[2001:db8::7]/2"),
        ("amqp://guest@[::1]/", "amqp://guest@[::1]/"),
        ("redis://app:p@ss@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("redis://:pw@[::1:6379/0", "redis://***@[::1:6379/0"),  # Python cannot parse it: hidden anyway
        ("amqp://a:x@r1/,amqp://b:y@r2/", "amqp://a:***@r1/,amqp://b:***@r2/"),  # a cluster's nodes
        ("redis://u:pa,ss@cache:6379/0", "redis://u:***@cache:6379/0"),  # a comma in a password
        ("amqp://a:x,1@r1/, amqp://b:y@r2/", "amqp://a:***@r1/,amqp://b:***@r2/"),
        ("redis+cluster://u:p@h1:7000,h2:7001", "redis+cluster://u:***@h1:7000,h2:7001"),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_the_core_imports_without_redis_py() -> None:
    """Only `paigeant_ai.transports.redis` needs the extra; it says how to install it."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        import paigeant_ai, paigeant_ai.approval, paigeant_ai.security, paigeant_ai.store, paigeant_ai.worker
        from paigeant_ai import InMemoryTransport, get_waiting_store, get_workflow_store
        get_waiting_store(InMemoryTransport()), get_workflow_store(InMemoryTransport())
        try:
            import paigeant_ai.transports.redis
        except ImportError as exc:
            print(exc)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == 'the Redis transport needs redis-py: pip install "paigeant-ai[redis]"'


async def test_publishing_a_message_object_names_the_fix() -> None:
    async with InMemoryTransport() as transport:
        message = PaigeantMessage.new([ActivitySpec(name="validate")], {"n": 1})
        with pytest.raises(UserError, match=r"publish takes the message's bytes, not PaigeantMessage"):
            await transport.publish("validate", message)  # pyright: ignore[reportArgumentType]
        assert await transport.pending("validate") == 0


def test_a_comma_in_a_password_does_not_make_another_node() -> None:
    from paigeant_ai.transports.rabbitmq._nodes import node_urls

    assert node_urls("amqp://a:x,1@r1/, amqp://b:y@r2/") == ("amqp://a:x,1@r1/", "amqp://b:y@r2/")
    assert node_urls(["amqp://a:x@r1/"]) == ("amqp://a:x@r1/",)
