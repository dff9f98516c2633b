"""Webhooks: thread events POSTed, signed, to subscribers; and signed inbound triggers that launch threads.

Signing: Standard Webhooks (https://www.standardwebhooks.com), the same in both directions, with its maintained
``standardwebhooks`` library. Secrets are ``whsec_`` followed by base64 of 24 to 64 random bytes.
  webhook-id: <event id>                  the de-duplication key: retries resend the same id
  webhook-timestamp: 1732500000           unix seconds when this attempt was signed
  webhook-signature: v1,<base64>          HMAC-SHA256(secret, b"<id>.<timestamp>.<raw body>")
  Handrail-Event: approval.requested      what happened (outbound)

The id is signed, so a captured request re-sent with a new id fails verification, and a re-sent one with the same
id is a duplicate. Verify with ``standardwebhooks.Webhook(secret).verify(raw_body, headers)`` (a sender rotating
secrets may send several space-separated signatures: any match passes); it refuses a timestamp more than 5
minutes from your clock. De-duplicate on webhook-id: delivery is at least once.

Outbound: each subscriber in ``webhooks:`` gets POSTs of the events it asked for, as JSON
``{"id", "type", "thread_id", "agent", "at", "event": {the full event}}``. A 2xx answer is delivered. A 4xx
other than 408, 409, 425 and 429 says the subscriber will never take that event: it is dead-lettered at once
(``handrail dlq list``). Anything else — a 5xx, one of those four, a timeout, a refused connection — is retried
with backoff (Retry-After honoured) and dead-lettered after 10 attempts; meanwhile the subscriber's events about
other threads go on, those of the same thread wait their turn. Each subscriber has its own outbox and its own
deliverer, and one process at a time delivers to it (a lease), so a thread's events arrive in the order they
happened and a dead subscriber delays no one else.

Inbound: ``POST /hooks/NAME`` (a trigger in ``triggers:``), signed with the trigger's secret, body a JSON object.
The thread is ``hook-NAME-VALUE`` where VALUE is the payload's value at the ``thread_key`` JSON pointer (the
same value continues the same thread); without one, each delivery starts its own thread. Answers: 202
``{"thread_id", "duplicate"}`` (a repeated webhook-id changes nothing and names the thread of its first
delivery); 401 bad, missing or stale signature; 400 not a JSON object (or not UTF-8, or holding a lone surrogate);
404 no such trigger; 413 over 256 KB; 503 the trigger's secret is not set or not in ``whsec_`` form.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bot import codec, control, jsonbody
from bot.bus import SEEN_TTL
from bot.channel import BaseChannel, Role, Runner
from bot.config import WebhookSpec
from bot.errors import ConfigError, DeliveryFailed, PermanentDeliveryError
from bot.events import ChannelRef, Event
from bot.outbox import Deliver, Outbound, OutboxConsumer, Receipt
from bot.runtime import Deps
from bot.threads import Thread

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 10
BASE_DELAY = 0.5
TIMEOUT = 10.0
TEXT_CAP = 8 * 1024  # bytes of payload shown to the agent
_SAFE_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # what may go into a thread id as is (else it is hashed)


# -- signing -----------------------------------------------------------------------------------------------------


class SignatureError(Exception):
    """A request that does not prove it came from the secret's holder; the message says why."""


class BadSecret(ValueError):
    """A secret not in the ``whsec_<base64>`` form Standard Webhooks uses."""


def webhook(secret: str) -> Webhook:
    """The signer/verifier for a ``whsec_`` secret; BadSecret (never showing the secret) if it is malformed."""
    if not secret.startswith("whsec_"):
        raise BadSecret("not a Standard Webhooks secret: it should start with 'whsec_'")
    try:
        raw = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise BadSecret("not a Standard Webhooks secret: the part after 'whsec_' is not base64") from None
    if not 24 <= len(raw) <= 64:
        raise BadSecret(f"a Standard Webhooks secret holds 24 to 64 bytes, this one {len(raw)}")
    return Webhook(raw)


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value for ``body`` (UTF-8: the scheme signs text) sent as ``msg_id`` at
    ``timestamp``."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return webhook(secret).sign(msg_id, when, body.decode())


def verify(secret: str, headers: Mapping[str, str], body: bytes) -> None:
    """Raise SignatureError unless ``body`` was signed with ``secret``, with its id and a fresh timestamp."""
    try:
        webhook(secret).verify(body, dict(headers), json_parse=False)
    except WebhookVerificationError as exc:
        raise SignatureError(f"{exc} (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature)") from None
    except ValueError:  # a body that is not UTF-8 (the scheme signs text), or a malformed signature header
        raise SignatureError("malformed webhook-signature or a body that is not UTF-8") from None


