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


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if raw == "":
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        from .exceptions import UserError

        raise UserError(f"{name}={raw!r} is not a positive number of seconds")
    return seconds


def _env_flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    from .exceptions import UserError

    raise UserError(f"{name}={raw!r} is not a flag; use 1 or 0")


def _env_str(name: str) -> str | None:
    return os.environ.get(name) or None


def _env_ttl(name: str, default: float | None) -> float | None:
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("never", "none", "0"):
        return None
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        from .exceptions import UserError

        raise UserError(f"{name}={raw!r} is not a number of seconds (or `never`)")
    return seconds


@dataclass(frozen=True, slots=True)
class Settings:
    """Settings read from the environment.

    Attributes:
        transport: `PAIGEANT_TRANSPORT`, one of `inmemory` (default), `rabbitmq`, `redis`, `sqlite`.
        rabbitmq_url: `PAIGEANT_RABBITMQ_URL`; the nodes of a cluster separated by commas.
        redis_url: `PAIGEANT_REDIS_URL`.
        sqlite_path: `PAIGEANT_SQLITE_PATH`, the SQLite transport's file (default `paigeant.sqlite3` in the working
            directory).
        max_message_bytes: `PAIGEANT_MAX_MESSAGE_BYTES`, the largest message a dispatcher sends or a worker accepts.
        concurrency: `PAIGEANT_CONCURRENCY`, how many steps one worker runs at once.
        processes: `PAIGEANT_PROCESSES`, how many worker processes `paigeant worker` runs side by side (default 1:
            the worker runs in the command's own process).
        namespace: `PAIGEANT_NAMESPACE`, the prefix of every queue, stream and key (default `paigeant`).
        signing_key: `PAIGEANT_SIGNING_KEY`, this service's private JWK as JSON (or `signing_key_file`,
            `PAIGEANT_SIGNING_KEY_FILE`, its path).
        trusted_keys: `PAIGEANT_TRUSTED_KEYS`, the JWKS of the services whose messages are accepted, as JSON (or
            `trusted_keys_file`, `PAIGEANT_TRUSTED_KEYS_FILE`, one or more paths separated by `os.pathsep`).
        allow_unsigned: `PAIGEANT_ALLOW_UNSIGNED=1` runs without signing keys on a real broker, deliberately.
        obo_jwks: `PAIGEANT_OBO_JWKS`, the JWKS of the issuer of users' on-behalf-of tokens, as JSON (or
            `obo_jwks_file`, `PAIGEANT_OBO_JWKS_FILE`, its path).
        obo_issuer: `PAIGEANT_OBO_ISSUER`, the `iss` those tokens must carry.
        obo_audience: `PAIGEANT_OBO_AUDIENCE`, the `aud` those tokens must carry.
        trust_policy: `PAIGEANT_TRUST_POLICY`, what each trusted key may do, as JSON (or `trust_policy_file`,
            `PAIGEANT_TRUST_POLICY_FILE`, its path); see `paigeant_ai.trust`. Unset: every trusted key may do all.
        replay_ttl: `PAIGEANT_REPLAY_TTL`, seconds a settled hop without an expiry is remembered (default 7 days).
        shared_store_url: `PAIGEANT_SHARED_STORE_URL`, a Redis URL where workers on a broker without shared stores
            (RabbitMQ) keep their replay cache and dedupe store, shared by every replica.
        workflow_ttl: `PAIGEANT_WORKFLOW_TTL`, seconds after which a workflow's messages expire (default 7 days);
            `never` (or `0`) for never.
        stall_after: `PAIGEANT_STALL_AFTER`, seconds without a consumer after which `paigeant workflows` shows a
            workflow `stalled` at its step (default 60).
        rabbitmq_consumer_timeout: `PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT`, seconds RabbitMQ lets a consumer hold a
            delivery unacked (its `consumer_timeout`; default 1800, the broker's default): a worker hands back
            what it still holds after half of it (see `paigeant_ai._long_steps`).
        step_lease: `PAIGEANT_STEP_LEASE`, seconds of a handed-back step's lease (default 60): its worker renews
            its claim every third of it, and another worker takes the step over within about two leases of its
            worker's death.
        registry_heartbeat: `PAIGEANT_REGISTRY_HEARTBEAT`, seconds between two posts of a worker's record on the
            registry (default 10); a worker not heard from for three of them no longer counts as serving anything.
        transports: `PAIGEANT_TRANSPORTS`, the named transports a workflow's steps may live on, as
            `billing=redis://host:6379/0;shipping=amqp://user:password@host/` (see `docs/deployment.md`).
        home_transport: `PAIGEANT_HOME_TRANSPORT`, the name of the one among them where a worker publishes its
            events; by default the transport it consumes from.
    """

    transport: str = "inmemory"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis_url: str = "redis://127.0.0.1:6379/0"
    sqlite_path: str = "paigeant.sqlite3"
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    concurrency: int = 10
    processes: int = 1
    namespace: str = "paigeant"
    signing_key: str | None = None
    signing_key_file: str | None = None
    trusted_keys: str | None = None
    trusted_keys_file: str | None = None
    allow_unsigned: bool = False
    obo_jwks: str | None = None
    obo_jwks_file: str | None = None
    obo_issuer: str | None = None
    obo_audience: str | None = None
    trust_policy: str | None = None
    trust_policy_file: str | None = None
    replay_ttl: int = 7 * 24 * 3600
    shared_store_url: str | None = None
    workflow_ttl: float | None = 7 * 24 * 3600.0
    stall_after: int = 60
    rabbitmq_consumer_timeout: float = 1800.0
    step_lease: float = 60.0
    registry_heartbeat: float = 10.0
    transports: str | None = None
    home_transport: str | None = None

    @classmethod
    def from_env(cls) -> Settings:
        """Read the settings from `PAIGEANT_*` environment variables."""
        env = os.environ
        defaults = cls()
        return cls(
            transport=env.get("PAIGEANT_TRANSPORT", defaults.transport).strip().lower() or defaults.transport,
            rabbitmq_url=env.get("PAIGEANT_RABBITMQ_URL", defaults.rabbitmq_url),
            redis_url=env.get("PAIGEANT_REDIS_URL", defaults.redis_url),
            sqlite_path=env.get("PAIGEANT_SQLITE_PATH") or defaults.sqlite_path,
            max_message_bytes=_env_int("PAIGEANT_MAX_MESSAGE_BYTES", defaults.max_message_bytes),
            concurrency=_env_int("PAIGEANT_CONCURRENCY", defaults.concurrency),
            processes=_env_int("PAIGEANT_PROCESSES", defaults.processes),
            namespace=env.get("PAIGEANT_NAMESPACE", defaults.namespace),
            signing_key=_env_str("PAIGEANT_SIGNING_KEY"),
            signing_key_file=_env_str("PAIGEANT_SIGNING_KEY_FILE"),
            trusted_keys=_env_str("PAIGEANT_TRUSTED_KEYS"),
            trusted_keys_file=_env_str("PAIGEANT_TRUSTED_KEYS_FILE"),
            allow_unsigned=_env_flag("PAIGEANT_ALLOW_UNSIGNED"),
            obo_jwks=_env_str("PAIGEANT_OBO_JWKS"),
            obo_jwks_file=_env_str("PAIGEANT_OBO_JWKS_FILE"),
            obo_issuer=_env_str("PAIGEANT_OBO_ISSUER"),
            obo_audience=_env_str("PAIGEANT_OBO_AUDIENCE"),
            trust_policy=_env_str("PAIGEANT_TRUST_POLICY"),
            trust_policy_file=_env_str("PAIGEANT_TRUST_POLICY_FILE"),
            replay_ttl=_env_int("PAIGEANT_REPLAY_TTL", defaults.replay_ttl),
            shared_store_url=_env_str("PAIGEANT_SHARED_STORE_URL"),
            workflow_ttl=_env_ttl("PAIGEANT_WORKFLOW_TTL", defaults.workflow_ttl),
            stall_after=_env_int("PAIGEANT_STALL_AFTER", defaults.stall_after),
            rabbitmq_consumer_timeout=_env_seconds(
                "PAIGEANT_RABBITMQ_CONSUMER_TIMEOUT", defaults.rabbitmq_consumer_timeout
            ),
            step_lease=_env_seconds("PAIGEANT_STEP_LEASE", defaults.step_lease),
            registry_heartbeat=_env_seconds("PAIGEANT_REGISTRY_HEARTBEAT", defaults.registry_heartbeat),
            transports=_env_str("PAIGEANT_TRANSPORTS"),
            home_transport=_env_str("PAIGEANT_HOME_TRANSPORT"),
        )
