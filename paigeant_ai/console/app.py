"""The console's web app: `Console` holds what it reads and acts with, `create_app` makes the Starlette app.

Every page needs a signed-in person; every form carries the session's CSRF token, and a post without it is refused
(403) before anything is read. The pages are rendered on the server; `static/console.js` refreshes the parts
marked `data-live` while a page is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic_ai.tools import ToolApproved, ToolDenied
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from .._cli_dead_letters import replay_letter
from .._cli_workflows import find_status
from .._tokens import TokenValidator
from ..approval import ApprovalAnswer, ParkedStep, WaitingStore
from ..dispatch import WorkflowDispatcher
from ..exceptions import PaigeantError, SecurityError, UserError
from ..security import MessageSigner
from ..store import FINAL_STATES, WorkflowProjector, WorkflowStatus, WorkflowStore
from ..transports import Transport
from . import views
from .auth import SESSION_COOKIE, Principal, Session, Sessions, Users, csrf_holds, principal_from_token

__all__ = ("Console", "create_app")

_HERE = Path(__file__).parent
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LIST_LIMIT = 500
"""The most recently updated workflows the list reads from the store."""


@dataclass
class Console:
    """What the console reads and acts with.

    Args:
        transport: The transport the workers use (connected by the app when `connect` is true).
        store: The workflow store the pages read; a `WorkflowProjector` feeds it from the transport's events
            while the app runs, unless `project` is false (a store fed otherwise, as in-process `on_event`).
        security: The console's own signer: approvals and replays are signed with its key.
        waiting_store: Where parked workflows wait (the workers' one).
        users: The local accounts; None for none (token sign-in only).
        tokens: The issuer's token checks, for token sign-in; None for none.
        trace_url: A link to a workflow's trace, with `{correlation_id}` in it.
        allowed_hosts: The host names the console answers to; None for any.
    """

    transport: Transport
    store: WorkflowStore
    security: MessageSigner
    waiting_store: WaitingStore | None = None
    users: Users | None = None
    tokens: TokenValidator | None = None
    trace_url: str | None = None
    allowed_hosts: list[str] | None = None
    """The names the console answers to (the `Host` header), against DNS rebinding; None for any."""
    project: bool = True
    connect: bool = False
    secret: str | None = None
    """Signs the session cookies (`PAIGEANT_CONSOLE_SECRET`); a random one for the process when None."""
    sessions: Sessions = field(init=False)
    signing_in: asyncio.Semaphore = field(init=False)
    held: dict[tuple[str, str], dict[str, ApprovalAnswer]] = field(init=False, default_factory=dict)
    """A person's answers to some of a workflow's approval requests, by (workflow, person), sent once they have
    answered all of them: a parked step resumes with an answer to every request."""
    """Password checks run in threads, two at a time: each takes half a second and 128 MiB."""

    def __post_init__(self) -> None:
        self.sessions = Sessions(self.secret.encode() if self.secret else None)
        self.signing_in = asyncio.Semaphore(2)

    @cached_property
    def dispatcher(self) -> WorkflowDispatcher:
        """Reads parked workflows and resumes them, signed with `security`."""
        return WorkflowDispatcher(self.transport, security=self.security, waiting_store=self.waiting_store)


Handler = Callable[[Request, Console, Session], Awaitable[Response]]


def create_app(console: Console) -> Starlette:
    """The console's ASGI app."""
    routes = [
        Route("/", _home),
        Route("/login", _login_page, methods=["GET"]),
        Route("/login", _login, methods=["POST"]),
        Route("/logout", signed_in(logout, form=True), methods=["POST"]),
        Route("/workflows", signed_in(workflows_page)),
        Route("/workflows/rows", signed_in(workflows_rows)),
        Route("/workflows/{correlation_id}", signed_in(workflow_page)),
        Route("/workflows/{correlation_id}/live", signed_in(workflow_live)),
        Route("/dead-letters", signed_in(letters_page)),
        Route("/dead-letters/{message_id}/replay", signed_in(replay, form=True), methods=["POST"]),
        Route("/approvals", signed_in(approvals_page)),
        Route("/approvals/{correlation_id}/{tool_call_id}", signed_in(decide, form=True), methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(_HERE / "static")), name="static"),
    ]
    hosts = Middleware(TrustedHostMiddleware, allowed_hosts=console.allowed_hosts or ["*"])
    app = Starlette(routes=routes, lifespan=_lifespan(console), middleware=[hosts])
    app.state.console = console
    app.state.templates = Jinja2Templates(directory=str(_HERE / "templates"))
    return app


def _lifespan(console: Console) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncGenerator[None]:
        if console.connect:
            await console.transport.connect()
        projector = WorkflowProjector(console.transport, console.store, security=console.security)
        task = asyncio.create_task(projector.run()) if console.project else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if console.connect:
                await console.transport.disconnect()

    return lifespan


