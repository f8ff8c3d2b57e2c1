"""`PAIGEANT_*` environment settings; constructor arguments always win over them."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ("Settings",)

DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        from .exceptions import UserError

        raise UserError(f"{name}={raw!r} is not an integer") from None


@dataclass(frozen=True, slots=True)
class Settings:
    """Settings read from the environment.

    Attributes:
        transport: `PAIGEANT_TRANSPORT`, one of `inmemory` (default), `rabbitmq`, `redis`.
        rabbitmq_url: `PAIGEANT_RABBITMQ_URL`.
        redis_url: `PAIGEANT_REDIS_URL`.
        max_message_bytes: `PAIGEANT_MAX_MESSAGE_BYTES`, the largest message a dispatcher sends or a worker accepts.
        concurrency: `PAIGEANT_CONCURRENCY`, how many steps one worker runs at once.
        namespace: `PAIGEANT_NAMESPACE`, the prefix of every queue, stream and key (default `paigeant`).
    """

    transport: str = "inmemory"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    concurrency: int = 10
    namespace: str = "paigeant"

    @classmethod
    def from_env(cls) -> Settings:
        """Read the settings from `PAIGEANT_*` environment variables."""
        env = os.environ
        defaults = cls()
        return cls(
            transport=env.get("PAIGEANT_TRANSPORT", defaults.transport).strip().lower() or defaults.transport,
            rabbitmq_url=env.get("PAIGEANT_RABBITMQ_URL", defaults.rabbitmq_url),
            redis_url=env.get("PAIGEANT_REDIS_URL", defaults.redis_url),
            max_message_bytes=_env_int("PAIGEANT_MAX_MESSAGE_BYTES", defaults.max_message_bytes),
            concurrency=_env_int("PAIGEANT_CONCURRENCY", defaults.concurrency),
            namespace=env.get("PAIGEANT_NAMESPACE", defaults.namespace),
        )
