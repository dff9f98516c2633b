"""The console's routes: chat, the approvals inbox, threads and their timelines, dead letters, login.

Every action calls the same library functions as the CLI and the REST API (bot/control.py, the bus, retention);
forms post urlencoded bodies with the session's CSRF token, and answer htmx with the fragment to swap in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Coroutine
from pathlib import Path
from secrets import token_urlsafe
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jinja2
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from itsdangerous import BadSignature

from bot import approvals, control, retention, threads
from bot import channel as bot_channel
from bot.errors import Conflict, HandrailError, NotFound
from bot.events import ApprovalDecided, ApprovalRequested, ChannelRef, new_id
from bot.runtime import Deps
from bot.threads import Status
from channels.console import live, oidc, views
from channels.console.access import HEADERS, Access, User

KIND = "console"
HERE = Path(__file__).parent
STATIC = {  # name: content type; nothing else is served from the folder
    "htmx.min.js": "text/javascript", "console.js": "text/javascript", "console.css": "text/css",
    "favicon.svg": "image/svg+xml",
}  # fmt: skip
PAGE = 30  # threads per page
log = logging.getLogger(__name__)


class _Secured(APIRoute):
    """Every console answer carries the security headers (CSP, no framing, no caching)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handler(request: Request) -> Response:
            try:
                response = await handle(request)
            except _LoginNeeded:
                return _login_needed(request)
            except HTTPException as exc:
                exc.headers = {**HEADERS, **(exc.headers or {})}
                raise
            for name, value in HEADERS.items():
                response.headers.setdefault(name, value)
            return response

        return handler


class _LoginNeeded(Exception):
    """This request needs a logged-in user."""


def _login_needed(request: Request) -> Response:
    """A page asks for a login and comes back after it; anything else is a plain 401."""
    if request.method == "GET" and request.url.path != "/console/events":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/console/login?{urlencode({'next': target})}", 303, headers=HEADERS)
    return Response("log in first", 401, headers=HEADERS, media_type="text/plain")