# -- outbound ----------------------------------------------------------------------------------------------------


# 4xx answers that ask to come back later (timeout, conflict, too early, too many requests)
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def refused_for_good(status: int) -> bool:
    """Whether a subscriber's HTTP status means it will never take this event (so retrying is pointless)."""
    return 400 <= status < 500 and status not in RETRYABLE_4XX


def _secret(name: str, var: str) -> str:
    value = os.environ.get(var, "")
    if not value:
        raise ConfigError("environment", var, f"not set; webhook subscriber {name!r} signs its requests with it")
    try:
        webhook(value)
    except BadSecret as exc:
        raise ConfigError("environment", var, str(exc)) from None
    return value


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError):  # or an HTTP date
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def sender(name: str, spec: WebhookSpec, secret: str, client: httpx.AsyncClient) -> Deliver:
    """The Deliver function for one subscriber: one signed POST per attempt."""

    async def deliver(msg: Outbound) -> Receipt | None:
        if msg.kind != "event" or msg.event is None:
            return None  # not a webhook message: nothing to send
        body = json.dumps(msg.event, ensure_ascii=False).encode()  # exactly these bytes are signed and sent
        stamp = int(time.time())  # signed per attempt, so a late retry is not refused as stale
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Handrail-Webhooks/1",
            "Handrail-Event": str(msg.event.get("type", "")),
            "webhook-id": msg.id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, msg.id, stamp, body),
        }
        try:
            response = await client.post(spec.url, content=body, headers=headers)
        except httpx.TimeoutException:
            raise DeliveryFailed(f"webhook {name}: no answer within {client.timeout.read} s") from None
        except httpx.HTTPError as exc:  # refused, reset, unresolvable... (the message never holds the secret)
            raise DeliveryFailed(f"webhook {name}: {type(exc).__name__}: {exc}") from None
        if not response.is_success:
            why = f"webhook {name} answered HTTP {response.status_code}"
            if refused_for_good(response.status_code):
                raise PermanentDeliveryError(why)
            raise DeliveryFailed(why, _retry_after(response))
        return Receipt(channel_id=f"{name}:{response.status_code}")

    return deliver


async def deliver_all(
    deps: Deps, stop: asyncio.Event, *, max_attempts: int = MAX_ATTEMPTS, base_delay: float = BASE_DELAY,
    timeout: float = TIMEOUT,
) -> None:  # fmt: skip
    """Deliver every subscriber's outbox until ``stop``; each on its own, so none waits on another."""
    subscribers = deps.agents.spec.webhooks
    # every secret first: a missing one stops start-up instead of dead-lettering a subscriber's events later
    secrets = {name: _secret(name, spec.secret_env) for name, spec in subscribers.items()}
    if not subscribers:
        await stop.wait()
        return
    async with contextlib.AsyncExitStack() as clients:
        runs = []
        for name, spec in subscribers.items():
            client = await clients.enter_async_context(httpx.AsyncClient(timeout=timeout))
            consumer = OutboxConsumer(
                deps.redis, deps.keys, webhook_stream(name), sender(name, spec, secrets[name], client),
                group="webhook", consumer="deliverer", max_attempts=max_attempts, base_delay=base_delay,
                claim_idle_ms=0,  # only the lease holder reads, so whatever is pending was left by a dead one
            )  # fmt: skip
            runs.append(consumer.run_exclusive(stop))  # one deliverer per subscriber keeps its events in order
        await asyncio.gather(*runs)


# -- inbound -----------------------------------------------------------------------------------------------------


class HookAccepted(BaseModel):
    thread_id: str
    duplicate: bool  # this delivery was accepted before; nothing changed


