"""Signing on or off for the benchmark runs."""

from __future__ import annotations

import logging

from paigeant_ai.security import InMemoryReplayCache, MessageSigner, ReplayCache, generate_key
from paigeant_ai.transports import SharedStores, Transport


def security_for(transport: Transport, signed: bool) -> MessageSigner:
    """What a benchmark's worker and dispatcher share: one fresh key pair when signed, the opt-out when not.

    Signed runs use the replay cache a real deployment would: the transport's shared one (Redis), if it has one.
    """
    if not signed:
        logging.getLogger("paigeant_ai.security").setLevel(logging.ERROR)  # the opt-out warns on every start
        return MessageSigner(unsigned=True)
    cache: ReplayCache = transport.replay_cache() if isinstance(transport, SharedStores) else InMemoryReplayCache()
    return MessageSigner(generate_key("bench-1"), replay_cache=cache)
