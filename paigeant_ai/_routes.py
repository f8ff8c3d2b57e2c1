"""One workflow across transports: which transport each hop goes to.

A step may name the transport it lives on (`ActivitySpec.transport`): the name of one of the transports a process was
configured with (`PAIGEANT_TRANSPORTS='billing=redis://...;shipping=amqp://...'`, or `transports={...}`), or that
transport's URL without credentials. What a message says only ever selects among those: a worker never connects to a
host a message names, and no credentials travel in a message. A step that names none stays on the transport the
workflow is on when it gets there.

A worker forwards the next hop to the transport of its step, confirmed there before the delivery is acked here. Each
hop is stamped, under its signature, with the name of the transport it is sent on (`PaigeantMessage.sent_on`); a hop
that arrives on another transport than that one or its step's is refused (dead-lettered), so that one signed hop never
runs on two transports with two replay caches. The workflow's events and status live on one home transport (the worker's
`home`), its cancellations are posted on every transport the dispatcher knows (see `docs/deployment.md`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from ._addresses import bare_url, check_transport_address, is_url
from .contracts import ActivitySpec, PaigeantMessage, RoutingSlip
from .exceptions import UnknownTransport, UserError
from .settings import Settings
from .transports.base import Transport

if TYPE_CHECKING:
    from .approval import ParkedStep

__all__ = ("Routes", "parse_transports", "step_address")

logger = logging.getLogger("paigeant_ai.routes")

_SCHEMES = {"redis": "redis", "rediss": "redis", "unix": "redis", "amqp": "rabbitmq", "amqps": "rabbitmq"}


def step_address(slip: RoutingSlip) -> str | None:
    """The transport the current hop of `slip` goes to, as the slip names it: while it unwinds, the one the undone
    step ran on; else the current step's (a fallback's is its step's); None: the transport it is on."""
    if slip.unwinding is not None:
        undoing = slip.undoing
        return undoing.transport if undoing is not None else None
    spec = slip.current_activity
    return spec.transport if spec is not None else None


def parse_transports(text: str) -> dict[str, Transport]:
    """The transports `PAIGEANT_TRANSPORTS` names: `name=url` entries separated by `;` (not connected).

    Raises:
        UserError: An entry is not `name=url`, a name is used twice or is not a name, or a URL's scheme is not one
            of redis, rediss, unix, amqp, amqps or sqlite.
    """
    from .transports import get_transport

    named: dict[str, Transport] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, url = (item.strip() for item in entry.partition("="))
        if not sep or not name or not url or is_url(name):
            raise UserError(
                f"PAIGEANT_TRANSPORTS entry {entry.split('://')[0]!r}... is not name=url: write it as "
                "'billing=redis://host:6379/0;shipping=amqp://user:password@host/'"
            )
        _check_name(name)
        if name in named:
            raise UserError(f"PAIGEANT_TRANSPORTS names {name!r} twice: give each transport one name")
        scheme = url.partition("://")[0].lower()
        if scheme == "sqlite":
            named[name] = get_transport("sqlite", path=unquote(urlsplit(url).path))
        elif scheme in _SCHEMES:
            named[name] = get_transport(_SCHEMES[scheme], url=url)
        else:
            raise UserError(
                f"PAIGEANT_TRANSPORTS gives {name!r} a URL of scheme {scheme!r}: use redis://, rediss://, unix://, "
                "amqp://, amqps:// or sqlite:///path"
            )
    return named