def _render(
    request: Request, name: str, session: Session | None, headers: dict[str, str] | None = None, **context: Any
) -> Response:
    """The page `name` for `session`'s person, with the line it has to show (kept for a page, not a live part)."""
    flash = session.flash if session is not None else None
    if session is not None and not name.startswith("_"):
        session.flash = None
    me = session.principal if session else None
    context |= {"me": me, "csrf": session.csrf if session else "", "flash": flash}
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, name, context, headers=_HEADERS | (headers or {}))


def _session(request: Request) -> tuple[Console, tuple[str, Session] | None]:
    console: Console = request.app.state.console
    return console, console.sessions.get(request.cookies.get(SESSION_COOKIE))


def _refused(why: str) -> Response:
    return Response(f"refused: {why}", status_code=403, headers=_HEADERS)


def signed_in(handler: Handler, *, form: bool = False) -> Callable[[Request], Awaitable[Response]]:
    """`handler` for a signed-in person only; for a `form` post, only with the session's CSRF token."""

    async def endpoint(request: Request) -> Response:
        console, found = _session(request)
        if found is None or found[1].principal is None:
            return _refused("sign in first") if form else RedirectResponse("/login", status_code=303)
        session = found[1]
        if form and not csrf_holds(session, (await request.form()).get("csrf")):
            return _refused("the form has no valid CSRF token")
        return await handler(request, console, session)

    return endpoint


async def _home(request: Request) -> Response:
    return RedirectResponse("/workflows", status_code=303)


async def _login_page(request: Request) -> Response:
    console, found = _session(request)
    session_id, session = found if found is not None else console.sessions.start()
    response = _render(request, "login.html", session, accounts=console.users is not None, tokens=console.tokens)
    _set_cookie(request, response, console.sessions.cookie_of(session_id))
    return response


async def _login(request: Request) -> Response:
    console, found = _session(request)
    form = await request.form()
    if found is None or not csrf_holds(found[1], form.get("csrf")):
        return _refused("the form has no valid CSRF token")
    principal, error = await _sign_in(console, form)
    if principal is None:
        found[1].flash = error
        return RedirectResponse("/login?failed=1", status_code=303)
    console.sessions.end(found[0])  # a new session at each sign-in: one planted before it is worth nothing
    session_id, _ = console.sessions.start(principal)
    response = RedirectResponse("/workflows", status_code=303)
    _set_cookie(request, response, console.sessions.cookie_of(session_id))
    return response


async def logout(request: Request, console: Console, session: Session) -> Response:
    _, found = _session(request)
    if found is not None:
        console.sessions.end(found[0])
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


def _set_cookie(request: Request, response: Response, value: str) -> None:
    secure = request.url.scheme == "https"  # behind a TLS proxy that says so; plain HTTP on loopback otherwise
    response.set_cookie(SESSION_COOKIE, value, httponly=True, samesite="strict", path="/", secure=secure)


async def _sign_in(console: Console, form: Any) -> tuple[Principal | None, str]:
    token = str(form.get("token") or "").strip()
    if token:
        try:
            return principal_from_token(token, console.tokens), ""
        except UserError as exc:
            return None, str(exc)
    if console.users is None:
        return None, "this console has no local accounts: sign in with a token"
    async with console.signing_in:  # off the event loop, so that the pages stay served meanwhile
        principal = await asyncio.to_thread(
            console.users.sign_in, str(form.get("name") or ""), str(form.get("password") or "")
        )
    return principal, "" if principal is not None else "unknown name or wrong password"


# -- workflows --------------------------------------------------------------------------------------------------


def _filters(request: Request) -> dict[str, str]:
    return {key: request.query_params.get(key, "").strip() for key in ("state", "activity", "q")}


async def _rows(request: Request, console: Console) -> list[views.Row]:
    chosen = _filters(request)
    statuses = await console.store.list(limit=LIST_LIMIT)
    return views.rows(statuses, state=chosen["state"], activity=chosen["activity"], prefix=chosen["q"])


async def workflows_page(request: Request, console: Console, session: Session) -> Response:
    rows = await _rows(request, console)
    return _render(request, "workflows.html", session, rows=rows, filters=_filters(request), query=request.url.query)


async def workflows_rows(request: Request, console: Console, session: Session) -> Response:
    return _render(request, "_rows.html", session, rows=await _rows(request, console))


async def _status(console: Console, given: str) -> WorkflowStatus | None:
    """The workflow `given` names, by its ID or a prefix only it starts with (as `paigeant status` finds it)."""
    try:
        return await find_status(console.store, given)
    except UserError:  # a prefix of several workflows names none
        return None


async def _workflow(request: Request, console: Console) -> views.WorkflowView | None:
    status = await _status(console, request.path_params["correlation_id"])
    if status is None:
        return None
    parked = None
    if status.state in ("waiting", "in_doubt", "budget_exhausted") and console.waiting_store is not None:
        with contextlib.suppress(PaigeantError):
            parked = await console.dispatcher.parked(status.correlation_id)
    return views.workflow_view(status, console.trace_url, parked)