def _pointer(doc: Any, pointer: str) -> str | None:
    """The scalar at a JSON pointer (RFC 6901, e.g. ``/order/id``) as text; None if absent or not a scalar."""
    if not pointer:
        return None
    for part in pointer.removeprefix("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return None
    if isinstance(doc, bool) or not isinstance(doc, str | int | float) or doc == "":
        return None
    return str(doc)


def _digest(text: str | bytes, n: int = 24) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()[:n]


def _message(name: str, payload: dict[str, Any]) -> str:
    shown = json.dumps(payload, indent=2, ensure_ascii=False).encode()
    if len(shown) <= TEXT_CAP:
        return f"Webhook {name}:\n{shown.decode()}"
    cut = shown[:TEXT_CAP].decode(errors="ignore")
    return f"Webhook {name}:\n{cut}\n[payload cut: first {TEXT_CAP} of {len(shown)} bytes shown]"


def trigger_router(deps: Deps) -> APIRouter:
    router = APIRouter(tags=["webhooks"])
    errors: dict[int | str, dict[str, Any]] = {
        400: {"description": "the body is not a JSON object"},
        401: {"description": "bad, missing or stale signature"},
        404: {"description": "no such trigger"},
        503: {"description": "the trigger's secret is not set"},
    }

    @router.post("/hooks/{name}", status_code=202, response_model=HookAccepted, responses=errors)
    async def hook(name: str, request: Request) -> HookAccepted:
        """Launch (or continue) a thread from a signed webhook; see channels/webhooks.py for the signature."""
        spec = deps.agents.spec.triggers.get(name)
        if spec is None:
            raise HTTPException(404, f"no trigger {name!r}")
        secret = os.environ.get(spec.secret_env, "")
        if not secret:
            raise HTTPException(503, f"trigger {name} is not configured: set {spec.secret_env}")
        body = await request.body()
        try:
            webhook(secret)
        except BadSecret as exc:
            raise HTTPException(503, f"trigger {name} is not configured: {spec.secret_env}: {exc}") from None
        try:
            verify(secret, request.headers, body)
        except SignatureError as exc:
            raise HTTPException(401, str(exc)) from None
        try:
            payload = jsonbody.parse(body)
        except jsonbody.BadJSON as exc:
            raise HTTPException(400, str(exc)) from None
        if not isinstance(payload, dict):
            raise HTTPException(400, f"body must be a JSON object, not {type(payload).__name__}")
        delivery = request.headers["webhook-id"].strip()  # signed: a new id means the sender sent it anew
        if not _SAFE_KEY.fullmatch(delivery):
            delivery = "h:" + _digest(delivery)
        key = f"hook:{name}:{delivery}"
        value = _pointer(payload, spec.thread_key)
        # without a thread key the id still follows from the delivery, so a repeat lands on the same thread
        suffix = (value if _SAFE_KEY.fullmatch(value) else "h" + _digest(value)) if value else "d" + _digest(key)
        thread_id = f"hook-{name}-{suffix}"
        # the first delivery of an id fixes its thread: a repeat with another body launches nothing anywhere
        slot = deps.keys.seen(f"{key}:thread")
        if not await deps.redis.set(slot, thread_id, nx=True, ex=SEEN_TTL):
            first = (await deps.redis.get(slot) or thread_id.encode()).decode()
            if first != thread_id:
                return HookAccepted(thread_id=first, duplicate=True)
        ref = ChannelRef(kind=spec.channel.kind, address=spec.channel.address, user=spec.channel.user or f"hook:{name}")
        text = _message(name, payload)
        accepted = await control.receive(deps, thread_id, text, ref, key=key, agent=spec.agent)
        assert accepted is not None  # a hook may always start a thread
        return HookAccepted(thread_id=accepted.thread_id, duplicate=accepted.duplicate)

    return router


__all__ = [
    "BadSecret", "DeliveryFailed", "SignatureError", "deliver_all", "sign", "trigger_router", "verify", "webhook",
]  # fmt: skip


# -- the channel ---------------------------------------------------------------------------------------------------

# Which thread events a subscriber can ask for, by the name it asks with.
NOTIFICATIONS = {
    "approval.requested": "approval.requested",
    "approval.decided": "approval.decided",
    "reply": "thread.done",
    "thread.failed": "thread.failed",
}


def webhook_stream(name: str) -> str:
    """Each subscriber has its own outbox, so a failing one delays no one else."""
    return f"webhook.{name}"


class WebhookChannel(BaseChannel):
    """Signed outbound notifications of thread events to each configured subscriber, and signed inbound triggers."""

    name = "webhook"

    def routes(self, deps: Deps) -> Sequence[Any]:
        return [trigger_router(deps)]

    def processes(self, deps: Deps, role: Role) -> Sequence[Runner]:
        return [lambda stop: deliver_all(deps, stop)] if role == "worker" else []

    def notify(self, deps: Deps, thread: Thread, event: Event) -> Sequence[tuple[str, Outbound]]:
        name = NOTIFICATIONS.get(event.type)
        if name is None or not deps.agents.spec.webhooks:  # on every recorded event: nothing to build for no one
            return []
        body = {"id": event.id, "type": name, "thread_id": thread.id, "agent": thread.agent, "at": event.at,
                "event": codec.event_to_dict(event, keep_thread=True)}  # fmt: skip
        out: list[tuple[str, Outbound]] = []
        for sub, spec in deps.agents.spec.webhooks.items():
            if name in spec.events:
                ref = ChannelRef(kind=self.name, address=sub)
                out.append((webhook_stream(sub), Outbound(id=event.id, thread_id=thread.id, ref=ref, kind="event",
                                                          event=body)))  # fmt: skip
        return out


channel = WebhookChannel()
