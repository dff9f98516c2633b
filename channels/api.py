"""The REST API (/api/v1): launch, inspect, pause, resume and cancel threads, message them, answer them, decide.

Auth: ``Authorization: Bearer <key>`` with keys from config (``api_keys``, secrets in the environment), each with
scopes ``launch``, ``read``, ``decide``, the channels its threads may talk on and the agents it may use; the caller's
identity is ``api:<name>``, and it is the speaker the model sees. The key is checked before the body is read.
Every POST honours an ``Idempotency-Key`` header: a repeat within 24 h of a 2xx answer gets that answer again and
changes nothing (an error is not kept: it changed nothing, so the request may be tried again).
"""

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, Security
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from bot import approvals, codec, control, jsonbody, threads
from bot.channel import BaseChannel
from bot.errors import ConfigError, Conflict, HandrailError, NotFound
from bot.events import ApprovalRequested, ChannelRef, HumanAnswered, ThreadLaunched, new_id
from bot.runtime import Deps
from bot.threads import Status

log = logging.getLogger(__name__)

KIND = "api"
IDEMPOTENCY_TTL = 24 * 3600
Scope = Literal["launch", "read", "decide"]


# -- bodies ---------------------------------------------------------------------------------------------------


class ChannelIn(BaseModel):
    """Where the thread talks to humans (a Slack channel, an email address...), among those the key allows;
    default: nowhere but the API. The speaker is always the key's identity."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(KIND, pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    address: str = Field("", max_length=256)


class LaunchIn(BaseModel):
    agent: str
    message: str = Field(min_length=1, max_length=20_000)
    channel: ChannelIn | None = None
    business_key: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._:-]{1,128}$",
        description="e.g. a ticket id: the same key continues the same thread",
    )


class TextIn(BaseModel):
    text: str = Field(min_length=1, max_length=20_000)


class DecisionIn(BaseModel):
    approved: bool
    feedback: str = Field("", max_length=4_000)
    args: dict[str, Any] | None = Field(None, description="approve with these arguments instead (checked)")


class AcceptedOut(BaseModel):
    thread_id: str
    duplicate: bool


class ThreadOut(BaseModel):
    id: str
    agent: str
    status: Status | Literal["queued"] = Field(description="queued: accepted, not yet taken up by a worker")
    events: int
    updated: int


class ThreadDetailOut(ThreadOut):
    events_log: list[dict[str, Any]]


class ApprovalOut(BaseModel):
    id: str
    thread_id: str
    tool: str
    args: dict[str, Any]
    approvers: list[str]
    reason: str
    requested_at: int


class ApprovalDetailOut(ApprovalOut):
    state: str  # pending, approved, rejected, cancelled
    by: str = ""  # who decided, once decided
    at: int = 0  # when


class ThreadPage(BaseModel):
    items: list[ThreadOut]
    next: str | None = Field(description="pass as ?cursor= for the following page; null: this was the last")


class ApprovalPage(BaseModel):
    items: list[ApprovalOut]
    next: str | None = Field(description="pass as ?cursor= for the following page; null: this was the last")


class ErrorOut(BaseModel):
    """Every error answer: ``detail`` is a sentence, or for a malformed body the list of what is wrong."""

    detail: str | list[dict[str, Any]]


class DecisionOut(BaseModel):
    result: str
    state: str
    by: str
    at: int


# -- auth -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    channels: frozenset[str] = frozenset({KIND})  # "api", "KIND:ADDRESS" or "KIND:*"
    agents: frozenset[str] | None = None  # None: every agent

    @property
    def identity(self) -> str:
        return f"{KIND}:{self.name}"

    def may_use(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents

    def may_talk_on(self, kind: str, address: str) -> bool:
        return kind == KIND or f"{kind}:{address}" in self.channels or f"{kind}:*" in self.channels


def load_keys(deps: Deps) -> list[tuple[bytes, Principal]]:
    """The configured keys whose secrets are set; a key without its secret is disabled, with a warning."""
    keys = []
    for name, spec in deps.agents.spec.api_keys.items():
        secret = os.environ.get(spec.key_env, "")
        if not secret:
            log.warning("API key %r is disabled: %s is not set", name, spec.key_env)
            continue
        agents = None if "*" in spec.agents else frozenset(spec.agents)
        keys.append((secret.encode(), Principal(name, frozenset(spec.scopes), frozenset(spec.channels), agents)))
    return keys


def bearer(authorization: str | None) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case); b"" for anything else."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    return token.strip().encode() if scheme.lower() == "bearer" else b""


def authenticate(keys: list[tuple[bytes, Principal]], authorization: str | None) -> Principal | None:
    """The key an ``Authorization: Bearer`` header carries, or None (also for the MCP channel's HTTP endpoint)."""
    token = bearer(authorization)
    found = None
    for secret, principal in keys:  # compare with every key, in constant time each
        if hmac.compare_digest(secret, token) and token:
            found = principal
    return found


def _authenticator(keys: list[tuple[bytes, Principal]]) -> Callable[[Scope], Any]:
    def needs(scope: Scope) -> Any:
        async def check(authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Principal:
            found = authenticate(keys, authorization)
            if found is None:
                raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
            if scope not in found.scopes:
                raise HTTPException(403, f"this key lacks the {scope!r} scope")
            return found

        check.authenticates = True  # type: ignore[attr-defined]  # _AuthFirst runs it before the body is read
        return Depends(check)

    return needs


class _StrictJSON(Request):
    """A request whose JSON body must be UTF-8 without lone surrogates (else 422 with the reason)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = jsonbody.parse(await self.body())
        return self._json


class _AuthFirst(APIRoute):
    """Checks the API key before FastAPI reads and validates the body: an unauthenticated caller learns nothing
    about what a valid request looks like (401, never 400/422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()
        checks = [d.call for d in self.dependant.dependencies if getattr(d.call, "authenticates", False)]

        async def handler(request: Request) -> Response:
            for check in checks:
                assert check is not None
                await check(request.headers.get("authorization"))
            return await handle(_StrictJSON(request.scope, request.receive))

        return handler


# -- idempotency ----------------------------------------------------------------------------------------------


async def idempotent(
    deps: Deps, request: Request, who: Principal, run: Callable[[], Awaitable[tuple[int, Any]]]
) -> JSONResponse:
    """Run ``run`` once per Idempotency-Key (per caller); repeats get the stored answer of a success."""
    key = request.headers.get("idempotency-key")
    if not key:
        status, body = await run()
        return JSONResponse(body, status)
    if len(key) > 255:
        raise HTTPException(400, "Idempotency-Key is longer than 255 characters")
    body_bytes = await request.body()
    slot = f"{deps.keys.ns}:idem:{who.name}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"
    fingerprint = hashlib.sha256(request.method.encode() + request.url.path.encode() + body_bytes).hexdigest()
    if not await deps.redis.set(slot, json.dumps({"pending": fingerprint}), nx=True, ex=60):
        stored = json.loads(await deps.redis.get(slot) or b"{}")
        if stored.get("fingerprint", stored.get("pending")) != fingerprint:
            raise HTTPException(422, "this Idempotency-Key was used with a different request")
        if "pending" in stored:
            raise HTTPException(409, "a request with this Idempotency-Key is still in progress")
        return JSONResponse(stored["body"], stored["status"], headers={"Idempotent-Replayed": "true"})
    try:
        status, body = await run()
    except BaseException:
        # an error changed nothing (a 404 may turn into a 202 once a launch is applied): the key is free again
        await deps.redis.delete(slot)
        raise
    record = {"fingerprint": fingerprint, "status": status, "body": body}
    await deps.redis.set(slot, json.dumps(record), ex=IDEMPOTENCY_TTL)
    return JSONResponse(body, status)


# -- routes ---------------------------------------------------------------------------------------------------


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route gives, for the OpenAPI document (each with the ErrorOut body)."""
    why = {
        400: "bad Idempotency-Key or cursor", 401: "missing or invalid API key", 403: "the key may not do this",
        404: "no such thread or approval", 409: "the thread or approval is not in a state for this",
        413: "body over 256 KB", 422: "malformed body, or an Idempotency-Key reused with another request",
        503: "Redis is unavailable; try again shortly",
    }  # fmt: skip
    return {c: {"model": ErrorOut, "description": why[c]} for c in codes}


IDEMPOTENCY_KEY = Header(
    alias="Idempotency-Key", max_length=255,
    description="a repeat within 24 h of a 2xx answer gets that answer again (Idempotent-Replayed: true)",
)  # fmt: skip


CURSOR = Query(max_length=512, pattern=r"^[0-9]+:.+$", description="the previous page's next")


# In the OpenAPI document only (as the security scheme every route needs): the check itself is _authenticator's.
BEARER = HTTPBearer(auto_error=False, scheme_name="apiKey", description="an API key from config (api_keys)")


def router(deps: Deps) -> APIRouter:
    # FastAPI reads these annotations at runtime, so this module has no `from __future__ import annotations`.
    needs = _authenticator(load_keys(deps))
    Launcher = Annotated[Principal, needs("launch")]
    Reader = Annotated[Principal, needs("read")]
    Decider = Annotated[Principal, needs("decide")]
    IdemKey = Annotated[str | None, IDEMPOTENCY_KEY]
    api = APIRouter(prefix="/api/v1", tags=["threads"], route_class=_AuthFirst, dependencies=[Security(BEARER)])

    class Launch(LaunchIn):  # the document names the configured agents; the check (a 422 that says which) is ours
        model_config = ConfigDict(title="LaunchIn")
        agent: str = Field(json_schema_extra={"enum": list[JsonValue](sorted(deps.agents.agents))})

    posted = (400, 401, 403, 413, 422, 503)

    def accepted(a: control.Accepted) -> tuple[int, Any]:
        return 202, AcceptedOut(thread_id=a.thread_id, duplicate=a.duplicate).model_dump()

    async def existing(thread_id: str, who: Principal) -> tuple[ThreadLaunched, threads.Thread | None]:
        """A thread's launch, whether applied or only launched (on the stream), and its log if applied: 404 if
        neither, or if the caller may not use its agent (its existence is not revealed)."""
        thread = await threads.load(deps.redis, deps.keys, thread_id)
        launched: ThreadLaunched | None = thread.launched
        if not thread.events:
            launched = await control.pending_launch(deps, thread_id)
        if launched is None or not who.may_use(launched.agent):
            raise HTTPException(404, f"no thread {thread_id!r}")
        return launched, thread if thread.events else None

    @api.post(
        "/threads", status_code=202, response_model=AcceptedOut, responses=_errors(*posted)
    )  # fmt: skip
    async def launch(body: Launch, request: Request, who: Launcher, idempotency_key: IdemKey = None) -> JSONResponse:
        """Launch a thread (or, with a known business_key, send the message into its thread)."""

        async def run() -> tuple[int, Any]:
            if body.agent not in deps.agents.agents:
                raise HTTPException(422, f"no agent {body.agent!r}; agents: {sorted(deps.agents.agents)}")
            if not who.may_use(body.agent):
                raise HTTPException(403, f"this key may not use agent {body.agent!r}")
            ch = body.channel or ChannelIn(kind=KIND, address="")
            if not who.may_talk_on(ch.kind, ch.address):
                raise HTTPException(403, f"this key may not start threads on {ch.kind}:{ch.address}")
            # the server names the speaker; on the API itself the address is the key's name
            ref = ChannelRef(kind=ch.kind, address=who.name if ch.kind == KIND else ch.address, user=who.identity)
            tid = _business_thread(body.agent, body.business_key) if body.business_key else new_id()
            received = await control.receive(deps, tid, body.message, ref, key=f"msg:{new_id()}", agent=body.agent,
                                             business_key=body.business_key or "")  # fmt: skip
            if received is None:  # cannot happen: a start is allowed here
                raise HTTPException(500, "the message was not taken")
            return accepted(received)

        return await idempotent(deps, request, who, run)

    @api.get("/threads", response_model=ThreadPage, responses=_errors(400, 401, 403, 422, 503))
    async def list_threads(
        who: Reader,
        agent: str | None = None,
        status: Status | None = None,
        channel: Annotated[str | None, Query(max_length=64, description="the kind of channel it started on, "
                                                                          "e.g. slack")] = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        cursor: Annotated[str | None, CURSOR] = None,
    ) -> ThreadPage:
        """Threads, most recently active first, a page at a time. A filtered page looks at a bounded number of
        threads, so it may be short (even empty) while ``next`` still leads on: follow ``next`` until null."""
        try:
            page = await control.threads_page(
                deps, agent=agent, status=status, limit=limit, cursor=cursor, agents=who.agents, channel=channel
            )
        except control.BadCursor as exc:
            raise HTTPException(400, str(exc)) from None
        items = [ThreadOut(id=r.id, agent=r.agent, status=r.status, events=r.events, updated=r.updated)
                 for r in page.items]  # fmt: skip
        return ThreadPage(items=items, next=page.next)

    @api.get("/threads/{thread_id}", response_model=ThreadDetailOut, responses=_errors(401, 403, 404, 503))
    async def get_thread(thread_id: str, who: Reader) -> ThreadDetailOut:
        """A thread with its whole event log."""
        launched, t = await existing(thread_id, who)
        if t is None:  # accepted (202), on the inbound stream: it exists, with nothing in its log yet
            return ThreadDetailOut(id=thread_id, agent=launched.agent, status="queued", events=0,
                                   updated=launched.at, events_log=[])  # fmt: skip
        return ThreadDetailOut(
            id=t.id, agent=t.agent, status=t.status, events=len(t.events), updated=t.events[-1].at,
            events_log=[codec.event_to_dict(e, keep_thread=True) for e in t.events],
        )  # fmt: skip

    @api.post(
        "/threads/{thread_id}/messages", status_code=202, response_model=AcceptedOut,
        responses=_errors(*posted, 404),
    )  # fmt: skip
    async def message(
        thread_id: str, body: TextIn, request: Request, who: Launcher, idempotency_key: IdemKey = None
    ) -> JSONResponse:
        """Send a message into a thread."""

        async def run() -> tuple[int, Any]:
            origin = (await existing(thread_id, who))[0].ref
            ref = origin or ChannelRef(kind=KIND, address=who.name)
            return accepted(
                await control.send(deps, thread_id, body.text, ref.model_copy(update={"user": who.identity}))
            )

        return await idempotent(deps, request, who, run)

    @api.post(
        "/threads/{thread_id}/answer", status_code=202, response_model=AcceptedOut,
        responses=_errors(*posted, 404, 409),
    )  # fmt: skip
    async def answer(
        thread_id: str, body: TextIn, request: Request, who: Launcher, idempotency_key: IdemKey = None
    ) -> JSONResponse:
        """Answer the question a thread is waiting on (409 if it is not waiting for a human)."""

        async def run() -> tuple[int, Any]:
            t = (await existing(thread_id, who))[1]
            state = t.status if t is not None else "not started yet"
            if t is None or t.status is not Status.WAITING_HUMAN:
                raise HTTPException(409, f"thread {thread_id} is not waiting for an answer (it is {state})")
            event = HumanAnswered(thread_id=thread_id, key=f"answer:{new_id()}", text=body.text, by=who.identity)
            entry = await deps.bus.publish(event)
            return accepted(control.Accepted(thread_id, entry))

        return await idempotent(deps, request, who, run)

    def _control(verb: str, call: Callable[[Deps, str, str], Awaitable[control.Accepted]]) -> None:
        @api.post(
            f"/threads/{{thread_id}}/{verb}", status_code=202, response_model=AcceptedOut, name=verb,
            responses=_errors(400, 401, 403, 404, 422, 503),
        )  # fmt: skip
        async def act(thread_id: str, request: Request, who: Launcher, idempotency_key: IdemKey = None) -> JSONResponse:
            async def run() -> tuple[int, Any]:
                await existing(thread_id, who)
                return accepted(await call(deps, thread_id, who.identity))

            return await idempotent(deps, request, who, run)

        act.__doc__ = f"{verb.capitalize()} a thread (also one launched but not started yet)."

    _control("pause", control.pause)
    _control("resume", control.resume)
    _control("cancel", control.cancel)

    @api.get(
        "/approvals", response_model=ApprovalPage, tags=["approvals"], responses=_errors(400, 401, 403, 422, 503)
    )  # fmt: skip
    async def pending(
        who: Reader,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
        cursor: Annotated[str | None, CURSOR] = None,
    ) -> ApprovalPage:
        """Approvals waiting for a decision, the soonest to expire first, a page at a time: follow ``next`` until
        null. A key limited to some agents sees only their threads' approvals (a page may then hold fewer than
        ``limit``)."""
        try:
            page = await control.approvals_page(deps, limit=limit, cursor=cursor, agents=who.agents)
        except control.BadCursor as exc:
            raise HTTPException(400, str(exc)) from None
        items = [
            ApprovalOut(
                id=a.id, thread_id=a.thread_id, tool=a.tool, args=a.args, approvers=list(a.approvers),
                reason=a.reason, requested_at=a.requested_at,
            )
            for a in page.items
        ]  # fmt: skip
        return ApprovalPage(items=items, next=page.next)

    @api.get(
        "/approvals/{approval_id}", response_model=ApprovalDetailOut, tags=["approvals"],
        responses=_errors(401, 403, 404, 503),
    )  # fmt: skip
    async def approval(approval_id: str, who: Reader) -> ApprovalDetailOut:
        """One approval: the exact call it is bound to, every argument in full, and its state."""
        try:
            record = await approvals.get(deps.redis, deps.keys, approval_id)
        except NotFound:
            raise HTTPException(404, f"no approval {approval_id!r}") from None
        thread = (await existing(record.thread_id, who))[1]
        request = next((e for e in (thread.events if thread else []) if isinstance(e, ApprovalRequested)
                        and e.approval_id == approval_id), None)  # fmt: skip
        if request is None:  # the record outlives nothing else: its request is in the thread's log
            raise HTTPException(404, f"no approval {approval_id!r}")
        return ApprovalDetailOut(
            id=approval_id, thread_id=record.thread_id, tool=request.tool, args=request.args,
            approvers=list(request.approvers), reason=request.reason, requested_at=request.at,
            state=record.state, by=record.by, at=record.at,
        )  # fmt: skip

    @api.post(
        "/approvals/{approval_id}/decision", response_model=DecisionOut, tags=["approvals"],
        responses=_errors(*posted, 404, 409),
    )  # fmt: skip
    async def decide(
        approval_id: str, body: DecisionIn, request: Request, who: Decider, idempotency_key: IdemKey = None
    ) -> JSONResponse:
        """Approve (optionally with edited arguments) or reject with feedback. The first decision wins."""

        async def run() -> tuple[int, Any]:
            try:
                outcome = await control.decide(
                    deps, approval_id, by=who.identity, approved=body.approved, feedback=body.feedback, args=body.args
                )
            except NotFound as exc:
                raise HTTPException(404, str(exc)) from None
            except Conflict as exc:  # e.g. an edit for a tool removed from the config
                raise HTTPException(409, str(exc)) from None
            except (HandrailError, ConfigError) as exc:
                raise HTTPException(422, str(exc)) from None
            if outcome.result == "missing":
                raise HTTPException(404, f"no approval {approval_id!r}")
            if outcome.result == "forbidden":
                raise HTTPException(403, f"{who.identity} may not decide this approval")
            if outcome.result == "decided":
                raise HTTPException(409, outcome.message)
            return 200, DecisionOut(
                result=outcome.result, state=outcome.state, by=outcome.by, at=outcome.at
            ).model_dump()

        return await idempotent(deps, request, who, run)

    return api


_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def _business_thread(agent: str, business_key: str) -> str:
    """The thread a business key maps to, for one agent: readable, and stable across calls."""
    return f"{_UNSAFE.sub('-', agent)}.{business_key}"


class ApiChannel(BaseChannel):
    """The REST API under /api/v1. Nothing is delivered to an API caller: it reads the thread, or subscribes to
    webhooks, so no outbox is kept for this kind."""

    name = KIND
    delivers = False

    def routes(self, deps: Deps) -> Sequence[Any]:
        return [router(deps)]


channel = ApiChannel()