async def workflow_page(request: Request, console: Console, session: Session) -> Response:
    view = await _workflow(request, console)
    if view is None:
        return _render(request, "missing.html", session, given=request.path_params["correlation_id"])
    return _render(request, "workflow.html", session, view=view)


async def workflow_live(request: Request, console: Console, session: Session) -> Response:
    view = await _workflow(request, console)
    if view is None:
        return HTMLResponse("", status_code=404, headers=_HEADERS)
    ended = {"X-Paigeant-Ended": "1"} if view.status.state in FINAL_STATES else {}
    return _render(request, "_workflow_live.html", session, headers=ended, view=view)


# -- dead letters -----------------------------------------------------------------------------------------------


async def letters_page(request: Request, console: Console, session: Session) -> Response:
    total, letters = await views.dead_letters(console.transport)
    chosen = request.query_params.get("letter")
    return _render(request, "dead_letters.html", session, total=total, letters=letters, chosen=chosen)


async def replay(request: Request, console: Console, session: Session) -> Response:
    me = session.principal
    assert me is not None
    message_id = request.path_params["message_id"]
    if not me.allows("replay"):
        session.flash = f"{me.name} may not replay dead letters (the users file or token gives 'replay')"
        return RedirectResponse("/dead-letters", status_code=303)
    try:
        found = await replay_letter(console.transport, message_id, console.security, console.waiting_store)
    except UserError as exc:
        session.flash = f"not replayed: {exc}"
        return RedirectResponse("/dead-letters", status_code=303)
    if found is None:
        session.flash = f"no dead letter {message_id} any more: another process took it"
    else:
        _, sent = found
        session.flash = (
            f"replayed by {me.name}: workflow {sent.correlation_id} to step {sent.step} (attempt {sent.attempt + 1})"
        )
    return RedirectResponse("/dead-letters", status_code=303)


# -- approvals --------------------------------------------------------------------------------------------------


async def approvals_page(request: Request, console: Console, session: Session) -> Response:
    waiting = await console.dispatcher.waiting() if console.waiting_store is not None else []
    return _render(request, "approvals.html", session, requests=views.requests(waiting))


async def decide(request: Request, console: Console, session: Session) -> Response:
    me = session.principal
    assert me is not None
    correlation_id, call_id = request.path_params["correlation_id"], request.path_params["tool_call_id"]
    if not me.allows("approve"):
        return _refused(f"{me.name} may not approve tool calls (the users file or token gives 'approve')")
    form = await request.form()
    held = console.held.setdefault((correlation_id, me.name), {})
    try:
        parked = await console.dispatcher.parked(correlation_id)
        answer, said = _answer(parked, call_id, form, me)
        held[call_id] = answer
        open_calls = [c.tool_call_id for c in parked.pending if c.kind == "approval" and c.tool_call_id not in held]
        if open_calls:
            session.flash = f"{said} by {me.name}; sent once you answer {', '.join(open_calls)} too"
            return RedirectResponse("/approvals", status_code=303)
        answers = {key: value for key, value in held.items() if key in {c.tool_call_id for c in parked.pending}}
        await console.dispatcher.resume(correlation_id, approvals=answers, approver=me.name, approver_token=me.token)
    except (UserError, SecurityError) as exc:
        held.pop(call_id, None)
        session.flash = f"not sent: {exc}"
        return RedirectResponse("/approvals", status_code=303)
    console.held.pop((correlation_id, me.name), None)
    session.flash = f"{said} by {me.name}: workflow {correlation_id}"
    return RedirectResponse(f"/workflows/{correlation_id}", status_code=303)


def _answer(parked: ParkedStep, call_id: str, form: Any, me: Principal) -> tuple[ApprovalAnswer, str]:
    """The answer the form gives to the call, and what to say about it.

    Raises:
        UserError: The workflow does not wait for a person's approval of that call, or the edited arguments are
            not a JSON object.
    """
    call = next((item for item in parked.pending if item.tool_call_id == call_id and item.kind == "approval"), None)
    if call is None:
        raise UserError(f"workflow {parked.correlation_id!r} does not wait for approval of {call_id!r} (any more)")
    decision = str(form.get("decision") or "")
    if decision == "deny":
        note = str(form.get("note") or "").strip()
        return ToolDenied(note or f"denied by {me.name}"), f"{call.tool_name} denied"
    if decision != "approve":
        raise UserError("choose approve or deny")
    edited = str(form.get("args") or "").strip()
    if not edited:
        return True, f"{call.tool_name} approved"
    try:
        args = json.loads(edited)
    except json.JSONDecodeError as exc:
        raise UserError(f"the edited arguments are not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise UserError("the edited arguments must be a JSON object, as the tool's arguments are")
    if args == call.args:
        return True, f"{call.tool_name} approved"
    return ToolApproved(override_args=args), f"{call.tool_name} approved with edited arguments"