def router(deps: Deps) -> APIRouter:
    access = Access(deps)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
    )
    env.filters["pretty"] = views.pretty
    env.filters["utc"] = views.utc
    env.globals["tone"] = views.TONE
    static = {name: (HERE / "static" / name).read_bytes() for name in STATIC}
    r = APIRouter(route_class=_Secured, include_in_schema=False)

    def render(template: str, request: Request, user: User | None, code: int = 200, **ctx: Any) -> HTMLResponse:
        html = env.get_template(template).render(user=user, path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=code)

    async def page(template: str, request: Request, user: User, **ctx: Any) -> HTMLResponse:
        """A full page; a login-free console gets (or keeps) its session cookie, which holds the CSRF token."""
        pending = await deps.redis.zcard(deps.keys.pending_approvals)
        response = render(template, request, user, pending=pending, agents=sorted(deps.agents.agents), **ctx)
        if user.local and await access.session(request) is None:
            await access.start(response, request, user)
        return response

    async def who(request: Request) -> User:
        user = await access.user(request)
        if user is None:
            raise _LoginNeeded
        return user

    async def form(request: Request, user: User | None) -> dict[str, str]:
        """The urlencoded body of a POST, once its origin and CSRF token are checked (403 otherwise)."""
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "cross-origin request refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            raise HTTPException(415, "expected a form (application/x-www-form-urlencoded)")
        try:
            raw = parse_qs((await request.body()).decode(), keep_blank_values=True, strict_parsing=False)
        except UnicodeDecodeError:
            raise HTTPException(400, "the form is not UTF-8") from None
        fields = {k: v[-1] for k, v in raw.items()}
        token = request.headers.get("x-csrf-token") or fields.get("csrf", "")
        if user is not None and not access.csrf_ok(user, token):
            raise HTTPException(403, "missing or stale form token: reload the page and try again")
        return fields

    def htmx(request: Request) -> bool:
        return request.headers.get("hx-request") == "true"

    # -- login ------------------------------------------------------------------------------------------------

    @r.get("/")
    async def root() -> RedirectResponse:
        return RedirectResponse("/console/chat", 303)

    @r.get("/console")
    @r.get("/console/")
    async def home() -> RedirectResponse:
        return RedirectResponse("/console/chat", 303)

    def login_form(request: Request, code: int = 200, error: str = "", name: str = "", next: str = "") -> HTMLResponse:
        return render("login.html", request, None, code, error=error, passwords=bool(access.users),
                      sso=access.oidc.host if access.oidc else "", name=name, next=_safe_next(next))  # fmt: skip

    @r.get("/console/login")
    async def login_page(request: Request, next: str = "") -> HTMLResponse:
        return login_form(request, next=next)

    @r.post("/console/login")
    async def login(request: Request) -> Response:
        fields = await form(request, None)
        name, password = fields.get("name", ""), fields.get("password", "")
        if not access.users:
            return login_form(request, 503, name=name)
        checked = await access.check_password(name, password)
        if not checked:
            error = "wrong name or password" if checked is False else \
                "too many failed logins for this name: try again in 15 minutes"  # fmt: skip
            return login_form(request, 401 if checked is False else 429, error, name, fields.get("next", ""))
        response = RedirectResponse(_safe_next(fields.get("next", "")), 303)
        await access.start(response, request, User(name, token_urlsafe(24), local=False))
        return response

    @r.get("/console/login/oidc")
    async def oidc_begin(request: Request, next: str = "") -> Response:
        """Off to the issuer, with this sign-in's state, nonce and PKCE verifier kept in a signed cookie."""
        if access.oidc is None:
            raise HTTPException(404, "no OpenID Connect issuer is configured")
        try:
            url, flow = await oidc.begin(access.oidc, _safe_next(next))
        except oidc.Refused as exc:
            log.warning("console OIDC sign-in not started: %s", exc)
            return login_form(request, 502, f"Sign-in with {access.oidc.host} failed: {exc}", next=next)
        response = RedirectResponse(url, 303)
        response.set_cookie(
            oidc.FLOW_COOKIE, (await access.flow_signer()).dumps(flow.dump()), max_age=oidc.FLOW_S, httponly=True,
            samesite="lax", path="/console/login/oidc", secure=request.url.scheme == "https",
        )  # fmt: skip  # Lax: the issuer sends the browser back by a cross-site top-level GET
        return response

    @r.get(oidc.CALLBACK)
    async def oidc_callback(request: Request) -> Response:
        """The issuer's answer: a verified ID token logs its user in, anything else logs nobody in."""
        if access.oidc is None:
            raise HTTPException(404, "no OpenID Connect issuer is configured")
        try:
            try:
                raw = (await access.flow_signer()).loads(request.cookies.get(oidc.FLOW_COOKIE, ""), max_age=oidc.FLOW_S)
            except BadSignature:
                raw = None
            flow = oidc.Flow.load(raw)
            name = await oidc.finish(access.oidc, flow, request.query_params)
        except oidc.Refused as exc:
            log.warning("console OIDC sign-in refused: %s", exc)
            response: Response = login_form(request, 403, f"Sign-in with {access.oidc.host} failed: {exc}")
        else:
            log.info("console OIDC sign-in: console:%s", name)
            # A page, not a redirect: the strict session cookie is sent only once the browser is on this site.
            response = render("signed_in.html", request, None, name=name, next=flow.next)
            await access.start(response, request, User(name, token_urlsafe(24), local=False, sso=True))
        response.delete_cookie(oidc.FLOW_COOKIE, path="/console/login/oidc")
        return response

    @r.post("/console/logout")
    async def logout(request: Request) -> Response:
        await form(request, await who(request))
        response = RedirectResponse("/console/login", 303)
        response.delete_cookie("handrail_console", path="/")
        return response

    # -- chat -------------------------------------------------------------------------------------------------

    @r.get("/console/chat")
    async def chat(request: Request, agent: str = "", thread: str = "") -> HTMLResponse:
        user = await who(request)
        conv, since = None, ""
        if thread:
            t = await threads.load(deps.redis, deps.keys, thread)
            conv = views.conversation(t, user.identity) if t.events else views.Conversation(thread, agent, "starting")
            agent = agent or t.agent
            since = await live.fingerprint(deps, f"thread:{thread}")
        agent = agent or deps.agents.route(KIND)  # preselected: the config's route for the console, else the first
        return await page("chat.html", request, user, conv=conv, agent=agent, thread=thread, since=since, error="")

    @r.get("/console/chat/{thread_id}/log")
    async def chat_log(request: Request, thread_id: str) -> HTMLResponse:
        user = await who(request)
        t = await threads.load(deps.redis, deps.keys, thread_id)
        conv = views.conversation(t, user.identity) if t.events else views.Conversation(thread_id, "", "starting")
        return render("_conversation.html", request, user, conv=conv)

    @r.post("/console/chat")
    async def say(request: Request) -> Response:
        user = await who(request)
        fields = await form(request, user)
        text, agent, thread_id = fields.get("text", "").strip(), fields.get("agent", ""), fields.get("thread", "")
        error = ""
        if not text:
            error = "type a message first"
        elif len(text) > 20_000:
            error = "a message is at most 20,000 characters"
        elif not thread_id and agent not in deps.agents.agents:
            error = f"choose an agent: {', '.join(sorted(deps.agents.agents))}"
        if error:
            return await page("chat.html", request, user, conv=None, agent=agent, thread=thread_id, since="",
                              error=error)  # fmt: skip
        if thread_id and not await control.known(deps, thread_id):
            return await page("chat.html", request, user, conv=None, agent=agent, thread="", since="",
                              error=f"no thread {thread_id!r}")  # fmt: skip
        thread_id = thread_id or new_id()
        ref = ChannelRef(kind=KIND, address=user.name, user=user.identity)
        await control.receive(deps, thread_id, text, ref, key=f"msg:{new_id()}", agent=agent or None)
        return RedirectResponse(f"/console/chat?{urlencode({'thread': thread_id})}", 303)

    # -- approvals --------------------------------------------------------------------------------------------

    async def inbox(user: User, cursor: str | None) -> tuple[list[views.Card], str | None]:
        try:
            got = await control.approvals_page(deps, limit=50, cursor=cursor)
        except control.BadCursor as exc:
            raise HTTPException(400, str(exc)) from None
        return [views.Card.of_record(rec, user.identity) for rec in got.items], got.next

    @r.get("/console/approvals")
    async def approvals_inbox(request: Request, cursor: str | None = None) -> HTMLResponse:
        user = await who(request)
        cards, after = await inbox(user, cursor)
        since = await live.fingerprint(deps, "approvals")
        return await page("approvals.html", request, user, cards=cards, next=after, since=since)

    @r.get("/console/approvals/list")
    async def approvals_list(request: Request, cursor: str | None = None) -> HTMLResponse:
        user = await who(request)
        cards, after = await inbox(user, cursor)
        return render("_inbox.html", request, user, cards=cards, next=after)

    async def card_of(approval_id: str, user: User) -> views.Card:
        """An approval as its thread's log has it, with the record's state (a decision the worker has not
        applied yet included)."""
        try:
            rec = await approvals.get(deps.redis, deps.keys, approval_id)
        except NotFound:
            raise HTTPException(404, f"no approval {approval_id!r}") from None
        t = await threads.load(deps.redis, deps.keys, rec.thread_id)
        req = next((e for e in t.events if isinstance(e, ApprovalRequested) and e.approval_id == approval_id), None)
        decided = next((e for e in t.events if isinstance(e, ApprovalDecided) and e.approval_id == approval_id), None)
        card = views.Card.of_request(req, decided, user.identity) if req else views.Card.of_record(rec, user.identity)
        if decided is None:
            card.state, card.by, card.at = rec.state, rec.by, rec.at
        return card

    @r.post("/console/approvals/{approval_id}/decide")
    async def decide(request: Request, approval_id: str) -> Response:
        user = await who(request)
        fields = await form(request, user)
        action, reason, edited = fields.get("action", ""), fields.get("reason", "").strip(), fields.get("args")
        card = await card_of(approval_id, user)
        error, args = "", None
        if action not in ("approve", "reject", "edit"):
            error = "choose approve, reject or approve with the edited arguments"
        elif action == "reject" and not reason:
            error = "give a reason: the agent re-plans with it"
        elif len(reason) > 4_000:
            error = "a reason is at most 4,000 characters"
        elif action == "edit":
            try:
                args = json.loads(edited or "")
            except json.JSONDecodeError as exc:
                error = f"the arguments are not JSON: {exc}"
            else:
                if not isinstance(args, dict):
                    error, args = "the arguments must be a JSON object ({...})", None
        outcome = None
        if not error:
            try:
                outcome = await control.decide(deps, approval_id, by=user.identity, approved=action != "reject",
                                               feedback=reason, args=args)  # fmt: skip
            except (Conflict, HandrailError) as exc:
                error = str(exc)
        if outcome is not None:
            if outcome.result == "ok":
                card = await card_of(approval_id, user)
                card.notice = outcome.message
            elif outcome.result == "forbidden":
                error = f"{user.identity} may not decide this approval (approvers: {', '.join(card.approvers)})"
            else:
                error = outcome.message
        card.error = error
        if edited is not None and error:
            card.args_text = edited
        status = 200 if htmx(request) or not error else 422
        if htmx(request):
            return render("_card.html", request, user, card=card)
        response = await page("decided.html", request, user, card=card)
        response.status_code = status
        return response

    # -- threads ----------------------------------------------------------------------------------------------

    @r.get("/console/threads")
    async def threads_list(
        request: Request, agent: str = "", status: str = "", channel: str = "", cursor: str | None = None
    ) -> HTMLResponse:
        user = await who(request)
        if status and status not in set(Status):
            raise HTTPException(400, f"no status {status!r}; statuses: {', '.join(Status)}")
        try:
            got = await control.threads_page(deps, agent=agent or None, status=status or None, limit=PAGE,
                                             cursor=cursor or None, channel=channel or None)  # fmt: skip
        except control.BadCursor as exc:
            raise HTTPException(400, str(exc)) from None
        query = {"agent": agent, "status": status, "channel": channel, "cursor": got.next}
        more = f"/console/threads?{urlencode(query)}" if got.next else ""
        since = await live.fingerprint(deps, "threads")
        return await page("threads.html", request, user, items=got.items, agent=agent, status=status,
                          statuses=list(Status), channel=channel, channels=sorted(bot_channel.registered()),
                          more=more, since=since)  # fmt: skip

    async def timeline(thread_id: str) -> tuple[threads.Thread, list[views.Row]]:
        try:
            t = await threads.get(deps.redis, deps.keys, thread_id)
        except NotFound:
            raise HTTPException(404, f"no thread {thread_id!r}") from None
        prompts: dict[int, control.SentPrompt] = {}
        for n in range(len(t.events)):
            try:
                sent = control.prompt_of(deps, t, n)
            except HandrailError:  # the agent is gone from the config: the log is still shown
                sent = None
            if sent is not None:
                prompts[n] = sent
        return t, views.timeline(t, prompts)

    @r.get("/console/threads/{thread_id}")
    async def thread_page(request: Request, thread_id: str) -> HTMLResponse:
        user = await who(request)
        t, rows = await timeline(thread_id)
        since = await live.fingerprint(deps, f"thread:{thread_id}")
        return await page("thread.html", request, user, t=t, rows=rows, since=since)

    @r.get("/console/threads/{thread_id}/events")
    async def thread_events(request: Request, thread_id: str) -> HTMLResponse:
        user = await who(request)
        t, rows = await timeline(thread_id)
        return render("_timeline.html", request, user, t=t, rows=rows)

    verbs = {"pause": control.pause, "resume": control.resume, "cancel": control.cancel}

    @r.post("/console/threads/{thread_id}/{verb}")
    async def act(request: Request, thread_id: str, verb: str) -> Response:
        """Pause, resume or cancel a thread, as the console user (between steps, as from the CLI or the API)."""
        await form(request, user := await who(request))
        if verb not in verbs:
            raise HTTPException(404, f"no action {verb!r}; actions: {', '.join(verbs)}")
        try:
            await verbs[verb](deps, thread_id, user.identity)
        except NotFound:
            raise HTTPException(404, f"no thread {thread_id!r}") from None
        return RedirectResponse(f"/console/threads/{thread_id}", 303)

    # -- dead letters -----------------------------------------------------------------------------------------

    @r.get("/console/dead-letters")
    async def dead_letters(request: Request, notice: str = "", error: str = "") -> HTMLResponse:
        user = await who(request)
        rows = [views.dead_letter(i, f) for i, f in await deps.bus.dead_letters(count=500)]
        since = await live.fingerprint(deps, "dlq")
        return await page("dead_letters.html", request, user, rows=rows, notice=notice, error=error, since=since)

    @r.post("/console/dead-letters/{dlq_id}/retry")
    async def retry(request: Request, dlq_id: str) -> Response:
        await form(request, await who(request))
        try:
            entry = await deps.bus.retry_dead_letter(dlq_id)
        except NotFound as exc:
            return _back("/console/dead-letters", error=str(exc))
        return _back("/console/dead-letters", notice=f"retried {dlq_id} as {entry}")

    @r.post("/console/dead-letters/purge")
    async def purge(request: Request) -> Response:
        fields = await form(request, await who(request))
        ids = [i for i in fields.get("ids", "").split() if i]
        try:
            count = await retention.purge_dead_letters(deps.redis, deps.keys, ids)
        except NotFound as exc:
            return _back("/console/dead-letters", error=str(exc))
        return _back("/console/dead-letters", notice=f"purged {count} dead letter{'s' if count != 1 else ''}")

    # -- live updates and files -------------------------------------------------------------------------------

    @r.get("/console/events")
    async def events(request: Request, watch: str, since: str = "") -> Response:
        await who(request)
        return await live.stream(deps, request, watch, request.headers.get("last-event-id") or since)

    @r.get("/console/static/{name}")
    async def files(name: str) -> Response:
        if name not in STATIC:
            raise HTTPException(404, "no such file")
        return Response(static[name], media_type=STATIC[name])

    return r


def _safe_next(target: str) -> str:
    """Where to go after logging in: a console page of this site only."""
    return target if target.startswith("/console/") and not target.startswith("//") else "/console/chat"


def _back(path: str, **query: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode(query)}", 303)
