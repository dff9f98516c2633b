"""The REST API (/api/v1): launch, inspect, pause, resume and cancel threads, message them, answer them, decide.

Auth: ``Authorization: Bearer <key>`` with keys from config (``api_keys``, secrets in the environment), each with
scopes ``launch``, ``read``, ``decide``; the caller's identity is ``api:<name>``. Every POST honours an
``Idempotency-Key`` header: a repeat within 24 h gets the first answer again and changes nothing.
"""

import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from bot import approvals, codec, control, threads
from bot.channel import BaseChannel
from bot.errors import ConfigError, Conflict, HandrailError, NotFound
from bot.events import ChannelRef, HumanAnswered, new_id
from bot.runtime import Deps
from bot.threads import Status

log = logging.getLogger(__name__)

KIND = "api"
IDEMPOTENCY_TTL = 24 * 3600
Scope = Literal["launch", "read", "decide"]


# -- bodies ---------------------------------------------------------------------------------------------------


class ChannelIn(BaseModel):
    """Where the thread talks to humans (a Slack channel, an email address...); default: nowhere but the API."""

    kind: str = Field(KIND, pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    address: str = Field("", max_length=256)
    user: str = Field("", max_length=256)


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
    status: Status
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

    @property
    def identity(self) -> str:
        return f"{KIND}:{self.name}"


def load_keys(deps: Deps) -> list[tuple[bytes, Principal]]:
    """The configured keys whose secrets are set; a key without its secret is disabled, with a warning."""
    keys = []
    for name, spec in deps.agents.spec.api_keys.items():
        secret = os.environ.get(spec.key_env, "")
        if not secret:
            log.warning("API key %r is disabled: %s is not set", name, spec.key_env)
            continue
        keys.append((secret.encode(), Principal(name, frozenset(spec.scopes))))
    return keys


def _authenticator(keys: list[tuple[bytes, Principal]]) -> Callable[[Scope], Any]:
    def needs(scope: Scope) -> Any:
        async def check(authorization: Annotated[str | None, Header()] = None) -> Principal:
            token = (authorization or "").removeprefix("Bearer ").strip().encode()
            found = None
            for secret, principal in keys:  # compare with every key, in constant time each
                if hmac.compare_digest(secret, token) and token:
                    found = principal
            if found is None:
                raise HTTPException(401, "missing or invalid API key", headers={"WWW-Authenticate": "Bearer"})
            if scope not in found.scopes:
                raise HTTPException(403, f"this key lacks the {scope!r} scope")
            return found

        return Depends(check)

    return needs


# -- idempotency ----------------------------------------------------------------------------------------------


async def idempotent(
    deps: Deps, request: Request, who: Principal, run: Callable[[], Awaitable[tuple[int, Any]]]
) -> JSONResponse:
    """Run ``run`` once per Idempotency-Key (per caller); repeats get the stored answer."""
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
    except HTTPException as exc:
        status, body = exc.status_code, {"detail": exc.detail}
    except BaseException:
        await deps.redis.delete(slot)  # nothing was answered: the caller may try again
        raise
    record = {"fingerprint": fingerprint, "status": status, "body": body}
    await deps.redis.set(slot, json.dumps(record), ex=IDEMPOTENCY_TTL)
    return JSONResponse(body, status)


# -- routes ---------------------------------------------------------------------------------------------------


def router(deps: Deps) -> APIRouter:
    # FastAPI reads these annotations at runtime, so this module has no `from __future__ import annotations`.
    needs = _authenticator(load_keys(deps))
    Launcher = Annotated[Principal, needs("launch")]
    Reader = Annotated[Principal, needs("read")]
    Decider = Annotated[Principal, needs("decide")]
    api = APIRouter(prefix="/api/v1", tags=["threads"])

    def accepted(a: control.Accepted) -> tuple[int, Any]:
        return 202, AcceptedOut(thread_id=a.thread_id, duplicate=a.duplicate).model_dump()

    async def existing(thread_id: str) -> threads.Thread:
        try:
            return await threads.get(deps.redis, deps.keys, thread_id)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @api.post("/threads", status_code=202, response_model=AcceptedOut)
    async def launch(body: LaunchIn, request: Request, who: Launcher) -> JSONResponse:
        """Launch a thread (or, with a known business_key, send the message into its thread)."""

        async def run() -> tuple[int, Any]:
            if body.agent not in deps.agents.agents:
                raise HTTPException(422, f"no agent {body.agent!r}; agents: {sorted(deps.agents.agents)}")
            ch = body.channel or ChannelIn(kind=KIND, address=who.name, user="")
            ref = ChannelRef(kind=ch.kind, address=ch.address, user=ch.user or who.identity)
            tid = _business_thread(body.agent, body.business_key) if body.business_key else new_id()
            received = await control.receive(deps, tid, body.message, ref, key=f"msg:{new_id()}", agent=body.agent,
                                             business_key=body.business_key or "")  # fmt: skip
            if received is None:  # cannot happen: a start is allowed here
                raise HTTPException(500, "the message was not taken")
            return accepted(received)

        return await idempotent(deps, request, who, run)

    @api.get("/threads", response_model=list[ThreadOut])
    async def list_threads(
        who: Reader,
        agent: str | None = None,
        status: Status | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> list[ThreadOut]:
        """Threads, most recently active first."""
        rows = await control.list_threads(deps, agent=agent, status=status, limit=limit)
        return [ThreadOut(id=r.id, agent=r.agent, status=r.status, events=r.events, updated=r.updated) for r in rows]

    @api.get("/threads/{thread_id}", response_model=ThreadDetailOut)
    async def get_thread(thread_id: str, who: Reader) -> ThreadDetailOut:
        """A thread with its whole event log."""
        t = await existing(thread_id)
        return ThreadDetailOut(
            id=t.id, agent=t.agent, status=t.status, events=len(t.events), updated=t.events[-1].at,
            events_log=[codec.event_to_dict(e, keep_thread=True) for e in t.events],
        )  # fmt: skip

    @api.post("/threads/{thread_id}/messages", status_code=202, response_model=AcceptedOut)
    async def message(thread_id: str, body: TextIn, request: Request, who: Launcher) -> JSONResponse:
        """Send a message into a thread."""

        async def run() -> tuple[int, Any]:
            t = await existing(thread_id)
            ref = t.origin or ChannelRef(kind=KIND, address=who.name)
            return accepted(
                await control.send(deps, thread_id, body.text, ref.model_copy(update={"user": who.identity}))
            )

        return await idempotent(deps, request, who, run)

    @api.post("/threads/{thread_id}/answer", status_code=202, response_model=AcceptedOut)
    async def answer(thread_id: str, body: TextIn, request: Request, who: Launcher) -> JSONResponse:
        """Answer the question a thread is waiting on (409 if it is not waiting for a human)."""

        async def run() -> tuple[int, Any]:
            t = await existing(thread_id)
            if t.status is not Status.WAITING_HUMAN:
                raise HTTPException(409, f"thread {thread_id} is not waiting for an answer (it is {t.status})")
            event = HumanAnswered(thread_id=thread_id, key=f"answer:{new_id()}", text=body.text, by=who.identity)
            entry = await deps.bus.publish(event)
            return accepted(control.Accepted(thread_id, entry))

        return await idempotent(deps, request, who, run)

    def _control(verb: str, call: Callable[[Deps, str, str], Awaitable[control.Accepted]]) -> None:
        @api.post(f"/threads/{{thread_id}}/{verb}", status_code=202, response_model=AcceptedOut, name=verb)
        async def act(thread_id: str, request: Request, who: Launcher) -> JSONResponse:
            async def run() -> tuple[int, Any]:
                await existing(thread_id)
                return accepted(await call(deps, thread_id, who.identity))

            return await idempotent(deps, request, who, run)

        act.__doc__ = f"{verb.capitalize()} a thread."

    _control("pause", control.pause)
    _control("resume", control.resume)
    _control("cancel", control.cancel)

    @api.get("/approvals", response_model=list[ApprovalOut], tags=["approvals"])
    async def pending(who: Reader) -> list[ApprovalOut]:
        """Approvals waiting for a decision, oldest first."""
        return [
            ApprovalOut(
                id=a.id,
                thread_id=a.thread_id,
                tool=a.tool,
                args=a.args,
                approvers=list(a.approvers),
                reason=a.reason,
                requested_at=a.requested_at,
            )
            for a in await approvals.pending(deps.redis, deps.keys)
        ]

    @api.post("/approvals/{approval_id}/decision", response_model=DecisionOut, tags=["approvals"])
    async def decide(approval_id: str, body: DecisionIn, request: Request, who: Decider) -> JSONResponse:
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