def _check_name(name: str) -> None:
    try:
        check_transport_address(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if is_url(name):  # pragma: no cover - refused by the caller
        raise UserError(f"{name!r} is a URL, not a transport name")


def _url_of(transport: Transport) -> str:
    """The URL `transport` was configured with, as a step may name it ('' when it has none)."""
    url = getattr(transport, "url", None)
    return bare_url(url) if isinstance(url, str) and url else ""


def _has_host(bare: str) -> bool:
    """Whether `bare` names a host (a step's `redis://` or `://` alone matches no transport)."""
    return bool(urlsplit(bare).netloc) if "://" in bare else False


def _same_place(a: Transport, b: Transport) -> bool:
    """Whether `a` and `b` reach the same queues: the same object, or the same broker and namespace."""
    if a is b:
        return True
    if type(a) is not type(b) or a.process_local:
        return False
    where = [(bare_url(str(getattr(t, "url", getattr(t, "path", "")))), getattr(t, "namespace", None)) for t in (a, b)]
    return where[0] == where[1] and bool(where[0][0])


class Routes:
    """The transports a worker or dispatcher may send hops to, by name, and the home of its workflows' events.

    Args:
        own: The transport it consumes from (a worker) or is given (a dispatcher): where a hop whose step names no
            transport goes, and what stands in for a named transport that reaches the same queues.
        named: The other transports, by name; by default those of `PAIGEANT_TRANSPORTS`.
        home: The name of the transport where events are published (status, progress) and the registry is read;
            by default `PAIGEANT_HOME_TRANSPORT`, else `own`.
    """

    def __init__(
        self, own: Transport, named: Mapping[str, Transport] | None = None, *, home: str | None = None
    ) -> None:
        settings = Settings.from_env()
        self._owned: list[Transport] = []  # made from the settings: connected and closed here
        if named is None:
            named = parse_transports(settings.transports) if settings.transports else {}
            self._owned = list(named.values())
        self.named = dict(named)
        for name in self.named:
            _check_name(name)
        self.own = own
        self.own_name = next((name for name, t in self.named.items() if _same_place(t, own)), None)
        """The name of the transport it consumes from, if it is one of the named ones."""
        if self.own_name is not None:  # every name of its own broker and namespace is its own transport
            self.named = {name: own if _same_place(t, own) else t for name, t in self.named.items()}
            self._owned = [t for t in self._owned if not _same_place(t, own)]
        home = home if home is not None else settings.home_transport
        if home is not None and home not in self.named:
            known = ", ".join(sorted(self.named)) or "none"
            raise UserError(
                f"the home transport {home!r} is not one of the named transports ({known}): add it to "
                "PAIGEANT_TRANSPORTS (or transports={...})"
            )
        self.home = self.named[home] if home is not None else own
        self._connected = False
        self._connecting = asyncio.Lock()

    @property
    def hybrid(self) -> bool:
        """Whether other transports than its own are configured."""
        return any(t is not self.own for t in self.named.values())

    def transports(self) -> list[Transport]:
        """Every transport it may send to, its own first, each once."""
        found = [self.own]
        for t in self.named.values():
            if all(t is not seen for seen in found):
                found.append(t)
        return found

    def resolve(self, address: str | None, *, step: str | None = None) -> Transport:
        """The transport `address` names (None: its own).

        Raises:
            UnknownTransport: `address` names no configured transport.
        """
        if address is None:
            return self.own
        if not is_url(address):
            found = self.named.get(address)
        else:
            bare = bare_url(address)  # compared with the configured ones' URLs only: never a connection
            found = next((t for t in self.transports() if _url_of(t) == bare), None) if _has_host(bare) else None
        if found is None:
            known = ", ".join(sorted(self.named)) or "none is"
            raise UnknownTransport(
                f"step {step or '?'!r} names transport {address!r}, which is not configured here ({known}): add it "
                "to PAIGEANT_TRANSPORTS (or transports={...}) of the dispatcher and of every worker",
                address=address,
            )
        return found

    def for_message(self, message: PaigeantMessage) -> Transport:
        """The transport the current hop of `message` goes to."""
        return self.resolve(step_address(message.routing_slip), step=message.routing_slip.current)

    def send_to(self, hop: PaigeantMessage) -> Transport:
        """The transport the (unsigned) `hop` goes to, which `hop` is stamped with (see `stamp`)."""
        return self.stamp(hop, self.for_message(hop))

    def stamp(self, hop: PaigeantMessage, transport: Transport) -> Transport:
        """Mark the (unsigned) `hop` as sent on `transport`, by its name, when named transports are configured:
        signed with the hop, it makes a copy put on another transport's queue refused there. Returns `transport`."""
        if self.named:
            hop.sent_on = next((name for name, t in self.named.items() if t is transport), None)
        return transport

    def check_route(self, specs: Sequence[ActivitySpec]) -> None:
        """At dispatch: every step names a configured transport, and no parallel group names any.

        Raises:
            UnknownTransport: A step names a transport that is not configured.
            UserError: A parallel group or one of its branches names a transport.
        """
        for spec in specs:
            if spec.branches and any(item.transport is not None for item in (spec, *spec.branches)):
                raise UserError(
                    f"parallel group {spec.name!r} names a transport: a group and its branches run on the transport "
                    "of the step before it (their join store is there); move the group's address to that step"
                )
            self.resolve(spec.transport, step=spec.name)

    def placed(self, specs: Sequence[ActivitySpec]) -> list[tuple[Transport, list[ActivitySpec]]]:
        """The steps of a route grouped by the transport each lives on, a step without an address on its
        predecessor's (the first on its own), in the order the transports are first reached."""
        groups: list[tuple[Transport, list[ActivitySpec]]] = []
        current = self.own
        for spec in specs:
            current = self.resolve(spec.transport, step=spec.name) if spec.transport is not None else current
            group = next((found for transport, found in groups if transport is current), None)
            if group is None:
                groups.append((current, group := []))
            group.append(spec)
        return groups

    def arrival_refusal(self, message: PaigeantMessage) -> str | None:
        """Why a hop consumed from its own transport is refused there, if it is: it was sent on another one, or its
        step lives on another one. A worker configured with no named transports cannot tell names apart: it only
        refuses a step that names one."""
        if message.sent_on is not None and self.named:
            try:
                found = self.resolve(message.sent_on, step=message.routing_slip.current)
            except UnknownTransport as exc:
                return f"misrouted: {exc}"
            if found is not self.own:
                return f"misrouted: the hop was sent on transport {message.sent_on!r}, not on the one it arrived on"
        address = step_address(message.routing_slip)
        if address is None:
            return None
        step = message.routing_slip.current
        try:
            found = self.resolve(address, step=step)
        except UnknownTransport as exc:
            return f"misrouted: {exc}"
        if found is not self.own:
            return f"misrouted: step {step!r} lives on transport {address!r}, not on the one it arrived on"
        return None

    async def connect(self) -> None:
        """Connect every transport it may send to, but its own (connected by whoever gave it). Idempotent, and
        once at a time: two dispatches at once do not open two connections to one broker."""
        async with self._connecting:
            if self._connected:
                return
            for transport in self.transports()[1:]:
                await transport.connect()
            self._connected = True

    def parked_on(self, parked: ParkedStep) -> Transport:
        """Where a resume or a cancel sends back the step parked as `parked`: the transport it parked on, as the
        parking worker signed it; for a record without one, its step's transport (else its own).

        Raises:
            UnknownTransport: The transport is not configured here.
        """
        if parked.transport is not None:
            return self.resolve(parked.transport, step=parked.activity)
        return self.for_message(parked.message)

    async def disconnect(self) -> None:
        """Close the transports it made from the settings (not its own, nor those it was given), each even when
        closing another failed."""
        async with self._connecting:
            self._connected = False
            for transport in self._owned:
                try:
                    await transport.disconnect()
                except Exception as exc:
                    logger.warning("closing the %s transport failed: %s", transport.name, exc)
